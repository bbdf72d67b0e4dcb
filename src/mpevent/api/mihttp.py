"""The MI over HTTP: ``POST /mi`` with a JSON-RPC body, like OpenSIPS's mi_http,
and ``GET /metrics`` for Prometheus.

The standard library's threading HTTP server parses HTTP; each request's
body is handed to the hub's loop (:meth:`Hub.submit`), which answers it with
the same pure method table as the datagram transports, so the hub's state is
only ever touched by its own thread. Bodies over the MI request limit get a
JSON-RPC error without being read; slow clients are cut off by a socket
timeout.

``GET /metrics`` (and ``HEAD``) renders :mod:`mpevent.protocol.metrics`.
What is hub state (the processes it knows, its start time, the table it
wrote) is read in the hub's loop, through the same :meth:`Hub.submit`; the
counters are summed here, in the HTTP thread, from the segment: they are
single-writer words in shared memory that any process may read (the
senders and ``EventBus.stats()`` do), and summing them for every lane and
event takes milliseconds the hub's loop, which must answer the MI within a
few, does not spend.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, NamedTuple

from mpevent import defaults
from mpevent.protocol import metrics, mi
from mpevent.protocol.registry import Snapshot
from mpevent.shm import counters
from mpevent.shm.layout import H_REPAIRED
from mpevent.shm.segment import Segment
from mpevent.shm.table import read_snapshot

if TYPE_CHECKING:
    from mpevent.processes.hub import Hub

log = logging.getLogger("mpevent.mi.http")

# Hub.submit: an MI request (or a function of the hub) and where its answer goes.
Submit = Callable[[Any, Callable[[Any], None]], None]
REPLY_TIMEOUT = 5.0
SOCKET_TIMEOUT = 5.0
METRICS_PATH = "/metrics"
NO_ANSWER = object()  # the hub did not answer within REPLY_TIMEOUT


class HubFacts(NamedTuple):
    """What ``GET /metrics`` needs of the hub's state, taken in its loop."""

    seg: Segment
    started: float  # Unix time
    processes: list[dict[str, Any]]  # ps rows
    snapshot: Snapshot  # the subscription table (the hub writes it: never torn in its loop)


def hub_facts(hub: Hub) -> HubFacts:
    """Run by the hub's loop (:meth:`Hub.submit`)."""
    got = read_snapshot(hub.seg)
    return HubFacts(hub.seg, hub.started, hub.processes(), got[1] if got else Snapshot([]))


def render_metrics(facts: HubFacts, now: float) -> bytes:
    """The ``/metrics`` body: the counters summed from the segment (any thread)."""
    seg = facts.seg
    data = {
        "events": counters.event_counters(seg),
        "destinations": counters.destination_counters(seg, facts.snapshot),
        "senders": counters.sender_counters(seg),
        "repaired": seg.words[H_REPAIRED],
        "shared_lane_writers": counters.shared_lane_writers(seg),
    }
    text = metrics.render(
        data,
        uptime=max(0.0, now - facts.started),
        processes=facts.processes,
        start_time=facts.started,
        version=defaults.version(),
    )
    return text.encode()


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
            if length < 0:
                raise ValueError(length)
        except ValueError:
            self._send(411, b'{"error":"Content-Length required"}', close=True)
            return
        if length > mi.MAX_REQUEST:
            # The JSON-RPC error too, with the size: a client shows that, not "HTTP 413".
            self._send(413, mi.request_too_large_reply(length), close=True)
            return
        body = self.rfile.read(length)
        data = self._ask_hub(body)
        if data is NO_ANSWER:
            self._send(503, b'{"error":"the hub did not answer in time"}')
            return
        if data is None:  # a JSON-RPC notification: nothing to say
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(200, data)

    def _ask_hub(self, request: Any) -> Any:
        """The hub loop's answer to ``request``; NO_ANSWER when it gave none in time."""
        done = threading.Event()
        answer: list[Any] = []

        def reply(data: Any) -> None:
            answer.append(data)
            done.set()

        self.server.submit(request, reply)
        if not done.wait(REPLY_TIMEOUT):
            return NO_ANSWER
        return answer[0]

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def _get(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        # A body on a GET is not read: close rather than parse it as a request.
        close = "Content-Length" in self.headers or "Transfer-Encoding" in self.headers
        if path.rstrip("/") == "/mi":
            self._send(405, b'{"error":"use POST /mi with a JSON-RPC request"}', True, head)
            return
        if path != METRICS_PATH:
            self._send(404, b'{"error":"not found: GET /metrics or POST /mi"}', True, head)
            return
        facts = self._ask_hub(hub_facts)
        if not isinstance(facts, HubFacts):
            self._send(503, b'{"error":"the hub did not answer in time"}', close, head)
            return
        try:
            body = render_metrics(facts, time.time())
        except Exception:  # the segment was closed under us: the daemon is stopping
            log.debug("metrics failed", exc_info=True)
            self._send(503, b'{"error":"the hub is stopping"}', True, head)
            return
        self._send(200, body, close, head, content_type=metrics.CONTENT_TYPE)

    def _send(
        self,
        status: int,
        body: bytes,
        close: bool = False,
        head: bool = False,
        content_type: str = "application/json",
    ) -> None:
        """``close``: the request's body (if any) was not read, so whatever
        follows on this connection cannot be parsed as the next request.
        ``head``: the headers ``body`` would have, without it."""
        self.send_response(status)
        if close:
            self.send_header("Connection", "close")  # also sets close_connection
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
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
