"""Subscribers that are dead, missing, stuck or slow: what the bounded
per-destination backlog takes, what it drops and counts, and what such a
subscriber costs the others (nothing: no event lost, no CPU spent spinning).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from support import (
    UNIX_QLEN,
    Collector,
    Kids,
    UnixSink,
    check_accounting,
    check_stream,
    destination_stats,
    drained,
    raise_retrying,
    ring_empty,
    sender_processes,
    wait_for,
)

from mpevent import EventBus, encode_notification
from mpevent.shm.layout import S_LOOPS

# --- dead, missing and stuck destinations -----------------------------------

DEAD_N = 5000
SMALL_BACKLOG = 100


@pytest.mark.timeout(90)
def test_dead_missing_and_stuck_destinations_cost_the_others_nothing(
    kids: Kids, tmp_path: Path, udp_sink, unix_sink
) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    dead_udp = f"udp:127.0.0.1:{probe.getsockname()[1]}"
    probe.close()  # nobody listens there now
    missing = f"unix:{tmp_path / 'missing.sock'}"
    stuck = UnixSink(tmp_path / "stuck.sock")  # bound, never read
    expected = {"E_DEAD": [encode_notification("E_DEAD", {"seq": i}) for i in range(DEAD_N)]}
    collectors = [
        Collector(kids, udp_sink, tmp_path / "udp.bin", expect=DEAD_N),
        Collector(kids, unix_sink, tmp_path / "unix.bin", expect=DEAD_N),
    ]
    try:
        with EventBus(backlog=SMALL_BACKLOG) as bus:
            bus.publish_event("E_DEAD")
            for address in (dead_udp, missing, stuck.address, udp_sink.address, unix_sink.address):
                bus.subscribe("E_DEAD", address)
            healthy_unix = unix_sink.address
            # The backlog is per destination and bus-wide: with 100 slots, even
            # a healthy UNIX reader (queue of 10) drops when 5000 events come
            # in one burst. A subscriber that "keeps up on average" sees
            # bursts smaller than its backlog: raise in chunks of 50 and let
            # the healthy UNIX reader catch up in between.
            for start in range(0, DEAD_N, 50):
                for seq in range(start, start + 50):
                    raise_retrying(bus.raise_event, "E_DEAD", {"seq": seq})
                wait_for(
                    lambda: (
                        drained(bus)
                        and destination_stats(bus, "E_DEAD", healthy_unix)["pending"] == 0
                    ),
                    timeout=5,
                    interval=0.001,
                )
            for collector, sink in zip(collectors, (udp_sink, unix_sink), strict=True):
                check_stream(collector.collected(), expected, sink.address, sink)

            def settled() -> bool:
                rows = bus.stats()["destinations"]
                return drained(bus) and all(r["routed"] == DEAD_N for r in rows)

            assert wait_for(settled), bus.stats()
            stats = bus.stats()
            check_accounting(stats, nothing_pending=False)  # the stuck one's backlog holds some
            e = stats["events"]["E_DEAD"]
            assert e["enqueued"] == e["dispatched"] == DEAD_N, e
            rows = {r["socket"]: r for r in stats["destinations"]}
            assert set(rows) == {
                dead_udp,
                missing,
                stuck.address,
                *(s.address for s in (udp_sink, unix_sink)),
            }

            row = rows[dead_udp]  # ICMP port unreachable comes back as ECONNREFUSED
            assert row["failed"] > 0 and row["econnrefused"] > 0, row
            assert row["dropped"] == 0 and row["pending"] == 0, row

            row = rows[missing]  # nothing to connect to: every send fails
            assert row["failed"] == row["routed"] == DEAD_N, row
            assert row["enoent"] + row["econnrefused"] == row["failed"], row
            assert row["enoent"] > 0, row
            assert row["sent"] == row["dropped"] == row["pending"] == 0, row

            row = rows[stuck.address]  # queue full, backlog full, then drops
            assert row["failed"] == 0, row
            assert row["sent"] <= UNIX_QLEN + 2, row
            assert row["pending"] == SMALL_BACKLOG, row  # full, and nothing drains it
            assert row["sent"] + row["pending"] + row["dropped"] == DEAD_N, row

            size = sum(len(d) for d in expected["E_DEAD"])
            for sink in (udp_sink, unix_sink):
                row = rows[sink.address]
                assert row["sent"] == DEAD_N and row["bytes"] == size, row
                assert row["failed"] == row["dropped"] == row["pending"] == 0, row
    finally:
        stuck.close()


@pytest.mark.timeout(60)
def test_stuck_subscriber_does_not_keep_the_sender_busy(tmp_path: Path) -> None:
    """A receiver that never reads must be waited for with poll(POLLOUT),
    not by spinning: on a 2-core box a busy sender takes a core from the
    producers and the other subscribers, and a subscriber must never cost
    the others anything."""
    stuck = UnixSink(tmp_path / "stuck.sock")
    try:
        with EventBus(backlog=SMALL_BACKLOG) as bus:
            bus.publish_event("E_STUCK")
            bus.subscribe("E_STUCK", stuck.address)
            for seq in range(2 * SMALL_BACKLOG):
                bus.raise_event("E_STUCK", {"seq": seq})

            def settled() -> bool:
                row = destination_stats(bus, "E_STUCK", stuck.address)
                return ring_empty(bus) and row["routed"] == 2 * SMALL_BACKLOG

            assert wait_for(settled), bus.stats()
            assert destination_stats(bus, "E_STUCK", stuck.address)["pending"] > 0
            (sender,) = sender_processes(bus, 1)
            # Two measures: CPU time (what it costs the box), and the sender's
            # loop counter, which a spinning sender drives up even when other
            # processes leave it little CPU (a sender waiting for a receiver
            # loops ~50 times a second: it wakes at least every MAX_SLEEP).
            loops_at = bus.segment.layout.sender_word(0) + S_LOOPS
            loops = bus.segment.words[loops_at]
            before, start = sender.cpu_times(), time.monotonic()
            time.sleep(1.5)
            loops = bus.segment.words[loops_at] - loops
            after, elapsed = sender.cpu_times(), time.monotonic() - start
            busy = (after.user + after.system - before.user - before.system) / elapsed
            assert busy < 0.5 and loops / elapsed < 2000, (
                f"the sender used {busy:.0%} of a CPU and ran {loops / elapsed:.0f} loops/s "
                f"for {elapsed:.1f} s with nothing to do but wait for a stuck receiver: "
                "it spins instead of sleeping in poll()"
            )
    finally:
        stuck.close()


# --- a bursty UNIX reader and a 100 000-event burst ---------------------------

BURST_N = 100_000


@pytest.mark.timeout(120)
def test_bursty_unix_reader_gets_every_event_of_a_big_burst(
    kids: Kids, tmp_path: Path, unix_sink
) -> None:
    assert UNIX_QLEN <= 64  # the point: the receiver's queue is tiny
    expected = {"E_BURST": [encode_notification("E_BURST", {"seq": i}) for i in range(BURST_N)]}
    collector = Collector(
        kids, unix_sink, tmp_path / "burst.bin", expect=BURST_N, burst_pause=0.001, idle=20
    )
    # A backlog big enough in count and in bytes for the whole burst.
    with EventBus(lanes=4, lane_size=8 << 20, backlog=200_000, backlog_bytes=32 << 20) as bus:
        bus.publish_event("E_BURST")
        bus.subscribe("E_BURST", unix_sink.address)
        refused = 0
        most_pending = 0
        for seq in range(BURST_N):
            refused += raise_retrying(bus.raise_event, "E_BURST", {"seq": seq})
            if seq % 10_000 == 9_999:
                row = destination_stats(bus, "E_BURST", unix_sink.address)
                most_pending = max(most_pending, row["pending"])
        check_stream(collector.collected(timeout=100), expected, "E_BURST")

        def delivered() -> bool:
            row = destination_stats(bus, "E_BURST", unix_sink.address)
            return drained(bus) and row["sent"] == BURST_N

        wait_for(delivered, timeout=10)
        stats = bus.stats()
        check_accounting(stats)
        e = stats["events"]["E_BURST"]
        assert e["enqueued"] == e["dispatched"] == BURST_N, e
        assert e["dropped"] == refused == 0, (e, refused)  # 8 MiB lane: never full
        row = destination_stats(bus, "E_BURST", unix_sink.address)
        assert row["dropped"] == 0 and row["failed"] == 0, row
        assert row["routed"] == BURST_N, row
        # The reader was slower than the burst: the backlog did the work.
        assert most_pending > UNIX_QLEN, most_pending
        # Every datagram has reached the reader (checked above), so the
        # counters must say so too once the bus is quiet.
        assert row["sent"] == BURST_N and row["pending"] == 0, row
