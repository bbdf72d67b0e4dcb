"""Subscriptions over time and the end of the bus: expiry, refresh,
unsubscribe and permanent subscriptions; ``close()`` stopping the hub and
senders for the creator, and being a no-op in a forked child.
"""

from __future__ import annotations

import os
import select
import time
from typing import Any

import psutil
import pytest
from support import (
    Kids,
    drained,
    event_stats,
    gone,
    sender_processes,
    wait_for,
)

from mpevent import EventBus, encode_notification
from mpevent.shm.doorbell import IDLE_AFTER_NS, IDLE_MAX_SLEEP
from mpevent.shm.layout import S_LOOPS

# --- expiry -----------------------------------------------------------------


def _subscribers(bus: EventBus, event: str) -> list[dict[str, Any]]:
    return bus.subscribers(event)["Event"]["Subscribers"]


@pytest.mark.timeout(60)
def test_expire_refresh_unsubscribe_and_permanent(udp_sink) -> None:
    def note(n: int) -> bytes:
        return encode_notification("E_EXP", {"n": n})

    with EventBus() as bus:
        bus.publish_event("E_EXP")
        address = udp_sink.address

        # expire=1: delivered now, gone after a second.
        subscribed = time.monotonic()
        bus.subscribe("E_EXP", address, expire=1)
        (sub,) = _subscribers(bus, "E_EXP")
        assert sub["socket"] == address and sub["expire"] == 1, sub
        assert bus.raise_event("E_EXP", {"n": 1})
        assert udp_sink.receive(1) == [note(1)]
        assert wait_for(lambda: not _subscribers(bus, "E_EXP"), timeout=10)
        assert time.monotonic() - subscribed >= 0.9, "expired early"
        time.sleep(max(0.0, subscribed + 1.5 - time.monotonic()))
        assert bus.raise_event("E_EXP", {"n": 2}) is False
        assert udp_sink.quiet() == []

        # Subscribing again refreshes: 1.5 s after the first of two
        # 3-second subscriptions and 2.25 s after the second, the first
        # deadline has passed, the second has not.
        first = time.monotonic()
        bus.subscribe("E_EXP", address, expire=3)
        time.sleep(1.5)
        second = time.monotonic()
        bus.subscribe("E_EXP", address, expire=3)
        (sub,) = _subscribers(bus, "E_EXP")
        assert sub["expire"] == 3 and sub["ttl"] >= 2, sub
        time.sleep(max(0.0, second + 2.25 - time.monotonic()))
        assert time.monotonic() - first > 3.0
        assert bus.raise_event("E_EXP", {"n": 3}), "the refreshed subscription expired early"
        assert udp_sink.receive(1) == [note(3)]
        assert wait_for(lambda: not _subscribers(bus, "E_EXP"), timeout=10)
        assert bus.raise_event("E_EXP", {"n": 4}) is False

        # Permanent, then expire=0 unsubscribes.
        bus.subscribe("E_EXP", address, expire=None)
        (sub,) = _subscribers(bus, "E_EXP")
        assert sub["expire"] == "never" and sub["ttl"] == "never", sub
        everything = bus.subscribers()["Events"]
        assert [e["Subscribers"] for e in everything if e["name"] == "E_EXP"] == [[sub]]
        assert bus.raise_event("E_EXP", {"n": 5})
        assert udp_sink.receive(1) == [note(5)]
        bus.subscribe("E_EXP", address, expire=0)
        assert _subscribers(bus, "E_EXP") == []
        assert bus.raise_event("E_EXP", {"n": 6}) is False
        bus.subscribe("E_EXP", address, expire=None)
        bus.unsubscribe("E_EXP", address)
        assert _subscribers(bus, "E_EXP") == []
        assert bus.raise_event("E_EXP", {"n": 7}) is False
        assert udp_sink.quiet() == []

        assert wait_for(lambda: drained(bus))
        e = event_stats(bus, "E_EXP")
        assert e["enqueued"] == e["dispatched"] == 3, e
        assert e["no_subscriber"] == 4, e


# --- close ------------------------------------------------------------------


def _close_in_child(bus: EventBus) -> int:
    bus.close()  # a no-op outside the process that created the bus
    return 0 if bus.raise_event("E_CLOSE", {"from": "child"}) else 3


def _outlive_bus(bus: EventBus, go_r: int) -> int:
    if not select.select([go_r], [], [], 30)[0]:
        return 5
    # The parent closed the bus: raising must neither crash nor hang.
    return 0 if bus.raise_event("E_CLOSE", {"from": "orphan"}) is False else 4


@pytest.mark.timeout(60)
def test_close_stops_hub_and_senders_but_not_for_a_child(kids: Kids, udp_sink) -> None:
    bus = EventBus(senders=2)
    try:
        bus.publish_event("E_CLOSE")
        bus.subscribe("E_CLOSE", udp_sink.address)
        hub = psutil.Process(bus.hub_pid)
        senders = sender_processes(bus, 2)

        # close() in a forked child leaves the bus running for everyone else.
        assert kids.wait(kids.fork(_close_in_child, bus), 30) == 0
        assert not gone(hub) and not any(gone(s) for s in senders)
        assert bus.raise_event("E_CLOSE", {"from": "parent"})
        got = sorted(udp_sink.receive(2) + udp_sink.quiet())
        assert got == sorted(
            encode_notification("E_CLOSE", {"from": who}) for who in ("child", "parent")
        )
        assert bus.subscribers("E_CLOSE")["Event"]["Subscribers"]

        # A child still holding the bus after its creator closed it.
        go_r, go_w = os.pipe()
        orphan = kids.fork(_outlive_bus, bus, go_r)
        os.close(go_r)
        try:
            bus.close()
            assert gone(hub), "hub still running after close()"
            assert wait_for(lambda: all(gone(s) for s in senders)), senders
        finally:
            os.write(go_w, b"go")
            os.close(go_w)
        assert kids.wait(orphan, 30) == 0
        assert udp_sink.quiet() == []
        bus.close()  # idempotent
    finally:
        bus.close()

    # The with-block does the same.
    with EventBus() as bus2:
        hub2 = psutil.Process(bus2.hub_pid)
        senders2 = sender_processes(bus2, 1)
    assert gone(hub2)
    assert wait_for(lambda: all(gone(s) for s in senders2)), senders2


@pytest.mark.timeout(60)
def test_an_idle_sender_wakes_a_few_times_a_second_and_still_answers_at_once(udp_sink) -> None:
    """Idle (nothing raised for a while), a sender sleeps up to IDLE_MAX_SLEEP
    between looks, not MAX_SLEEP: a few loops a second, not ~50 plus naps;
    and a raised event still wakes it through the doorbell at once."""
    with EventBus() as bus:
        bus.publish_event("E_IDLE")
        bus.subscribe("E_IDLE", udp_sink.address)
        loops_at = bus.segment.layout.sender_word(0) + S_LOOPS
        time.sleep(IDLE_AFTER_NS / 1e9 + 0.5)  # idle long enough
        for _attempt in range(3):  # a busy machine may delay a wake-up: look again
            before, start = bus.segment.words[loops_at], time.monotonic()
            time.sleep(2.0)
            rate = (bus.segment.words[loops_at] - before) / (time.monotonic() - start)
            if rate <= 3 / IDLE_MAX_SLEEP:
                break
        assert rate <= 3 / IDLE_MAX_SLEEP, f"an idle sender looped {rate:.0f} times a second"
        assert bus.raise_event("E_IDLE", {"n": 1})
        assert udp_sink.receive(1, timeout=IDLE_MAX_SLEEP * 4) == [
            encode_notification("E_IDLE", {"n": 1})
        ]
