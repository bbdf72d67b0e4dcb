"""Backlogs: what waits for a destination that cannot take it yet, bounded three ways.

A destination whose socket is full (EAGAIN: a UNIX datagram receiver's
queue holds only ``net.unix.max_dgram_qlen`` datagrams) keeps what it could
not send in its :class:`Backlog`, in order, until its socket is writable
again. Every backlog is bounded, so no subscriber, however slow, stuck or
numerous, can make a sender's memory grow without limit:

* ``backlog``: datagrams one destination may keep;
* ``backlog_bytes``: bytes one destination may keep;
* ``sender_backlog_bytes``: bytes all backlogs of one sender may keep
  together (a :class:`BacklogBudget` they share).

What finds any bound reached is not kept: the endpoint counts it as
``dropped`` for its destination. An entry is charged its length plus
:data:`ENTRY_OVERHEAD`, what keeping it costs beyond its bytes, so the byte
bounds hold for the process's memory even with tiny datagrams.

The three limits travel as one :class:`BacklogLimits` value (three ints,
the same names as the configuration keys and ``EventBus`` keywords) from
the configuration through the hub to each sender. This module imports
nothing heavy: the configuration and the application's process load it.
Any transport's endpoint keeps its waiting messages in a :class:`Backlog`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpevent import defaults

if TYPE_CHECKING:
    from mpevent.processes.sender.accounts import SubscriptionStats

# Keeping an entry costs its bytes object's header (33 bytes), a slot in each
# of two deques (16) and the allocator's rounding: measured 50 bytes, charged 64.
ENTRY_OVERHEAD = 64


@dataclass(frozen=True)
class BacklogLimits:
    """The bounds of a sender's backlogs (see the module doc); all at least 1."""

    backlog: int = defaults.BACKLOG
    backlog_bytes: int = defaults.BACKLOG_BYTES
    sender_backlog_bytes: int = defaults.SENDER_BACKLOG_BYTES

    def __post_init__(self) -> None:
        for name in ("backlog", "backlog_bytes", "sender_backlog_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")


class BacklogBudget:
    """The bytes all of one sender's backlogs hold, against ``sender_backlog_bytes``."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Backlog:
    """One destination's waiting datagrams, oldest first, each with its owner
    (the subscription it was routed for).

    Keeps every owner's ``pending`` in step: one more for each entry kept,
    one less for each taken out, whatever becomes of it.
    """

    __slots__ = ("_budget", "_max_bytes", "_max_count", "_owners", "bytes", "datagrams")

    def __init__(self, limits: BacklogLimits, budget: BacklogBudget) -> None:
        # Read only outside: changed through push and pop. A plain deque, so
        # "does anything wait?" costs the send path no Python call.
        self.datagrams: deque[bytes] = deque()
        self._owners: deque[SubscriptionStats] = deque()
        self._max_count = limits.backlog
        self._max_bytes = limits.backlog_bytes
        self._budget = budget
        self.bytes = 0  # what the entries are charged, overhead included

    def __len__(self) -> int:
        return len(self.datagrams)

    def room(self, size: int) -> bool:
        """Whether a datagram of ``size`` bytes may be kept now (every bound)."""
        charge = size + ENTRY_OVERHEAD
        return (
            len(self.datagrams) < self._max_count
            and self.bytes + charge <= self._max_bytes
            and self._budget.used + charge <= self._budget.limit
        )

    def push(self, datagram: bytes, owner: SubscriptionStats) -> None:
        """Keep ``datagram`` last; the caller has asked :meth:`room`."""
        charge = len(datagram) + ENTRY_OVERHEAD
        self.datagrams.append(datagram)
        self._owners.append(owner)
        self.bytes += charge
        self._budget.used += charge
        owner.pending += 1

    def first(self) -> bytes:
        """The oldest datagram (the backlog is not empty)."""
        return self.datagrams[0]

    def pop(self) -> SubscriptionStats:
        """Take the oldest entry out; returns its owner, who counts what became of it."""
        charge = len(self.datagrams.popleft()) + ENTRY_OVERHEAD
        self.bytes -= charge
        self._budget.used -= charge
        owner = self._owners.popleft()
        owner.pending -= 1
        return owner

    def empty(self) -> Iterator[SubscriptionStats]:
        """Take every entry out, oldest first, yielding each one's owner."""
        while self.datagrams:
            yield self.pop()
