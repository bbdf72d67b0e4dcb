"""What the hub stores in the segment for the other processes, and how they read it.

The hub is the only writer of these regions, so they need no lock:

* **event names**: appended, never changed; the count word is stored after
  the name, so a reader that sees the count sees the name;
* **subscriber counts** per event: the producers' "anyone listening?" probe,
  one 8-byte load;
* **the subscription table**: a msgpack :class:`~mpevent.protocol.registry.Snapshot`
  behind a sequence lock. The hub makes the generation odd, writes, makes it
  even; a reader copies the blob and keeps it only if the generation was even
  and unchanged across the copy. A hub killed mid-write leaves it odd:
  readers keep their last good table instead of reading a torn one. The
  generation is the table's one version number: a sender reloads when it
  changes;
* **the info block**: what an attaching process needs to find the daemon.
"""

from __future__ import annotations

import msgspec

from mpevent.protocol.registry import Registry, Snapshot
from mpevent.shm.layout import (
    EVENT_NAME_BYTES,
    H_EVENT_COUNT,
    H_TABLE_GEN,
    HUB_GONE,
    INFO_AT,
    INFO_BYTES,
)
from mpevent.shm.segment import Segment

_decode_snapshot = msgspec.msgpack.Decoder(Snapshot).decode
_encode = msgspec.msgpack.Encoder().encode


class TableTooLarge(ValueError):
    pass


def store_registry(seg: Segment, registry: Registry, known_events: int) -> int:
    """Store everything that changed in ``registry``; returns the event count.

    ``known_events``: how many event names are in the segment already (what
    the previous call returned). :class:`TableTooLarge` when the table does
    not fit ``table_bytes``: the new event names are stored, the table and
    the subscriber counts stay as they were.
    """
    words, buf, layout = seg.words, seg.buf, seg.layout
    # New event names first, then the count that makes them visible.
    for event_id in range(known_events, len(registry.events)):
        raw = registry.events[event_id].encode()
        at = layout.event_name_at(event_id)
        words[at // 8] = len(raw)
        buf[at + 8 : at + 8 + len(raw)] = raw
    words[H_EVENT_COUNT] = len(registry.events)
    # The table before the counts: a producer that sees a subscriber count
    # go up raises an event that the sender can route.
    blob = _encode(registry.snapshot())
    capacity = layout.geometry.table_bytes - 8
    if len(blob) > capacity:
        raise TableTooLarge(
            f"subscription table needs {len(blob)} bytes, table_bytes allows {capacity}"
        )
    gen = words[H_TABLE_GEN]
    words[H_TABLE_GEN] = gen + 1 if gen % 2 == 0 else gen + 2  # odd: writing
    at = layout.table_at
    words[at // 8] = len(blob)
    buf[at + 8 : at + 8 + len(blob)] = blob
    words[H_TABLE_GEN] = words[H_TABLE_GEN] + 1  # even: consistent
    counts = registry.counts()
    for event_id in range(layout.geometry.max_events):
        n = counts[event_id] if event_id < len(counts) else 0
        w = layout.sub_count_word(event_id)
        if words[w] != n:
            words[w] = n
    return len(registry.events)


def clear_counts(seg: Segment) -> None:
    """Tell every producer's probe that the hub is gone (stopping): they refuse
    new events at once, count them as undelivered, and look for a new hub."""
    layout = seg.layout
    for event_id in range(layout.geometry.max_events):
        seg.words[layout.sub_count_word(event_id)] = HUB_GONE


def table_generation(seg: Segment) -> int:
    return seg.words[H_TABLE_GEN]


def read_snapshot(seg: Segment) -> tuple[int, Snapshot] | None:
    """(generation, snapshot), or None while the hub is writing it."""
    words, layout = seg.words, seg.layout
    gen = words[H_TABLE_GEN]
    if gen % 2:
        return None
    at = layout.table_at
    n = words[at // 8]
    if n > layout.geometry.table_bytes - 8:
        return None
    blob = bytes(seg.buf[at + 8 : at + 8 + n])
    if words[H_TABLE_GEN] != gen:
        return None
    if n == 0:
        return gen, Snapshot([])
    return gen, _decode_snapshot(blob)


def event_names(seg: Segment, start: int = 0) -> list[str]:
    """Names of events ``start``.. as declared so far."""
    words, buf, layout = seg.words, seg.buf, seg.layout
    names = []
    for event_id in range(start, words[H_EVENT_COUNT]):
        at = layout.event_name_at(event_id)
        n = min(words[at // 8], EVENT_NAME_BYTES - 8)
        names.append(bytes(buf[at + 8 : at + 8 + n]).decode())
    return names


def write_info(seg: Segment, info: dict) -> None:
    """What an attaching process needs to find the daemon (MI, doorbells)."""
    blob = msgspec.json.encode(info)
    if len(blob) > INFO_BYTES - 8:
        raise ValueError(f"segment info is {len(blob)} bytes, max {INFO_BYTES - 8}")
    seg.buf[INFO_AT + 8 : INFO_AT + 8 + len(blob)] = blob
    seg.words[INFO_AT // 8] = len(blob)


def read_info(seg: Segment) -> dict:
    n = min(seg.words[INFO_AT // 8], INFO_BYTES - 8)
    if not n:
        return {}
    return msgspec.json.decode(bytes(seg.buf[INFO_AT + 8 : INFO_AT + 8 + n]))
