"""mpevent: OpenSIPS's event interface and event_datagram transport for Python.

Worker processes raise named events; subscribers get each one as a JSON-RPC
2.0 notification datagram over UDP or a UNIX socket, byte-identical to what
OpenSIPS sends. README.md says how to use it, ARCHITECTURE.md how it is built.

The public names below are imported on first use (PEP 562), not with the
package: the hub and the senders start in fresh interpreters and import
only the modules they run, so importing ``mpevent.processes.sender`` must
not pull in the whole library.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it.
_PUBLIC = {
    "BusError": "mpevent.api.bus",
    "EventBus": "mpevent.api.bus",
    "Connection": "mpevent.api.connect",
    "NotServing": "mpevent.api.connect",
    "connect": "mpevent.api.connect",
    "UnknownEvent": "mpevent.processes.producer",
    "COMPILED": "mpevent.processes.fastpath",
    "Destination": "mpevent.protocol.destination",
    "DestinationError": "mpevent.protocol.destination",
    "parse_destination": "mpevent.protocol.destination",
    "MAX_DATAGRAM": "mpevent.protocol.payload",
    "DatagramTooLarge": "mpevent.protocol.payload",
    "PayloadError": "mpevent.protocol.payload",
    "encode_notification": "mpevent.protocol.payload",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mpevent' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
