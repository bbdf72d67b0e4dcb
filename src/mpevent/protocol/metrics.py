"""The Prometheus text exposition format (version 0.0.4) of mpevent's counters (pure).

``GET /metrics`` on the MI's HTTP listener (:mod:`mpevent.api.mihttp`)
answers with :func:`render`, which turns plain data into the text:

* the counters as :func:`mpevent.shm.counters.collect` sums them (its
  ``events``, ``destinations`` and ``senders``; ``repaired`` and
  ``shared_lane_writers`` when present);
* the hub's uptime, start time and version;
* the ``ps`` rows of :func:`mpevent.protocol.mi_views.ps_rows`.

Every counter is one of the segment's counted words (never reset: the MI's
``reset_statistics`` baselines do not apply here, Prometheus takes rates),
so ``rate()`` works on each. Names follow Prometheus's conventions:
``mpevent_`` prefix, counters end in ``_total``, units in the name
(``_seconds``, ``_bytes``).

A sender's batch wait is a histogram of the segment's age buckets: word
``k`` counts events whose batch's oldest record was younger than 2**k us
when the batch was sent, the last one everything older. So bucket ``k`` is
``le = 2**k us`` (cumulative, as Prometheus wants), the open one is only in
``+Inf``. An age of exactly 2**k us falls in the next bucket (the sender
compares with ``<``), a difference of one nanosecond at the edge. There is
no ``_sum``: the segment does not keep one, and an estimate from the
buckets (each age only known within a factor of two) would make
``rate(_sum) / rate(_count)`` look exact when it is not; quantiles
(``histogram_quantile``) need only the buckets, and ``..._max_seconds``
says the worst wait seen. Prometheus's and prometheus_client's parsers
accept a histogram without ``_sum``.

No I/O, no shared memory: tests render crafted data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "mpevent_"

# Per event (label ``event``): the counter each summed word feeds, and what it means.
EVENT_METRICS = (
    ("raised", "raise_event calls that found a subscriber (enqueued + dropped + rejected)"),
    ("enqueued", "events written to a lane"),
    ("dropped", "events refused because the producer's lane was full"),
    ("rejected", "events refused for bad params or size"),
    ("oversize", "events refused as larger than a notification may be (among rejected)"),
    ("no_subscriber", "raise_event calls that returned at once: nobody was subscribed"),
    ("taken", "records the senders took from the lanes"),
    ("dispatched", "events the senders handed to every subscriber's endpoint"),
    ("unrouted", "events whose subscribers had all gone by the time they were sent"),
    ("send_oversize", "events the senders refused to send as too large"),
    ("lost", "events taken by a sender that was killed before it sent them"),
)
# Per destination (labels ``event``, ``socket``): metric suffix, row key, type, help.
DESTINATION_METRICS = (
    ("routed_total", "routed", "counter", "notifications handed to the destination's endpoint"),
    ("sent_total", "sent", "counter", "notifications sent (a broker's: confirmed)"),
    ("bytes_total", "bytes", "counter", "bytes of the sent notifications"),
    ("failed_total", "failed", "counter", "notifications whose send failed"),
    ("dropped_total", "dropped", "counter", "notifications not kept: backlog full or discarded"),
    ("pending", "pending", "gauge", "notifications waiting for the destination now"),
)
PROCESS_TYPES = ("hub", "sender", "relay", "producer")


def escape_label_value(value: str) -> str:
    """A label value as the text format writes it between quotes."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers exact, floats shortest, infinities as Go writes them."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Family:
    """One metric family: its HELP and TYPE lines, then its samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = PREFIX + name
        self.kind = kind
        self.help = help_text
        self.samples: list[tuple[str, dict[str, str], float]] = []

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append((suffix, labels, value))

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {_escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.kind}"
        for suffix, labels, value in self.samples:
            if labels:
                inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
                yield f"{self.name}{suffix}{{{inner}}} {format_value(value)}"
            else:
                yield f"{self.name}{suffix} {format_value(value)}"


def _event_families(events: Mapping[str, Mapping[str, int]]) -> list[_Family]:
    families = []
    for key, help_text in EVENT_METRICS:
        family = _Family(f"event_{key}_total", "counter", f"Per event: {help_text}.")
        for event, sums in events.items():
            family.add(sums.get(key, 0), event=event)
        families.append(family)
    return families


def _destination_families(rows: Iterable[Mapping[str, Any]]) -> list[_Family]:
    # Two subscriptions whose sockets differ only in a masked password print
    # alike: one series each would be a duplicate Prometheus refuses, so
    # their figures are added up under the printed label.
    merged: dict[tuple[str, str], dict[str, int]] = {}
    for row in rows:
        sums = merged.setdefault((row["event"], row["socket"]), {})
        for _, key, _, _ in DESTINATION_METRICS:
            sums[key] = sums.get(key, 0) + row.get(key, 0)
    families = []
    for suffix, key, kind, help_text in DESTINATION_METRICS:
        family = _Family(f"destination_{suffix}", kind, f"Per subscription: {help_text}.")
        for (event, sock), sums in merged.items():
            family.add(sums[key], event=event, socket=sock)
        families.append(family)
    return families


def age_bucket_bounds(buckets: int) -> list[float]:
    """The ``le`` bounds, in seconds, of an age histogram of ``buckets`` words
    (the last, open bucket has none: it is in ``+Inf`` only)."""
    return [(1 << k) / 1e6 for k in range(buckets - 1)]


def _sender_families(senders: Iterable[Mapping[str, Any]]) -> list[_Family]:
    wait = _Family(
        "sender_batch_wait_seconds",
        "histogram",
        "Events by how long their batch's oldest record waited, raise to send "
        "(an upper bound for each event in the batch). No _sum: the segment keeps none.",
    )
    wait_max = _Family(
        "sender_batch_wait_max_seconds",
        "gauge",
        "The longest a batch's oldest record waited, raise to send, since the segment was made.",
    )
    loops = _Family("sender_loops_total", "counter", "Passes of the sender's loop.")
    for row in senders:
        sender = str(row["sender"])
        hist = list(row["age_hist"])
        seen = 0
        for bound, count in zip(age_bucket_bounds(len(hist)), hist, strict=False):
            seen += count
            wait.add(seen, "_bucket", sender=sender, le=format_value(bound))
        total = sum(hist)
        wait.add(total, "_bucket", sender=sender, le="+Inf")
        wait.add(total, "_count", sender=sender)
        wait_max.add(row["age_max_us"] / 1e6, sender=sender)
        loops.add(row["loops"], sender=sender)
    return [wait, wait_max, loops]


def process_type(role: str) -> str:
    """``hub``, ``sender``, ``relay`` or ``producer`` from a ``ps`` row's Type
    (``"sender 0"``, ``"producer lane 3"``)."""
    return role.split(" ", 1)[0]


def _process_families(processes: Iterable[Mapping[str, Any]]) -> list[_Family]:
    count = _Family("processes", "gauge", "Live processes by type.")
    cpu = _Family("process_cpu_seconds_total", "counter", "CPU time (user and system) used.")
    rss = _Family("process_resident_memory_bytes", "gauge", "Resident memory size.")
    by_type = dict.fromkeys(PROCESS_TYPES, 0)
    for row in processes:
        role = str(row["Type"])
        kind = process_type(role)
        by_type[kind] = by_type.get(kind, 0) + 1
        # Labelled by role, not pid: a role (sender 0, producer lane 3) is one
        # series across respawns, a counter reset to Prometheus.
        cpu.add(float(row["CPU"]), type=kind, process=role)
        rss.add(int(row["RSS"]), type=kind, process=role)
    for kind, n in by_type.items():
        count.add(n, type=kind)
    return [count, cpu, rss]


def render(
    counters: Mapping[str, Any],
    *,
    uptime: float,
    processes: Iterable[Mapping[str, Any]] = (),
    start_time: float | None = None,
    version: str | None = None,
) -> str:
    """The text ``GET /metrics`` answers.

    ``counters``: :func:`~mpevent.shm.counters.collect`'s shape (``events``,
    ``destinations``, ``senders``; ``repaired`` and ``shared_lane_writers``
    optional); ``uptime`` in seconds; ``processes``: ``ps`` rows (``Type``,
    ``CPU`` seconds, ``RSS`` bytes); ``start_time``: the hub's, Unix seconds.
    """
    families: list[_Family] = []
    if version is not None:
        info = _Family("info", "gauge", "Always 1; the version in a label.")
        info.add(1, version=version)
        families.append(info)
    up = _Family("uptime_seconds", "gauge", "Seconds since the hub started.")
    up.add(float(uptime))
    families.append(up)
    if start_time is not None:
        start = _Family("start_time_seconds", "gauge", "When the hub started, Unix time.")
        start.add(float(start_time))
        families.append(start)
    families += _process_families(processes)
    families += _event_families(counters.get("events", {}))
    families += _destination_families(counters.get("destinations", ()))
    families += _sender_families(counters.get("senders", ()))
    if "repaired" in counters:
        repaired = _Family(
            "repaired_records_total",
            "counter",
            "Records delivered that a killed producer had not counted, added to enqueued.",
        )
        repaired.add(counters["repaired"])
        families.append(repaired)
    if "shared_lane_writers" in counters:
        shared = _Family(
            "shared_lane_writers_total",
            "counter",
            "Times a process found every dedicated lane owned and wrote to a shared lane.",
        )
        shared.add(counters["shared_lane_writers"])
        families.append(shared)
    return "".join(line + "\n" for family in families for line in family.lines())
