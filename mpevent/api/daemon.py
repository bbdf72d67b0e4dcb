"""``mpevent serve``: the hub as a foreground daemon, with a named segment.

Systemd-friendly: logs go to stderr, SIGTERM/SIGINT drain and stop, SIGHUP
re-reads the configuration file (events, permanent subscriptions, log level;
the segment's geometry and the listeners need a restart, which it says).

Exit codes: 0 stopped cleanly, 1 failed at run time, 2 configuration error,
3 another hub already serves this segment.

Start-up order matters for attachers: the segment is created, the FIFOs,
MI sockets and the info block are in place, and only then does the hub mark
the segment running. A segment or socket left by a hub that was killed is
detected (its hub's pid is gone) and replaced.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

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

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.http is not None:
            self.http.close()
        if self.unix_path is not None:
            self.unix_path.unlink(missing_ok=True)


def open_listeners(config: ServeConfig) -> Listeners:
    out = Listeners()
    try:
        if config.mi_udp:
            host, port = config.mi_udp
            dest = Destination(
                "udp", socket.AF_INET6 if ":" in host else socket.AF_INET, host, port
            )
            out.sockets.append(bind_datagram(dest))
            log.info("MI listening on udp:%s:%d", host, port)
        if config.mi_unix:
            path = config.mi_unix
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                sock = bind_datagram(
                    Destination("unix", socket.AF_UNIX, str(path), 0), config.mi_unix_mode
                )
            except SocketInUse as exc:
                raise AlreadyRunning(f"MI socket {exc}") from None
            out.unix_path = path
            out.sockets.append(sock)
            log.info("MI listening on unix:%s (mode %o)", path, config.mi_unix_mode)
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
        setup_logging(new.log_level)
        if (new.name, new.geometry, new.mi_udp, new.mi_unix, new.mi_http) != (
            config.name,
            config.geometry,
            config.mi_udp,
            config.mi_unix,
            config.mi_http,
        ):
            log.warning("segment and listener settings change only with a restart")
        return hub_options(new, reload)

    seg = None
    listeners = Listeners()
    doorbells: list[Doorbell] = []
    try:
        config.runtime_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        seg = create_segment(config)
        for i in range(config.geometry.senders):
            doorbells.append(Doorbell.fifo(config.runtime_dir / f"{config.name}.sender{i}.fifo"))
        listeners = open_listeners(config)
        hub = Hub(seg, doorbells, listeners.sockets, hub_options(config, reload))
        if config.mi_http:
            listeners.http = HttpMI(config.mi_http, hub.submit)
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


def _mi_address(config: ServeConfig) -> str:
    if config.mi_unix:
        return f"unix:{config.mi_unix}"
    if config.mi_udp:
        host, port = config.mi_udp
        return f"udp:[{host}]:{port}" if ":" in host else f"udp:{host}:{port}"
    return ""
