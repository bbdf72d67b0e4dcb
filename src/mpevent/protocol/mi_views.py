"""What the MI shows of the counters and processes, in OpenSIPS's terms (pure).

The MI method table (:mod:`mpevent.protocol.mi`) answers
``get_statistics``, ``reset_statistics`` and ``ps`` from what this module
builds:

* :func:`flat_statistics` names every counter the way OpenSIPS names its
  statistics, ``group:name`` (``mpevent:raised``,
  ``event:E_X.enqueued``, ``destination:E_X@udp:127.0.0.1:9.sent``);
* :class:`StatisticsView` keeps the reset baselines: OpenSIPS resets a
  statistic to zero, but mpevent's counters are single-writer words in
  shared memory that only their writer may change, so a reset remembers
  the value it saw and later reads subtract it (a gauge, ``pending``, is
  never reset);
* :func:`ps_rows` shapes the ``ps`` table from the processes the hub
  knows and what the operating system says of each.

No I/O: the hub passes in the counters (``mpevent.shm.counters.collect``)
and a function that measures a process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

# Per-destination counters the MI shows, summed over destinations too.
DESTINATION_STATISTICS = ("sent", "bytes", "failed", "dropped", "pending")
# ... and only per destination.
DESTINATION_ERRORS = ("econnrefused", "enoent")
GAUGES = ("pending",)  # a level, not a count: a reset does not apply to it


def flat_statistics(data: dict[str, Any]) -> dict[str, int]:
    """OpenSIPS-style statistic names for the counters ``data`` holds."""
    flat: dict[str, int] = {}
    for key, value in data["totals"].items():
        flat[f"mpevent:{key}"] = value
    for name, sums in data["events"].items():
        for key, value in sums.items():
            flat[f"event:{name}.{key}"] = value
    rows = data["destinations"]
    for key in DESTINATION_STATISTICS:
        flat[f"mpevent:destination_{key}"] = sum(row[key] for row in rows)
    for row in rows:
        for key in (*DESTINATION_STATISTICS, *DESTINATION_ERRORS):
            flat[f"destination:{row['event']}@{row['socket']}.{key}"] = row[key]
    return flat


def _is_gauge(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in GAUGES or name.rsplit("_", 1)[-1] in GAUGES


class StatisticsView:
    """Statistics as the MI shows them: counters less what was reset."""

    def __init__(self) -> None:
        self._baseline: dict[str, int] = {}

    def read(self, flat: dict[str, int]) -> dict[str, int]:
        base = self._baseline
        return {name: value - base.get(name, 0) for name, value in flat.items()}

    def reset(self, flat: dict[str, int], names: Iterable[str]) -> None:
        """Make ``names`` read 0 from now on (unknown names and gauges are ignored)."""
        current = self.read(flat)
        for name in names:
            if name in current and not _is_gauge(name):
                self._baseline[name] = self._baseline.get(name, 0) + current[name]


Measure = Callable[[int], "tuple[float, int] | None"]  # pid -> (CPU seconds, RSS) or gone


def ps_rows(processes: Iterable[tuple[int, str]], measure: Measure) -> list[dict[str, Any]]:
    """The ``ps`` table: one row per live process, numbered as OpenSIPS numbers them."""
    rows: list[dict[str, Any]] = []
    for pid, role in processes:
        facts = measure(pid)
        if facts is None:
            continue  # gone meanwhile
        cpu, rss = facts
        rows.append({"ID": len(rows), "PID": pid, "Type": role, "CPU": round(cpu, 3), "RSS": rss})
    return rows
