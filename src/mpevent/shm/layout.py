"""Where everything lives in the shared-memory segment: pure arithmetic.

The segment has a fixed size chosen at creation, so its memory stays
bounded whatever the load. Every process computes the same :class:`Layout` from the numbers
stored in the header, so a process that attaches by name needs nothing but
the segment itself.

All regions start on a 64-byte cache line. Each region has a single writer
(the hub, one producer per lane, one sender per lane or per sender block), so
no cross-process lock is ever needed on the fast path, and writers of
different regions never share a cache line.

Lanes ``0 .. lanes - 1`` are *dedicated*: each belongs to one producer
process at a time. After them come ``overflow_lanes`` *shared* lanes for the
processes that found every dedicated lane owned: each is written under a
record lock on its own byte of the segment file (one writer at a time, so
the single-writer rule holds per push), and is drained like any lane. A lane
index below ``ring_lanes`` names both kinds; its lock byte is its index.

Region order::

    header        4096 B   magic, geometry, state, table generation
    senders       128 B per sender slot: sleeping flag line, loop counter line
    sub_count     8 B per event: live subscribers, the producers' probe
    event_names   72 B per event: length + UTF-8 name
    table         the hub's subscription snapshot (seqlock-protected blob)
    lanes         192 B per lane (dedicated, then shared): tail, head, owner lines
    prod_counters 64 B per lane x event, written by the lane's producer (or,
                  on a shared lane, by whoever holds its lock)
    cons_counters 64 B per lane x event, written by the lane's sender
    relays        128 B per broker relay slot (pid, connection state, loops)
    handoffs      192 B per sender x relay: the control blocks of the hand-off lanes
    dest_counters 128 B per row x subscription slot x member, where the rows
                  are the senders' then the relays': each row written by its
                  process alone
    lane_data     lane_size B per lane
    handoff_data  handoff_size B per sender x relay

Broker destinations (``rabbitmq:``) are published by *relay* processes, one
per broker destination, never by the senders: a sender hands each event for
one to that relay's hand-off lane (one per sender and relay, a lane like the
producers', the sender its producer) and goes on; a full hand-off lane
drops for that destination alone. A record in a hand-off lane is the
producer's record (event id, params, raise time) with :data:`HANDOFF_PREFIX`
bytes before the params: the subscription slot, the member and the
subscription id it is for.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpevent import defaults

MAGIC = 0x3156_4E45_5645_504D  # b"MPEVENV1" little-endian
LAYOUT_VERSION = 6  # 6: broker relays, hand-off lanes, counter rows per member
CACHE_LINE = 64
HEADER_BYTES = 4096
MAX_SENDERS = 64
MAX_RELAYS = 64
MAX_MEMBERS = 8  # destinations of one virtual subscription; counted each on its own
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
H_OVERFLOW_LANES = 10
H_TABLE_GEN = 11
H_EVENT_COUNT = 12
H_DRAIN_DEADLINE_NS = 13
H_RELAYS = 14
H_REPAIRED = 15  # enqueued counts the hub restored for dead producers
H_HANDOFF_SIZE = 16

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
S_PID = 10  # the pid of the sender serving this block, stored when its loop starts
S_TABLE_GEN = 11  # the table generation it routes with (EventBus.subscribe waits for it)
# Events by the age of their batch's oldest record when the batch was sent
# (raise to sendmmsg, an upper bound for each event in it): word
# S_AGE_HIST + k counts ages below 2**k us (k = 0: under 1 us), the last
# bucket everything older. The sender's own share of the latency.
S_AGE_HIST = 16
AGE_BUCKETS = 16

# Relay block words (relative to the block), written by the relay serving it.
RELAY_BLOCK = 2 * CACHE_LINE
R_PID = 0  # the relay process serving this slot, stored when it starts
R_CONNECTED = 1  # 1 while its broker connection is open and confirming
R_CONNECTS = 2  # connections opened so far (1 + reconnects)
R_LOOPS = 3  # passes of its loop
R_UNCONFIRMED = 4  # published, not yet confirmed by the broker (now)

# A hand-off record's params are preceded by (slot u32, member u32, sub_id u64).
HANDOFF_PREFIX = 16

# Lane control words (relative to the lane block); 3 cache lines so that the
# producer's tail and the consumer's head never share one.
L_TAIL = 0
L_OWNER_PID = 1  # 0: free; else the pid that claimed it (its lock says if it lives)
# Dedicated lane: claims so far. Shared lane: processes that started writing
# to it (each counts itself once, under the lane's lock). Senders drain only
# lanes with claims; the hub warns when a shared one has any.
L_CLAIMS = 3
L_HEAD = 8
LANE_BLOCK_WORDS = 24

# Counters. Each tuple names the words of one kind of counter block, in
# order: counters.py sums the blocks by these names, and the index constants
# below are looked up in the tuples (a name that is not there fails at
# import), so the two cannot drift apart.
COUNTER_WORDS = 8  # words per (lane, event) block, producers' and senders' alike
DEST_COUNTER_WORDS = 16  # words per (sender, subscription slot) block: two cache lines

# Producer side, per lane and event. Every raise_event call that finds a
# subscriber ends in exactly one of enqueued, dropped or rejected, so
# "raised" is their sum (one increment less on the fast path).
PRODUCER_COUNTERS = (
    "enqueued",
    "dropped",  # lane full
    "rejected",  # bad params or oversize
    "oversize",  # among the rejected
    "no_subscriber",  # returned at the probe: not raised
)
P_ENQUEUED = PRODUCER_COUNTERS.index("enqueued")
P_DROPPED = PRODUCER_COUNTERS.index("dropped")
P_REJECTED = PRODUCER_COUNTERS.index("rejected")
P_OVERSIZE = PRODUCER_COUNTERS.index("oversize")
P_NO_SUBSCRIBER = PRODUCER_COUNTERS.index("no_subscriber")

# Consumer side, per lane and event. After a drain, per lane and event:
# taken = dispatched + unrouted + send_oversize + lost.
CONSUMER_COUNTERS = (
    "dispatched",  # events handed to every subscriber's endpoint
    "unrouted",  # events whose subscribers had all gone by send time
    "send_oversize",  # events the sender refused to send as too large
    "taken",  # records taken from the lane (counted before head moves)
    "lost",  # taken by a sender that was killed before it sent them
)
C_DISPATCHED = CONSUMER_COUNTERS.index("dispatched")
C_UNROUTED = CONSUMER_COUNTERS.index("unrouted")
C_OVERSIZE = CONSUMER_COUNTERS.index("send_oversize")
C_TAKEN = CONSUMER_COUNTERS.index("taken")
C_LOST = CONSUMER_COUNTERS.index("lost")

# Destination side, per sender and subscription slot: what became of the
# datagrams routed to it. Each is counted once, so
# routed = sent + failed + dropped + pending holds whenever the sender has
# stored its counters (it stores each word on its own; pending is counted,
# not derived, so the equation is a check).
DEST_COUNTERS = (
    "routed",  # datagrams handed to this destination's endpoint
    "sent",
    "bytes",  # of the sent datagrams
    "failed",  # the send failed (econnrefused and enoent among them)
    # Not kept when the destination could not take it: its backlog was full
    # (the ``backlog`` datagrams or ``backlog_bytes`` bytes of one
    # destination, or ``sender_backlog_bytes`` for all of a sender's
    # backlogs together), or the backlog was discarded (subscription gone,
    # sender stopped or killed).
    "dropped",
    "econnrefused",
    "enoent",
    "pending",  # waiting in the destination's backlog, or for a reply or confirm, now
    # A sender's row, broker destination: handed to the relay's hand-off lane.
    # Neither sent nor pending in the sender's row: the relay's row counts
    # their fate, and its ``routed`` is what it took from the hand-off lanes.
    "handed",
    # A relay's row: published again after a reconnect, unconfirmed before
    # (the broker may have them twice: the duplicates the consumer can see).
    "republished",
    "stale",  # among the dropped: older than the destination's max_age
    "timeouts",  # among the failed: no reply in time (tcp reliable mode)
)
D_ROUTED = DEST_COUNTERS.index("routed")
D_SENT = DEST_COUNTERS.index("sent")
D_BYTES = DEST_COUNTERS.index("bytes")
D_FAILED = DEST_COUNTERS.index("failed")
D_DROPPED = DEST_COUNTERS.index("dropped")
D_ECONNREFUSED = DEST_COUNTERS.index("econnrefused")
D_ENOENT = DEST_COUNTERS.index("enoent")
D_PENDING = DEST_COUNTERS.index("pending")
D_HANDED = DEST_COUNTERS.index("handed")
D_REPUBLISHED = DEST_COUNTERS.index("republished")
D_STALE = DEST_COUNTERS.index("stale")
D_TIMEOUTS = DEST_COUNTERS.index("timeouts")
D_ID = len(DEST_COUNTERS)  # the word after them: the subscription these counters belong to


def _check_block(names: tuple[str, ...], words: int) -> None:
    if len(names) > words or len(set(names)) != len(names):
        raise AssertionError(f"counter block {names} does not fit {words} words (or repeats one)")


_check_block(PRODUCER_COUNTERS, COUNTER_WORDS)
_check_block(CONSUMER_COUNTERS, COUNTER_WORDS)
_check_block((*DEST_COUNTERS, "id"), DEST_COUNTER_WORDS)

# Record header in a lane: two words, length | event_id << 32 | flags << 48,
# and the raise time in ns (see mpevent.shm.ring).
RECORD_HEADER_BYTES = 16
FLAG_WRAP = 1  # the rest of the lane is padding, the next record is at 0


def _align(n: int, to: int = CACHE_LINE) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Geometry:
    """The numbers a segment is created with (all stored in its header)."""

    lanes: int = defaults.LANES
    lane_size: int = defaults.LANE_SIZE
    senders: int = defaults.SENDERS
    max_events: int = defaults.MAX_EVENTS
    max_subs: int = defaults.MAX_SUBS
    table_bytes: int = defaults.TABLE_BYTES
    overflow_lanes: int = defaults.OVERFLOW_LANES  # shared lanes after the dedicated ones
    relays: int = defaults.RELAYS  # broker destinations served at once, one relay process each
    handoff_size: int = defaults.HANDOFF_SIZE  # bytes per sender x relay hand-off lane

    def __post_init__(self) -> None:
        _check_range("lanes", self.lanes, 1, 4096)
        _check_range("lane_size", self.lane_size, 1 << 12, 1 << 30)
        if self.lane_size & (self.lane_size - 1):
            raise ValueError(f"lane_size must be a power of two, got {self.lane_size}")
        _check_range("senders", self.senders, 1, MAX_SENDERS)
        _check_range("max_events", self.max_events, 1, 65535)
        _check_range("max_subs", self.max_subs, 1, 1 << 20)
        _check_range("table_bytes", self.table_bytes, 4096, 1 << 30)
        _check_range("overflow_lanes", self.overflow_lanes, 1, 256)
        _check_range("relays", self.relays, 0, MAX_RELAYS)
        # At least twice the largest notification: any record fits an empty lane.
        _check_range("handoff_size", self.handoff_size, 1 << 17, 1 << 30)
        if self.handoff_size & (self.handoff_size - 1):
            raise ValueError(f"handoff_size must be a power of two, got {self.handoff_size}")

    @property
    def ring_lanes(self) -> int:
        """Every lane, dedicated and shared: what senders drain and counters sum."""
        return self.lanes + self.overflow_lanes

    @property
    def counter_rows(self) -> int:
        """Destination counter rows: one per sender, then one per relay."""
        return self.senders + self.relays


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
    relays_at: int
    handoffs_at: int
    handoff_data_at: int
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
        at += g.ring_lanes * LANE_BLOCK_WORDS * 8
        prod_counters_at = at
        at += g.ring_lanes * g.max_events * COUNTER_WORDS * 8
        cons_counters_at = at
        at += g.ring_lanes * g.max_events * COUNTER_WORDS * 8
        relays_at = at
        at += MAX_RELAYS * RELAY_BLOCK
        handoffs_at = at
        at += g.senders * g.relays * LANE_BLOCK_WORDS * 8
        dest_counters_at = at
        at += g.counter_rows * g.max_subs * MAX_MEMBERS * DEST_COUNTER_WORDS * 8
        lane_data_at = _align(at, 4096)
        handoff_data_at = lane_data_at + g.ring_lanes * g.lane_size
        size = handoff_data_at + g.senders * g.relays * g.handoff_size
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
            relays_at,
            handoffs_at,
            handoff_data_at,
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
        block = lane * self.geometry.max_events + event_id
        return self.prod_counters_at // 8 + block * COUNTER_WORDS

    def cons_counter_word(self, lane: int, event_id: int) -> int:
        block = lane * self.geometry.max_events + event_id
        return self.cons_counters_at // 8 + block * COUNTER_WORDS

    def dest_counter_word(self, row: int, slot: int, member: int = 0) -> int:
        """The counters of subscription ``slot``'s ``member`` (0 unless it is
        virtual) in ``row``: a sender's index, or :meth:`relay_row`."""
        block = (row * self.geometry.max_subs + slot) * MAX_MEMBERS + member
        return self.dest_counters_at // 8 + block * DEST_COUNTER_WORDS

    def relay_row(self, relay: int) -> int:
        """The counter row relay ``relay`` writes."""
        return self.geometry.senders + relay

    def relay_word(self, relay: int) -> int:
        return (self.relays_at + relay * RELAY_BLOCK) // 8

    def handoff_word(self, sender: int, relay: int) -> int:
        """The control block of the hand-off lane from ``sender`` to ``relay``."""
        return self.handoffs_at // 8 + (sender * self.geometry.relays + relay) * LANE_BLOCK_WORDS

    def handoff_data(self, sender: int, relay: int) -> int:
        return self.handoff_data_at + (sender * self.geometry.relays + relay) * (
            self.geometry.handoff_size
        )

    def lane_sender(self, lane: int) -> int:
        """The sender that drains ``lane``: a fixed assignment, one consumer per lane."""
        return lane % self.geometry.senders

    def shared_lanes(self) -> range:
        """The shared (overflow) lanes' indexes, after the dedicated ones."""
        return range(self.geometry.lanes, self.geometry.ring_lanes)

    def shared_lane_for(self, pid: int) -> int:
        """The one shared lane a process without a lane of its own writes to
        (always the same one, so its events stay in order)."""
        return self.geometry.lanes + pid % self.geometry.overflow_lanes

    def event_name_at(self, event_id: int) -> int:
        return self.event_names_at + event_id * EVENT_NAME_BYTES
