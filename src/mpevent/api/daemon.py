"""``mpevent serve``: the hub as a foreground daemon, with a named segment.

Systemd-friendly: logs go to stderr, SIGTERM/SIGINT drain and stop, SIGHUP
re-reads the configuration file (events, permanent subscriptions, log level;
the segment's geometry and the listeners need a restart, which it says).
With ``Type=notify`` (``$NOTIFY_SOCKET`` set) it sends ``READY=1`` once the
hub runs with every listener up, and ``STOPPING=1`` when it starts draining
(:func:`sd_notify`, the standard library only). Besides its sockets, the MI
is served on a FIFO as OpenSIPS's mi_fifo (:mod:`mpevent.api.mififo`),
created here, served by the hub's loop, and removed at stop.

Exit codes: 0 stopped cleanly, 1 failed at run time, 2 configuration error,
3 another hub already serves this segment.

Start-up order matters for attachers: the segment is created, the FIFOs,
MI sockets and the info block are in place, and only then does the hub mark
the segment running. A segment or socket left by a hub that was killed is
detected (its hub's pid is gone) and replaced. A listener that cannot be
opened (its address in use, say) stops the start with a message naming the
address and the setting that chose it: the command-line flag, the key of
the configuration file, or the default (:func:`setting_origin`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil

from mpevent.api.mififo import FifoInUse, MIFifo
from mpevent.api.mihttp import HttpMI
from mpevent.processes.hub import Hub, HubOptions
from mpevent.protocol.config import ConfigError, ServeConfig, load
from mpevent.protocol.destination import Destination
from mpevent.shm.doorbell import Doorbell
from mpevent.shm.layout import H_HUB_PID, H_STATE, STATE_STOPPED
from mpevent.shm.segment import Segment, SegmentError, shm_path
from mpevent.shm.table import write_info
from mpevent.system import SocketInUse, bind_datagram

log = logging.getLogger("mpevent.serve")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_RUNNING = 0, 1, 2, 3


class AlreadyRunning(RuntimeError):
    pass


class ListenerError(OSError):
    """An MI listener that cannot be opened; the message names its address and
    the setting that chose it."""


T = TypeVar("T")
# "mi.udp" -> which setting chose its value, for messages (setting_origin).
Origin = Callable[[str], str]


def setting_origin(
    key: str, config_path: str | Path | None, overrides: Mapping[str, object] | None
) -> str:
    """Which setting chose the value of ``key`` ("mi.udp"): the command-line
    flag, the key in the configuration file, or the default."""
    section, _, name = key.partition(".")
    flag = "--" + key.replace(".", "-").replace("_", "-")
    if (overrides or {}).get(key) is not None:
        return f"set by {flag}"
    if config_path and _file_sets(config_path, section, name):
        return f"set by [{section}] {name} in {config_path}"
    return f"the default; choose another with [{section}] {name} or {flag}"


def _file_sets(path: str | Path, section: str, name: str) -> bool:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    table = data.get(section)
    return isinstance(table, dict) and name in table


def _listening(address: str, key: str, origin: Origin, bind: Callable[[], T]) -> T:
    """``bind()``, with an OSError turned into one naming the address and its setting."""
    try:
        return bind()
    except SocketInUse:
        raise
    except OSError as exc:
        problem = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            problem += " (another process listens there: stop it, or choose another address)"
        raise ListenerError(
            f"cannot listen for the MI on {address} ({origin(key)}): {problem}"
        ) from None


def hub_options(config: ServeConfig, reload=None) -> HubOptions:
    return HubOptions(
        backlog=config.backlog,
        drain_timeout=config.drain_timeout,
        stop_on_sigint=True,
        events=list(config.events),
        subscriptions=list(config.subscriptions),
        policy=config.policy,
        max_subs_per_event=config.max_subs_per_event,
        reload=reload,
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(levelname)s %(name)s[%(process)d]: %(message)s",
        force=True,
    )


def create_segment(config: ServeConfig) -> Segment:
    """Create the named segment, replacing one a dead hub left behind."""
    try:
        return Segment.create(config.geometry, config.name)
    except SegmentError:
        pass
    path = shm_path(config.name)
    owner = _segment_hub(config.name)
    if owner is not None:
        raise AlreadyRunning(f"segment {path} is served by a running hub (pid {owner})")
    log.warning("removing stale segment %s left by a hub that is gone", path)
    path.unlink(missing_ok=True)
    return Segment.create(config.geometry, config.name)


def _segment_hub(name: str) -> int | None:
    """Pid of the live hub of an existing segment, if there is one."""
    try:
        seg = Segment.attach(name)
    except SegmentError:
        return None  # unreadable or half-created: stale
    try:
        pid = seg.words[H_HUB_PID]
        stopped = seg.words[H_STATE] == STATE_STOPPED
    finally:
        seg.close()
    if pid and not stopped and psutil.pid_exists(pid) and pid != os.getpid():
        return pid
    return None


@dataclass
class Listeners:
    sockets: list[socket.socket] = field(default_factory=list)
    http: HttpMI | None = None
    unix_path: Path | None = None
    fifo: MIFifo | None = None  # served by the hub's loop; removed here

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.fifo is not None:
            self.fifo.close()
        if self.http is not None:
            self.http.close()
        if self.unix_path is not None:
            self.unix_path.unlink(missing_ok=True)


def open_listeners(config: ServeConfig, origin: Origin | None = None) -> Listeners:
    """The MI's datagram sockets; ``origin`` names the setting behind an address
    in an error (default: as if no flag or file had set it)."""
    origin = origin or (lambda key: setting_origin(key, None, None))
    out = Listeners()
    try:
        if config.mi_udp:
            host, port = config.mi_udp
            dest = Destination(
                "udp", socket.AF_INET6 if ":" in host else socket.AF_INET, host, port
            )
            out.sockets.append(_listening(str(dest), "mi.udp", origin, lambda: bind_datagram(dest)))
            log.info("MI listening on udp:%s:%d", host, port)
        if config.mi_unix:
            path = config.mi_unix
            unix = Destination("unix", socket.AF_UNIX, str(path), 0)

            def bind_unix() -> socket.socket:
                path.parent.mkdir(parents=True, exist_ok=True)
                return bind_datagram(unix, config.mi_unix_mode)

            try:
                sock = _listening(str(unix), "mi.unix", origin, bind_unix)
            except SocketInUse as exc:
                raise AlreadyRunning(f"MI socket {exc} ({origin('mi.unix')})") from None
            out.unix_path = path
            out.sockets.append(sock)
            log.info("MI listening on unix:%s (mode %o)", path, config.mi_unix_mode)
        if config.mi_fifo:
            fifo = MIFifo(config.mi_fifo, config.mi_fifo_mode, config.mi_fifo_reply_dir)

            def open_fifo() -> None:
                try:
                    fifo.open()
                except FifoInUse as exc:  # not an OSError to _listening: exit 3
                    raise AlreadyRunning(f"MI FIFO {exc} ({origin('mi.fifo')})") from None

            _listening(f"fifo:{config.mi_fifo}", "mi.fifo", origin, open_fifo)
            out.fifo = fifo
            log.info(
                "MI listening on fifo:%s (mode %o, replies in %s)",
                config.mi_fifo,
                config.mi_fifo_mode,
                config.mi_fifo_reply_dir,
            )
        for host, _ in filter(None, (config.mi_udp, config.mi_http)):
            if not _is_loopback(host):
                log.warning(
                    "MI bound to %s, which is not loopback: anyone who can reach it "
                    "can subscribe and raise events",
                    host,
                )
    except BaseException:
        out.close()
        raise
    return out


def _is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def serve(config_path: str | None, overrides: dict[str, object] | None = None) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns the exit code."""
    try:
        config = load(config_path, overrides)
    except ConfigError as exc:
        setup_logging("info")
        log.error("%s", exc)
        return EXIT_CONFIG
    setup_logging(config.log_level)

    def reload() -> HubOptions | None:
        new = load(config_path, overrides)
        before = logging.getLogger().getEffectiveLevel()
        after = logging.getLevelName(new.log_level.upper())
        changed = f"SIGHUP: log level {logging.getLevelName(before).lower()} -> {new.log_level}"
        if after > before:
            log.info("%s", changed)  # said while the old, more verbose level shows it
        setup_logging(new.log_level)
        if after < before:
            log.info("%s", changed)
        if (new.name, new.geometry, new.mi_udp, new.mi_unix, new.mi_http, new.mi_fifo) != (
            config.name,
            config.geometry,
            config.mi_udp,
            config.mi_unix,
            config.mi_http,
            config.mi_fifo,
        ):
            log.warning("segment and listener settings change only with a restart")
        return hub_options(new, reload)

    def origin(key: str) -> str:
        return setting_origin(key, config_path, overrides)

    seg = None
    listeners = Listeners()
    doorbells: list[Doorbell] = []
    try:
        config.runtime_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        seg = create_segment(config)
        for i in range(config.geometry.senders):
            doorbells.append(Doorbell.fifo(config.runtime_dir / f"{config.name}.sender{i}.fifo"))
        listeners = open_listeners(config, origin)
        hub = Hub(
            seg,
            doorbells,
            listeners.sockets,
            hub_options(config, reload),
            services=[listeners.fifo] if listeners.fifo else [],
            lifecycle=_tell_systemd,
        )
        if config.mi_http:
            http = config.mi_http
            listeners.http = _listening(
                f"http://{_host_port(http)}/mi", "mi.http", origin, lambda: HttpMI(http, hub.submit)
            )
            listeners.http.start()
            log.info("MI listening on http://%s:%d/mi", *listeners.http.address)
        write_info(
            seg,
            {
                "mi": _mi_address(config),
                "doorbells": [str(d.path) for d in doorbells],
                "pid": os.getpid(),
            },
        )
        log.info(
            "serving segment /dev/shm/%s (%d lanes of %d bytes, %d senders)",
            config.name,
            config.geometry.lanes,
            config.geometry.lane_size,
            config.geometry.senders,
        )
        code = hub.run()
        log.info("stopped")
        return code
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return EXIT_RUNNING
    except (OSError, SegmentError, ValueError) as exc:
        log.error("cannot serve: %s", exc)
        return EXIT_FAILED
    finally:
        listeners.close()
        for bell in doorbells:
            bell.close()
            bell.remove()
        if seg is not None and seg.owner:
            seg.close()


# -- systemd's Type=notify ----------------------------------------------------------

_SYSTEMD_STATES = {"ready": "READY=1", "stopping": "STOPPING=1"}


def notify_address(value: str) -> str | None:
    """The socket address in ``$NOTIFY_SOCKET`` (a path, or "@name" for an
    abstract one), as ``socket.connect`` takes it; None when unset or of a
    kind this does not speak (vsock)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def sd_notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` ("READY=1") to systemd's notification socket, as
    sd_notify(3) does; False when not run by systemd with Type=notify."""
    value = environ.get("NOTIFY_SOCKET", "")
    address = notify_address(value)
    if address is None:
        if value:
            log.warning("NOTIFY_SOCKET=%s: not a UNIX socket; systemd not notified", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", value, exc)
        return False
    return True


def _tell_systemd(stage: str) -> None:
    """The hub's lifecycle: "ready" once it runs (listeners up), "stopping" when it drains."""
    sd_notify(_SYSTEMD_STATES[stage])


def _host_port(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _mi_address(config: ServeConfig) -> str:
    if config.mi_unix:
        return f"unix:{config.mi_unix}"
    if config.mi_udp:
        host, port = config.mi_udp
        return f"udp:[{host}]:{port}" if ":" in host else f"udp:{host}:{port}"
    return ""
