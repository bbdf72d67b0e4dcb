"""A JSON-RPC MI client over datagrams (UNIX or UDP), like OpenSIPS's mi_datagram.

One request per datagram; the hub replies to the sender's address. Each call
uses its own socket (an autobound abstract address for UNIX), so threads and
forked children can call at once without mixing replies up. :class:`MIHttpClient`
makes the same calls over HTTP (``POST /mi``, like OpenSIPS's mi_http), and
:class:`MIFifoClient` over the hub's FIFO (like OpenSIPS's mi_fifo, the
transport opensips-cli uses by default).

A request over the MI's size limit (:data:`mpevent.protocol.mi.MAX_REQUEST`,
or the largest datagram UDP carries) is refused before it is sent, as
:class:`RequestTooLarge` with its size and the limit; so is one the hub
refused as too large.
"""

from __future__ import annotations

import errno
import http.client
import itertools
import os
import secrets
import select
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any

import orjson

from mpevent.protocol.destination import Destination, parse_destination
from mpevent.protocol.mi import INVALID_REQUEST, MAX_REQUEST

_ids = itertools.count(1)
MAX_REPLY = 1 << 20
# The largest UDP payload (65535 less the IP and UDP headers): the kernel
# refuses a larger datagram with EMSGSIZE, "Message too long".
MAX_UDP_REQUEST = {socket.AF_INET: 65507, socket.AF_INET6: 65527}


class MICallError(Exception):
    """The hub answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class RequestTooLarge(MICallError):
    """A request over the size limit of the MI (or of the transport): refused
    before it was sent, or by the hub. It is the request, not the hub."""

    def __init__(self, size: int, limit: int, via: str):
        super().__init__(
            INVALID_REQUEST,
            f"request too large: {size} bytes, and the MI takes at most {limit} bytes {via}",
        )
        self.size = size
        self.limit = limit


class MIUnavailable(ConnectionError):
    """No answer from the hub (not running, or too slow)."""


def _request(method: str, params: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": next(_ids) ^ os.getpid()}
    if params is not None:
        request["params"] = params
    return request


def _encode(request: dict[str, Any], limit: int, via: str) -> bytes:
    """The request's bytes; :class:`RequestTooLarge` if they are over ``limit``."""
    data = orjson.dumps(request)
    if len(data) > limit:
        raise RequestTooLarge(len(data), limit, via)
    return data


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
        if dest.family == socket.AF_UNIX:
            data = _encode(request, MAX_REQUEST, f"over {dest}")
        else:
            limit = min(MAX_REQUEST, MAX_UDP_REQUEST[dest.family])
            data = _encode(request, limit, f"over {dest} (the largest UDP datagram)")
        with socket.socket(dest.family, socket.SOCK_DGRAM) as sock:
            if dest.family == socket.AF_UNIX:
                sock.bind("")  # autobind: an abstract address the reply can reach
            sock.settimeout(self.timeout)
            try:
                sock.sendto(data, dest.sockaddr)
                while True:
                    raw = sock.recv(MAX_REPLY)
                    reply = orjson.loads(raw)
                    if isinstance(reply, dict) and reply.get("id") == request["id"]:
                        break
                    # An error with a null id answers a request the hub could not
                    # read (too large, say): on this socket of ours alone, ours.
                    if isinstance(reply, dict) and reply.get("id") is None and "error" in reply:
                        break
            except (TimeoutError, ConnectionRefusedError, FileNotFoundError) as exc:
                raise MIUnavailable(f"no MI answer from {dest}: {exc}") from None
        return _result(reply)


class MIHttpClient:
    """The same JSON-RPC calls over HTTP: ``POST http://HOST:PORT/mi``, like mi_http.

    A fresh connection per call (the MI is for people and scripts, not a hot
    path). Anything but a JSON-RPC reply (under HTTP 200, or an error under
    another status: 413 for a request too large) means no hub answered at this
    address: :class:`MIUnavailable`.
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
        data = _encode(request, MAX_REQUEST, f"over {self.url}")
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            conn.request(
                "POST",
                self._path,
                data,
                headers={"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise MIUnavailable(f"no MI answer from {self.url}: {exc}") from None
        finally:
            conn.close()
        try:
            reply = orjson.loads(body)
        except orjson.JSONDecodeError:
            reply = None
        # A JSON-RPC error, whatever the status (413 for a request too large), is
        # the hub's answer: it says what is wrong better than the status does.
        # (The listener's other statuses carry a plain {"error": "..."}.)
        rpc_error = isinstance(reply, dict) and isinstance(reply.get("error"), dict)
        if response.status != 200 and not rpc_error:
            raise MIUnavailable(
                f"no MI answer from {self.url}: HTTP {response.status} {response.reason}"
            )
        if not isinstance(reply, dict) or ("result" not in reply and "error" not in reply):
            raise MIUnavailable(f"no MI answer from {self.url}: not a JSON-RPC reply")
        return _result(reply)


class MIFifoClient:
    """The same JSON-RPC calls over the hub's FIFO, as OpenSIPS's mi_fifo.

    Per call: a reply FIFO of its own in ``reply_dir`` (which must be the
    hub's ``mi.fifo_reply_dir``, ``/tmp/`` by default), opened for reading
    before the request is written so the hub finds its reader at once; then
    ``:REPLY_NAME:`` and the request, written into the hub's FIFO in one
    write; the reply read until the hub closes it; the reply FIFO removed.
    """

    def __init__(self, fifo: str | Path, reply_dir: str | Path = "/tmp", timeout: float = 5.0):
        self.fifo = Path(fifo)
        self.reply_dir = Path(reply_dir)
        self.timeout = timeout

    def call(self, method: str, params: Any = None) -> Any:
        request = _request(method, params)
        data = _encode(request, MAX_REQUEST, f"over fifo:{self.fifo}")
        deadline = time.monotonic() + self.timeout
        name = f"mpevent_reply_{os.getpid()}_{secrets.token_hex(8)}"  # no '.', '/', '\\'
        reply_path = self.reply_dir / name
        try:
            os.mkfifo(reply_path, 0o600)
        except OSError as exc:
            raise MIUnavailable(f"cannot make a reply FIFO in {self.reply_dir}: {exc}") from None
        try:
            self._let_hub_write(reply_path)
            reader = os.open(reply_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                self._send(f":{name}:".encode() + data, deadline)
                raw = self._receive(reader, deadline)
            finally:
                os.close(reader)
        finally:
            reply_path.unlink(missing_ok=True)
        try:
            reply = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise MIUnavailable(f"no MI answer from fifo:{self.fifo}: {raw[:80]!r}") from None
        # An error with a null id answers a request the hub could not read: on
        # this reply FIFO of ours alone, ours.
        if not isinstance(reply, dict) or reply.get("id") not in (request["id"], None):
            raise MIUnavailable(f"no MI answer from fifo:{self.fifo}: not a JSON-RPC reply")
        return _result(reply)

    def _let_hub_write(self, reply_path: Path) -> None:
        """A hub running as another user (not root) must be able to open the
        reply FIFO: then it is made writable for others, as opensips-cli's
        are, and stays readable by its owner only."""
        try:
            owner = os.stat(self.fifo).st_uid
        except OSError:
            return  # _send says what is wrong
        if owner not in (0, os.getuid()):
            os.chmod(reply_path, 0o622)

    def _send(self, data: bytes, deadline: float) -> None:
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            why = "nobody reads it" if exc.errno == errno.ENXIO else exc.strerror
            raise MIUnavailable(f"no MI answer from fifo:{self.fifo}: {why}") from None
        try:
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:  # the FIFO is full: wait until the hub reads
                    if not _wait(fd, select.POLLOUT, deadline):
                        raise MIUnavailable(
                            f"no MI answer from fifo:{self.fifo}: the request could not be "
                            f"written within {self.timeout:g} s"
                        ) from None
        finally:
            os.close(fd)

    def _receive(self, fd: int, deadline: float) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            if not _wait(fd, select.POLLIN, deadline):
                raise MIUnavailable(
                    f"no MI answer from fifo:{self.fifo} within {self.timeout:g} s: "
                    "is `mpevent serve` running there, with this reply directory?"
                )
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:  # the hub wrote it all and closed
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY:
                raise MIUnavailable(f"MI reply from fifo:{self.fifo} over {MAX_REPLY} bytes")


def _wait(fd: int, events: int, deadline: float) -> bool:
    """Whether ``fd`` became ready for ``events`` before ``deadline``."""
    poller = select.poll()
    poller.register(fd, events)
    remaining = deadline - time.monotonic()
    return remaining > 0 and bool(poller.poll(remaining * 1000))
