"""The event notification as it goes on the wire: pure encoding, no I/O.

mpevent sends exactly what OpenSIPS's event_datagram sends, one JSON-RPC 2.0
notification per datagram::

    {"jsonrpc":"2.0","method":"E_PIKE_BLOCKED","params":{"ip":"192.168.2.11"}}

The work is split so that each side does what only it can do cheaply:

* the producer encodes only the params (:func:`encode_params`) and checks the
  size of the datagram they will make (:func:`datagram_size`), so an oversize
  event is refused in the caller, who learns it at once;
* the sender glues the constant per-event prefix and the closing brace around
  those params once per event (:class:`Notification`).

Keys come in the order ``jsonrpc``, ``method``, ``params``; ``params`` is left
out when the event has none (an empty dict or list counts as none, as
OpenSIPS cannot tell them apart), an object for named params, an array for
positional ones. orjson gives OpenSIPS's escaping: ``"`` ``\\`` ``\\b \\f \\n \\r
\\t`` short, other control characters as ``\\u00xx``, non-ASCII as raw UTF-8.
"""

from __future__ import annotations

import math
import re
from typing import Any

import orjson

#: The largest datagram OpenSIPS's event_datagram will send (its FAQ).
MAX_DATAGRAM = 65457
#: Event names are short identifiers, as in OpenSIPS (E_PIKE_BLOCKED).
MAX_EVENT_NAME = 64

_EVENT_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_CLOSE = b"}"


class PayloadError(ValueError):
    """Params that cannot become a notification (wrong type, non-JSON value)."""


class DatagramTooLarge(PayloadError):
    """The notification would exceed :data:`MAX_DATAGRAM`; it is never truncated."""

    def __init__(self, event: str, size: int) -> None:
        super().__init__(
            f"event {event!r}: notification would be {size} bytes, "
            f"over the {MAX_DATAGRAM}-byte datagram limit; not sent"
        )
        self.event = event
        self.size = size


def check_event_name(name: object) -> str:
    """Return ``name`` if it is a valid event name, else raise with the reason."""
    if not isinstance(name, str):
        raise TypeError(f"event name must be str, not {type(name).__name__}")
    if not name:
        raise ValueError("event name is empty")
    if len(name) > MAX_EVENT_NAME:
        raise ValueError(f"event name {name[:20]!r}... is {len(name)} bytes, max {MAX_EVENT_NAME}")
    if not _EVENT_NAME.fullmatch(name):
        raise ValueError(f"event name {name!r} has characters outside letters, digits and '_.:-'")
    return name


def params_prefix(name: str) -> bytes:
    """Bytes before the params object: the datagram is prefix + params + ``}``."""
    return b'{"jsonrpc":"2.0","method":' + orjson.dumps(name) + b',"params":'


def bare_notification(name: str) -> bytes:
    """The whole datagram of an event raised without params."""
    return b'{"jsonrpc":"2.0","method":' + orjson.dumps(name) + b"}"


def datagram_size(prefix_len: int, params_len: int) -> int:
    """Size of the datagram built from a prefix and encoded params (0 = none)."""
    # Without params the datagram is prefix[:-10] + "}": 10 = len(',"params":').
    return prefix_len + params_len + 1 if params_len else prefix_len - 9


def encode_params(params: Any) -> bytes:
    """Encode params for the wire; ``b""`` means the event has no params.

    ``dict`` (str keys) gives named params, ``list``/``tuple`` positional ones,
    ``None`` none. Values: str, int (64-bit), float, bool, None and nested
    lists/dicts; a ``PayloadError``/``TypeError`` names what is wrong.
    """
    if params is None:
        return b""
    if not isinstance(params, dict | list | tuple):
        raise TypeError(
            f"params must be a dict (named), a list (positional) or None, "
            f"not {type(params).__name__}"
        )
    if not params:
        return b""
    try:
        body = orjson.dumps(params)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise TypeError(f"params cannot be encoded as JSON: {exc}") from None
    # orjson writes NaN and infinities as null; JSON cannot carry them, so a
    # "null" in the output is checked against the input (rare, off the
    # common path of str/int params).
    if body.find(b"null") >= 0 and _has_nonfinite(params):
        raise PayloadError("params contain NaN or infinity, which JSON cannot carry")
    return body


def _has_nonfinite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


class Notification:
    """Builds the datagrams of one event: one object per declared event."""

    __slots__ = ("bare", "name", "prefix")

    def __init__(self, name: str) -> None:
        self.name = check_event_name(name)
        self.prefix = params_prefix(name)
        self.bare = bare_notification(name)

    def build(self, params_body: bytes | memoryview) -> bytes:
        """The datagram for encoded params (as :func:`encode_params` made them)."""
        if not params_body:
            return self.bare
        return b"".join((self.prefix, params_body, _CLOSE))

    def size(self, params_len: int) -> int:
        return datagram_size(len(self.prefix), params_len)


def encode_notification(name: str, params: Any = None) -> bytes:
    """The complete datagram for one event, checked against the size limit."""
    note = Notification(name)
    body = encode_params(params)
    size = note.size(len(body))
    if size > MAX_DATAGRAM:
        raise DatagramTooLarge(name, size)
    return note.build(body)
