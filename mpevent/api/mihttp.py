"""The MI over HTTP: ``POST /mi`` with a JSON-RPC body, like OpenSIPS's mi_http.

The standard library's threading HTTP server parses HTTP; each request's
body is handed to the hub's loop (:meth:`Hub.submit`), which answers it with
the same pure method table as the datagram transports, so the hub's state is
only ever touched by its own thread. Bodies over the MI request limit get a
JSON-RPC error without being read; slow clients are cut off by a socket
timeout.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson

from mpevent.protocol import mi

log = logging.getLogger("mpevent.mi.http")

Submit = Callable[[bytes, Callable[[bytes | None], None]], None]
REPLY_TIMEOUT = 5.0
SOCKET_TIMEOUT = 5.0


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0].rstrip("/") != "/mi":
            self._send(404, b'{"error":"not found: POST /mi"}', close=True)
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send(411, b'{"error":"Content-Length required"}', close=True)
            return
        if length < 0 or length > mi.MAX_REQUEST:
            reply = orjson.dumps(
                {
                    "jsonrpc": "2.0",
                    "error": {
                        "code": mi.INVALID_REQUEST,
                        "message": f"Request too large (max {mi.MAX_REQUEST} bytes)",
                    },
                    "id": None,
                }
            )
            self._send(413, reply, close=True)
            return
        body = self.rfile.read(length)
        done = threading.Event()
        answer: list[bytes | None] = []

        def reply(data: bytes | None) -> None:
            answer.append(data)
            done.set()

        self.server.submit(body, reply)
        if not done.wait(REPLY_TIMEOUT):
            self._send(503, b'{"error":"the hub did not answer in time"}')
            return
        data = answer[0]
        if data is None:  # a JSON-RPC notification: nothing to say
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(200, data)

    def do_GET(self) -> None:
        self._send(405, b'{"error":"use POST /mi with a JSON-RPC request"}', close=True)

    def _send(self, status: int, body: bytes, close: bool = False) -> None:
        """``close``: the request's body (if any) was not read, so whatever
        follows on this connection cannot be parsed as the next request."""
        self.send_response(status)
        if close:
            self.send_header("Connection", "close")  # also sets close_connection
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], submit: Submit):
        self.submit = submit
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class HttpMI:
    """An HTTP MI listener serving in a background thread."""

    def __init__(self, address: tuple[str, int], submit: Submit):
        self._server = _Server(address, submit)
        self.address = self._server.server_address[:2]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="mpevent-mi-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
