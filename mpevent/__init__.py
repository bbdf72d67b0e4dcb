"""mpevent: OpenSIPS's event interface and event_datagram transport for Python.

Worker processes raise named events; subscribers get each one as a JSON-RPC
2.0 notification datagram over UDP or a UNIX socket, byte-identical to what
OpenSIPS sends. See README.md and DESIGN.md.
"""

from mpevent.api.bus import BusError, EventBus
from mpevent.api.connect import Connection, NotServing, connect
from mpevent.processes.producer import UnknownEvent
from mpevent.protocol.destination import Destination, DestinationError, parse_destination
from mpevent.protocol.payload import (
    MAX_DATAGRAM,
    DatagramTooLarge,
    PayloadError,
    encode_notification,
)

__all__ = [
    "MAX_DATAGRAM",
    "BusError",
    "Connection",
    "DatagramTooLarge",
    "Destination",
    "DestinationError",
    "EventBus",
    "NotServing",
    "PayloadError",
    "UnknownEvent",
    "connect",
    "encode_notification",
    "parse_destination",
]
