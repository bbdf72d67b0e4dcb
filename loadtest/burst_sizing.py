"""How a subscriber's socket size decides what a flat-out burst delivers.

    python loadtest/burst_sizing.py [EVENTS]      (BACKLOG=N sets the bus's backlog)

One bus, one event, three subscribers read by threads of this process: UDP
with the default SO_RCVBUF, UDP with 8 MiB, UNIX with the system's
net.unix.max_dgram_qlen. Prints what each received and what mpevent counted
(README, "Sizing subscribers"). Traffic stays on loopback and in /tmp.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

from mpevent import EventBus
from mpevent.system import set_rcvbuf

PARAMS_PAD = "x" * 100


def read_all(sock: socket.socket, got: list[int], stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            sock.recv(70000)
        except TimeoutError:
            continue
        got[0] += 1


def udp_sink(rcvbuf: int) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf:
        set_rcvbuf(sock, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    return sock, f"udp:127.0.0.1:{sock.getsockname()[1]}"


def unix_sink(path: str) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return sock, f"unix:{path}"


def main(events: int, backlog: int) -> None:
    path = f"/tmp/mpevent-burst-{os.getpid()}.sock"
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    qlen = Path("/proc/sys/net/unix/max_dgram_qlen").read_text().strip()
    print(f"SO_RCVBUF default {probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}, "
          f"net.unix.max_dgram_qlen {qlen}, backlog {backlog}")  # fmt: skip
    probe.close()
    sinks = [
        ("udp, default SO_RCVBUF", *udp_sink(0)),
        ("udp, SO_RCVBUF 8 MiB", *udp_sink(8 << 20)),
        ("unix, the system's queue", *unix_sink(path)),
    ]
    stop = threading.Event()
    counts = [[0] for _ in sinks]
    readers = [
        threading.Thread(target=read_all, args=(sock, got, stop))
        for (_, sock, _), got in zip(sinks, counts, strict=True)
    ]
    for reader in readers:
        reader.start()
    try:
        with EventBus(backlog=backlog) as bus:
            bus.publish_event("E_BURST")
            for _, _, address in sinks:
                bus.subscribe("E_BURST", address)
            for seq in range(events):
                while not bus.raise_event("E_BURST", {"seq": seq, "pad": PARAMS_PAD}):
                    time.sleep(0.0001)  # the producer's lane is full: let the sender catch up
            time.sleep(2)
            rows = {row["socket"]: row for row in bus.stats()["destinations"]}
    finally:
        stop.set()
        for reader in readers:
            reader.join()
        for _, sock, _ in sinks:
            sock.close()
        os.unlink(path)
    for (label, _, address), got in zip(sinks, counts, strict=True):
        row = rows[address]
        print(f"{label:26s} raised {events}  received {got[0]:6d}  "
              f"counted sent {row['sent']:6d}  dropped {row['dropped']:6d}")  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000, int(os.environ.get("BACKLOG", 16384)))
