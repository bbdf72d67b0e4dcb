"""What a sender counts per subscription, and how it stores it in the segment.

Each subscription a sender serves has a destination counter block in the
segment (per sender and subscription slot, see :mod:`mpevent.shm.layout`),
written by that sender alone. :class:`SubscriptionStats` mirrors the block
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
same methods, so endpoints never ask which one they hold.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Protocol

from mpevent.protocol.registry import Route
from mpevent.shm.layout import (
    D_BYTES,
    D_DROPPED,
    D_ECONNREFUSED,
    D_ENOENT,
    D_FAILED,
    D_ID,
    D_PENDING,
    D_ROUTED,
    D_SENT,
    DEST_COUNTER_WORDS,
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


class SubscriptionStats:
    """One subscription's counters in this sender; the ledger of a run that is all its own."""

    __slots__ = (
        "bytes",
        "dropped",
        "enoent",
        "failed",
        "pending",
        "refused",
        "routed",
        "sent",
        "slot",
        "sub_id",
        "word",
    )

    def __init__(self, seg: Segment, sender: int, route: Route):
        self.slot = route.slot
        self.sub_id = route.sub_id
        self.word = w = seg.layout.dest_counter_word(sender, route.slot)
        words = seg.words
        if words[w + D_ID] != route.sub_id:  # a new subscription in this slot
            for i in range(DEST_COUNTER_WORDS):
                words[w + i] = 0
            words[w + D_ID] = route.sub_id
        self.routed = words[w + D_ROUTED]
        self.sent = words[w + D_SENT]
        self.bytes = words[w + D_BYTES]
        self.failed = words[w + D_FAILED]
        self.dropped = words[w + D_DROPPED]
        self.refused = words[w + D_ECONNREFUSED]
        self.enoent = words[w + D_ENOENT]
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

    def store(self, words: memoryview) -> None:
        w = self.word
        words[w + D_ROUTED] = self.routed
        words[w + D_SENT] = self.sent
        words[w + D_BYTES] = self.bytes
        words[w + D_FAILED] = self.failed
        words[w + D_DROPPED] = self.dropped
        words[w + D_ECONNREFUSED] = self.refused
        words[w + D_ENOENT] = self.enoent
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

    def count_dropped(self, start: int, end: int) -> None:
        self.dropped += end - start


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


def drop_predecessor_backlogs(seg: Segment, sender: int) -> int:
    """At a sender's start: what its killed predecessor had not sent nor
    counted for each subscription (its backlogs went with it) becomes
    ``dropped``, and ``pending`` is 0 again. Returns how many that was.

    Counted as ``routed - sent - failed - dropped`` rather than read from
    the pending word: a predecessor killed halfway through storing a block
    (it stores ``routed`` first) has stored more routed than fates, and the
    difference is just as gone.
    """
    words, layout = seg.words, seg.layout
    dropped = 0
    for slot in range(layout.geometry.max_subs):
        w = layout.dest_counter_word(sender, slot)
        if not words[w + D_ID]:
            continue
        missing = words[w + D_ROUTED] - (
            words[w + D_SENT] + words[w + D_FAILED] + words[w + D_DROPPED]
        )
        if missing > 0:
            words[w + D_DROPPED] += missing
            dropped += missing
        words[w + D_PENDING] = 0
    return dropped
