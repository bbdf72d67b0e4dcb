"""Degraded modes of the ring: a full lane refuses at once and recovers, a
process that finds every lane owned shares a lane (delivering) until one is
freed, and events whose subscribers left before sending are counted as
unrouted. (More processes than lanes, in depth: test_overflow_lanes.py.)
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from support import (
    Kids,
    backlogs_empty,
    check_accounting,
    check_stream,
    destination_stats,
    drained,
    event_stats,
    sender_processes,
    wait_for,
)

from mpevent import EventBus, encode_notification

# --- ring full --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_full_lane_refuses_counts_and_recovers(udp_sink) -> None:
    with EventBus(lanes=2, lane_size=4096) as bus:
        bus.publish_event("E_FULL")
        bus.subscribe("E_FULL", udp_sink.address)
        warm = encode_notification("E_FULL", {"seq": -1})
        assert bus.raise_event("E_FULL", {"seq": -1})  # the sender is alive and idle
        assert udp_sink.receive(1) == [warm]
        assert wait_for(lambda: drained(bus))
        (sender,) = sender_processes(bus, 1)

        os.kill(sender.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            assert wait_for(lambda: sender.status() == psutil.STATUS_STOPPED), sender.status()
            accepted = refused = 0
            slowest = 0.0
            while accepted < 10_000:
                t0 = time.perf_counter()
                ok = bus.raise_event("E_FULL", {"seq": accepted})
                slowest = max(slowest, time.perf_counter() - t0)
                if not ok:
                    refused += 1
                    break
                accepted += 1
            assert refused == 1, f"a 4 KiB lane took {accepted} events without filling up"
            for _ in range(99):  # still full: every further call is refused at once
                t0 = time.perf_counter()
                assert bus.raise_event("E_FULL", {"seq": "no"}) is False
                slowest = max(slowest, time.perf_counter() - t0)
                refused += 1
            assert slowest < 1.0, f"raise_event blocked for {slowest:.3f} s on a full lane"
            e = event_stats(bus, "E_FULL")
            assert e["dropped"] == refused == 100, e
            assert e["enqueued"] == accepted + 1, e
            assert e["raised"] == accepted + 1 + refused, e  # every call counted
            assert e["dispatched"] == 1, e  # nothing moved while the sender was stopped
            time.sleep(0.3)  # the records wait at least this long
        finally:
            os.kill(sender.pid, signal.SIGCONT)
            stopped_for = time.monotonic() - stopped_at

        expected = {"E_FULL": [encode_notification("E_FULL", {"seq": i}) for i in range(accepted)]}
        got = udp_sink.receive(accepted, timeout=15) + udp_sink.quiet(0.3)
        check_stream(got, expected, "E_FULL after SIGCONT", udp_sink)
        assert wait_for(lambda: drained(bus) and backlogs_empty(bus)), bus.stats()
        stats = bus.stats()
        check_accounting(stats)
        assert stats["events"]["E_FULL"]["dispatched"] == accepted + 1
        row = destination_stats(bus, "E_FULL", udp_sink.address)
        assert row["sent"] == accepted + 1 and row["pending"] == 0, row
        # The sender saw how long they waited: every dispatched event is in
        # the age histogram, the ones held up by SIGSTOP among the oldest.
        (ages,) = stats["senders"]
        assert sum(ages["age_hist"]) == accepted + 1, ages
        assert 0.3e6 <= ages["age_max_us"] <= (stopped_for + 5) * 1e6, (ages, stopped_for)
        assert sum(ages["age_hist"][-1:]) >= accepted - 1, ages  # all older than 16 ms
        # The lane has room again.
        assert bus.raise_event("E_FULL", {"seq": "after"})
        assert udp_sink.receive(1) == [encode_notification("E_FULL", {"seq": "after"})]


@pytest.mark.timeout(60)
def test_every_lane_owned_shares_a_lane_and_delivers_until_one_is_free(
    kids: Kids, udp_sink
) -> None:
    """The degraded mode: a process that finds every lane owned writes to a
    shared lane (its calls delivered and counted there: enqueued,
    no_subscriber) and gets a lane of its own once one is freed (its owner
    died; it looks again at most every second)."""
    with EventBus(lanes=1) as bus:
        bus.publish_event("E_OWNED")
        bus.publish_event("E_NOBODY")
        bus.subscribe("E_OWNED", udp_sink.address)
        hold_r, hold_w = os.pipe()
        ready_r, ready_w = os.pipe()

        def holder() -> int:
            os.close(hold_w)
            os.close(ready_r)
            assert bus.raise_event("E_OWNED", {"from": "holder"})  # claims the only lane
            os.write(ready_w, b"x")
            os.read(hold_r, 1)  # until the test closes its end
            return 0

        pid = kids.fork(holder)
        os.close(hold_r)
        os.close(ready_w)
        try:
            assert os.read(ready_r, 1) == b"x"
            for i in range(5):
                assert bus.raise_event("E_OWNED", {"seq": i}) is True
                assert bus.raise_event("E_NOBODY", {"seq": i}) is False
            shared = bus.segment.layout.shared_lanes()
            assert bus.producer.shared and bus.producer.lane in shared, bus.producer.lane
            mine = [encode_notification("E_OWNED", {"seq": i}) for i in range(5)]
            holders = [encode_notification("E_OWNED", {"from": "holder"})]
            got = udp_sink.receive(6)
            check_stream(got, {"mine": mine, "holder": holders}, "E_OWNED shared", udp_sink)
            owned = event_stats(bus, "E_OWNED")
            assert owned["enqueued"] == 6 and owned["dropped"] == 0, owned
            assert event_stats(bus, "E_NOBODY")["no_subscriber"] == 5
            assert bus.stats()["shared_lane_writers"] == 1
        finally:
            os.close(ready_r)
            os.close(hold_w)  # the holder exits; the hub frees its lane
        assert kids.wait(pid) == 0
        assert wait_for(
            lambda: bus.raise_event("E_OWNED", {"seq": "after"}) and not bus.producer.shared,
            timeout=15,
        )
        assert bus.producer.lane == 0
        afters = udp_sink.receive(100, timeout=1)
        assert afters and set(afters) == {encode_notification("E_OWNED", {"seq": "after"})}
        assert wait_for(lambda: drained(bus) and backlogs_empty(bus)), bus.stats()
        stats = bus.stats()
        check_accounting(stats)
        assert stats["events"]["E_OWNED"]["enqueued"] == 6 + len(afters), stats


@pytest.mark.timeout(60)
def test_events_whose_subscribers_left_before_sending_count_as_unrouted(udp_sink) -> None:
    """Taken from the lane after their only subscription ended: counted as
    unrouted, never sent; the other event of the same batches still goes."""
    with EventBus(lanes=2) as bus:
        bus.publish_event("E_LEFT")
        bus.publish_event("E_STAYS")
        bus.subscribe("E_LEFT", udp_sink.address)
        bus.subscribe("E_STAYS", udp_sink.address)
        assert bus.raise_event("E_STAYS", {"seq": -1})
        assert udp_sink.receive(1) == [encode_notification("E_STAYS", {"seq": -1})]
        assert wait_for(lambda: drained(bus))
        (sender,) = sender_processes(bus, 1)
        os.kill(sender.pid, signal.SIGSTOP)
        try:
            assert wait_for(lambda: sender.status() == psutil.STATUS_STOPPED), sender.status()
            for i in range(10):
                assert bus.raise_event("E_LEFT", {"seq": i})
                assert bus.raise_event("E_STAYS", {"seq": i})
            bus.subscribe("E_LEFT", udp_sink.address, expire=0)  # unsubscribe
        finally:
            os.kill(sender.pid, signal.SIGCONT)
        got = udp_sink.receive(10) + udp_sink.quiet(0.3)
        assert got == [encode_notification("E_STAYS", {"seq": i}) for i in range(10)]
        assert wait_for(lambda: drained(bus) and backlogs_empty(bus)), bus.stats()
        stats = bus.stats()
        check_accounting(stats)
        left = stats["events"]["E_LEFT"]
        assert left["enqueued"] == left["unrouted"] == 10 and left["dispatched"] == 0, left
        assert stats["events"]["E_STAYS"]["dispatched"] == 11
