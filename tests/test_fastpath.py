"""The compiled fast path against the pure-Python reference, over real shared memory.

* a compiled and a pure :class:`Producer` on one segment (two lanes, no hub:
  the test writes the event names and subscriber counts the hub would): the
  same calls give the same lane bytes (timestamps aside), counters, return
  values, exception types and messages, through full lanes, wrap-around,
  oversize, bad params, NaN, no subscriber, hub gone, the doorbell, a closed
  segment;
* the common path runs no Python function; threads raising at once and
  forks; a corrupt tail or head makes a compiled call refuse and count, in a
  forked child so a crash fails the test and not the run.

``test_fastpath_lane.py`` compares the C lane with ``LaneWriter`` and feeds it
random words; ``test_fastpath_build.py`` builds without a compiler.

In the pure pass of ``make test`` (``MPEVENT_NO_EXTENSIONS=1``) the tests
that need the extension are skipped; the others run on the pure path.
"""

from __future__ import annotations

import enum
import math
import os
import random
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import Kids, forks_from_threads

from mpevent.processes import fastpath
from mpevent.processes.producer import Producer, UnknownEvent
from mpevent.protocol.registry import Registry
from mpevent.shm.doorbell import Doorbell
from mpevent.shm.layout import (
    COUNTER_WORDS,
    FLAG_WRAP,
    H_HUB_PID,
    HUB_GONE,
    L_HEAD,
    L_TAIL,
    MAGIC,
    P_DROPPED,
    RECORD_HEADER_BYTES,
    S_SLEEPING,
    Geometry,
)
from mpevent.shm.ring import LaneReader
from mpevent.shm.segment import Segment
from mpevent.shm.table import store_registry

needs_compiled = pytest.mark.skipif(
    not fastpath.COMPILED, reason=f"the compiled path is not in use: {fastpath.REASON}"
)
PATHS = [pytest.param(True, marks=needs_compiled, id="compiled"), pytest.param(False, id="pure")]
EVENTS = ("E_ONE", "E_TWO", "E_IDLE", "E_GONE")
SMALL = Geometry(lanes=4, lane_size=1 << 12, senders=1, max_events=8, max_subs=8, table_bytes=4096)
# Lanes large enough for a params body over the 65457-byte datagram limit.
LARGE = Geometry(lanes=2, lane_size=1 << 17, senders=1, max_events=8, max_subs=8, table_bytes=4096)
PARAMS = {"ip": "192.168.2.11", "n": 1}


class Rig:
    """A segment with EVENTS declared and no hub: the test sets the subscriber counts."""

    def __init__(self, geometry: Geometry = SMALL) -> None:
        self.seg = Segment.create(geometry)
        self.words = self.seg.words
        self.layout = self.seg.layout
        self.bell = Doorbell.anonymous()
        self._walked: dict[int, tuple[int, list[int]]] = {}  # lane_image's progress
        registry = Registry(geometry.max_events, geometry.max_subs)
        for name in EVENTS:
            registry.declare(name)
        store_registry(self.seg, registry, 0)
        self.subscribe("E_ONE", "E_TWO", "E_GONE")
        self.words[self.layout.sub_count_word(EVENTS.index("E_GONE"))] = HUB_GONE

    def subscribe(self, *events: str, count: int = 1) -> None:
        for name in events:
            self.words[self.layout.sub_count_word(EVENTS.index(name))] = count

    def producer(self, compiled: bool, **kw: Any) -> Producer:
        return Producer(self.seg, [self.bell], compiled=compiled, **kw)

    def counters(self, producer: Producer) -> list[list[int]]:
        at = self.layout.prod_counter_word(producer.lane, 0)
        n = len(EVENTS) * COUNTER_WORDS
        return [list(self.words[at + i : at + i + COUNTER_WORDS]) for i in range(0, n, 8)]

    def lane_image(self, producer: Producer) -> tuple[int, bytes]:
        """The lane's published tail and bytes, every raise time still in them zeroed.

        Walks the records published since the last call (call it before the
        lane can wrap over them): a raise time is still in the bytes while its
        position is within the last ``lane_size`` bytes below the tail.
        """
        lane, size = producer.lane, self.layout.geometry.lane_size
        tail = self.words[self.layout.lane_word(lane) + L_TAIL]
        data = bytearray(self.seg.buf[self.layout.lane_data(lane) :][:size])
        pos, stamps = self._walked.get(lane, (0, []))
        while pos < tail:
            off, to_end = pos % size, size - pos % size
            header = int.from_bytes(data[off : off + 8], sys.byteorder)
            if to_end < RECORD_HEADER_BYTES or header >> 48 & FLAG_WRAP:
                pos += to_end
                continue
            stamps.append(pos + 8)
            pos += (RECORD_HEADER_BYTES + (header & 0xFFFFFFFF) + 7) & ~7
        self._walked[lane] = (pos, stamps)
        for at in stamps:
            if at >= tail - size:
                data[at % size : at % size + 8] = bytes(8)
        return tail, bytes(data)

    def reader(self, producer: Producer) -> LaneReader:
        lane = producer.lane
        return LaneReader(
            self.seg.buf,
            self.words,
            self.layout.lane_word(lane),
            self.layout.lane_data(lane),
            self.layout.geometry.lane_size,
        )

    def close(self) -> None:
        self.bell.close()
        self.seg.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def outcome(call: Callable[[], Any]) -> Any:
    try:
        return ("returned", call())
    except Exception as exc:
        return (type(exc), str(exc))


class Pair:
    """The same calls on a compiled and a pure producer, compared as they go."""

    def __init__(self, rig: Rig, **kw: Any) -> None:
        self.rig = rig
        self.compiled = rig.producer(True, **kw)
        self.pure = rig.producer(False, **kw)
        self.both("E_ONE", {"first": "claims the lane"})

    def both(self, *args: Any, **kwargs: Any) -> Any:
        got = outcome(lambda: self.compiled.raise_event(*args, **kwargs))
        want = outcome(lambda: self.pure.raise_event(*args, **kwargs))
        assert got == want, f"raise_event{args}{kwargs}: compiled {got}, pure {want}"
        return want

    def check_state(self) -> None:
        r = self.rig
        assert r.counters(self.compiled) == r.counters(self.pure)
        assert r.lane_image(self.compiled) == r.lane_image(self.pure)
        assert self.compiled.undelivered == self.pure.undelivered


class Sneaky(enum.Enum):
    """orjson reads an Enum's value through the property, Python code run inside dumps."""

    A = 1

    @enum.property
    def value(self) -> int:  # type: ignore[override]
        Sneaky.hook()
        return self._value_

    @staticmethod
    def hook() -> None:
        pass


BAD_PARAMS = [
    {"x": math.nan},
    {"x": [1, {"y": -math.inf}]},
    {"x": object()},
    {1: 2},
    {"big": 1 << 70},
    5,
    "text",
    b"bytes",
    {"x"},
]
GOOD_PARAMS = [None, {}, [], (), [1, "two"], ("t",), {"a": None}, {"e": 'é\n"\x01'}, PARAMS]


@needs_compiled
def test_same_results_counters_and_bytes_as_the_pure_path(rig: Rig) -> None:
    pair = Pair(rig)
    for params in GOOD_PARAMS + BAD_PARAMS:
        pair.both("E_ONE", params)
        pair.both("E_TWO", params=params)
    pair.both("E_TWO", {"s": Sneaky.A})
    pair.both("E_IDLE", PARAMS)  # nobody subscribed
    pair.both("E_IDLE")
    pair.both("E_GONE", PARAMS)  # the hub stopped
    assert pair.compiled.undelivered == 1
    for bad_call in [(), ("E_ONE", PARAMS, 3), (123,), (None,), ("",), ("a b",), ("E_NONE",)]:
        pair.both(*bad_call)
    pair.both("E_ONE", PARAMS, surprise=1)
    pair.both(type("Name", (str,), {})("E_TWO"), PARAMS)
    pair.both("E_ONE", type("Params", (dict,), {})(a=1))
    pair.check_state()
    assert pair.both("E_NONE", None)[0] is UnknownEvent


@needs_compiled
def test_entries_whose_counts_need_the_lock_go_to_the_reference(rig: Rig) -> None:
    """An entry with no idle word (no GIL, or no lane of its own when it was made):
    the compiled path neither counts nor pushes itself."""
    pair = Pair(rig)
    for producer in (pair.compiled, pair.pure):
        for name in ("E_ONE", "E_IDLE"):
            producer.raise_event(name, PARAMS)
            event_id, sub, counters, _, max_params = producer._fast[name]
            producer._fast[name] = (event_id, sub, counters, 0, max_params)
    slow = pair.compiled._slow_calls
    for _ in range(3):
        pair.both("E_IDLE", PARAMS)
        pair.both("E_ONE", PARAMS)
    assert pair.compiled._slow_calls == slow + 6
    assert rig.words[0] == MAGIC
    pair.check_state()


@needs_compiled
@pytest.mark.parametrize(
    "geometry, size", [(SMALL, SMALL.lane_size // 2 - 16), (LARGE, 65457)], ids=["lane", "datagram"]
)
def test_oversize_is_refused_alike(geometry: Geometry, size: int) -> None:
    """At the limit it fits; one byte more is refused with the pure path's error."""
    r = Rig(geometry)
    try:
        pair = Pair(r)
        fixed = len(orjson.dumps({"p": ""}))
        if geometry is LARGE:  # the limit is the datagram: its prefix and "}" count
            size -= len(b'{"jsonrpc":"2.0","method":"E_ONE","params":') + 1
        assert pair.both("E_ONE", {"p": "x" * (size - fixed)}) == ("returned", True)
        exc_type, message = pair.both("E_ONE", {"p": "x" * (size - fixed + 1)})
        assert issubclass(exc_type, ValueError), message
        pair.check_state()
        assert r.counters(pair.compiled)[0][2:4] == [1, 1]  # rejected, oversize
    finally:
        r.close()


@needs_compiled
def test_full_lane_and_wrap_around_alike(rig: Rig) -> None:
    pair = Pair(rig)
    readers = [rig.reader(p) for p in (pair.compiled, pair.pure)]
    rng = random.Random(7)
    for _ in range(40):
        for _ in range(rng.randrange(1, 12)):
            pair.both("E_ONE", {"pad": "x" * rng.randrange(0, 900)})
        limit = rng.randrange(0, 6)
        for reader in readers:  # the sender takes a few, the same on both
            reader.read_span(limit, 1 << 20)
            reader.release()
        pair.check_state()
    counts = rig.counters(pair.compiled)[0]
    assert counts[1] > 0 and counts[0] > 40, f"neither full nor wrapped: {counts}"


@needs_compiled
def test_doorbell_rung_when_the_sender_sleeps(rig: Rig) -> None:
    pair = Pair(rig)
    sleeping = rig.layout.sender_word(0) + S_SLEEPING
    os.set_blocking(rig.bell.read_fd, False)
    for producer in (pair.compiled, pair.pure):
        rig.bell.drain()
        assert producer.raise_event("E_ONE", PARAMS)
        with pytest.raises(BlockingIOError):
            os.read(rig.bell.read_fd, 8)  # awake: no syscall, no byte
        rig.words[sleeping] = 1
        assert producer.raise_event("E_ONE", PARAMS)
        assert os.read(rig.bell.read_fd, 8) == b"\x01"
        assert rig.words[sleeping] == 0
    closed = []
    for producer in (pair.compiled, pair.pure):
        producer._doorbell = Doorbell(-1, -1)  # closed: os.write fails with EBADF
        rig.words[sleeping] = 1
        closed.append(outcome(lambda p=producer: p.raise_event("E_ONE", PARAMS)))
    assert closed[0] == closed[1] and closed[0][0] is OSError, closed
    pair.check_state()


@needs_compiled
def test_drops_look_for_the_hub_as_the_pure_path_does(rig: Rig, kids: Kids) -> None:
    dead = kids.fork(lambda: 0)
    assert kids.wait(dead) == 0
    rig.words[H_HUB_PID] = dead  # the hub is gone: a full lane may mean nobody drains it
    calls = {True: 0, False: 0}
    compiled = rig.producer(True, on_hub_down=lambda: calls.__setitem__(True, calls[True] + 1))
    pure = rig.producer(False, on_hub_down=lambda: calls.__setitem__(False, calls[False] + 1))
    for producer in (compiled, pure):
        results = [producer.raise_event("E_ONE", {"pad": "x" * 1000}) for _ in range(20)]
        assert results.count(False) == 20 - 3, results
    assert calls == {True: 1, False: 1}  # rate-limited: at most one look per half second
    assert rig.counters(compiled) == rig.counters(pure)


@needs_compiled
def test_closed_segment_raises_alike() -> None:
    r = Rig()
    pair = Pair(r)
    r.close()  # the compiled lane's export keeps the mapping; close tolerates it
    assert pair.both("E_ONE", PARAMS)[0] is ValueError
    assert pair.both("E_IDLE", PARAMS)[0] is ValueError


def _memfd_mappings() -> int:
    return Path("/proc/self/maps").read_text().count("/memfd:mpevent")


@pytest.mark.parametrize("compiled", PATHS)
def test_mapping_goes_away_with_the_segment_and_producer(compiled: bool) -> None:
    before = _memfd_mappings()
    r = Rig()
    producer = r.producer(compiled)
    assert producer.raise_event("E_ONE", PARAMS)
    assert _memfd_mappings() == before + 1
    r.close()
    del producer, r  # no cycle holds the compiled lane: freed at once
    assert _memfd_mappings() == before


@needs_compiled
def test_no_python_code_runs_on_the_common_path(rig: Rig) -> None:
    pair = Pair(rig)
    ran: dict[bool, list[str]] = {}
    for compiled, producer in ((True, pair.compiled), (False, pair.pure)):
        producer.raise_event("E_IDLE", PARAMS)  # makes its entry
        calls: list[str] = []

        def tracer(frame: Any, event: str, arg: Any, calls: list[str] = calls) -> None:
            calls.append(frame.f_code.co_name)

        sys.settrace(tracer)
        try:
            for i in range(50):
                producer.raise_event("E_ONE", {"ip": "192.168.2.11", "n": i})
                producer.raise_event("E_IDLE", PARAMS)
                producer.raise_event("E_ONE")
        finally:
            sys.settrace(None)
        ran[compiled] = calls
    assert ran[True] == [], ran[True][:5]
    assert "raise_event" in ran[False]  # the tracer sees the pure path
    assert pair.compiled._slow_calls == 2  # the two first raises


@needs_compiled
def test_python_code_inside_dumps_that_closes_the_segment() -> None:
    """dumps may run Python code: the compiled path looks again before the lane."""
    r = Rig()
    pair = Pair(r)
    Sneaky.hook = staticmethod(r.seg.close)  # type: ignore[method-assign]
    try:
        got = outcome(lambda: pair.compiled.raise_event("E_ONE", {"s": Sneaky.A}))
    finally:
        Sneaky.hook = staticmethod(lambda: None)  # type: ignore[method-assign]
    assert got == outcome(lambda: pair.pure.raise_event("E_ONE", {"s": Sneaky.A}))
    assert got[0] is ValueError
    r.close()


# -- threads and fork --------------------------------------------------------------


@pytest.mark.parametrize("compiled", PATHS)
def test_threads_raising_at_once_interleave_no_push(rig: Rig, compiled: bool) -> None:
    """Some threads take the C path, some the Python one (list params, a null): every
    record arrives whole, in each thread's order, and the counters add up."""
    producer = rig.producer(compiled)
    producer.raise_event("E_ONE", {"t": -1, "i": 0})
    reader = rig.reader(producer)
    got: list[Any] = []
    done = threading.Event()

    def drain() -> None:
        while not done.is_set() or reader.pending():
            records, stretch, _ = reader.read_span(64, 1 << 20)
            got.extend(orjson.loads(bytes(stretch[at : at + n])) for _, at, n in records)
            reader.release()

    kinds = [
        lambda t, i: {"t": t, "i": i},
        lambda t, i: [t, i],
        lambda t, i: {"t": t, "i": i, "z": None},
    ]
    sent: dict[int, list[int]] = {t: [] for t in range(6)}

    def raiser(t: int) -> None:
        for i in range(1500):
            if producer.raise_event("E_ONE", kinds[t % 3](t, i)):
                sent[t].append(i)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        consumer = threading.Thread(target=drain)
        consumer.start()
        threads = [threading.Thread(target=raiser, args=(t,)) for t in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()
        consumer.join()
    finally:
        sys.setswitchinterval(interval)
    per_thread: dict[int, list[int]] = {t: [] for t in range(6)}
    for body in got[1:]:
        t, i = (body["t"], body["i"]) if isinstance(body, dict) else body
        per_thread[t].append(i)
    assert per_thread == sent
    enqueued, dropped = rig.counters(producer)[0][:2]
    assert enqueued == 1 + sum(map(len, sent.values())) and enqueued + dropped == 1 + 6 * 1500


def _child_raises(producer: Producer, parent_lane: int) -> int:
    if not producer.raise_event("E_ONE", {"from": "child"}):
        return 2
    return 10 + producer.lane if producer.lane != parent_lane else 3


@forks_from_threads
@pytest.mark.parametrize("compiled", PATHS)
def test_forked_child_gets_its_own_lane_while_a_thread_raises(
    rig: Rig, kids: Kids, compiled: bool
) -> None:
    """No lock is held across fork: a thread raising all along leaves the child free."""
    producer = rig.producer(compiled)
    assert producer.raise_event("E_ONE", PARAMS)
    lane = producer.lane
    stop = threading.Event()

    def raise_all_along() -> None:
        while not stop.is_set():
            producer.raise_event("E_TWO", PARAMS)

    thread = threading.Thread(target=raise_all_along)  # into a full lane, mostly
    thread.start()
    try:
        codes = [kids.wait(kids.fork(_child_raises, producer, lane), 20) for _ in range(3)]
    finally:
        stop.set()
        thread.join()
    assert all(code >= 10 for code in codes), codes  # each child: a lane that is not ours
    assert producer.lane == lane  # the parent kept its lane


# -- corrupt shared memory -----------------------------------------------------------


def _raise_over_corrupt_lane(word: int, corrupt: Callable[[int, int], int]) -> int:
    """In a forked child: a compiled producer over a lane whose tail or head is corrupt.

    A corrupt tail is one the next owner of the lane finds; a corrupt head one
    the producer finds when the lane is full and it looks at the sender's.
    """
    r = Rig()
    ctl = r.layout.lane_word(0)  # the first free lane: the one this producer claims
    size = r.layout.geometry.lane_size
    r.words[ctl + L_TAIL] = r.words[ctl + L_HEAD] = 1 << 20
    if word == L_TAIL:
        r.words[ctl + L_TAIL] = corrupt(1 << 20, size)
    producer = r.producer(True)
    if word == L_HEAD:
        while producer.raise_event("E_ONE", {"n": 0}):
            pass  # full for the records to come: the next ones look at the head
        r.words[ctl + L_HEAD] = corrupt(r.words[ctl + L_TAIL], size)
    dropped = r.counters(producer)[0][P_DROPPED] if producer.lane == 0 else 0
    results = [producer.raise_event("E_ONE", {"n": i}) for i in range(5)]
    if producer.lane != 0 or results != [False] * 5 or producer._lane.refused != 5:
        print(producer.lane, results, getattr(producer._lane, "refused", None), file=sys.stderr)
        return 1
    if r.counters(producer)[0][P_DROPPED] - dropped != 5:  # counted as dropped
        return 2
    r.words[ctl + L_HEAD] = r.words[ctl + L_TAIL] = producer._lane.tail = 1 << 21
    return 0 if producer.raise_event("E_ONE", PARAMS) else 3  # repaired: it pushes again


@needs_compiled
@pytest.mark.parametrize(
    "word, corrupt",
    [
        (L_TAIL, lambda tail, size: tail + 3),  # a tail no record leaves
        (L_TAIL, lambda tail, size: 1 << 63),  # far past the head
        (L_TAIL, lambda tail, size: tail + size + 8),  # more than a lane past the head
        (L_TAIL, lambda tail, size: tail - 8),  # behind the head
        (L_HEAD, lambda tail, size: tail + 8),  # past the tail
        (L_HEAD, lambda tail, size: (1 << 64) - 8),
        (L_HEAD, lambda tail, size: tail - size - 8),  # more released than a lane holds
    ],
)
def test_corrupt_tail_or_head_refuses_and_counts(
    kids: Kids, word: int, corrupt: Callable[[int, int], int]
) -> None:
    assert kids.wait(kids.fork(_raise_over_corrupt_lane, word, corrupt), 30) == 0
