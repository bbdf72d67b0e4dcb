"""The broker relay: what it holds and counts, and delivery to a real RabbitMQ.

* :class:`~mpevent.processes.relay.PublishQueue` is pure bookkeeping: the
  first tests drive it with a real segment's counter blocks, no broker;
* then a relay process alone (``launch.start_relay``) on a segment this test
  builds, fed through the hand-off lanes exactly as a sender feeds it, against
  a private broker (the ``broker`` / ``fresh_broker`` fixtures);
* then end to end through :class:`mpevent.EventBus`: subscribe a
  ``rabbitmq:`` socket, raise, a pika consumer of the queue
  (:class:`mpevent.tools.broker.Consumer`) gets every
  notification once, in order, with the AMQP properties the destination
  asks for; the broker down at subscribe time, stale events, a relay killed
  and respawned, nothing left after ``close``.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator

import orjson
import psutil
import pytest
from support import check_accounting, destination_stats, gone, raise_retrying, wait_for

from mpevent import EventBus, encode_notification
from mpevent.processes import launch
from mpevent.processes.relay import Entry, PublishQueue
from mpevent.processes.sender.accounts import SubscriptionStats
from mpevent.processes.sender.backlog import ENTRY_OVERHEAD, BacklogLimits
from mpevent.protocol.destination import parse_destination
from mpevent.protocol.registry import Registry
from mpevent.shm.layout import (
    DEST_COUNTERS,
    H_DRAIN_DEADLINE_NS,
    H_STATE,
    R_CONNECTED,
    R_CONNECTS,
    R_PID,
    STATE_RUNNING,
    STATE_STOPPED,
    Geometry,
)
from mpevent.shm.ring import HANDOFF_HEADER, LaneWriter
from mpevent.shm.segment import Segment
from mpevent.shm.table import store_registry
from mpevent.tools.broker import Consumer, PrivateBroker

MS = 1_000_000


# -- PublishQueue: pure --------------------------------------------------------------


@pytest.fixture
def segment() -> Iterator[Segment]:
    seg = Segment.create(Geometry(lanes=1, lane_size=4096, max_events=4, max_subs=8, relays=2))
    yield seg
    seg.close()


def fates(stats: SubscriptionStats) -> tuple[int, int, int, int, int]:
    """(routed, sent, failed, dropped, pending), checking that they add up."""
    assert stats.routed == stats.sent + stats.failed + stats.dropped + stats.pending
    return stats.routed, stats.sent, stats.failed, stats.dropped, stats.pending


def test_queue_confirms_single_and_multiple_acks_and_nacks(segment: Segment) -> None:
    stats = SubscriptionStats(segment, segment.layout.relay_row(0), 3, 7)
    queue = PublishQueue(BacklogLimits(), window=4)
    for i in range(6):
        queue.add(Entry(stats, b"x" * (10 + i), time.monotonic_ns()))
    assert fates(stats) == (6, 0, 0, 0, 6)
    now = time.monotonic_ns()
    sent = []
    while (entry := queue.next_publish(now)) is not None:
        queue.published(entry)
        sent.append(entry)
    assert [e.tag for e in sent] == [1, 2, 3, 4], "the window holds 4 unconfirmed"
    assert queue.confirm(2, multiple=False, ack=True) == 1  # out of order, alone
    assert queue.confirm(2, multiple=False, ack=True) == 0  # twice: nothing more
    assert queue.confirm(3, multiple=True, ack=True) == 2  # 1 and 3 (2 is gone)
    assert queue.confirm(4, multiple=False, ack=False) == 1  # a nack: failed
    assert fates(stats) == (6, 3, 1, 0, 2)
    assert stats.bytes == 10 + 11 + 12
    assert queue.confirm(99, multiple=True, ack=True) == 0, "nothing unconfirmed"
    assert queue.held_bytes == 14 + 15 + 2 * ENTRY_OVERHEAD


def test_queue_republishes_unconfirmed_first_in_order_after_a_lost_connection(
    segment: Segment,
) -> None:
    stats = SubscriptionStats(segment, segment.layout.relay_row(0), 0, 1)
    queue = PublishQueue(BacklogLimits(), window=3)
    bodies = [b"%d" % i for i in range(5)]
    for body in bodies:
        queue.add(Entry(stats, body, time.monotonic_ns()))
    now = time.monotonic_ns()
    for _ in range(3):
        queue.published(queue.next_publish(now))
    queue.confirm(1, multiple=False, ack=True)
    assert queue.connection_lost() == 2
    order = []
    while (entry := queue.next_publish(now)) is not None:
        queue.published(entry)
        order.append((entry.body, entry.tag))
    assert order == [(b"1", 1), (b"2", 2), (b"3", 3)], "the new channel numbers from 1"
    assert stats.republished == 2
    queue.confirm(3, multiple=True, ack=True)
    queue.published(queue.next_publish(now))
    queue.confirm(4, multiple=True, ack=True)
    assert fates(stats) == (5, 5, 0, 0, 0)


def test_queue_drops_stale_entries_and_bounds_what_it_holds(segment: Segment) -> None:
    stats = SubscriptionStats(segment, segment.layout.relay_row(1), 2, 5)
    queue = PublishQueue(BacklogLimits(backlog=3, backlog_bytes=1 << 20), max_age_ms=100)
    now = time.monotonic_ns()
    queue.add(Entry(stats, b"old", now - 500 * MS))
    queue.add(Entry(stats, b"fresh", now))
    assert queue.room() == (1, (1 << 20) - 3 - 5 - 2 * ENTRY_OVERHEAD)
    queue.add(Entry(stats, b"old too", now - 200 * MS))  # behind a fresh one
    assert queue.room()[0] == 0, "full: the relay takes no more"
    assert queue.drop_stale(now) == 1, "the stale front goes at once"
    first = queue.next_publish(now)
    assert first is not None and first.body == b"fresh"
    queue.published(first)
    assert queue.next_publish(now) is None, "the stale one is never returned"
    assert (stats.dropped, stats.stale) == (2, 2)
    assert queue.drop_all() == 1  # the unconfirmed fresh one, at stop
    assert fates(stats) == (3, 0, 0, 3, 0)
    assert queue.held_bytes == 0

    byte_bound = PublishQueue(BacklogLimits(backlog=100, backlog_bytes=2 * ENTRY_OVERHEAD + 20))
    byte_bound.add(Entry(stats, b"a" * 10, now))
    byte_bound.add(Entry(stats, b"b" * 10, now))
    assert byte_bound.room()[1] == 0


def test_queue_discards_a_gone_subscriptions_waiting_entries(segment: Segment) -> None:
    row = segment.layout.relay_row(0)
    kept, gone = SubscriptionStats(segment, row, 0, 1), SubscriptionStats(segment, row, 1, 2)
    queue = PublishQueue(BacklogLimits())
    now = time.monotonic_ns()
    for stats in (kept, gone, kept, gone):
        queue.add(Entry(stats, b"{}", now))
    queue.published(queue.next_publish(now))  # kept's first
    queue.published(queue.next_publish(now))  # gone's first: stays until confirmed
    assert queue.discard(lambda stats: stats is gone) == 1
    assert [e.stats for e in queue.waiting] == [kept]
    queue.confirm(2, multiple=True, ack=True)
    assert fates(kept) == (2, 1, 0, 0, 1)
    assert fates(gone) == (2, 1, 0, 1, 0)


# -- against a real broker ----------------------------------------------------------------


@pytest.fixture
def consumers() -> Iterator[list[Consumer]]:
    """The test's consumers, closed (their queues deleted) at teardown."""
    made: list[Consumer] = []
    yield made
    for consumer in made:
        consumer.close()


def _quiet(consumer: Consumer, count: int, wait: float = 0.5) -> bool:
    """Nothing beyond the ``count`` messages arrives within ``wait`` s."""
    time.sleep(wait)
    return len(consumer.deliveries) == count


def _queue_name(tag: str) -> str:
    return f"mpevent-{tag}-{os.getpid()}-{secrets.token_hex(3)}"


def _relay_pid(bus: EventBus, slot: int = 0) -> int:
    """The pid of the last relay that served ``slot`` (0: none yet)."""
    seg = bus.segment
    return seg.words[seg.layout.relay_word(slot) + R_PID]


def _relay_process(bus: EventBus, slot: int = 0, timeout: float = 20.0) -> psutil.Process:
    """The bus's relay for ``slot`` once it serves (its pid in its block)."""
    pid = wait_for(lambda: _relay_pid(bus, slot), timeout)
    assert pid, f"no relay serves slot {slot}: {bus.mi('ps')}"
    return psutil.Process(pid)


def _connected(bus: EventBus, slot: int) -> int:
    """The relay of ``slot`` has its broker connection open, confirming."""
    seg = bus.segment
    return seg.words[seg.layout.relay_word(slot) + R_CONNECTED]


def _relay_rows(bus: EventBus) -> list[str]:
    return [row["Type"] for row in bus.mi("ps")["Processes"] if row["Type"].startswith("relay")]


class HandOff:
    """A segment with one broker subscription in its table, and the sender
    end of the hand-off lane to relay 0: a sender's part, played by the test."""

    def __init__(self, socket: str, relays: int = 2) -> None:
        self.seg = Segment.create(
            Geometry(lanes=1, lane_size=4096, max_events=4, max_subs=8, relays=relays)
        )
        self.registry = Registry(4, 8, None, relays)
        self.event_id = self.registry.declare("E_RELAY")
        self.destination = parse_destination(socket)
        self.registry.subscribe("E_RELAY", self.destination, None, time.monotonic_ns())
        self.store()
        (self.sub,) = self.registry.subscriptions()
        layout = self.seg.layout
        self.lane = LaneWriter(
            self.seg.buf,
            self.seg.words,
            layout.handoff_word(0, 0),
            layout.handoff_data(0, 0),
            layout.geometry.handoff_size,
        )
        self.seg.words[H_STATE] = STATE_RUNNING

    def store(self) -> None:
        store_registry(self.seg, self.registry, 0)

    def push(
        self, params: bytes, *, slot: int, member: int, sub_id: int, raised_ns: int = 0
    ) -> None:
        """One record for (slot, member, sub_id), raised ``raised_ns`` (0: now)."""
        raised_ns = raised_ns or time.monotonic_ns()
        body = HANDOFF_HEADER.pack(slot, member, sub_id) + params
        deadline = time.monotonic() + 20
        while not self.lane.push(self.event_id, body, raised_ns):
            assert time.monotonic() < deadline, "the relay does not take from its lane"
            time.sleep(0.0005)

    def counters(self) -> dict[str, int]:
        layout = self.seg.layout
        w = layout.dest_counter_word(layout.relay_row(0), self.sub.slot, 0)
        return {name: self.seg.words[w + i] for i, name in enumerate(DEST_COUNTERS)}

    def relay_word(self, offset: int) -> int:
        return self.seg.words[self.seg.layout.relay_word(0) + offset]

    def stop(self, drain_s: float = 5.0) -> None:
        self.seg.words[H_DRAIN_DEADLINE_NS] = time.monotonic_ns() + int(drain_s * 1e9)
        self.seg.words[H_STATE] = STATE_STOPPED

    def close(self) -> None:
        self.seg.close()


@pytest.mark.timeout(120)
def test_relay_alone_publishes_what_it_is_handed_in_order_and_counts_it(
    broker: PrivateBroker, consumers: list[Consumer]
) -> None:
    """The relay process fed as a sender feeds it: every record of its live
    subscription reaches the queue once, in order, and is counted sent once
    the broker confirmed it; a record for another subscription, or with the
    wrong member index, is discarded uncounted; STATE_STOPPED: exit 0."""
    queue = _queue_name("alone")
    consumer = broker.consume(queue)
    consumers.append(consumer)
    hand = HandOff(broker.socket(queue))
    proc = launch.start_relay(hand.seg.fd, 0, BacklogLimits(), os.getpid())
    try:
        sub = hand.sub
        n = 3000
        expected = []
        for i in range(n):
            params = b'{"seq":%d}' % i if i % 10 else b""  # some without params
            hand.push(params, slot=sub.slot, member=0, sub_id=sub.sub_id)
            expected.append(encode_notification("E_RELAY", {"seq": i} if i % 10 else None))
            if i % 1000 == 0:  # not ours: a gone subscription, a member it does not have
                hand.push(b"{}", slot=sub.slot, member=0, sub_id=sub.sub_id + 1)
                hand.push(b"{}", slot=sub.slot, member=1, sub_id=sub.sub_id)
        got = consumer.wait_for(n, timeout=30)
        assert [d.body for d in got] == expected
        assert {d.content_type for d in got} == {"application/json"}
        assert {d.delivery_mode for d in got} == {None}, "not persistent"
        assert _quiet(consumer, n)
        assert wait_for(lambda: hand.counters()["sent"] == n), hand.counters()
        counts = hand.counters()
        assert counts["routed"] == n and counts["pending"] == 0, counts
        assert counts["bytes"] == sum(map(len, expected)), counts
        assert counts["dropped"] == counts["failed"] == counts["republished"] == 0, counts
        assert hand.relay_word(R_PID) == proc.pid
        assert hand.relay_word(R_CONNECTED) == 1 and hand.relay_word(R_CONNECTS) == 1
        hand.stop()
        assert proc.wait(15) == 0
        assert hand.relay_word(R_CONNECTED) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        hand.close()


@pytest.mark.timeout(120)
def test_relay_alone_stops_on_sigterm_and_when_its_slot_changes(
    broker: PrivateBroker, consumers: list[Consumer]
) -> None:
    """SIGTERM: it publishes what its lanes hold, then exits 0. A slot the
    table frees: it exits 0 at once, leaving the lanes to the next relay;
    started for a free slot, it exits 0 without serving."""
    queue = _queue_name("term")
    consumer = broker.consume(queue)
    consumers.append(consumer)
    hand = HandOff(broker.socket(queue))
    sub = hand.sub
    proc = launch.start_relay(hand.seg.fd, 0, BacklogLimits(), os.getpid())
    try:
        assert wait_for(lambda: hand.relay_word(R_CONNECTED))
        for i in range(500):
            hand.push(b'{"i":%d}' % i, slot=sub.slot, member=0, sub_id=sub.sub_id)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        counts = hand.counters()
        assert counts["routed"] == 500, "it takes what its lanes hold before it stops"
        assert counts["sent"] == 500 and counts["pending"] == 0, counts
        assert len(consumer.wait_for(500)) == 500

        proc = launch.start_relay(hand.seg.fd, 0, BacklogLimits(), os.getpid())
        assert wait_for(lambda: hand.relay_word(R_PID) == proc.pid)
        hand.registry.unsubscribe("E_RELAY", hand.destination)
        hand.store()
        assert proc.wait(15) == 0, "its slot is free: it stops"
        proc = launch.start_relay(hand.seg.fd, 0, BacklogLimits(), os.getpid())
        assert proc.wait(15) == 0, "started for a free slot: it exits at once"
        assert hand.relay_word(R_PID) != proc.pid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        hand.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["queue", "exchange-persistent"])
def test_bus_delivers_every_event_once_in_order(
    how: str, broker: PrivateBroker, consumers: list[Consumer]
) -> None:
    """Through EventBus: a ``rabbitmq:`` subscriber's queue gets every raised
    event once, in order, as a JSON-RPC notification with content type
    application/json (delivery mode 2 with ``persistent``), and the
    counters add up: routed = handed = relayed = sent."""
    if how == "queue":
        key = _queue_name(how)
        consumer = broker.consume(key)
        sock = broker.socket(key)
    else:
        exchange, key = _queue_name("x"), "calls"
        consumer = broker.consume(key, exchange)
        sock = broker.socket(key, exchange=exchange, persistent=True)
    consumers.append(consumer)
    n = 2000
    with EventBus() as bus:
        bus.publish_event("E_CALL")
        bus.subscribe("E_CALL", sock)
        assert str(parse_destination(sock)) == sock
        expected = []
        for i in range(n):
            params = {"seq": i, "callid": f"c{i}@127.0.0.1"} if i % 7 else None
            raise_retrying(bus.raise_event, "E_CALL", params)
            expected.append(encode_notification("E_CALL", params))
        got = consumer.wait_for(n, timeout=30)
        assert [d.body for d in got] == expected
        assert {d.content_type for d in got} == {"application/json"}
        modes = {d.delivery_mode for d in got}
        assert modes == ({2} if how != "queue" else {None}), modes
        assert {(d.exchange, d.routing_key) for d in got} == {
            ("" if how == "queue" else exchange, key)
        }
        assert _quiet(consumer, n)
        row = wait_for(
            lambda: (r := destination_stats(bus, "E_CALL", sock))["sent"] == n and r, timeout=20
        )
        assert row, destination_stats(bus, "E_CALL", sock)
        assert row["routed"] == row["handed"] == row["relayed"] == n, row
        assert row["in_handoff"] == row["pending"] == row["dropped"] == 0, row
        assert row["bytes"] == sum(map(len, expected)), row
        check_accounting(bus.stats())
        relay = _relay_process(bus)
        assert _relay_rows(bus) == ["relay 0"]
    assert gone(relay), "the relay outlived its bus"


@pytest.mark.timeout(240)
def test_broker_down_events_wait_then_arrive_and_old_ones_go_stale(
    fresh_broker: PrivateBroker, consumers: list[Consumer], udp_sink
) -> None:
    """A broker that is down when the subscriptions come: the events wait in
    the relay and reach the queue once the broker is up, in order; with
    ``max_age`` the ones that waited too long are counted stale, never
    published. A datagram subscriber of the same event gets everything meanwhile."""
    keep, age = _queue_name("keep"), _queue_name("age")
    # Durable queues, there before the broker goes down: they are there
    # again when it comes back, before the relays' reconnects publish.
    keeper = fresh_broker.consume(keep, durable=True)
    ager = fresh_broker.consume(age, durable=True)
    consumers += [keeper, ager]
    fresh_broker.kill()
    keep_sock = fresh_broker.socket(keep)
    age_sock = fresh_broker.socket(age, max_age=500)
    n = 300
    with EventBus() as bus:
        bus.publish_event("E_WAIT")
        bus.subscribe("E_WAIT", keep_sock)
        bus.subscribe("E_WAIT", age_sock)
        bus.subscribe("E_WAIT", udp_sink.address)
        expected = []
        for i in range(n):
            raise_retrying(bus.raise_event, "E_WAIT", {"seq": i})
            expected.append(encode_notification("E_WAIT", {"seq": i}))
        assert udp_sink.receive(n) == expected, "a down broker delays no datagram"
        waiting = wait_for(
            lambda: (r := destination_stats(bus, "E_WAIT", keep_sock))["relayed"] == n and r
        )
        assert waiting and waiting["sent"] == 0 and waiting["pending"] == n, waiting
        assert not _connected(bus, 0) and not _connected(bus, 1)
        aged = wait_for(
            lambda: (r := destination_stats(bus, "E_WAIT", age_sock))["stale"] == n and r,
            timeout=20,
        )
        assert aged, destination_stats(bus, "E_WAIT", age_sock)
        assert aged["dropped"] == n and aged["sent"] == 0 and aged["pending"] == 0, aged
        fresh_broker.restart()
        assert [d.body for d in keeper.wait_for(n, timeout=60)] == expected
        assert wait_for(lambda: _connected(bus, 1), timeout=30), "the aged relay reconnects"
        late = [encode_notification("E_WAIT", {"late": i}) for i in range(10)]
        for i in range(10):
            raise_retrying(bus.raise_event, "E_WAIT", {"late": i})
        assert [d.body for d in ager.wait_for(10, timeout=30)] == late, "nothing stale went"
        assert [d.body for d in keeper.wait_for(n + 10, timeout=30)] == expected + late
        assert _quiet(ager, 10) and _quiet(keeper, n + 10, wait=0)
        assert wait_for(lambda: all(r["pending"] == 0 for r in bus.stats()["destinations"]))
        check_accounting(bus.stats())
        row = destination_stats(bus, "E_WAIT", keep_sock)
        assert row["sent"] == n + 10 and row["republished"] == 0, row
        assert bus.segment.words[bus.segment.layout.relay_word(0) + R_CONNECTS] >= 2


@pytest.mark.timeout(180)
def test_relay_killed_is_respawned_with_its_counts_repaired(
    broker: PrivateBroker, consumers: list[Consumer]
) -> None:
    """A relay SIGKILLed mid-stream: the hub starts a new one, what the dead
    one held is counted dropped, delivery goes on, every message the queue
    gets is unique and in order, and the counters add up."""
    key = _queue_name("kill")
    consumer = broker.consume(key)
    consumers.append(consumer)
    sock = broker.socket(key)
    n = 4000
    with EventBus() as bus:
        bus.publish_event("E_KILL")
        bus.subscribe("E_KILL", sock)
        first = _relay_process(bus)
        for i in range(n):
            raise_retrying(bus.raise_event, "E_KILL", {"seq": i})
            if i == n // 2:
                first.kill()
        assert wait_for(lambda: _relay_pid(bus) not in (0, first.pid), timeout=20), (
            "the hub did not start a new relay"
        )
        assert _relay_rows(bus) == ["relay 0"]
        assert wait_for(lambda: _connected(bus, 0), timeout=20)
        total = n + 100
        for i in range(n, total):  # after the respawn, for sure
            raise_retrying(bus.raise_event, "E_KILL", {"seq": i})
        row = wait_for(
            lambda: (
                (r := destination_stats(bus, "E_KILL", sock))["relayed"] == total
                and r["pending"] == 0
                and r
            ),
            timeout=30,
        )
        assert row, destination_stats(bus, "E_KILL", sock)
        consumer.wait_for(row["sent"], timeout=30)
        time.sleep(0.5)
        seqs = [orjson.loads(body)["params"]["seq"] for body in consumer.bodies()]
        assert seqs == sorted(set(seqs)), "duplicated or out of order"
        assert set(range(n, total)) <= set(seqs), "delivery did not resume"
        # What the queue got: everything confirmed, and maybe some the dead
        # relay published but never saw confirmed (counted dropped).
        assert row["sent"] <= len(seqs) <= row["sent"] + row["dropped"], (len(seqs), row)
        assert row["routed"] == row["handed"] == total, row
        check_accounting(bus.stats())


@pytest.mark.timeout(120)
def test_hub_starts_a_relay_per_broker_destination_and_stops_it_when_unused(
    broker: PrivateBroker,
) -> None:
    """One relay per distinct broker destination, started when its first
    subscription comes, gone when its last one goes; ``ps`` lists them."""
    a, b = broker.socket(_queue_name("a")), broker.socket(_queue_name("b"))
    with EventBus() as bus:
        bus.publish_event("E_1")
        bus.publish_event("E_2")
        assert _relay_rows(bus) == []
        bus.subscribe("E_1", a)
        bus.subscribe("E_2", a)  # the same destination: the same relay
        relay_a = _relay_process(bus, 0)
        bus.subscribe("E_2", b)
        relay_b = _relay_process(bus, 1)
        assert wait_for(lambda: _relay_rows(bus) == ["relay 0", "relay 1"]), _relay_rows(bus)
        bus.unsubscribe("E_1", a)
        time.sleep(0.3)
        assert not gone(relay_a), "E_2 still uses it"
        bus.unsubscribe("E_2", a)
        assert wait_for(lambda: gone(relay_a)), "its slot is free: it stops"
        assert wait_for(lambda: _relay_rows(bus) == ["relay 1"]), _relay_rows(bus)
        assert not gone(relay_b)
    assert gone(relay_b)
