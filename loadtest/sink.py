"""The load test's subscriber: receives every notification, checks it, reports loss and latency.

It attaches to a running ``mpevent serve`` by segment name, publishes and
subscribes (through the MI) a UDP socket and a UNIX datagram socket to the
load events, and receives until SIGINT/SIGTERM. Each datagram must be a
JSON-RPC 2.0 notification in OpenSIPS's byte layout; it is counted per
subscriber and event, and its raise-to-receive latency is ``now -
params["t"]`` (both ``time.monotonic_ns()``, one clock for the whole host).
``E_LOAD`` events also carry ``pid`` and ``seq`` (a counter per raising
process): events from one process must arrive in the order it raised them.

On stop it drains: it waits, up to ``--drain-timeout``, until every
subscriber has received every event the hub enqueued since the sink started
(the hub's exact counters, read from the segment). Then it prints the
summary and exits 0 when nothing is missing that the hub did not count
itself (a destination's send failures and backlog drops), nothing was
malformed and nothing arrived out of order; 1 otherwise. Latency
percentiles are :func:`mpevent.tools.figures.percentile`'s, as the
benchmark's.

Run it by hand (from the repository root, with the venv's python)::

    python loadtest/sink.py --name mpevent-load

Everything stays on loopback: the UDP socket must bind in 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import select
import signal
import socket
import sys
import tempfile
import textwrap
import time
from array import array
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

import mpevent
from mpevent.system import set_rcvbuf
from mpevent.tools.figures import fmt_ms, fmt_num, format_table, summarize

DEFAULT_EVENTS = ("E_LOAD", "E_SIP_REQUEST", "E_PIKE_BLOCKED")
PREFIX = b'{"jsonrpc":"2.0","method":"'
RCVBUF = 16 << 20  # a big receive buffer, past rmem_max when we may (root)


class Subscriber:
    """One subscribed socket and what arrived on it."""

    def __init__(self, sock: socket.socket, address: str, path: Path | None = None):
        self.sock = sock
        self.address = address  # as the hub prints it
        self.path = path
        self.received: dict[str, int] = defaultdict(int)
        self.latency: dict[str, array] = defaultdict(lambda: array("q"))
        self.malformed = 0
        self.samples: dict[str, bytes] = {}
        self.last_seq: dict[int, int] = {}  # E_LOAD: pid -> last seq seen
        self.out_of_order = 0
        self.gaps = 0  # E_LOAD seq numbers skipped (raises that returned False)

    def drain(self, clock=time.monotonic_ns) -> int:
        """Receive everything queued now; returns how many datagrams."""
        recv, loads = self.sock.recv, orjson.loads
        received, latency = self.received, self.latency
        n = 0
        while True:
            try:
                data = recv(65536)
            except (BlockingIOError, InterruptedError):
                return n
            now = clock()
            n += 1
            try:
                if not data.startswith(PREFIX):
                    raise ValueError("not an OpenSIPS-style notification")
                msg = loads(data)
                method = msg["method"]
                params = msg.get("params")
                if msg["jsonrpc"] != "2.0" or "id" in msg or not isinstance(method, str):
                    raise ValueError("not a JSON-RPC 2.0 notification")
            except (ValueError, KeyError, TypeError):
                self.malformed += 1
                self.samples.setdefault("(malformed)", data[:200])
                continue
            received[method] += 1
            if method not in self.samples:
                self.samples[method] = data
            if isinstance(params, dict):
                t = params.get("t")
                if isinstance(t, int):
                    latency[method].append(now - t)
                if method == "E_LOAD":
                    self._check_order(params)

    def _check_order(self, params: dict[str, Any]) -> None:
        pid, seq = params.get("pid"), params.get("seq")
        if not isinstance(pid, int) or not isinstance(seq, int):
            return
        last = self.last_seq.get(pid, -1)
        if seq <= last:
            self.out_of_order += 1
        else:
            self.gaps += seq - last - 1
            self.last_seq[pid] = seq

    def close(self) -> None:
        self.sock.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def open_udp(spec: str) -> Subscriber:
    host, _, port = spec.rpartition(":")
    if not ipaddress.IPv4Address(host).is_loopback:
        raise ValueError(f"--udp {spec}: the sink stays on loopback (127.0.0.0/8)")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    set_rcvbuf(sock, RCVBUF)
    sock.bind((host, int(port)))
    sock.setblocking(False)
    bound = sock.getsockname()
    return Subscriber(sock, f"udp:{bound[0]}:{bound[1]}")


def open_unix(path: Path) -> Subscriber:
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    set_rcvbuf(sock, RCVBUF)
    sock.bind(str(path))
    sock.setblocking(False)
    return Subscriber(sock, f"unix:{path}", path)


# -- the hub's counters -------------------------------------------------------


def event_counters(conn: mpevent.Connection, events: list[str]) -> dict[str, dict[str, int]]:
    got = conn.stats()["events"]
    keys = ("enqueued", "dropped", "rejected", "no_subscriber")
    return {e: {k: got.get(e, {}).get(k, 0) for k in keys} for e in events}


def destination_counters(
    conn: mpevent.Connection, subs: list[Subscriber]
) -> dict[tuple[str, str], dict[str, int]]:
    mine = {s.address for s in subs}
    rows = {}
    for row in conn.stats()["destinations"]:
        if row["socket"] in mine:
            rows[(row["socket"], row["event"])] = row
    return rows


def since(now: dict[str, dict[str, int]], base: dict[str, dict[str, int]]):
    return {e: {k: v - base[e][k] for k, v in c.items()} for e, c in now.items()}


def hub_counted(row: dict[str, int]) -> int:
    """What the hub itself counted as not delivered to a subscriber."""
    return row.get("failed", 0) + row.get("dropped", 0)


def caught_up(conn: mpevent.Connection, subs, events, base) -> bool:
    """Has every enqueued event arrived, or been counted as lost by the hub?"""
    delta = since(event_counters(conn, events), base)
    dests = destination_counters(conn, subs)
    return all(
        s.received[e] + hub_counted(dests.get((s.address, e), {})) >= delta[e]["enqueued"]
        for s in subs
        for e in events
    )


# -- the report ---------------------------------------------------------------


def indent(table: str) -> str:
    return textwrap.indent(table, "  ")


def report(
    subs: list[Subscriber],
    events: list[str],
    delta: dict[str, dict[str, int]],
    dests: dict[tuple[str, str], dict[str, int]],
    elapsed: float,
    drained: float,
    caught: bool,
) -> tuple[bool, str]:
    """The summary text and whether the run passes."""
    out = [f"sink: summary after {elapsed:.1f} s (drain {drained:.2f} s)"]
    counters = ("enqueued", "dropped", "rejected", "no_subscriber")
    rows = [[e, *(fmt_num(delta[e][k]) for k in counters)] for e in events]
    headers = ["event", "enqueued", "ring-dropped", "rejected", "no-subscriber"]
    out.append(indent(format_table(headers, rows, align="lrrrr")))
    out.append(
        "  (since the sink started; ring-dropped = raise_event returned False because the "
        "lane was full: never enqueued, locust counts them as failures)"
    )
    out.append("")
    rows = []
    ok = True
    unexplained_total = 0
    hub_counted_total = 0
    for s in subs:
        for e in events:
            got = s.received[e]
            loss = delta[e]["enqueued"] - got
            row = dests.get((s.address, e), {})
            counted = hub_counted(row)
            hub_counted_total += counted
            unexplained = loss - counted
            if unexplained != 0:
                ok = False
                unexplained_total += abs(unexplained)
            latency = summarize(s.latency[e])
            rows.append(
                [s.address, e, fmt_num(got), fmt_num(loss), fmt_num(counted)]
                + [fmt_ms(latency[k], 3) for k in ("median", "p99", "max")]
            )
        for e in sorted(set(s.received) - set(events)):
            rows.append([s.address, f"{e} (not subscribed)", fmt_num(s.received[e]), *["-"] * 5])
    headers = ["subscriber", "event", "received", "loss", "hub-counted", "p50", "p99", "max"]
    out.append(indent(format_table(headers, rows, align="llrrrrrr")))
    out.append(
        "  (loss = enqueued - received; hub-counted = the hub's send failures + backlog drops "
        "for that subscriber; latency = raise_event to recv)"
    )
    malformed = sum(s.malformed for s in subs)
    disorder = sum(s.out_of_order for s in subs)
    pids = sorted({pid for s in subs for pid in s.last_seq})
    out.append("")
    out.append(f"  malformed datagrams: {malformed}")
    if pids:
        shown = ", ".join(map(str, pids[:8])) + (", ..." if len(pids) > 8 else "")
        gaps = ", ".join(f"{s.address.split(':')[0]} {fmt_num(s.gaps)}" for s in subs)
        out.append(
            f"  E_LOAD producers: {len(pids)} processes (pids {shown}); out of order: {disorder}; "
            f"seq gaps: {gaps} (ring-dropped + hub-counted: raises that never arrived)"
        )
    ok = ok and malformed == 0 and disorder == 0
    total = sum(sum(s.received.values()) for s in subs)
    if total == 0:
        ok = False
    samples: dict[str, bytes] = {}
    for s in subs:
        for e, data in s.samples.items():
            samples.setdefault(e, data)
    for e, data in samples.items():
        out.append(f"  received {e}: {data.decode(errors='replace')}")
    out.append("")
    if ok:
        if hub_counted_total:
            fate = (
                "reached every subscriber or was counted as dropped by the hub "
                f"({fmt_num(hub_counted_total)} datagrams, see hub-counted)"
            )
        else:
            fate = "reached every subscriber"
        out.append(
            f"sink: OK: {fmt_num(total)} notifications; every enqueued event {fate}; "
            "none malformed or out of order"
        )
    else:
        why = []
        if total == 0:
            why.append("nothing was received")
        if unexplained_total:
            why.append(
                f"{fmt_num(unexplained_total)} events lost (or duplicated) "
                "that the hub did not count" + ("" if caught else "; the drain timed out")
            )
        if malformed:
            why.append(f"{malformed} malformed")
        if disorder:
            why.append(f"{disorder} out of order")
        out.append(f"sink: FAILED: {'; '.join(why)}")
    return ok, "\n".join(out)


# -- main ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python loadtest/sink.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--name", default="mpevent", help="segment of the mpevent serve")
    parser.add_argument(
        "--events",
        default=",".join(DEFAULT_EVENTS),
        help=f"comma-separated events to subscribe to (default {','.join(DEFAULT_EVENTS)})",
    )
    parser.add_argument(
        "--udp", default="127.0.0.1:0", help='UDP socket HOST:PORT (loopback), "" for none'
    )
    parser.add_argument(
        "--unix", default=None, help='UNIX socket path (default: a temporary one), "" for none'
    )
    parser.add_argument("--drain-timeout", type=float, default=15.0, help="seconds (default 15)")
    parser.add_argument(
        "--progress", type=float, default=5.0, help="seconds between progress lines, 0: none"
    )
    parser.add_argument("--ready-file", help="written once subscribed (for scripts)")
    args = parser.parse_args(argv)
    events = [e.strip() for e in args.events.split(",") if e.strip()]
    if not events:
        parser.error("--events: no event")

    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    subs: list[Subscriber] = []
    conn = None
    tmpdir = None
    subscribed: list[tuple[str, str]] = []
    try:
        try:
            conn = mpevent.connect(args.name, timeout=5.0)
        except mpevent.NotServing as exc:
            print(f"sink: no mpevent serve --name {args.name} is running: {exc}", file=sys.stderr)
            return 2
        if args.udp:
            subs.append(open_udp(args.udp))
        unix = args.unix
        if unix is None:
            tmpdir = Path(tempfile.mkdtemp(prefix="mpevent-sink-", dir="/tmp"))
            unix = str(tmpdir / "sink.sock")
        if unix:
            subs.append(open_unix(Path(unix)))
        if not subs:
            parser.error("no socket: give --udp and/or --unix")
        for e in events:
            conn.publish_event(e)
        base = event_counters(conn, events)
        for s in subs:
            for e in events:
                conn.subscribe(e, s.address, expire=None)
                subscribed.append((e, s.address))
        print(
            f"sink: subscribed {', '.join(s.address for s in subs)} to {', '.join(events)} "
            f"on segment {args.name}",
            flush=True,
        )
        if args.ready_file:
            tmp = Path(args.ready_file + ".tmp")
            tmp.write_bytes(
                orjson.dumps({"pid": os.getpid(), "sockets": [s.address for s in subs]})
            )
            tmp.rename(args.ready_file)

        poller = select.poll()
        by_fd = {s.sock.fileno(): s for s in subs}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        started = time.monotonic()
        next_progress = started + args.progress if args.progress > 0 else float("inf")
        while not stop:
            for fd, _ in poller.poll(200):
                if fd == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 512)
                else:
                    by_fd[fd].drain()
            now = time.monotonic()
            if now >= next_progress:
                next_progress = now + args.progress
                delta = since(event_counters(conn, events), base)
                enq = sum(c["enqueued"] for c in delta.values())
                got = "  ".join(
                    f"{s.address.split(':')[0]} {fmt_num(sum(s.received.values()))}" for s in subs
                )
                print(
                    f"sink: {now - started:6.1f}s  enqueued {fmt_num(enq)}  received: {got}",
                    flush=True,
                )

        # Drain: everything the hub enqueued must arrive (or be counted by it).
        stopped = time.monotonic()
        deadline = stopped + args.drain_timeout
        caught = False
        while True:
            for s in subs:
                s.drain()
            if caught_up(conn, subs, events, base):
                caught = True
                break
            if time.monotonic() > deadline:
                break
            poller.poll(20)
        drained = time.monotonic() - stopped
        for s in subs:
            s.drain()
        delta = since(event_counters(conn, events), base)
        dests = destination_counters(conn, subs)
        ok, text = report(subs, events, delta, dests, stopped - started, drained, caught)
        print(text, flush=True)
        return 0 if ok else 1
    finally:
        if conn is not None:
            for e, address in subscribed:
                with contextlib.suppress(Exception):
                    conn.unsubscribe(e, address)
            conn.close()
        for s in subs:
            s.close()
        if tmpdir is not None:
            with contextlib.suppress(OSError):
                tmpdir.rmdir()
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)


if __name__ == "__main__":
    sys.exit(main())
