"""Pure helpers of mpevent.shm.counters: reading an age histogram."""

from __future__ import annotations

from mpevent.shm.counters import age_bound_us
from mpevent.shm.layout import AGE_BUCKETS


def hist(**buckets: int) -> list[int]:
    out = [0] * AGE_BUCKETS
    for key, n in buckets.items():
        out[int(key[1:])] = n
    return out


def test_empty_histogram_has_no_bound():
    assert age_bound_us([0] * AGE_BUCKETS, 0.99) is None


def test_bound_is_the_upper_end_of_the_bucket_holding_the_quantile():
    h = hist(b3=90, b10=9, b12=1)  # 90 under 8 us, 9 under 1024 us, 1 under 4096 us
    assert age_bound_us(h, 0.5) == 8
    assert age_bound_us(h, 0.9) == 8
    assert age_bound_us(h, 0.95) == 1024
    assert age_bound_us(h, 0.99) == 1024
    assert age_bound_us(h, 1.0) == 4096


def test_the_open_last_bucket_gives_its_lower_end():
    h = hist(b0=1, b15=99)
    assert age_bound_us(h, 0.5) == 1 << 14
    assert age_bound_us(h, 0.001) == 1  # the first event was under 1 us
