"""The hub: the control process, supervising senders in the style of gunicorn's arbiter.

One loop, in one process. Signals only append to a queue and wake the loop
through a pipe (``signal.set_wakeup_fd``); the loop then:

* answers MI requests on its datagram sockets (:mod:`mpevent.protocol.mi`);
* publishes registry changes to the segment (:mod:`mpevent.shm.table`) and rings
  the senders so they reload at once;
* expires subscriptions on time;
* reaps senders that died and starts new ones (they resume their lanes from
  the committed ``head``);
* in embedded mode, stops when the process that created the bus is gone.

Stopping (SIGTERM, SIGINT in daemon mode, or the creator going away): the
producers' probe is cleared so new events are refused at once, the senders
drain what the ring holds (bounded by ``drain_timeout``) and exit, then the
hub removes its sockets; the segment goes with its creator.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import queue
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from mpevent.processes.producer import Producer
from mpevent.processes.reclaim import LaneReclaimer
from mpevent.processes.sender.loop import DEFAULT_BACKLOG, Sender
from mpevent.protocol import mi
from mpevent.protocol.destination import Destination, parse_destination
from mpevent.protocol.policy import DestinationPolicy, DestinationRefused
from mpevent.protocol.registry import Registry
from mpevent.shm import counters as stats
from mpevent.shm import table
from mpevent.shm.doorbell import Doorbell
from mpevent.shm.layout import (
    H_DRAIN_DEADLINE_NS,
    H_HUB_PID,
    H_STATE,
    L_OWNER_PID,
    STATE_RUNNING,
    STATE_STOPPED,
    STATE_STOPPING,
)
from mpevent.shm.segment import Segment

log = logging.getLogger("mpevent.hub")

RESPAWN_DELAY = 0.1
MAX_DATAGRAM_REPLY = 65507  # the largest UDP payload; HTTP has no such limit
LOOP_TIMEOUT = 0.5
HOUSEKEEPING_INTERVAL = 0.2  # reclaiming dead producers' lanes, watching the parent


@dataclass
class HubOptions:
    backlog: int = DEFAULT_BACKLOG
    drain_timeout: float = 5.0
    parent_pid: int | None = None  # embedded mode: stop when this process is gone
    stop_on_sigint: bool = True  # daemon: yes; embedded: the creator decides
    events: list[str] = field(default_factory=list)
    # Permanent subscriptions (event, socket), as OpenSIPS's subscribe_event.
    subscriptions: list[tuple[str, str]] = field(default_factory=list)
    policy: DestinationPolicy = field(default_factory=DestinationPolicy)
    max_subs_per_event: int | None = None
    # Daemon: called on SIGHUP, returns new options (or None to keep these).
    reload: Callable[[], HubOptions | None] | None = None


class Hub:
    def __init__(
        self,
        seg: Segment,
        doorbells: list[Doorbell],
        mi_sockets: list[socket.socket],
        options: HubOptions,
    ):
        self.seg = seg
        self.doorbells = doorbells
        self.mi_sockets = mi_sockets
        self.options = options
        g = seg.layout.geometry
        self.registry = Registry(g.max_events, g.max_subs, options.max_subs_per_event)
        self.started = time.time()
        self.senders: dict[int, int] = {}  # pid -> sender index
        self._respawn: dict[int, float] = {}  # sender index -> when to start it again
        self._known_events = 0
        self._signals: list[int] = []
        self._stat_baseline: dict[str, int] = {}
        self._producer: Producer | None = None
        self.reclaimer = LaneReclaimer(seg)
        self._stopping = False
        self._configured: set[tuple[str, Destination]] = set()
        # Requests from transports running in other threads (HTTP): handled
        # here, in the loop, so the registry has a single thread.
        self._requests: queue.SimpleQueue[tuple[bytes, Callable[[bytes | None], None]]]
        self._requests = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    # -- HubState for the MI ---------------------------------------------

    @property
    def policy(self) -> DestinationPolicy:
        return self.options.policy

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def commit(self) -> None:
        self._known_events = table.publish(self.seg, self.registry, self._known_events)
        if self._stopping:
            table.clear_counts(self.seg)
        for bell in self.doorbells:
            bell.ring()

    def raise_event(self, event: str, params: Any) -> bool:
        if self._producer is None:
            self._producer = Producer(self.seg, self.doorbells)
        return self._producer.raise_event(event, params)

    def statistics(self) -> dict[str, int]:
        flat: dict[str, int] = {}
        data = stats.collect(self.seg)
        for key, value in data["totals"].items():
            flat[f"mpevent:{key}"] = value
        for name, sums in data["events"].items():
            for key, value in sums.items():
                flat[f"event:{name}.{key}"] = value
        for key in ("sent", "bytes", "failed", "dropped", "pending"):
            flat[f"mpevent:destination_{key}"] = sum(r[key] for r in data["destinations"])
        for row in data["destinations"]:
            for key in ("sent", "bytes", "failed", "dropped", "pending", "econnrefused", "enoent"):
                flat[f"destination:{row['event']}@{row['socket']}.{key}"] = row[key]
        base = self._stat_baseline
        return {k: v - base.get(k, 0) for k, v in flat.items()}

    def reset_statistics(self, names: list[str]) -> None:
        current = self.statistics()
        for name in names:
            if name in current and not name.endswith(".pending"):
                self._stat_baseline[name] = self._stat_baseline.get(name, 0) + current[name]

    def processes(self) -> list[dict[str, Any]]:
        rows = [(os.getpid(), "hub")]
        rows += [
            (pid, f"sender {i}") for pid, i in sorted(self.senders.items(), key=lambda x: x[1])
        ]
        layout = self.seg.layout
        for lane in range(layout.geometry.lanes):
            # The lane's record lock says whether its producer lives; the
            # owner word, which pid it was (a reused pid holds no lock).
            pid = self.seg.words[layout.lane_word(lane) + L_OWNER_PID]
            if pid and self.seg.lane_owner(lane) == pid:
                rows.append((pid, f"producer lane {lane}"))
        out = []
        for pid, role in rows:
            try:
                p = psutil.Process(pid)
                with p.oneshot():
                    cpu = p.cpu_times()
                    out.append(
                        {
                            "ID": len(out),
                            "PID": pid,
                            "Type": role,
                            "CPU": round(cpu.user + cpu.system, 3),
                            "RSS": p.memory_info().rss,
                        }
                    )
            except psutil.Error:
                continue
        return out

    # -- senders ------------------------------------------------------------

    def spawn_sender(self, index: int) -> int:
        pid = os.fork()
        if pid:
            self.senders[pid] = index
            return pid
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            # The hub decides when to stop; a terminal's Ctrl-C reaches the
            # whole process group and must not kill a sender mid-batch.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            doorbell = self.doorbells[index]
            keep_only_fds({self.seg.fd, doorbell.read_fd, doorbell.write_fd})
            code = Sender(
                self.seg,
                index,
                doorbell,
                self.options.backlog,
                parent_pid=os.getppid(),
            ).run()
        except BaseException:
            log.exception("sender %d crashed", index)
        finally:
            os._exit(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            index = self.senders.pop(pid, None)
            if index is None:
                continue
            if self._stopping:
                continue
            log.warning(
                "sender %d (pid %d) exited with status %#x; starting a new one", index, pid, status
            )
            # Not at once, so a sender that dies on start cannot spin the hub;
            # not by sleeping either: the MI must keep answering meanwhile.
            self._respawn[index] = time.monotonic() + RESPAWN_DELAY

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self._respawn.items()):
            if when <= now and not self._stopping:
                del self._respawn[index]
                self.spawn_sender(index)

    # -- the loop -----------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def run(self) -> int:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        handled = [signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP]
        for sig in handled:
            signal.signal(sig, self._on_signal)
        signal.signal(
            signal.SIGINT, self._on_signal if self.options.stop_on_sigint else signal.SIG_IGN
        )
        self._apply_configured()
        self.seg.words[H_HUB_PID] = os.getpid()
        self.seg.words[H_STATE] = STATE_RUNNING
        for index in range(self.seg.layout.geometry.senders):
            self.spawn_sender(index)
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        by_fd = {s.fileno(): s for s in self.mi_sockets}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        next_housekeeping = 0.0
        while not self._stopping:
            timeout = LOOP_TIMEOUT
            if self._respawn:
                timeout = min(timeout, RESPAWN_DELAY)
            deadline = self.registry.next_deadline()
            if deadline is not None:
                timeout = min(timeout, max(0.0, (deadline - time.monotonic_ns()) / 1e9))
            for fd, _ in poller.poll(timeout * 1000):
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                else:
                    self._serve(by_fd[fd])
            self._serve_queued()
            self._handle_signals()
            self._respawn_due()
            if self.registry.expire(time.monotonic_ns()):
                self.commit()
            now = time.monotonic()
            if now >= next_housekeeping:  # not on every MI request: syscalls per lane
                next_housekeeping = now + HOUSEKEEPING_INTERVAL
                self.reclaimer.scan()
                parent = self.options.parent_pid
                if parent is not None and os.getppid() != parent:
                    log.warning("the process that created the bus is gone; stopping")
                    self._stopping = True
        return self._stop()

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGCHLD:
                self._reap()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s: draining and stopping", signal.Signals(sig).name)
                self._stopping = True
            elif sig == signal.SIGHUP:
                self._reload()

    def _reload(self) -> None:
        if self.options.reload is None:
            log.info("SIGHUP: nothing to reload in embedded mode")
            return
        try:
            new = self.options.reload()
        except Exception as exc:  # a bad file keeps the configuration we have
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        if new is None:
            return
        self.options = new
        self._apply_configured()
        log.info("SIGHUP: configuration reloaded")

    def _apply_configured(self) -> None:
        """Publish configured events; make permanent subscriptions match the config."""
        registry = self.registry
        for name in self.options.events:
            registry.publish(name)
        wanted = set()
        for event, sock in self.options.subscriptions:
            registry.publish(event)
            dest = parse_destination(sock)
            try:
                self.options.policy.check(dest)
            except DestinationRefused as exc:
                log.error("subscription of %s not applied: %s", event, exc)
                continue
            wanted.add((event, dest))
            registry.subscribe(event, dest, None, self.now_ns())
        for event, dest in self._configured - wanted:
            registry.unsubscribe(event, dest)
        self._configured = wanted
        self.commit()

    def submit(self, raw: bytes, reply: Callable[[bytes | None], None]) -> None:
        """Hand a request to the loop from another thread; ``reply`` gets the answer."""
        self._requests.put((raw, reply))
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    def _serve_queued(self) -> None:
        while True:
            try:
                raw, reply = self._requests.get_nowait()
            except queue.Empty:
                return
            reply(self._handle(raw))

    def _handle(self, raw: bytes) -> bytes | None:
        try:
            return mi.handle(self, raw)
        except Exception:
            log.exception("MI request failed")
            return mi.INTERNAL_ERROR_REPLY

    def _serve(self, sock: socket.socket) -> None:
        for _ in range(64):  # bounded: signals and expiry must not starve
            try:
                raw, addr = sock.recvfrom(mi.MAX_REQUEST + 1)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("MI receive failed: %s", exc)
                return
            reply = self._handle(raw)
            if reply is None or not addr:
                continue
            if len(reply) > MAX_DATAGRAM_REPLY:
                reply = mi.too_large_reply(raw, len(reply))
            try:
                sock.sendto(reply, addr)
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                    log.warning("MI reply to %r failed: %s", addr, exc)

    def _stop(self) -> int:
        words = self.seg.words
        deadline = time.monotonic_ns() + int(self.options.drain_timeout * 1e9)
        words[H_DRAIN_DEADLINE_NS] = deadline
        table.clear_counts(self.seg)  # producers refuse new events from now on
        words[H_STATE] = STATE_STOPPING
        for bell in self.doorbells:
            bell.ring()
        grace = deadline + 2_000_000_000
        while self.senders and time.monotonic_ns() < grace:
            self._reap()
            time.sleep(0.01)
        for pid in list(self.senders):
            log.warning("sender pid %d did not stop in time; killing it", pid)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.senders.pop(pid, None)
        words[H_STATE] = STATE_STOPPED
        for sock in self.mi_sockets:
            sock.close()  # their files belong to whoever bound them (the daemon)
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        os.close(self._wake_w)
        return 0


def keep_only_fds(keep: set[int]) -> None:
    """In a freshly forked child: close every descriptor but stdio and ``keep``.

    A forked child inherits all of its parent's descriptors: the listening
    sockets of the server that created the bus, a subscriber's socket the
    test or the application holds... A hub or sender keeping them open keeps
    ports bound and peers alive after their owner closed them. The Python
    objects wrapping them stay behind, so they are frozen out of the garbage
    collector first: one collected later would close whatever new descriptor
    has taken its number.
    """
    gc.freeze()
    low = 3
    for fd in sorted(fd for fd in keep if fd >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


class SocketInUse(OSError):
    """A UNIX socket path another process listens on, or that is not a socket."""


def claim_socket_path(path: Path) -> None:
    """Make ``path`` free to bind: remove a socket file nobody listens on any more."""
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_socket():
        raise SocketInUse(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left by a listener that is gone
            return
    raise SocketInUse(f"{path}: another process is bound to it")


def bind_datagram(dest: Destination, mode: int | None = None) -> socket.socket:
    """A non-blocking datagram socket bound to ``dest`` (the MI listener)."""
    sock = socket.socket(dest.family, socket.SOCK_DGRAM)
    try:
        if dest.family == socket.AF_UNIX:
            path = dest.sockaddr
            on_disk = isinstance(path, str) and path.startswith("/")  # not abstract
            if on_disk:
                claim_socket_path(Path(path))
            sock.bind(path)
            if on_disk and mode is not None:
                os.chmod(path, mode)
        else:
            sock.bind(dest.sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
