"""What a sender counts per subscription, and how it stores it in the segment.

Each subscription a sender serves has a destination counter block in the
segment (per row, subscription slot and member, see :mod:`mpevent.shm.layout`),
written by that sender alone; a broker relay counts in a row of its own, with
the same class. :class:`SubscriptionStats` mirrors the block
in the process: the hot path adds to plain attributes, and the loop stores
them in the segment after each batch (:meth:`SubscriptionStats.store`).

Every datagram routed to a subscription is counted once more when it leaves
the sender's hands, as sent, failed or dropped; until then it is pending (in
its destination's backlog). So ``routed = sent + failed + dropped + pending``
after every store, with each term counted on its own.

Endpoints count through a *ledger*: the messages of one lane batch that go
to one destination (a run) belong either all to one subscription (the
usual case: a batch of one event), and then the :class:`SubscriptionStats`
is the ledger and counts a whole range at once, or each to its own, and
then a :class:`PerMessage` ledger counts them one by one. Both have the
same methods, so endpoints never ask which one they hold. A virtual
subscription's ledger is a :class:`GroupStats`, one :class:`SubscriptionStats`
per member; ``ledger.member(i)`` is member ``i``'s ledger, whichever kind.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Protocol

from mpevent.shm.layout import (
    D_BYTES,
    D_DROPPED,
    D_ECONNREFUSED,
    D_ENOENT,
    D_FAILED,
    D_HANDED,
    D_ID,
    D_PENDING,
    D_REPUBLISHED,
    D_ROUTED,
    D_SENT,
    D_STALE,
    D_TIMEOUTS,
    DEST_COUNTER_WORDS,
    MAX_MEMBERS,
)
from mpevent.shm.segment import Segment


class Ledger(Protocol):
    """Counts what becomes of the messages ``0..n-1`` of one run (see the module doc)."""

    def owner(self, k: int) -> SubscriptionStats:
        """The subscription message ``k`` belongs to."""
        ...

    def count_routed(self, start: int, end: int) -> None: ...

    def count_sent(self, sizes: list[int], messages: Sequence[int], start: int, end: int) -> None:
        """Messages ``start..end-1`` went; ``sizes[messages[k]]`` is message k's length."""
        ...

    def count_failed(self, start: int, end: int, code: int) -> None: ...

    def count_dropped(self, start: int, end: int) -> None: ...

    def count_handed(self, start: int, end: int) -> None:
        """Messages ``start..end-1`` went to a broker relay's hand-off lane."""
        ...

    def member(self, index: int) -> Ledger:
        """The ledger of the same messages for member ``index`` of a virtual one."""
        ...


class SubscriptionStats:
    """One subscription's counters in this sender; the ledger of a run that is all its own."""

    __slots__ = (
        "bytes",
        "dropped",
        "enoent",
        "failed",
        "group",
        "handed",
        "index",
        "pending",
        "refused",
        "republished",
        "routed",
        "sent",
        "slot",
        "stale",
        "sub_id",
        "timeouts",
        "word",
    )

    def __init__(self, seg: Segment, row: int, slot: int, sub_id: int, member: int = 0):
        """The counters of member ``member`` of subscription ``sub_id`` in
        ``slot``, in counter row ``row`` (a sender's index, or a relay's row)."""
        self.slot = slot
        self.sub_id = sub_id
        self.index = member  # which member of a virtual subscription; 0 otherwise
        self.group: GroupStats | None = None  # the virtual subscription's, if it is a member
        self.word = w = seg.layout.dest_counter_word(row, slot, member)
        words = seg.words
        if words[w + D_ID] != sub_id:  # a new subscription in this slot
            for i in range(DEST_COUNTER_WORDS):
                words[w + i] = 0
            words[w + D_ID] = sub_id
        self.routed = words[w + D_ROUTED]
        self.sent = words[w + D_SENT]
        self.bytes = words[w + D_BYTES]
        self.failed = words[w + D_FAILED]
        self.dropped = words[w + D_DROPPED]
        self.refused = words[w + D_ECONNREFUSED]
        self.enoent = words[w + D_ENOENT]
        self.handed = words[w + D_HANDED]
        self.republished = words[w + D_REPUBLISHED]
        self.stale = words[w + D_STALE]
        self.timeouts = words[w + D_TIMEOUTS]
        # What waited in a backlog is not in this process's backlogs: a killed
        # predecessor's was counted as dropped (drop_predecessor_backlogs).
        self.pending = 0

    def fail(self, code: int) -> None:
        """One message failed with errno ``code``."""
        self.failed += 1
        if code == errno.ECONNREFUSED:
            self.refused += 1
        elif code == errno.ENOENT:
            self.enoent += 1
        elif code == errno.ETIMEDOUT:
            self.timeouts += 1

    def store(self, words: memoryview) -> None:
        w = self.word
        words[w + D_ROUTED] = self.routed
        words[w + D_SENT] = self.sent
        words[w + D_BYTES] = self.bytes
        words[w + D_FAILED] = self.failed
        words[w + D_DROPPED] = self.dropped
        words[w + D_ECONNREFUSED] = self.refused
        words[w + D_ENOENT] = self.enoent
        words[w + D_HANDED] = self.handed
        words[w + D_REPUBLISHED] = self.republished
        words[w + D_STALE] = self.stale
        words[w + D_TIMEOUTS] = self.timeouts
        words[w + D_PENDING] = self.pending

    # -- the ledger of a run whose messages are all this subscription's ------

    def owner(self, k: int) -> SubscriptionStats:
        return self

    def count_routed(self, start: int, end: int) -> None:
        self.routed += end - start

    def count_sent(self, sizes: list[int], messages: Sequence[int], start: int, end: int) -> None:
        self.sent += end - start
        self.bytes += sum(map(sizes.__getitem__, messages[start:end]))

    def count_failed(self, start: int, end: int, code: int) -> None:
        n = end - start
        self.failed += n
        if code == errno.ECONNREFUSED:
            self.refused += n
        elif code == errno.ENOENT:
            self.enoent += n
        elif code == errno.ETIMEDOUT:
            self.timeouts += n

    def count_dropped(self, start: int, end: int) -> None:
        self.dropped += end - start

    def count_handed(self, start: int, end: int) -> None:
        self.handed += end - start

    def member(self, index: int) -> Ledger:
        return self  # not virtual: its one member is itself


class GroupStats:
    """A virtual subscription's counters: one :class:`SubscriptionStats` per
    member, each in its own block. Only ever a ledger through :meth:`member`."""

    __slots__ = ("members", "slot", "sub_id")

    def __init__(self, seg: Segment, row: int, slot: int, sub_id: int, members: int):
        if not 1 <= members <= MAX_MEMBERS:
            raise ValueError(f"a virtual subscription has 1 to {MAX_MEMBERS} members")
        self.slot = slot
        self.sub_id = sub_id
        self.members = [SubscriptionStats(seg, row, slot, sub_id, m) for m in range(members)]
        for stats in self.members:
            stats.group = self

    def member(self, index: int) -> Ledger:
        return self.members[index]

    def store(self, words: memoryview) -> None:
        for stats in self.members:
            stats.store(words)


class PerMessage:
    """The ledger of a run whose message ``k`` is ``owners[k]``'s."""

    __slots__ = ("owners",)

    def __init__(self, owners: list[SubscriptionStats]) -> None:
        self.owners = owners

    def owner(self, k: int) -> SubscriptionStats:
        return self.owners[k]

    def count_routed(self, start: int, end: int) -> None:
        for stats in self.owners[start:end]:
            stats.routed += 1

    def count_sent(self, sizes: list[int], messages: Sequence[int], start: int, end: int) -> None:
        owners = self.owners
        for k in range(start, end):
            stats = owners[k]
            stats.sent += 1
            stats.bytes += sizes[messages[k]]

    def count_failed(self, start: int, end: int, code: int) -> None:
        for stats in self.owners[start:end]:
            stats.fail(code)

    def count_dropped(self, start: int, end: int) -> None:
        for stats in self.owners[start:end]:
            stats.dropped += 1

    def count_handed(self, start: int, end: int) -> None:
        for stats in self.owners[start:end]:
            stats.handed += 1

    def member(self, index: int) -> Ledger:
        return PerMessage([owner.member(index) for owner in self.owners])  # type: ignore[misc]


def drop_predecessor_backlogs(seg: Segment, row: int) -> int:
    """At a sender's start: what its killed predecessor had not sent nor
    counted for each subscription (its backlogs went with it) becomes
    ``dropped``, and ``pending`` is 0 again. Returns how many that was.

    ``row`` is a sender's index or a relay's row (a relay's ``routed`` is
    what it took from its hand-off lanes). Counted as
    ``routed - sent - failed - dropped - handed`` rather than read from
    the pending word: a predecessor killed halfway through storing a block
    (it stores ``routed`` first) has stored more routed than fates, and the
    difference is just as gone.
    """
    words, layout = seg.words, seg.layout
    dropped = 0
    first = layout.dest_counter_word(row, 0)
    for block in range(layout.geometry.max_subs * MAX_MEMBERS):
        w = first + block * DEST_COUNTER_WORDS
        if not words[w + D_ID]:
            continue
        missing = words[w + D_ROUTED] - (
            words[w + D_SENT] + words[w + D_FAILED] + words[w + D_DROPPED] + words[w + D_HANDED]
        )
        if missing > 0:
            words[w + D_DROPPED] += missing
            dropped += missing
        words[w + D_PENDING] = 0
    return dropped
