"""Reclaiming the lanes of producers that died, with their counters made exact.

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

Whether the owner is alive is the kernel's lock, not a pid: a reused pid
cannot fool it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mpevent.shm.layout import (
    C_TAKEN,
    H_EVENT_COUNT,
    H_REPAIRED,
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
    owner_pid: int
    repaired: int  # records delivered that the dead producer had not counted


class LaneReclaimer:
    def __init__(self, seg: Segment):
        self.seg = seg

    def scan(self) -> list[Reclaimed]:
        """One pass: hold newly dead lanes, free those whose sender drained them."""
        seg = self.seg
        words, layout = seg.words, seg.layout
        done = []
        for lane in range(layout.geometry.lanes):
            w = layout.lane_word(lane)
            if lane not in seg.held and not seg.hold_dead_lane(lane):
                continue
            if words[w + L_HEAD] != words[w + L_TAIL]:
                continue  # the sender has not drained it yet
            owner = words[w + L_OWNER_PID]
            repaired = self._reconcile(lane)
            seg.free_held_lane(lane)
            words[H_REPAIRED] += repaired
            done.append(Reclaimed(lane, owner, repaired))
            log.info(
                "lane %d of producer %d, now gone, reclaimed (%d uncounted)", lane, owner, repaired
            )
        return done

    def _reconcile(self, lane: int) -> int:
        words, layout = self.seg.words, self.seg.layout
        repaired = 0
        for event_id in range(words[H_EVENT_COUNT]):
            p = layout.prod_counter_word(lane, event_id)
            c = layout.cons_counter_word(lane, event_id)
            missing = words[c + C_TAKEN] - words[p + P_ENQUEUED]
            if missing > 0:
                words[p + P_ENQUEUED] += missing
                repaired += missing
        return repaired
