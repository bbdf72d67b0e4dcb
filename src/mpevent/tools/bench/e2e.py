"""Section 2, end to end: delivered events/s from producer processes to one UDP sink.

mpevent with 1, 2 and 4 producer processes and 1 and 2 senders, on each
fast path this build has (the compiled one and the pure-Python one beside
it, :mod:`.extras`), against the pipelines a user would build instead:
``multiprocessing.Queue`` and ``faster_fifo`` (producers put, sender
processes get, encode with orjson, ``sendto``), pyzmq (producers PUSH, one
process PULLs, builds each notification and sends it), a sender thread in
each producer (``SimpleQueue.put``; the thread encodes and sends, and its
CPU is the producer's: same process, same GIL), and one process doing
nothing but ``sendto`` of a prebuilt datagram (the sender-side limit).
mpevent producers retry when the lane is full, so nothing is lost:
mpevent's ``dropped`` counter then counts those retries. delivered/raised
is reported for every case, and where the CPU went per delivered event,
per role. :func:`run_pipeline` is also the latency section's capacity run.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable
from typing import Any

import psutil

from mpevent.api.bus import EventBus
from mpevent.tools.bench.bodies import (
    bare_sender,
    count_sink,
    mpevent_producer,
    queue_producer,
    queue_sender,
    thread_producer,
    zmq_producer,
    zmq_sender,
)
from mpevent.tools.bench.config import EVENT, PIPELINES, PURE, THREAD_SENDERS, Config
from mpevent.tools.bench.cpu import CpuMark, other_cores, tree_cpu
from mpevent.tools.bench.extras import Extras
from mpevent.tools.bench.memory import MemoryMonitor
from mpevent.tools.bench.plumbing import (
    CTX,
    Spawner,
    StartLine,
    closing_queue,
    make_queue,
    udp_addr,
    udp_drops,
    udp_socket,
    zmq_endpoint,
)
from mpevent.tools.figures import median, per_second, ratio


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` counts that differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def run_pipeline(
    kind: str,
    producers: int,
    senders: int,
    total: int,
    cfg: Config,
    monitor: MemoryMonitor,
    extras: Extras | None,
) -> dict[str, Any]:
    """One end-to-end run: ``total`` events from ``producers`` processes to one UDP sink.

    ``kind``: mpevent, mpevent_pure, pyzmq, thread, mp_queue, faster_fifo,
    bare or bare_connected (one process sending a prebuilt datagram
    ``total`` times). ``extras`` holds the optional modules (None: mpevent only).
    """
    mark = CpuMark.now()
    sock = udp_socket()
    target = sock.getsockname()
    res_r, res_w = CTX.Pipe(duplex=False)
    # The bare loop's send time, or the pyzmq sender's word that it is bound.
    aux_r, aux_w = CTX.Pipe(duplex=False)
    pipeline = "bare" if kind.startswith("bare") else kind
    bare = pipeline == "bare"
    start = StartLine(1 if bare else producers)
    with contextlib.ExitStack() as stack:
        for closer in (sock.close, res_r.close, res_w.close, aux_r.close, aux_w.close):
            stack.callback(closer)
        bus = q = None
        if kind.startswith("mpevent"):
            bus = stack.enter_context(EventBus(senders=senders))
            bus.publish_event(EVENT)
            bus.subscribe(EVENT, udp_addr(sock), expire=None)
            monitor.watch(bus.hub_pid, pipeline, "hub")
            monitor.watch_children(bus.hub_pid, pipeline, "sender", senders)
        elif kind in ("mp_queue", "faster_fifo"):
            q = stack.enter_context(closing_queue(make_queue(kind, extras and extras.ff)))
        sp = stack.enter_context(Spawner(monitor, pipeline))
        sp.start("sink", count_sink, sock, total, cfg.idle_timeout, res_w)
        workers: list[Any] = []
        sends: list[Any] = []
        counts = split_evenly(total, producers)
        seq0s = [sum(counts[:i]) for i in range(producers)]
        if bare:
            args = ([target], total, kind == "bare_connected", start, aux_w)
            workers.append(sp.start("sender", bare_sender, *args))
        elif bus is not None:
            compiled = False if kind.endswith(PURE) else None
            for n, seq0 in zip(counts, seq0s, strict=True):
                args = (bus, start, n, seq0, compiled)
                workers.append(sp.start("producer", mpevent_producer, *args))
        elif kind == "pyzmq":
            zmq, endpoint = extras.zmq, zmq_endpoint()  # type: ignore[union-attr]
            sends.append(sp.start("sender", zmq_sender, zmq, endpoint, target, producers, aux_w))
            sp.receive(aux_r, cfg.run_timeout)  # bound: connecting producers find it
            for n, seq0 in zip(counts, seq0s, strict=True):
                args = (zmq, endpoint, start, n, seq0)
                workers.append(sp.start("producer", zmq_producer, *args))
        elif kind == "thread":
            for n, seq0 in zip(counts, seq0s, strict=True):
                workers.append(sp.start("producer", thread_producer, start, n, seq0, target))
        else:
            sends = [
                sp.start("sender", queue_sender, q, kind == "faster_fifo", target)
                for _ in range(senders)
            ]
            for n, seq0 in zip(counts, seq0s, strict=True):
                workers.append(sp.start("producer", queue_producer, q, start, n, seq0))
        if bus is not None:
            # The senders' CPU so far is their fresh interpreter's start-up
            # (about 0.1 s each), not the run's: it is subtracted below.
            senders_cpu_before = tree_cpu(c.pid for c in psutil.Process(bus.hub_pid).children())
        t0 = start.release()
        monitor.sample()
        sp.wait(workers, cfg.run_timeout)
        if q is not None:
            for _ in range(senders):
                q.put(None)
        sp.wait(sends, cfg.run_timeout)
        got, _first, last = sp.receive(res_r, cfg.run_timeout)
        monitor.sample()
        result: dict[str, Any] = {
            "pipeline": kind,
            "producers": producers,
            "senders": senders,
            "raised": total,
            "delivered": got,
            "lost": total - got,
            "seconds": (last - t0) / 1e9 if got else math.nan,
            "rate": per_second(got, (last - t0) / 1e9) if got else math.nan,
            "sink_kernel_drops": udp_drops([sock]),
        }
        if bare:
            send_ns = sp.receive(aux_r, cfg.run_timeout)
            result["send_rate"] = per_second(total, send_ns / 1e9)
        if bus is not None:
            result["bus_totals"] = bus.stats()["totals"]
            senders_cpu = (
                tree_cpu(c.pid for c in psutil.Process(bus.hub_pid).children()) - senders_cpu_before
            )
    cpu = sp.cpu_by_role()
    if bus is not None:
        cpu["sender"] = senders_cpu
    # Where the CPU went, per delivered event: the profile behind the rates.
    result["cpu_us_per_event"] = {role: sec / got * 1e6 for role, sec in cpu.items()} if got else {}
    result["other_cores"] = other_cores(mark, CpuMark.now())
    return result


def _cases(cfg: Config, extras: Extras) -> list[tuple[str, int, int]]:
    """(pipeline, producers, senders) of every run: pyzmq has its one PULL process,
    the thread pipeline a thread in each producer (``THREAD_SENDERS``)."""
    skip = {"mpevent_pure"} - set(extras.mpevent_kinds)
    skip |= {"pyzmq"} if extras.zmq is None else set()
    skip |= {"faster_fifo"} if extras.ff is None else set()
    shapes = {"pyzmq": (1,), "thread": (THREAD_SENDERS,)}
    cases = [
        (k, p, s)
        for k in PIPELINES
        if k not in skip
        for p in cfg.e2e_producers
        for s in shapes.get(k, cfg.e2e_senders)
    ]
    return [*cases, ("bare", 1, 1), ("bare_connected", 1, 1)]


def end_to_end(cfg: Config, monitor: MemoryMonitor, extras: Extras, rng: random.Random) -> dict:
    cases = _cases(cfg, extras)
    runs: list[dict[str, Any]] = []
    for _ in range(cfg.e2e_rounds):
        order = list(cases)
        rng.shuffle(order)
        for kind, p, s in order:
            runs.append(run_pipeline(kind, p, s, cfg.e2e_events, cfg, monitor, extras))
    summary = []
    for kind, p, s in cases:
        mine = [r for r in runs if (r["pipeline"], r["producers"], r["senders"]) == (kind, p, s)]
        row = {
            "pipeline": kind,
            "producers": p,
            "senders": s,
            "rate": median([r["rate"] for r in mine]),
            "rates": [r["rate"] for r in mine],
            "raised": sum(r["raised"] for r in mine),
            "delivered": sum(r["delivered"] for r in mine),
            "sink_kernel_drops": sum(r["sink_kernel_drops"] or 0 for r in mine),
        }
        row["lost"] = row["raised"] - row["delivered"]
        row["loss"] = row["lost"] / row["raised"]
        if kind.startswith("bare"):
            row["send_rate"] = median([r["send_rate"] for r in mine])
        if kind.startswith("mpevent"):
            row["bus_totals"] = _sum_counters(r["bus_totals"] for r in mine)
        roles = sorted({role for r in mine for role in r["cpu_us_per_event"]})
        row["cpu_us_per_event"] = {
            role: median([r["cpu_us_per_event"].get(role, math.nan) for r in mine])
            for role in roles
        }
        summary.append(row)
    by_key = {(r["pipeline"], r["producers"], r["senders"]): r for r in summary}
    for row in summary:
        for base in ("mp_queue", "faster_fifo", "pyzmq"):
            other = by_key.get((base, row["producers"], row["senders"]))
            row[f"x_{base}"] = ratio(row["rate"], other["rate"]) if other else None
    return {
        "events_per_run": cfg.e2e_events,
        "rounds": cfg.e2e_rounds,
        "summary": summary,
        "runs": runs,
    }


def _sum_counters(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out
