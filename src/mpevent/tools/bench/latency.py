"""Section 4, latency: raise-to-receive p50/p99/p99.9 at 10 %, 50 % and 90 % of capacity.

Capacity is the 1-producer 1-sender end-to-end rate, measured just before
in the same round. The producer paces itself (raises what is due within
100 us, then sleeps) and puts ``time.monotonic_ns()`` in the params (key
``t``); the sink subtracts it from its own receive time. Next to it, the
sender's own part (raise to ``sendmmsg``, from its batch-age histogram)
and how busy the machine's cores were.
"""

from __future__ import annotations

import array
import contextlib
import random
import time
from collections.abc import Sequence
from typing import Any

from mpevent.api.bus import EventBus
from mpevent.shm.counters import age_bound_us
from mpevent.tools.bench.bodies import latency_sink, paced_producer
from mpevent.tools.bench.config import EVENT, Config
from mpevent.tools.bench.cpu import CpuMark, busy_cores, other_cores
from mpevent.tools.bench.e2e import run_pipeline
from mpevent.tools.bench.memory import MemoryMonitor
from mpevent.tools.bench.plumbing import CTX, Spawner, StartLine, udp_addr, udp_socket
from mpevent.tools.figures import median, per_second, summarize


def run_latency(
    rate: float, seconds: float, cfg: Config, monitor: MemoryMonitor
) -> tuple[dict[str, Any], array.array]:
    """One paced run at ``rate`` events/s; returns its figures and the raw latencies (ns)."""
    count = max(50, int(rate * seconds))
    skip = count // 50  # the first 2 %: lane claim, cold caches
    mark = CpuMark.now()
    sock = udp_socket()
    res_r, res_w = CTX.Pipe(duplex=False)
    start = StartLine(1)
    with contextlib.ExitStack() as stack:
        for closer in (sock.close, res_r.close, res_w.close):
            stack.callback(closer)
        bus = stack.enter_context(EventBus(senders=1))
        bus.publish_event(EVENT)
        bus.subscribe(EVENT, udp_addr(sock), expire=None)
        monitor.watch(bus.hub_pid, "mpevent", "hub")
        monitor.watch_children(bus.hub_pid, "mpevent", "sender", 1)
        sp = stack.enter_context(Spawner(monitor, "mpevent"))
        sp.start("sink", latency_sink, sock, count, skip, cfg.idle_timeout, res_w)
        producer = sp.start("producer", paced_producer, bus, start, rate, count)
        t0 = start.release()
        monitor.sample()
        sp.wait([producer], cfg.run_timeout + seconds)
        t1 = time.monotonic_ns()
        got = sp.receive(res_r, cfg.run_timeout)
        latencies = array.array("q")
        latencies.frombytes(res_r.recv_bytes())
        end = CpuMark.now()  # while the run's processes are still there: their CPU counts
        stats = bus.stats()
        totals = stats["totals"]
        ages = stats["senders"][0]["age_hist"]
    figures = summarize(latencies)
    return {
        "target_rate": rate,
        "achieved_rate": per_second(count, (t1 - t0) / 1e9),
        "raised": count,
        "delivered": got,
        "retries": totals["dropped"],
        "p50_ns": figures["median"],
        "p99_ns": figures["p99"],
        "age_hist": ages,
        "busy_cores": busy_cores(mark, end),
        "other_cores": other_cores(mark, CpuMark.now()),
    }, latencies


def latency(cfg: Config, monitor: MemoryMonitor, rng: random.Random) -> dict[str, Any]:
    capacities = []
    pooled: dict[float, array.array] = {load: array.array("q") for load in cfg.latency_loads}
    runs: dict[float, list[dict[str, Any]]] = {load: [] for load in cfg.latency_loads}
    for _ in range(cfg.latency_rounds):
        cap = run_pipeline("mpevent", 1, 1, cfg.capacity_events, cfg, monitor, None)
        capacities.append(cap["rate"])
        loads = list(cfg.latency_loads)
        rng.shuffle(loads)
        for load in loads:
            run, lat = run_latency(load * cap["rate"], cfg.latency_seconds, cfg, monitor)
            runs[load].append(run)
            pooled[load].extend(lat)
    rows = []
    for load in cfg.latency_loads:
        stats = summarize(pooled[load])
        mine = runs[load]
        ages = [r["age_hist"] for r in mine]
        rows.append(
            {
                "load": load,
                "target_rate": median([r["target_rate"] for r in mine]),
                "achieved_rate": median([r["achieved_rate"] for r in mine]),
                "raised": sum(r["raised"] for r in mine),
                "delivered": sum(r["delivered"] for r in mine),
                "retries": sum(r["retries"] for r in mine),
                "samples": stats["n"],
                "p50_ns": stats["median"],
                "p99_ns": stats["p99"],
                "p999_ns": stats["p999"],
                "max_ns": stats["max"],
                "other_cores": _mean([r["other_cores"] for r in mine]),
                "busy_cores": _mean([r["busy_cores"] for r in mine]),
                # mpevent's own part: raise to sendmmsg, per event an upper
                # bound (the age of its batch's oldest record); the rest of
                # the latency is the kernel and the subscriber.
                "send_age_p99_us": age_bound_us([sum(h) for h in zip(*ages, strict=True)], 0.99),
                "runs": mine,
            }
        )
    return {
        "capacity_rates": capacities,
        "capacity": median(capacities),
        "seconds_per_load": cfg.latency_seconds,
        "loads": rows,
    }


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None
