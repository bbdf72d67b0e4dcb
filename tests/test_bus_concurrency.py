"""EventBus from many processes and threads at once: forked producers (to
depth two), threads raising together, a fork from a thread while the others
raise, threads learning new events at the same moment.

Every stream must arrive whole, in order, exactly once, and every process
and thread must get a lane or an event id of its own.
"""

from __future__ import annotations

import os
import random
import select
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
from support import (
    Collector,
    Kids,
    UdpSink,
    backlogs_empty,
    check_accounting,
    check_stream,
    destination_stats,
    drained,
    event_stats,
    forks_from_threads,
    raise_retrying,
    wait_for,
)

from mpevent import EventBus, encode_notification
from mpevent.system import fork_call, reap

pytestmark = forks_from_threads

# --- forked producers, depth 2 ------------------------------------------------

FORK_N = 2000


def _fork_params(p: int, seq: int) -> dict[str, int]:
    return {"p": p, "seq": seq}


def read_lines(fd: int, count: int, timeout: float) -> list[list[str]]:
    """Up to ``count`` lines from pipe ``fd``, split into words."""
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return [line.split() for line in buf.decode().splitlines()]


def _raise_seq(bus: EventBus, index: int, report_w: int, release_r: int) -> int:
    for seq in range(FORK_N):
        raise_retrying(bus.raise_event, "E_FORK", _fork_params(index, seq))
    os.write(report_w, f"{index} {os.getpid()} {bus.producer.lane}\n".encode())
    # Stay alive (and keep the lane) until all six have reported.
    select.select([release_r], [], [], 60)
    return 0


def _fork_tree(bus: EventBus, index: int, report_w: int, release_r: int, release_w: int) -> int:
    os.close(release_w)  # only the test holds it: its closing releases everyone
    grandchild = fork_call(_raise_seq, bus, 3 + index, report_w, release_r)
    mine = 1
    try:
        mine = _raise_seq(bus, index, report_w, release_r)
    finally:
        theirs = reap(grandchild, 60)  # grandchildren are reaped by their parents
    return mine or theirs


@pytest.mark.timeout(90)
def test_forked_producers_depth_two(kids: Kids, tmp_path: Path, udp_sink, unix_sink) -> None:
    expected = {
        p: [encode_notification("E_FORK", _fork_params(p, i)) for i in range(FORK_N)]
        for p in range(6)
    }
    total = 6 * FORK_N
    collectors = [
        Collector(kids, udp_sink, tmp_path / "udp.bin", expect=total),
        Collector(kids, unix_sink, tmp_path / "unix.bin", expect=total),
    ]
    with EventBus() as bus:
        bus.publish_event("E_FORK")
        bus.subscribe("E_FORK", udp_sink.address)
        bus.subscribe("E_FORK", unix_sink.address)
        report_r, report_w = os.pipe()
        release_r, release_w = os.pipe()
        try:
            children = [
                kids.fork(_fork_tree, bus, k, report_w, release_r, release_w) for k in range(3)
            ]
        finally:
            os.close(report_w)
            os.close(release_r)
        try:
            reports = read_lines(report_r, 6, timeout=60)
        finally:
            os.close(release_w)
            os.close(report_r)
        codes = [kids.wait(pid, 60) for pid in children]
        assert codes == [0, 0, 0]

        # Six processes, six lanes: every forked child claimed its own.
        assert sorted(int(r[0]) for r in reports) == list(range(6)), reports
        assert len({int(r[1]) for r in reports}) == 6, reports
        lanes = [int(r[2]) for r in reports]
        assert len(set(lanes)) == 6 and min(lanes) >= 0, reports

        for collector, sink in zip(collectors, (udp_sink, unix_sink), strict=True):
            got = collector.collected()
            check_stream(got, expected, sink.address, sink)

        assert wait_for(lambda: drained(bus) and backlogs_empty(bus)), bus.stats()
        stats = bus.stats()
        check_accounting(stats)
        e = stats["events"]["E_FORK"]
        assert e["enqueued"] == total and e["dispatched"] == total, e
        assert e["rejected"] == 0 and e["unrouted"] == 0, e
        size = sum(len(d) for stream in expected.values() for d in stream)
        for sink in (udp_sink, unix_sink):
            row = destination_stats(bus, "E_FORK", sink.address)
            assert row["routed"] == row["sent"] == total, row
            assert row["failed"] == row["dropped"] == row["pending"] == 0, row
            assert row["bytes"] == size, row


# --- threads, and a fork from a thread while others raise -------------------

THREADS = 8
THREAD_N = 3000
FORKS = 5
FORK_CHILD_N = 100
NOSUB_N = 20_000


def _child_of_thread(bus: EventBus, k: int) -> int:
    for seq in range(FORK_CHILD_N):
        raise_retrying(bus.raise_event, "E_CHILD", {"fork": k, "seq": seq}, timeout=10)
    return 0


@pytest.mark.timeout(90)
def test_threads_raise_at_once_and_fork_from_a_thread(kids: Kids, tmp_path: Path, udp_sink) -> None:
    expected = {
        t: [encode_notification("E_THREAD", {"t": t, "seq": i}) for i in range(THREAD_N)]
        for t in range(THREADS)
    }
    collector = Collector(kids, udp_sink, tmp_path / "threads.bin", expect=THREADS * THREAD_N)
    child_sink = UdpSink()
    loop_sink = UdpSink()  # never read: the loopers only need someone subscribed
    try:
        with EventBus() as bus:
            for name in ("E_THREAD", "E_LOOP", "E_CHILD", "E_NOSUB"):
                bus.publish_event(name)
            bus.subscribe("E_THREAD", udp_sink.address)
            bus.subscribe("E_LOOP", loop_sink.address)
            bus.subscribe("E_CHILD", child_sink.address)

            errors: list[BaseException] = []

            # The no-subscriber probe counts without the lock (relying on the
            # GIL): threads racing on it must not lose increments.
            def probe() -> None:
                try:
                    for _ in range(NOSUB_N):
                        assert bus.raise_event("E_NOSUB", {"x": 1}) is False
                except BaseException as exc:
                    errors.append(exc)

            probers = [threading.Thread(target=probe) for _ in range(THREADS)]
            for th in probers:
                th.start()
            for th in probers:
                th.join(60)
            assert not errors, errors
            assert event_stats(bus, "E_NOSUB")["no_subscriber"] == THREADS * NOSUB_N

            barrier = threading.Barrier(THREADS)
            refused = [0] * THREADS

            def worker(t: int) -> None:
                try:
                    barrier.wait(timeout=30)
                    for i in range(THREAD_N):
                        refused[t] += raise_retrying(
                            bus.raise_event, "E_THREAD", {"t": t, "seq": i}
                        )
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
            assert not any(th.is_alive() for th in threads), "raising threads hung"
            assert not errors, errors
            check_stream(collector.collected(), expected, "E_THREAD", udp_sink)
            assert wait_for(lambda: drained(bus)), bus.stats()
            e = event_stats(bus, "E_THREAD")
            assert e["enqueued"] == THREADS * THREAD_N, e
            assert e["dropped"] == sum(refused), (e, refused)
            assert e["raised"] == THREADS * THREAD_N + sum(refused), e  # every call counted

            # Seven threads raise in a loop while the eighth forks: the child
            # must never inherit a lock held by a thread that does not exist
            # in it. Each child raises its own events and exits 0.
            stop = threading.Event()

            def looper() -> None:
                try:
                    while not stop.is_set():
                        bus.raise_event("E_LOOP", {"x": "loop"})
                except BaseException as exc:
                    errors.append(exc)

            codes: list[int] = []

            def forker() -> None:
                try:
                    for k in range(FORKS):
                        time.sleep(random.uniform(0.001, 0.02))
                        pid = kids.fork(_child_of_thread, bus, k)
                        codes.append(kids.wait(pid, 20))  # watchdog: kills a deadlocked child
                except BaseException as exc:
                    errors.append(exc)

            loopers = [threading.Thread(target=looper) for _ in range(THREADS - 1)]
            for th in loopers:
                th.start()
            try:
                time.sleep(0.05)  # let the loopers get going
                fork_thread = threading.Thread(target=forker)
                fork_thread.start()
                fork_thread.join(FORKS * 25)
            finally:
                stop.set()
                for th in loopers:
                    th.join(30)
            assert not fork_thread.is_alive(), "forking thread hung"
            assert not errors, errors
            assert codes == [0] * FORKS, codes
            assert event_stats(bus, "E_LOOP")["raised"] > 0  # they were raising meanwhile

            child_expected = {
                k: [
                    encode_notification("E_CHILD", {"fork": k, "seq": i})
                    for i in range(FORK_CHILD_N)
                ]
                for k in range(FORKS)
            }
            got = child_sink.receive(FORKS * FORK_CHILD_N, timeout=15)
            got += child_sink.quiet(0.3)
            check_stream(got, child_expected, "E_CHILD", child_sink)
    finally:
        child_sink.close()
        loop_sink.close()


def test_threads_learning_new_events_at_once_raise_the_right_event(udp_sink) -> None:
    """The first raise of an event looks it up in the segment; eight threads
    doing that at once must not give any event another's id."""
    names = [f"E_NEW{i}" for i in range(40)]
    with EventBus() as bus:
        for name in names:
            bus.publish_event(name)
            bus.subscribe(name, udp_sink.address)
        barrier = threading.Barrier(8)

        def worker(k: int) -> None:
            barrier.wait()
            for name in names:
                assert bus.raise_event(name, {"k": k, "name": name})

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as CPython can
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(interval)
        got = [orjson.loads(d) for d in udp_sink.receive(8 * len(names))]
    assert len(got) == 8 * len(names)
    assert all(note["method"] == note["params"]["name"] for note in got)
