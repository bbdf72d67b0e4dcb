"""Where everything lives in the shared-memory segment: pure arithmetic.

The segment has a fixed size chosen at creation (guarantee 2: bounded
memory). Every process computes the same :class:`Layout` from the numbers
stored in the header, so a process that attaches by name needs nothing but
the segment itself.

All regions start on a 64-byte cache line. Each region has a single writer
(the hub, one producer per lane, one sender per lane or per sender block), so
no cross-process lock is ever needed on the fast path, and writers of
different regions never share a cache line.

Region order::

    header        4096 B   magic, geometry, state, table generation
    senders       128 B per sender slot: sleeping flag line, loop counter line
    sub_count     8 B per event: live subscribers, the producers' probe
    event_names   72 B per event: length + UTF-8 name
    table         the hub's subscription snapshot (seqlock-protected blob)
    lanes         192 B per lane: tail line, head line, owner line
    prod_counters 64 B per (lane + 1 spare block) x event, written by producers
    cons_counters 64 B per lane x event, written by the lane's sender
    dest_counters 64 B per sender x subscription slot, written by that sender
    lane_data     lane_size B per lane
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = 0x3156_4E45_5645_504D  # b"MPEVENV1" little-endian
LAYOUT_VERSION = 3
CACHE_LINE = 64
HEADER_BYTES = 4096
MAX_SENDERS = 64
EVENT_NAME_BYTES = 72  # u64 length + up to 64 bytes of name

# Header words (index into the segment viewed as uint64).
H_MAGIC = 0
H_VERSION = 1
H_LANES = 2
H_LANE_SIZE = 3
H_SENDERS = 4
H_MAX_EVENTS = 5
H_MAX_SUBS = 6
H_TABLE_BYTES = 7
H_STATE = 8
H_HUB_PID = 9
H_CREATED_NS = 10
H_TABLE_GEN = 11
H_EVENT_COUNT = 12
H_DRAIN_DEADLINE_NS = 13
H_REPAIRED = 15  # enqueued counts the hub restored for dead producers

# Bytes 1024..4095 of the header: where attachers find the daemon's MI and
# doorbells (a length-prefixed JSON object, written before STATE_RUNNING).
INFO_AT = 1024
INFO_BYTES = HEADER_BYTES - INFO_AT

# A subscriber count no hub writes while it runs: a stopped hub stores it in
# every count, so producers learn "hub gone" from the one load they make
# anyway, and the path with no subscriber pays nothing for it.
HUB_GONE = 1 << 62

STATE_STARTING = 0
STATE_RUNNING = 1
STATE_STOPPING = 2
STATE_STOPPED = 3

# Sender block words (relative to the block): the sleeping flag alone on
# its first cache line, because every producer reads it on every raise and
# the sender writes the rest per pass; sharing a line would make each raise
# a cache miss.
SENDER_BLOCK = 4 * CACHE_LINE
S_SLEEPING = 0
S_LOOPS = 8  # passes of the sender's loop (a test watches it spin, or not)
S_AGE_MAX = 9  # ns: the oldest record any batch held when it was sent
# Events by the age of their batch's oldest record when the batch was sent
# (raise to sendmmsg, an upper bound for each event in it): word
# S_AGE_HIST + k counts ages below 2**k us (k = 0: under 1 us), the last
# bucket everything older. The sender's own share of the latency.
S_AGE_HIST = 16
AGE_BUCKETS = 16

# Lane control words (relative to the lane block); 3 cache lines so that the
# producer's tail and the consumer's head never share one.
L_TAIL = 0
L_OWNER_PID = 1  # 0: free; else the pid that claimed it (its lock says if it lives)
L_CLAIMS = 3
L_HEAD = 8
LANE_BLOCK_WORDS = 24

# Counters: 8 words per (lane, event) or (sender, subscription).
COUNTER_WORDS = 8
# Producer side, per lane and event. Every raise_event call that finds a
# subscriber ends in exactly one of enqueued, dropped or rejected, so
# "raised" is their sum (one increment less on the fast path).
P_ENQUEUED = 0
P_DROPPED = 1  # lane full, or no lane free
P_REJECTED = 2  # bad params or oversize
P_OVERSIZE = 3  # among the rejected
P_NO_SUBSCRIBER = 4  # returned at the probe: not raised
PRODUCER_COUNTERS = ("enqueued", "dropped", "rejected", "oversize", "no_subscriber")
# Consumer side, per lane and event. After a drain, per lane and event:
# taken = dispatched + unrouted + send_oversize + lost.
C_DISPATCHED = 0  # events handed to every subscriber's socket
C_UNROUTED = 1  # events whose subscribers had all gone by send time
C_OVERSIZE = 2  # events the sender refused to send as too large
C_TAKEN = 3  # records taken from the lane (counted before head moves)
C_LOST = 4  # taken by a sender that was killed before it sent them
CONSUMER_COUNTERS = ("dispatched", "unrouted", "send_oversize", "taken", "lost")  # by index
# Destination side, per sender and subscription slot.
D_ROUTED = 0  # datagrams handed to this destination
D_SENT = 1
D_BYTES = 2
D_FAILED = 3
D_DROPPED = 4  # backlog full
D_ECONNREFUSED = 5
D_ENOENT = 6
D_ID = 7  # id of the subscription these counters belong to
DEST_COUNTERS = ("routed", "sent", "bytes", "failed", "dropped", "econnrefused", "enoent")

# Record header in a lane: two words, length | event_id << 32 | flags << 48,
# and the raise time in ns (see mpevent.shm.ring).
RECORD_HEADER_BYTES = 16
FLAG_WRAP = 1  # the rest of the lane is padding, the next record is at 0


def _align(n: int, to: int = CACHE_LINE) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Geometry:
    """The numbers a segment is created with (all stored in its header)."""

    lanes: int = 32
    lane_size: int = 1 << 20
    senders: int = 1
    max_events: int = 256
    max_subs: int = 1024
    table_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        _check_range("lanes", self.lanes, 1, 4096)
        _check_range("lane_size", self.lane_size, 1 << 12, 1 << 30)
        if self.lane_size & (self.lane_size - 1):
            raise ValueError(f"lane_size must be a power of two, got {self.lane_size}")
        _check_range("senders", self.senders, 1, MAX_SENDERS)
        _check_range("max_events", self.max_events, 1, 65535)
        _check_range("max_subs", self.max_subs, 1, 1 << 20)
        _check_range("table_bytes", self.table_bytes, 4096, 1 << 30)


def _check_range(name: str, value: object, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value}")


@dataclass(frozen=True)
class Layout:
    """Byte offsets of every region for one :class:`Geometry`."""

    geometry: Geometry
    senders_at: int
    sub_count_at: int
    event_names_at: int
    table_at: int
    lanes_at: int
    prod_counters_at: int
    cons_counters_at: int
    dest_counters_at: int
    lane_data_at: int
    size: int

    @classmethod
    def of(cls, g: Geometry) -> Layout:
        at = HEADER_BYTES
        senders_at = at
        at += MAX_SENDERS * SENDER_BLOCK
        sub_count_at = at
        at = _align(at + 8 * g.max_events)
        event_names_at = at
        at = _align(at + EVENT_NAME_BYTES * g.max_events)
        table_at = at
        at = _align(at + g.table_bytes)
        lanes_at = at
        at += g.lanes * LANE_BLOCK_WORDS * 8
        prod_counters_at = at
        at += (g.lanes + 1) * g.max_events * COUNTER_WORDS * 8
        cons_counters_at = at
        at += g.lanes * g.max_events * COUNTER_WORDS * 8
        dest_counters_at = at
        at += g.senders * g.max_subs * COUNTER_WORDS * 8
        lane_data_at = _align(at, 4096)
        size = lane_data_at + g.lanes * g.lane_size
        return cls(
            g,
            senders_at,
            sub_count_at,
            event_names_at,
            table_at,
            lanes_at,
            prod_counters_at,
            cons_counters_at,
            dest_counters_at,
            lane_data_at,
            size,
        )

    # Word indexes (the segment viewed as uint64) of per-item blocks.
    def sender_word(self, sender: int) -> int:
        return (self.senders_at + sender * SENDER_BLOCK) // 8

    def sub_count_word(self, event_id: int) -> int:
        return self.sub_count_at // 8 + event_id

    def lane_word(self, lane: int) -> int:
        return self.lanes_at // 8 + lane * LANE_BLOCK_WORDS

    def lane_data(self, lane: int) -> int:
        return self.lane_data_at + lane * self.geometry.lane_size

    def prod_counter_word(self, lane: int, event_id: int) -> int:
        """``lane == geometry.lanes`` is the spare block for lane-less producers."""
        return self.prod_counters_at // 8 + (lane * self.geometry.max_events + event_id) * 8

    def cons_counter_word(self, lane: int, event_id: int) -> int:
        return self.cons_counters_at // 8 + (lane * self.geometry.max_events + event_id) * 8

    def dest_counter_word(self, sender: int, slot: int) -> int:
        return self.dest_counters_at // 8 + (sender * self.geometry.max_subs + slot) * 8

    def lane_sender(self, lane: int) -> int:
        """The sender that drains ``lane``: a fixed assignment, one consumer per lane."""
        return lane % self.geometry.senders

    def event_name_at(self, event_id: int) -> int:
        return self.event_names_at + event_id * EVENT_NAME_BYTES
