"""The sender's side of a broker destination: events handed to its relay.

A ``rabbitmq:`` destination is published by a relay process of its own
(:mod:`mpevent.processes.relay`), never by a sender: a broker client blocks,
and its CPU per message is several times a datagram's. The sender hands
each event for it to the relay through a hand-off lane in the segment (one
per sender and relay, see :mod:`mpevent.shm.layout`), exactly as a producer
writes its lane: no syscall, never a wait. A full hand-off lane (the relay
is slow, or its broker is down and its own backlog is full) drops for this
destination alone, and counts.

The sender's row counts ``routed``, then ``handed`` or ``dropped``; what
became of the handed events (confirmed, failed, stale, kept) is the relay's
to count, in its own row.

A member of a virtual ``FAILOVER`` subscription is created with
``hold_while_down=False``: while the relay says its broker connection is
down (``R_CONNECTED``), events fail at once (ENOTCONN) so that the next
member takes them.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from mpevent.processes.sender.accounts import Ledger, SubscriptionStats
from mpevent.processes.sender.batch import LaneBatch, Message
from mpevent.processes.sender.endpoints import Endpoint, Failed
from mpevent.protocol.destination import Destination
from mpevent.shm.layout import R_CONNECTED
from mpevent.shm.ring import HANDOFF_HEADER, LaneWriter
from mpevent.shm.segment import Segment


class HandoffEndpoint(Endpoint):
    """A broker destination: the hand-off lane to the relay that publishes it."""

    __slots__ = ("connected_word", "destination", "hold_while_down", "on_failed", "words", "writer")

    def __init__(
        self,
        destination: Destination,
        seg: Segment,
        sender: int,
        relay: int,
        hold_while_down: bool = True,
        on_failed: Failed | None = None,
    ):
        layout = seg.layout
        self.destination = destination
        self.words = seg.words
        self.writer = LaneWriter(
            seg.buf,
            seg.words,
            layout.handoff_word(sender, relay),
            layout.handoff_data(sender, relay),
            layout.geometry.handoff_size,
        )
        self.connected_word = layout.relay_word(relay) + R_CONNECTED
        self.hold_while_down = hold_while_down
        self.on_failed = on_failed

    def send(self, batch: LaneBatch, messages: Sequence[int], ledger: Ledger) -> None:
        count = len(messages)
        ledger.count_routed(0, count)
        if self._refusing():
            ledger.count_failed(0, count, errno.ENOTCONN)
            if self.on_failed is not None:
                for k, message in enumerate(messages):
                    self.on_failed(batch.message(message), ledger.owner(k), errno.ENOTCONN)
            return
        view = batch.outbox.view
        push = self.writer.push
        pack = HANDOFF_HEADER.pack
        for k, message in enumerate(messages):
            event_id, at, n = batch.bodies[message]
            owner = ledger.owner(k)
            body = pack(owner.slot, owner.index, owner.sub_id) + view[at : at + n]
            if push(event_id, body, batch.raised_ns(message)):
                ledger.count_handed(k, k + 1)
            else:
                ledger.count_dropped(k, k + 1)

    def send_message(self, message: Message, owner: SubscriptionStats) -> None:
        owner.routed += 1
        if self._refusing():
            owner.fail(errno.ENOTCONN)
            if self.on_failed is not None:
                self.on_failed(message, owner, errno.ENOTCONN)
            return
        body = HANDOFF_HEADER.pack(owner.slot, owner.index, owner.sub_id) + message.params
        if self.writer.push(message.event_id, body, message.raised_ns):
            owner.handed += 1
        else:
            owner.dropped += 1

    def _refusing(self) -> bool:
        """A FAILOVER member whose relay has no broker connection: fail at once."""
        return not self.hold_while_down and not self.words[self.connected_word]

    def wants(self) -> tuple[int, int] | None:
        return None

    def ready(self, revents: int) -> None:
        pass

    def close(self) -> None:
        pass  # what was handed is the relay's now; nothing waits here
