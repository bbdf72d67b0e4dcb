"""Tests for mpevent.shm.ring (one SPSC lane) and mpevent.shm.segment (the shared mapping).

* a model-based property test of the record framing and wrap-around, on a
  plain ``bytearray`` (no processes);
* a stress test with four producer processes on a real segment;
* producers killed with SIGKILL in the middle of pushing;
* named and anonymous segments: mode, removal, attach.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import struct
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from support import Kids, wait_for

from mpevent.processes.reclaim import LaneReclaimer
from mpevent.shm.layout import (
    L_CLAIMS,
    L_HEAD,
    L_OWNER_PID,
    L_TAIL,
    LANE_BLOCK_WORDS,
    RECORD_HEADER_BYTES,
    Geometry,
    Layout,
)
from mpevent.shm.ring import LaneReader, LaneWriter, max_body, record_span
from mpevent.shm.segment import SHM_DIR, Segment, SegmentError, shm_path


# --- helpers -------------------------------------------------------------------
def whole_lane_body(size: int) -> int:
    """The largest body the raw ring can hold: one record taking the whole lane."""
    return size - RECORD_HEADER_BYTES


DATA_AT = 4096  # lane data offset in the bytearray-backed lanes
CTL_BYTES = LANE_BLOCK_WORDS * 8  # 192: the control block at word 0
GUARD = 512  # bytes after the lane data that nobody may touch

# Body of a stress record: producer index, sequence number, payload, crc32.
SEQ = struct.Struct("<II")
CRC = struct.Struct("<I")


def assert_no_child_failed(kids: Kids) -> None:
    """Fail at once, instead of stalling, when a child has ended badly.

    Only peeks (``WNOWAIT``): the child stays for :meth:`Kids.wait`.
    """
    for pid in list(kids.pids):
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            assert (info.si_code, info.si_status) == (os.CLD_EXITED, 0), f"child {pid}: {info}"


def lane_ends(seg: Segment, lane: int) -> tuple[int, int, int, int]:
    """(ctl word, data offset, size, lane word) arguments for a lane of ``seg``."""
    layout = seg.layout
    return layout.lane_word(lane), layout.lane_data(lane), layout.geometry.lane_size, lane


def writer_for(seg: Segment, lane: int) -> LaneWriter:
    ctl, data, size, _ = lane_ends(seg, lane)
    return LaneWriter(seg.buf, seg.words, ctl, data, size)


def reader_for(seg: Segment, lane: int) -> LaneReader:
    ctl, data, size, _ = lane_ends(seg, lane)
    return LaneReader(seg.buf, seg.words, ctl, data, size)


def read_records(reader: LaneReader, limit: int) -> list[tuple[int, bytes, int]]:
    """Up to ``limit`` records as (event id, body, raise ns), across the end of the lane.

    Through ``read_span``, the sender's one parser of the record format, a
    stretch at a time; each record's raise time is its header's second word,
    just before its body, and the stretch's first must be what
    ``read_span`` reports as the oldest.
    """
    got: list[tuple[int, bytes, int]] = []
    while len(got) < limit:
        records, stretch, first_raised_ns = reader.read_span(limit - len(got), sys.maxsize)
        if not records:
            break
        stretch_start = len(got)
        for event_id, at, n in records:
            raised_ns = int.from_bytes(stretch[at - 8 : at], sys.byteorder)
            got.append((event_id, bytes(stretch[at : at + n]), raised_ns))
        assert first_raised_ns == got[stretch_start][2]
    return got


def crc_body(first: int, seq: int, payload: bytes | memoryview) -> bytes:
    head = SEQ.pack(first, seq) + payload
    return head + CRC.pack(zlib.crc32(head))


def check_crc_body(body: memoryview) -> tuple[int, int]:
    """(first, seq) of a crc body; fails on a torn or corrupted record."""
    assert len(body) >= SEQ.size + CRC.size, f"short record: {bytes(body)!r}"
    (crc,) = CRC.unpack_from(body, len(body) - CRC.size)
    assert zlib.crc32(body[: len(body) - CRC.size]) == crc, f"bad crc: {bytes(body)!r}"
    return SEQ.unpack_from(body)


def read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        assert chunk, "pipe closed"
        data += chunk
    return data


def unique_name() -> str:
    return f"mpevent-test-{os.getpid()}-{secrets.token_hex(4)}"


# --- a: framing and wrap-around against a model ---------------------------------------


class LaneModel(RuleBasedStateMachine):
    """One lane in a bytearray, driven by random pushes, reads and releases.

    The model keeps the published tail, the released head, the reader's
    position and the records in flight, and predicts every push's outcome
    with the ring's own arithmetic. Every byte outside the control words and
    the region a push claims must stay as it was.
    """

    @initialize(
        size=st.sampled_from([256, 512, 1024]),
        start=st.one_of(
            st.just(0),
            st.integers(0, 1 << 20).map(lambda k: k * 8),
            st.integers(0, 1 << 10).map(lambda k: (1 << 40) + k * 8),
        ),
        seed=st.integers(0, 2**32 - 1),
    )
    def setup(self, size: int, start: int, seed: int) -> None:
        self.size = size
        self.rng = random.Random(seed)
        # Garbage everywhere: the ring must not rely on zeroed memory.
        self.arr = bytearray(self.rng.randbytes(DATA_AT + size + GUARD))
        self.buf = memoryview(self.arr)
        self.words = self.buf.cast("Q")
        self.words[L_TAIL] = start
        self.words[L_HEAD] = start
        self.writer = LaneWriter(self.buf, self.words, 0, DATA_AT, size)
        self.reader = LaneReader(self.buf, self.words, 0, DATA_AT, size)
        self.tail = start  # published tail
        self.released = start  # released head
        self.read_at = start  # the reader's own position
        self.unread: deque[tuple[int, bytes, int, int]] = deque()
        self.unreleased: list[tuple[int, bytes, int, int]] = []

    def teardown(self) -> None:
        if hasattr(self, "words"):
            self.words.release()
            self.buf.release()

    # -- the model's arithmetic (as the ring's docstring states it) --

    def fits(self, body_len: int) -> tuple[bool, int]:
        """Whether a record fits now, and where it starts (after any wrap)."""
        span = record_span(body_len)
        off = self.tail % self.size
        to_end = self.size - off
        need = span if span <= to_end else to_end + span
        start = self.tail if span <= to_end else self.tail + to_end
        return self.tail + need - self.released <= self.size, start

    def assert_only_changed(self, before: bytes, ranges: list[tuple[int, int]]) -> None:
        """Every byte outside ``ranges`` (absolute, sorted) is as in ``before``."""
        after = bytes(self.arr)
        at = 0
        for lo, hi in [*ranges, (len(after), len(after))]:
            assert after[at:lo] == before[at:lo], f"bytes {at}..{lo} changed"
            at = hi

    def data_ranges(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Absolute byte ranges of lane positions ``lo..hi`` (hi - lo <= size)."""
        if lo == hi:
            return []
        a, b = lo % self.size, (hi - 1) % self.size + 1
        if a < b:
            return [(DATA_AT + a, DATA_AT + b)]
        return [(DATA_AT, DATA_AT + b), (DATA_AT + a, DATA_AT + self.size)]

    # -- rules --

    @rule(data=st.data())
    def push(self, data: st.DataObject) -> None:
        size = self.size
        to_end = size - self.tail % size
        exact_end = max(0, to_end - RECORD_HEADER_BYTES)  # ends exactly at the end
        body_len = data.draw(
            st.one_of(
                st.integers(0, 64),
                st.integers(0, size),
                st.just(whole_lane_body(size)),
                st.just(whole_lane_body(size) + 1),
                st.integers(max(0, exact_end - 7), exact_end),
                # leaves 8 bytes at the end: fewer than a header, implicit wrap
                st.just(max(0, exact_end - 8)),
                # one byte too many for the space before the end: wrap
                st.just(exact_end + 1),
            ),
            label="body_len",
        )
        event_id = data.draw(st.integers(0, 65535), label="event_id")
        raised_ns = data.draw(st.integers(0, 2**64 - 1), label="raised_ns")
        body = self.rng.randbytes(body_len)
        fits, start = self.fits(body_len)
        before = bytes(self.arr)
        ok = self.writer.push(event_id, body, raised_ns)
        assert ok is fits, f"push of {body_len} bytes at {self.tail}: {ok}, model {fits}"
        if not ok:
            assert bytes(self.arr) == before, "a refused push wrote something"
            assert self.writer.tail == self.tail
            return
        end = start + record_span(body_len)
        self.assert_only_changed(before, [(0, 8), *sorted(self.data_ranges(self.tail, end))])
        self.tail = end
        self.unread.append((event_id, body, raised_ns, end))
        assert self.words[L_TAIL] == self.writer.tail == end

    @rule(limit=st.integers(0, 12), release=st.booleans())
    def read(self, limit: int, release: bool) -> None:
        """Stretch after stretch: exactly the next ``limit`` records, with their raise times."""
        before = bytes(self.arr)
        got = read_records(self.reader, limit)
        expected = [self.unread.popleft() for _ in range(min(limit, len(self.unread)))]
        assert got == [record[:3] for record in expected]
        self.taken(expected, before, release)

    @rule(limit=st.integers(0, 12), max_bytes=st.integers(1, 1 << 16), release=st.booleans())
    def read_span(self, limit: int, max_bytes: int, release: bool) -> None:
        """The sender's reader: the same records, from one contiguous stretch."""
        before = bytes(self.arr)
        records, stretch, first_raised_ns = self.reader.read_span(limit, max_bytes)
        got = [(e, bytes(stretch[at : at + n])) for e, at, n in records]
        if limit and self.unread:
            assert got, "records were waiting but none came"
        assert len(got) <= limit
        if len(got) > 1:
            assert len(stretch) <= max_bytes, "a stretch of several records beyond max_bytes"
        expected = [self.unread.popleft() for _ in got]
        assert got == [(e, body) for e, body, _, _ in expected]
        assert first_raised_ns == (expected[0][2] if expected else 0)
        self.taken(expected, before, release)

    def taken(
        self, expected: list[tuple[int, bytes, int, int]], before: bytes, release: bool
    ) -> None:
        """The model's side of a read: the reader moved past ``expected``, wrote nothing."""
        self.unreleased.extend(expected)
        if expected:
            self.read_at = expected[-1][3]
        assert self.reader.head == self.read_at
        assert bytes(self.arr) == before, "reading wrote to the lane"
        if release:
            self.release()

    @rule()
    def release(self) -> None:
        before = bytes(self.arr)
        self.reader.release()
        self.released = self.read_at
        self.unreleased.clear()
        assert self.words[L_HEAD] == self.released
        self.assert_only_changed(before, [(8 * L_HEAD, 8 * L_HEAD + 8)])

    @rule()
    def new_writer(self) -> None:
        """A new owner of the lane continues from the published tail."""
        self.writer = LaneWriter(self.buf, self.words, 0, DATA_AT, self.size)
        assert self.writer.tail == self.tail

    @rule()
    def new_reader(self) -> None:
        """A respawned consumer resumes at the released head: re-reads the rest."""
        self.reader = LaneReader(self.buf, self.words, 0, DATA_AT, self.size)
        self.unread.extendleft(reversed(self.unreleased))
        self.unreleased.clear()
        self.read_at = self.released
        assert self.reader.head == self.released

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "writer"):
            return
        assert self.words[L_TAIL] == self.writer.tail == self.tail
        assert self.words[L_HEAD] == self.released
        assert 0 <= self.tail - self.released <= self.size, "the lane holds more than its size"
        assert self.reader.pending() is bool(self.unread)


TestLaneModel = LaneModel.TestCase
TestLaneModel.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class BytearrayLane:
    """A lane in a bytearray, for the hand-written edge cases."""

    def __init__(self, size: int, start: int = 0) -> None:
        self.size = size
        self.arr = bytearray(os.urandom(DATA_AT + size + GUARD))
        self.buf = memoryview(self.arr)
        self.words = self.buf.cast("Q")
        self.words[L_TAIL] = self.words[L_HEAD] = start
        self.writer = LaneWriter(self.buf, self.words, 0, DATA_AT, size)
        self.reader = LaneReader(self.buf, self.words, 0, DATA_AT, size)

    def drain(self) -> list[tuple[int, bytes, int]]:
        got = read_records(self.reader, 1 << 30)
        self.reader.release()
        return got


def test_record_span() -> None:
    assert RECORD_HEADER_BYTES == 16
    assert [record_span(n) for n in (0, 1, 7, 8, 9, 16)] == [16, 24, 24, 24, 32, 32]
    assert whole_lane_body(256) == 240
    assert record_span(whole_lane_body(256)) == 256
    assert max_body(256) == 112  # what producers offer: half a lane


@pytest.mark.parametrize("size", [256, 1024, 4096])
def test_max_body_fits_an_empty_lane_wherever_the_tail_is(size: int) -> None:
    """Producers never offer more than max_body, so an empty lane never says "full"."""
    for start in range(0, size, 8):
        lane = BytearrayLane(size, start=start)
        assert lane.writer.push(1, b"x" * max_body(size), 0), start


@pytest.mark.parametrize("size", [256, 1024])
def test_whole_lane_record(size: int) -> None:
    lane = BytearrayLane(size)
    body = os.urandom(whole_lane_body(size))
    assert lane.writer.push(7, body, 123)
    assert lane.writer.tail - lane.words[L_HEAD] == size
    assert not lane.writer.push(1, b"", 0), "a full lane took a record"
    assert lane.drain() == [(7, body, 123)]
    # Tail is at offset 0 again: the whole lane is free for one more.
    assert lane.writer.push(8, body, 124)
    assert not lane.writer.push(1, b"", 0)
    assert lane.drain() == [(8, body, 124)]
    # Larger than the lane: never fits, even when empty.
    assert not lane.writer.push(9, os.urandom(whole_lane_body(size) + 1), 0)
    assert lane.drain() == []


def test_record_ending_exactly_at_the_end() -> None:
    lane = BytearrayLane(256)
    first = os.urandom(100)  # span 120
    assert lane.writer.push(1, first, 1)
    last = os.urandom(256 - 120 - RECORD_HEADER_BYTES)  # span 136: ends at 256
    assert lane.writer.push(2, last, 2)
    assert lane.writer.tail == 256
    assert lane.drain() == [(1, first, 1), (2, last, 2)]
    # The next record starts at offset 0 with no padding in between.
    assert lane.writer.push(3, b"x", 3)
    assert lane.writer.tail == 256 + 24
    assert lane.drain() == [(3, b"x", 3)]


def test_implicit_wrap_when_less_than_a_header_remains() -> None:
    lane = BytearrayLane(256)
    body = os.urandom(256 - 8 - RECORD_HEADER_BYTES)  # leaves 8 bytes
    assert lane.writer.push(1, body, 1)
    assert lane.writer.tail == 248
    assert lane.drain() == [(1, body, 1)]
    # Even an empty record does not fit in 8 bytes: padding, then offset 0.
    assert lane.writer.push(2, b"", 2)
    assert lane.writer.tail == 256 + 16
    assert lane.writer.push(3, b"abc", 3)
    assert lane.drain() == [(2, b"", 2), (3, b"abc", 3)]


def test_wrap_marker_when_a_header_fits() -> None:
    lane = BytearrayLane(256)
    assert lane.writer.push(1, os.urandom(200), 1)  # span 216, 40 bytes left
    assert lane.drain()[0][0] == 1
    body = os.urandom(48)  # span 64 > 40: marker at 216, record at 0
    assert lane.writer.push(2, body, 2)
    assert lane.writer.tail == 256 + 64
    assert lane.drain() == [(2, body, 2)]


def test_wrap_needs_room_for_the_padding_too() -> None:
    lane = BytearrayLane(256)
    assert lane.writer.push(1, os.urandom(120), 1)  # span 136: tail at 136
    lane.drain()
    # Empty lane, 120 bytes to the end: a 144-byte span fits neither before
    # the end nor at 0 after 120 bytes of padding (120 + 144 > 256).
    assert not lane.writer.push(2, os.urandom(128), 2)
    assert lane.writer.tail == 136
    # A 128-byte span does (120 + 128 <= 256).
    assert lane.writer.push(3, os.urandom(112), 3)
    assert lane.writer.tail == 256 + 128
    assert [e for e, _, _ in lane.drain()] == [3]


def test_refused_push_changes_nothing() -> None:
    lane = BytearrayLane(512)
    records = [(i, os.urandom(40 + i), i) for i in range(6)]  # 6 x 64..72
    for record in records:
        assert lane.writer.push(*record)
    before = bytes(lane.arr)
    assert not lane.writer.push(99, os.urandom(200), 99)
    assert bytes(lane.arr) == before
    assert lane.drain() == records


def test_reader_limit_and_resume() -> None:
    lane = BytearrayLane(1024)
    records = [(i, os.urandom(i), 1000 + i) for i in range(20)]
    for record in records:
        assert lane.writer.push(*record)
    assert read_records(lane.reader, 7) == records[:7]
    assert lane.reader.pending()
    # Not released: a new reader (a respawned sender) starts over.
    again = LaneReader(lane.buf, lane.words, 0, DATA_AT, 1024)
    assert read_records(again, 100) == records
    lane.reader.release()
    assert lane.words[L_HEAD] == lane.reader.head
    assert lane.drain() == records[7:]
    assert not lane.reader.pending()


# --- b: four producer processes on a real segment -----------------------------------------

STRESS_PRODUCERS = 4
STRESS_RECORDS = 50_000
POOL = random.Random(1).randbytes(1 << 14)


def _stress_producer(seg: Segment, index: int, count: int, parent: int) -> int:
    lane = seg.claim_lane(os.getpid())
    if lane is None:
        print(f"producer {index}: no lane", file=sys.stderr)
        return 3
    writer = writer_for(seg, lane)
    rng = random.Random(index)
    deadline = time.monotonic() + 60
    for seq in range(count):
        n = rng.randrange(64) if rng.random() < 0.97 else rng.randrange(6000)
        at = rng.randrange(len(POOL) - n)
        body = crc_body(index, seq, POOL[at : at + n])
        while not writer.push(index, body, seq):
            if time.monotonic() > deadline or os.getppid() != parent:
                print(f"producer {index}: stuck at {seq}", file=sys.stderr)
                return 4
            time.sleep(0)
    return 0


def test_four_producers_stress(kids: Kids) -> None:
    seg = Segment.create(Geometry(lanes=STRESS_PRODUCERS, lane_size=1 << 16, senders=1))
    try:
        pids = [
            kids.fork(_stress_producer, seg, index, STRESS_RECORDS, os.getpid())
            for index in range(STRESS_PRODUCERS)
        ]
        readers = [reader_for(seg, lane) for lane in range(STRESS_PRODUCERS)]
        next_seq = [0] * STRESS_PRODUCERS
        lane_of: dict[int, int] = {}
        total = STRESS_PRODUCERS * STRESS_RECORDS
        received = 0
        deadline = time.monotonic() + 90
        while received < total:
            progress = False
            for lane, reader in enumerate(readers):
                for event_id, body, raised_ns in read_records(reader, 512):
                    index, seq = check_crc_body(body)
                    assert event_id == index and raised_ns == seq
                    assert lane_of.setdefault(index, lane) == lane, "producer changed lane"
                    assert seq == next_seq[index], f"producer {index}: {seq}"
                    next_seq[index] = seq + 1
                    received += 1
                    progress = True
                reader.release()
            if not progress:
                assert_no_child_failed(kids)
                assert time.monotonic() < deadline, f"stalled at {next_seq}"
                time.sleep(0)
        assert next_seq == [STRESS_RECORDS] * STRESS_PRODUCERS
        assert sorted(lane_of.values()) == list(range(STRESS_PRODUCERS)), lane_of
        owners = {seg.words[seg.layout.lane_word(lane) + L_OWNER_PID] for lane in lane_of.values()}
        assert owners == set(pids)
        for pid in pids:
            assert kids.wait(pid) == 0, f"child {pid}"
        # Nothing extra.
        for reader in readers:
            assert not reader.pending()
            assert read_records(reader, 10) == []
        for lane in range(STRESS_PRODUCERS):
            assert seg.words[seg.layout.lane_word(lane) + L_CLAIMS] == 1
    finally:
        seg.close()


# --- c: producers killed with SIGKILL while pushing --------------------------------------


def _doomed_producer(seg: Segment, round_: int, count: int, parent: int) -> int:
    """Push crc records (forever when ``count`` is 0) into lane 0."""
    lane = seg.claim_lane(os.getpid())
    if lane != 0:
        print(f"round {round_}: claimed {lane}", file=sys.stderr)
        return 3
    writer = writer_for(seg, lane)
    rng = random.Random(round_)
    seq = 0
    deadline = time.monotonic() + 60
    while not count or seq < count:
        n = rng.randrange(300) if rng.random() < 0.9 else rng.randrange(2000)
        at = rng.randrange(len(POOL) - n)
        body = crc_body(round_, seq, POOL[at : at + n])
        while not writer.push(round_, body, seq):
            if time.monotonic() > deadline or os.getppid() != parent:
                return 4
            time.sleep(0)
        seq += 1
    return 0


class KillChecker:
    """Reads lane 0, checking every record: intact, in order, round after round."""

    def __init__(self, seg: Segment) -> None:
        self.reader = reader_for(seg, 0)
        self.round = -1
        self.next_seq = 0
        self.counts: dict[int, int] = {}

    def drain(self, limit: int = 1 << 30) -> int:
        got = 0
        for event_id, body, raised_ns in read_records(self.reader, limit):
            round_, seq = check_crc_body(body)
            assert event_id == round_ and raised_ns == seq
            if round_ != self.round:
                assert round_ > self.round, f"round {round_} after round {self.round}"
                assert seq == 0, f"round {round_} starts at {seq}"
                self.round, self.next_seq = round_, 0
            assert seq == self.next_seq, f"round {round_}: {seq} after {self.next_seq - 1}"
            self.next_seq += 1
            self.counts[round_] = self.next_seq
            got += 1
        self.reader.release()
        return got


@pytest.mark.parametrize("seed", [1, 2])
def test_producer_killed_while_pushing(seed: int, kids: Kids) -> None:
    rng = random.Random(seed)
    killed_rounds = 4
    final_count = 3000
    seg = Segment.create(Geometry(lanes=1, lane_size=1 << 12, senders=1))
    lane_word = seg.layout.lane_word(0)
    checker = KillChecker(seg)
    try:
        for round_ in range(killed_rounds):
            pid = kids.fork(_doomed_producer, seg, round_, 0, os.getpid())
            assert wait_for(lambda pid=pid: seg.words[lane_word + L_OWNER_PID] == pid)
            assert seg.lane_owner(0) == pid
            # Read for a while, or (sometimes) let the lane fill up so
            # the child is spinning on a full lane when it dies.
            until = time.monotonic() + rng.uniform(0.02, 0.2)
            reading = rng.random() < 0.7
            while time.monotonic() < until:
                if reading:
                    checker.drain(rng.randrange(1, 200))
                else:
                    time.sleep(0.001)
            os.kill(pid, signal.SIGKILL)
            code = kids.wait(pid)
            assert code == -signal.SIGKILL, f"round {round_}: child ended ({code}) before the kill"
            checker.drain()
            assert not checker.reader.pending()
            assert seg.lane_owner(0) is None, "the kernel kept a dead process's lock"
            # The dead owner's lane is not free until it is reclaimed.
            assert seg.words[lane_word + L_OWNER_PID] == pid
            assert [r.lane for r in LaneReclaimer(seg).scan()] == [0]
            assert seg.words[lane_word + L_OWNER_PID] == 0
        # A last owner pushes a known number of records and exits.
        pid = kids.fork(_doomed_producer, seg, killed_rounds, final_count, os.getpid())
        deadline = time.monotonic() + 30
        while checker.counts.get(killed_rounds, 0) < final_count:
            if not checker.drain():
                assert_no_child_failed(kids)
                assert time.monotonic() < deadline, "the last producer stalled"
                time.sleep(0.001)
        assert kids.wait(pid) == 0
        checker.drain()
        assert checker.counts[killed_rounds] == final_count
        assert checker.round == killed_rounds
        assert sum(checker.counts.values()) > final_count, "the killed rounds pushed nothing"
        assert seg.words[lane_word + L_CLAIMS] == killed_rounds + 1
    finally:
        seg.close()


# --- d: segments ------------------------------------------------------------------------


@contextmanager
def named_segment(geometry: Geometry) -> Iterator[Segment]:
    name = unique_name()
    try:
        seg = Segment.create(geometry, name)
        try:
            yield seg
        finally:
            seg.close()
    finally:
        shm_path(name).unlink(missing_ok=True)


SMALL = Geometry(
    lanes=3, lane_size=1 << 13, senders=2, max_events=10, max_subs=20, table_bytes=8192
)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_named_segment_mode_and_removal(umask: int) -> None:
    old = os.umask(umask)
    try:
        with named_segment(SMALL) as seg:
            path = shm_path(seg.name)
            assert path.parent == SHM_DIR
            st_ = os.stat(path)
            assert st_.st_mode & 0o777 == 0o600
            assert st_.st_uid == os.geteuid()
            assert st_.st_size == seg.layout.size == Layout.of(SMALL).size
            seg.close()
            assert not path.exists(), "close() left the segment behind"
    finally:
        os.umask(old)


def test_anonymous_segment_leaves_nothing() -> None:
    before = set(os.listdir(SHM_DIR))
    seg = Segment.create(SMALL)
    try:
        assert seg.name is None
        assert os.fstat(seg.fd).st_mode & 0o777 == 0o600
        assert set(os.listdir(SHM_DIR)) == before
        seg.words[seg.layout.lane_word(0) + L_TAIL] = 42
        assert seg.words[seg.layout.lane_word(0) + L_TAIL] == 42
    finally:
        seg.close()
    assert set(os.listdir(SHM_DIR)) == before


def test_attach_sees_the_same_geometry_and_memory() -> None:
    with named_segment(SMALL) as seg:
        other = Segment.attach(seg.name)
        try:
            assert other.layout == seg.layout
            assert other.layout.geometry == SMALL
            assert not other.owner
            # Words both ways.
            seg.words[seg.layout.sub_count_word(3)] = 0xDEADBEEF
            assert other.words[other.layout.sub_count_word(3)] == 0xDEADBEEF
            other.words[other.layout.lane_word(2) + L_HEAD] = 77
            assert seg.words[seg.layout.lane_word(2) + L_HEAD] == 77
            other.words[other.layout.lane_word(2) + L_HEAD] = 0
            # A record written through one mapping is read through the other.
            writer = writer_for(other, 2)
            assert writer.push(5, b"hello", 99)
            reader = reader_for(seg, 2)
            assert read_records(reader, 10) == [(5, b"hello", 99)]
            reader.release()
            del writer, reader
        finally:
            other.close()
        # The attacher does not remove the segment; the creator does.
        assert shm_path(seg.name).exists()


def test_attach_missing_name() -> None:
    name = unique_name()
    with pytest.raises(SegmentError) as info:
        Segment.attach(name)
    assert str(SHM_DIR / name) in str(info.value)


def test_create_existing_name_keeps_it() -> None:
    with named_segment(SMALL) as seg:
        with pytest.raises(SegmentError) as info:
            Segment.create(SMALL, seg.name)
        assert str(shm_path(seg.name)) in str(info.value)
        assert shm_path(seg.name).exists()
        other = Segment.attach(seg.name)
        try:
            assert other.layout == seg.layout
        finally:
            other.close()


@contextmanager
def shm_file(data: bytes) -> Iterator[str]:
    name = unique_name()
    path = shm_path(name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        yield name
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("size", [100, 4096, 65536], ids=["tiny", "header", "larger"])
def test_attach_rejects_what_is_not_a_segment(size: int) -> None:
    """A zero-filled file, e.g. a segment whose creator has not written its header yet."""
    with shm_file(bytes(size)) as name:
        with pytest.raises(SegmentError) as info:
            Segment.attach(name)
        assert str(shm_path(name)) in str(info.value)


def test_attach_rejects_wrong_size() -> None:
    with named_segment(SMALL) as seg:
        os.truncate(shm_path(seg.name), seg.layout.size + 4096)
        with pytest.raises(SegmentError, match="bytes"):
            Segment.attach(seg.name)


def _claim_and_report(seg: Segment, check_own: bool, out: int) -> int:
    lane = seg.claim_lane(os.getpid())
    if check_own:
        owned = seg.lane_owner(lane) == os.getpid()
        os.write(out, b"1" if owned else b"0")
    os.write(out, bytes([255 if lane is None else lane]))
    time.sleep(30)  # hold the lane until killed
    return 0


def test_claim_gives_distinct_lanes_and_none_when_full(kids: Kids) -> None:
    seg = Segment.create(SMALL)
    r, w = os.pipe()
    try:
        pids, lanes = [], []
        for _ in range(SMALL.lanes + 1):
            pids.append(kids.fork(_claim_and_report, seg, False, w))
            lanes.append(os.read(r, 1)[0])
        assert lanes == [0, 1, 2, 255]
        owners = [seg.lane_owner(lane) for lane in range(SMALL.lanes)]
        assert owners == pids[: SMALL.lanes]
        os.kill(pids[0], signal.SIGKILL)
        assert kids.wait(pids[0]) == -signal.SIGKILL
        assert seg.lane_owner(0) is None
        # Dead but not reclaimed: a new producer must not take it yet.
        kids.fork(_claim_and_report, seg, False, w)
        assert os.read(r, 1)[0] == 255
        assert [x.lane for x in LaneReclaimer(seg).scan()] == [0]
        kids.fork(_claim_and_report, seg, False, w)
        assert os.read(r, 1)[0] == 0
    finally:
        os.close(r)
        os.close(w)
        seg.close()


def test_lane_owner_asked_by_the_owner_keeps_the_claim(kids: Kids) -> None:
    """The owner asking about its own lane must see it owned and keep it."""
    seg = Segment.create(SMALL)
    r, w = os.pipe()
    try:
        kids.fork(_claim_and_report, seg, True, w)
        owned, lane = read_exact(r, 2)
        assert lane == 0
        # Another process must not get the same lane.
        kids.fork(_claim_and_report, seg, False, w)
        second = os.read(r, 1)[0]
        assert (owned, second) == (ord("1"), 1), (
            f"lane_owner in the owner said {chr(owned)} and the next claim got lane {second}"
        )
    finally:
        os.close(r)
        os.close(w)
        seg.close()
