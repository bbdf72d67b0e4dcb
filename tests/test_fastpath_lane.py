"""The C lane (``_fastpath.Lane``) against ``LaneWriter``, and against random words.

* the same pushes, reads and releases on a C lane and a Python lane give the
  same bytes, results and tails (hypothesis drives them, on garbage memory);
* random tail and head words never make a push write outside the lane (in a
  forked child: a crash fails the test, not the run);
* a geometry outside the buffer is refused when the lane is made.

Skipped when the extension is not in use (the pure pass of ``make test``).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import Kids

from mpevent.processes import fastpath
from mpevent.shm.layout import L_HEAD, L_TAIL
from mpevent.shm.ring import LaneReader, LaneWriter

pytestmark = pytest.mark.skipif(
    not fastpath.COMPILED, reason=f"the compiled path is not in use: {fastpath.REASON}"
)


def _fuzz_lane_words(seed: int) -> int:
    """In a forked child: random words for tail and head; no write may leave the lane."""
    ext = fastpath.extension
    rng = random.Random(seed)
    size, data_at = 512, 4096
    arr = bytearray(rng.randbytes(data_at + size + 4096))
    buf = memoryview(arr)
    words = buf.cast("Q")
    for _ in range(3000):
        words[L_TAIL] = rng.choice(
            [rng.getrandbits(64), rng.getrandbits(12), rng.getrandbits(12) * 8]
        )
        words[L_HEAD] = rng.choice(
            [rng.getrandbits(64), (words[L_TAIL] - rng.getrandbits(10)) % (1 << 64), 0]
        )
        before = bytes(arr)
        lane = ext.Lane(buf, words, 0, data_at, size)
        for _ in range(4):
            lane.push(rng.randrange(0, 65536), rng.randbytes(rng.randrange(0, 600)), 1)
        after = bytes(arr)
        if (
            after[8:data_at] != before[8:data_at]
            or after[data_at + size :] != before[data_at + size :]
        ):
            return 1
    return 0


@pytest.mark.parametrize("seed", range(3))
def test_random_tail_and_head_never_write_outside_the_lane(kids: Kids, seed: int) -> None:
    assert kids.wait(kids.fork(_fuzz_lane_words, seed), 60) == 0


def test_lane_refuses_geometry_outside_its_buffer() -> None:
    buf = memoryview(bytearray(8192))
    words = buf.cast("Q")
    lane = fastpath.extension.Lane
    for args in [(0, 4096, 8192), (0, 4100, 1024), (0, 0, 1000), (1020, 0, 4096), (-1, 0, 4096)]:
        with pytest.raises(ValueError):
            lane(buf, words, *args)
    with pytest.raises(ValueError):
        lane(buf, memoryview(bytearray(8192)).cast("Q"), 0, 4096, 4096)  # other memory
    with pytest.raises(ValueError):
        lane(buf, words, 0, 4096, 4096).push(1 << 16, b"", 0)


# -- Lane against LaneWriter ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    size=st.sampled_from([256, 512, 4096]),
    start=st.one_of(st.just(0), st.integers(0, 1 << 40).map(lambda k: k * 8)),
    seed=st.integers(0, 2**32 - 1),
)
def test_lane_matches_lane_writer(size: int, start: int, seed: int) -> None:
    """The same pushes, reads and releases on a C lane and a Python lane: the same bytes."""
    rng = random.Random(seed)
    garbage = rng.randbytes(4096 + size + 512)  # the ring must not rely on zeroed memory
    ends = []
    for writer_class in (fastpath.extension.Lane, LaneWriter):
        arr = bytearray(garbage)
        buf = memoryview(arr)
        words = buf.cast("Q")
        words[L_TAIL] = words[L_HEAD] = start
        ends.append(
            (
                arr,
                words,
                writer_class(buf, words, 0, 4096, size),
                LaneReader(buf, words, 0, 4096, size),
            )
        )
    for _ in range(200):
        op = rng.random()
        if op < 0.7:
            n = rng.choice([rng.randrange(0, 64), rng.randrange(0, size), size - 16, size - 15])
            args = (rng.randrange(0, 65536), rng.randbytes(n), rng.getrandbits(64))
            assert ends[0][2].push(*args) is ends[1][2].push(*args)
        elif op < 0.9:
            limit = rng.randrange(0, 8)
            spans = [reader.read_span(limit, 1 << 16) for _, _, _, reader in ends]
            assert spans[0][0] == spans[1][0]
        else:
            for _, _, _, reader in ends:
                reader.release()
        assert ends[0][0] == ends[1][0]
        assert ends[0][2].tail == ends[1][2].tail
        if rng.random() < 0.05:  # a new owner continues from the published tail
            ends = [(a, w, type(lw)(memoryview(a), w, 0, 4096, size), rd) for a, w, lw, rd in ends]
