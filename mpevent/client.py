"""A JSON-RPC MI client over datagrams (UNIX or UDP), like OpenSIPS's mi_datagram.

One request per datagram; the hub replies to the sender's address. Each call
uses its own socket (an autobound abstract address for UNIX), so threads and
forked children can call at once without mixing replies up.
"""

from __future__ import annotations

import itertools
import os
import socket
from typing import Any

import orjson

from .destination import Destination, parse_destination

_ids = itertools.count(1)
MAX_REPLY = 1 << 20


class MICallError(Exception):
    """The hub answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class MIUnavailable(ConnectionError):
    """No answer from the hub (not running, or too slow)."""


class MIClient:
    def __init__(self, address: str | Destination, timeout: float = 5.0):
        self.destination = (
            address if isinstance(address, Destination) else parse_destination(address)
        )
        self.timeout = timeout

    def call(self, method: str, params: Any = None) -> Any:
        request: dict[str, Any] = {
            "jsonrpc": "2.0",
            "method": method,
            "id": next(_ids) ^ os.getpid(),
        }
        if params is not None:
            request["params"] = params
        dest = self.destination
        with socket.socket(dest.family, socket.SOCK_DGRAM) as sock:
            if dest.family == socket.AF_UNIX:
                sock.bind("")  # autobind: an abstract address the reply can reach
            sock.settimeout(self.timeout)
            try:
                sock.sendto(orjson.dumps(request), dest.sockaddr)
                while True:
                    raw = sock.recv(MAX_REPLY)
                    reply = orjson.loads(raw)
                    if isinstance(reply, dict) and reply.get("id") == request["id"]:
                        break
            except (TimeoutError, ConnectionRefusedError, FileNotFoundError) as exc:
                raise MIUnavailable(f"no MI answer from {dest}: {exc}") from None
        if "error" in reply:
            err = reply["error"]
            raise MICallError(err.get("code", 0), err.get("message", ""))
        return reply.get("result")
