"""One lane batch's datagrams, as the sender's loop describes them for the endpoints.

The loop copies a stretch of a lane into the :class:`~mpevent.processes.sender.mmsg.Outbox`
and describes each message of it once: six integers of pieces (notification
prefix, params in the copied stretch, closing brace; see
:mod:`mpevent.processes.sender.mmsg`), its size, and where its params are.
Endpoints send from the outbox as packed, and turn a message into a
``bytes`` datagram only when they must keep it (a backlog) or have no
``sendmmsg``: no Python object per datagram otherwise.

Valid until the loop loads the next stretch into the outbox.
"""

from __future__ import annotations

from typing import NamedTuple

from mpevent.processes.sender.mmsg import INTS_PER_MESSAGE, Outbox
from mpevent.protocol.payload import Notification
from mpevent.shm.ring import raised_ns_at


class Message(NamedTuple):
    """One event on its own, outliving the batch: what a virtual subscription
    hands from a member that failed to the next one."""

    event_id: int
    params: bytes  # the JSON params as raised (empty: none)
    raised_ns: int  # monotonic ns
    note: Notification  # the event's notification, for its bytes
    tries: int = 0  # virtual FAILOVER: members that have failed it so far

    def notification(self) -> bytes:
        return self.note.build(self.params)


class LaneBatch:
    """The messages of one lane batch: pieces for the outbox, bytes only on demand."""

    __slots__ = ("bodies", "notes", "outbox", "pieces", "sizes")

    def __init__(self, outbox: Outbox, notes: list[Notification]):
        self.outbox = outbox
        self.notes = notes  # by event id
        self.pieces: list[int] = []  # six per message: see mpevent.processes.sender.mmsg
        self.sizes: list[int] = []  # datagram bytes, per message
        self.bodies: list[tuple[int, int, int]] = []  # (event id, offset, length) per message

    def datagram(self, message: int) -> bytes:
        """Message ``message`` as a datagram of its own."""
        event_id, at, n = self.bodies[message]
        return self.notes[event_id].build(self.outbox.view[at : at + n])

    def raised_ns(self, message: int) -> int:
        """When message ``message`` was raised (its record header's second word)."""
        return raised_ns_at(self.outbox.view, self.bodies[message][1])

    def message(self, message: int) -> Message:
        """Message ``message`` as a :class:`Message`, valid after the batch."""
        event_id, at, n = self.bodies[message]
        params = bytes(self.outbox.view[at : at + n])
        return Message(event_id, params, self.raised_ns(message), self.notes[event_id])

    def pack(self, messages: list[int] | range) -> None:
        """Pack the outbox with ``messages``, in this order, for the endpoints."""
        pieces, w = self.pieces, INTS_PER_MESSAGE
        if isinstance(messages, range) and messages == range(len(self.sizes)):
            self.outbox.pack(pieces)
            return
        self.outbox.pack([x for i in messages for x in pieces[i * w : i * w + w]])
