"""The benchmark's entry points: its options, running the chosen sections, the output.

:func:`main` is ``python -m mpevent.tools.bench`` and ``mpevent bench``;
:func:`run` runs the sections in order (each with its own shuffled case
order, from one seeded generator), then the memory section, and returns
the results as plain data (what ``--json`` writes, keys in the order
printed). faster_fifo, pyzmq and the compiled fast path are optional
(:mod:`.extras`): what is missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from mpevent.tools.bench.config import CONFIGS, DATAGRAM, PARAMS, SECTIONS, Config
from mpevent.tools.bench.cost import producer_cost
from mpevent.tools.bench.cpu import CpuMark, other_cores, python_speed
from mpevent.tools.bench.e2e import end_to_end
from mpevent.tools.bench.extras import detect
from mpevent.tools.bench.fanout import fanout
from mpevent.tools.bench.latency import latency
from mpevent.tools.bench.memory import MemoryMonitor, memory
from mpevent.tools.bench.plot import plot
from mpevent.tools.bench.report import render_report, targets, write_json
from mpevent.tools.bench.transports import transports


def build_parser(
    prog: str = "python -m mpevent.tools.bench", add_help: bool = True
) -> argparse.ArgumentParser:
    """The benchmark's options (``add_help=False`` to use it as a parent parser)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        add_help=add_help,
        description="Benchmark mpevent (its compiled and pure-Python paths) against inline "
        "sendto, orjson alone, pyzmq, a sender thread per producer, multiprocessing.Queue "
        "and faster_fifo: producer cost, end-to-end throughput and loss, fan-out, latency, "
        "memory; and its tcp: and rabbitmq: transports against their own raw loops.",
    )
    parser.add_argument("--quick", action="store_true", help="short run (CI smoke, < 1 min)")
    parser.add_argument(
        "--smoke", action="store_true", help=argparse.SUPPRESS
    )  # a few seconds, tiny counts: the test suite's
    parser.add_argument(
        "--json",
        nargs="?",
        const="bench-results.json",
        metavar="FILE",
        help="write the results as JSON (default file: bench-results.json)",
    )
    parser.add_argument("--plot", metavar="FILE.png", help="draw a chart (needs matplotlib)")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the case order shuffle")
    parser.add_argument(
        "--no-faster-fifo", action="store_true", help="skip the faster_fifo pipeline"
    )
    return parser


def run(cfg: Config, sections: Sequence[str], seed: int = 1, use_faster_fifo: bool = True) -> dict:
    """Run the benchmark; returns the results as plain data (what --json writes)."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    started = time.monotonic()
    speed_before = python_speed()
    rng = random.Random(seed)
    extras, notes = detect(use_faster_fifo)
    monitor = MemoryMonitor()
    results: dict[str, Any] = {}
    section_seconds: dict[str, float] = {}
    gc.collect()
    steps = (
        ("cost", "producer_cost", lambda: producer_cost(cfg, monitor, extras, rng)),
        ("e2e", "end_to_end", lambda: end_to_end(cfg, monitor, extras, rng)),
        ("fanout", "fanout", lambda: fanout(cfg, monitor, rng)),
        ("latency", "latency", lambda: latency(cfg, monitor, rng)),
        ("transports", "transports", lambda: transports(cfg, monitor, extras, rng, notes)),
    )
    background: dict[str, float | None] = {}
    for key, name, step in steps:
        if key not in sections:
            continue
        mark = CpuMark.now()
        results[name] = step()
        end = CpuMark.now()
        section_seconds[key] = end.wall - mark.wall
        background[key] = other_cores(mark, end)
    results["memory"] = memory(monitor)
    results["notes"] = notes
    results["meta"] = {
        "mode": cfg.mode,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "compiled": extras.compiled,
        "pure_beside": extras.pure_beside,
        "faster_fifo": getattr(extras.ff, "__version__", "installed") if extras.ff else None,
        "pyzmq": getattr(extras.zmq, "__version__", "installed") if extras.zmq else None,
        "seconds": time.monotonic() - started,
        "python_ns_per_step": [speed_before, python_speed()],
        "section_seconds": section_seconds,
        "other_cores": background,
        "config": asdict(cfg),
        "seed": seed,
        "payload": PARAMS,
        "datagram_bytes": len(DATAGRAM),
    }
    results["targets"] = targets(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = CONFIGS[mode]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    try:
        results = run(cfg, sections, seed=args.seed, use_faster_fifo=not args.no_faster_fifo)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        note = plot(results, args.plot)
        results["notes"].append(note or f"chart written to {args.plot}")
    print(render_report(results))
    if args.json:
        write_json(results, args.json)
        print(f"\nresults written to {args.json}")
    return 0
