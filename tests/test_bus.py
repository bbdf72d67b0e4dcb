"""End-to-end tests of EventBus: real processes, real shared memory, real sockets.

Every subscriber here is read by a *collector*: a forked process that reads
its socket as fast as it can (or in bursts) and hands what it got back in a
file, so the test process's own threads (and its GIL) never slow the reader
down. Forked children always end in ``os._exit`` inside ``try``/``finally``,
so no pytest machinery ever runs in them; the ``kids`` fixture kills and
reaps whatever a failing test left behind.

Timing: nothing here asserts a duration beyond "it finished within a generous
bound". Counters are checked once the bus is quiescent (``wait_for``), since
producers and senders update them without a common snapshot.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from conftest import UdpSink, UnixSink, wait_for

from mpevent import (
    MAX_DATAGRAM,
    DatagramTooLarge,
    EventBus,
    PayloadError,
    UnknownEvent,
    encode_notification,
)
from mpevent.processes.sender import mmsg
from mpevent.shm.layout import L_HEAD, L_TAIL, S_LOOPS

_QLEN_PATH = Path("/proc/sys/net/unix/max_dgram_qlen")
UNIX_QLEN = int(_QLEN_PATH.read_text()) if _QLEN_PATH.exists() else 10
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

# --- processes -----------------------------------------------------------------


def fork_call(fn: Callable[..., int | None], *args: Any) -> int:
    """Run ``fn(*args)`` in a forked child whose exit code is its return value.

    The child ends with ``os._exit`` whatever happens (71: it raised), so no
    pytest code (fixtures, finalizers, atexit) ever runs in it.
    """
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            result = fn(*args)
            code = 0 if result is None else int(result)
        except BaseException:
            traceback.print_exc()
            code = 71
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    return pid


def reap(pid: int, timeout: float) -> int:
    """The exit code of child ``pid`` (-N: killed by signal N).

    A child still running after ``timeout`` seconds is deadlocked as far as
    we are concerned: it is killed and the test fails.
    """
    deadline = time.monotonic() + timeout
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} still running after {timeout} s (deadlock?); killed")
        time.sleep(0.002)


class Kids:
    """The test's forked children; whatever is left at teardown is killed."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self._lock = threading.Lock()

    def fork(self, fn: Callable[..., int | None], *args: Any) -> int:
        pid = fork_call(fn, *args)
        with self._lock:
            self.pids.add(pid)
        return pid

    def wait(self, pid: int, timeout: float = 30.0) -> int:
        try:
            return reap(pid, timeout)
        finally:
            with self._lock:
                self.pids.discard(pid)

    def kill_all(self) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()


@pytest.fixture
def kids() -> Iterator[Kids]:
    k = Kids()
    yield k
    k.kill_all()


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def sender_processes(bus: EventBus, count: int) -> list[psutil.Process]:
    hub = psutil.Process(bus.hub_pid)
    found = wait_for(lambda: len(hub.children()) == count and hub.children())
    assert found, f"the hub did not start {count} sender(s): {hub.children()}"
    return found


# --- sinks and collectors ------------------------------------------------------


class BigUdpSink(UdpSink):
    """A UDP sink whose kernel buffer holds tens of thousands of datagrams."""

    def __init__(self) -> None:
        super().__init__()
        with contextlib.suppress(OSError):  # needs CAP_NET_ADMIN; 8 MiB otherwise
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)


@pytest.fixture
def udp_sink() -> Iterator[UdpSink]:  # overrides conftest's: a bigger buffer
    sink = BigUdpSink()
    yield sink
    sink.close()


def udp_kernel_drops(sink: UdpSink) -> int:
    """Datagrams the kernel dropped at ``sink`` (receive buffer full): not mpevent's loss."""
    if sink.sock.family != socket.AF_INET:
        return 0
    port = sink.sock.getsockname()[1]
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            return int(fields[-1])
    return -1


def _collect(
    sock: socket.socket,
    out: Path,
    expect: int | None,
    until: bytes | None,
    linger: float,
    idle: float,
    burst_pause: float | None,
) -> int:
    sock.setblocking(False)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    got: list[bytes] = []
    stop_at = None
    last = time.monotonic()
    while True:
        before = len(got)
        try:
            while True:  # a burst: everything the socket holds
                data = sock.recv(1 << 17)
                got.append(data)
                if stop_at is None and (
                    (expect is not None and len(got) >= expect) or data == until
                ):
                    stop_at = time.monotonic() + linger  # then watch for extras
        except BlockingIOError:
            pass
        now = time.monotonic()
        if len(got) != before:
            last = now
        if (stop_at is not None and now >= stop_at) or now - last > idle:
            break
        if burst_pause:
            time.sleep(burst_pause)
        else:
            poller.poll(50)
    with open(out, "wb") as f:
        f.write(b"".join(struct.pack("<I", len(d)) + d for d in got))
    return 0


class Collector:
    """Reads ``sink`` in a forked process until it has ``expect`` datagrams
    (or has seen the datagram ``until``), then ``linger`` seconds more to
    catch duplicates; gives up after ``idle`` seconds without a datagram.
    ``burst_pause``: read until EAGAIN, then sleep that long (a slow reader).
    """

    def __init__(
        self,
        kids: Kids,
        sink: UdpSink,
        out: Path,
        *,
        expect: int | None = None,
        until: bytes | None = None,
        linger: float = 0.3,
        idle: float = 15.0,
        burst_pause: float | None = None,
    ) -> None:
        self.kids = kids
        self.sink = sink
        self.out = out
        self.pid = kids.fork(_collect, sink.sock, out, expect, until, linger, idle, burst_pause)

    def collected(self, timeout: float = 60.0) -> list[bytes]:
        code = self.kids.wait(self.pid, timeout)
        assert code == 0, f"collector exited with {code}"
        raw = self.out.read_bytes()
        got, at = [], 0
        while at < len(raw):
            (n,) = struct.unpack_from("<I", raw, at)
            got.append(raw[at + 4 : at + 4 + n])
            at += 4 + n
        return got


# --- raising and checking ------------------------------------------------------


def raise_retrying(
    raise_event: Callable[[str, Any], bool], event: str, params: Any, timeout: float = 30.0
) -> int:
    """Raise until accepted (False: ring full); returns how often it was refused."""
    refused = 0
    deadline = 0.0
    while not raise_event(event, params):
        if not refused:
            deadline = time.monotonic() + timeout
        elif time.monotonic() > deadline:
            raise AssertionError(f"{event}: raise_event refused for {timeout} s")
        refused += 1
        time.sleep(0.0002)
    return refused


def check_stream(
    got: list[bytes], expected: dict[Hashable, list[bytes]], what: str, sink: UdpSink | None = None
) -> None:
    """``got`` holds every expected datagram exactly once, each stream in order,
    and nothing else (a corrupt datagram is "something else")."""
    index: dict[bytes, tuple[Hashable, int]] = {}
    for key, stream in expected.items():
        for i, datagram in enumerate(stream):
            index[datagram] = (key, i)
    drops = f" (kernel receive drops: {udp_kernel_drops(sink)})" if sink else ""
    unknown = [d for d in got if d not in index]
    assert not unknown, f"{what}: {len(unknown)} datagrams never raised, e.g. {unknown[:3]}"
    dupes = {d: n for d, n in Counter(got).items() if n > 1}
    assert not dupes, f"{what}: {len(dupes)} datagrams delivered more than once, e.g. {dupes}"
    seqs: dict[Hashable, list[int]] = defaultdict(list)
    for d in got:
        key, i = index[d]
        seqs[key].append(i)
    for key, stream in expected.items():
        mine = seqs[key]
        if mine == list(range(len(stream))):
            continue
        missing = sorted(set(range(len(stream))) - set(mine))
        disorder = next((j for j in range(1, len(mine)) if mine[j] < mine[j - 1]), None)
        raise AssertionError(
            f"{what}, stream {key!r}: got {len(mine)} of {len(stream)}; "
            f"{len(missing)} missing (first {missing[:5]}); "
            f"first out of order at position {disorder}{drops}"
        )


def events_of(bus: EventBus, name: str) -> dict[str, int]:
    return bus.stats()["events"][name]


def destination(bus: EventBus, event: str, sock: str) -> dict[str, Any]:
    rows = [r for r in bus.stats()["destinations"] if r["event"] == event and r["socket"] == sock]
    assert len(rows) == 1, f"no single stats row for {event} -> {sock}: {bus.stats()}"
    return rows[0]


def drained(bus: EventBus) -> bool:
    """Every enqueued event has been taken from the ring and accounted for."""
    return all(
        e["enqueued"] == e["dispatched"] + e["unrouted"] + e["send_oversize"]
        for e in bus.stats()["events"].values()
    )


def ring_empty(bus: EventBus) -> bool:
    """Every lane's records have been taken and committed by a sender.

    Read from the lane control words because after a producer was killed
    with SIGKILL the event counters cannot tell (see test 7).
    """
    seg = bus.segment
    words, layout = seg.words, seg.layout
    return all(
        words[layout.lane_word(lane) + L_TAIL] == words[layout.lane_word(lane) + L_HEAD]
        for lane in range(layout.geometry.lanes)
    )


def check_accounting(stats: dict[str, Any]) -> None:
    """Guarantee 4 on a quiescent bus."""
    for name, e in stats["events"].items():
        # (raised is enqueued + dropped + rejected by definition; tests that
        # count their own calls check it against those.)
        assert e["enqueued"] == e["dispatched"] + e["unrouted"] + e["send_oversize"], (name, e)
        assert e["oversize"] <= e["rejected"], (name, e)
    for row in stats["destinations"]:
        assert row["pending"] >= 0, row
        assert row["routed"] == row["sent"] + row["failed"] + row["dropped"] + row["pending"], row
    assert stats["lost_in_flight"] == 0, stats


# --- 1. forked producers, depth 2 ------------------------------------------------

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

        assert wait_for(lambda: drained(bus)), bus.stats()
        stats = bus.stats()
        check_accounting(stats)
        e = stats["events"]["E_FORK"]
        assert e["enqueued"] == total and e["dispatched"] == total, e
        assert e["rejected"] == 0 and e["unrouted"] == 0, e
        size = sum(len(d) for stream in expected.values() for d in stream)
        for sink in (udp_sink, unix_sink):
            row = destination(bus, "E_FORK", sink.address)
            assert row["routed"] == row["sent"] == total, row
            assert row["failed"] == row["dropped"] == row["pending"] == 0, row
            assert row["bytes"] == size, row


# --- 2. threads, and a fork from a thread while others raise -------------------

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
    child_sink = BigUdpSink()
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
            assert events_of(bus, "E_NOSUB")["no_subscriber"] == THREADS * NOSUB_N

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
            e = events_of(bus, "E_THREAD")
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
            assert events_of(bus, "E_LOOP")["raised"] > 0  # they were raising meanwhile

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


# --- 3. dead, missing and stuck destinations -----------------------------------

DEAD_N = 5000
SMALL_BACKLOG = 100


@pytest.mark.timeout(90)
def test_dead_missing_and_stuck_destinations_cost_the_others_nothing(
    kids: Kids, tmp_path: Path, udp_sink, unix_sink
) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    dead_udp = f"udp:127.0.0.1:{probe.getsockname()[1]}"
    probe.close()  # nobody listens there now
    missing = f"unix:{tmp_path / 'missing.sock'}"
    stuck = UnixSink(tmp_path / "stuck.sock")  # bound, never read
    expected = {"E_DEAD": [encode_notification("E_DEAD", {"seq": i}) for i in range(DEAD_N)]}
    collectors = [
        Collector(kids, udp_sink, tmp_path / "udp.bin", expect=DEAD_N),
        Collector(kids, unix_sink, tmp_path / "unix.bin", expect=DEAD_N),
    ]
    try:
        with EventBus(backlog=SMALL_BACKLOG) as bus:
            bus.publish_event("E_DEAD")
            for address in (dead_udp, missing, stuck.address, udp_sink.address, unix_sink.address):
                bus.subscribe("E_DEAD", address)
            healthy_unix = unix_sink.address
            # The backlog is per destination and bus-wide: with 100 slots, even
            # a healthy UNIX reader (queue of 10) drops when 5000 events come
            # in one burst. A subscriber that "keeps up on average" sees
            # bursts smaller than its backlog: raise in chunks of 50 and let
            # the healthy UNIX reader catch up in between.
            for start in range(0, DEAD_N, 50):
                for seq in range(start, start + 50):
                    raise_retrying(bus.raise_event, "E_DEAD", {"seq": seq})
                wait_for(
                    lambda: (
                        drained(bus) and destination(bus, "E_DEAD", healthy_unix)["pending"] == 0
                    ),
                    timeout=5,
                    interval=0.001,
                )
            for collector, sink in zip(collectors, (udp_sink, unix_sink), strict=True):
                check_stream(collector.collected(), expected, sink.address, sink)

            def settled() -> bool:
                rows = bus.stats()["destinations"]
                return drained(bus) and all(r["routed"] == DEAD_N for r in rows)

            assert wait_for(settled), bus.stats()
            stats = bus.stats()
            check_accounting(stats)
            e = stats["events"]["E_DEAD"]
            assert e["enqueued"] == e["dispatched"] == DEAD_N, e
            rows = {r["socket"]: r for r in stats["destinations"]}
            assert set(rows) == {
                dead_udp,
                missing,
                stuck.address,
                *(s.address for s in (udp_sink, unix_sink)),
            }

            row = rows[dead_udp]  # ICMP port unreachable comes back as ECONNREFUSED
            assert row["failed"] > 0 and row["econnrefused"] > 0, row
            assert row["dropped"] == 0 and row["pending"] == 0, row

            row = rows[missing]  # nothing to connect to: every send fails
            assert row["failed"] == row["routed"] == DEAD_N, row
            assert row["enoent"] + row["econnrefused"] == row["failed"], row
            assert row["enoent"] > 0, row
            assert row["sent"] == row["dropped"] == row["pending"] == 0, row

            row = rows[stuck.address]  # queue full, backlog full, then drops
            assert row["failed"] == 0, row
            assert row["sent"] <= UNIX_QLEN + 2, row
            assert row["pending"] <= SMALL_BACKLOG, row
            assert row["dropped"] >= DEAD_N - (UNIX_QLEN + 2) - SMALL_BACKLOG, row

            size = sum(len(d) for d in expected["E_DEAD"])
            for sink in (udp_sink, unix_sink):
                row = rows[sink.address]
                assert row["sent"] == DEAD_N and row["bytes"] == size, row
                assert row["failed"] == row["dropped"] == row["pending"] == 0, row
    finally:
        stuck.close()


@pytest.mark.timeout(60)
def test_stuck_subscriber_does_not_keep_the_sender_busy(tmp_path: Path) -> None:
    """A receiver that never reads must be waited for with poll(POLLOUT),
    not by spinning: on a 2-core box a busy sender takes a core from the
    producers and the other subscribers (guarantee 5)."""
    stuck = UnixSink(tmp_path / "stuck.sock")
    try:
        with EventBus(backlog=SMALL_BACKLOG) as bus:
            bus.publish_event("E_STUCK")
            bus.subscribe("E_STUCK", stuck.address)
            for seq in range(2 * SMALL_BACKLOG):
                bus.raise_event("E_STUCK", {"seq": seq})

            def settled() -> bool:
                row = destination(bus, "E_STUCK", stuck.address)
                return ring_empty(bus) and row["routed"] == 2 * SMALL_BACKLOG

            assert wait_for(settled), bus.stats()
            assert destination(bus, "E_STUCK", stuck.address)["pending"] > 0
            (sender,) = sender_processes(bus, 1)
            # Two measures: CPU time (what it costs the box), and the sender's
            # loop counter, which a spinning sender drives up even when other
            # processes leave it little CPU (an idle sender loops ~50 times a
            # second: it wakes at least every MAX_SLEEP).
            loops_at = bus.segment.layout.sender_word(0) + S_LOOPS
            loops = bus.segment.words[loops_at]
            before, start = sender.cpu_times(), time.monotonic()
            time.sleep(1.5)
            loops = bus.segment.words[loops_at] - loops
            after, elapsed = sender.cpu_times(), time.monotonic() - start
            busy = (after.user + after.system - before.user - before.system) / elapsed
            assert busy < 0.5 and loops / elapsed < 2000, (
                f"the sender used {busy:.0%} of a CPU and ran {loops / elapsed:.0f} loops/s "
                f"for {elapsed:.1f} s with nothing to do but wait for a stuck receiver: "
                "it spins instead of sleeping in poll()"
            )
    finally:
        stuck.close()


# --- 4. a bursty UNIX reader and a 100 000-event burst ---------------------------

BURST_N = 100_000


@pytest.mark.timeout(120)
def test_bursty_unix_reader_gets_every_event_of_a_big_burst(
    kids: Kids, tmp_path: Path, unix_sink
) -> None:
    assert UNIX_QLEN <= 64  # the point: the receiver's queue is tiny
    expected = {"E_BURST": [encode_notification("E_BURST", {"seq": i}) for i in range(BURST_N)]}
    collector = Collector(
        kids, unix_sink, tmp_path / "burst.bin", expect=BURST_N, burst_pause=0.001, idle=20
    )
    with EventBus(lanes=4, lane_size=8 << 20, backlog=200_000) as bus:
        bus.publish_event("E_BURST")
        bus.subscribe("E_BURST", unix_sink.address)
        refused = 0
        most_pending = 0
        for seq in range(BURST_N):
            refused += raise_retrying(bus.raise_event, "E_BURST", {"seq": seq})
            if seq % 10_000 == 9_999:
                row = destination(bus, "E_BURST", unix_sink.address)
                most_pending = max(most_pending, row["pending"])
        check_stream(collector.collected(timeout=100), expected, "E_BURST")

        def delivered() -> bool:
            row = destination(bus, "E_BURST", unix_sink.address)
            return drained(bus) and row["sent"] == BURST_N

        wait_for(delivered, timeout=10)
        stats = bus.stats()
        check_accounting(stats)
        e = stats["events"]["E_BURST"]
        assert e["enqueued"] == e["dispatched"] == BURST_N, e
        assert e["dropped"] == refused == 0, (e, refused)  # 8 MiB lane: never full
        row = destination(bus, "E_BURST", unix_sink.address)
        assert row["dropped"] == 0 and row["failed"] == 0, row
        assert row["routed"] == BURST_N, row
        # The reader was slower than the burst: the backlog did the work.
        assert most_pending > UNIX_QLEN, most_pending
        # Every datagram has reached the reader (checked above), so the
        # counters must say so too once the bus is quiet.
        assert row["sent"] == BURST_N and row["pending"] == 0, row


@pytest.mark.timeout(90)
@pytest.mark.parametrize("batched", [True, False], ids=["sendmmsg", "one-send-per-datagram"])
def test_mixed_events_to_mixed_destinations_arrive_in_order(
    batched: bool, monkeypatch, udp_sink, unix_sink
) -> None:
    """Batches whose messages go to different destinations (one packing per
    destination), events without params, a UNIX receiver whose tiny queue
    sends part of each batch through the backlog; with sendmmsg and with the
    one-by-one fallback of C libraries without it (the hub forks from here,
    so its senders inherit the switch)."""
    monkeypatch.setattr(mmsg, "AVAILABLE", batched and mmsg.AVAILABLE)
    n = 3000
    unix_got: list[bytes] = []
    done = threading.Event()

    def read_unix() -> None:
        unix_sink.sock.settimeout(0.2)
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                unix_got.append(unix_sink.sock.recv(70000))

    reader = threading.Thread(target=read_unix)
    reader.start()
    try:
        with EventBus(lanes=2, backlog=100_000) as bus:
            for name in ("E_A", "E_B", "E_C"):
                bus.publish_event(name)
            bus.subscribe("E_A", udp_sink.address)
            bus.subscribe("E_A", unix_sink.address)
            bus.subscribe("E_B", udp_sink.address)
            bus.subscribe("E_C", unix_sink.address)
            bus.subscribe("E_C", udp_sink.address)
            expected: dict[str, list[bytes]] = {"E_A": [], "E_B": []}
            for i in range(n):
                name = ("E_A", "E_B", "E_C")[i % 3]
                params = None if name == "E_C" else {"seq": i}
                raise_retrying(bus.raise_event, name, params)
                if params:
                    expected[name].append(encode_notification(name, params))
            # E_C's datagrams are all alike (no params): count them.
            bare = encode_notification("E_C")
            udp_got = udp_sink.receive(n, timeout=20) + udp_sink.quiet(0.3)
            assert udp_got.count(bare) == n // 3
            check_stream([d for d in udp_got if d != bare], expected, "UDP", udp_sink)
            wait_for(lambda: len(unix_got) >= 2 * n // 3, timeout=30)
            time.sleep(0.3)
            assert unix_got.count(bare) == n // 3
            unix_rest = [d for d in unix_got if d != bare]
            check_stream(unix_rest, {"E_A": expected["E_A"]}, "UNIX")
            assert wait_for(lambda: drained(bus))
            stats = bus.stats()
            check_accounting(stats)
            unix_row = destination(bus, "E_A", unix_sink.address)
            assert unix_row["sent"] == n // 3 and unix_row["dropped"] == 0, unix_row
    finally:
        done.set()
        reader.join()


# --- 5. ring full --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_full_lane_refuses_counts_and_recovers(udp_sink) -> None:
    with EventBus(lanes=2, lane_size=4096) as bus:
        bus.publish_event("E_FULL")
        bus.subscribe("E_FULL", udp_sink.address)
        warm = encode_notification("E_FULL", {"seq": -1})
        assert bus.raise_event("E_FULL", {"seq": -1})  # the sender is alive and idle
        assert udp_sink.receive(1) == [warm]
        assert wait_for(lambda: drained(bus))
        (sender,) = sender_processes(bus, 1)

        os.kill(sender.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            assert wait_for(lambda: sender.status() == psutil.STATUS_STOPPED), sender.status()
            accepted = refused = 0
            slowest = 0.0
            while accepted < 10_000:
                t0 = time.perf_counter()
                ok = bus.raise_event("E_FULL", {"seq": accepted})
                slowest = max(slowest, time.perf_counter() - t0)
                if not ok:
                    refused += 1
                    break
                accepted += 1
            assert refused == 1, f"a 4 KiB lane took {accepted} events without filling up"
            for _ in range(99):  # still full: every further call is refused at once
                t0 = time.perf_counter()
                assert bus.raise_event("E_FULL", {"seq": "no"}) is False
                slowest = max(slowest, time.perf_counter() - t0)
                refused += 1
            assert slowest < 1.0, f"raise_event blocked for {slowest:.3f} s on a full lane"
            e = events_of(bus, "E_FULL")
            assert e["dropped"] == refused == 100, e
            assert e["enqueued"] == accepted + 1, e
            assert e["raised"] == accepted + 1 + refused, e  # every call counted
            assert e["dispatched"] == 1, e  # nothing moved while the sender was stopped
            time.sleep(0.3)  # the records wait at least this long
        finally:
            os.kill(sender.pid, signal.SIGCONT)
            stopped_for = time.monotonic() - stopped_at

        expected = {"E_FULL": [encode_notification("E_FULL", {"seq": i}) for i in range(accepted)]}
        got = udp_sink.receive(accepted, timeout=15) + udp_sink.quiet(0.3)
        check_stream(got, expected, "E_FULL after SIGCONT", udp_sink)
        assert wait_for(lambda: drained(bus)), bus.stats()
        stats = bus.stats()
        check_accounting(stats)
        assert stats["events"]["E_FULL"]["dispatched"] == accepted + 1
        row = destination(bus, "E_FULL", udp_sink.address)
        assert row["sent"] == accepted + 1 and row["pending"] == 0, row
        # The sender saw how long they waited: every dispatched event is in
        # the age histogram, the ones held up by SIGSTOP among the oldest.
        (ages,) = stats["senders"]
        assert sum(ages["age_hist"]) == accepted + 1, ages
        assert 0.3e6 <= ages["age_max_us"] <= (stopped_for + 5) * 1e6, (ages, stopped_for)
        assert sum(ages["age_hist"][-1:]) >= accepted - 1, ages  # all older than 16 ms
        # The lane has room again.
        assert bus.raise_event("E_FULL", {"seq": "after"})
        assert udp_sink.receive(1) == [encode_notification("E_FULL", {"seq": "after"})]


@pytest.mark.timeout(60)
def test_every_lane_owned_refuses_and_counts_until_a_lane_is_free(kids: Kids, udp_sink) -> None:
    """The degraded mode: a process that finds every lane owned counts its
    calls in the spare block (dropped, no_subscriber) and gets a lane once
    one is freed (its owner died; it looks again at most every second)."""
    with EventBus(lanes=1) as bus:
        bus.publish_event("E_OWNED")
        bus.publish_event("E_NOBODY")
        bus.subscribe("E_OWNED", udp_sink.address)
        hold_r, hold_w = os.pipe()
        ready_r, ready_w = os.pipe()

        def holder() -> int:
            os.close(hold_w)
            os.close(ready_r)
            assert bus.raise_event("E_OWNED", {"from": "holder"})  # claims the only lane
            os.write(ready_w, b"x")
            os.read(hold_r, 1)  # until the test closes its end
            return 0

        pid = kids.fork(holder)
        os.close(hold_r)
        os.close(ready_w)
        try:
            assert os.read(ready_r, 1) == b"x"
            for i in range(5):
                assert bus.raise_event("E_OWNED", {"seq": i}) is False
                assert bus.raise_event("E_NOBODY", {"seq": i}) is False
            assert bus.producer.lane == -1
            owned = events_of(bus, "E_OWNED")
            assert owned["enqueued"] == 1 and owned["dropped"] == 5, owned
            assert events_of(bus, "E_NOBODY")["no_subscriber"] == 5
        finally:
            os.close(ready_r)
            os.close(hold_w)  # the holder exits; the hub frees its lane
        assert kids.wait(pid) == 0
        assert wait_for(lambda: bus.raise_event("E_OWNED", {"seq": "after"}), timeout=15)
        assert bus.producer.lane == 0
        got = udp_sink.receive(2)
        assert sorted(got) == sorted(
            [
                encode_notification("E_OWNED", {"from": "holder"}),
                encode_notification("E_OWNED", {"seq": "after"}),
            ]
        )
        assert wait_for(lambda: drained(bus))
        stats = bus.stats()
        check_accounting(stats)
        assert stats["events"]["E_OWNED"]["enqueued"] == 2


@pytest.mark.timeout(60)
def test_events_whose_subscribers_left_before_sending_count_as_unrouted(udp_sink) -> None:
    """Taken from the lane after their only subscription ended: counted as
    unrouted, never sent; the other event of the same batches still goes."""
    with EventBus(lanes=2) as bus:
        bus.publish_event("E_LEFT")
        bus.publish_event("E_STAYS")
        bus.subscribe("E_LEFT", udp_sink.address)
        bus.subscribe("E_STAYS", udp_sink.address)
        assert bus.raise_event("E_STAYS", {"seq": -1})
        assert udp_sink.receive(1) == [encode_notification("E_STAYS", {"seq": -1})]
        assert wait_for(lambda: drained(bus))
        (sender,) = sender_processes(bus, 1)
        os.kill(sender.pid, signal.SIGSTOP)
        try:
            assert wait_for(lambda: sender.status() == psutil.STATUS_STOPPED), sender.status()
            for i in range(10):
                assert bus.raise_event("E_LEFT", {"seq": i})
                assert bus.raise_event("E_STAYS", {"seq": i})
            bus.subscribe("E_LEFT", udp_sink.address, expire=0)  # unsubscribe
        finally:
            os.kill(sender.pid, signal.SIGCONT)
        got = udp_sink.receive(10) + udp_sink.quiet(0.3)
        assert got == [encode_notification("E_STAYS", {"seq": i}) for i in range(10)]
        assert wait_for(lambda: drained(bus))
        stats = bus.stats()
        check_accounting(stats)
        left = stats["events"]["E_LEFT"]
        assert left["enqueued"] == left["unrouted"] == 10 and left["dispatched"] == 0, left
        assert stats["events"]["E_STAYS"]["dispatched"] == 11


# --- 6. no subscriber, bad input -------------------------------------------------


@pytest.mark.timeout(60)
def test_no_subscriber_and_bad_input(udp_sink) -> None:
    with EventBus() as bus:
        bus.publish_event("E_NOBODY")
        bus.publish_event("E_BAD")
        for _ in range(3):
            assert bus.raise_event("E_NOBODY", {"a": 1}) is False
        with pytest.raises(UnknownEvent):
            bus.raise_event("E_NEVER_PUBLISHED", {"a": 1})
        assert issubclass(UnknownEvent, ValueError)

        bus.subscribe("E_BAD", udp_sink.address)
        for bad in (42, "a string", {"x": object()}, {1: "non-str key"}):
            with pytest.raises(TypeError):
                bus.raise_event("E_BAD", bad)
        with pytest.raises(PayloadError):  # JSON has no NaN
            bus.raise_event("E_BAD", {"x": float("nan")})
        with pytest.raises(DatagramTooLarge) as info:
            bus.raise_event("E_BAD", {"x": "y" * 70_000})
        assert isinstance(info.value, ValueError)

        # Exactly at the limit goes out whole; one byte more is refused.
        room = MAX_DATAGRAM - len(encode_notification("E_BAD", {"x": ""}))
        fits = {"x": "y" * room}
        assert len(encode_notification("E_BAD", fits)) == MAX_DATAGRAM
        assert bus.raise_event("E_BAD", fits)
        with pytest.raises(DatagramTooLarge):
            bus.raise_event("E_BAD", {"x": "y" * (room + 1)})
        assert bus.raise_event("E_BAD", {"ok": 1})  # a fence: everything before it was sent

        got = udp_sink.receive(2) + udp_sink.quiet()
        assert got == [encode_notification("E_BAD", fits), encode_notification("E_BAD", {"ok": 1})]
        assert wait_for(lambda: drained(bus)), bus.stats()
        stats = bus.stats()
        check_accounting(stats)
        nobody = stats["events"]["E_NOBODY"]
        assert nobody["no_subscriber"] == 3, nobody
        assert nobody["raised"] == nobody["enqueued"] == nobody["dispatched"] == 0, nobody
        bad = stats["events"]["E_BAD"]
        assert bad["rejected"] == 7 and bad["oversize"] == 2, bad
        assert bad["enqueued"] == bad["dispatched"] == 2, bad
        assert bad["raised"] == 9 and bad["dropped"] == 0, bad
        assert bad["send_oversize"] == 0, bad
        row = destination(bus, "E_BAD", udp_sink.address)
        assert row["routed"] == row["sent"] == 2, row
        assert row["bytes"] == sum(len(d) for d in got), row


# --- 7. producers killed with SIGKILL mid-raise --------------------------------

KILL_ROUNDS = 6


def _victim_params(r: int, seq: int) -> dict[str, Any]:
    return {"v": r, "seq": seq, "pad": "x" * (seq % 97)}  # varying sizes: lane wraps


def _survivor_params(seq: int) -> dict[str, Any]:
    return {"seq": seq, "pad": "s" * (seq % 61)}


def _victim(bus: EventBus, r: int, ready_w: int) -> int:
    seq = 0
    while True:  # until SIGKILL
        if bus.raise_event("E_VICTIM", _victim_params(r, seq)):
            if seq == 0:
                os.write(ready_w, b"!")
            seq += 1


def _survivor(bus: EventBus, stop_r: int, result_w: int) -> int:
    seq = 0
    while True:
        raise_retrying(bus.raise_event, "E_SURVIVOR", _survivor_params(seq))
        seq += 1
        if seq % 16 == 0:
            if select.select([stop_r], [], [], 0)[0]:
                break
            time.sleep(0.001)  # ~10k/s: the UDP reader must not fall behind
    os.write(result_w, str(seq).encode())
    return 0


@pytest.mark.timeout(90)
def test_producers_killed_mid_raise_corrupt_nothing(kids: Kids, tmp_path: Path, udp_sink) -> None:
    final = encode_notification("E_FINAL", {"final": True})
    collector = Collector(kids, udp_sink, tmp_path / "kill.bin", until=final, linger=0.5, idle=30)
    with EventBus() as bus:
        for name in ("E_VICTIM", "E_SURVIVOR", "E_FINAL"):
            bus.publish_event(name)
            bus.subscribe(name, udp_sink.address)
        senders_before = {p.pid for p in sender_processes(bus, 1)}
        stop_r, stop_w = os.pipe()
        result_r, result_w = os.pipe()
        survivor = kids.fork(_survivor, bus, stop_r, result_w)
        os.close(stop_r)
        os.close(result_w)
        try:
            for r in range(KILL_ROUNDS):
                ready_r, ready_w = os.pipe()
                pid = kids.fork(_victim, bus, r, ready_w)
                os.close(ready_w)
                try:
                    assert select.select([ready_r], [], [], 20)[0], "victim never raised"
                finally:
                    os.close(ready_r)
                time.sleep(random.uniform(0.0, 0.03))
                os.kill(pid, signal.SIGKILL)
                assert kids.wait(pid, 10) == -signal.SIGKILL
        finally:
            os.write(stop_w, b"stop")
            os.close(stop_w)
        assert kids.wait(survivor, 30) == 0
        with os.fdopen(result_r, "rb") as f:
            survivor_n = int(f.read())

        assert wait_for(lambda: ring_empty(bus), timeout=20), repr(bus.stats())
        assert bus.raise_event("E_FINAL", {"final": True})  # the senders keep going
        got = collector.collected(timeout=60)
        assert got and got[-1] == final, "the final event did not arrive (last)"
        assert got.count(final) == 1

        victims: dict[int, list[int]] = defaultdict(list)
        survivor_seqs = []
        for datagram in got[:-1]:
            note = orjson.loads(datagram)  # every datagram is whole, valid JSON ...
            params = note["params"]
            if note["method"] == "E_VICTIM":
                expect = encode_notification("E_VICTIM", _victim_params(params["v"], params["seq"]))
                victims[params["v"]].append(params["seq"])
            else:
                assert note["method"] == "E_SURVIVOR", note
                expect = encode_notification("E_SURVIVOR", _survivor_params(params["seq"]))
                survivor_seqs.append(params["seq"])
            assert datagram == expect  # ... and exactly a notification that was raised
        assert survivor_seqs == list(range(survivor_n)), (
            f"survivor: {len(survivor_seqs)} of {survivor_n}, "
            f"kernel drops {udp_kernel_drops(udp_sink)}"
        )
        # A victim retries a refused event, so what it got out is a prefix of
        # its sequence: no gap, no duplicate, in order.
        for r, seqs in victims.items():
            assert seqs == list(range(len(seqs))), f"victim {r}: {len(seqs)} events, gaps/disorder"

        received = sum(len(s) for s in victims.values())

        def victim_counts_exact() -> bool:
            e = bus.stats()["events"]["E_VICTIM"]
            return e["enqueued"] == e["dispatched"]

        # A kill between publishing a record and counting it leaves the count
        # one short until the hub reclaims the dead producer's lane.
        assert wait_for(victim_counts_exact, timeout=10), bus.stats()
        stats = bus.stats()
        e = stats["events"]["E_VICTIM"]
        assert e["dispatched"] == received, (e, received)
        assert 0 <= stats["repaired"] <= KILL_ROUNDS, stats
        s = stats["events"]["E_SURVIVOR"]
        assert s["enqueued"] == s["dispatched"] == survivor_n, s
        assert stats["lost_in_flight"] == 0, stats
        assert {p.pid for p in sender_processes(bus, 1)} == senders_before


class _DieAfterPush:
    """Stands in for the producer's lane: pushes, then SIGKILLs its own
    process, as if the kill landed right after the record was published."""

    def __init__(self, lane: Any) -> None:
        self.lane = lane

    def push(self, *args: Any) -> bool:
        ok = self.lane.push(*args)
        os.kill(os.getpid(), signal.SIGKILL)
        return ok


def _killed_after_publish(bus: EventBus) -> int:
    producer = bus.producer
    assert bus.raise_event("E_KILL", {"seq": 0})  # claims a lane
    producer._lane = _DieAfterPush(producer._lane)
    bus.raise_event("E_KILL", {"seq": 1})
    return 3  # not reached


@pytest.mark.timeout(60)
def test_producer_killed_right_after_publishing_keeps_accounting_exact(
    kids: Kids, udp_sink
) -> None:
    """Guarantees 3 and 4 together: a producer may die at any instruction,
    including between publishing a record and counting it as enqueued; the
    record is whole, so it is delivered, and the counters must still add up
    after the drain (enqueued = dispatched + unrouted + send_oversize)."""
    with EventBus() as bus:
        bus.publish_event("E_KILL")
        bus.subscribe("E_KILL", udp_sink.address)
        assert hasattr(bus.producer, "_lane"), "test relies on Producer._lane"
        assert kids.wait(kids.fork(_killed_after_publish, bus), 30) == -signal.SIGKILL
        expected = {"E_KILL": [encode_notification("E_KILL", {"seq": i}) for i in range(2)]}
        check_stream(udp_sink.receive(2) + udp_sink.quiet(), expected, "E_KILL", udp_sink)
        assert wait_for(lambda: ring_empty(bus))

        def reconciled() -> bool:
            e = events_of(bus, "E_KILL")
            return e["enqueued"] == e["dispatched"] + e["unrouted"] + e["send_oversize"]

        wait_for(reconciled, timeout=10)  # the hub reclaims the dead producer's lane
        e = events_of(bus, "E_KILL")
        assert bus.stats()["repaired"] == 1, "the hub restored the missing count"
        assert e["dispatched"] == 2, e
        assert e["enqueued"] == e["dispatched"] + e["unrouted"] + e["send_oversize"], (
            f"a producer killed between publishing a record and counting it leaves the "
            f"counters wrong for good: {e}"
        )


# --- 8. expiry -----------------------------------------------------------------


def _subscribers(bus: EventBus, event: str) -> list[dict[str, Any]]:
    return bus.subscribers(event)["Event"]["Subscribers"]


@pytest.mark.timeout(60)
def test_expire_refresh_unsubscribe_and_permanent(udp_sink) -> None:
    def note(n: int) -> bytes:
        return encode_notification("E_EXP", {"n": n})

    with EventBus() as bus:
        bus.publish_event("E_EXP")
        address = udp_sink.address

        # expire=1: delivered now, gone after a second.
        subscribed = time.monotonic()
        bus.subscribe("E_EXP", address, expire=1)
        (sub,) = _subscribers(bus, "E_EXP")
        assert sub["socket"] == address and sub["expire"] == 1, sub
        assert bus.raise_event("E_EXP", {"n": 1})
        assert udp_sink.receive(1) == [note(1)]
        assert wait_for(lambda: not _subscribers(bus, "E_EXP"), timeout=10)
        assert time.monotonic() - subscribed >= 0.9, "expired early"
        time.sleep(max(0.0, subscribed + 1.5 - time.monotonic()))
        assert bus.raise_event("E_EXP", {"n": 2}) is False
        assert udp_sink.quiet() == []

        # Subscribing again refreshes: 1.5 s after the first of two
        # 3-second subscriptions and 2.25 s after the second, the first
        # deadline has passed, the second has not.
        first = time.monotonic()
        bus.subscribe("E_EXP", address, expire=3)
        time.sleep(1.5)
        second = time.monotonic()
        bus.subscribe("E_EXP", address, expire=3)
        (sub,) = _subscribers(bus, "E_EXP")
        assert sub["expire"] == 3 and sub["ttl"] >= 2, sub
        time.sleep(max(0.0, second + 2.25 - time.monotonic()))
        assert time.monotonic() - first > 3.0
        assert bus.raise_event("E_EXP", {"n": 3}), "the refreshed subscription expired early"
        assert udp_sink.receive(1) == [note(3)]
        assert wait_for(lambda: not _subscribers(bus, "E_EXP"), timeout=10)
        assert bus.raise_event("E_EXP", {"n": 4}) is False

        # Permanent, then expire=0 unsubscribes.
        bus.subscribe("E_EXP", address, expire=None)
        (sub,) = _subscribers(bus, "E_EXP")
        assert sub["expire"] == "never" and sub["ttl"] == "never", sub
        everything = bus.subscribers()["Events"]
        assert [e["Subscribers"] for e in everything if e["name"] == "E_EXP"] == [[sub]]
        assert bus.raise_event("E_EXP", {"n": 5})
        assert udp_sink.receive(1) == [note(5)]
        bus.subscribe("E_EXP", address, expire=0)
        assert _subscribers(bus, "E_EXP") == []
        assert bus.raise_event("E_EXP", {"n": 6}) is False
        bus.subscribe("E_EXP", address, expire=None)
        bus.unsubscribe("E_EXP", address)
        assert _subscribers(bus, "E_EXP") == []
        assert bus.raise_event("E_EXP", {"n": 7}) is False
        assert udp_sink.quiet() == []

        assert wait_for(lambda: drained(bus))
        e = events_of(bus, "E_EXP")
        assert e["enqueued"] == e["dispatched"] == 3, e
        assert e["no_subscriber"] == 4, e


# --- 9. close ------------------------------------------------------------------


def _close_in_child(bus: EventBus) -> int:
    bus.close()  # a no-op outside the process that created the bus
    return 0 if bus.raise_event("E_CLOSE", {"from": "child"}) else 3


def _outlive_bus(bus: EventBus, go_r: int) -> int:
    if not select.select([go_r], [], [], 30)[0]:
        return 5
    # The parent closed the bus: raising must neither crash nor hang.
    return 0 if bus.raise_event("E_CLOSE", {"from": "orphan"}) is False else 4


@pytest.mark.timeout(60)
def test_close_stops_hub_and_senders_but_not_for_a_child(kids: Kids, udp_sink) -> None:
    bus = EventBus(senders=2)
    try:
        bus.publish_event("E_CLOSE")
        bus.subscribe("E_CLOSE", udp_sink.address)
        hub = psutil.Process(bus.hub_pid)
        senders = sender_processes(bus, 2)

        # close() in a forked child leaves the bus running for everyone else.
        assert kids.wait(kids.fork(_close_in_child, bus), 30) == 0
        assert not gone(hub) and not any(gone(s) for s in senders)
        assert bus.raise_event("E_CLOSE", {"from": "parent"})
        got = sorted(udp_sink.receive(2) + udp_sink.quiet())
        assert got == sorted(
            encode_notification("E_CLOSE", {"from": who}) for who in ("child", "parent")
        )
        assert bus.subscribers("E_CLOSE")["Event"]["Subscribers"]

        # A child still holding the bus after its creator closed it.
        go_r, go_w = os.pipe()
        orphan = kids.fork(_outlive_bus, bus, go_r)
        os.close(go_r)
        try:
            bus.close()
            assert gone(hub), "hub still running after close()"
            assert wait_for(lambda: all(gone(s) for s in senders)), senders
        finally:
            os.write(go_w, b"go")
            os.close(go_w)
        assert kids.wait(orphan, 30) == 0
        assert udp_sink.quiet() == []
        bus.close()  # idempotent
    finally:
        bus.close()

    # The with-block does the same.
    with EventBus() as bus2:
        hub2 = psutil.Process(bus2.hub_pid)
        senders2 = sender_processes(bus2, 1)
    assert gone(hub2)
    assert wait_for(lambda: all(gone(s) for s in senders2)), senders2


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
