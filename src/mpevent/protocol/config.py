"""The daemon's configuration: TOML file plus command-line overrides, validated.

Pure: reading the file is the only I/O. Every error names the file, the key
and what is wrong, and the daemon does not start (or, on SIGHUP, keeps the
configuration it has). Example::

    events = ["E_PIKE_BLOCKED", "E_SIP_REQUEST"]

    [segment]
    name = "mpevent"        # /dev/shm/mpevent
    lanes = 32
    lane_size = 1048576     # bytes, a power of two
    overflow_lanes = 4      # shared lanes for producer processes beyond `lanes`
    senders = 1
    relays = 4              # broker (rabbitmq:) destinations at once, a relay process each
    handoff_size = 1048576  # bytes per sender x relay hand-off lane, a power of two
    backlog = 16384                  # datagrams one slow destination may keep waiting
    backlog_bytes = 4194304          # bytes one destination may keep waiting
    sender_backlog_bytes = 67108864  # bytes all of one sender's backlogs may keep

    [mi]
    udp = "127.0.0.1:8080"  # "" disables a listener
    unix = "/run/mpevent/mpevent.sock"
    unix_mode = "0660"
    http = "127.0.0.1:8888"
    fifo = "/tmp/opensips_fifo"  # OpenSIPS mi_fifo; default: NAME_fifo in the runtime directory
    fifo_mode = "0660"
    fifo_reply_dir = "/tmp/"     # where clients make their reply FIFOs

    [log]
    level = "info"

    [security]
    allowed_networks = ["127.0.0.0/8", "::1/128"]  # where UDP subscribers may be
    unix_path_prefixes = []                        # empty: any UNIX path
    max_subs_per_event = 256

    [[subscribe]]           # permanent, like OpenSIPS's subscribe_event
    event = "E_PIKE_BLOCKED"
    socket = "udp:127.0.0.1:9000"
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

from mpevent import defaults
from mpevent.processes.sender.backlog import BacklogLimits
from mpevent.protocol.destination import Destination, DestinationError, parse_destination
from mpevent.protocol.payload import check_event_name
from mpevent.protocol.policy import LOOPBACK, DestinationPolicy, DestinationRefused
from mpevent.shm.layout import Geometry


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says where and why."""


def runtime_dir() -> Path:
    """Where sockets and FIFOs go: $XDG_RUNTIME_DIR/mpevent, /run/mpevent as root, else /tmp."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "mpevent"
    if os.geteuid() == 0:
        return Path("/run/mpevent")
    return Path(f"/tmp/mpevent-{os.getuid()}")


class _Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class SegmentSection(_Strict):
    name: str = defaults.SEGMENT_NAME
    lanes: int = defaults.LANES
    lane_size: int = defaults.LANE_SIZE
    overflow_lanes: int = defaults.OVERFLOW_LANES
    senders: int = defaults.SENDERS
    relays: int = defaults.RELAYS
    handoff_size: int = defaults.HANDOFF_SIZE
    max_events: int = defaults.MAX_EVENTS
    max_subs: int = defaults.MAX_SUBS
    backlog: int = defaults.BACKLOG
    backlog_bytes: int = defaults.BACKLOG_BYTES
    sender_backlog_bytes: int = defaults.SENDER_BACKLOG_BYTES
    drain_timeout: float = defaults.DRAIN_TIMEOUT


class MISection(_Strict):
    udp: str | None = None  # None: the default; "": disabled
    unix: str | None = None
    unix_mode: str = f"{defaults.MI_UNIX_MODE:04o}"
    http: str = ""
    fifo: str | None = None  # None: NAME_fifo in the runtime directory; "": disabled
    fifo_mode: str = f"{defaults.MI_UNIX_MODE:04o}"
    fifo_reply_dir: str = "/tmp/"
    allow_remote: bool = False  # bind beyond loopback (a warning is logged)


class SecuritySection(_Strict):
    allowed_networks: list[str] = msgspec.field(default_factory=lambda: [str(n) for n in LOOPBACK])
    unix_path_prefixes: list[str] = msgspec.field(default_factory=list)
    max_subs_per_event: int = defaults.MAX_SUBS_PER_EVENT


class LogSection(_Strict):
    level: str = defaults.LOG_LEVEL


class Subscribe(_Strict):
    event: str
    socket: str


class FileConfig(_Strict):
    events: list[str] = msgspec.field(default_factory=list)
    segment: SegmentSection = msgspec.field(default_factory=SegmentSection)
    mi: MISection = msgspec.field(default_factory=MISection)
    log: LogSection = msgspec.field(default_factory=LogSection)
    security: SecuritySection = msgspec.field(default_factory=SecuritySection)
    subscribe: list[Subscribe] = msgspec.field(default_factory=list)


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``mpevent serve`` runs with, validated."""

    name: str
    geometry: Geometry
    backlog: BacklogLimits  # the keys backlog, backlog_bytes and sender_backlog_bytes
    drain_timeout: float
    mi_udp: tuple[str, int] | None
    mi_unix: Path | None
    mi_unix_mode: int
    mi_http: tuple[str, int] | None
    mi_fifo: Path | None  # the MI over a FIFO, as OpenSIPS mi_fifo
    mi_fifo_mode: int
    mi_fifo_reply_dir: Path
    log_level: str
    events: tuple[str, ...]
    # Permanent subscriptions (event, destination), parsed and allowed by
    # ``policy`` here, once: the hub applies them as they are.
    subscriptions: tuple[tuple[str, Destination], ...]
    policy: DestinationPolicy
    max_subs_per_event: int
    runtime_dir: Path
    source: str  # the file it came from, for messages


def load(path: str | Path | None, overrides: dict[str, object] | None = None) -> ServeConfig:
    """Read ``path`` (None: defaults only), apply ``overrides`` ("section.key": value)."""
    where = str(path) if path else "<defaults>"
    raw = b""
    if path:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    try:
        data = msgspec.toml.decode(raw, type=FileConfig) if raw else FileConfig()
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {_key_from_msgspec(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, field = key.partition(".")
        target = getattr(data, section) if field else data
        setattr(target, field or section, value)
    return _validate(data, where)


def _key_from_msgspec(message: str) -> str:
    # "Expected `int`, got `str` - at `$.segment.lanes`" -> "segment.lanes: expected int, got str"
    text, _, at = message.partition(" - at ")
    key = at.strip("`").removeprefix("$.").removeprefix("$") or "top level"
    return f"key {key}: {text.replace('`', '')}"


def _validate(c: FileConfig, where: str) -> ServeConfig:
    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{where}: key {key}: {problem}")

    seg = c.segment
    if not seg.name or "/" in seg.name or len(seg.name) > 200:
        raise fail("segment.name", f"{seg.name!r} must be a short name without '/'")
    try:
        geometry = Geometry(
            lanes=seg.lanes,
            lane_size=seg.lane_size,
            overflow_lanes=seg.overflow_lanes,
            senders=seg.senders,
            relays=seg.relays,
            handoff_size=seg.handoff_size,
            max_events=seg.max_events,
            max_subs=seg.max_subs,
        )
    except (TypeError, ValueError) as exc:
        key = str(exc).split(" ", 1)[0]
        raise fail(f"segment.{key}", str(exc)) from None
    try:
        backlog = BacklogLimits(seg.backlog, seg.backlog_bytes, seg.sender_backlog_bytes)
    except (TypeError, ValueError) as exc:
        key = str(exc).split(" ", 1)[0]
        raise fail(f"segment.{key}", str(exc)) from None
    if not 0 <= seg.drain_timeout <= 3600:
        raise fail("segment.drain_timeout", f"must be 0..3600 seconds, got {seg.drain_timeout}")
    rundir = runtime_dir()
    mi = c.mi
    udp = _host_port(defaults.MI_UDP if mi.udp is None else mi.udp, "mi.udp", fail, mi.allow_remote)
    http = _host_port(mi.http, "mi.http", fail, mi.allow_remote)
    unix = None
    if mi.unix is None:
        unix = rundir / f"{seg.name}.sock"
    elif mi.unix:
        unix = Path(mi.unix)
        if not unix.is_absolute():
            raise fail("mi.unix", f"{mi.unix!r} must be an absolute path")
        if len(os.fsencode(unix)) > 107:
            raise fail("mi.unix", "path too long for sun_path (max 107 bytes)")
    try:
        mode = int(mi.unix_mode, 8)
        if not 0 <= mode <= 0o777:
            raise ValueError
    except ValueError:
        raise fail("mi.unix_mode", f"{mi.unix_mode!r} is not an octal mode like '0660'") from None
    fifo = rundir / f"{seg.name}_fifo" if mi.fifo is None else Path(mi.fifo) if mi.fifo else None
    if fifo is not None and not fifo.is_absolute():
        raise fail("mi.fifo", f"{mi.fifo!r} must be an absolute path")
    fifo_mode = _mode(mi.fifo_mode, "mi.fifo_mode", fail)
    reply_dir = Path(mi.fifo_reply_dir)
    if not reply_dir.is_absolute():
        raise fail("mi.fifo_reply_dir", f"{mi.fifo_reply_dir!r} must be an absolute directory")
    level = c.log.level.lower()
    if level not in defaults.LOG_LEVELS:
        levels = ", ".join(defaults.LOG_LEVELS)
        raise fail("log.level", f"{c.log.level!r} is not one of {levels}")
    for i, name in enumerate(c.events):
        try:
            check_event_name(name)
        except (TypeError, ValueError) as exc:
            raise fail(f"events[{i}]", str(exc)) from None
    sec = c.security
    try:
        policy = DestinationPolicy.from_settings(sec.allowed_networks, sec.unix_path_prefixes)
    except ValueError as exc:
        key, _, problem = str(exc).partition(": ")
        raise fail(key, problem) from None
    if sec.max_subs_per_event < 1:
        raise fail(
            "security.max_subs_per_event", f"must be at least 1, got {sec.max_subs_per_event}"
        )
    subs: list[tuple[str, Destination]] = []
    for i, sub in enumerate(c.subscribe):
        try:
            check_event_name(sub.event)
        except (TypeError, ValueError) as exc:
            raise fail(f"subscribe[{i}].event", str(exc)) from None
        try:
            dest = parse_destination(sub.socket)
            policy.check(dest)
        except (DestinationError, DestinationRefused) as exc:
            raise fail(f"subscribe[{i}].socket", str(exc)) from None
        # As OpenSIPS refuses to subscribe to an event nobody published: a
        # subscription never declares its event, so a typo cannot pass unseen.
        if sub.event not in c.events:
            raise fail(
                f"subscribe[{i}].event",
                f"{sub.event!r} is not one of the events: add it to `events` (or correct the name)",
            )
        subs.append((sub.event, dest))
    events = tuple(dict.fromkeys(c.events))
    return ServeConfig(
        name=seg.name,
        geometry=geometry,
        backlog=backlog,
        drain_timeout=seg.drain_timeout,
        mi_udp=udp,
        mi_unix=unix,
        mi_unix_mode=mode,
        mi_http=http,
        mi_fifo=fifo,
        mi_fifo_mode=fifo_mode,
        mi_fifo_reply_dir=reply_dir,
        log_level=level,
        events=events,
        subscriptions=tuple(subs),
        policy=policy,
        max_subs_per_event=sec.max_subs_per_event,
        runtime_dir=rundir,
        source=where,
    )


def _mode(text: str, key: str, fail) -> int:
    try:
        mode = int(text, 8)
        if not 0 <= mode <= 0o777:
            raise ValueError
    except ValueError:
        raise fail(key, f"{text!r} is not an octal mode like '0660'") from None
    return mode


def _host_port(text: str, key: str, fail, allow_remote: bool) -> tuple[str, int] | None:
    if not text:
        return None
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise fail(key, f"{text!r} must be HOST:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise fail(key, f"port {port_text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise fail(key, f"port {port} out of range 1-65535")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise fail(key, f"{host!r} is not an IP address") from None
    if not ip.is_loopback and not allow_remote:
        raise fail(key, f"{host} is not a loopback address; set mi.allow_remote = true to allow it")
    return str(ip), port
