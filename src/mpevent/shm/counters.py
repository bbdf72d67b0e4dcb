"""Counters: summed from the segment's single-writer blocks into plain data.

Producers count per (lane, event), senders per (lane, event) and per
(sender, subscription); every block has one writer at a time (a shared
lane's producer block: whoever holds the lane's lock), so no increment is
ever lost. Reading sums the blocks of every lane, dedicated and shared; any
process mapping the segment can do it. What each word means is in
:mod:`mpevent.shm.layout`.

Accounting is exact, so users can prove nothing vanished silently. The sums
obey::

    per event:        raised   = enqueued + dropped + rejected  (by definition:
                      each call that finds a subscriber ends in exactly one)
    after a drain:    enqueued = dispatched + unrouted + send_oversize + lost
    per destination:  routed   = sent + failed + dropped + pending

Every term of the last one is counted on its own (``pending`` is what waits
in the destination's backlog, stored by its sender), so it is a check, not
a definition; once the destinations have taken what waited, pending is 0.
Counters are read without a common snapshot: check them on a quiet bus.

A broker destination's events pass through two processes: its senders
count ``routed``, ``dropped`` (a full hand-off lane) and ``handed``; its
relay counts what it took from the hand-off lanes (``relayed``) and their
fates (``sent`` once the broker confirmed, ``failed``, ``dropped``,
``pending``). Between the two, ``in_handoff = handed - relayed`` waits in
the hand-off lanes, and ``pending`` includes it. A virtual subscription's
figures are its members' (``members``) summed: ``routed`` counts every
hand-over to a member, so an event that failed over counts in each member
it tried.

``no_subscriber`` counts raise_event calls that returned at the probe
because nobody was subscribed; they are not "raised".
"""

from __future__ import annotations

from typing import Any

from mpevent.protocol.registry import Snapshot
from mpevent.shm.layout import (
    AGE_BUCKETS,
    CONSUMER_COUNTERS,
    D_HANDED,
    D_ID,
    D_ROUTED,
    DEST_COUNTERS,
    H_REPAIRED,
    L_CLAIMS,
    PRODUCER_COUNTERS,
    S_AGE_HIST,
    S_AGE_MAX,
    S_LOOPS,
)
from mpevent.shm.segment import Segment
from mpevent.shm.table import event_names, read_snapshot

EVENT_COUNTERS = ("raised", *PRODUCER_COUNTERS, *CONSUMER_COUNTERS)


def _claimed_lanes(seg: Segment) -> list[int]:
    """Lanes some producer has written to, dedicated and shared (no claim: all zero)."""
    layout = seg.layout
    return [
        lane
        for lane in range(layout.geometry.ring_lanes)
        if seg.words[layout.lane_word(lane) + L_CLAIMS]
    ]


def shared_lane_writers(seg: Segment) -> int:
    """How many times a process found every dedicated lane owned and began
    writing to a shared lane (each process counts once per shared lane)."""
    layout = seg.layout
    return sum(seg.words[layout.lane_word(lane) + L_CLAIMS] for lane in layout.shared_lanes())


def event_counters(seg: Segment) -> dict[str, dict[str, int]]:
    """Per event name: producer and sender counters summed over lanes."""
    words, layout = seg.words, seg.layout
    names = event_names(seg)
    lanes = _claimed_lanes(seg)
    result: dict[str, dict[str, int]] = {}
    for event_id, name in enumerate(names):
        sums = dict.fromkeys(EVENT_COUNTERS, 0)
        for lane in lanes:
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


DESTINATION_COUNTERS = (*DEST_COUNTERS, "relayed", "in_handoff")


def _member_counters(
    seg: Segment, slot: int, sub_id: int, member: int, relay: int | None
) -> dict[str, int]:
    """One member's counters: its senders' rows, and its relay's row if it has one."""
    words, layout = seg.words, seg.layout
    sums = dict.fromkeys(DESTINATION_COUNTERS, 0)
    for sender in range(layout.geometry.senders):
        w = layout.dest_counter_word(sender, slot, member)
        if words[w + D_ID] != sub_id:
            continue  # this sender has not served the subscription yet
        for i, key in enumerate(DEST_COUNTERS):
            sums[key] += words[w + i]
    if relay is not None:
        w = layout.dest_counter_word(layout.relay_row(relay), slot, member)
        if words[w + D_ID] == sub_id:
            for i, key in enumerate(DEST_COUNTERS):
                if i == D_ROUTED:
                    sums["relayed"] = words[w + i]
                elif i != D_HANDED:
                    sums[key] += words[w + i]
    sums["in_handoff"] = sums["handed"] - sums["relayed"]
    sums["pending"] += sums["in_handoff"]
    return sums


def destination_counters(seg: Segment, snapshot: Snapshot | None = None) -> list[dict[str, Any]]:
    """Per live subscription: its counters summed over the senders (and its
    relays); a virtual subscription also lists each member's (``members``)."""
    if snapshot is None:
        got = read_snapshot(seg)
        snapshot = got[1] if got else Snapshot([])
    names = event_names(seg)
    relays = {spec: r for r, spec in enumerate(snapshot.relays) if spec}
    rows = []
    for route in snapshot.routes:
        dest = route.destination
        members = []
        for m, member in enumerate(dest.members()):
            relay = relays.get(member.spec()) if member.relayed else None
            counts = _member_counters(seg, route.slot, route.sub_id, m, relay)
            members.append({"socket": str(member), **counts})
        sums = {key: sum(m[key] for m in members) for key in DESTINATION_COUNTERS}
        event = names[route.event_id] if route.event_id < len(names) else str(route.event_id)
        row = {"event": event, "socket": str(dest), **sums}
        if dest.kind == "virtual":
            row["members"] = members
        rows.append(row)
    return rows


def age_bound_us(hist: list[int], q: float) -> int | None:
    """An upper bound, in us, on the ``q`` quantile (0..1) of an age histogram
    (see ``S_AGE_HIST``); None when it is empty. The last bucket is open
    (everything older): for it the bound is its lower end, 2**(n-2) us."""
    total = sum(hist)
    if not total:
        return None
    need = q * total
    seen = 0
    last = len(hist) - 1
    for k, n in enumerate(hist):
        seen += n
        if seen >= need or k == last:
            break
    return 1 << k if k < last else 1 << (last - 1)


def sender_counters(seg: Segment) -> list[dict[str, Any]]:
    """Per sender: its loop count and how long its batches' oldest records waited."""
    words, layout = seg.words, seg.layout
    rows = []
    for sender in range(layout.geometry.senders):
        w = layout.sender_word(sender)
        hist = [words[w + S_AGE_HIST + k] for k in range(AGE_BUCKETS)]
        rows.append(
            {
                "sender": sender,
                "loops": words[w + S_LOOPS],
                "age_max_us": words[w + S_AGE_MAX] // 1000,
                "age_hist": hist,
                "age_p50_us": age_bound_us(hist, 0.5),
                "age_p99_us": age_bound_us(hist, 0.99),
            }
        )
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
        "senders": sender_counters(seg),
        "lost_in_flight": totals["lost"],
        "repaired": seg.words[H_REPAIRED],
        "shared_lane_writers": shared_lane_writers(seg),
    }
