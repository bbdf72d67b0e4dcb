"""More producer processes than lanes lose nothing: the shared (overflow) lanes.

Real forked producers, real shared memory, a real sender and UDP sink:

* three times as many producers as lanes: every event delivered once, in
  per-producer order, the counters exact, and the hub warns once;
* a writer SIGKILLed while it holds a shared lane's lock (stopped there by a
  test hook, between publishing its record and counting it) stalls nobody:
  the others wait only until the kernel drops its lock, its record is
  delivered, and the hub repairs its count;
* a process that had to share moves to a lane that frees up only once the
  sender took what it wrote to the shared lane, and only to a lane of the
  same sender, so nothing is reordered.
"""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from support import (
    Kids,
    UdpSink,
    backlogs_empty,
    check_accounting,
    check_stream,
    drained,
    raise_retrying,
    ring_empty,
    sender_processes,
    wait_for,
)

from mpevent import EventBus, encode_notification
from mpevent.protocol.config import ConfigError, load
from mpevent.shm.layout import L_OWNER_PID, Geometry
from mpevent.shm.segment import Segment

EVENT = "E_CROWD"


def _params(producer: int, seq: int) -> dict[str, Any]:
    return {"p": producer, "seq": seq, "pad": "x" * (seq % 53)}  # varying sizes


def _expected(producer: int, n: int) -> list[bytes]:
    return [encode_notification(EVENT, _params(producer, seq)) for seq in range(n)]


def _read_lines(fd: int, count: int, timeout: float = 30.0) -> list[list[str]]:
    """``count`` reports ("a b c\\n") from a pipe shared by children."""
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0 and select.select([fd], [], [], remaining)[0], buf
        chunk = os.read(fd, 4096)
        assert chunk, f"a child exited before it reported: {buf!r}"
        buf += chunk
    return [line.split() for line in buf.decode().splitlines()]


def _hold_lane(bus: EventBus, ready_w: int, release_r: int) -> int:
    """Own a dedicated lane (the first raise claims it) until released."""
    bus.raise_event("E_HOLD", None)  # nobody subscribed: counted, and the lane is ours
    assert bus.producer.lane >= 0 and not bus.producer.shared
    os.write(ready_w, f"{bus.producer.lane}\n".encode())
    os.read(release_r, 1)
    return 0


# --- 3 x as many producers as lanes -----------------------------------------------

LANES = 4
CROWD = 3 * LANES
EACH = 300


def _crowd_member(bus: EventBus, index: int, report_w: int, go_r: int, release_r: int) -> int:
    raise_retrying(bus.raise_event, EVENT, _params(index, 0))  # claims a lane, or shares one
    os.write(report_w, f"{index} {bus.producer.lane} {int(bus.producer.shared)}\n".encode())
    os.read(go_r, 1)  # all of them hold what they got: none can move meanwhile
    for seq in range(1, EACH):
        raise_retrying(bus.raise_event, EVENT, _params(index, seq))
    os.write(report_w, f"{index} done\n".encode())
    os.read(release_r, 1)
    return 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overflow_lanes", [1, 3])  # all 8 sharers on one lock; spread by pid
def test_three_times_as_many_producers_as_lanes_lose_nothing(
    kids: Kids, udp_sink: UdpSink, capfd: pytest.CaptureFixture[str], overflow_lanes: int
) -> None:
    with EventBus(lanes=LANES, overflow_lanes=overflow_lanes) as bus:
        bus.publish_event(EVENT)
        bus.subscribe(EVENT, udp_sink.address)
        report_r, report_w = os.pipe()
        go_r, go_w = os.pipe()
        release_r, release_w = os.pipe()
        pids = [kids.fork(_crowd_member, bus, i, report_w, go_r, release_r) for i in range(CROWD)]
        try:
            claims = _read_lines(report_r, CROWD)
            dedicated = sorted(int(lane) for _, lane, shared in claims if shared == "0")
            shared = [int(lane) for _, lane, flag in claims if flag == "1"]
            assert dedicated == list(range(LANES)), claims
            assert len(shared) == CROWD - LANES, claims
            assert set(shared) <= set(bus.segment.layout.shared_lanes()), claims
            os.write(go_w, b"g" * CROWD)
            assert len(_read_lines(report_r, CROWD)) == CROWD
        finally:
            os.write(release_w, b"r" * CROWD)  # every child exits
            for fd in (report_r, report_w, go_r, go_w, release_r, release_w):
                os.close(fd)
        for pid in pids:
            assert kids.wait(pid) == 0

        got = udp_sink.receive(CROWD * EACH, timeout=15) + udp_sink.quiet()
        expected = {i: _expected(i, EACH) for i in range(CROWD)}
        check_stream(got, expected, "12 producers on 4 lanes", udp_sink)
        assert wait_for(lambda: ring_empty(bus) and drained(bus) and backlogs_empty(bus))
        stats = bus.stats()
        check_accounting(stats)
        e = stats["events"][EVENT]
        assert e["raised"] == e["enqueued"] == e["dispatched"] == CROWD * EACH, e
        assert e["dropped"] == e["rejected"] == 0, e
        assert stats["shared_lane_writers"] == CROWD - LANES, stats
        assert stats["repaired"] == 0, stats
    err = capfd.readouterr().err
    assert err.count(f"share {overflow_lanes} overflow lanes") == 1, err  # the hub's one warning
    assert "set lanes" in err, err


# --- a writer killed while it holds the shared lane's lock ----------------------------


class _StopAfterPublish:
    """Stands in for a shared lane's writer: publishes the record, says so,
    then stops for good while its process holds the lane's lock (as if killed
    between publishing and counting)."""

    def __init__(self, writer: Any, said_w: int) -> None:
        self.writer = writer
        self.said_w = said_w

    @property
    def tail(self) -> int:
        return self.writer.tail

    @tail.setter
    def tail(self, value: int) -> None:
        self.writer.tail = value

    def push(self, *args: Any) -> bool:
        ok = self.writer.push(*args)
        os.write(self.said_w, b"!")
        time.sleep(3600)  # until SIGKILL
        return ok


def _stuck_writer(bus: EventBus, said_w: int) -> int:
    assert bus.raise_event(EVENT, _params(0, 0))
    assert bus.producer.shared
    shared = bus.producer._shared
    assert shared is not None, "test relies on Producer._shared"
    shared.writer = _StopAfterPublish(shared.writer, said_w)
    bus.raise_event(EVENT, _params(0, 1))
    return 3  # not reached


SURVIVORS = 2
SURVIVOR_N = 200


def _survivor(bus: EventBus, index: int, started_w: int) -> int:
    os.write(started_w, b"s")
    for seq in range(SURVIVOR_N):
        raise_retrying(bus.raise_event, EVENT, _params(index, seq))
    return 0 if bus.producer.shared else 4


@pytest.mark.timeout(90)
def test_writer_killed_holding_the_shared_lock_stalls_nobody(kids: Kids, udp_sink: UdpSink) -> None:
    with EventBus(lanes=1, overflow_lanes=1) as bus:  # one shared lane: everyone meets there
        bus.publish_event(EVENT)
        bus.subscribe(EVENT, udp_sink.address)
        assert bus.raise_event(EVENT, {"owner": 0})  # this process owns the dedicated lane
        said_r, said_w = os.pipe()
        started_r, started_w = os.pipe()
        try:
            victim = kids.fork(_stuck_writer, bus, said_w)
            assert select.select([said_r], [], [], 30)[0], "the victim never pushed"
            assert os.read(said_r, 1) == b"!"
            survivors = [kids.fork(_survivor, bus, i, started_w) for i in (1, 2)]
            assert wait_for(lambda: _lock_waiters(bus) == SURVIVORS, timeout=30), _lock_waiters(bus)
            # The victim's published record is delivered though its writer
            # still holds the lock; the survivors wait for the lock meanwhile;
            # this process, on its own lane, is not held up at all.
            assert bus.raise_event(EVENT, {"owner": 1})
            held = udp_sink.receive(4, timeout=10) + udp_sink.quiet(0.5)
            assert sorted(held) == sorted(
                [
                    encode_notification(EVENT, {"owner": 0}),
                    encode_notification(EVENT, {"owner": 1}),
                    *_expected(0, 2),
                ]
            ), held
            os.kill(victim, signal.SIGKILL)
            assert kids.wait(victim) == -signal.SIGKILL
            for pid in survivors:
                assert kids.wait(pid, timeout=60) == 0, "a survivor stalled or lost its lane"
        finally:
            for fd in (said_r, said_w, started_r, started_w):
                os.close(fd)
        got = udp_sink.receive(SURVIVORS * SURVIVOR_N, timeout=15) + udp_sink.quiet()
        expected = {i: _expected(i, SURVIVOR_N) for i in (1, 2)}
        check_stream(got, expected, "survivors of a stuck writer", udp_sink)

        def repaired() -> bool:
            stats = bus.stats()
            return ring_empty(bus) and stats["repaired"] == 1 and drained(bus)

        assert wait_for(repaired, timeout=15), bus.stats()  # the hub counted the victim's record
        assert wait_for(lambda: backlogs_empty(bus)), bus.stats()
        stats = bus.stats()
        check_accounting(stats)
        e = stats["events"][EVENT]
        total = 2 + 2 + SURVIVORS * SURVIVOR_N  # this process's, the victim's, the survivors'
        assert e["raised"] == e["enqueued"] == e["dispatched"] == total, e


def _lock_waiters(bus: EventBus) -> int:
    """Processes blocked on a record lock of the bus's segment (/proc/locks "->")."""
    inode = f":{os.fstat(bus.segment.fd).st_ino} "
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and inode in line)


# --- moving from a shared lane to a freed one -----------------------------------------


def _free(bus: EventBus, lane: int) -> bool:
    """The hub has reclaimed ``lane`` (its dead owner's records drained)."""
    layout = bus.segment.layout
    return bus.segment.words[layout.lane_word(lane) + L_OWNER_PID] == 0


class _Stream:
    """This process's numbered events, raised until told to stop."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.n = 0

    def raise_some(self, count: int = 1) -> None:
        for _ in range(count):
            raise_retrying(self.bus.raise_event, EVENT, _params(0, self.n))
            self.n += 1

    def raise_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.raise_some(5)
            time.sleep(0.005)

    def raise_until_moved(self) -> None:
        """Raise until this process writes to a lane of its own."""

        def moved() -> bool:
            self.raise_some()
            return not self.bus.producer.shared

        assert wait_for(moved, timeout=15), "never moved to a lane of its own"

    def check_delivered(self, sink: UdpSink) -> None:
        """Every event arrived once, in order, and the counters add up."""
        got = sink.receive(self.n, timeout=15) + sink.quiet()
        check_stream(got, {0: _expected(0, self.n)}, "shared, then a lane of its own", sink)
        bus = self.bus
        assert wait_for(lambda: drained(bus) and backlogs_empty(bus)), bus.stats()
        stats = bus.stats()
        check_accounting(stats)
        assert stats["events"][EVENT]["enqueued"] == self.n, stats


@pytest.mark.timeout(90)
def test_a_sharing_process_moves_to_a_freed_lane_without_reordering(
    kids: Kids, udp_sink: UdpSink
) -> None:
    with EventBus(lanes=1) as bus:
        bus.publish_event(EVENT)
        bus.publish_event("E_HOLD")
        bus.subscribe(EVENT, udp_sink.address)
        ready_r, ready_w = os.pipe()
        release_r, release_w = os.pipe()
        holder = kids.fork(_hold_lane, bus, ready_w, release_r)
        stream = _Stream(bus)
        try:
            assert _read_lines(ready_r, 1) == [["0"]]
            stream.raise_some(10)
            assert bus.producer.shared
            assert wait_for(lambda: drained(bus))
            (sender,) = sender_processes(bus, 1)
            os.kill(sender.pid, signal.SIGSTOP)
            try:
                os.write(release_w, b"r")  # the holder exits; its lane drained: the hub frees it
                assert kids.wait(holder) == 0
                assert wait_for(lambda: _free(bus, 0), timeout=15)
                # Past the retry interval this process claims lane 0, but the
                # stopped sender has not taken what it wrote to the shared
                # lane: it must keep writing there.
                stream.raise_for(1.5)
                assert bus.segment.lane_owner(0) == os.getpid(), "lane 0 was not claimed"
                assert bus.producer.shared, "moved before the sender took the shared records"
            finally:
                os.kill(sender.pid, signal.SIGCONT)

            stream.raise_until_moved()
            assert bus.producer.lane == 0
            stream.raise_some(50)
        finally:
            for fd in (ready_r, ready_w, release_r, release_w):
                os.close(fd)
        stream.check_delivered(udp_sink)


@pytest.mark.timeout(90)
def test_a_sharing_process_moves_only_to_a_lane_of_its_sender(
    kids: Kids, udp_sink: UdpSink
) -> None:
    """Another sender could send the new lane's events before the shared
    lane's sender sends the old ones: the shared lane (2) is sender 0's, so
    lane 1 (sender 1's) freeing up is not taken, lane 0 freeing up is."""
    with EventBus(senders=2, lanes=2, overflow_lanes=1) as bus:
        bus.publish_event(EVENT)
        bus.publish_event("E_HOLD")
        bus.subscribe(EVENT, udp_sink.address)
        ready_r, ready_w = os.pipe()
        release_r, release_w = os.pipe()
        holders = [kids.fork(_hold_lane, bus, ready_w, release_r) for _ in range(2)]
        stream = _Stream(bus)
        try:
            assert sorted(_read_lines(ready_r, 2)) == [["0"], ["1"]]
            stream.raise_some(10)
            assert bus.producer.shared and bus.producer.lane == 2
            for lane in (1, 0):
                pid = bus.segment.lane_owner(lane)
                assert pid in holders, (lane, pid, holders)
                os.kill(pid, signal.SIGKILL)  # its lane is handed over as any dead producer's
                assert kids.wait(pid) == -signal.SIGKILL
                assert wait_for(lambda lane=lane: _free(bus, lane), timeout=15)
                stream.raise_for(1.5)  # past the retry interval
                if lane == 1:
                    assert bus.producer.shared, "moved to another sender's lane"
                    assert bus.segment.lane_owner(1) is None
            stream.raise_until_moved()
            assert bus.producer.lane == 0
            stream.raise_some(20)
        finally:
            for fd in (ready_r, ready_w, release_r, release_w):
                os.close(fd)
        stream.check_delivered(udp_sink)


# --- the setting ---------------------------------------------------------------


def test_overflow_lanes_is_a_segment_setting_stored_in_the_header(tmp_path: Path) -> None:
    """The daemon's [segment] overflow_lanes is validated like the other
    geometry keys, and an attacher reads the number from the header."""
    good = tmp_path / "good.toml"
    good.write_text("[segment]\nlanes = 2\noverflow_lanes = 3\n")
    assert load(good).geometry.ring_lanes == 5
    bad = tmp_path / "bad.toml"
    bad.write_text("[segment]\noverflow_lanes = 0\n")
    with pytest.raises(ConfigError, match=r"key segment\.overflow_lanes: overflow_lanes must be"):
        load(bad)
    name = f"mpevent-test-{os.getpid()}-overflow"
    seg = Segment.create(Geometry(lanes=2, lane_size=4096, overflow_lanes=3), name)
    try:
        other = Segment.attach(name)
        try:
            assert other.layout == seg.layout
            assert list(other.layout.shared_lanes()) == [2, 3, 4]
        finally:
            other.close()
    finally:
        seg.close()
