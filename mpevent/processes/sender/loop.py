"""A sender worker: drains its lanes and writes datagrams to subscribers.

One sender process owns a fixed set of lanes (``lane % senders``), so each
lane has exactly one consumer. Per loop it:

1. reloads the subscription table when the hub's generation changed;
2. takes a batch of records from each lane (one stretch, copied out at
   once), describes each event's datagram once as pieces, and sends the
   batch to every subscriber with one ``sendmmsg`` per destination
   (:mod:`mpevent.processes.sender.mmsg`); it counts how long the batch's oldest record
   waited;
3. flushes backlogs of subscribers that became writable;
4. stores its counters in the segment and publishes the lanes' ``head``;
5. naps, then sleeps on its doorbell, when there was nothing to do
   (bounded, see :mod:`mpevent.shm.doorbell`).

Sends are non-blocking on connected sockets, one per destination. A
connected socket reports ECONNREFUSED (UDP port closed, UNIX listener gone)
and ENOENT (UNIX path gone) for that destination alone. EAGAIN (a UNIX
receiver's queue is full) puts the datagram in the destination's bounded
backlog, flushed when ``poll`` says the socket is writable; later datagrams
for that destination queue behind it so order is kept. Only a full backlog
drops, and counts.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections import Counter, deque
from collections.abc import Sequence

from mpevent.processes.sender import mmsg
from mpevent.processes.sender.mmsg import INTS_PER_MESSAGE, STRETCH_BYTES, Outbox, address_of
from mpevent.protocol.payload import MAX_DATAGRAM, Notification
from mpevent.protocol.registry import Route
from mpevent.shm.doorbell import MAX_SLEEP, Doorbell
from mpevent.shm.layout import (
    AGE_BUCKETS,
    C_DISPATCHED,
    C_LOST,
    C_OVERSIZE,
    C_TAKEN,
    C_UNROUTED,
    D_BYTES,
    D_DROPPED,
    D_ECONNREFUSED,
    D_ENOENT,
    D_FAILED,
    D_ID,
    D_ROUTED,
    D_SENT,
    H_DRAIN_DEADLINE_NS,
    H_EVENT_COUNT,
    H_STATE,
    L_CLAIMS,
    S_AGE_HIST,
    S_AGE_MAX,
    S_LOOPS,
    S_SLEEPING,
    STATE_RUNNING,
)
from mpevent.shm.ring import LaneReader
from mpevent.shm.segment import Segment
from mpevent.shm.table import event_names, read_snapshot, table_generation

log = logging.getLogger("mpevent.sender")

BATCH = 256  # records per lane per loop: fairness between lanes
DEFAULT_BACKLOG = 16384  # datagrams per destination
RECONNECT_INTERVAL_NS = 50_000_000
ACTIVE_REFRESH_NS = 10_000_000  # how often to look for newly claimed lanes
NAP = 50e-6  # an idle sender looks at its lanes this often...
NAPS = 20  # ...this many times, before it sleeps until the doorbell rings


_CLOSE = b"}"  # the last piece of every datagram with params
CLOSE_AT = address_of(_CLOSE)
assert BATCH <= mmsg.MAX_MESSAGES  # a batch's messages fit one outbox


class SubscriptionStats:
    """One subscription's counters in this sender; stored in the segment per loop."""

    __slots__ = (
        "bytes",
        "dropped",
        "enoent",
        "failed",
        "refused",
        "routed",
        "sent",
        "slot",
        "sub_id",
        "word",
    )

    def __init__(self, seg: Segment, sender: int, route: Route):
        self.slot = route.slot
        self.sub_id = route.sub_id
        self.word = w = seg.layout.dest_counter_word(sender, route.slot)
        words = seg.words
        if words[w + D_ID] != route.sub_id:  # a new subscription in this slot
            for i in range(8):
                words[w + i] = 0
            words[w + D_ID] = route.sub_id
        self.routed = words[w + D_ROUTED]
        self.sent = words[w + D_SENT]
        self.bytes = words[w + D_BYTES]
        self.failed = words[w + D_FAILED]
        self.dropped = words[w + D_DROPPED]
        self.refused = words[w + D_ECONNREFUSED]
        self.enoent = words[w + D_ENOENT]

    def fail(self, code: int) -> None:
        self.failed += 1
        if code == errno.ECONNREFUSED:
            self.refused += 1
        elif code == errno.ENOENT:
            self.enoent += 1

    def store(self, words: memoryview) -> None:
        w = self.word
        words[w + D_ROUTED] = self.routed
        words[w + D_SENT] = self.sent
        words[w + D_BYTES] = self.bytes
        words[w + D_FAILED] = self.failed
        words[w + D_DROPPED] = self.dropped
        words[w + D_ECONNREFUSED] = self.refused
        words[w + D_ENOENT] = self.enoent


Recipients = SubscriptionStats | list[SubscriptionStats]  # one for all messages, or one each


class Endpoint:
    """One destination's connected socket and backlog, shared by its subscriptions."""

    __slots__ = (
        "backlog",
        "backlog_limit",
        "dest",
        "last_errno",
        "on_blocked",
        "on_closed",
        "retry_at",
        "sock",
    )

    def __init__(self, route: Route, backlog_limit: int, on_blocked, on_closed):
        self.dest = route.destination
        self.backlog: deque[tuple[bytes, SubscriptionStats]] = deque()
        self.backlog_limit = backlog_limit
        self.on_blocked = on_blocked  # the sender polls for POLLOUT from now on
        self.on_closed = on_closed  # ... and stops before the descriptor closes
        self.sock: socket.socket | None = None
        self.last_errno = 0
        self.retry_at = 0
        self._connect()

    def _connect(self) -> bool:
        sock = socket.socket(self.dest.family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(self.dest.sockaddr)
        except OSError as exc:
            sock.close()
            self.last_errno = exc.errno or errno.EIO
            self.retry_at = time.monotonic_ns() + RECONNECT_INTERVAL_NS
            return False
        self.sock = sock
        return True

    def send(self, batch: LaneBatch, messages: Sequence[int], stats: Recipients) -> None:
        """Send messages of ``batch`` in order, as packed in its outbox.

        ``messages`` are indices into the batch, packed in this order: the
        outbox's message ``k`` is ``messages[k]``. ``stats``: the one
        subscription they all belong to, or a list with one per message.
        """
        count = len(messages)
        each = stats if stats.__class__ is list else None
        if each is None:
            stats.routed += count
        else:
            for st in each:
                st.routed += 1
        if self.backlog:
            self._queue(batch, messages, stats, 0)
            return
        if self.sock is None and (time.monotonic_ns() < self.retry_at or not self._connect()):
            self._fail_from(stats, 0, count)
            return
        sock = self.sock
        outbox = batch.outbox if mmsg.AVAILABLE else None
        sizes = batch.sizes
        k = 0
        while k < count:
            try:
                if outbox is not None:
                    sent = outbox.send(sock, k, count - k)
                else:
                    sock.send(batch.datagram(messages[k]))
                    sent = 1
            except BlockingIOError:
                self._queue(batch, messages, stats, k)
                self.on_blocked(self)
                return
            except OSError as exc:
                self._failed(exc, stats if each is None else each[k])
                k += 1
                if self.sock is None and not self._connect():
                    self._fail_from(stats, k, count)  # the listener is gone for now
                    return
                sock = self.sock
                continue
            if each is None:
                stats.sent += sent
                stats.bytes += sum(map(sizes.__getitem__, messages[k : k + sent]))
            else:
                for j in range(k, k + sent):
                    st = each[j]
                    st.sent += 1
                    st.bytes += sizes[messages[j]]
            k += sent

    def _fail_from(self, stats: Recipients, start: int, count: int) -> None:
        for k in range(start, count):
            (stats[k] if stats.__class__ is list else stats).fail(self.last_errno)

    def _queue(
        self, batch: LaneBatch, messages: Sequence[int], stats: Recipients, start: int
    ) -> None:
        """Keep messages ``start..`` as datagrams until the socket is writable
        (order kept); what finds the backlog full is dropped, and counted."""
        backlog = self.backlog
        room = self.backlog_limit - len(backlog)
        for k in range(start, len(messages)):
            st = stats[k] if stats.__class__ is list else stats
            if room > 0:
                backlog.append((batch.datagram(messages[k]), st))
                room -= 1
            else:
                st.dropped += 1

    def _failed(self, exc: OSError, stats: SubscriptionStats) -> None:
        code = exc.errno or errno.EIO
        stats.fail(code)
        self.last_errno = code
        if self.dest.kind == "unix" and code in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN):
            # The listener went away; a new one may bind the same path, so
            # the next datagram reconnects. What waited for this socket fails.
            self.close()
            while self.backlog:
                _, waiting = self.backlog.popleft()
                waiting.fail(code)
            self.retry_at = 0

    def flush(self) -> bool:
        """Send what the backlog holds; True when it is empty."""
        backlog = self.backlog
        sock = self.sock
        while backlog:
            datagram, stats = backlog[0]
            if sock is None:
                backlog.popleft()
                stats.fail(self.last_errno)
                continue
            try:
                sock.send(datagram)
            except BlockingIOError:
                return False
            except OSError as exc:
                backlog.popleft()
                self._failed(exc, stats)
                sock = self.sock
                continue
            backlog.popleft()
            stats.sent += 1
            stats.bytes += len(datagram)
        return True

    def drop_backlog(self) -> None:
        while self.backlog:
            _, stats = self.backlog.popleft()
            stats.dropped += 1

    def close(self) -> None:
        if self.sock is not None:
            # Unregister before closing: the number may be reused at once by
            # another destination's socket, which must not inherit our poll.
            self.on_closed(self)
            self.sock.close()
            self.sock = None


class LaneBatch:
    """The datagrams of one lane batch: pieces for the outbox, bytes only on demand.

    A datagram becomes a ``bytes`` object only when it must wait in a
    backlog or when there is no ``sendmmsg``: its params are in the outbox's
    copy of the lane, which the next batch overwrites.
    """

    __slots__ = ("bodies", "notes", "outbox", "pieces", "sizes")

    def __init__(self, outbox: Outbox, notes: list[Notification]):
        self.outbox = outbox
        self.notes = notes
        self.pieces: list[int] = []  # six per message: see mpevent.processes.sender.mmsg
        self.sizes: list[int] = []  # datagram bytes, per message
        self.bodies: list[tuple[int, int, int]] = []  # (event id, offset, length) per message

    def datagram(self, message: int) -> bytes:
        event_id, at, n = self.bodies[message]
        return self.notes[event_id].build(self.outbox.view[at : at + n])


class Sender:
    """The loop of one sender process (also usable in-process by tests)."""

    def __init__(
        self,
        seg: Segment,
        index: int,
        doorbell: Doorbell,
        backlog_limit: int = DEFAULT_BACKLOG,
        parent_pid: int | None = None,
    ):
        self.seg = seg
        self.index = index
        self.doorbell = doorbell
        self.backlog_limit = backlog_limit
        self.parent_pid = parent_pid
        layout = seg.layout
        g = layout.geometry
        self.words = seg.words
        self.my_word = layout.sender_word(index)
        self.readers = [  # the lanes this sender drains (lane % senders)
            (
                lane,
                LaneReader(
                    seg.buf, seg.words, layout.lane_word(lane), layout.lane_data(lane), g.lane_size
                ),
            )
            for lane in range(g.lanes)
            if layout.lane_sender(lane) == index
        ]
        # The lanes some producer has claimed; the others stay empty, and
        # looking at all of them on every pass costs microseconds.
        self.active: list[tuple[int, LaneReader]] = []
        self._active_at = 0
        self._parent_checked_at = 0
        self.table_gen = -1
        self.notes: list[Notification] = []
        self.heads: list[
            tuple[int, int, int, int]
        ] = []  # per event: prefix, bare (address, length)
        self.routes: list[list[tuple[Endpoint, SubscriptionStats]]] = []
        self.all_routes: list[Route] = []
        self.endpoints: dict[object, Endpoint] = {}
        self.stats: dict[int, SubscriptionStats] = {}
        self.next_deadline = 0
        self.blocked: dict[int, Endpoint] = {}  # socket fd -> destination waiting for POLLOUT
        self.poller = select.poll()
        self.poller.register(doorbell.read_fd, select.POLLIN)
        self.outbox = Outbox()

    # -- subscription table ---------------------------------------------

    def reload(self, force: bool = False) -> None:
        gen = table_generation(self.seg)
        if gen == self.table_gen and not force:
            return
        got = read_snapshot(self.seg)
        if got is None:
            return  # the hub is writing; try again next loop
        self.table_gen, snap = got
        self.all_routes = snap.routes
        names = event_names(self.seg, len(self.notes))
        for name in names:
            note = Notification(name)
            self.notes.append(note)
            # Where the pieces of its datagrams are (kept alive by the note).
            self.heads.append(
                (address_of(note.prefix), len(note.prefix), address_of(note.bare), len(note.bare))
            )
        self._build_routes(time.monotonic_ns())

    def _build_routes(self, now_ns: int) -> None:
        routes: list[list[tuple[Endpoint, SubscriptionStats]]] = [[] for _ in self.notes]
        live_stats: dict[int, SubscriptionStats] = {}
        live_dests: dict[object, Endpoint] = {}
        next_deadline = 0
        for route in self.all_routes:
            if route.deadline_ns and route.deadline_ns <= now_ns:
                continue  # expired: never sent to, even before the hub removes it
            if route.deadline_ns and (not next_deadline or route.deadline_ns < next_deadline):
                next_deadline = route.deadline_ns
            stats = self.stats.get(route.slot)
            if stats is None or stats.sub_id != route.sub_id:
                stats = SubscriptionStats(self.seg, self.index, route)
            live_stats[route.slot] = stats
            dest = route.destination
            ep = live_dests.get(dest) or self.endpoints.get(dest)
            if ep is None:
                ep = Endpoint(route, self.backlog_limit, self._blocked, self._unblock)
            live_dests[dest] = ep
            if route.event_id < len(routes):
                routes[route.event_id].append((ep, stats))
        for dest, ep in self.endpoints.items():
            if dest not in live_dests:
                self._retire(ep)
        for slot, stats in self.stats.items():
            if slot not in live_stats:
                stats.store(self.words)
        self.stats = live_stats
        self.endpoints = live_dests
        self.routes = routes
        self.next_deadline = next_deadline

    def _retire(self, ep: Endpoint) -> None:
        ep.drop_backlog()
        ep.close()  # unblocks it too

    # -- backlog ----------------------------------------------------------

    def _blocked(self, ep: Endpoint) -> None:
        fd = ep.sock.fileno()
        if fd not in self.blocked:
            self.blocked[fd] = ep
            self.poller.register(fd, select.POLLOUT)

    def _unblock(self, ep: Endpoint) -> None:
        if ep.sock is not None and self.blocked.get(ep.sock.fileno()) is ep:
            fd = ep.sock.fileno()
            del self.blocked[fd]
            self.poller.unregister(fd)

    def _poll(self, timeout_ms: float) -> None:
        """Wait for the doorbell or blocked destinations; flush those writable."""
        flushed = False
        for fd, _ in self.poller.poll(timeout_ms):
            ep = self.blocked.get(fd)
            if ep is None:
                continue  # the doorbell
            flushed = True
            if ep.flush():  # empty (a closed socket unblocked itself)
                self._unblock(ep)
        if flushed:
            self.store_counters()

    # -- the loop ---------------------------------------------------------

    def drain_once(self) -> int:
        """One pass over the lanes; returns the number of records taken.

        At most once, per lane batch: the batch's stretch of the lane is
        copied out, what was taken is counted, ``head`` is committed, and
        only then is it sent. A sender killed before the commit leaves the
        records for its successor; killed after it, it takes at most one
        batch with it, which its successor counts as lost
        (:meth:`count_lost`), so the counters still add up:
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
                reader.commit()  # only padding
                continue
            base = outbox.load(stretch)
            taken += len(records)
            counters = layout.cons_counter_word(lane, 0)
            batch = LaneBatch(outbox, self.notes)
            pieces, sizes, bodies = batch.pieces, batch.sizes, batch.bodies
            routes, heads = self.routes, self.heads
            ids: list[int] = []  # event id per message
            skipped: list[tuple[int, int]] = []  # (event id, C_UNROUTED or C_OVERSIZE)
            for event_id, at, n in records:
                if event_id >= len(routes) or not routes[event_id]:
                    # A producer may have seen the subscriber count before
                    # we saw the table that goes with it: look again.
                    self.reload()
                    routes, heads = self.routes, self.heads
                    if event_id >= len(routes) or not routes[event_id]:
                        skipped.append((event_id, C_UNROUTED))
                        continue
                head_at, head_len, bare_at, bare_len = heads[event_id]
                if n:
                    if head_len + n + 1 > MAX_DATAGRAM:
                        skipped.append((event_id, C_OVERSIZE))
                        continue
                    pieces += (head_at, head_len, base + at, n, CLOSE_AT, 1)
                    sizes.append(head_len + n + 1)
                else:
                    pieces += (bare_at, bare_len, 0, 0, 0, 0)
                    sizes.append(bare_len)
                bodies.append((event_id, at, n))
                ids.append(event_id)
            # One event in the whole batch is the usual case: count it at once.
            single = bool(ids) and ids.count(ids[0]) == len(ids)
            per_event = {ids[0]: len(ids)} if single else Counter(ids)
            for event_id, n in per_event.items():
                words[counters + event_id * 8 + C_TAKEN] += n
            if skipped:
                for (event_id, why), n in Counter(skipped).items():
                    words[counters + event_id * 8 + C_TAKEN] += n
                    words[counters + event_id * 8 + why] += n
            reader.commit()
            if ids:
                self._count_age(oldest_ns, len(ids))
                self._send_batch(batch, ids, routes, single)
                for event_id, n in per_event.items():
                    words[counters + event_id * 8 + C_DISPATCHED] += n
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
        self,
        batch: LaneBatch,
        ids: list[int],
        routes: list[list[tuple[Endpoint, SubscriptionStats]]],
        single: bool,
    ) -> None:
        """Every message to its event's destinations: one packing for all of
        them when the batch holds a single event (the usual case), else one
        run per destination, packed in turn."""
        outbox = self.outbox
        words = self.words
        if single:
            outbox.pack(batch.pieces)
            everything = range(len(ids))
            for ep, stats in routes[ids[0]]:
                ep.send(batch, everything, stats)
                stats.store(words)
            return
        runs: dict[Endpoint, tuple[list[int], list[SubscriptionStats]]] = {}
        for i, event_id in enumerate(ids):
            for ep, stats in routes[event_id]:
                run = runs.get(ep)
                if run is None:
                    runs[ep] = ([i], [stats])
                else:
                    run[0].append(i)
                    run[1].append(stats)
        pieces = batch.pieces
        touched: set[SubscriptionStats] = set()
        for ep, (messages, stats) in runs.items():
            w = INTS_PER_MESSAGE
            outbox.pack([x for i in messages for x in pieces[i * w : i * w + w]])
            ep.send(batch, messages, stats)
            touched.update(stats)
        # Only the subscriptions this batch used: with many subscribers,
        # storing all of them after every small batch would dominate.
        for stats in touched:
            stats.store(words)

    def count_lost(self) -> int:
        """At start: count what a killed predecessor took and never sent
        (events, as ``lost``) and what its backlogs held (as ``dropped``)."""
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
        # Datagrams that waited in the predecessor's backlogs went with it:
        # they count as dropped for their destination, never as pending forever.
        for slot in range(layout.geometry.max_subs):
            w = layout.dest_counter_word(self.index, slot)
            if not words[w + D_ID]:
                continue
            pending = words[w + D_ROUTED] - (
                words[w + D_SENT] + words[w + D_FAILED] + words[w + D_DROPPED]
            )
            if pending > 0:
                words[w + D_DROPPED] += pending
                lost += pending
        return lost

    def store_counters(self) -> None:
        for stats in self.stats.values():
            stats.store(self.words)

    def run(self) -> int:
        words = self.words
        me = self.my_word
        lost = self.count_lost()
        if lost:
            log.warning(
                "sender %d: %d events were lost in flight by its predecessor", self.index, lost
            )
        self.reload(force=True)
        idle_since = 0
        while True:
            self.reload()
            now = time.monotonic_ns()
            if self.next_deadline and now >= self.next_deadline:
                self._build_routes(now)
            if now >= self._active_at:
                self._refresh_active(now)
            taken = self.drain_once()
            if self.blocked:
                self._poll(0)
            words[me + S_LOOPS] += 1
            stopping = self._should_stop(now)
            if stopping and now > words[H_DRAIN_DEADLINE_NS]:
                break  # drain time is up: what is left is counted as not sent
            if taken:
                idle_since = 0
                continue
            if stopping:
                self._refresh_active(now)  # a lane claimed a moment ago counts too
                if self.drain_once():
                    continue
                if not self.blocked:
                    break
                if not idle_since:
                    idle_since = now
                elif now - idle_since > 2_000_000_000:
                    break  # a receiver that never reads: stop waiting for it
            self._sleep()
        for ep in self.endpoints.values():
            ep.drop_backlog()
            ep.close()
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
        # Nap briefly a few times before sleeping for real. While events keep
        # coming, producers never find the sender asleep (no doorbell
        # syscall), and the sender takes them in batches instead of reading
        # each lane's tail line right behind the producer writing it (which
        # would cost the producer a cache miss per event). Not while a
        # destination is blocked: then poll() must wait for it.
        active = [reader for _, reader in self.active]
        if not self.blocked:
            for _ in range(NAPS):
                time.sleep(NAP)
                for reader in active:
                    if reader.pending():
                        return
        words = self.words
        flag = self.my_word + S_SLEEPING
        words[flag] = 1
        if any(reader.pending() for reader in active):
            words[flag] = 0
            return
        timeout = MAX_SLEEP * 1000
        if self.next_deadline:
            timeout = min(timeout, max(0.0, (self.next_deadline - time.monotonic_ns()) / 1e6))
        self._poll(timeout)
        words[flag] = 0
        self.doorbell.drain()
        self._active_at = 0  # woken up: maybe by a producer on a new lane
