"""Chaos: subscribers that never read cannot make a sender's memory grow.

UNIX subscribers bind and never read; events of about 60 kB go to all of
them, with default settings. Each destination's backlog is bounded in bytes
(``backlog_bytes``), all of a sender's together too
(``sender_backlog_bytes``), so the sender's RSS stays under 256 MiB however
many such subscribers there are (bounded in count only, one of them took a
sender to 962 MiB, four to 3.8 GiB). With few of them each backlog fills to
its own bound; with many, the sender's bound is reached first. Then they all
read: each gets exactly what was counted as sent, in order; the rest was
counted as dropped; nothing failed, nothing is left pending.

``make test`` raises 600 events; ``make chaos`` (``MPEVENT_CHAOS_ROUNDS=200``)
raises 20,000, and ``-s`` shows the sender's RSS before and after.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import orjson
import pytest
from support import drained, raise_retrying, sender_processes, wait_for

from mpevent import EventBus, defaults
from mpevent.processes.sender.backlog import ENTRY_OVERHEAD
from mpevent.protocol.payload import encode_notification
from mpevent.shm.layout import S_LOOPS

ROUNDS = int(os.environ.get("MPEVENT_CHAOS_ROUNDS", "6"))
EVENTS = 100 * ROUNDS
PAD = 60_000
RSS_BOUND = 256 << 20  # what the default bounds promise for a sender's RSS
MIB = 1 << 20


def params(n: int) -> dict[str, str]:
    return {"n": f"{n:08d}", "pad": "x" * PAD}  # every datagram the same size


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory (Linux: VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.chaos
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stuck", [1, 4, 24])
def test_stuck_subscribers_with_large_events_keep_the_sender_small(tmp_path, stuck):
    size = len(encode_notification("E_BIG", params(0)))
    charge = size + ENTRY_OVERHEAD
    assert 60_000 < size < 61_000
    per_destination = defaults.BACKLOG_BYTES // charge  # what one backlog can keep
    per_sender = defaults.SENDER_BACKLOG_BYTES // charge  # ... all of them together
    paths = [tmp_path / f"stuck{i}.sock" for i in range(stuck)]
    receivers = []
    for path in paths:
        rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        rx.bind(str(path))
        rx.setblocking(False)
        receivers.append(rx)
    try:
        with EventBus() as bus:
            bus.publish_event("E_BIG")
            for path in paths:
                bus.subscribe("E_BIG", f"unix:{path}", expire=None)
            (sender,) = sender_processes(bus, 1)
            loops = bus.segment.layout.sender_word(0) + S_LOOPS
            assert wait_for(lambda: bus.segment.words[loops] > 0)  # it runs, table loaded
            before = sender.memory_info().rss
            for n in range(EVENTS):
                raise_retrying(bus.raise_event, "E_BIG", params(n))
            assert wait_for(lambda: drained(bus), timeout=120), bus.stats()["events"]
            after = sender.memory_info().rss
            peak = peak_rss(sender.pid)
            stuck_rows = {r["socket"]: r for r in bus.stats()["destinations"]}

            # Now they read, and the sender sends them what waited.
            got: dict[int, list[int]] = {i: [] for i in range(stuck)}

            def read_everything() -> bool:
                for i, rx in enumerate(receivers):
                    try:
                        while True:
                            got[i].append(int(orjson.loads(rx.recv(70000))["params"]["n"]))
                    except BlockingIOError:
                        pass
                return all(r["pending"] == 0 for r in bus.stats()["destinations"])

            assert wait_for(read_everything, timeout=60), bus.stats()["destinations"]
            read_everything()  # what went out between the last read and the check
            rows = {r["socket"]: r for r in bus.stats()["destinations"]}
            events = bus.stats()["events"]["E_BIG"]
    finally:
        for rx in receivers:
            rx.close()
        for path in paths:
            path.unlink(missing_ok=True)

    print(
        f"\n{stuck} stuck UNIX subscriber(s), {EVENTS} events of {size} B: sender RSS "
        f"{before / MIB:.0f} -> {after / MIB:.0f} MiB (peak {peak / MIB:.0f} MiB), "
        f"waiting {sum(r['pending'] for r in stuck_rows.values())} datagrams"
    )
    assert events["enqueued"] == events["dispatched"] == EVENTS, events
    assert peak < RSS_BOUND and after < RSS_BOUND, (before, after, peak)
    assert after - before < defaults.SENDER_BACKLOG_BYTES + 32 * MIB, (before, after)

    # While stuck: each backlog full to the bound that stopped it, the rest dropped.
    waiting = [r["pending"] for r in stuck_rows.values()]
    if stuck * per_destination <= per_sender:
        assert waiting == [per_destination] * stuck, waiting
    else:
        assert sum(waiting) == per_sender and max(waiting) <= per_destination, waiting
    for row in stuck_rows.values():
        assert row["routed"] == EVENTS and row["failed"] == 0, row
        assert row["routed"] == row["sent"] + row["dropped"] + row["pending"], row
        assert row["dropped"] > 0, row

    # After reading: every datagram counted sent arrived, in order; the rest is dropped.
    for i, path in enumerate(paths):
        row = rows[f"unix:{path}"]
        assert row["pending"] == 0 and row["failed"] == 0, row
        assert row["routed"] == EVENTS == row["sent"] + row["dropped"], row
        assert len(got[i]) == row["sent"], (len(got[i]), row)
        assert got[i] == sorted(set(got[i])), "out of order or twice"
        assert row["bytes"] == row["sent"] * size, row
