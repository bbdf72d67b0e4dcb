"""Section 1, producer cost: what one call costs the process that raises.

Each call is timed on its own with ``perf_counter_ns`` (net of the timer's
own cost, measured the same way and printed): ``raise_event`` with 0, 1, 8
and 64 UDP subscribers, on each fast path this build has (the compiled one
and the pure-Python one beside it, :mod:`.extras`), and with every lane
owned by another process (a bus with one lane, held by a child: the raise
goes through the shared lanes). Against them: the inline way OpenSIPS uses
(orjson + ``sendto`` from the producer itself), ``orjson.dumps(params)``
alone (the floor: the encode every case pays), a pyzmq PUSH ``send``
without blocking (a PULL process drains it), a ``SimpleQueue.put`` for a
sender thread of the producer's own (``logging.QueueHandler``'s way),
``multiprocessing.Queue.put`` and ``faster_fifo.Queue.put``.

Cases are interleaved in rounds, shuffled per round. Between samples the
rings are left to drain and the queues emptied by their consumers, so
every timed call takes the fast path (it enqueues; nothing blocks). Also
the CPU the producer process spends per call, helper threads included: the
case waits for the work its calls left to a thread of this process
(``multiprocessing.Queue``'s feeder pickles and writes, pyzmq's I/O thread
writes, the sender thread encodes and sends) before it reads the clock.
"""

from __future__ import annotations

import contextlib
import operator
import os
import random
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from mpevent.api.bus import EventBus
from mpevent.tools.bench.bodies import SenderThread, hold_lane, queue_consumer, zmq_consumer
from mpevent.tools.bench.config import EVENT, EVENT_BYTES, PARAMS, PURE, Config
from mpevent.tools.bench.extras import Extras, raiser
from mpevent.tools.bench.memory import MemoryMonitor
from mpevent.tools.bench.plumbing import (
    CTX,
    Spawner,
    closing_queue,
    make_queue,
    udp_addr,
    udp_socket,
    zmq_close,
    zmq_endpoint,
    zmq_socket,
)
from mpevent.tools.figures import median, ratio, summarize

COST_EVENTS = {0: "E_NOBODY", 1: "E_ONE", 8: "E_EIGHT", 64: "E_MANY"}
SHARED = "shared"  # the case with every lane owned: raise_shared
SHARED_LANES = 1  # lanes of that case's bus; a child holds the one there is
READY_TIMEOUT = 30.0

LABELS = {
    "inline": "inline orjson + sendto (OpenSIPS)",
    "dumps": "orjson.dumps(params) alone (the floor)",
    "pyzmq": 'pyzmq PUSH send(name + b" " + dumps(params), NOBLOCK)',
    "thread": "SimpleQueue.put, sender thread (QueueHandler's way)",
    "mp_queue": "multiprocessing.Queue.put",
    "faster_fifo": "faster_fifo.Queue.put",
    "timer": "timer overhead (subtracted)",
}


def cost_label(case: str, compiled: bool | None = None) -> str:
    """The printed name of a case; ``compiled``: whether the default path is the compiled one."""
    if not case.startswith("raise_"):
        return LABELS[case]
    what = case.removeprefix("raise_").removesuffix(PURE)
    if what == SHARED:
        text = f"raise_event, every lane owned ({SHARED_LANES} lane, shared lanes)"
    else:
        n = int(what)
        text = f"raise_event, {n} subscriber{'' if n == 1 else 's'}"
    if case.endswith(PURE):
        return f"{text}, pure path"
    return f"{text}, compiled" if compiled else text


def _timed_calls(fn: Callable[..., Any], args: tuple[Any, ...], n: int, out: list[int]) -> None:
    """Time ``n`` calls of ``fn(*args)`` one by one (every case uses this same loop)."""
    clock = time.perf_counter_ns
    append = out.append
    for _ in range(n):
        t0 = clock()
        fn(*args)
        append(clock() - t0)


Cases = dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]


def time_rounds(
    cases: Cases,
    cfg: Config,
    rng: random.Random,
    settle: Callable[[], None],
    monitor: Any,
    after: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """``cfg.cost_rounds`` rounds of every case in a new random order, each
    case ``cfg.cost_sample`` calls timed one by one after ``settle()``: the
    samples (ns per call) and the process CPU per call of each round, by case.
    ``after(name)`` runs after a case's calls, untimed by the CPU figure too."""
    names = list(cases)
    samples: dict[str, list[int]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(cfg.cost_rounds):
        rng.shuffle(names)
        for name in names:
            settle()
            fn, args = cases[name]
            c0 = time.process_time_ns()
            _timed_calls(fn, args, cfg.cost_sample, samples[name])
            if after is not None:
                after(name)
            cpu[name].append((time.process_time_ns() - c0) / cfg.cost_sample)
        monitor.sample()
    settle()
    return samples, cpu


def net_of_timer(
    samples: dict[str, list[int]], cpu: dict[str, list[float]], label: Callable[[str], str]
) -> tuple[float, dict[str, dict[str, Any]]]:
    """Each case's summary net of the ``timer`` case (the cost of timing a
    call), and the timer's own: (timer median ns, results by case);
    ``label(case)`` is the printed name of each."""
    timer = median(samples["timer"])
    timer_cpu = median(cpu["timer"])
    results = {
        name: {
            "label": label(name),
            # A call cheaper than the timer's own reference call (a compiled
            # raise with nobody subscribed can be) is below what this method
            # resolves: it nets to 0, never to a negative cost.
            **summarize(max(v - timer, 0.0) for v in values),
            "cpu_ns": max(median(cpu[name]) - timer_cpu, 0.0),
        }
        for name, values in samples.items()
        if name != "timer"
    }
    results["timer"] = {
        "label": label("timer"),
        **summarize(samples["timer"]),
        "cpu_ns": timer_cpu,
    }
    return timer, results


class _Counted:
    """A case whose calls a consumer process completes, counting them in shared memory."""

    def __init__(self) -> None:
        self.counter = CTX.RawValue("Q", 0)
        self.put = 0

    def behind(self) -> bool:
        return self.counter.value < self.put

    def wait(self) -> None:
        """Until the consumer took every call: the deferred work of this process's
        helper thread is done, and its CPU counted (a cheap poll meanwhile)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while self.behind() and time.monotonic() < deadline:
            time.sleep(50e-6)


def producer_cost(cfg: Config, monitor: MemoryMonitor, extras: Extras, rng: random.Random) -> dict:
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
    monitor.watch(os.getpid(), "bench", "main")

    def inline(event: str, params: Any) -> None:
        out.sendto(dumps({"jsonrpc": "2.0", "method": event, "params": params}), inline_target)

    with contextlib.ExitStack() as stack:
        stack.callback(out.close)
        for s in sinks:
            stack.callback(s.close)
        bus = stack.enter_context(EventBus(senders=1))
        shared_bus = stack.enter_context(EventBus(senders=1, lanes=SHARED_LANES))
        for b in (bus, shared_bus):
            monitor.watch(b.hub_pid, "mpevent", "hub")
            monitor.watch_children(b.hub_pid, "mpevent", "sender", 1)
        for n in cfg.cost_subscribers:
            bus.publish_event(COST_EVENTS[n])
            for addr in addrs[:n]:
                bus.subscribe(COST_EVENTS[n], addr, expire=None)
        shared_bus.publish_event(COST_EVENTS[0])  # the lane holder's
        shared_bus.publish_event(COST_EVENTS[1])
        shared_bus.subscribe(COST_EVENTS[1], addrs[0], expire=None)

        # Every child first: a zmq context and the sender thread are made
        # after the last fork. On the way out (LIFO) the thread and the PUSH
        # socket are closed, the lane holder is told to go and each queue gets
        # its end mark before the spawner reaps.
        spawner = stack.enter_context(Spawner(monitor, "bench"))
        counted: dict[str, _Counted] = {}
        cases: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
        for kind in ("mp_queue", "faster_fifo") if extras.ff is not None else ("mp_queue",):
            q = stack.enter_context(closing_queue(make_queue(kind, extras.ff), stop=1))
            c = counted[kind] = _Counted()
            spawner.start(
                "consumer", queue_consumer, q, kind == "faster_fifo", c.counter, pipeline=kind
            )
            cases[kind] = (q.put, (item,))
        ready_r, ready_w = CTX.Pipe(duplex=False)
        stack.callback(ready_r.close)
        stack.callback(ready_w.close)
        stop = CTX.Event()
        args = (shared_bus, COST_EVENTS[0], ready_w, stop, cfg.run_timeout)
        spawner.start("lane holder", hold_lane, *args, pipeline="mpevent")
        stack.callback(stop.set)
        if spawner.receive(ready_r, READY_TIMEOUT) < 0:
            raise RuntimeError("the lane holder did not get the shared bus's lane")
        zmq = extras.zmq
        if zmq is not None:
            endpoint = zmq_endpoint()
            c = counted["pyzmq"] = _Counted()
            args = (zmq, endpoint, c.counter, ready_w)
            spawner.start("consumer", zmq_consumer, *args, pipeline="pyzmq")
            spawner.receive(ready_r, READY_TIMEOUT)  # bound
            ctx, push = zmq_socket(zmq, zmq.PUSH, endpoint, bind=False)
            stack.callback(zmq_close, ctx, push)
            stack.callback(push.send, b"")  # the consumer's end mark
            send, noblock = push.send, zmq.NOBLOCK

            def zmq_send(name: bytes, params: Any) -> None:
                send(name + b" " + dumps(params), noblock)

            cases["pyzmq"] = (zmq_send, (EVENT_BYTES, PARAMS))
        sender_thread = SenderThread(inline_target)
        stack.callback(sender_thread.close)
        cases["thread"] = (sender_thread.put, (item,))
        finish = {kind: c.wait for kind, c in counted.items() if kind != "faster_fifo"}
        finish["thread"] = sender_thread.flush

        for suffix, compiled in extras.paths.items():
            raise_event = raiser(bus, compiled)
            for n in cfg.cost_subscribers:
                cases[f"raise_{n}{suffix}"] = (raise_event, (COST_EVENTS[n], PARAMS))
            raise_event(COST_EVENTS[1], PARAMS)  # claim a lane outside the timing
            raise_shared = raiser(shared_bus, compiled)
            cases[f"raise_{SHARED}{suffix}"] = (raise_shared, (COST_EVENTS[1], PARAMS))
            raise_shared(COST_EVENTS[1], PARAMS)  # find every lane owned outside the timing
        cases["inline"] = (inline, (EVENT, PARAMS))
        cases["dumps"] = (dumps, (PARAMS,))
        cases["timer"] = (operator.is_, (EVENT, PARAMS))

        def settle() -> None:
            """Rings drained, sinks emptied, queues taken: every timed call takes the fast path."""
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline:
                drained = all(
                    t["dispatched"] + t["unrouted"] >= t["enqueued"]
                    for t in (b.stats()["totals"] for b in (bus, shared_bus))
                )
                if drained and not any(c.behind() for c in counted.values()):
                    break
                time.sleep(0.0005)
            for sink in sinks:
                try:
                    while sink.recv(65536):
                        pass
                except BlockingIOError:
                    pass

        def after(name: str) -> None:
            if name in counted:
                counted[name].put += cfg.cost_sample
            if name in finish:
                finish[name]()

        samples, cpu = time_rounds(cases, cfg, rng, settle, monitor, after)
        totals = bus.stats()["totals"]
        shared_totals = shared_bus.stats()["totals"]

    timer, results = net_of_timer(samples, cpu, partial(cost_label, compiled=extras.compiled))
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
        # Every lane owned: with shared lanes every raise enqueues; a build
        # without them refuses each (counted as dropped), and the figure is
        # then a refusal's cost.
        "shared_lanes": {
            "lanes": SHARED_LANES,
            "enqueued": shared_totals["enqueued"],
            "dropped": shared_totals["dropped"],
        },
    }
