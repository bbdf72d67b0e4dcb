"""Benchmark: mpevent against the inline way and a multiprocessing.Queue pipeline.

Run with ``python -m mpevent.bench`` (``--quick`` for a short run). Every
figure is measured in the same run, side by side, and reported as a ratio:
the machine is shared and absolute times drift between runs.

1. Producer cost per call, median over samples of ``SAMPLE`` calls:
   ``raise_event`` with 0, 1 and 64 UDP subscribers, against the inline way
   OpenSIPS uses (build the notification with orjson and ``sendto`` it from
   the producer itself). Between samples the ring is left to drain, so every
   timed call enqueues (the cost of the fast path, not of a full ring).
2. End-to-end delivered events per second: 2 producer processes, 1 sender,
   a UDP sink process that reads everything, against a
   ``multiprocessing.Queue`` pipeline doing the same work (producers put, one
   process gets, encodes, sends). Producers retry when the ring is full, so
   every event is delivered: the figure is the throughput at which nothing
   is lost, and delivered/raised is printed to prove it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from .bus import EventBus

EVENT = "E_SIP_REQUEST"
PARAMS = {"method": "INVITE", "from": "sip:alice@example.com", "source": "127.0.0.1:5060", "seq": 0}
SAMPLE = 1000


SO_RCVBUFFORCE = 33  # Linux; not exported by the socket module


def _sink_socket(rcvbuf: int = 32 << 20) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:  # as root, beyond net.core.rmem_max: the sink must not be the bottleneck
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    return sock


def _sample_ns(fn: Callable[[], Any]) -> float:
    """CPU time (ns) the calling thread spends per call, over SAMPLE calls.

    CPU time, not wall time: on 2 cores the sender and the machine's other
    work preempt the producer at random, and what a worker pays is the CPU
    its own thread spends (kernel time of its syscalls included).
    """
    clock = time.thread_time_ns
    t0 = clock()
    for _ in range(SAMPLE):
        fn()
    return (clock() - t0) / SAMPLE


# Three events, so every case runs in every round without changing
# subscriptions: drift of the machine hits all cases alike.
CASES = (
    ("no_subscriber", "E_NOBODY", 0),
    ("1_subscriber", "E_ONE", 1),
    ("64_subscribers", "E_MANY", 64),
)


def producer_cost(samples: int) -> dict[str, Any]:
    """Per-call producer cost of each case, sampled in interleaved rounds."""
    sinks = [_sink_socket(1 << 20) for _ in range(64)]
    addrs = [f"udp:127.0.0.1:{s.getsockname()[1]}" for s in sinks]
    results: dict[str, list[float]] = {key: [] for key, _, _ in CASES}
    results["inline"] = []
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = sinks[0].getsockname()
    dumps = orjson.dumps
    try:
        with EventBus(senders=1, lane_size=4 << 20) as bus:
            for _, event, subscribers in CASES:
                bus.publish_event(event)
                for addr in addrs[:subscribers]:
                    bus.subscribe(event, addr, expire=None)
            raise_event = bus.raise_event
            raise_event("E_ONE", PARAMS)  # claim the lane outside the timing

            def drained() -> None:
                """Let the sender empty the ring, so every timed call enqueues."""
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    t = bus.stats()["totals"]
                    if t["dispatched"] + t["unrouted"] >= t["enqueued"]:
                        break
                    time.sleep(0.001)
                for sink in sinks:  # keep the sinks' buffers from filling
                    sink.setblocking(False)
                    try:
                        while sink.recv(65536):
                            pass
                    except BlockingIOError:
                        pass

            def inline() -> None:
                out.sendto(dumps({"jsonrpc": "2.0", "method": "E_ONE", "params": PARAMS}), target)

            for _ in range(samples):
                for key, event, _ in CASES:
                    drained()
                    results[key].append(_sample_ns(lambda event=event: raise_event(event, PARAMS)))
                drained()
                results["inline"].append(_sample_ns(inline))
            drained()
            return {"samples_ns": results, "bus_totals": bus.stats()["totals"]}
    finally:
        out.close()
        for sink in sinks:
            sink.close()


# -- end to end ---------------------------------------------------------------


def _sink(sock: socket.socket, expected: int, report: Any, timeout: float) -> None:
    sock.settimeout(timeout)
    got = 0
    first = last = 0.0
    try:
        while got < expected:
            sock.recv(65536)
            last = time.perf_counter()
            if not got:
                first = last
            got += 1
    except TimeoutError:
        pass
    report.send((got, first, last))


def _mpevent_producer(bus: EventBus, count: int, index: int) -> None:
    params = dict(PARAMS)
    raise_event = bus.raise_event
    for seq in range(count):
        params["seq"] = seq
        while not raise_event(EVENT, params):
            time.sleep(0)  # the ring is full: back off, lose nothing


def _queue_producer(queue: Any, count: int) -> None:
    params = dict(PARAMS)
    for seq in range(count):
        params["seq"] = seq
        queue.put((EVENT, params))


def _queue_sender(queue: Any, target: tuple[str, int], total: int) -> None:
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dumps = orjson.dumps
    for _ in range(total):
        name, params = queue.get()
        out.sendto(dumps({"jsonrpc": "2.0", "method": name, "params": params}), target)


def end_to_end(per_producer: int, producers: int = 2) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    total = per_producer * producers
    results: dict[str, Any] = {}

    def run(start_workers: Callable[[tuple[str, int]], list[Any]]) -> dict[str, Any]:
        sock = _sink_socket()
        target = sock.getsockname()
        parent, child = ctx.Pipe(duplex=False)
        sink = ctx.Process(target=_sink, args=(sock, total, child, 5.0))
        sink.start()
        t0 = time.perf_counter()
        workers = start_workers(target)
        for w in workers:
            w.join()
        got, _first, last = parent.recv()
        sink.join()
        sock.close()
        elapsed = (last or time.perf_counter()) - t0
        return {"raised": total, "delivered": got, "seconds": elapsed, "rate": got / elapsed}

    with EventBus(senders=1, lane_size=4 << 20) as bus:
        bus.publish_event(EVENT)

        def start_mpevent(target: tuple[str, int]) -> list[Any]:
            bus.subscribe(EVENT, f"udp:{target[0]}:{target[1]}", expire=None)
            procs = [
                ctx.Process(target=_mpevent_producer, args=(bus, per_producer, i))
                for i in range(producers)
            ]
            for p in procs:
                p.start()
            return procs

        results["mpevent"] = run(start_mpevent)
        results["mpevent"]["bus_totals"] = bus.stats()["totals"]

    def start_queue(target: tuple[str, int]) -> list[Any]:
        queue = ctx.Queue(maxsize=10000)
        sender = ctx.Process(target=_queue_sender, args=(queue, target, total))
        sender.start()
        procs = [
            ctx.Process(target=_queue_producer, args=(queue, per_producer))
            for _ in range(producers)
        ]
        for p in procs:
            p.start()
        return [*procs, sender]

    results["mp_queue"] = run(start_queue)
    return results


# -- report ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpevent.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    samples = 30 if args.quick else 200
    per_producer = 20_000 if args.quick else 100_000

    cost = producer_cost(samples)
    med = {k: statistics.median(v) for k, v in cost["samples_ns"].items()}
    e2e = end_to_end(per_producer)

    inline = med["inline"]
    one = med["1_subscriber"]
    rows = [
        (
            "raise_event, no subscriber",
            med["no_subscriber"],
            med["no_subscriber"] / inline,
            "<= 0.1 x inline",
        ),
        ("raise_event, 1 subscriber", one, one / inline, "<= 0.5 x inline"),
        (
            "raise_event, 64 subscribers",
            med["64_subscribers"],
            med["64_subscribers"] / one,
            "<= 1.2 x 1 sub",
        ),
        ("inline orjson + sendto", inline, 1.0, ""),
    ]
    print(
        f"mpevent benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}"
    )
    print()
    print(f"{'producer CPU per call (median)':34} {'ns':>8} {'ratio':>7}  target")
    for name, ns, ratio, target in rows:
        print(f"{name:34} {ns:8.0f} {ratio:7.3f}  {target}")
    print()
    m, q = e2e["mpevent"], e2e["mp_queue"]
    print(f"{'end to end, 2 producers, 1 sender':34} {'events/s':>10} {'delivered/raised':>18}")
    for name, r in (("mpevent", m), ("multiprocessing.Queue pipeline", q)):
        print(f"{name:34} {r['rate']:10.0f} {r['delivered']:>9}/{r['raised']:<8}")
    print(f"{'ratio mpevent / Queue':34} {m['rate'] / q['rate']:10.2f}  target >= 2, nothing lost")
    print(f"mpevent counters: {m['bus_totals']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"producer_cost_ns": med, "end_to_end": e2e}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
