"""Which endpoint serves a destination: the one place that knows every transport.

=============  ===========================================  ==========================
kind           endpoint                                     where its I/O happens
=============  ===========================================  ==========================
``udp``        :class:`~.endpoints.DatagramEndpoint`        the sender: ``sendmmsg``
``unix``       :class:`~.endpoints.DatagramEndpoint`        the sender: ``sendmmsg``
``tcp``        :class:`~.stream.StreamEndpoint`             the sender: non-blocking TCP
``rabbitmq``   :class:`~.handoff.HandoffEndpoint`           its relay process (AMQP)
``virtual``    :class:`~.virtual.VirtualEndpoint`           its members'
=============  ===========================================  ==========================

A new transport is one more endpoint class behind
:class:`~mpevent.processes.sender.endpoints.Endpoint` and one more line here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from mpevent.processes.sender.backlog import BacklogBudget, BacklogLimits
from mpevent.processes.sender.endpoints import DatagramEndpoint, Endpoint, Failed
from mpevent.processes.sender.handoff import HandoffEndpoint
from mpevent.processes.sender.stream import StreamEndpoint
from mpevent.processes.sender.virtual import VirtualEndpoint
from mpevent.protocol.destination import Destination, VirtualDestination
from mpevent.shm.segment import Segment


@dataclass
class Transports:
    """What opening an endpoint needs beyond its destination: one per sender."""

    limits: BacklogLimits
    budget: BacklogBudget
    seg: Segment | None = None  # for the hand-off lanes to broker relays
    sender: int = 0
    #: Broker destination spec() -> its relay slot, from the hub's last table.
    relays: dict[str, int] = field(default_factory=dict)

    def open(
        self,
        destination: Destination,
        hold_while_down: bool = True,
        on_failed: Failed | None = None,
    ) -> Endpoint:
        """The endpoint of ``destination``'s transport, its backlog bounded by
        ``limits`` and sharing ``budget`` with the sender's other endpoints."""
        kind = destination.kind
        if kind in ("udp", "unix"):
            return DatagramEndpoint(destination, self.limits, self.budget, on_failed)
        if kind == "tcp":
            return StreamEndpoint(
                destination,  # type: ignore[arg-type]
                self.limits,
                self.budget,
                on_failed=on_failed,
                hold_while_down=hold_while_down,
            )
        if kind == "rabbitmq":
            relay = self.relays.get(destination.spec())
            if self.seg is None or relay is None:
                raise LookupError(f"no broker relay serves {destination}")
            return HandoffEndpoint(
                destination, self.seg, self.sender, relay, hold_while_down, on_failed
            )
        if isinstance(destination, VirtualDestination):
            return VirtualEndpoint(destination, partial(Transports.open, self))
        raise ValueError(f"no transport for {kind!r} destinations")
