"""A short embedded demo: forked workers raise events, two listeners print them.

``python -m mpevent.demo`` (what ``make demo`` runs). The master creates an
:class:`~mpevent.EventBus`, subscribes a UDP and a UNIX listener, forks a few
workers that raise ``E_SIP_REQUEST`` per request and ``E_PIKE_BLOCKED`` when
a source floods, waits until everything is delivered and prints a summary.
It needs no configuration and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from .bus import EventBus

EVENTS = ("E_SIP_REQUEST", "E_PIKE_BLOCKED")
METHODS = ("INVITE", "REGISTER", "OPTIONS", "BYE", "ACK")


class Listener(threading.Thread):
    """Receives datagrams on one socket and keeps the last few for printing."""

    def __init__(self, name: str, sock: socket.socket, show: int):
        super().__init__(daemon=True)
        self.label = name
        self.sock = sock
        self.show = show
        self.received = 0
        self.stop = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1
            if self.received <= self.show:
                print(f"  {self.label:4} <- {data.decode()}", flush=True)


def worker(bus: EventBus, index: int, requests: int) -> None:
    rng = random.Random(index)
    flooders = {f"198.51.100.{index * 10 + n}" for n in range(3)}
    seen: dict[str, int] = {}
    for seq in range(requests):
        source = rng.choice([*flooders, f"203.0.113.{rng.randint(1, 254)}"])
        bus.raise_event(
            "E_SIP_REQUEST",
            {"worker": index, "seq": seq, "method": rng.choice(METHODS), "source": source},
        )
        seen[source] = seen.get(source, 0) + 1
        if seen[source] == 50:  # pike-like: too many requests from one source
            bus.raise_event("E_PIKE_BLOCKED", {"ip": source})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpevent demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2500, help="per worker")
    parser.add_argument("--show", type=int, default=3, help="events to print per listener")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mpevent-demo-") as tmp:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        udp.bind(("127.0.0.1", 0))
        unix_path = Path(tmp) / "listener.sock"
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        unix.bind(str(unix_path))
        listeners = [Listener("udp", udp, args.show), Listener("unix", unix, args.show)]
        for listener in listeners:
            listener.start()
        started = time.monotonic()
        with EventBus(senders=1, events=EVENTS) as bus:
            for event in EVENTS:
                bus.subscribe(event, f"udp:127.0.0.1:{udp.getsockname()[1]}")
                bus.subscribe(event, f"unix:{unix_path}")
            print(f"mpevent demo: {args.workers} forked workers, {args.requests} requests each")
            pids = []
            for index in range(args.workers):
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        worker(bus, index, args.requests)
                        code = 0
                    finally:
                        os._exit(code)
                pids.append(pid)
            for pid in pids:
                os.waitpid(pid, 0)
            totals = bus.stats()["totals"]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(
                listener.received < totals["enqueued"] for listener in listeners
            ):
                time.sleep(0.02)
            elapsed = time.monotonic() - started
            totals = bus.stats()["totals"]
        for listener in listeners:
            listener.stop.set()
            listener.join()
        udp.close()
        unix.close()
    delivered = " ".join(f"{li.label}={li.received}" for li in listeners)
    print(
        f"raised={totals['raised']} enqueued={totals['enqueued']} delivered: {delivered} "
        f"dropped={totals['dropped']} rejected={totals['rejected']} in {elapsed:.2f}s"
    )
    ok = all(li.received == totals["enqueued"] for li in listeners) and not totals["dropped"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
