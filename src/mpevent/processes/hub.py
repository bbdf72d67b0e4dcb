"""The hub: the control process, supervising senders in the style of gunicorn's arbiter.

One loop, in one process. Signals only append to a queue and wake the loop
through a pipe (``signal.set_wakeup_fd``); the loop then:

* answers MI requests on its datagram sockets (:mod:`mpevent.protocol.mi`,
  which shows counters and processes through :mod:`mpevent.protocol.mi_views`)
  and on the transports given to it as :class:`LoopService` (the daemon's
  FIFO, :mod:`mpevent.api.mififo`), polled in the same loop;
* writes registry changes into the segment's table (:mod:`mpevent.shm.table`)
  and rings the senders so they reload at once;
* expires subscriptions on time;
* reaps senders that died and starts new ones, each in a fresh interpreter
  (:mod:`mpevent.processes.launch`); a new sender resumes its lanes from the
  head its predecessor last stored;
* starts a broker relay (:mod:`mpevent.processes.relay`) for every relay
  slot the registry assigns, and starts it again when it exits (a new one
  for the slot's new destination when that changed);
* frees the lanes of producers that died (:mod:`mpevent.processes.reclaim`);
* in embedded mode, stops when the process that created the bus is gone;
* logs what an operator debugs: events published, subscriptions added,
  removed and expired (info) or refreshed (debug) (:class:`RegistryLog`),
  senders and relays started (debug) and started again (info), reloads
  with what they changed.

The hub itself is a fresh interpreter too: ``EventBus`` starts it through
:mod:`mpevent.processes.launch`, and ``mpevent serve`` runs it in its own
process. No process of mpevent is forked from an application.

Stopping (SIGTERM, SIGINT in daemon mode, or the creator going away): the
producers' probe is cleared so new events are refused at once, the senders
drain what the ring holds (bounded by ``drain_timeout``) and exit, then the
hub removes its sockets; the segment goes with its creator.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil

from mpevent import defaults
from mpevent.processes import launch
from mpevent.processes.producer import Producer
from mpevent.processes.reclaim import LaneReclaimer
from mpevent.processes.sender.backlog import BacklogLimits
from mpevent.protocol import mi, mi_views
from mpevent.protocol.destination import Destination
from mpevent.protocol.policy import DestinationPolicy
from mpevent.protocol.registry import Registry, Subscription
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
RELAY_STOP_GRACE_NS = 3_000_000_000  # past the drain deadline, before a relay is killed


class LoopService(Protocol):
    """A transport the loop serves besides its datagram sockets (the MI FIFO,
    :mod:`mpevent.api.mififo`): it says which descriptors to poll and when
    it next needs :meth:`tick`, and hands its requests to ``bind``'s handler."""

    def bind(self, handle: Callable[[bytes], bytes | None]) -> None: ...
    def poll_fds(self) -> dict[int, int]: ...
    def on_ready(self, fd: int, events: int) -> None: ...
    def next_due(self) -> float | None: ...
    def tick(self, now: float) -> None: ...
    def close(self) -> None: ...


@dataclass
class HubOptions:
    # The bounds of every sender's backlogs (backlog, backlog_bytes, sender_backlog_bytes).
    backlog: BacklogLimits = field(default_factory=BacklogLimits)
    drain_timeout: float = defaults.DRAIN_TIMEOUT
    parent_pid: int | None = None  # embedded mode: stop when this process is gone
    stop_on_sigint: bool = True  # daemon: yes; embedded: the creator decides
    events: list[str] = field(default_factory=list)
    # Permanent subscriptions, as OpenSIPS's subscribe_event: already
    # parsed and allowed by the policy (mpevent.protocol.config).
    subscriptions: list[tuple[str, Destination]] = field(default_factory=list)
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
        started: dict[int, subprocess.Popen[bytes]] | None = None,
        services: Sequence[LoopService] = (),
        lifecycle: Callable[[str], None] | None = None,
    ):
        """``started``: senders already started, by index (they wait for the
        hub to run); :meth:`run` starts the others. ``services``: more MI
        transports for the loop (the daemon's FIFO); ``lifecycle`` is told
        "ready" once the hub runs and "stopping" when it starts draining
        (the daemon tells systemd)."""
        self.seg = seg
        self.doorbells = doorbells
        self.mi_sockets = mi_sockets
        self.options = options
        self.services = list(services)
        for service in self.services:
            service.bind(self._handle)
        self._lifecycle = lifecycle
        g = seg.layout.geometry
        self.registry = Registry(g.max_events, g.max_subs, options.max_subs_per_event, g.relays)
        self.started = time.time()
        self.senders: dict[int, tuple[int, subprocess.Popen[bytes]]] = {  # pid -> index, process
            proc.pid: (index, proc) for index, proc in (started or {}).items()
        }
        self._respawn: dict[int, float] = {}  # sender index -> when to start it again
        # Broker relays, one per assigned relay slot (registry.relays).
        self.relays: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}  # pid -> slot, process
        self._relay_respawn: dict[int, float] = {}  # relay slot -> when to start it again
        self._known_events = 0
        self._signals: list[int] = []
        self._statistics = mi_views.StatisticsView()
        self._producer: Producer | None = None
        self.reclaimer = LaneReclaimer(seg)
        self._warned_sharing = False  # the one warning that processes share lanes
        self._stopping = False
        self._configured: set[tuple[str, Destination]] = set()
        self._changes = RegistryLog()  # logs what each table store changed
        # (role, index) of every process started once: a second start is a respawn.
        self._ever_started = {("sender", index) for index in (started or {})}
        # Requests from transports running in other threads (HTTP): handled
        # here, in the loop, so the registry has a single thread.
        self._requests: queue.SimpleQueue[tuple[bytes | Callable[[Hub], Any], Callable[..., None]]]
        self._requests = queue.SimpleQueue()
        self._datagram = bytearray(mi.MAX_REQUEST + 1)  # an MI request datagram, received
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    # -- HubState for the MI ---------------------------------------------

    @property
    def policy(self) -> DestinationPolicy:
        return self.options.policy

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def store_table(self) -> None:
        self._known_events = table.store_registry(self.seg, self.registry, self._known_events)
        self._changes.stored(self.registry)  # only once stored: a refused change is undone
        if self._stopping:
            table.clear_counts(self.seg)
        for bell in self.doorbells:
            bell.ring()
        self._start_relays()  # a broker destination that just got a relay slot

    def raise_event(self, event: str, params: Any) -> bool:
        if self._producer is None:
            self._producer = Producer(self.seg, self.doorbells)
        return self._producer.raise_event(event, params)

    def statistics(self) -> dict[str, int]:
        return self._statistics.read(mi_views.flat_statistics(stats.collect(self.seg)))

    def reset_statistics(self, names: list[str]) -> None:
        self._statistics.reset(mi_views.flat_statistics(stats.collect(self.seg)), names)

    def processes(self) -> list[dict[str, Any]]:
        return mi_views.ps_rows(self._known_processes(), _measure)

    def _known_processes(self) -> list[tuple[int, str]]:
        rows = [(os.getpid(), "hub")]
        by_index = sorted((index, pid) for pid, (index, _) in self.senders.items())
        rows += [(pid, f"sender {index}") for index, pid in by_index]
        by_slot = sorted((slot, pid) for pid, (slot, _) in self.relays.items())
        rows += [(pid, f"relay {slot}") for slot, pid in by_slot]
        layout = self.seg.layout
        for lane in range(layout.geometry.lanes):
            # The lane's record lock says whether its producer lives; the
            # owner word, which pid it was (a reused pid holds no lock).
            pid = self.seg.words[layout.lane_word(lane) + L_OWNER_PID]
            if pid and self.seg.lane_owner(lane) == pid:
                rows.append((pid, f"producer lane {lane}"))
        return rows

    # -- senders ------------------------------------------------------------

    def spawn_sender(self, index: int) -> int:
        """Start sender ``index`` in a fresh interpreter; it resumes its lanes
        from the ``head`` its predecessor last released."""
        proc = launch.start_sender(
            self.seg.fd, index, self.doorbells[index].read_fd, self.options.backlog, os.getpid()
        )
        self.senders[proc.pid] = (index, proc)
        self._log_start("sender", index, proc.pid)
        return proc.pid

    def spawn_relay(self, slot: int) -> int:
        """Start the relay of ``slot`` in a fresh interpreter; it publishes
        to the broker destination the table assigns the slot."""
        proc = launch.start_relay(self.seg.fd, slot, self.options.backlog, os.getpid())
        self.relays[proc.pid] = (slot, proc)
        dest = self.registry.relays[slot] if slot < len(self.registry.relays) else None
        self._log_start("relay", slot, proc.pid, f" for {dest}" if dest is not None else "")
        return proc.pid

    def _log_start(self, role: str, index: int, pid: int, detail: str = "") -> None:
        if (role, index) in self._ever_started:
            log.info("%s %d started again (pid %d)%s", role, index, pid, detail)
        else:
            self._ever_started.add((role, index))
            log.debug("%s %d started (pid %d)%s", role, index, pid, detail)

    def _start_relays(self) -> None:
        """A relay for every assigned relay slot that has none (and none due
        to start again after a delay)."""
        if self._stopping:
            return
        running = {slot for slot, _ in self.relays.values()}
        for slot, dest in enumerate(self.registry.relays):
            if dest is not None and slot not in running and slot not in self._relay_respawn:
                self.spawn_relay(slot)

    def _reaped_relay(self, pid: int, status: int) -> bool:
        """``pid`` was a relay: note its end, start it again later if its slot
        is still assigned. False when it was none."""
        known = self.relays.pop(pid, None)
        if known is None:
            return False
        slot, proc = known
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if self._stopping:
            return True
        if code != 0:
            log.warning("relay %d (pid %d) exited with status %#x", slot, pid, status)
        # Exit 0: its slot changed (a new destination, or none). Either way not
        # at once, so a relay that dies on start cannot spin the hub.
        self._relay_respawn[slot] = time.monotonic() + RESPAWN_DELAY
        return True

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            if self._reaped_relay(pid, status):
                continue
            known = self.senders.pop(pid, None)
            if known is None:
                continue
            index, proc = known
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
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
        due = [slot for slot, when in self._relay_respawn.items() if when <= now]
        for slot in due:
            del self._relay_respawn[slot]
        if due:
            self._start_relays()  # the slots still assigned (maybe to another destination)

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
        running = {index for index, _ in self.senders.values()}
        for index in range(self.seg.layout.geometry.senders):
            if index not in running:
                self.spawn_sender(index)
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        by_fd = {s.fileno(): s for s in self.mi_sockets}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        service_fds: dict[int, LoopService] = {}
        if self._lifecycle is not None:
            self._lifecycle("ready")
        next_housekeeping = 0.0
        while not self._stopping:
            timeout = LOOP_TIMEOUT
            service_fds = self._poll_services(poller, service_fds)
            for service in self.services:
                due = service.next_due()
                if due is not None:
                    timeout = min(timeout, max(0.0, due - time.monotonic()))
            if self._respawn or self._relay_respawn:
                timeout = min(timeout, RESPAWN_DELAY)
            deadline = self.registry.next_deadline()
            if deadline is not None:
                timeout = min(timeout, max(0.0, (deadline - time.monotonic_ns()) / 1e9))
            for fd, events in poller.poll(timeout * 1000):
                if fd in service_fds:
                    service_fds[fd].on_ready(fd, events)
                elif fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                else:
                    self._serve(by_fd[fd])
            self._serve_queued()
            for service in self.services:
                service.tick(time.monotonic())
            self._handle_signals()
            self._respawn_due()
            expired = self.registry.expire(time.monotonic_ns())
            if expired:
                self._changes.expired(self.registry, expired)
                self.store_table()
            now = time.monotonic()
            if now >= next_housekeeping:  # not on every MI request: syscalls per lane
                next_housekeeping = now + HOUSEKEEPING_INTERVAL
                self.reclaimer.scan()  # dead producers' lanes; shared lanes' counts
                self._start_relays()
                if not self._warned_sharing and stats.shared_lane_writers(self.seg):
                    self._warn_sharing()
                parent = self.options.parent_pid
                if parent is not None and os.getppid() != parent:
                    log.warning("the process that created the bus is gone; stopping")
                    self._stopping = True
        return self._stop()

    def _warn_sharing(self) -> None:
        self._warned_sharing = True
        g = self.seg.layout.geometry
        log.warning(
            "every one of the %d lanes is owned by a live producer: more producer processes "
            "now share %d overflow lanes, with a lock per raise; set lanes (EventBus(lanes=...), "
            "[segment] lanes, --lanes) to at least the number of producer processes",
            g.lanes,
            g.overflow_lanes,
        )

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
        old, events_before = self.options, len(self.registry.events)
        self.options = new
        self._apply_configured()
        changes = reload_changes(old, new, self.registry.events[events_before:])
        log.info("SIGHUP: configuration reloaded: %s", "; ".join(changes) or "nothing changed")

    def _apply_configured(self) -> None:
        """Declare configured events; make permanent subscriptions match the config
        (parsed and allowed by the policy when the configuration was read)."""
        registry = self.registry
        for name in self.options.events:
            registry.declare(name)
        wanted = set()
        for event, dest in self.options.subscriptions:  # in the file's order: stable slots
            registry.declare(event)
            registry.subscribe(event, dest, None, self.now_ns())
            wanted.add((event, dest))
        for event, dest in self._configured - wanted:
            registry.unsubscribe(event, dest)
        self._configured = wanted
        self.store_table()

    def submit(self, raw: bytes | Callable[[Hub], Any], reply: Callable[..., None]) -> None:
        """Hand a request to the loop from another thread; ``reply`` gets the answer.
        ``raw``: an MI request, or a function the loop calls with the hub (what
        ``GET /metrics`` needs of the hub's state); ``reply`` gets what it returns."""
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
            if isinstance(raw, bytes):
                reply(self._handle(raw))
                continue
            try:
                answer = raw(self)
            except Exception:
                log.exception("request from another thread failed")
                answer = None
            reply(answer)

    def _handle(self, raw: bytes) -> bytes | None:
        try:
            return mi.handle(self, raw)
        except Exception:
            log.exception("MI request failed")
            return mi.INTERNAL_ERROR_REPLY

    def _serve(self, sock: socket.socket) -> None:
        for _ in range(64):  # bounded: signals and expiry must not starve
            try:
                # MSG_TRUNC: the datagram's real size, even past the buffer, so a
                # request over the limit is answered with its size.
                size, addr = sock.recvfrom_into(self._datagram, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("MI receive failed: %s", exc)
                return
            raw = bytes(memoryview(self._datagram)[:size])
            too_large = size > mi.MAX_REQUEST
            reply = mi.request_too_large_reply(size) if too_large else self._handle(raw)
            if reply is None or not addr:
                continue
            if len(reply) > MAX_DATAGRAM_REPLY:
                reply = mi.too_large_reply(raw, len(reply))
            try:
                sock.sendto(reply, addr)
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                    log.warning("MI reply to %r failed: %s", addr, exc)

    def _poll_services(
        self, poller: select.poll, registered: dict[int, LoopService]
    ) -> dict[int, LoopService]:
        """Register what the services want polled now (their descriptors change:
        a FIFO opened again, a reply being written); the new fd -> service map."""
        wanted: dict[int, LoopService] = {}
        for service in self.services:
            for fd, events in service.poll_fds().items():
                poller.register(fd, events)  # registers, or modifies the events
                wanted[fd] = service
        for fd in registered.keys() - wanted.keys():
            try:
                poller.unregister(fd)
            except KeyError:
                pass
        return wanted

    def _wait_stopped(
        self, children: dict[int, tuple[int, subprocess.Popen[bytes]]], role: str, until_ns: int
    ) -> None:
        """Reap ``children`` (pid -> index, process) until none is left or
        ``until_ns``; kill those still there."""
        while children and time.monotonic_ns() < until_ns:
            self._reap()
            time.sleep(0.01)
        for pid, (index, proc) in list(children.items()):
            log.warning("%s %d (pid %d) did not stop in time; killing it", role, index, pid)
            proc.kill()
            proc.wait()
            children.pop(pid, None)

    def _stop(self) -> int:
        if self._lifecycle is not None:
            self._lifecycle("stopping")
        for service in self.services:
            service.close()  # a FIFO client would wait on a FIFO nobody reads
        words = self.seg.words
        deadline = time.monotonic_ns() + int(self.options.drain_timeout * 1e9)
        words[H_DRAIN_DEADLINE_NS] = deadline
        table.clear_counts(self.seg)  # producers refuse new events from now on
        words[H_STATE] = STATE_STOPPING
        for bell in self.doorbells:
            bell.ring()
        self._wait_stopped(self.senders, "sender", deadline + 2_000_000_000)
        words[H_STATE] = STATE_STOPPED
        # The relays publish what the senders handed them until the drain
        # deadline, plus a second for confirms and one for closing the connection.
        self._wait_stopped(
            self.relays, "relay", max(deadline, time.monotonic_ns()) + RELAY_STOP_GRACE_NS
        )
        for sock in self.mi_sockets:
            sock.close()  # their files belong to whoever bound them (the daemon)
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        os.close(self._wake_w)
        return 0


class RegistryLog:
    """Logs what changed in the registry from one table store to the next:
    events declared, subscriptions added and removed (info), refreshed
    (debug); expired ones (info) as the loop removes them. It compares the
    registry with what it saw at the last store, so every path (MI,
    configuration, expiry) is logged the same way and the registry stays pure."""

    def __init__(self) -> None:
        self._events = 0
        # (event id, destination) -> (subscription id, start): a new id is a new
        # subscription, a new start a refresh.
        self._subs: dict[tuple[int, Destination], tuple[int, int]] = {}

    def stored(self, registry: Registry) -> None:
        for event_id in range(self._events, len(registry.events)):
            log.info("event %s published (id %d)", registry.events[event_id], event_id)
        self._events = len(registry.events)
        seen = {}
        for sub in registry.subscriptions():
            key = (sub.event_id, sub.destination)
            seen[key] = (sub.sub_id, sub.start_ns)
            before = self._subs.get(key)
            if before is None or before[0] != sub.sub_id:
                log.info("subscribed %s", _described(registry, sub))
            elif before[1] != sub.start_ns:
                log.debug("subscription refreshed: %s", _described(registry, sub))
        for event_id, dest in self._subs.keys() - seen.keys():
            log.info("unsubscribed %s from %s", dest, registry.events[event_id])
        self._subs = seen

    def expired(self, registry: Registry, gone: list[Subscription]) -> None:
        for sub in gone:
            self._subs.pop((sub.event_id, sub.destination), None)
            log.info("subscription expired: %s", _described(registry, sub))


def _described(registry: Registry, sub: Subscription) -> str:
    lifetime = "permanent" if sub.expire is None else f"expire {sub.expire} s"
    return f"{sub.destination} to {registry.events[sub.event_id]} ({lifetime})"


def reload_changes(old: HubOptions, new: HubOptions, declared: list[str]) -> list[str]:
    """What a reload changed, for its log line (pure)."""
    changes = []
    if declared:
        changes.append(f"events published {', '.join(declared)}")
    dropped = [e for e in dict.fromkeys(old.events) if e not in new.events]
    if dropped:
        # Event ids are never reused: a declared event stays until a restart.
        changes.append(f"events no longer configured (still published) {', '.join(dropped)}")
    before, after = set(old.subscriptions), set(new.subscriptions)
    for label, subs in (("added", after - before), ("removed", before - after)):
        if subs:
            listed = ", ".join(f"{event} {dest}" for event, dest in sorted(subs, key=str))
            changes.append(f"permanent subscriptions {label}: {listed}")
    if old.policy != new.policy:
        changes.append("allow-list (security.allowed_networks, unix_path_prefixes) changed")
    return changes


def _measure(pid: int) -> tuple[float, int] | None:
    """CPU seconds and RSS of a process, or None when it is gone."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            cpu = p.cpu_times()
            return cpu.user + cpu.system, p.memory_info().rss
    except psutil.Error:
        return None
