"""Section 1, producer cost: what one call costs the process that raises.

Each call is timed on its own with ``perf_counter_ns`` (net of the timer's
own cost, measured the same way and printed): ``raise_event`` with 0, 1, 8
and 64 UDP subscribers, against the inline way OpenSIPS uses (orjson +
``sendto`` from the producer itself), ``multiprocessing.Queue.put`` and
``faster_fifo.Queue.put``. Cases are interleaved in rounds, shuffled per
round. Between samples the ring is left to drain and the queues are
emptied by their consumer processes, so every timed call takes the fast
path (it enqueues; nothing blocks). Also the CPU the producer process
spends per call, helper threads included (``multiprocessing.Queue``
pickles and writes in a feeder thread, after ``put`` returned).
"""

from __future__ import annotations

import contextlib
import operator
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson

from mpevent.api.bus import EventBus
from mpevent.tools.bench.bodies import queue_consumer
from mpevent.tools.bench.config import EVENT, PARAMS, Config
from mpevent.tools.bench.memory import MemoryMonitor
from mpevent.tools.bench.plumbing import (
    CTX,
    Spawner,
    closing_queue,
    make_queue,
    udp_addr,
    udp_socket,
)
from mpevent.tools.figures import median, ratio, summarize

COST_EVENTS = {0: "E_NOBODY", 1: "E_ONE", 8: "E_EIGHT", 64: "E_MANY"}


def _cost_label(case: str) -> str:
    if case.startswith("raise_"):
        n = int(case.split("_")[1])
        return f"raise_event, {n} subscriber{'' if n == 1 else 's'}"
    return {
        "inline": "inline orjson + sendto (OpenSIPS)",
        "mp_queue": "multiprocessing.Queue.put",
        "faster_fifo": "faster_fifo.Queue.put",
        "timer": "timer overhead (subtracted)",
    }[case]


def _timed_calls(fn: Callable[..., Any], args: tuple[Any, ...], n: int, out: list[int]) -> None:
    """Time ``n`` calls of ``fn(*args)`` one by one (every case uses this same loop)."""
    clock = time.perf_counter_ns
    append = out.append
    for _ in range(n):
        t0 = clock()
        fn(*args)
        append(clock() - t0)


def producer_cost(cfg: Config, monitor: MemoryMonitor, ff: Any, rng: random.Random) -> dict:
    """Per-call producer cost of every case, in interleaved, shuffled rounds."""
    subs_needed = max(cfg.cost_subscribers)
    sinks = [udp_socket(4 << 20) for _ in range(subs_needed)]
    addrs = [udp_addr(s) for s in sinks]
    for s in sinks:
        s.setblocking(False)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inline_target = sinks[0].getsockname()
    dumps = orjson.dumps
    item = (EVENT, PARAMS)
    samples: dict[str, list[int]] = {}
    monitor.watch(os.getpid(), "bench", "main")

    def inline(event: str, params: Any) -> None:
        out.sendto(dumps({"jsonrpc": "2.0", "method": event, "params": params}), inline_target)

    with contextlib.ExitStack() as stack:
        stack.callback(out.close)
        for s in sinks:
            stack.callback(s.close)
        bus = stack.enter_context(EventBus(senders=1))
        monitor.watch(bus.hub_pid, "mpevent", "hub")
        monitor.watch_children(bus.hub_pid, "mpevent", "sender", 1)
        cases: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
        for n in cfg.cost_subscribers:
            event = COST_EVENTS[n]
            bus.publish_event(event)
            for addr in addrs[:n]:
                bus.subscribe(event, addr, expire=None)
            cases[f"raise_{n}"] = (bus.raise_event, (event, PARAMS))
        cases["inline"] = (inline, (EVENT, PARAMS))
        cases["timer"] = (operator.is_, (EVENT, PARAMS))

        # Queues, each emptied by its own consumer process; a counter in
        # shared memory says when it has taken everything put so far. On the
        # way out each gets its end mark before the spawner reaps (LIFO).
        spawner = stack.enter_context(Spawner(monitor, "bench"))
        queues: dict[str, tuple[Any, Any, list[int]]] = {}
        for kind in ("mp_queue", "faster_fifo") if ff is not None else ("mp_queue",):
            q = stack.enter_context(closing_queue(make_queue(kind, ff), stop=1))
            counter = CTX.RawValue("Q", 0)
            spawner.start(
                "consumer", queue_consumer, q, kind == "faster_fifo", counter, pipeline=kind
            )
            queues[kind] = (q, counter, [0])  # [0]: how many were put
            cases[kind] = (q.put, (item,))

        bus.raise_event(COST_EVENTS[1], PARAMS)  # claim the lane outside the timing

        def settle() -> None:
            """Ring drained, sinks emptied, queues taken: every timed call takes the fast path."""
            deadline = time.monotonic() + 30
            while True:
                t = bus.stats()["totals"]
                done = t["dispatched"] + t["unrouted"] >= t["enqueued"]
                done = done and all(c.value >= p[0] for _, c, p in queues.values())
                if done or time.monotonic() > deadline:
                    break
                time.sleep(0.0005)
            for sink in sinks:
                try:
                    while sink.recv(65536):
                        pass
                except BlockingIOError:
                    pass

        names = list(cases)
        samples = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(cfg.cost_rounds):
            rng.shuffle(names)
            for name in names:
                settle()
                fn, args = cases[name]
                c0 = time.process_time_ns()
                _timed_calls(fn, args, cfg.cost_sample, samples[name])
                if name in queues:
                    _, counter, put = queues[name]
                    put[0] += cfg.cost_sample
                    if name == "mp_queue":
                        # Its feeder thread pickles and writes to the pipe later, in
                        # this process: count that CPU too (a cheap wait meanwhile).
                        deadline = time.monotonic() + 30
                        while counter.value < put[0] and time.monotonic() < deadline:
                            time.sleep(50e-6)
                cpu[name].append((time.process_time_ns() - c0) / cfg.cost_sample)
            monitor.sample()
        settle()
        totals = bus.stats()["totals"]

    timer = median(samples["timer"])
    timer_cpu = median(cpu["timer"])
    results = {
        name: {
            "label": _cost_label(name),
            **summarize(values, offset=timer),
            "cpu_ns": median(cpu[name]) - timer_cpu,
        }
        for name, values in samples.items()
        if name != "timer"
    }
    results["timer"] = {
        "label": _cost_label("timer"),
        **summarize(samples["timer"]),
        "cpu_ns": timer_cpu,
    }
    inline_med = results["inline"]["median"]
    for r in results.values():
        r["x_inline"] = ratio(r["median"], inline_med)
    return {
        "unit": "ns per call, wall clock (perf_counter_ns), net of the timer overhead; "
        "cpu_ns: CPU time of the whole producer process per call (its helper threads'"
        " deferred work included), median over rounds, net of the timer's",
        "timer_overhead_ns": timer,
        "rounds": cfg.cost_rounds,
        "calls_per_round": cfg.cost_sample,
        "cases": results,
        "bus_totals": totals,
    }
