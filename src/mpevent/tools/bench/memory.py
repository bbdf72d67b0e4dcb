"""Section 5, memory: peak RSS and USS of every process per role, and the segment's size.

:class:`MemoryMonitor` is handed to every section: each process a run
starts is watched (a hub's senders too, found once the hub has forked
them) and sampled while the run goes on; :func:`memory` then reports the
peaks per pipeline and role, next to the size of a segment with
``EventBus``'s defaults. A process that is gone is forgotten, its peak kept.
"""

from __future__ import annotations

import time
from typing import Any

import psutil

from mpevent.api.bus import EventBus
from mpevent.tools.bench.config import PIPELINES

SAMPLE_EVERY = 0.05  # seconds between RSS samples while a run goes on
USS_EVERY = 1.0  # seconds between USS samples (reading smaps costs CPU the runs need)


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


def memory(monitor: MemoryMonitor) -> dict[str, Any]:
    """The section's figures: the segment's size and geometry, the peaks per role."""
    with EventBus(senders=1) as bus:
        layout = bus.segment.layout
        g = layout.geometry
        segment = {
            "segment_bytes": layout.size,
            "geometry": f"{g.lanes} lanes x {g.lane_size >> 10} KiB, {g.max_events} events, "
            f"{g.max_subs} subscriptions (EventBus defaults)",
        }
    return {**segment, "roles": monitor.by_role()}
