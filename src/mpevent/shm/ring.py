"""One lane of the ring: a single-producer single-consumer byte ring.

A lane is a control block (``tail`` written only by its producer, ``head``
written only by its consumer, on separate cache lines) and ``size`` bytes of
data, a power of two. ``head`` and ``tail`` are byte positions that only grow
(64-bit: they never wrap in practice); the offset in the data is
``position & (size - 1)``.

A record is a 16-byte header followed by the body, padded to 8 bytes. The
header is two native 64-bit words: ``length | event_id << 32 | flags << 48``
and the raise time in ns; words, not ``struct``, because they are the
cheapest stores and loads Python has. A record never straddles the end of
the data: when it does not fit, the producer writes a header with
``FLAG_WRAP`` (or, when fewer than 16 bytes remain, nothing: the consumer
knows such a tail end is padding) and starts again at offset 0.

Why a reader never sees a half-written record
---------------------------------------------
The producer writes the header and body first and publishes the new ``tail``
last, with one aligned 8-byte store (a ``memoryview`` cast to ``Q``: CPython
copies the item with a single ``memcpy`` of 8 bytes, which compilers emit as
one ``mov``/``str``; ``struct``'s ``<Q`` would store byte by byte and could be
seen torn). The consumer reads ``tail`` first and only then the bytes below
it.

* x86-64 is TSO: stores become visible to other cores in program order, and
  loads are not reordered with older loads. A consumer that sees the new
  ``tail`` therefore sees every byte written before it.
* aarch64 (and other weakly ordered machines) may reorder stores. There the
  producer passes a full fence between the record and the tail store, and the
  consumer one between the tail load and the record loads. Pure Python has no
  fence instruction, but acquiring and releasing a ``threading.Lock`` is one:
  it is built on the C library's atomic operations with acquire and release
  semantics (``stlr`` then ``ldaxr`` on aarch64, which ARMv8 keeps in order).
  On x86-64 the fence is skipped (:data:`NEEDS_FENCE` is false).

A producer killed at any instruction either published its ``tail`` (the whole
record is there) or did not (the record does not exist); the next owner of
the lane continues from the published ``tail``.

The consumer *releases* the space it has read by storing ``head``, and only
after it has copied the records out, so the producer never overwrites bytes
still being read.
"""

from __future__ import annotations

import platform
import struct
import threading

from mpevent.shm.layout import (
    FLAG_WRAP,
    HANDOFF_PREFIX,
    L_HEAD,
    L_TAIL,
    RECORD_HEADER_BYTES,
)

#: Machines whose store order (TSO) makes "publish tail last" sufficient.
TSO_MACHINES = frozenset({"x86_64", "amd64", "AMD64", "i686", "i386"})
NEEDS_FENCE = platform.machine() not in TSO_MACHINES
_fence_lock = threading.Lock()


def fence() -> None:
    """A full memory barrier, for weakly ordered machines (see module doc)."""
    _fence_lock.acquire()
    _fence_lock.release()


_RAISED = struct.Struct("<Q")
#: A hand-off record's params are preceded by (slot u32, member u32, sub_id u64).
HANDOFF_HEADER = struct.Struct("<IIQ")
assert HANDOFF_HEADER.size == HANDOFF_PREFIX


def raised_ns_at(buf: memoryview | bytes, body_at: int) -> int:
    """A record's raise time, from a copy holding its header: the header's
    second word, just before the body at ``body_at``."""
    return _RAISED.unpack_from(buf, body_at - 8)[0]


def record_span(body_len: int) -> int:
    """Bytes a record with ``body_len`` bytes of body takes in the lane."""
    return (RECORD_HEADER_BYTES + body_len + 7) & ~7


def max_body(lane_size: int) -> int:
    """The largest body a producer should offer a lane of ``lane_size`` bytes.

    A record that does not fit before the end of the lane needs the padding
    to the end *and* its own span; up to half the lane, that always fits in
    an empty lane, wherever the tail is. Larger records could be refused by
    an empty lane, which would look like "ring full".
    """
    return lane_size // 2 - RECORD_HEADER_BYTES


class _LaneEnd:
    """What both ends of a lane know: where its words and bytes are."""

    __slots__ = ("_base", "_buf", "_head_word", "_mask", "_q", "_size", "_tail_word")

    def __init__(self, buf: memoryview, words: memoryview, ctl_word: int, data_at: int, size: int):
        self._buf = buf
        self._q = words
        self._tail_word = ctl_word + L_TAIL
        self._head_word = ctl_word + L_HEAD
        self._base = data_at
        self._size = size
        self._mask = size - 1


class LaneWriter(_LaneEnd):
    """The producer end of a lane. Only one process (and thread) uses it at once."""

    __slots__ = ("_head", "tail")

    def __init__(self, buf: memoryview, words: memoryview, ctl_word: int, data_at: int, size: int):
        super().__init__(buf, words, ctl_word, data_at, size)
        # The producer is the only writer of tail, so it keeps its own copy;
        # it starts from what a previous (possibly dead) owner published.
        self.tail = words[self._tail_word]
        self._head = words[self._head_word]  # a lower bound: the consumer only advances

    def push(self, event_id: int, body: bytes, raised_ns: int) -> bool:
        """Append one record; False (and nothing written) when the lane is full."""
        # Every line here is paid on every raise_event: kept to the minimum
        # of bytecodes (an empty body's slice assignment copies nothing).
        n = len(body)
        tail = self.tail
        off = tail & self._mask
        span = (n + RECORD_HEADER_BYTES + 7) & ~7
        if off + span > self._size or tail + span - self._head > self._size:
            return self._push_slow(event_id, body, raised_ns, span, off)
        at = self._base + off
        q = self._q
        q[at >> 3] = n | event_id << 32  # the header as two word stores,
        q[(at >> 3) + 1] = raised_ns  # cheaper than struct.pack_into
        at += RECORD_HEADER_BYTES
        self._buf[at : at + n] = body
        self.tail = tail = tail + span
        if NEEDS_FENCE:
            fence()
        q[self._tail_word] = tail  # publish: the record is complete
        return True

    def _push_slow(self, event_id: int, body: bytes, raised_ns: int, span: int, off: int) -> bool:
        """Full as far as we knew, or the record does not fit before the end."""
        if span > self._size - off:
            return self._push_wrapped(event_id, body, raised_ns, span, off)
        # Only now look at the consumer's head: reading it on every push
        # would pull its cache line from the sender's core every time.
        self._head = self._q[self._head_word]
        if self.tail + span - self._head > self._size:
            return False
        return self.push(event_id, body, raised_ns)

    def _push_wrapped(
        self, event_id: int, body: bytes, raised_ns: int, span: int, off: int
    ) -> bool:
        """The record does not fit before the end: pad to the end, write at 0."""
        to_end = self._size - off
        tail = self.tail
        if tail + to_end + span - self._head > self._size:
            self._head = self._q[self._head_word]
            if tail + to_end + span - self._head > self._size:
                return False
        if to_end >= RECORD_HEADER_BYTES:
            self._q[(self._base + off) >> 3] = FLAG_WRAP << 48
        self.tail += to_end
        return self.push(event_id, body, raised_ns)


class LaneReader(_LaneEnd):
    """The consumer end of a lane. Only one sender drains a lane at a time."""

    __slots__ = ("head",)

    def __init__(self, buf: memoryview, words: memoryview, ctl_word: int, data_at: int, size: int):
        super().__init__(buf, words, ctl_word, data_at, size)
        # Resume from the last released position (a respawned sender).
        self.head = words[self._head_word]

    def pending(self) -> bool:
        return self._q[self._tail_word] != self.head

    def read_span(
        self, limit: int, max_bytes: int
    ) -> tuple[list[tuple[int, int, int]], memoryview, int]:
        """Up to ``limit`` records lying in one stretch of the lane, at most ``max_bytes`` long.

        Returns ``(records, stretch, first_raised_ns)``: each record as
        (event id, offset of its body in the stretch, body length), the
        stretch as a view into the lane, and the raise time of the first
        (oldest) record, 0 when there is none. A sender copies the stretch
        once, with one ``memcpy``, instead of every body on its own. A
        stretch never wraps around the end of the lane: a record written at
        offset 0 comes in the next call. The stretch is valid until
        :meth:`release`, which hands its bytes back to the producer. Each
        record's header lies just before its body in the stretch (its second
        word is the record's raise time).
        """
        tail = self._q[self._tail_word]  # read tail before any byte below it
        if NEEDS_FENCE:
            fence()
        head = self.head
        base = self._base
        mask = self._mask
        size = self._size
        q = self._q
        records: list[tuple[int, int, int]] = []
        start = -1  # lane offset where the stretch begins
        lap_end = 0  # the position where the lane's data wraps after the stretch's start
        while head < tail and limit > 0:
            if records and head >= lap_end:
                break  # a record that fitted the end exactly; the next is at 0
            off = head & mask
            to_end = size - off
            if to_end < RECORD_HEADER_BYTES:
                if records:
                    break  # the rest is at offset 0: next stretch
                head += to_end
                continue
            header = q[(base + off) >> 3]
            if header >> 48 & FLAG_WRAP:
                if records:
                    break
                head += to_end
                continue
            n = header & 0xFFFFFFFF
            span = (RECORD_HEADER_BYTES + n + 7) & ~7
            if start < 0:
                start = off
                lap_end = head + size - off
                first_raised_ns = q[((base + off) >> 3) + 1]
            elif off + span - start > max_bytes:
                break
            records.append((header >> 32 & 0xFFFF, off - start + RECORD_HEADER_BYTES, n))
            head += span
            limit -= 1
        self.head = head
        if not records:
            return records, self._buf[0:0], 0
        stretch = self._buf[base + start : base + (head & mask or size)]
        return records, stretch, first_raised_ns

    def release(self) -> None:
        """Store ``head``: the space of everything read so far may be overwritten."""
        if NEEDS_FENCE:
            fence()  # our loads of the bodies complete before the producer reuses them
        self._q[self._head_word] = self.head
