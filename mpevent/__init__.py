"""mpevent: OpenSIPS's event interface and event_datagram transport for Python.

Worker processes raise named events; subscribers get each one as a JSON-RPC
2.0 notification datagram over UDP or a UNIX socket, byte-identical to what
OpenSIPS sends. See README.md and DESIGN.md.
"""

from .bus import BusError, EventBus
from .connect import Connection, NotServing, connect
from .destination import Destination, DestinationError, parse_destination
from .payload import MAX_DATAGRAM, DatagramTooLarge, PayloadError, encode_notification
from .producer import UnknownEvent

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
