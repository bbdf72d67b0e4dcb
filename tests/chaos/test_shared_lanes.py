"""Chaos: more producers than lanes, SIGKILLed at random moments under load.

Five producers on two dedicated lanes and one shared lane: three write under
the shared lane's lock at any time. Killing them at random lands inside that
lock, between a publish and its count, in a dedicated lane, or mid-move to a
lane freed by an earlier kill (``make chaos`` sets ``MPEVENT_CHAOS_ROUNDS``
for a long run). What must hold:

* nobody stalls: every replacement keeps raising, the bus drains;
* no corrupt or partial datagram, every producer's events in order, none
  twice, and none missing before its last (nothing but a kill stops them);
* the counters add up once the hub has reclaimed dead producers' lanes and
  repaired the shared lane's counts: ``enqueued = dispatched + unrouted +
  send_oversize``, with at most one repair per kill.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from support import Kids, drained, forks_from_threads, wait_for

from chaos.test_kills import ROUNDS, Sink, _produce
from mpevent import EventBus

pytestmark = forks_from_threads

PRODUCERS = 5


@pytest.mark.chaos
@pytest.mark.timeout(1800)
def test_kills_among_more_producers_than_lanes_lose_nothing(kids: Kids):
    rng = random.Random(int(os.environ.get("MPEVENT_CHAOS_SEED", "11")))
    sink = Sink()
    sink.start()
    kills = 0
    with EventBus(lanes=2, overflow_lanes=1, lane_size=1 << 17) as bus:
        bus.publish_event("E_CHAOS")
        bus.subscribe("E_CHAOS", sink.address, expire=None)
        producers: dict[int, int] = {}
        next_index = 0
        try:
            for _ in range(PRODUCERS):
                producers[kids.fork(_produce, bus, next_index)] = next_index
                next_index += 1
            for _ in range(2 * ROUNDS):
                time.sleep(rng.uniform(0.05, 0.3))
                pid = rng.choice(list(producers))
                os.kill(pid, signal.SIGKILL)
                assert kids.wait(pid, 10) == -signal.SIGKILL
                del producers[pid]
                kills += 1
                producers[kids.fork(_produce, bus, next_index)] = next_index
                next_index += 1
            time.sleep(0.2)
        finally:
            for pid in producers:
                os.kill(pid, signal.SIGKILL)
                kids.wait(pid, 10)
        kills += len(producers)
        # Drained, dead lanes reclaimed, the shared lane's counts repaired.
        assert wait_for(lambda: drained(bus), timeout=30), f"no drain or repair: {bus.stats()}"
        stats = bus.stats()
        dispatched = stats["events"]["E_CHAOS"]["dispatched"]
        wait_for(lambda: sink.received + sink.udp.kernel_drops() >= dispatched, timeout=10)
        time.sleep(0.2)  # anything more would be a duplicate
    sink.stop.set()
    sink.join()

    e = stats["events"]["E_CHAOS"]
    kernel_drops = sink.udp.kernel_drops()
    print(
        f"\nshared-lane chaos: killed producers={kills} raised={e['raised']} "
        f"enqueued={e['enqueued']} delivered={sink.received} dropped={e['dropped']} "
        f"repaired={stats['repaired']} shared_lane_writers={stats['shared_lane_writers']} "
        f"corrupt={sink.corrupt} sink kernel drops={kernel_drops}"
    )
    assert sink.corrupt == 0
    assert stats["shared_lane_writers"] >= PRODUCERS - 2, stats  # the shared lane was used
    assert e["lost"] == 0 and stats["repaired"] <= kills, stats
    assert sink.received + kernel_drops == e["dispatched"], (sink.received, kernel_drops, e)
    assert len(sink.by_producer) == next_index, sorted(sink.by_producer)
    for index, seqs in sink.by_producer.items():
        if kernel_drops:
            assert seqs == sorted(set(seqs)), f"producer {index}: out of order or twice"
        else:
            assert seqs == list(range(len(seqs))), f"producer {index}: gap, disorder or twice"
    sink.udp.close()
