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

from mpevent.processes.sender.mmsg import Outbox
from mpevent.protocol.payload import Notification


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
