"""A SIP-like traffic generator for :mod:`mpevent.workers.sipproxy`, on loopback only.

This module owns the load side of the demo: ``sources`` well-behaved sources
on 127.0.0.2, 127.0.0.3, ... (every 127.0.0.0/8 address is local on Linux,
so each is a distinct source IP to the proxy's pike) share ``rate`` requests
per second, and one flooding source on 127.0.0.66 sends ``flood_rate`` on its
own, which pike should block. A small share of the well-behaved requests is
garbage, to exercise the ``400`` path. Every request gets one reply; the
report counts them by status, and what did not come back within
``reply_timeout`` after the last send as timeouts.

One process, one loop: sends are paced against the clock (each source sends
what it owes for the time elapsed, so a late loop catches up instead of
slowing down), sockets are non-blocking and replies are drained between
sends. Run it by hand::

    python -m mpevent.workers.traffic --port 5060 --rate 1000 --seconds 5
"""

from __future__ import annotations

import argparse
import ipaddress
import select
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from mpevent.system import set_rcvbuf

FLOOD_IP = "127.0.0.66"
METHODS = ("INVITE", "REGISTER", "OPTIONS", "MESSAGE", "SUBSCRIBE", "BYE")
GARBAGE = b"this is not SIP\r\n\r\n"
BURST = 256  # most requests one source sends per loop turn
RCVBUF = 4 << 20


@dataclass
class SourceReport:
    sent: int = 0
    ok: int = 0
    forbidden: int = 0
    bad: int = 0
    other: int = 0


@dataclass
class TrafficReport:
    """What happened; ``timeouts`` are requests that got no reply at all."""

    sent: int = 0
    ok: int = 0  # 200
    forbidden: int = 0  # 403
    bad: int = 0  # 400
    other: int = 0
    timeouts: int = 0
    garbage: int = 0  # of sent: deliberately malformed
    send_errors: int = 0
    elapsed: float = 0.0
    sources: dict[str, SourceReport] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class _Source:
    def __init__(self, ip: str, rate: float, target: tuple[str, int], garbage: float):
        self.ip = ip
        self.rate = rate
        self.target = target
        self.garbage = garbage
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        set_rcvbuf(self.sock, RCVBUF)
        self.sock.bind((ip, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.report = SourceReport()
        self.garbage_sent = 0
        self.errors = 0

    def request(self, n: int) -> bytes:
        # A deterministic share of garbage: request n is garbage when the
        # running total of ``garbage`` crosses an integer at n.
        if self.garbage and int((n + 1) * self.garbage) > int(n * self.garbage):
            self.garbage_sent += 1
            return GARBAGE
        method = METHODS[n % len(METHODS)]
        ip, port = self.ip, self.port
        return (
            f"{method} sip:user{n % 100}@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK-{n}\r\n"
            f"From: <sip:caller@{ip}>;tag={n}\r\n"
            f"To: <sip:user{n % 100}@127.0.0.1>\r\n"
            f"Call-ID: {n}-{ip}@mpevent-traffic\r\n"
            f"CSeq: 1 {method}\r\n"
            "Max-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()

    def send_due(self, elapsed: float) -> None:
        due = min(int(elapsed * self.rate) - self.report.sent, BURST)
        for _ in range(max(due, 0)):
            try:
                self.sock.sendto(self.request(self.report.sent), self.target)
            except BlockingIOError:
                return  # the socket buffer is full: owe it, try on the next turn
            except OSError:
                self.errors += 1  # counted as sent: the request is gone either way
            self.report.sent += 1

    def drain(self) -> None:
        report = self.report
        recv = self.sock.recv
        while True:
            try:
                data = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error for an earlier send; the reply is simply missing
            code = data[8:11]
            if code == b"200":
                report.ok += 1
            elif code == b"403":
                report.forbidden += 1
            elif code == b"400":
                report.bad += 1
            else:
                report.other += 1

    @property
    def replied(self) -> int:
        r = self.report
        return r.ok + r.forbidden + r.bad + r.other


def run(
    target: tuple[str, int],
    *,
    rate: float = 1000.0,
    seconds: float = 5.0,
    sources: int = 4,
    flood_rate: float = 2000.0,
    flood_ip: str = FLOOD_IP,
    garbage: float = 0.01,
    reply_timeout: float = 1.0,
    progress: Callable[[TrafficReport], None] | None = None,
) -> TrafficReport:
    """Send for ``seconds``, wait up to ``reply_timeout`` for replies, report.

    ``progress`` is called with the running report about ten times a second.
    """
    for ip in (target[0], flood_ip):
        if not ipaddress.IPv4Address(ip).is_loopback:
            raise ValueError(f"{ip} is not in 127.0.0.0/8: traffic stays on loopback")
    if not 1 <= sources <= 60:
        raise ValueError("sources must be 1..60 (127.0.0.2 .. 127.0.0.61)")
    plan = [(f"127.0.0.{2 + i}", rate / sources, garbage) for i in range(sources)]
    if flood_rate > 0:
        plan.append((flood_ip, flood_rate, 0.0))
    srcs: list[_Source] = []
    try:
        for ip, source_rate, share in plan:
            srcs.append(_Source(ip, source_rate, target, share))
        poller = select.poll()
        by_fd = {}
        for src in srcs:
            poller.register(src.sock, select.POLLIN)
            by_fd[src.sock.fileno()] = src
        start = time.monotonic()
        end = start + seconds
        next_progress = start
        while True:
            now = time.monotonic()
            sending = now < end
            if sending:
                for src in srcs:
                    src.send_due(now - start)
            elif all(src.replied >= src.report.sent for src in srcs) or now > end + reply_timeout:
                break
            for fd, _ in poller.poll(1 if sending else 20):
                by_fd[fd].drain()
            if progress is not None and now >= next_progress:
                next_progress = now + 0.1
                progress(_report(srcs, now - start))
        report = _report(srcs, min(time.monotonic(), end) - start)
        if progress is not None:
            progress(report)
        return report
    finally:
        for src in srcs:
            src.sock.close()


def _report(srcs: list[_Source], elapsed: float) -> TrafficReport:
    report = TrafficReport(elapsed=elapsed)
    for src in srcs:
        r = src.report
        report.sent += r.sent
        report.ok += r.ok
        report.forbidden += r.forbidden
        report.bad += r.bad
        report.other += r.other
        report.timeouts += max(r.sent - src.replied, 0)
        report.garbage += src.garbage_sent
        report.send_errors += src.errors
        report.sources[src.ip] = SourceReport(**asdict(r))
    return report


def format_report(report: TrafficReport) -> str:
    lines = [
        f"sent {report.sent} in {report.elapsed:.2f}s: 200 {report.ok}, 403 {report.forbidden}, "
        f"400 {report.bad}, other {report.other}, timeouts {report.timeouts}"
    ]
    for ip, r in report.sources.items():
        lines.append(
            f"  {ip:<12} sent {r.sent:>7}  200 {r.ok:>7}  403 {r.forbidden:>7}  400 {r.bad:>5}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpevent.workers.traffic", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="the proxy's address (loopback)")
    parser.add_argument("--port", type=int, default=5060, help="the proxy's UDP port")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests/s, all sources")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sources", type=int, default=4, help="well-behaved sources")
    parser.add_argument("--flood-rate", type=float, default=2000.0, help="0: no flooder")
    parser.add_argument("--garbage", type=float, default=0.01, help="share of malformed requests")
    args = parser.parse_args(argv)
    try:
        report = run(
            (args.host, args.port),
            rate=args.rate,
            seconds=args.seconds,
            sources=args.sources,
            flood_rate=args.flood_rate,
            garbage=args.garbage,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.timeouts == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
