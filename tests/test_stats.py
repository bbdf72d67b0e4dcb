"""mpevent.shm.counters: reading an age histogram, and the destination rows
summed from the senders' counter blocks in a real segment."""

from __future__ import annotations

from mpevent.processes.sender.accounts import SubscriptionStats
from mpevent.protocol.destination import parse_destination
from mpevent.protocol.registry import Registry
from mpevent.shm.counters import DESTINATION_COUNTERS, age_bound_us, destination_counters
from mpevent.shm.layout import AGE_BUCKETS, D_ID, Geometry
from mpevent.shm.segment import Segment
from mpevent.shm.table import store_registry


def hist(**buckets: int) -> list[int]:
    out = [0] * AGE_BUCKETS
    for key, n in buckets.items():
        out[int(key[1:])] = n
    return out


def test_empty_histogram_has_no_bound():
    assert age_bound_us([0] * AGE_BUCKETS, 0.99) is None


def test_bound_is_the_upper_end_of_the_bucket_holding_the_quantile():
    h = hist(b3=90, b10=9, b12=1)  # 90 under 8 us, 9 under 1024 us, 1 under 4096 us
    assert age_bound_us(h, 0.5) == 8
    assert age_bound_us(h, 0.9) == 8
    assert age_bound_us(h, 0.95) == 1024
    assert age_bound_us(h, 0.99) == 1024
    assert age_bound_us(h, 1.0) == 4096


def test_the_open_last_bucket_gives_its_lower_end():
    h = hist(b0=1, b15=99)
    assert age_bound_us(h, 0.5) == 1 << 14
    assert age_bound_us(h, 0.001) == 1  # the first event was under 1 us


def test_destination_rows_read_every_counter_from_the_senders_blocks():
    """pending is a word of its own, summed over senders like the others,
    never worked out from the rest: a row whose words do not add up shows
    it, so the accounting equation checks something."""
    seg = Segment.create(Geometry(lanes=1, lane_size=4096, senders=2, max_events=2, max_subs=4))
    try:
        registry = Registry(2, 4)
        registry.declare("E_A")
        registry.subscribe("E_A", parse_destination("udp:127.0.0.1:9000"), None, 0)
        store_registry(seg, registry, 0)
        (route,) = registry.snapshot().routes
        for sender, (routed, sent, pending) in enumerate([(10, 6, 4), (7, 2, 1)]):
            stats = SubscriptionStats(seg, sender, route.slot, route.sub_id)
            stats.routed, stats.sent, stats.dropped, stats.pending = routed, sent, 0, pending
            stats.store(seg.words)
        (row,) = destination_counters(seg)
        assert row["socket"] == "udp:127.0.0.1:9000" and row["event"] == "E_A"
        assert (row["routed"], row["sent"], row["pending"]) == (17, 8, 5)
        assert row["routed"] != row["sent"] + row["failed"] + row["dropped"] + row["pending"]
        # A sender whose block belongs to a former subscription of the slot is not summed.
        seg.words[seg.layout.dest_counter_word(1, route.slot) + D_ID] = route.sub_id + 1
        (row,) = destination_counters(seg)
        assert (row["routed"], row["sent"], row["pending"]) == (10, 6, 4)
        assert set(row) == {"event", "socket", *DESTINATION_COUNTERS}
    finally:
        seg.close()


def test_a_virtual_subscription_with_a_broker_member_sums_senders_and_relay_rows():
    """A virtual subscription's row is its members' summed; a broker
    member's fates come from its relay's row, and what its senders handed
    and the relay has not taken yet is in_handoff, inside pending."""
    geometry = Geometry(lanes=1, lane_size=4096, max_events=2, max_subs=4, relays=2)
    seg = Segment.create(geometry)
    try:
        registry = Registry(2, 4, max_relays=2)
        registry.declare("E_A")
        broker = parse_destination("rabbitmq:127.0.0.1:5672/q")
        dest = parse_destination(f"virtual:PARALLEL udp:127.0.0.1:9000 {broker}")
        registry.subscribe("E_A", dest, None, 0)
        store_registry(seg, registry, 0)
        (route,) = registry.snapshot().routes
        assert registry.relays == [broker, None]
        # PARALLEL members are kept in a canonical order: find each one's index.
        at_udp = [str(m) for m in dest.members()].index("udp:127.0.0.1:9000")
        at_broker = 1 - at_udp
        udp = SubscriptionStats(seg, 0, route.slot, route.sub_id, at_udp)
        udp.routed, udp.sent = 10, 10
        handed = SubscriptionStats(seg, 0, route.slot, route.sub_id, at_broker)
        handed.routed, handed.handed, handed.dropped = 10, 9, 1
        relay_row = seg.layout.relay_row(0)
        relay = SubscriptionStats(seg, relay_row, route.slot, route.sub_id, at_broker)
        relay.routed, relay.sent, relay.stale, relay.dropped, relay.pending = 7, 5, 1, 1, 1
        for stats in (udp, handed, relay):
            stats.store(seg.words)
        (row,) = destination_counters(seg)
        first, second = row["members"][at_udp], row["members"][at_broker]
        assert first["socket"] == "udp:127.0.0.1:9000" and first["sent"] == 10
        assert (second["relayed"], second["in_handoff"], second["sent"]) == (7, 2, 5)
        assert second["pending"] == 1 + 2 and second["dropped"] == 1 + 1
        for counts in (first, second, row):
            assert counts["routed"] == (
                counts["sent"] + counts["failed"] + counts["dropped"] + counts["pending"]
            )
        assert row["routed"] == 20 and row["sent"] == 15
        # The relay frees its slot when the last subscription using it goes.
        registry.unsubscribe("E_A", dest)
        assert registry.relays == [None, None]
    finally:
        seg.close()
