"""CPU accounting: what the machine, the processes of a run and the interpreter cost.

On a shared machine the figures move with whatever else runs, so every
section and run records how many cores the rest of the machine kept busy
meanwhile (:class:`CpuMark`, :func:`other_cores`), and a run starts and
ends with :func:`python_speed`, the speed of a fixed pure-Python loop.
:func:`tree_cpu` reads the CPU time of processes the benchmark did not
start itself (a hub's senders). Linux's ``/proc`` where it is there; the
machine-wide figures are None elsewhere.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psutil


def tree_cpu(pids: Iterable[int]) -> float:
    """CPU seconds used so far by live processes (a hub's senders).

    From ``/proc/PID/schedstat`` (nanoseconds on a CPU) where Linux has it:
    ``cpu_times`` counts clock ticks, too coarse for a short run.
    """
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
    return total


@dataclass(frozen=True)
class CpuMark:
    """A point in time, the machine's busy CPU time, and ours (for :func:`other_cores`)."""

    wall: float
    busy: float | None  # seconds of CPU the whole machine spent (steal included)
    own: float  # seconds of CPU this process and its reaped descendants spent

    @classmethod
    def now(cls) -> CpuMark:
        busy = None
        with contextlib.suppress(OSError, ValueError):
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
            # user nice system idle iowait irq softirq steal: all but idle and iowait
            busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return cls(time.monotonic(), busy, own)


def busy_cores(before: CpuMark, after: CpuMark) -> float | None:
    """Cores the whole machine (us included) kept busy on average between two marks."""
    wall = after.wall - before.wall
    if before.busy is None or after.busy is None or wall <= 0:
        return None
    return (after.busy - before.busy) / wall


def other_cores(before: CpuMark, after: CpuMark) -> float | None:
    """Cores the rest of the machine kept busy on average between two marks (taken
    when all of our children are reaped): the noise the figures in between suffered."""
    busy = busy_cores(before, after)
    if busy is None:
        return None
    return max(0.0, busy - (after.own - before.own) / (after.wall - before.wall))


def python_speed(rounds: int = 5, n: int = 200_000) -> float:
    """ns per step of a fixed pure-Python loop (best of ``rounds``).

    Shared machines change speed from minute to minute, and pure Python
    slows more than syscalls do, which moves every ratio to the inline
    baseline. Printed at the start and end of a run as a first hint of the
    machine's state (on this project's VM it did not always show a slow
    phase: README, "Figures").
    """
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        x = 0
        for i in range(n):
            x = (x + i) & 0xFFFF
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best
