"""Locust users that call mpevent's ``raise_event`` from locust's own processes.

The point is fork safety under a real tool. The connection is made **once,
at import**, in the process that loads this file. With ``locust --processes
N`` that process then forks its N workers (``gevent.fork``); each worker
inherits the connection and mpevent gives it its own lane on its first
raise, with no call after the fork (``os.register_at_fork``). Nothing here
reconnects or re-initialises in the children: if mpevent got that wrong,
two processes would write one single-producer lane and the sink would see
corrupt, missing or reordered events.

Each task raises ``E_LOAD`` ``{"pid", "user", "seq", "t"}`` (``seq`` counts
per process, so the sink can check per-process order; ``t`` is
``time.monotonic_ns()`` at the raise, for raise-to-receive latency) and
reports to locust's statistics: response time = the ``raise_event`` call in
milliseconds (a float: it is a few microseconds), a failure when it returns
False (lane full: dropped; or nobody subscribed). Users pace themselves with
``constant_throughput`` (``--raise-rate`` raises/s each) instead of spinning.

Locust's tables print whole milliseconds, so at the end the master also
prints the raise_event duration in microseconds and the lane of every locust
process (each worker sends its histogram with its stats reports; the
percentiles of the histograms are :func:`mpevent.tools.figures.percentile`'s,
as the benchmark's).

Configuration: ``MPEVENT_NAME`` (environment, read at import: the segment of
the ``mpevent serve`` to attach to, default ``mpevent``); ``--raise-rate``
and ``--raise-pad`` (locust options, also in the web UI).
See loadtest/README.md.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from locust import User, constant_throughput, events, stats, task
from locust.runners import MasterRunner, WorkerRunner

import mpevent
from mpevent.tools.figures import percentile

NAME = os.environ.get("MPEVENT_NAME", "mpevent")
EVENT = "E_LOAD"

# Attach before locust forks its worker processes: the children inherit this
# connection and must each get a lane of their own without any help.
try:
    conn = mpevent.connect(NAME, timeout=5.0)
except mpevent.NotServing as exc:
    raise SystemExit(
        f"raise_locustfile: no `mpevent serve --name {NAME}` is running ({exc}); "
        "start it first, or set MPEVENT_NAME"
    ) from None
conn.publish_event(EVENT)
raise_event = conn.raise_event
clock = time.monotonic_ns


# Locust keeps its percentiles in buckets of whole milliseconds below 100 ms,
# so every raise would land in the 0 ms bucket. Locust lets a test replace the
# bucketing function: keep two significant digits below 1 ms as well.
_locust_bucket = stats.bucket_response_time


def _bucket(response_time: float) -> float:
    if 0 < response_time < 1:
        return float(f"{response_time:.2g}")
    return _locust_bucket(response_time)


stats.bucket_response_time = _bucket


class RaiseDropped(Exception):
    """raise_event returned False: the lane was full, the event is counted as dropped."""


class NoSubscriber(Exception):
    """raise_event returned False: nobody is subscribed (is loadtest/sink.py running?)."""


# -- per-process raise_event durations, reported to the master ----------------


def bucket_ns(ns: int) -> int:
    """Two significant digits: a bounded histogram whatever the run length."""
    if ns < 100:
        return max(ns, 0)
    scale = 10 ** (len(str(ns)) - 2)
    return ns // scale * scale


class Durations:
    """raise_event durations of this process: a histogram, sent as deltas."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.hist: dict[int, int] = {}
        self.ok = 0
        self.failed = 0

    def add(self, ns: int, ok: bool) -> None:
        key = bucket_ns(ns)
        self.hist[key] = self.hist.get(key, 0) + 1
        if ok:
            self.ok += 1
        else:
            self.failed += 1


local = Durations()
# Master side: pid -> merged totals of that worker process.
workers: dict[int, dict[str, Any]] = {}
_seq = 0


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("mpevent raise_event load")
    group.add_argument(
        "--raise-rate",
        type=float,
        default=100.0,
        env_var="LOCUST_RAISE_RATE",
        help="raise_event calls per second per user (constant_throughput); default 100",
    )
    group.add_argument(
        "--raise-pad",
        type=int,
        default=0,
        env_var="LOCUST_RAISE_PAD",
        help="extra bytes of payload per event (a 'pad' string); default 0",
    )


@events.report_to_master.add_listener
def _report(client_id: str, data: dict[str, Any]) -> None:
    data["mpevent_raise"] = {
        "pid": os.getpid(),
        "lane": conn.producer.lane,
        "hist": list(local.hist.items()),  # msgpack maps want str keys: pairs
        "ok": local.ok,
        "failed": local.failed,
    }
    local.reset()


@events.worker_report.add_listener
def _worker_report(client_id: str, data: dict[str, Any]) -> None:
    got = data.get("mpevent_raise")
    if not got:
        return
    row = workers.setdefault(got["pid"], {"lane": -1, "hist": {}, "ok": 0, "failed": 0})
    row["lane"] = got["lane"]
    row["ok"] += got["ok"]
    row["failed"] += got["failed"]
    for key, count in got["hist"]:
        row["hist"][key] = row["hist"].get(key, 0) + count


@events.quitting.add_listener
def _summary(environment, **kwargs) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        return
    rows = dict(workers)
    if not isinstance(runner, MasterRunner) and (local.ok or local.failed):
        rows[os.getpid()] = {
            "lane": conn.producer.lane,
            "hist": local.hist,
            "ok": local.ok,
            "failed": local.failed,
        }
    if not rows:
        return
    lines = [f"raise_event {EVENT} per locust process (duration in microseconds):"]
    merged: dict[int, int] = {}
    for pid, row in sorted(rows.items()):
        hist = row["hist"]
        for key, count in hist.items():
            merged[key] = merged.get(key, 0) + count
        if hist:
            lines.append(
                f"  pid {pid:>7}  lane {row['lane']:>2}  enqueued {row['ok']:>9,}  "
                f"failed {row['failed']:>7,}  p50 {percentile(hist, 50) / 1e3:7.1f}  "
                f"p99 {percentile(hist, 99) / 1e3:7.1f}  max {max(hist) / 1e3:8.1f}"
            )
    if merged:
        lines.append(
            f"  all         {len(rows)} processes              "
            f"p50 {percentile(merged, 50) / 1e3:7.1f}  p99 {percentile(merged, 99) / 1e3:7.1f}  "
            f"max {max(merged) / 1e3:8.1f}"
        )
    lanes = [row["lane"] for row in rows.values() if row["lane"] >= 0]
    distinct = len(set(lanes)) == len(lanes)
    lines.append(
        f"  each locust process raised on its own lane: {'yes' if distinct else 'NO'} "
        f"(lanes {sorted(lanes)})"
    )
    print("\n".join(lines), file=sys.stderr, flush=True)


class RaiseUser(User):
    """Raises E_LOAD at ``--raise-rate`` per second through the shared connection."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        rate = options.raise_rate if options is not None else 100.0
        pad = options.raise_pad if options is not None else 0
        self._pace = constant_throughput(rate)
        self._pad = "x" * pad
        self._fire = self.environment.events.request.fire

    def wait_time(self) -> float:
        return self._pace(self)

    @task
    def raise_one(self) -> None:
        global _seq
        params: dict[str, Any] = {"pid": os.getpid(), "user": id(self) & 0xFFFFFF, "seq": _seq}
        if self._pad:
            params["pad"] = self._pad
        _seq += 1
        # No greenlet switch can happen from here to the push (no I/O), so
        # seq order is the order of the records in this process's lane.
        start = params["t"] = clock()
        ok = raise_event(EVENT, params)
        took = clock() - start
        local.add(took, ok)
        exception = None
        if not ok:
            exception = (
                RaiseDropped("lane full: event dropped (mpevent counts it)")
                if conn.producer.has_subscribers(EVENT)
                else NoSubscriber("nobody subscribed to E_LOAD: is loadtest/sink.py running?")
            )
        self._fire(
            request_type="mpevent",
            name=f"raise_event {EVENT}",
            response_time=took / 1e6,
            response_length=0,
            exception=exception,
            context={},
        )
