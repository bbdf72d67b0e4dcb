"""A sender worker's loop: drains its lanes, hands each batch to the endpoints.

One sender process owns a fixed set of lanes (``lane % senders``), so each
lane has exactly one consumer. Per loop it:

1. reloads the subscription table when the hub's generation changed, and
   routes it (:mod:`mpevent.processes.sender.routing`);
2. takes a batch of records from each lane (one stretch, copied out at
   once), describes each event's datagram once as pieces
   (:mod:`mpevent.processes.sender.batch`), and hands the batch to every
   subscriber's endpoint (:mod:`mpevent.processes.sender.endpoints`), which
   sends it with one ``sendmmsg`` per destination
   (:mod:`mpevent.processes.sender.mmsg`); it counts how long the batch's
   oldest record waited;
3. lets endpoints that wait for their socket (a full backlog's destination)
   go on when ``poll`` says they can;
4. stores its counters in the segment and releases what it read (``head``);
5. naps, then sleeps on its doorbell, when there was nothing to do
   (bounded, see :mod:`mpevent.shm.doorbell`).

The loop owns the poll registry: after each call into an endpoint it asks
the endpoint what it waits for (:meth:`~mpevent.processes.sender.endpoints.Endpoint.wants`)
and registers or unregisters it; endpoints never reach back into the loop.

Hot path: a batch of one event (the usual case) is packed once and the
same packing goes to every destination; a destination's whole run is
counted at once; no Python object is made per datagram unless it has to
wait in a backlog.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections import Counter

from mpevent.processes.sender import mmsg
from mpevent.processes.sender.accounts import (
    GroupStats,
    PerMessage,
    SubscriptionStats,
    drop_predecessor_backlogs,
)
from mpevent.processes.sender.backlog import BacklogBudget, BacklogLimits
from mpevent.processes.sender.batch import LaneBatch
from mpevent.processes.sender.endpoints import Endpoint
from mpevent.processes.sender.mmsg import STRETCH_BYTES, Outbox, address_of
from mpevent.processes.sender.routing import Routing, route
from mpevent.processes.sender.transports import Transports
from mpevent.protocol.payload import MAX_DATAGRAM, Notification
from mpevent.protocol.registry import Route
from mpevent.shm.doorbell import IDLE_AFTER_NS, IDLE_MAX_SLEEP, MAX_SLEEP, Doorbell
from mpevent.shm.layout import (
    AGE_BUCKETS,
    C_DISPATCHED,
    C_LOST,
    C_OVERSIZE,
    C_TAKEN,
    C_UNROUTED,
    COUNTER_WORDS,
    H_DRAIN_DEADLINE_NS,
    H_EVENT_COUNT,
    H_STATE,
    L_CLAIMS,
    S_AGE_HIST,
    S_AGE_MAX,
    S_LOOPS,
    S_PID,
    S_SLEEPING,
    S_TABLE_GEN,
    STATE_RUNNING,
    STATE_STARTING,
)
from mpevent.shm.ring import LaneReader
from mpevent.shm.segment import Segment
from mpevent.shm.table import event_names, read_snapshot, table_generation

log = logging.getLogger("mpevent.sender")

BATCH = 256  # records per lane per loop: fairness between lanes
ACTIVE_REFRESH_NS = 10_000_000  # how often to look for newly claimed lanes
NAP = 50e-6  # an idle sender looks at its lanes this often...
NAPS = 20  # ...this many times, before it sleeps until the doorbell rings
STUCK_AT_STOP_NS = 2_000_000_000  # stopping: how long to wait for receivers that never read


_CLOSE = b"}"  # the last piece of every datagram with params
CLOSE_AT = address_of(_CLOSE)
assert BATCH <= mmsg.MAX_MESSAGES  # a batch's messages fit one outbox

Counters = SubscriptionStats | GroupStats  # a virtual subscription's: one per member
EventRoutes = list[list[tuple[Endpoint, Counters]]]


class Sender:
    """The loop of one sender process (also usable in-process by tests)."""

    def __init__(
        self,
        seg: Segment,
        index: int,
        doorbell: Doorbell,
        limits: BacklogLimits | None = None,
        parent_pid: int | None = None,
    ):
        if limits is None:
            limits = BacklogLimits()
        self.seg = seg
        self.index = index
        self.doorbell = doorbell
        self.budget = BacklogBudget(limits.sender_backlog_bytes)  # all its backlogs' bytes
        self.parent_pid = parent_pid
        layout = seg.layout
        g = layout.geometry
        self.words = seg.words
        self.my_word = layout.sender_word(index)
        self.readers = [  # the lanes this sender drains (lane % senders), shared ones too
            (
                lane,
                LaneReader(
                    seg.buf, seg.words, layout.lane_word(lane), layout.lane_data(lane), g.lane_size
                ),
            )
            for lane in range(g.ring_lanes)
            if layout.lane_sender(lane) == index
        ]
        # The lanes some producer has claimed; the others stay empty, and
        # looking at all of them on every pass costs microseconds.
        self.active: list[tuple[int, LaneReader]] = []
        self._active_at = 0
        self._parent_checked_at = 0
        self.table_gen = -1
        self.table: list[Route] = []  # the hub's last table, expired routes included
        self.notes: list[Notification] = []  # by event id
        # By event id: where its datagrams' pieces are, (address, length) of
        # its notification's prefix and of its datagram without params (the
        # note keeps them alive).
        self.prefixes: list[tuple[int, int, int, int]] = []
        self.routing: Routing[Endpoint, Counters] = Routing()
        self.routes: EventRoutes = []  # self.routing.by_event, for the hot path
        self.transports = Transports(limits, self.budget, seg, index)
        self._open_endpoint = self.transports.open
        # The poll registry: the doorbell, and each endpoint that waits for
        # its descriptor. select.poll keeps no kernel state, so a descriptor
        # an endpoint closed and reopened under the same number needs no
        # unregistering first; the maps are put right after every call
        # into an endpoint.
        self.poller = select.poll()
        self.poller.register(doorbell.read_fd, select.POLLIN)
        self.waiting: dict[int, Endpoint] = {}  # descriptor -> the endpoint waiting on it
        self.watched: dict[Endpoint, tuple[int, int]] = {}  # endpoint -> its registration
        self.writers = 0  # registrations that wait for POLLOUT: the loop must not nap
        self.timed: dict[Endpoint, int] = {}  # endpoint -> when its tick is due (monotonic ns)
        self.outbox = Outbox()
        self._worked = False  # took records since it last slept: nap before sleeping
        self._worked_at = 0  # monotonic ns: when it last took records

    # -- subscription table ---------------------------------------------

    def reload(self, force: bool = False) -> None:
        gen = table_generation(self.seg)
        if gen == self.table_gen and not force:
            return
        got = read_snapshot(self.seg)
        if got is None:
            return  # the hub is writing; try again next loop
        self.table_gen, snap = got
        self.table = snap.routes
        self.transports.relays = {spec: r for r, spec in enumerate(snap.relays) if spec}
        for name in event_names(self.seg, len(self.notes)):
            note = Notification(name)
            self.notes.append(note)
            self.prefixes.append(
                (address_of(note.prefix), len(note.prefix), address_of(note.bare), len(note.bare))
            )
        self._route(time.monotonic_ns())
        self.words[self.my_word + S_TABLE_GEN] = self.table_gen  # routing with it from now on

    def _route(self, now_ns: int) -> None:
        routing, closed, retired = route(
            self.table,
            len(self.notes),
            now_ns,
            self.routing,
            self._open_endpoint,
            self._open_counters,
        )
        for ep in closed:
            self._unwatch(ep)
            ep.close()  # what waited is dropped, and counted
            self._forget(ep)
        for stats in retired:
            stats.store(self.words)
        for dest, ep in routing.endpoints.items():
            if dest not in self.routing.endpoints:
                self._watch(ep)  # a new one may be connecting already
        self.routing = routing
        self.routes = routing.by_event

    def _open_counters(self, r: Route) -> Counters:
        members = len(r.destination.members())
        if r.destination.kind == "virtual":
            return GroupStats(self.seg, self.index, r.slot, r.sub_id, members)
        return SubscriptionStats(self.seg, self.index, r.slot, r.sub_id)

    # -- the poll registry and the timers -----------------------------------

    def _watch(self, endpoint: Endpoint) -> None:
        """Register what ``endpoint`` (each of its parts) waits for now, and
        when its tick is due, if that changed."""
        for ep in endpoint.parts():
            due = ep.due_ns()
            if due:
                self.timed[ep] = due
            elif self.timed:
                self.timed.pop(ep, None)
            want = ep.wants()
            had = self.watched.get(ep)
            if want == had:
                continue
            if had is not None:
                self._unwatch_part(ep)
            if want is not None:
                fd, events = want
                stale = self.waiting.get(fd)
                if stale is not None:  # it closed this descriptor, whose number is ep's now
                    self._unwatch_part(stale)
                self.waiting[fd] = ep
                self.watched[ep] = want
                if events & select.POLLOUT:
                    self.writers += 1
                self.poller.register(fd, events)

    def _unwatch(self, endpoint: Endpoint) -> None:
        for ep in endpoint.parts():
            self._unwatch_part(ep)

    def _unwatch_part(self, ep: Endpoint) -> None:
        had = self.watched.pop(ep, None)
        if had is None:
            return
        if had[1] & select.POLLOUT:
            self.writers -= 1
        if self.waiting.get(had[0]) is ep:
            del self.waiting[had[0]]
            self.poller.unregister(had[0])

    def _forget(self, endpoint: Endpoint) -> None:
        for ep in endpoint.parts():
            self.timed.pop(ep, None)

    def _tick_due(self, now: int) -> None:
        """Tick the endpoints whose time has come (reconnects, reply timeouts)."""
        for ep, due in list(self.timed.items()):
            if due <= now:
                ep.tick(now)
                self._watch(ep)
        self.store_counters()

    def _poll(self, timeout_ms: float) -> bool:
        """Wait for the doorbell or for waiting endpoints; let those go on.
        Returns whether anything was ready (False: the time ran out)."""
        served = False
        ready = self.poller.poll(timeout_ms)
        for fd, revents in ready:
            ep = self.waiting.get(fd)
            if ep is None:
                continue  # the doorbell
            served = True
            ep.ready(revents)
            self._watch(ep)
        if served:
            self.store_counters()
        return bool(ready)

    # -- the loop ---------------------------------------------------------

    def drain_once(self) -> int:
        """One pass over the lanes; returns the number of records taken.

        At most once, per lane batch: the batch's stretch of the lane is
        copied out, what was taken is counted, its space is released
        (``head`` stored), and only then is it sent. A sender killed before
        the release leaves the records for its successor; killed after it,
        it takes at most one batch with it, which its successor counts as
        lost (:meth:`count_lost`), so the counters still add up:
        ``taken = dispatched + unrouted + send_oversize + lost``.
        """
        words = self.words
        layout = self.seg.layout
        outbox = self.outbox
        taken = 0
        for lane, reader in self.active:
            if not reader.pending():
                continue
            records, stretch, oldest_ns = reader.read_span(BATCH, STRETCH_BYTES)
            if not records:
                reader.release()  # only padding
                continue
            base = outbox.load(stretch)
            taken += len(records)
            counters = layout.cons_counter_word(lane, 0)
            batch = LaneBatch(outbox, self.notes)
            pieces, sizes, bodies = batch.pieces, batch.sizes, batch.bodies
            routes, prefixes = self.routes, self.prefixes
            ids: list[int] = []  # event id per message
            skipped: list[tuple[int, int]] = []  # (event id, C_UNROUTED or C_OVERSIZE)
            for event_id, at, n in records:
                if event_id >= len(routes) or not routes[event_id]:
                    # A producer may have seen the subscriber count before
                    # we saw the table that goes with it: look again.
                    self.reload()
                    routes, prefixes = self.routes, self.prefixes
                    if event_id >= len(routes) or not routes[event_id]:
                        skipped.append((event_id, C_UNROUTED))
                        continue
                prefix_at, prefix_len, bare_at, bare_len = prefixes[event_id]
                if n:
                    if prefix_len + n + 1 > MAX_DATAGRAM:
                        skipped.append((event_id, C_OVERSIZE))
                        continue
                    pieces += (prefix_at, prefix_len, base + at, n, CLOSE_AT, 1)
                    sizes.append(prefix_len + n + 1)
                else:
                    pieces += (bare_at, bare_len, 0, 0, 0, 0)
                    sizes.append(bare_len)
                bodies.append((event_id, at, n))
                ids.append(event_id)
            # One event in the whole batch is the usual case: count it at once.
            single = bool(ids) and ids.count(ids[0]) == len(ids)
            per_event = {ids[0]: len(ids)} if single else Counter(ids)
            for event_id, n in per_event.items():
                words[counters + event_id * COUNTER_WORDS + C_TAKEN] += n
            if skipped:
                for (event_id, why), n in Counter(skipped).items():
                    words[counters + event_id * COUNTER_WORDS + C_TAKEN] += n
                    words[counters + event_id * COUNTER_WORDS + why] += n
            reader.release()
            if ids:
                self._count_age(oldest_ns, len(ids))
                self._send_batch(batch, ids, routes, single)
                for event_id, n in per_event.items():
                    words[counters + event_id * COUNTER_WORDS + C_DISPATCHED] += n
        return taken

    def _count_age(self, oldest_ns: int, events: int) -> None:
        """How long the batch's oldest record waited, raise to send (see S_AGE_HIST)."""
        age_ns = time.monotonic_ns() - oldest_ns
        words, me = self.words, self.my_word
        if age_ns > words[me + S_AGE_MAX]:
            words[me + S_AGE_MAX] = age_ns
        bucket = min(AGE_BUCKETS - 1, max(0, age_ns // 1000).bit_length())
        words[me + S_AGE_HIST + bucket] += events

    def _send_batch(
        self, batch: LaneBatch, ids: list[int], routes: EventRoutes, single: bool
    ) -> None:
        """Every message to its event's destinations: one packing for all of
        them when the batch holds a single event (the usual case), else one
        run per destination, packed in turn."""
        outbox = self.outbox
        words = self.words
        watched = self.watched
        if single:
            outbox.pack(batch.pieces)
            everything = range(len(ids))
            for ep, stats in routes[ids[0]]:
                ep.send(batch, everything, stats)  # type: ignore[arg-type]
                stats.store(words)
                if watched or self.timed or ep.wants() is not None or ep.due_ns():
                    self._watch(ep)
            return
        runs: dict[Endpoint, tuple[list[int], list[Counters]]] = {}
        for i, event_id in enumerate(ids):
            for ep, stats in routes[event_id]:
                run = runs.get(ep)
                if run is None:
                    runs[ep] = ([i], [stats])
                else:
                    run[0].append(i)
                    run[1].append(stats)
        touched: set[Counters] = set()
        for ep, (messages, owners) in runs.items():
            batch.pack(messages)
            first = owners[0]
            if owners.count(first) == len(owners):  # one subscription's run
                ep.send(batch, messages, first)  # type: ignore[arg-type]
                touched.add(first)
            else:
                ep.send(batch, messages, PerMessage(owners))  # type: ignore[arg-type]
                touched.update(owners)
            if watched or self.timed or ep.wants() is not None or ep.due_ns():
                self._watch(ep)
        # Only the subscriptions this batch used: with many subscribers,
        # storing all of them after every small batch would dominate.
        for stats in touched:
            stats.store(words)

    def count_lost(self) -> int:
        """At start: count what a killed predecessor took and never sent
        (events, as ``lost``) and what its backlogs held (as ``dropped``,
        with ``pending`` back to 0)."""
        words, layout = self.words, self.seg.layout
        lost = 0
        for lane, _ in self.readers:
            for event_id in range(words[H_EVENT_COUNT]):
                cw = layout.cons_counter_word(lane, event_id)
                accounted = (
                    words[cw + C_DISPATCHED]
                    + words[cw + C_UNROUTED]
                    + words[cw + C_OVERSIZE]
                    + words[cw + C_LOST]
                )
                missing = words[cw + C_TAKEN] - accounted
                if missing > 0:
                    words[cw + C_LOST] += missing
                    lost += missing
        return lost + drop_predecessor_backlogs(self.seg, self.index)

    def store_counters(self) -> None:
        for stats in self.routing.counters.values():
            stats.store(self.words)

    def run(self) -> int:
        words = self.words
        me = self.my_word
        while words[H_STATE] == STATE_STARTING:  # started beside the hub: wait until it runs
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                return 0
            time.sleep(0.001)
        lost = self.count_lost()
        if lost:
            log.warning(
                "sender %d: %d events were lost in flight by its predecessor", self.index, lost
            )
        self.reload(force=True)
        words[me + S_PID] = os.getpid()  # serving from now on (EventBus waits for it)
        idle_since = 0
        while True:
            self.reload()
            now = time.monotonic_ns()
            deadline = self.routing.next_deadline_ns
            if deadline and now >= deadline:
                self._route(now)
            if now >= self._active_at:
                self._refresh_active(now)
            taken = self.drain_once()
            if self.waiting:
                self._poll(0)
            if self.timed and now >= min(self.timed.values()):
                self._tick_due(now)
            words[me + S_LOOPS] += 1
            stopping = self._should_stop(now)
            if stopping and now > words[H_DRAIN_DEADLINE_NS]:
                break  # drain time is up: what is left is counted as not sent
            if taken:
                idle_since = 0
                self._worked = True
                self._worked_at = now
                continue
            if stopping:
                self._refresh_active(now)  # a lane claimed a moment ago counts too
                if self.drain_once():
                    continue
                if all(ep.idle() for ep in self.routing.endpoints.values()):
                    break
                if not idle_since:
                    idle_since = now
                elif now - idle_since > STUCK_AT_STOP_NS:
                    break  # a receiver that never reads: stop waiting for it
            self._sleep()
        for ep in self.routing.endpoints.values():
            self._unwatch(ep)
            ep.close()
            self._forget(ep)
        self.store_counters()
        return 0

    def _should_stop(self, now: int) -> bool:
        if self.words[H_STATE] != STATE_RUNNING:
            return True
        if self.parent_pid is None or now < self._parent_checked_at:
            return False
        # getppid() is a syscall: ask at most every ACTIVE_REFRESH_NS.
        self._parent_checked_at = now + ACTIVE_REFRESH_NS
        return os.getppid() != self.parent_pid

    def _refresh_active(self, now: int) -> None:
        words, layout = self.words, self.seg.layout
        self.active = [
            (lane, r) for lane, r in self.readers if words[layout.lane_word(lane) + L_CLAIMS]
        ]
        self._active_at = now + ACTIVE_REFRESH_NS

    def _sleep(self) -> None:
        # Nap briefly a few times before sleeping for real, after work only.
        # While events keep coming, producers never find the sender asleep
        # (no doorbell syscall), and the sender takes them in batches instead
        # of reading each lane's tail line right behind the producer writing
        # it (which would cost the producer a cache miss per event). Not
        # after a sleep that found nothing (an idle sender wakes only every
        # MAX_SLEEP, for the lost wake-up, and costs ~nothing), and not while
        # an endpoint waits for its socket to be writable: then poll() must
        # wait for it. Endpoints that only watch for input (a stream's
        # replies, a closed connection) are polled between naps.
        active = [reader for _, reader in self.active]
        if self._worked and not self.writers:
            for _ in range(NAPS):
                time.sleep(NAP)
                if self.waiting:
                    self._poll(0)
                    if self.writers:
                        break
                for reader in active:
                    if reader.pending():
                        return
        words = self.words
        flag = self.my_word + S_SLEEPING
        words[flag] = 1
        if any(reader.pending() for reader in active):
            words[flag] = 0
            return
        # Idle for a while: wake less often (see mpevent.shm.doorbell).
        idle = time.monotonic_ns() - self._worked_at > IDLE_AFTER_NS
        timeout = (IDLE_MAX_SLEEP if idle else MAX_SLEEP) * 1000
        deadline = self.routing.next_deadline_ns
        if self.timed:
            due = min(self.timed.values())
            deadline = min(deadline, due) if deadline else due
        if deadline:
            timeout = min(timeout, max(0.0, (deadline - time.monotonic_ns()) / 1e6))
        rang = self._poll(timeout)
        words[flag] = 0
        self._worked = False
        if rang:
            self.doorbell.drain()
            self._active_at = 0  # woken up: maybe by a producer on a new lane
