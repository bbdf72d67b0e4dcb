"""Producers killed with SIGKILL at any instruction, mid-raise or right after
publishing a record: no corrupt or partial datagram, no gap in anyone's
stream, the senders keep going, and the counters still add up once the hub
has reclaimed the dead producer's lane.
"""

from __future__ import annotations

import os
import random
import select
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import (
    Collector,
    Kids,
    backlogs_empty,
    check_accounting,
    check_stream,
    event_stats,
    raise_retrying,
    ring_empty,
    sender_processes,
    wait_for,
)

from mpevent import EventBus, encode_notification

# --- producers killed with SIGKILL mid-raise --------------------------------

KILL_ROUNDS = 6


def _victim_params(r: int, seq: int) -> dict[str, Any]:
    return {"v": r, "seq": seq, "pad": "x" * (seq % 97)}  # varying sizes: lane wraps


def _survivor_params(seq: int) -> dict[str, Any]:
    return {"seq": seq, "pad": "s" * (seq % 61)}


def _victim(bus: EventBus, r: int, ready_w: int) -> int:
    seq = 0
    while True:  # until SIGKILL
        if bus.raise_event("E_VICTIM", _victim_params(r, seq)):
            if seq == 0:
                os.write(ready_w, b"!")
            seq += 1


def _survivor(bus: EventBus, stop_r: int, result_w: int) -> int:
    seq = 0
    while True:
        raise_retrying(bus.raise_event, "E_SURVIVOR", _survivor_params(seq))
        seq += 1
        if seq % 16 == 0:
            if select.select([stop_r], [], [], 0)[0]:
                break
            time.sleep(0.001)  # ~10k/s: the UDP reader must not fall behind
    os.write(result_w, str(seq).encode())
    return 0


@pytest.mark.timeout(90)
def test_producers_killed_mid_raise_corrupt_nothing(kids: Kids, tmp_path: Path, udp_sink) -> None:
    final = encode_notification("E_FINAL", {"final": True})
    collector = Collector(kids, udp_sink, tmp_path / "kill.bin", until=final, linger=0.5, idle=30)
    with EventBus() as bus:
        for name in ("E_VICTIM", "E_SURVIVOR", "E_FINAL"):
            bus.publish_event(name)
            bus.subscribe(name, udp_sink.address)
        senders_before = {p.pid for p in sender_processes(bus, 1)}
        stop_r, stop_w = os.pipe()
        result_r, result_w = os.pipe()
        survivor = kids.fork(_survivor, bus, stop_r, result_w)
        os.close(stop_r)
        os.close(result_w)
        try:
            for r in range(KILL_ROUNDS):
                ready_r, ready_w = os.pipe()
                pid = kids.fork(_victim, bus, r, ready_w)
                os.close(ready_w)
                try:
                    assert select.select([ready_r], [], [], 20)[0], "victim never raised"
                finally:
                    os.close(ready_r)
                time.sleep(random.uniform(0.0, 0.03))
                os.kill(pid, signal.SIGKILL)
                assert kids.wait(pid, 10) == -signal.SIGKILL
        finally:
            os.write(stop_w, b"stop")
            os.close(stop_w)
        assert kids.wait(survivor, 30) == 0
        with os.fdopen(result_r, "rb") as f:
            survivor_n = int(f.read())

        assert wait_for(lambda: ring_empty(bus), timeout=20), repr(bus.stats())
        assert bus.raise_event("E_FINAL", {"final": True})  # the senders keep going
        got = collector.collected(timeout=60)
        assert got and got[-1] == final, "the final event did not arrive (last)"
        assert got.count(final) == 1

        victims: dict[int, list[int]] = defaultdict(list)
        survivor_seqs = []
        for datagram in got[:-1]:
            note = orjson.loads(datagram)  # every datagram is whole, valid JSON ...
            params = note["params"]
            if note["method"] == "E_VICTIM":
                expect = encode_notification("E_VICTIM", _victim_params(params["v"], params["seq"]))
                victims[params["v"]].append(params["seq"])
            else:
                assert note["method"] == "E_SURVIVOR", note
                expect = encode_notification("E_SURVIVOR", _survivor_params(params["seq"]))
                survivor_seqs.append(params["seq"])
            assert datagram == expect  # ... and exactly a notification that was raised
        assert survivor_seqs == list(range(survivor_n)), (
            f"survivor: {len(survivor_seqs)} of {survivor_n}, "
            f"kernel drops {udp_sink.kernel_drops()}"
        )
        # A victim retries a refused event, so what it got out is a prefix of
        # its sequence: no gap, no duplicate, in order.
        for r, seqs in victims.items():
            assert seqs == list(range(len(seqs))), f"victim {r}: {len(seqs)} events, gaps/disorder"

        received = sum(len(s) for s in victims.values())

        def victim_counts_exact() -> bool:
            e = bus.stats()["events"]["E_VICTIM"]
            return e["enqueued"] == e["dispatched"]

        # A kill between publishing a record and counting it leaves the count
        # one short until the hub reclaims the dead producer's lane.
        assert wait_for(victim_counts_exact, timeout=10), bus.stats()
        assert wait_for(lambda: backlogs_empty(bus)), bus.stats()
        stats = bus.stats()
        check_accounting(stats)
        e = stats["events"]["E_VICTIM"]
        assert e["dispatched"] == received, (e, received)
        assert 0 <= stats["repaired"] <= KILL_ROUNDS, stats
        s = stats["events"]["E_SURVIVOR"]
        assert s["enqueued"] == s["dispatched"] == survivor_n, s
        assert stats["lost_in_flight"] == 0, stats
        assert {p.pid for p in sender_processes(bus, 1)} == senders_before


class _DieAfterPush:
    """Stands in for the producer's lane: pushes, then SIGKILLs its own
    process, as if the kill landed right after the record was published."""

    def __init__(self, lane: Any) -> None:
        self.lane = lane

    def push(self, *args: Any) -> bool:
        ok = self.lane.push(*args)
        os.kill(os.getpid(), signal.SIGKILL)
        return ok


def _killed_after_publish(bus: EventBus) -> int:
    producer = bus.producer
    assert bus.raise_event("E_KILL", {"seq": 0})  # claims a lane
    producer._lane = _DieAfterPush(producer._lane)
    bus.raise_event("E_KILL", {"seq": 1})
    return 3  # not reached


@pytest.mark.timeout(60)
def test_producer_killed_right_after_publishing_keeps_accounting_exact(
    kids: Kids, udp_sink
) -> None:
    """Crash safety and exact accounting together: a producer may die at any instruction,
    including between publishing a record and counting it as enqueued; the
    record is whole, so it is delivered, and the counters must still add up
    after the drain (enqueued = dispatched + unrouted + send_oversize)."""
    with EventBus() as bus:
        bus.publish_event("E_KILL")
        bus.subscribe("E_KILL", udp_sink.address)
        assert hasattr(bus.producer, "_lane"), "test relies on Producer._lane"
        assert kids.wait(kids.fork(_killed_after_publish, bus), 30) == -signal.SIGKILL
        expected = {"E_KILL": [encode_notification("E_KILL", {"seq": i}) for i in range(2)]}
        check_stream(udp_sink.receive(2) + udp_sink.quiet(), expected, "E_KILL", udp_sink)
        assert wait_for(lambda: ring_empty(bus))

        def reconciled() -> bool:
            e = event_stats(bus, "E_KILL")
            return e["enqueued"] == e["dispatched"] + e["unrouted"] + e["send_oversize"]

        wait_for(reconciled, timeout=10)  # the hub reclaims the dead producer's lane
        e = event_stats(bus, "E_KILL")
        assert bus.stats()["repaired"] == 1, "the hub restored the missing count"
        assert e["dispatched"] == 2, e
        assert e["enqueued"] == e["dispatched"] + e["unrouted"] + e["send_oversize"], (
            f"a producer killed between publishing a record and counting it leaves the "
            f"counters wrong for good: {e}"
        )
        assert e["raised"] == 2, e  # the child's two calls, one of them counted by the hub
        assert wait_for(lambda: backlogs_empty(bus)), bus.stats()
        check_accounting(bus.stats())
