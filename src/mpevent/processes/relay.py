"""A broker relay process: publishes one ``rabbitmq:`` destination's events.

A broker client blocks and costs several times a datagram's CPU per
message, so no sender ever talks to a broker: each sender hands the events
of a broker destination to that destination's relay through a hand-off lane
(one per sender and relay, see :mod:`mpevent.shm.layout` and
:mod:`mpevent.processes.sender.handoff`), and the relay, one process per
relay slot, publishes them. A relay that is slow, disconnected or stuck
costs the senders nothing: its hand-off lanes fill, and the senders count
what no longer fits as dropped for this destination alone.

This module owns two things:

* :class:`PublishQueue`, pure bookkeeping with no I/O: what the relay holds
  (waiting to be published, then published and waiting for the broker's
  confirm), in order, bounded in count and bytes, and how every entry's fate
  is counted in its subscription's counters;
* :class:`Relay`, the process: pika's ``SelectConnection`` (asynchronous,
  with a window of unconfirmed publishes; waiting for each confirm measured
  about ten times slower), a periodic pass on its I/O loop that takes records
  from the hand-off lanes, publishes, stores the counters, and decides when
  to stop; reconnecting with backoff.

Counting, in the relay's own counter row (:meth:`Layout.relay_row`), per
subscription and member: ``routed`` is what the relay took from its hand-off
lanes; then ``sent`` once the broker confirmed it (``bytes`` with it),
``failed`` when the broker refused it (a nack), ``dropped`` when it was not
kept (stale: older than the destination's ``max_age``, also counted
``stale``; or still held when the relay stopped), and ``pending`` while it is
held. ``republished`` counts publishes of entries that were unconfirmed when
a connection dropped (the broker may have them twice). So
``routed = sent + failed + dropped + pending`` after every pass.

Delivery is at least once to the broker, in order per hand-off lane: entries
unconfirmed when the connection drops go back to the front of the waiting
queue, in order, and are published first on the next connection. A stale
entry is never published late (OpenSIPS #1155): it is dropped and counted.

A broker that is down or stops answering never blocks anything: connecting
is bounded by the destination's ``connect_timeout`` (TCP and the AMQP
handshake together), a peer that goes silent is detected by pika's
heartbeat check (it looks every ``heartbeat`` + 5 s, so it takes between
that and twice that), and meanwhile at most :data:`WINDOW` publishes wait
in the socket while the rest waits, bounded, in the queue. Reconnects back
off from 0.1 s, doubling to 1 s.

Records for a subscription that is no longer in the table (unsubscribed,
expired), or whose member index does not match this destination, are
discarded uncounted: their subscription and its counters are gone.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.select_connection import IOLoop

from mpevent import defaults
from mpevent.processes.sender.accounts import SubscriptionStats, drop_predecessor_backlogs
from mpevent.processes.sender.backlog import ENTRY_OVERHEAD, BacklogLimits
from mpevent.protocol.destination import BrokerDestination, from_spec
from mpevent.protocol.payload import Notification
from mpevent.shm.layout import (
    H_DRAIN_DEADLINE_NS,
    H_STATE,
    HANDOFF_PREFIX,
    R_CONNECTED,
    R_CONNECTS,
    R_LOOPS,
    R_PID,
    R_UNCONFIRMED,
    STATE_STARTING,
    STATE_STOPPED,
)
from mpevent.shm.ring import HANDOFF_HEADER, LaneReader, raised_ns_at
from mpevent.shm.segment import Segment
from mpevent.shm.table import event_names, read_snapshot, table_generation

log = logging.getLogger("mpevent.relay")

WINDOW = 1000  # publishes awaiting the broker's confirm at most
BATCH = 256  # records per hand-off lane per pass: fairness between senders
BUSY_PASS = 0.001  # seconds between passes while there is work...
IDLE_PASS = 0.020  # ...backing off to this when idle: an idle relay costs ~no CPU
BACKOFF_FIRST = 0.1  # reconnect delay after a failure, doubling...
# ...up to this (a refused connect costs ~nothing, and a broker back up is
# used within a second); back to the first after a connection that confirmed.
BACKOFF_MAX = 1.0
# A broker that blocks publishers (a resource alarm) this long: reconnect.
BLOCKED_TIMEOUT = 30.0
STOP_GRACE_NS = 1_000_000_000  # stopping: confirms awaited past the drain deadline
PARENT_CHECK_NS = 100_000_000  # how often to ask whether the hub still lives
CLOSE_TIMEOUT = 1.0  # stopping: the broker's close-ok awaited at most this long
NACK = 0  # the errno given to SubscriptionStats.fail for a nack: none


class Entry:
    """One event held for the broker: its notification bytes and whose it is."""

    __slots__ = ("again", "body", "charge", "raised_ns", "stats", "tag")

    def __init__(self, stats: SubscriptionStats, body: bytes, raised_ns: int) -> None:
        self.stats = stats
        self.body = body
        self.raised_ns = raised_ns
        self.charge = len(body) + ENTRY_OVERHEAD  # what holding it costs, for the byte bound
        self.tag = 0  # the channel's delivery tag once published; 0: none (confirmed, in fact)
        self.again = False  # unconfirmed when a connection dropped: its next publish repeats


class PublishQueue:
    """What a relay holds, in order: ``waiting`` to be published, then
    ``unconfirmed`` (published, delivery tags ascending). Pure: no I/O.

    Bounded by ``limits.backlog`` entries and ``limits.backlog_bytes`` bytes,
    unconfirmed ones included: :meth:`room` says how much more may be taken.
    Every entry is counted ``routed`` and ``pending`` when added, and leaves
    ``pending`` once as ``sent``, ``failed`` or ``dropped``.
    """

    def __init__(self, limits: BacklogLimits, max_age_ms: int = 0, window: int = WINDOW) -> None:
        self.max_count = limits.backlog
        self.max_bytes = limits.backlog_bytes
        self.max_age_ns = max_age_ms * 1_000_000
        self.window = window
        self.waiting: deque[Entry] = deque()
        self.unconfirmed: deque[Entry] = deque()
        self.held_bytes = 0
        self.next_tag = 1  # a new channel numbers its publishes from 1

    def __len__(self) -> int:
        return len(self.waiting) + len(self.unconfirmed)

    def room(self) -> tuple[int, int]:
        """(entries, bytes) that may still be taken; either may be <= 0: full."""
        return self.max_count - len(self), self.max_bytes - self.held_bytes

    def add(self, entry: Entry) -> None:
        stats = entry.stats
        stats.routed += 1
        stats.pending += 1
        self.waiting.append(entry)
        self.held_bytes += entry.charge

    def drop_stale(self, now_ns: int) -> int:
        """Drop (counted ``stale``) the waiting entries at the front that are
        older than the maximum age: they would be dropped when their turn came
        anyway, and while the broker is down they would hold room that fresh
        events need. The queue is in raise order per hand-off lane, so the
        oldest are at the front. Returns how many."""
        if not self.max_age_ns:
            return 0
        oldest = now_ns - self.max_age_ns
        waiting = self.waiting
        dropped = 0
        while waiting and waiting[0].raised_ns < oldest:
            entry = waiting.popleft()
            self._leave(entry)
            entry.stats.dropped += 1
            entry.stats.stale += 1
            dropped += 1
        return dropped

    def next_publish(self, now_ns: int) -> Entry | None:
        """The next entry to publish, or None (nothing waits, or the window is
        full). Stale ones on the way are dropped and counted, never returned.
        The caller publishes it and calls :meth:`published`, or :meth:`put_back`."""
        if len(self.unconfirmed) >= self.window:
            return None
        oldest = now_ns - self.max_age_ns if self.max_age_ns else 0
        while self.waiting:
            entry = self.waiting.popleft()
            if entry.raised_ns >= oldest:
                return entry
            self._leave(entry)
            entry.stats.dropped += 1
            entry.stats.stale += 1
        return None

    def published(self, entry: Entry) -> None:
        entry.tag = self.next_tag
        self.next_tag += 1
        if entry.again:
            entry.stats.republished += 1
        self.unconfirmed.append(entry)

    def put_back(self, entry: Entry) -> None:
        """``entry`` (from :meth:`next_publish`) could not be published: first again."""
        self.waiting.appendleft(entry)

    def confirm(self, tag: int, multiple: bool, ack: bool) -> int:
        """The broker's ack (``sent``) or nack (``failed``) of delivery ``tag``,
        and of every earlier one with ``multiple``. Returns how many entries it
        settled (0 for a tag it does not hold: a confirm of an older channel)."""
        unconfirmed = self.unconfirmed
        if not unconfirmed:
            return 0
        settled: list[Entry] = []
        if multiple:
            while unconfirmed and unconfirmed[0].tag <= tag:
                settled.append(unconfirmed.popleft())
        else:
            # Tags are consecutive from the first unconfirmed one: its position.
            at = tag - unconfirmed[0].tag
            if 0 <= at < len(unconfirmed) and unconfirmed[at].tag == tag:
                settled.append(unconfirmed[at])
                del unconfirmed[at]
        for entry in settled:
            self._leave(entry)
            stats = entry.stats
            if ack:
                stats.sent += 1
                stats.bytes += len(entry.body)
            else:
                stats.fail(NACK)
        return len(settled)

    def connection_lost(self) -> int:
        """The connection dropped: every unconfirmed entry goes back to the
        front of the waiting queue, in order, to be published again (counted
        ``republished`` then). The next channel numbers from 1. Returns how
        many went back."""
        back = self.unconfirmed
        for entry in back:
            entry.again = True
            entry.tag = 0
        self.waiting.extendleft(reversed(back))
        self.unconfirmed = deque()
        self.next_tag = 1
        return len(back)

    def drop_all(self) -> int:
        """Stopping: whatever is held is counted ``dropped``. Returns how many."""
        n = 0
        for held in (self.unconfirmed, self.waiting):
            for entry in held:
                self._leave(entry)
                entry.stats.dropped += 1
                n += 1
            held.clear()
        return n

    def discard(self, gone: Callable[[SubscriptionStats], bool]) -> int:
        """Drop (counted) the waiting entries whose subscription is ``gone``;
        unconfirmed ones stay until the broker says what became of them."""
        kept: deque[Entry] = deque()
        n = 0
        for entry in self.waiting:
            if gone(entry.stats):
                self._leave(entry)
                entry.stats.dropped += 1
                n += 1
            else:
                kept.append(entry)
        if n:
            self.waiting = kept
        return n

    def _leave(self, entry: Entry) -> None:
        entry.stats.pending -= 1
        self.held_bytes -= entry.charge


class Relay:
    """The process serving relay slot ``index``: one broker destination."""

    def __init__(
        self,
        seg: Segment,
        index: int,
        limits: BacklogLimits | None = None,
        parent_pid: int | None = None,
    ) -> None:
        self.seg = seg
        self.index = index
        self.limits = limits or BacklogLimits()
        self.parent_pid = parent_pid
        layout = seg.layout
        g = layout.geometry
        self.words = seg.words
        self.row = layout.relay_row(index)
        self.block = layout.relay_word(index)
        self.readers = [
            LaneReader(
                seg.buf,
                seg.words,
                layout.handoff_word(sender, index),
                layout.handoff_data(sender, index),
                g.handoff_size,
            )
            for sender in range(g.senders)
        ]
        self.spec = ""
        self.destination: BrokerDestination | None = None
        self.queue = PublishQueue(self.limits)
        self.table_gen = -1
        # (slot, sub_id) -> the counters of this destination's member in it.
        self.stats: dict[tuple[int, int], SubscriptionStats] = {}
        self.notes: list[Notification] = []  # by event id
        self.ioloop: IOLoop | None = None
        self.connection: pika.SelectConnection | None = None
        self.channel: pika.channel.Channel | None = None
        self.connected = False  # the channel is open and in confirm mode
        self.confirmed_here = False  # this connection had something confirmed
        self.backoff = BACKOFF_FIRST
        # Warned about the current outage: later attempts log at INFO, until
        # the broker confirms something again (a broker down for an hour is
        # one warning, not one per attempt).
        self.warned = False
        self._reconnect_timer: object | None = None
        self._interval = BUSY_PASS
        self._parent_checked_at = 0
        self._terminated = False  # SIGTERM
        # Why it stops: "" (it does not), "drain" (publish what is left
        # first), or "abort" (count what it holds dropped, now).
        self.stopping = ""
        self.deadline_ns = 0
        self.finished = False
        self._properties: pika.BasicProperties | None = None

    # -- the process ----------------------------------------------------------

    def run(self) -> int:
        words = self.words
        while words[H_STATE] == STATE_STARTING:  # started beside the hub: wait until it runs
            if self._parent_gone():
                return 0
            time.sleep(0.001)
        spec = self._assigned()
        if not spec:
            return 0  # the slot is free (its destination went before we started)
        self.spec = spec
        destination = from_spec(spec)
        if not isinstance(destination, BrokerDestination):
            log.error("relay %d: %s is not a broker destination", self.index, destination)
            return 1
        self.destination = destination
        self.queue = PublishQueue(self.limits, destination.max_age_ms)
        self._properties = pika.BasicProperties(
            content_type="application/json", delivery_mode=2 if destination.persistent else None
        )
        if not log.isEnabledFor(logging.DEBUG):
            # pika logs every failed connection attempt as an error; while a
            # broker is down that is a line per attempt. The relay says it once.
            logging.getLogger("pika").setLevel(logging.CRITICAL)
        dropped = drop_predecessor_backlogs(self.seg, self.row)
        if dropped:
            log.warning(
                "relay %d (%s): %d events its predecessor held were lost",
                self.index,
                destination,
                dropped,
            )
        self._reload(force=True)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        words[self.block + R_CONNECTED] = 0
        words[self.block + R_UNCONFIRMED] = 0
        words[self.block + R_PID] = os.getpid()  # serving from now on
        self.ioloop = IOLoop()
        try:
            self._connect()
            self.ioloop.call_later(0, self._pass)
            self.ioloop.start()
        finally:
            self.words[self.block + R_CONNECTED] = 0
            self.ioloop.close()
        return 0

    def _assigned(self) -> str:
        """The spec of the destination this slot serves now ("" free), from
        the table (waiting out a table the hub is writing)."""
        while True:
            got = read_snapshot(self.seg)
            if got is not None:
                relays = got[1].relays
                return relays[self.index] if self.index < len(relays) else ""
            time.sleep(0.001)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self._terminated = True

    def _parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    # -- the subscription table -------------------------------------------------

    def _reload(self, force: bool = False) -> None:
        gen = table_generation(self.seg)
        if gen == self.table_gen and not force:
            return
        got = read_snapshot(self.seg)
        if got is None:
            return  # the hub is writing; next pass
        self.table_gen, snapshot = got
        relays = snapshot.relays
        if (relays[self.index] if self.index < len(relays) else "") != self.spec:
            # Another destination (or none) has this slot now: what the lanes
            # hold from here on is the next relay's.
            self._stop("abort")
            return
        live: dict[tuple[int, int], int] = {}  # (slot, sub_id) -> our member's index
        for route in snapshot.routes:
            for member, dest in enumerate(route.destination.members()):
                if dest == self.destination:
                    live[(route.slot, route.sub_id)] = member
        gone = {key: stats for key, stats in self.stats.items() if key not in live}
        if gone:
            retired = set(gone.values())
            self.queue.discard(retired.__contains__)
            for key, stats in gone.items():
                # Stored one last time before a new subscription in the slot
                # resets the block; never again (its unconfirmed entries'
                # confirms change only this object).
                stats.store(self.words)
                del self.stats[key]
        for (slot, sub_id), member in live.items():
            if (slot, sub_id) not in self.stats:
                stats = SubscriptionStats(self.seg, self.row, slot, sub_id, member)
                self.stats[(slot, sub_id)] = stats
                stats.store(self.words)
        for name in event_names(self.seg, len(self.notes)):
            self.notes.append(Notification(name))

    # -- taking from the hand-off lanes ---------------------------------------

    def _take(self) -> int:
        """Records from every hand-off lane into the queue, while it has room.

        At most once: what a batch gave is counted and stored before its
        space is released (a relay killed in between leaves counted entries
        that its successor's repair counts as dropped)."""
        queue = self.queue
        taken = 0
        for reader in self.readers:
            if not reader.pending():
                continue
            count_room, byte_room = queue.room()
            if count_room <= 0 or byte_room <= 0:
                break  # full: the lanes keep the rest (and the senders drop)
            records, stretch, _ = reader.read_span(min(BATCH, count_room), byte_room)
            for event_id, at, n in records:
                entry = self._entry(event_id, stretch, at, n)
                if entry is not None:
                    queue.add(entry)
                    taken += 1
                if self.stopping == "abort":
                    return taken  # not released: the rest is the next relay's
            self._store()
            reader.release()
        return taken

    def _drop_lanes(self) -> int:
        """Stopping after the senders have exited: what the lanes still hold
        is taken and counted as dropped (never kept: no bound to respect)."""
        dropped = 0
        for reader in self.readers:
            while reader.pending():
                records, stretch, _ = reader.read_span(BATCH, 1 << 30)
                for _event_id, at, n in records:
                    stats = self._owner(stretch, at, n)
                    if stats is not None:
                        stats.routed += 1
                        stats.dropped += 1
                        dropped += 1
                self._store()
                reader.release()
        return dropped

    def _owner(self, stretch: memoryview, at: int, n: int) -> SubscriptionStats | None:
        """The counters a record belongs to, or None: not ours (any more)."""
        if n < HANDOFF_PREFIX:
            return None
        slot, member, sub_id = HANDOFF_HEADER.unpack_from(stretch, at)
        stats = self.stats.get((slot, sub_id))
        if stats is None and table_generation(self.seg) != self.table_gen:
            # A sender hands events for a subscription only once it saw it
            # in the table: ours may be older. Look again.
            self._reload()
            stats = self.stats.get((slot, sub_id))
        if stats is None or stats.index != member:
            return None
        return stats

    def _entry(self, event_id: int, stretch: memoryview, at: int, n: int) -> Entry | None:
        stats = self._owner(stretch, at, n)
        if stats is None:
            return None
        if event_id >= len(self.notes):
            self.notes.extend(Notification(name) for name in event_names(self.seg, len(self.notes)))
            if event_id >= len(self.notes):
                return None
        body = self.notes[event_id].build(stretch[at + HANDOFF_PREFIX : at + n])
        return Entry(stats, body, raised_ns_at(stretch, at))

    # -- the periodic pass --------------------------------------------------------

    def _pass(self) -> None:
        if self.finished:
            return
        now = time.monotonic_ns()
        words = self.words
        words[self.block + R_LOOPS] += 1
        self._check_stop(now)
        if self.stopping == "abort":
            self._finish()
            return
        self._reload()
        if self.stopping == "abort":
            self._finish()
            return
        taken = self._take()
        if self.stopping == "abort":
            self._finish()
            return
        self.queue.drop_stale(now)
        published = self._publish(now) if self.connected else 0
        self._store()
        if self.stopping == "drain":
            lanes_empty = not any(reader.pending() for reader in self.readers)
            if (lanes_empty and not len(self.queue)) or now > self.deadline_ns:
                self._finish()
                return
        busy = taken or published or (self.connected and self.queue.waiting)
        self._interval = BUSY_PASS if busy else min(IDLE_PASS, self._interval * 2)
        if self.stopping:
            self._interval = BUSY_PASS
        self.ioloop.call_later(self._interval, self._pass)

    def _check_stop(self, now: int) -> None:
        if self.stopping:
            return
        if now >= self._parent_checked_at:
            self._parent_checked_at = now + PARENT_CHECK_NS
            if self._parent_gone():
                log.warning("relay %d: the hub is gone; stopping", self.index)
                self._stop("abort")
                return
        if self.words[H_STATE] == STATE_STOPPED or self._terminated:
            self._stop("drain")

    def _stop(self, how: str) -> None:
        if self.stopping == "abort":
            return
        if how == "drain" and not self.stopping:
            # The hub stopped the senders (or we got SIGTERM): publish what is
            # left until the drain deadline, and wait a moment for confirms.
            drain_deadline = self.words[H_DRAIN_DEADLINE_NS]
            now = time.monotonic_ns()
            if drain_deadline <= now:
                drain_deadline = now + int(defaults.DRAIN_TIMEOUT * 1e9)
            self.deadline_ns = drain_deadline + STOP_GRACE_NS
        self.stopping = how

    def _finish(self) -> None:
        """Count what is left, close the connection, end the loop."""
        self.finished = True
        if self.stopping == "drain":
            self._drop_lanes()
        dropped = self.queue.drop_all()
        if dropped:
            log.warning(
                "relay %d (%s): %d events not confirmed by the broker when it stopped",
                self.index,
                self.destination,
                dropped,
            )
        self._store()
        self.connected = False
        self.words[self.block + R_CONNECTED] = 0
        if self._reconnect_timer is not None:
            self.ioloop.remove_timeout(self._reconnect_timer)
            self._reconnect_timer = None
        conn = self.connection
        if conn is None or not conn.is_open:
            # Closed, closing, or still opening: pika's close() of a connection
            # in its opening workflow fails an assertion inside pika (1.3,
            # 1.4), so it is left to the process's exit, which closes the socket.
            self.ioloop.stop()
            return
        try:
            conn.close()
        except pika.exceptions.AMQPError:
            self.ioloop.stop()
            return
        self.ioloop.call_later(CLOSE_TIMEOUT, self.ioloop.stop)  # a broker that never answers

    def _store(self) -> None:
        words = self.words
        for stats in self.stats.values():
            stats.store(words)
        words[self.block + R_UNCONFIRMED] = len(self.queue.unconfirmed)

    # -- publishing --------------------------------------------------------------

    def _publish(self, now: int) -> int:
        """Publish while the window has room; returns how many went (their
        frames leave in as few ``send`` calls as the socket allows)."""
        dest = self.destination
        assert dest is not None
        queue = self.queue
        channel = self.channel
        publish = channel.basic_publish
        exchange, key, properties = dest.exchange, dest.routing_key, self._properties
        n = 0
        while True:
            entry = queue.next_publish(now)
            if entry is None:
                break
            try:
                publish(exchange, key, entry.body, properties)
            except pika.exceptions.AMQPError as exc:
                # The channel or connection closed under us; its callback
                # follows and the entry goes out on the next connection.
                queue.put_back(entry)
                log.debug("relay %d: publish failed: %r", self.index, exc)
                break
            queue.published(entry)
            n += 1
        if n:
            coalesce_output(self.connection)
        return n

    # -- the connection ---------------------------------------------------------

    def _connect(self) -> None:
        self._reconnect_timer = None
        if self.finished:
            return
        dest = self.destination
        assert dest is not None and self.ioloop is not None
        timeout = dest.connect_timeout_ms / 1000
        params = pika.ConnectionParameters(
            host=dest.host,
            port=dest.port,
            virtual_host=dest.vhost,
            credentials=pika.PlainCredentials(dest.user, dest.password),
            heartbeat=dest.heartbeat_s,
            connection_attempts=1,  # the relay retries, with its own backoff
            socket_timeout=timeout,  # the TCP connect
            stack_timeout=timeout,  # TCP and the AMQP handshake together
            blocked_connection_timeout=BLOCKED_TIMEOUT,
            client_properties={"connection_name": f"mpevent relay {self.index}"},
        )
        self.confirmed_here = False
        self.words[self.block + R_CONNECTS] += 1
        try:
            self.connection = pika.SelectConnection(
                params,
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_closed,
                custom_ioloop=self.ioloop,
            )
        except Exception as exc:  # pika refused the parameters or the socket
            log.warning("relay %d (%s): cannot connect: %s", self.index, dest, exc)
            self.connection = None
            self._retry()

    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, frame: object) -> None:
        self.connected = True
        self.words[self.block + R_CONNECTED] = 1
        log.info("relay %d: connected to %s", self.index, self.destination)
        if not self.finished:
            self._publish(time.monotonic_ns())
            self._store()

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        ack = isinstance(method, pika.spec.Basic.Ack)
        if self.queue.confirm(method.delivery_tag, method.multiple, ack):
            self.confirmed_here = True
            self.warned = False

    def _on_channel_closed(self, channel: pika.channel.Channel, reason: Exception) -> None:
        # The broker closes a channel for a publish it cannot route to an
        # exchange that does not exist, for one: start over on a new connection.
        self._lost()
        conn = self.connection
        if conn is not None and conn.is_open:
            self._complain("channel closed", reason)
            conn.close()

    def _on_open_error(self, connection: object, error: BaseException) -> None:
        self._lost()
        if self.finished:
            self.ioloop.stop()
            return
        self._complain("cannot connect", error)
        self._retry()

    def _on_closed(self, connection: object, reason: BaseException) -> None:
        self._lost()
        if self.finished:
            self.ioloop.stop()
            return
        if self.confirmed_here:
            self.backoff = BACKOFF_FIRST
        self._complain("connection lost", reason)
        self._retry()

    def _complain(self, what: str, why: object) -> None:
        """A warning for the first failure of an outage, INFO for the rest."""
        level = logging.INFO if self.warned else logging.WARNING
        self.warned = True
        log.log(level, "relay %d (%s): %s: %s", self.index, self.destination, what, why)

    def _lost(self) -> None:
        """The channel is gone: what it did not confirm is published again."""
        self.connected = False
        self.channel = None
        self.words[self.block + R_CONNECTED] = 0
        if not self.finished:
            self.queue.connection_lost()
            self._store()

    def _retry(self) -> None:
        delay = self.backoff
        self.backoff = min(BACKOFF_MAX, self.backoff * 2)
        if self._reconnect_timer is None:
            self._reconnect_timer = self.ioloop.call_later(delay, self._connect)


def coalesce_output(connection: object) -> None:
    """Join what pika's transport has buffered into one chunk.

    pika buffers every AMQP frame on its own (a publish is three: method,
    header, body) and its transport sends each with its own ``send(2)``, so
    a window of publishes costs three syscalls per message: measured here,
    that was about 60 % of the relay's CPU, and joining them halved its CPU
    per message and doubled its rate. The buffers are the transport's
    private ``_tx_buffers`` deque (pika 1.3 and 1.4); joining keeps the
    bytes, their order and the transport's byte count as they were, and
    ``write`` only appends and arms the writer, so nothing else notices.
    When pika has no such deque (another version), this does nothing and
    the frames go out one by one, as pika sends them.
    """
    transport = getattr(connection, "_transport", None)
    buffers = getattr(transport, "_tx_buffers", None)
    if isinstance(buffers, deque) and len(buffers) > 1:
        joined = b"".join(buffers)
        buffers.clear()
        buffers.append(joined)
