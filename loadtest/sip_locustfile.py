"""Locust users that send SIP-like requests over UDP to the proxy of ``mpevent.workers``.

Every request reaches a forked child of :mod:`mpevent.workers.sipproxy`, which raises
``E_SIP_REQUEST`` through mpevent and answers ``200 OK``: so the events of
this test are raised by real prefork workers, and loadtest/sink.py checks
that each of them arrives.

Each user has a UDP socket of its own, bound to its own loopback address
(127.X.Y.Z: every 127.0.0.0/8 address is local on Linux, so the proxy's pike
sees each user as a separate source), and sends INVITE, REGISTER, OPTIONS,
MESSAGE, SUBSCRIBE and BYE in turn, paced with ``constant_throughput``
(``--sip-rate`` requests/s per user). Per request it reports to locust:
response time = request sent to matching reply received (by Call-ID), in ms;
a failure on timeout (``--sip-timeout``) or a status other than 200. A
``403`` (the proxy's pike blocking a flooding source) is reported under its
own name, ``METHOD 403 (pike)``, not as a failure; at the default rates pike
does not trigger.

The proxy's address is locust's ``--host`` (``127.0.0.1:5060``, optionally
written ``udp:127.0.0.1:5060``); it must be on loopback.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import time

from locust import User, constant_throughput, events, task

METHODS = ("INVITE", "REGISTER", "OPTIONS", "MESSAGE", "SUBSCRIBE", "BYE")
_users = itertools.count()


class SipTimeout(Exception):
    pass


class SipError(Exception):
    pass


def parse_target(host: str) -> tuple[str, int]:
    text = host.strip()
    for prefix in ("udp://", "udp:", "sip:"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    addr, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--host {host!r}: expected HOST:PORT, e.g. 127.0.0.1:5060")
    if not ipaddress.IPv4Address(addr).is_loopback:
        raise ValueError(f"--host {host!r}: the proxy must be on loopback (127.0.0.0/8)")
    return addr, int(port)


def source_address(index: int) -> str:
    """A loopback address of its own for user ``index`` of this process."""
    return f"127.{10 + os.getpid() % 240}.{index // 250 % 256}.{2 + index % 250}"


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("SIP-like requests to mpevent.workers.sipproxy")
    group.add_argument(
        "--sip-rate",
        type=float,
        default=20.0,
        env_var="LOCUST_SIP_RATE",
        help="requests per second per user (constant_throughput); default 20",
    )
    group.add_argument(
        "--sip-timeout",
        type=float,
        default=2.0,
        env_var="LOCUST_SIP_TIMEOUT",
        help="seconds to wait for a reply before counting a failure; default 2",
    )


class SipUser(User):
    """One SIP-like client on its own loopback address."""

    host = "127.0.0.1:5060"

    def on_start(self) -> None:
        options = self.environment.parsed_options
        rate = options.sip_rate if options is not None else 20.0
        self.timeout = options.sip_timeout if options is not None else 2.0
        self._pace = constant_throughput(rate)
        self._fire = self.environment.events.request.fire
        self.target = parse_target(self.host)
        self.ip = source_address(next(_users))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.ip, 0))
        self.sock.connect(self.target)  # only the proxy's replies reach us
        self.port = self.sock.getsockname()[1]
        self.n = 0

    def on_stop(self) -> None:
        self.sock.close()

    def wait_time(self) -> float:
        return self._pace(self)

    def request(self, n: int, method: str) -> tuple[bytes, bytes]:
        ip, port = self.ip, self.port
        call_id = f"{n}-{ip}-{port}@locust"
        data = (
            f"{method} sip:user{n % 100}@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK-{n}\r\n"
            f"From: <sip:locust@{ip}>;tag={port}-{n}\r\n"
            f"To: <sip:user{n % 100}@127.0.0.1>\r\n"
            f"Call-ID: {call_id}\r\n"
            f"CSeq: {n + 1} {method}\r\n"
            "Max-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        return data, f"\r\nCall-ID: {call_id}\r\n".encode()

    @task
    def send(self) -> None:
        n = self.n
        self.n += 1
        method = METHODS[n % len(METHODS)]
        data, call_id = self.request(n, method)
        name = method
        reply = b""
        exception: Exception | None = None
        start = time.perf_counter()
        deadline = start + self.timeout
        try:
            self.sock.send(data)
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
                reply = self.sock.recv(65535)
                if call_id in reply:
                    break  # a late reply to an earlier request that timed out: skip it
        except TimeoutError:
            exception = SipTimeout(f"no reply within {self.timeout:g} s")
        except OSError as exc:
            exception = SipError(f"socket error: {exc.strerror or exc}")
        took = (time.perf_counter() - start) * 1000.0
        if exception is None:
            status = reply[8:11]
            if status == b"403":
                name = f"{method} 403 (pike)"
            elif status != b"200":
                line = reply.split(b"\r\n", 1)[0].decode(errors="replace")
                exception = SipError(f"unexpected reply {line!r}")
        self._fire(
            request_type="SIP",
            name=name,
            response_time=took,
            response_length=len(reply),
            exception=exception,
            context={},
        )
