"""A JSON-RPC MI client over datagrams (UNIX or UDP), like OpenSIPS's mi_datagram.

One request per datagram; the hub replies to the sender's address. Each call
uses its own socket (an autobound abstract address for UNIX), so threads and
forked children can call at once without mixing replies up. :class:`MIHttpClient`
makes the same calls over HTTP (``POST /mi``, like OpenSIPS's mi_http).
"""

from __future__ import annotations

import http.client
import itertools
import os
import socket
import urllib.parse
from typing import Any

import orjson

from mpevent.protocol.destination import Destination, parse_destination

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


def _request(method: str, params: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": next(_ids) ^ os.getpid()}
    if params is not None:
        request["params"] = params
    return request


def _result(reply: dict[str, Any]) -> Any:
    """The result of a JSON-RPC reply, or its error raised as MICallError."""
    if "error" in reply:
        err = reply["error"]
        raise MICallError(err.get("code", 0), err.get("message", ""))
    return reply.get("result")


class MIClient:
    def __init__(self, address: str | Destination, timeout: float = 5.0):
        self.destination = (
            address if isinstance(address, Destination) else parse_destination(address)
        )
        self.timeout = timeout

    def call(self, method: str, params: Any = None) -> Any:
        request = _request(method, params)
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
        return _result(reply)


class MIHttpClient:
    """The same JSON-RPC calls over HTTP: ``POST http://HOST:PORT/mi``, like mi_http.

    A fresh connection per call (the MI is for people and scripts, not a hot
    path). Anything short of an HTTP 200 with a JSON-RPC reply means no hub
    answered at this address: :class:`MIUnavailable`.
    """

    def __init__(self, url: str, timeout: float = 5.0):
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme.lower() != "http" or not parts.hostname or port == -1:
            raise ValueError(f"invalid MI URL {url!r}: expected http://HOST:PORT/mi")
        self.url = url
        self.timeout = timeout
        self._host = parts.hostname
        self._port = port or 80
        self._path = (parts.path or "/mi") + (f"?{parts.query}" if parts.query else "")

    def call(self, method: str, params: Any = None) -> Any:
        request = _request(method, params)
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            conn.request(
                "POST",
                self._path,
                orjson.dumps(request),
                headers={"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise MIUnavailable(f"no MI answer from {self.url}: {exc}") from None
        finally:
            conn.close()
        if response.status != 200:
            raise MIUnavailable(
                f"no MI answer from {self.url}: HTTP {response.status} {response.reason}"
            )
        try:
            reply = orjson.loads(body)
        except orjson.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict) or ("result" not in reply and "error" not in reply):
            raise MIUnavailable(f"no MI answer from {self.url}: not a JSON-RPC reply")
        return _result(reply)
