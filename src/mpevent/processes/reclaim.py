"""Making lanes' counts exact after producers die: dead producers' lanes are
reclaimed, shared lanes repaired.

A producer killed at any instruction leaves its lane consistent (see
:mod:`mpevent.shm.ring`), but it may have died between publishing a record and
counting it as enqueued: the record is delivered, the count is one short.
So a dead producer's lane is not handed to a new producer at once. The hub
runs :meth:`LaneReclaimer.scan` in its loop, which for each such lane:

1. holds the lane's lock (the kernel dropped the dead owner's), so no
   producer claims it meanwhile;
2. waits until its sender has drained it (``head == tail``);
3. per event, compares what the producer counted as enqueued with what the
   sender took from this lane, and adds the difference (at most one record)
   to ``enqueued``, and counts it in the header's ``repaired`` word;
4. marks the lane free and releases it.

A shared lane (:mod:`mpevent.shm.layout`) is never handed over: its writers
take its lock for each push and count. One killed between publishing and
counting leaves the same one-record gap, so :meth:`LaneReclaimer.scan` also
repairs shared lanes the same way, while it holds the shared lane's lock
itself (so no live writer is between its publish and its count) and only
once the sender has drained the lane. It looks without the lock first (is
anything taken that was not counted?) and only tries the lock, never waits
for it: the hub must not make producers wait, and a busy lane is repaired
on a later pass, once it is drained.

Whether the owner is alive is the kernel's lock, not a pid: a reused pid
cannot fool it.

It logs (``mpevent.reclaim``) each lane a producer claims and each dead
producer's lane it holds (debug), and each lane freed or repaired (info).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mpevent.shm.layout import (
    C_TAKEN,
    H_EVENT_COUNT,
    H_REPAIRED,
    L_CLAIMS,
    L_HEAD,
    L_OWNER_PID,
    L_TAIL,
    P_ENQUEUED,
)
from mpevent.shm.segment import Segment

log = logging.getLogger("mpevent.reclaim")


@dataclass
class Reclaimed:
    lane: int
    owner_pid: int  # 0 for a shared lane: it has no owner
    repaired: int  # records delivered that the dead producer had not counted


class LaneReclaimer:
    def __init__(self, seg: Segment):
        self.seg = seg
        # Each lane's owner pid at the last pass: a change is a producer attaching.
        self._owners = [0] * seg.layout.geometry.lanes

    def scan(self) -> list[Reclaimed]:
        """One pass: hold newly dead lanes, free those whose sender drained
        them, repair drained shared lanes whose counts fell short."""
        seg = self.seg
        words, layout = seg.words, seg.layout
        done = []
        for lane in range(layout.geometry.lanes):
            w = layout.lane_word(lane)
            owner = words[w + L_OWNER_PID]
            if owner != self._owners[lane]:
                self._owners[lane] = owner
                if owner and lane not in seg.held:
                    log.debug("lane %d claimed by producer %d", lane, owner)
            if lane not in seg.held:
                if not seg.hold_dead_lane(lane):
                    continue
                log.debug("producer %d of lane %d is gone: lane held until drained", owner, lane)
            if words[w + L_HEAD] != words[w + L_TAIL]:
                continue  # the sender has not drained it yet
            repaired = self._reconcile(lane)
            seg.free_held_lane(lane)
            words[H_REPAIRED] += repaired
            done.append(Reclaimed(lane, owner, repaired))
            log.info(
                "lane %d of producer %d, now gone, reclaimed (%d uncounted)", lane, owner, repaired
            )
        for lane in layout.shared_lanes():
            repaired = self._repair_shared(lane)
            if repaired:
                words[H_REPAIRED] += repaired
                done.append(Reclaimed(lane, 0, repaired))
                log.info("shared lane %d: %d records of killed writers counted", lane, repaired)
        return done

    def _repair_shared(self, lane: int) -> int:
        words, layout = self.seg.words, self.seg.layout
        w = layout.lane_word(lane)
        if not words[w + L_CLAIMS] or not self._missing(lane):
            return 0  # nobody wrote to it, or nothing is missing (the common case: no syscall)
        lock = self.seg.shared_lane_lock(lane)
        if not lock.try_acquire():
            return 0  # a writer holds it: next pass
        try:
            if words[w + L_HEAD] != words[w + L_TAIL]:
                return 0  # not drained yet: next pass
            return self._reconcile(lane)
        finally:
            lock.release()

    def _missing(self, lane: int) -> list[tuple[int, int]]:
        """Per event the sender took more of from ``lane`` than was counted as
        enqueued: (its ``enqueued`` word, how many more). Read without a lock
        this is also, for a moment, a live writer between publish and count."""
        words, layout = self.seg.words, self.seg.layout
        found = []
        for event_id in range(words[H_EVENT_COUNT]):
            p = layout.prod_counter_word(lane, event_id) + P_ENQUEUED
            missing = words[layout.cons_counter_word(lane, event_id) + C_TAKEN] - words[p]
            if missing > 0:
                found.append((p, missing))
        return found

    def _reconcile(self, lane: int) -> int:
        words = self.seg.words
        repaired = 0
        for enqueued, missing in self._missing(lane):
            words[enqueued] += missing
            repaired += missing
        return repaired
