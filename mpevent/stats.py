"""Counters: summed from the segment's single-writer blocks into plain data.

Producers count per (lane, event), senders per (lane, event) and per
(sender, subscription); every block has one writer, so no increment is ever
lost. Reading sums the blocks; any process mapping the segment can do it.

The sums obey (guarantee 4, "accounting is exact")::

    per event:        raised   = enqueued + dropped + rejected  (by definition:
                      each call that finds a subscriber ends in exactly one)
    after a drain:    enqueued = dispatched + unrouted + send_oversize + lost
    per destination:  routed   = sent + failed + dropped + pending

``no_subscriber`` counts raise_event calls that returned at the probe
because nobody was subscribed; they are not "raised".
"""

from __future__ import annotations

from typing import Any

from .layout import (
    CONSUMER_COUNTERS,
    D_ID,
    DEST_COUNTERS,
    H_REPAIRED,
    L_CLAIMS,
    PRODUCER_COUNTERS,
)
from .registry import Snapshot
from .segment import Segment
from .table import event_names, read_snapshot

EVENT_COUNTERS = ("raised", *PRODUCER_COUNTERS, *CONSUMER_COUNTERS)


def _claimed_lanes(seg: Segment) -> list[int]:
    layout = seg.layout
    return [
        lane
        for lane in range(layout.geometry.lanes)
        if seg.words[layout.lane_word(lane) + L_CLAIMS]
    ]


def event_counters(seg: Segment) -> dict[str, dict[str, int]]:
    """Per event name: producer and sender counters summed over lanes."""
    words, layout = seg.words, seg.layout
    names = event_names(seg)
    lanes = _claimed_lanes(seg)
    result: dict[str, dict[str, int]] = {}
    for event_id, name in enumerate(names):
        sums = dict.fromkeys(EVENT_COUNTERS, 0)
        # The spare block (index == lanes) counts producers that had no lane.
        for lane in [*lanes, layout.geometry.lanes]:
            w = layout.prod_counter_word(lane, event_id)
            for i, key in enumerate(PRODUCER_COUNTERS):
                sums[key] += words[w + i]
        sums["raised"] = sums["enqueued"] + sums["dropped"] + sums["rejected"]
        for lane in lanes:
            w = layout.cons_counter_word(lane, event_id)
            for i, key in enumerate(CONSUMER_COUNTERS):
                sums[key] += words[w + i]
        result[name] = sums
    return result


def destination_counters(seg: Segment, snapshot: Snapshot | None = None) -> list[dict[str, Any]]:
    """Per live subscription: sender counters summed over senders."""
    words, layout = seg.words, seg.layout
    if snapshot is None:
        got = read_snapshot(seg)
        snapshot = got[1] if got else Snapshot(0, [])
    names = event_names(seg)
    rows = []
    for route in snapshot.routes:
        sums = dict.fromkeys(DEST_COUNTERS, 0)
        for sender in range(layout.geometry.senders):
            w = layout.dest_counter_word(sender, route.slot)
            if words[w + D_ID] != route.sub_id:
                continue  # this sender has not served the subscription yet
            for i, key in enumerate(DEST_COUNTERS):
                sums[key] += words[w + i]
        sums["pending"] = sums["routed"] - sums["sent"] - sums["failed"] - sums["dropped"]
        event = names[route.event_id] if route.event_id < len(names) else str(route.event_id)
        rows.append({"event": event, "socket": str(route.destination), **sums})
    return rows


def collect(seg: Segment) -> dict[str, Any]:
    """Everything, as plain data (what ``EventBus.stats()`` returns)."""
    events = event_counters(seg)
    totals = dict.fromkeys(EVENT_COUNTERS, 0)
    for sums in events.values():
        for key, value in sums.items():
            totals[key] += value
    destinations = destination_counters(seg)
    return {
        "events": events,
        "destinations": destinations,
        "totals": totals,
        "lost_in_flight": totals["lost"],
        "repaired": seg.words[H_REPAIRED],
    }
