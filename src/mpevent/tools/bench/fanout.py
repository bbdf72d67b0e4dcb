"""Section 3, fan-out: delivered datagrams/s to 1, 8 and 64 subscribers.

One producer and one sender (or the bare ``sendto`` loop, each datagram to
every subscriber) send to N UDP sockets read by one sink process with
``selectors``; mpevent's rate is given as a share of the bare loop's.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

from mpevent.api.bus import EventBus
from mpevent.tools.bench.bodies import bare_sender, fanout_sink, mpevent_producer
from mpevent.tools.bench.config import EVENT, Config
from mpevent.tools.bench.cpu import CpuMark, other_cores
from mpevent.tools.bench.memory import MemoryMonitor
from mpevent.tools.bench.plumbing import CTX, Spawner, StartLine, udp_addr, udp_drops, udp_socket
from mpevent.tools.figures import median, per_second, ratio


def run_fanout(
    kind: str, subscribers: int, datagrams: int, cfg: Config, monitor: MemoryMonitor
) -> dict[str, Any]:
    """Datagrams/s from one producer and one sender (or the bare loop) to N sinks."""
    events = max(20, datagrams // subscribers)
    expected = events * subscribers
    mark = CpuMark.now()
    socks = [udp_socket() for _ in range(subscribers)]
    res_r, res_w = CTX.Pipe(duplex=False)
    bare_r, bare_w = CTX.Pipe(duplex=False)
    start = StartLine(1)
    with contextlib.ExitStack() as stack:
        for s in socks:
            stack.callback(s.close)
        for closer in (res_r.close, res_w.close, bare_r.close, bare_w.close):
            stack.callback(closer)
        bus = None
        if kind == "mpevent":
            bus = stack.enter_context(EventBus(senders=1))
            bus.publish_event(EVENT)
            for s in socks:
                bus.subscribe(EVENT, udp_addr(s), expire=None)
            monitor.watch(bus.hub_pid, kind, "hub")
            monitor.watch_children(bus.hub_pid, kind, "sender", 1)
        sp = stack.enter_context(Spawner(monitor, kind))
        sp.start("sink", fanout_sink, socks, expected, cfg.idle_timeout, res_w)
        if bus is not None:
            worker = sp.start("producer", mpevent_producer, bus, start, events, 0)
        else:
            targets = [s.getsockname() for s in socks]
            worker = sp.start("sender", bare_sender, targets, events, False, start, bare_w)
        t0 = start.release()
        monitor.sample()
        sp.wait([worker], cfg.run_timeout)
        got, _first, last = sp.receive(res_r, cfg.run_timeout)
        result: dict[str, Any] = {
            "pipeline": kind,
            "subscribers": subscribers,
            "events": events,
            "expected": expected,
            "delivered": got,
            "rate": per_second(got, (last - t0) / 1e9) if got else math.nan,
            "sink_kernel_drops": udp_drops(socks),
        }
        if bus is None:
            send_ns = sp.receive(bare_r, cfg.run_timeout)
            result["send_rate"] = per_second(expected, send_ns / 1e9)
        else:
            result["bus_totals"] = bus.stats()["totals"]
    result["other_cores"] = other_cores(mark, CpuMark.now())
    return result


def fanout(cfg: Config, monitor: MemoryMonitor, rng: random.Random) -> dict[str, Any]:
    cases = [(k, n) for n in cfg.fanout_subscribers for k in ("mpevent", "bare")]
    runs = []
    for _ in range(cfg.fanout_rounds):
        order = list(cases)
        rng.shuffle(order)
        for kind, n in order:
            runs.append(run_fanout(kind, n, cfg.fanout_datagrams, cfg, monitor))
    summary = []
    for kind, n in cases:
        mine = [r for r in runs if (r["pipeline"], r["subscribers"]) == (kind, n)]
        row = {
            "pipeline": kind,
            "subscribers": n,
            "rate": median([r["rate"] for r in mine]),
            "expected": sum(r["expected"] for r in mine),
            "delivered": sum(r["delivered"] for r in mine),
            "sink_kernel_drops": sum(r["sink_kernel_drops"] or 0 for r in mine),
        }
        if kind == "bare":
            row["send_rate"] = median([r["send_rate"] for r in mine])
        summary.append(row)
    for row in summary:
        if row["pipeline"] == "mpevent":
            bare = next(
                r
                for r in summary
                if r["pipeline"] == "bare" and r["subscribers"] == row["subscribers"]
            )
            row["x_bare"] = ratio(row["rate"], bare["send_rate"])
    return {
        "datagrams_per_run": cfg.fanout_datagrams,
        "rounds": cfg.fanout_rounds,
        "summary": summary,
        "runs": runs,
    }
