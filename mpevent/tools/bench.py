"""Benchmark: mpevent side by side with the other ways to get events out of workers.

Run with ``python -m mpevent.tools.bench`` (``--quick`` for a CI smoke run under a
minute, ``--json [FILE]`` for the figures as JSON, ``--plot FILE.png`` for a
chart). Everything is measured in the same run, with the same payload
(:data:`PARAMS`), and reported as ratios too: the machine is shared and noisy,
so cases are interleaved in rounds (in a shuffled order per round) and drift
hits them all alike. All traffic stays on 127.0.0.1.

1. **Producer cost** per call, median and p99, each call timed on its own
   with ``perf_counter_ns`` (net of the timer's own cost, which is printed):
   ``raise_event`` with 0, 1, 8 and 64 UDP subscribers, against the inline
   way OpenSIPS uses (orjson + ``sendto`` from the producer itself),
   ``multiprocessing.Queue.put`` and ``faster_fifo.Queue.put``. Between
   samples the ring is left to drain and the queues are emptied by their
   consumer processes, so every timed call takes the fast path (it
   enqueues; nothing blocks). Also the CPU the producer process spends per
   call, helper threads included (``multiprocessing.Queue`` pickles and
   writes in a feeder thread, after ``put`` returned).
2. **End to end**: delivered events/s with 1, 2 and 4 producer processes and
   1 and 2 senders, against the same pipelines built on
   ``multiprocessing.Queue`` and on ``faster_fifo`` (producers put, sender
   processes get, encode with orjson, ``sendto``), and against one process
   doing nothing but ``sendto`` of a prebuilt datagram (the sender-side
   limit). mpevent producers retry when the lane is full, so nothing is lost:
   mpevent's ``dropped`` counter then counts those retries. delivered/raised
   is reported for every case.
3. **Fan-out**: delivered datagrams/s to 1, 8 and 64 subscribers, read by one
   sink process with ``selectors``, against the bare ``sendto`` loop.
4. **Latency** raise-to-receive, p50/p99/p99.9, at 10 %, 50 % and 90 % of
   the capacity (the 1-producer 1-sender end-to-end rate, measured just
   before in the same round). The producer paces itself (raises what is due
   within 100 us, then sleeps) and puts ``time.monotonic_ns()`` in the
   params (key ``t``); the sink subtracts it from its own receive time.
5. **Memory**: peak RSS (and USS) of every process (psutil, sampled while it
   runs) per role, and the size of the shared segment.

The CPU time the rest of the machine used meanwhile is printed per section
(and kept per run in the JSON): on a shared 2-core machine it explains most
of the spread between runs.

The optional pipelines and the chart need ``pip install 'mpevent[bench]'``
(faster-fifo, matplotlib); without them those parts are skipped with a note.

The module keeps the pure helpers (percentiles, verdicts, formatting,
tables) apart from the parts that run processes; ``main(argv)`` and
``build_parser()`` are the entry points (``python -m mpevent.tools.bench`` and the
``mpevent bench`` command).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import gc
import math
import multiprocessing as mp
import operator
import os
import platform
import queue as queue_module
import random
import resource
import selectors
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import psutil

from mpevent.api.bus import EventBus
from mpevent.shm.counters import age_bound_us

EVENT = "E_SIP_REQUEST"
PARAMS = {"method": "INVITE", "from": "sip:alice@example.com", "source": "127.0.0.1:5060", "seq": 0}
DATAGRAM = orjson.dumps({"jsonrpc": "2.0", "method": EVENT, "params": PARAMS})

SO_RCVBUFFORCE = 33  # Linux; not exported by the socket module
SINK_RCVBUF = 64 << 20  # per sink socket (memory is only taken as datagrams queue)
BACKOFF = 1e-3  # an mpevent producer that finds its lane full sleeps this long
GIVE_UP = 60.0  # a producer that cannot enqueue for this long exits with an error
QUEUE_MAXSIZE = 10_000  # multiprocessing.Queue bound (puts block beyond it)
FASTER_FIFO_BYTES = 4 << 20  # faster_fifo.Queue bound (the default is 1 MB)
FASTER_FIFO_BATCH = 256  # get_many batch of the faster_fifo sender (as mpevent's BATCH)
SAMPLE_EVERY = 0.05  # seconds between RSS samples while a run goes on
USS_EVERY = 1.0  # seconds between USS samples (reading smaps costs CPU the runs need)
PACE_NS = 100_000  # a paced producer sleeps only when its next event is further away
BARRIER_TIMEOUT = 60.0

_CTX = mp.get_context("fork")  # the bus is inherited: children must be forked


@dataclass(frozen=True)
class Config:
    """How much of everything one run does."""

    mode: str
    cost_rounds: int  # rounds of the producer-cost cases
    cost_sample: int  # timed calls per case per round
    e2e_rounds: int
    e2e_events: int  # events per end-to-end run (split between the producers)
    fanout_rounds: int
    fanout_datagrams: int  # datagrams per fan-out run (events = this / subscribers)
    latency_rounds: int
    latency_seconds: float  # per load level
    capacity_events: int  # events of the capacity run before the latency runs
    idle_timeout: float  # a sink that receives nothing this long stops counting
    e2e_producers: tuple[int, ...] = (1, 2, 4)
    e2e_senders: tuple[int, ...] = (1, 2)
    cost_subscribers: tuple[int, ...] = (0, 1, 8, 64)
    fanout_subscribers: tuple[int, ...] = (1, 8, 64)
    latency_loads: tuple[float, ...] = (0.1, 0.5, 0.9)
    run_timeout: float = 300.0


CONFIGS = {
    "full": Config(
        mode="full",
        cost_rounds=150,
        cost_sample=200,
        e2e_rounds=3,
        e2e_events=120_000,
        fanout_rounds=3,
        fanout_datagrams=240_000,
        latency_rounds=2,
        latency_seconds=3.0,
        capacity_events=120_000,
        idle_timeout=2.0,
    ),
    "quick": Config(
        mode="quick",
        cost_rounds=20,
        cost_sample=200,
        e2e_rounds=1,
        e2e_events=12_000,
        fanout_rounds=1,
        fanout_datagrams=24_000,
        latency_rounds=1,
        latency_seconds=1.0,
        capacity_events=24_000,
        idle_timeout=1.0,
        run_timeout=60.0,
    ),
    # A few seconds: every section and case, tiny counts (the test suite's smoke test).
    "smoke": Config(
        mode="smoke",
        cost_rounds=3,
        cost_sample=20,
        e2e_rounds=1,
        e2e_events=400,
        fanout_rounds=1,
        fanout_datagrams=640,
        latency_rounds=1,
        latency_seconds=0.15,
        capacity_events=1000,
        idle_timeout=1.0,
        run_timeout=30.0,
    ),
}

SECTIONS = ("cost", "e2e", "fanout", "latency")
PIPELINES = ("mpevent", "mp_queue", "faster_fifo")
PIPELINE_LABELS = {
    "mpevent": "mpevent",
    "mp_queue": "multiprocessing.Queue",
    "faster_fifo": "faster_fifo.Queue",
    "bare": "bare sendto loop",
    "bare_connected": "bare send loop (connected)",
}


# =============================================================================
# Pure helpers: statistics, verdicts, formatting, tables
# =============================================================================


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks (numpy's default).

    NaN for no values.
    """
    return _sorted_percentile(sorted(values), q)


def _sorted_percentile(data: Sequence[float], q: float) -> float:
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in 0..100, got {q}")
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(values: Iterable[float], offset: float = 0.0) -> dict[str, float]:
    """n, mean, median, p99, p99.9, min and max of ``values`` minus ``offset``."""
    data = sorted(v - offset for v in values)
    if not data:
        return {k: math.nan for k in ("median", "p99", "p999", "mean", "min", "max")} | {"n": 0}
    return {
        "n": len(data),
        "median": _sorted_percentile(data, 50),
        "p99": _sorted_percentile(data, 99),
        "p999": _sorted_percentile(data, 99.9),
        "mean": sum(data) / len(data),
        "min": data[0],
        "max": data[-1],
    }


def median(values: Iterable[float]) -> float:
    return percentile(values, 50)


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``; None when either is missing, NaN or the base is 0."""
    if value is None or base is None or _nan(value) or _nan(base) or base == 0:
        return None
    return value / base


def _nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)


def verdict(value: float | None, op: str, limit: float, ok: bool = True) -> str:
    """PASS when ``value op limit`` holds (and ``ok``), MISS when not, n/a without a value."""
    if value is None or _nan(value):
        return "n/a"
    if op == "<=":
        passed = value <= limit
    elif op == ">=":
        passed = value >= limit
    else:
        raise ValueError(f"unknown comparison {op!r}")
    return "PASS" if passed and ok else "MISS"


def target(
    name: str, value: float | None, op: str, limit: float, figure: str, ok: bool = True, note=""
) -> dict[str, Any]:
    """One target line: the measured ratio, the goal, the verdict."""
    return {
        "target": name,
        "figure": figure,
        "ratio": value,
        "goal": f"{op} {limit:g}",
        "verdict": verdict(value, op, limit, ok),
        "note": note,
    }


def fmt_num(x: float | None, digits: int = 0) -> str:
    """A number with thousands separators; ``-`` for missing."""
    if x is None or _nan(x):
        return "-"
    return f"{x:,.{digits}f}"


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    if x is None or _nan(x):
        return "n/a"
    return f"{x:.{digits}f}x"


def fmt_us(ns: float | None) -> str:
    """Nanoseconds as microseconds, 1 decimal."""
    return "-" if ns is None or _nan(ns) else f"{ns / 1000:,.1f}"


def fmt_bytes(n: float | None) -> str:
    if n is None or _nan(n):
        return "-"
    return f"{n / (1 << 20):,.1f} MiB"


def fmt_loss(delivered: int, raised: int) -> str:
    """``delivered/raised`` and the share lost."""
    lost = 1 - delivered / raised if raised else 0.0
    return f"{delivered}/{raised} ({lost:.2%} lost)"


PROFILE_ROLES = ("producer", "sender", "sink")


def render_cpu_profile(summary: Sequence[dict[str, Any]], producers: int = 2) -> str:
    """Where the CPU goes, per delivered event, in the end-to-end runs with
    ``producers`` producers: on two cores every pipeline is bound by the sum."""
    rows = []
    for r in summary:
        if r["producers"] != producers and not r["pipeline"].startswith("bare"):
            continue
        cpu = r.get("cpu_us_per_event") or {}
        total = sum(v for v in cpu.values() if not _nan(v))
        rows.append(
            [
                PIPELINE_LABELS[r["pipeline"]],
                "" if r["pipeline"].startswith("bare") else r["senders"],
                *(fmt_num(cpu.get(role), 2) if role in cpu else "" for role in PROFILE_ROLES),
                fmt_num(total, 2),
                fmt_num(2e6 / total) if total else None,
            ]
        )
    return render_table(
        ["pipeline", "send", *PROFILE_ROLES, "total", "2 cores / total"],
        rows,
        title=(
            f"   CPU per delivered event, us (user + system, each process's own), "
            f"{producers} producers; the last column is the rate two fully used cores allow"
        ),
    )


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    title: str | None = None,
    align: str | None = None,
) -> str:
    """A plain-text table: ``align`` is one ``l``/``r`` per column (default: first
    column left, the others right); None cells print as ``-``."""
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    n = len(headers)
    for row in cells:
        if len(row) != n:
            raise ValueError(f"row {row} has {len(row)} cells, the table {n} columns")
    if align is None:
        align = "l" + "r" * (n - 1)
    widths = [max([len(headers[i])] + [len(r[i]) for r in cells]) for i in range(n)]

    def line(values: Sequence[str]) -> str:
        out = []
        for i, v in enumerate(values):
            out.append(v.ljust(widths[i]) if align[i] == "l" else v.rjust(widths[i]))
        return "  ".join(out).rstrip()

    lines = []
    if title:
        lines.append(title)
    lines.append(line(headers))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(line(r) for r in cells)
    return "\n".join(lines)


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` counts that differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# =============================================================================
# Process plumbing: memory sampling, spawning and always reaping children
# =============================================================================


class MemoryMonitor:
    """Peak RSS of every watched process, sampled while the benchmark runs.

    ``rss`` is what the process has mapped in memory: the shared segment pages
    it touched and the pages it still shares copy-on-write with the process
    it was forked from count in full. ``uss`` (sampled less often: reading
    smaps costs ~0.2 ms) is what only this process holds: what it costs.
    """

    def __init__(self) -> None:
        self.procs: dict[int, tuple[psutil.Process, str, str]] = {}
        self.peaks: dict[int, dict[str, Any]] = {}
        self._parents: dict[int, tuple[str, str, int]] = {}  # pid -> (pipeline, role, expected)
        self._last = 0.0
        self._last_full = 0.0

    def watch(self, pid: int, pipeline: str, role: str) -> None:
        try:
            self.procs[pid] = (psutil.Process(pid), pipeline, role)
        except psutil.Error:
            return
        self.peaks.setdefault(pid, {"pipeline": pipeline, "role": role, "rss": 0, "uss": 0})
        self._sample_one(pid, True)

    def watch_children(self, pid: int, pipeline: str, role: str, expected: int) -> None:
        """Also watch ``pid``'s children (a hub's senders, forked once it runs)."""
        self._parents[pid] = (pipeline, role, expected)
        self._discover()

    def _discover(self) -> None:
        for pid, (pipeline, role, expected) in list(self._parents.items()):
            entry = self.procs.get(pid)
            if entry is None:
                del self._parents[pid]
                continue
            try:
                children = entry[0].children()
            except psutil.Error:
                del self._parents[pid]
                continue
            for child in children:
                if child.pid not in self.procs:
                    self.watch(child.pid, pipeline, role)
            if len(children) >= expected:
                del self._parents[pid]

    def _sample_one(self, pid: int, full: bool) -> None:
        proc, _, _ = self.procs[pid]
        peak = self.peaks[pid]
        try:
            if full:
                mem = proc.memory_full_info()
                peak["uss"] = max(peak["uss"], getattr(mem, "uss", 0))
            else:
                mem = proc.memory_info()
        except psutil.Error:
            del self.procs[pid]
            return
        peak["rss"] = max(peak["rss"], mem.rss)

    def sample(self, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last < SAMPLE_EVERY:
            return
        self._last = now
        full = force or now - self._last_full >= USS_EVERY
        if full:
            self._last_full = now
        if self._parents:
            self._discover()
        for pid in list(self.procs):
            self._sample_one(pid, full)

    def forget_dead(self) -> None:
        for pid, (proc, _, _) in list(self.procs.items()):
            try:
                gone = proc.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                gone = True
            if gone:
                del self.procs[pid]

    def by_role(self) -> list[dict[str, Any]]:
        """Per (pipeline, role): number of processes, the largest peak RSS and USS."""
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for peak in self.peaks.values():
            key = (peak["pipeline"], peak["role"])
            g = groups.setdefault(
                key,
                {"pipeline": key[0], "role": key[1], "processes": 0, "peak_rss": 0, "peak_uss": 0},
            )
            g["processes"] += 1
            g["peak_rss"] = max(g["peak_rss"], peak["rss"])
            g["peak_uss"] = max(g["peak_uss"], peak["uss"])
        order = {p: i for i, p in enumerate((*PIPELINES, "bare", "bench"))}
        roles = {
            r: i for i, r in enumerate(("main", "producer", "hub", "sender", "consumer", "sink"))
        }
        return sorted(
            groups.values(),
            key=lambda g: (order.get(g["pipeline"], 99), roles.get(g["role"], 99), g["role"]),
        )


class Spawner:
    """Starts one run's child processes; on exit none is left running.

    On a normal exit each child gets a grace period to finish, then is
    killed; after an exception they are killed at once. Always reaped.
    """

    def __init__(self, monitor: MemoryMonitor, pipeline: str):
        self.monitor = monitor
        self.pipeline = pipeline
        self.procs: list[Any] = []
        self._cpu: list[tuple[str, Any]] = []  # (role, the CPU seconds a child reports)

    def start(
        self, role: str, target: Callable[..., Any], *args: Any, pipeline: str | None = None
    ) -> Any:
        pipeline = pipeline or self.pipeline
        cpu = _CTX.RawValue("d", math.nan)
        proc = _CTX.Process(
            target=_report_cpu,
            args=(cpu, target, *args),
            name=f"bench-{pipeline}-{role}",
            daemon=True,
        )
        proc.start()
        self.procs.append(proc)
        self._cpu.append((role, cpu))
        self.monitor.watch(proc.pid, pipeline, role)
        return proc

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds (user + system) per role of the children that finished."""
        out: dict[str, float] = {}
        for role, cpu in self._cpu:
            if not math.isnan(cpu.value):
                out[role] = out.get(role, 0.0) + cpu.value
        return out

    def wait(self, procs: Sequence[Any], timeout: float) -> None:
        """Wait for ``procs`` to exit, sampling memory meanwhile; raise on failure."""
        deadline = time.monotonic() + timeout
        for proc in procs:
            while proc.exitcode is None:
                self.monitor.sample(force=False)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} did not finish within {timeout:.0f} s")
                proc.join(SAMPLE_EVERY)
            if proc.exitcode != 0:
                raise RuntimeError(f"{proc.name} exited with code {proc.exitcode}")

    def receive(self, conn: Any, timeout: float) -> Any:
        """The next object from ``conn``, sampling memory while waiting."""
        deadline = time.monotonic() + timeout
        while not conn.poll(SAMPLE_EVERY):
            self.monitor.sample(force=False)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.pipeline}: no result within {timeout:.0f} s")
        return conn.recv()

    def __enter__(self) -> Spawner:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        grace = time.monotonic() + (10.0 if exc_type is None else 0.0)
        for proc in self.procs:
            proc.join(max(0.0, grace - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        self.monitor.forget_dead()


def _report_cpu(cpu: Any, target: Callable[..., Any], *args: Any) -> None:
    """A child's body: ``target``, then the CPU time it used, for the profile."""
    target(*args)
    usage = resource.getrusage(resource.RUSAGE_SELF)  # microseconds, not clock ticks
    cpu.value = usage.ru_utime + usage.ru_stime


def _tree_cpu(pids: Iterable[int]) -> float:
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


def _udp_socket(rcvbuf: int = SINK_RCVBUF) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:  # as root, beyond net.core.rmem_max: the sink must not be the bottleneck
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    return sock


def _udp_addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"udp:{host}:{port}"


def udp_drops(socks: Iterable[socket.socket]) -> int | None:
    """Datagrams the kernel dropped at these sockets (full receive buffer), from
    /proc/net/udp; None where that file is not there."""
    inodes = {str(os.fstat(s.fileno()).st_ino) for s in socks}
    try:
        with open("/proc/net/udp") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    total = 0
    for line in lines:
        fields = line.split()
        if len(fields) >= 13 and fields[9] in inodes:
            total += int(fields[-1])
    return total


@contextlib.contextmanager
def _closing(q: Any, stop: int = 0) -> Any:
    """Put ``stop`` end marks (None) in ``q`` on the way out, then close it if it is a
    multiprocessing.Queue: its feeder thread is flushed and joined (abandoned after
    an error, when nobody may read any more), so no thread outlives the run."""
    failed = False
    try:
        yield q
    except BaseException:
        failed = True
        raise
    finally:
        for _ in range(stop):
            with contextlib.suppress(Exception):
                q.put(None, timeout=1.0)
        if hasattr(q, "join_thread"):
            if failed:
                q.cancel_join_thread()
            q.close()
            q.join_thread()


class StartLine:
    """The workers of a run get ready (forked, set up), then start together, only
    after the parent took the start time."""

    def __init__(self, workers: int):
        self._ready = _CTX.Barrier(workers + 1)
        self._go = _CTX.Event()

    def wait(self) -> None:
        """In a worker: ready; returns when the parent says go."""
        self._ready.wait(BARRIER_TIMEOUT)
        if not self._go.wait(BARRIER_TIMEOUT):
            os._exit(4)

    def release(self) -> int:
        """In the parent: wait until every worker is ready; the start time (monotonic ns)."""
        self._ready.wait(BARRIER_TIMEOUT)
        t0 = time.monotonic_ns()
        self._go.set()
        return t0


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


def _low_timer_slack() -> None:
    """Ask Linux for precise sleeps (the default slack adds up to 50 us)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 us


# -- child process bodies -------------------------------------------------------


def _count_sink(sock: socket.socket, expected: int, idle: float, conn: Any) -> None:
    """Count datagrams until ``expected`` or ``idle`` seconds of silence."""
    sock.settimeout(idle)
    buf = bytearray(65536)
    recv_into = sock.recv_into
    clock = time.monotonic_ns
    got = first = last = 0
    try:
        while got < expected:
            recv_into(buf)
            last = clock()
            if not got:
                first = last
            got += 1
    except TimeoutError:
        pass
    conn.send((got, first, last))


def _fanout_sink(socks: list[socket.socket], expected: int, idle: float, conn: Any) -> None:
    """Count datagrams over many sockets (epoll), draining each ready socket."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    buf = bytearray(65536)
    clock = time.monotonic_ns
    got = first = last = 0
    while got < expected:
        ready = sel.select(idle)
        if not ready:
            break
        for key, _ in ready:
            recv_into = key.fileobj.recv_into  # type: ignore[union-attr]
            try:
                while True:
                    recv_into(buf)
                    got += 1
            except BlockingIOError:
                pass
        last = clock()
        if not first:
            first = last
    sel.close()
    conn.send((got, first, last))


def _latency_sink(sock: socket.socket, expected: int, skip: int, idle: float, conn: Any) -> None:
    """Receive time minus the raise time the datagram carries (``"t":NS}}`` at its end)."""
    sock.settimeout(idle)
    buf = bytearray(65536)
    recv_into = sock.recv_into
    clock = time.monotonic_ns
    latencies = array.array("q")
    append = latencies.append
    got = 0
    try:
        while got < expected:
            n = recv_into(buf)
            now = clock()
            got += 1
            if got > skip:
                colon = buf.rfind(b":", 0, n)
                append(now - int(buf[colon + 1 : n - 2]))
    except TimeoutError:
        pass
    conn.send(got)
    conn.send_bytes(latencies.tobytes())


def _retry(raise_event: Callable[[str, Any], bool], params: dict[str, Any]) -> None:
    """The lane is full: back off until the event fits (nothing is lost)."""
    deadline = time.monotonic() + GIVE_UP
    while not raise_event(EVENT, params):
        if time.monotonic() > deadline:
            os._exit(3)  # nobody drains: the parent reports the exit code
        time.sleep(BACKOFF)


def _mpevent_producer(bus: EventBus, start: StartLine, count: int, seq0: int) -> None:
    raise_event = bus.raise_event
    base = PARAMS
    start.wait()
    for seq in range(seq0, seq0 + count):
        params = {**base, "seq": seq}
        if not raise_event(EVENT, params):
            _retry(raise_event, params)


def _paced_producer(bus: EventBus, start: StartLine, rate: float, count: int) -> None:
    """Raise ``count`` events at ``rate``/s on a fixed schedule, each carrying its raise time.

    The producer raises every event due within the next PACE_NS (100 us)
    at once, then sleeps (timer slack 1 us) until the next one is due: it
    leaves the CPUs to the sender and the sink, as a worker busy with its own
    work would. Sleeping before every event instead would cost it most of a
    core at 50 % load on this kind of machine (a sleep costs ~20 us of CPU in
    a VM), CPU the sender then lacks. Late (a sleep overshot), it raises what
    is due at once. The raise time in the params is taken at the raise, so
    raising early or late does not bias the figures.
    """
    _low_timer_slack()
    raise_event = bus.raise_event
    clock = time.monotonic_ns
    sleep = time.sleep
    base = PARAMS
    interval = 1e9 / rate
    start.wait()
    begin = clock()
    for seq in range(count):
        due = begin + int(seq * interval)
        ahead = due - clock()
        if ahead > PACE_NS:
            sleep(ahead / 1e9)
        params = {**base, "seq": seq, "t": clock()}
        if not raise_event(EVENT, params):
            _retry(raise_event, params)


def _queue_producer(q: Any, start: StartLine, count: int, seq0: int) -> None:
    put = q.put
    base = PARAMS
    start.wait()
    for seq in range(seq0, seq0 + count):
        put((EVENT, {**base, "seq": seq}))


def _queue_sender(q: Any, batched: bool, target: tuple[str, int]) -> None:
    """Get, encode with orjson, sendto; stop at a ``None``.

    ``batched`` (faster_fifo): take up to FASTER_FIFO_BATCH messages per
    ``get_many``, its fast way. Extra ``None`` in a batch go back for the
    other senders.
    """
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sendto = out.sendto
    dumps = orjson.dumps
    if not batched:
        get = q.get
        while (item := get()) is not None:
            name, params = item
            sendto(dumps({"jsonrpc": "2.0", "method": name, "params": params}), target)
        return
    get_many = q.get_many
    while True:
        try:
            items = get_many(timeout=1.0, max_messages_to_get=FASTER_FIFO_BATCH)
        except queue_module.Empty:
            continue
        for i, item in enumerate(items):
            if item is None:
                for _ in range(items[i + 1 :].count(None)):
                    q.put(None)
                return
            name, params = item
            sendto(dumps({"jsonrpc": "2.0", "method": name, "params": params}), target)


def _queue_consumer(q: Any, batched: bool, counter: Any) -> None:
    """Producer-cost section: empty the queue, count what was taken, until ``None``."""
    if batched:
        while True:
            try:
                items = q.get_many(timeout=1.0, max_messages_to_get=FASTER_FIFO_BATCH)
            except queue_module.Empty:
                continue
            if items[-1] is None:
                return
            counter.value += len(items)
    get = q.get
    while get() is not None:
        counter.value += 1


def _bare_sender(
    targets: list[tuple[str, int]], count: int, connected: bool, start: StartLine, conn: Any
) -> None:
    """Nothing but sendto of a prebuilt datagram, ``count`` times to every target."""
    datagram = DATAGRAM
    clock = time.monotonic_ns
    if connected:
        out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        out.connect(targets[0])
        send = out.send
        start.wait()
        t0 = clock()
        for _ in range(count):
            send(datagram)
    else:
        out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sendto = out.sendto
        start.wait()
        t0 = clock()
        if len(targets) == 1:
            target = targets[0]
            for _ in range(count):
                sendto(datagram, target)
        else:
            for _ in range(count):
                for target in targets:
                    sendto(datagram, target)
    conn.send(clock() - t0)


# =============================================================================
# 1. Producer cost
# =============================================================================

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
    sinks = [_udp_socket(4 << 20) for _ in range(subs_needed)]
    addrs = [_udp_addr(s) for s in sinks]
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
            q = stack.enter_context(_closing(_make_queue(kind, ff), stop=1))
            counter = _CTX.RawValue("Q", 0)
            spawner.start(
                "consumer", _queue_consumer, q, kind == "faster_fifo", counter, pipeline=kind
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


# =============================================================================
# 2. End to end (and the bare sendto loop)
# =============================================================================


def _make_queue(kind: str, ff: Any) -> Any:
    if kind == "mp_queue":
        return _CTX.Queue(maxsize=QUEUE_MAXSIZE)
    return ff.Queue(max_size_bytes=FASTER_FIFO_BYTES)


def run_pipeline(
    kind: str, producers: int, senders: int, total: int, cfg: Config, monitor: MemoryMonitor, ff
) -> dict[str, Any]:
    """One end-to-end run: ``total`` events from ``producers`` processes to one UDP sink.

    ``kind``: mpevent, mp_queue, faster_fifo, bare or bare_connected (one
    process sending a prebuilt datagram ``total`` times).
    """
    mark = CpuMark.now()
    sock = _udp_socket()
    target = sock.getsockname()
    res_r, res_w = _CTX.Pipe(duplex=False)
    bare_r, bare_w = _CTX.Pipe(duplex=False)
    pipeline = "bare" if kind.startswith("bare") else kind
    bare = pipeline == "bare"
    start = StartLine(1 if bare else producers)
    with contextlib.ExitStack() as stack:
        for closer in (sock.close, res_r.close, res_w.close, bare_r.close, bare_w.close):
            stack.callback(closer)
        bus = q = None
        if kind == "mpevent":
            bus = stack.enter_context(EventBus(senders=senders))
            bus.publish_event(EVENT)
            bus.subscribe(EVENT, _udp_addr(sock), expire=None)
            monitor.watch(bus.hub_pid, pipeline, "hub")
            monitor.watch_children(bus.hub_pid, pipeline, "sender", senders)
        elif not bare:
            q = stack.enter_context(_closing(_make_queue(kind, ff)))
        sp = stack.enter_context(Spawner(monitor, pipeline))
        sp.start("sink", _count_sink, sock, total, cfg.idle_timeout, res_w)
        workers: list[Any] = []
        if bare:
            workers.append(
                sp.start(
                    "sender",
                    _bare_sender,
                    [target],
                    total,
                    kind == "bare_connected",
                    start,
                    bare_w,
                )
            )
        elif kind == "mpevent":
            seq0 = 0
            for n in split_evenly(total, producers):
                workers.append(sp.start("producer", _mpevent_producer, bus, start, n, seq0))
                seq0 += n
        else:
            sends = [
                sp.start("sender", _queue_sender, q, kind == "faster_fifo", target)
                for _ in range(senders)
            ]
            seq0 = 0
            for n in split_evenly(total, producers):
                workers.append(sp.start("producer", _queue_producer, q, start, n, seq0))
                seq0 += n
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
            "rate": got / ((last - t0) / 1e9) if got and last > t0 else math.nan,
            "sink_kernel_drops": udp_drops([sock]),
        }
        if bare:
            send_ns = sp.receive(bare_r, cfg.run_timeout)
            result["send_rate"] = total / (send_ns / 1e9)
        if bus is not None:
            result["bus_totals"] = bus.stats()["totals"]
            senders_cpu = _tree_cpu(c.pid for c in psutil.Process(bus.hub_pid).children())
    cpu = sp.cpu_by_role()
    if bus is not None:
        cpu["sender"] = senders_cpu
    # Where the CPU went, per delivered event: the profile behind the rates.
    result["cpu_us_per_event"] = {role: sec / got * 1e6 for role, sec in cpu.items()} if got else {}
    result["other_cores"] = other_cores(mark, CpuMark.now())
    return result


def _e2e_cases(cfg: Config, ff: Any) -> list[tuple[str, int, int]]:
    kinds = [k for k in PIPELINES if k != "faster_fifo" or ff is not None]
    cases = [(k, p, s) for k in kinds for p in cfg.e2e_producers for s in cfg.e2e_senders]
    return [*cases, ("bare", 1, 1), ("bare_connected", 1, 1)]


def end_to_end(cfg: Config, monitor: MemoryMonitor, ff: Any, rng: random.Random) -> dict:
    cases = _e2e_cases(cfg, ff)
    runs: list[dict[str, Any]] = []
    for _ in range(cfg.e2e_rounds):
        order = list(cases)
        rng.shuffle(order)
        for kind, p, s in order:
            runs.append(run_pipeline(kind, p, s, cfg.e2e_events, cfg, monitor, ff))
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
        if kind == "mpevent":
            row["bus_totals"] = _sum_counters(r["bus_totals"] for r in mine)
        roles = sorted({role for r in mine for role in r["cpu_us_per_event"]})
        row["cpu_us_per_event"] = {
            role: median([r["cpu_us_per_event"].get(role, math.nan) for r in mine])
            for role in roles
        }
        summary.append(row)
    by_key = {(r["pipeline"], r["producers"], r["senders"]): r for r in summary}
    for row in summary:
        for base in ("mp_queue", "faster_fifo"):
            other = by_key.get((base, row["producers"], row["senders"]))
            row[f"x_{base}"] = ratio(row["rate"], other["rate"]) if other else None
    return {
        "events_per_run": cfg.e2e_events,
        "rounds": cfg.e2e_rounds,
        "summary": summary,
        "runs": runs,
    }


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _sum_counters(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


# =============================================================================
# 3. Fan-out
# =============================================================================


def run_fanout(
    kind: str, subscribers: int, datagrams: int, cfg: Config, monitor: MemoryMonitor
) -> dict[str, Any]:
    """Datagrams/s from one producer and one sender (or the bare loop) to N sinks."""
    events = max(20, datagrams // subscribers)
    expected = events * subscribers
    mark = CpuMark.now()
    socks = [_udp_socket() for _ in range(subscribers)]
    res_r, res_w = _CTX.Pipe(duplex=False)
    bare_r, bare_w = _CTX.Pipe(duplex=False)
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
                bus.subscribe(EVENT, _udp_addr(s), expire=None)
            monitor.watch(bus.hub_pid, kind, "hub")
            monitor.watch_children(bus.hub_pid, kind, "sender", 1)
        sp = stack.enter_context(Spawner(monitor, kind))
        sp.start("sink", _fanout_sink, socks, expected, cfg.idle_timeout, res_w)
        if bus is not None:
            worker = sp.start("producer", _mpevent_producer, bus, start, events, 0)
        else:
            targets = [s.getsockname() for s in socks]
            worker = sp.start("sender", _bare_sender, targets, events, False, start, bare_w)
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
            "rate": got / ((last - t0) / 1e9) if got and last > t0 else math.nan,
            "sink_kernel_drops": udp_drops(socks),
        }
        if bus is None:
            send_ns = sp.receive(bare_r, cfg.run_timeout)
            result["send_rate"] = expected / (send_ns / 1e9)
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


# =============================================================================
# 4. Latency
# =============================================================================


def run_latency(
    rate: float, seconds: float, cfg: Config, monitor: MemoryMonitor
) -> tuple[dict[str, Any], array.array]:
    """One paced run at ``rate`` events/s; returns its figures and the raw latencies (ns)."""
    count = max(50, int(rate * seconds))
    skip = count // 50  # the first 2 %: lane claim, cold caches
    mark = CpuMark.now()
    sock = _udp_socket()
    res_r, res_w = _CTX.Pipe(duplex=False)
    start = StartLine(1)
    with contextlib.ExitStack() as stack:
        for closer in (sock.close, res_r.close, res_w.close):
            stack.callback(closer)
        bus = stack.enter_context(EventBus(senders=1))
        bus.publish_event(EVENT)
        bus.subscribe(EVENT, _udp_addr(sock), expire=None)
        monitor.watch(bus.hub_pid, "mpevent", "hub")
        monitor.watch_children(bus.hub_pid, "mpevent", "sender", 1)
        sp = stack.enter_context(Spawner(monitor, "mpevent"))
        sp.start("sink", _latency_sink, sock, count, skip, cfg.idle_timeout, res_w)
        producer = sp.start("producer", _paced_producer, bus, start, rate, count)
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
        "achieved_rate": count / ((t1 - t0) / 1e9),
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


# =============================================================================
# Report: targets, tables, JSON, chart
# =============================================================================


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured ratio and PASS/MISS (n/a when not run)."""
    out = []
    cost = results.get("producer_cost", {}).get("cases", {})

    def med(case: str) -> float | None:
        return cost[case]["median"] if case in cost else None

    one, inline, none, many = med("raise_1"), med("inline"), med("raise_0"), med("raise_64")
    out.append(
        target(
            "raise_event 1 subscriber median <= 0.4 x inline",
            ratio(one, inline),
            "<=",
            0.4,
            f"{fmt_num(one)} ns vs {fmt_num(inline)} ns",
        )
    )
    out.append(
        target(
            "raise_event no subscriber median <= 0.05 x inline",
            ratio(none, inline),
            "<=",
            0.05,
            f"{fmt_num(none)} ns vs {fmt_num(inline)} ns",
        )
    )
    out.append(
        target(
            "raise_event 64 subscribers <= 1.1 x 1 subscriber",
            ratio(many, one),
            "<=",
            1.1,
            f"{fmt_num(many)} ns vs {fmt_num(one)} ns",
        )
    )
    e2e = results.get("end_to_end", {}).get("summary", [])
    mine = _find(e2e, pipeline="mpevent", producers=2, senders=1)
    lossless = bool(mine) and mine["lost"] == 0
    for base, limit in (("mp_queue", 3.0), ("faster_fifo", 2.0)):
        other = _find(e2e, pipeline=base, producers=2, senders=1)
        out.append(
            target(
                f"end-to-end 2 producers 1 sender >= {limit:g} x {PIPELINE_LABELS[base]}, 0 loss",
                ratio(mine["rate"], other["rate"]) if mine and other else None,
                ">=",
                limit,
                f"{fmt_num(mine and mine['rate'])} vs {fmt_num(other and other['rate'])} ev/s"
                + (f", mpevent lost {mine['lost']}" if mine else ""),
                ok=lossless,
                note="" if other or not mine else f"{base} not run",
            )
        )
    bare = _find(e2e, pipeline="bare")
    one_sender = [r for r in e2e if r["pipeline"] == "mpevent" and r["senders"] == 1]
    best = max(one_sender, key=lambda r: r["rate"]) if one_sender else None
    out.append(
        target(
            "one sender's delivered rate >= 0.7 x bare sendto loop",
            ratio(best["rate"], bare["send_rate"]) if best and bare else None,
            ">=",
            0.7,
            (
                f"{fmt_num(best['rate'])} ev/s ({best['producers']} producers) vs "
                f"{fmt_num(bare['send_rate'])}/s"
                if best and bare
                else "-"
            ),
        )
    )
    lat = results.get("latency", {}).get("loads", [])
    half = _find(lat, load=0.5)
    p99_ms = half["p99_ns"] / 1e6 if half else None
    out.append(
        target(
            "latency at 50% of capacity p99 <= 1 ms",
            p99_ms,
            "<=",
            1.0,
            f"p99 {fmt_us(half['p99_ns'])} us" if half else "-",
            ok=bool(half) and half["delivered"] == half["raised"],
        )
    )
    return out


def render_report(results: dict[str, Any]) -> str:
    """Every section's table and the targets, as printed."""
    meta = results["meta"]
    parts = [
        f"mpevent benchmark ({meta['mode']}): {meta['cpus']} CPUs, Python {meta['python']}, "
        f"{meta['platform']}; {meta['seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in meta['section_seconds'].items())})"
    ]
    background = meta.get("other_cores") or {}
    if any(v is not None for v in background.values()):
        parts[0] += "\nCPU kept busy by other processes meanwhile (cores, average): " + ", ".join(
            f"{k} {v:.2f}" for k, v in background.items() if v is not None
        )
    speed = meta.get("python_ns_per_step")
    if speed:
        parts[0] += (
            f"\nmachine speed (a fixed pure-Python loop, ns per step; lower is faster): "
            f"{speed[0]:.1f} at the start, {speed[1]:.1f} at the end"
        )
    parts[0] += "".join(f"\nnote: {n}" for n in results["notes"])

    cost = results.get("producer_cost")
    if cost:
        rows = []
        order = [f"raise_{n}" for n in (0, 1, 8, 64)] + ["inline", "mp_queue", "faster_fifo"]
        for case in order:
            c = cost["cases"].get(case)
            if c is None:
                continue
            rows.append(
                [
                    c["label"],
                    fmt_num(c["median"]),
                    fmt_num(c["p99"]),
                    fmt_ratio(c["x_inline"], 3),
                    fmt_num(c["cpu_ns"]),
                ]
            )
        t = cost["cases"]["timer"]
        rows.append([t["label"], fmt_num(t["median"]), fmt_num(t["p99"]), "", fmt_num(t["cpu_ns"])])
        parts.append(
            render_table(
                ["case", "median ns", "p99 ns", "x inline", "CPU ns/call"],
                rows,
                title=(
                    f"1. producer cost per call ({cost['rounds']} rounds x "
                    f"{cost['calls_per_round']} calls per case, each call timed)"
                ),
            )
        )
        bt = cost["bus_totals"]
        parts[-1] += (
            f"\n  mpevent: enqueued {bt['enqueued']}, dropped {bt['dropped']}, "
            f"no_subscriber {bt['no_subscriber']}, dispatched {bt['dispatched']}"
        )

    e2e = results.get("end_to_end")
    if e2e:
        rows = []
        for r in e2e["summary"]:
            if r["pipeline"].startswith("bare"):
                continue
            bus = r.get("bus_totals")
            rows.append(
                [
                    PIPELINE_LABELS[r["pipeline"]],
                    r["producers"],
                    r["senders"],
                    fmt_num(r["rate"]),
                    fmt_ratio(r["x_mp_queue"]) if r["pipeline"] != "mp_queue" else "",
                    fmt_ratio(r["x_faster_fifo"]) if r["pipeline"] == "mpevent" else "",
                    fmt_loss(r["delivered"], r["raised"]),
                    bus["dropped"] if bus else "",
                ]
            )
        parts.append(
            render_table(
                [
                    "pipeline",
                    "prod",
                    "send",
                    "events/s",
                    "x Queue",
                    "x ff",
                    "delivered/raised",
                    "retries",
                ],
                rows,
                title=(
                    f"2. end to end, 1 UDP subscriber ({e2e['rounds']} round(s) x "
                    f"{e2e['events_per_run']} events per case; median events/s)"
                ),
                align="lrrrrrrr",
            )
        )
        for r in e2e["summary"]:
            if r["pipeline"].startswith("bare"):
                parts[-1] += (
                    f"\n  {PIPELINE_LABELS[r['pipeline']]} (1 process, prebuilt datagram): "
                    f"sends {fmt_num(r['send_rate'])}/s, sink got {fmt_num(r['rate'])}/s, "
                    f"{fmt_loss(r['delivered'], r['raised'])}"
                )
        total = _find(e2e["summary"], pipeline="mpevent", producers=2, senders=1)
        if total:
            bt = total["bus_totals"]
            parts[-1] += (
                "\n  mpevent 2p/1s counters: "
                + ", ".join(
                    f"{k} {bt[k]}" for k in ("raised", "enqueued", "dropped", "dispatched", "lost")
                )
                + " (dropped = lane-full retries)"
            )
        parts.append(render_cpu_profile(e2e["summary"]))

    fan = results.get("fanout")
    if fan:
        rows = []
        for n in sorted({r["subscribers"] for r in fan["summary"]}):
            m = _find(fan["summary"], pipeline="mpevent", subscribers=n)
            b = _find(fan["summary"], pipeline="bare", subscribers=n)
            rows.append(
                [
                    n,
                    fmt_num(m and m["rate"]),
                    fmt_num(b and b["send_rate"]),
                    fmt_ratio(m and m.get("x_bare")),
                    f"{m['delivered']}/{m['expected']}" if m else "-",
                    f"{b['delivered']}/{b['expected']}" if b else "-",
                ]
            )
        parts.append(
            render_table(
                [
                    "subscribers",
                    "mpevent dgram/s",
                    "bare sendto/s",
                    "x bare",
                    "mpevent delivered",
                    "bare delivered",
                ],
                rows,
                title=(
                    f"3. fan-out, 1 producer, 1 sender, one selectors sink "
                    f"({fan['rounds']} round(s) x {fan['datagrams_per_run']} datagrams)"
                ),
            )
        )

    lat = results.get("latency")
    if lat:
        rows = [
            [
                f"{r['load']:.0%}",
                fmt_num(r["target_rate"]),
                fmt_num(r["achieved_rate"]),
                fmt_us(r["p50_ns"]),
                fmt_us(r["p99_ns"]),
                fmt_us(r["p999_ns"]),
                fmt_us(r["max_ns"]),
                f"{r['delivered']}/{r['raised']}",
                " / ".join(fmt_us(run["p99_ns"]) for run in r["runs"]),
                fmt_num(r["send_age_p99_us"]),
                fmt_num(r["busy_cores"], 2),
                fmt_num(r["other_cores"], 2),
            ]
            for r in lat["loads"]
        ]
        parts.append(
            render_table(
                [
                    "load",
                    "target ev/s",
                    "achieved",
                    "p50 us",
                    "p99 us",
                    "p99.9 us",
                    "max us",
                    "delivered",
                    "p99 us per round",
                    "raise-to-send p99 <=",
                    "cores busy",
                    "other load",
                ],
                rows,
                title=(
                    f"4. raise-to-receive latency, 1 producer 1 sender "
                    f"(capacity {fmt_num(lat['capacity'])} ev/s, {lat['seconds_per_load']:g} s "
                    f"per load and round)"
                ),
            )
        )

    mem = results.get("memory")
    if mem:
        rows = [
            [
                PIPELINE_LABELS.get(r["pipeline"], r["pipeline"]),
                r["role"],
                r["processes"],
                fmt_bytes(r["peak_rss"]),
                fmt_bytes(r["peak_uss"]),
            ]
            for r in mem["roles"]
        ]
        parts.append(
            render_table(
                ["pipeline", "role", "processes", "peak RSS", "peak USS"],
                rows,
                title=(
                    f"5. memory: peak per process and role; mpevent segment "
                    f"{fmt_bytes(mem['segment_bytes'])} ({mem['segment_bytes']} bytes: "
                    f"{mem['geometry']})"
                ),
                align="llrrr",
            )
        )

    rows = [
        [t["target"], t["figure"], fmt_ratio(t["ratio"], 3), t["goal"], t["verdict"]]
        for t in results["targets"]
    ]
    parts.append(
        render_table(
            ["target", "figures", "ratio", "goal", "verdict"], rows, title="targets", align="llrll"
        )
    )
    return "\n\n".join(parts)


def plot(results: dict[str, Any], path: str) -> str | None:
    """Write a chart of the results; returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install 'mpevent[bench]'): no chart written"
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(f"mpevent benchmark ({results['meta']['mode']}, {results['meta']['cpus']} CPUs)")
    ax = axes[0][0]
    cost = results.get("producer_cost")
    if cost:
        cases = [c for c in cost["cases"] if c != "timer"]
        labels = [cost["cases"][c]["label"].replace(", ", "\n") for c in cases]
        meds = [cost["cases"][c]["median"] for c in cases]
        p99 = [cost["cases"][c]["p99"] for c in cases]
        x = range(len(cases))
        ax.bar([i - 0.2 for i in x], meds, 0.4, label="median")
        ax.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
        ax.set_xticks(list(x), labels, fontsize=7, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("ns per call")
        ax.set_title("1. producer cost")
        ax.legend()
    ax = axes[0][1]
    e2e = results.get("end_to_end")
    if e2e:
        configs = sorted(
            {
                (r["producers"], r["senders"])
                for r in e2e["summary"]
                if not r["pipeline"].startswith("bare")
            }
        )
        kinds = [k for k in PIPELINES if any(r["pipeline"] == k for r in e2e["summary"])]
        width = 0.8 / len(kinds)
        for i, kind in enumerate(kinds):
            vals = [
                (_find(e2e["summary"], pipeline=kind, producers=p, senders=s) or {}).get("rate", 0)
                for p, s in configs
            ]
            ax.bar(
                [j + i * width for j in range(len(configs))],
                vals,
                width,
                label=PIPELINE_LABELS[kind],
            )
        bare = _find(e2e["summary"], pipeline="bare")
        if bare:
            ax.axhline(bare["send_rate"], color="grey", linestyle="--", label="bare sendto loop")
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(configs))], [f"{p}p/{s}s" for p, s in configs]
        )
        ax.set_ylabel("delivered events/s")
        ax.set_title("2. end to end (producers/senders)")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
        ax.legend(fontsize=7, loc="upper center", ncol=2, framealpha=0.9)
    ax = axes[1][0]
    fan = results.get("fanout")
    if fan:
        subs = sorted({r["subscribers"] for r in fan["summary"]})
        m = [
            (_find(fan["summary"], pipeline="mpevent", subscribers=n) or {}).get("rate", 0)
            for n in subs
        ]
        b = [
            (_find(fan["summary"], pipeline="bare", subscribers=n) or {}).get("send_rate", 0)
            for n in subs
        ]
        ax.bar([i - 0.2 for i in range(len(subs))], m, 0.4, label="mpevent delivered")
        ax.bar([i + 0.2 for i in range(len(subs))], b, 0.4, label="bare sendto loop")
        ax.set_xticks(list(range(len(subs))), [str(n) for n in subs])
        ax.set_xlabel("subscribers")
        ax.set_ylabel("datagrams/s")
        ax.set_title("3. fan-out")
        ax.legend(fontsize=7)
    ax = axes[1][1]
    lat = results.get("latency")
    if lat:
        loads = [f"{r['load']:.0%}" for r in lat["loads"]]
        for key, label in (("p50_ns", "p50"), ("p99_ns", "p99"), ("p999_ns", "p99.9")):
            ax.plot(loads, [r[key] / 1000 for r in lat["loads"]], marker="o", label=label)
        ax.axhline(1000, color="red", linestyle=":", label="1 ms")
        ax.set_yscale("log")
        ax.set_xlabel("load (share of capacity)")
        ax.set_ylabel("us")
        ax.set_title("4. raise-to-receive latency")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# =============================================================================
# Entry points
# =============================================================================


def optional_module(name: str) -> Any:
    """The module, or None when it is not installed (tests replace this)."""
    try:
        return __import__(name)
    except ImportError:
        return None


def build_parser(
    prog: str = "python -m mpevent.tools.bench", add_help: bool = True
) -> argparse.ArgumentParser:
    """The benchmark's options (``add_help=False`` to use it as a parent parser)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        add_help=add_help,
        description="Benchmark mpevent against inline sendto, multiprocessing.Queue and "
        "faster_fifo pipelines: producer cost, end-to-end throughput and loss, fan-out, "
        "latency, memory.",
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
    notes: list[str] = []
    ff = optional_module("faster_fifo") if use_faster_fifo else None
    if ff is None:
        notes.append(
            "faster_fifo not installed (pip install 'mpevent[bench]'): its cases are skipped"
            if use_faster_fifo
            else "faster_fifo skipped (--no-faster-fifo)"
        )
    monitor = MemoryMonitor()
    results: dict[str, Any] = {}
    section_seconds: dict[str, float] = {}
    gc.collect()
    steps = (
        ("cost", "producer_cost", lambda: producer_cost(cfg, monitor, ff, rng)),
        ("e2e", "end_to_end", lambda: end_to_end(cfg, monitor, ff, rng)),
        ("fanout", "fanout", lambda: fanout(cfg, monitor, rng)),
        ("latency", "latency", lambda: latency(cfg, monitor, rng)),
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
    with EventBus(senders=1) as bus:
        layout = bus.segment.layout
        g = layout.geometry
        segment = {
            "segment_bytes": layout.size,
            "geometry": f"{g.lanes} lanes x {g.lane_size >> 10} KiB, {g.max_events} events, "
            f"{g.max_subs} subscriptions (EventBus defaults)",
        }
    results["memory"] = {**segment, "roles": monitor.by_role()}
    results["notes"] = notes
    results["meta"] = {
        "mode": cfg.mode,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "faster_fifo": getattr(ff, "__version__", "installed") if ff else None,
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
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(results, option=orjson.OPT_INDENT_2))
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
