"""mpevent.tools.figures: the one percentile, the number formats and the table
that the benchmark, the demo, the load test, the chaos tests and the CLI share."""

from __future__ import annotations

import math
import random

import pytest

from mpevent.tools import figures


def test_percentile_interpolates_between_ranks():
    values = list(range(1, 101))  # 1..100
    assert figures.percentile(values, 0) == 1
    assert figures.percentile(values, 100) == 100
    assert figures.percentile(values, 50) == pytest.approx(50.5)
    assert figures.percentile(values, 99) == pytest.approx(99.01)
    assert figures.percentile([5, 1, 3], 50) == 3  # unsorted input
    assert figures.percentile([7], 99.9) == 7
    assert math.isnan(figures.percentile([], 50))
    with pytest.raises(ValueError):
        figures.percentile([1, 2], 101)


def test_percentile_of_a_histogram_is_that_of_the_samples_it_stands_for():
    rng = random.Random(7)
    samples = [rng.choice((100, 200, 300, 1000, 5000)) for _ in range(997)]
    counts: dict[int, int] = {}
    for v in samples:
        counts[v] = counts.get(v, 0) + 1
    counts[400] = 0  # an empty bucket changes nothing
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert figures.percentile(counts, q) == pytest.approx(figures.percentile(samples, q)), q
    # Between two buckets the rank falls on: interpolated, as for samples.
    assert figures.percentile({10: 1, 20: 1}, 50) == pytest.approx(15)
    assert figures.percentile({10: 3, 20: 1}, 100) == 20
    assert math.isnan(figures.percentile({}, 50))
    assert math.isnan(figures.percentile({10: 0}, 50))
    with pytest.raises(ValueError):
        figures.percentile({10: 1}, -1)


def test_summarize():
    s = figures.summarize([110, 120, 130, 1000])
    assert s["n"] == 4
    assert s["min"] == 110 and s["max"] == 1000
    assert s["median"] == pytest.approx(125)
    assert s["mean"] == pytest.approx((110 + 120 + 130 + 1000) / 4)
    assert s["p99"] <= s["max"]
    empty = figures.summarize([])
    assert empty["n"] == 0 and math.isnan(empty["median"])
    assert figures.median([3, 1, 2]) == 2


def test_ratio_and_rate():
    assert figures.ratio(1, 4) == 0.25
    assert figures.ratio(None, 4) is None
    assert figures.ratio(1, 0) is None
    assert figures.ratio(math.nan, 1) is None
    assert figures.ratio(1, None) is None
    assert figures.per_second(300, 1.5) == pytest.approx(200)
    assert math.isnan(figures.per_second(5, 0))
    assert math.isnan(figures.per_second(5, -1.0))


def test_formatting():
    assert figures.fmt_num(1234567.4) == "1,234,567"
    assert figures.fmt_num(1234, 2) == "1,234.00"
    assert figures.fmt_num(None) == "-"
    assert figures.fmt_num(math.nan) == "-"
    assert figures.fmt_ratio(0.3456, 3) == "0.346x"
    assert figures.fmt_ratio(None) == "n/a"
    assert figures.fmt_us(1_234_567) == "1,234.6"
    assert figures.fmt_us(math.nan) == "-"
    assert figures.fmt_ms(1_234_567) == "1.23 ms"
    assert figures.fmt_ms(1_234_567, 3) == "1.235 ms"
    assert figures.fmt_ms(None) == "-"
    assert figures.fmt_bytes(3 << 20) == "3.0 MiB"
    assert figures.fmt_bytes(None) == "-"


def test_format_table_with_title_and_rule():
    text = figures.format_table(
        ["case", "ns", "note"],
        [["a", "1,000", None], ["longer", "5", "x"]],
        align="lrr",
        title="T",
        rule=True,
    )
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[1] == "case       ns  note"
    assert lines[2] == "------  -----  ----"
    assert lines[3] == "a       1,000     -"  # numbers right, None as "-"
    assert lines[4] == "longer      5     x"
    left = figures.format_table(["a", "b"], [["x", "y"]], align="ll")
    assert left.splitlines() == ["a  b", "x  y"]  # no title, no rule unless asked
    with pytest.raises(ValueError):
        figures.format_table(["a", "b"], [["only one"]])


def test_format_table_aligns_numbers_right_unless_told():
    table = figures.format_table(("ID", "NAME", "F"), [(0, "E_X", 1.5), (10, "E_LONGER", 2.25)])
    assert table.splitlines() == [
        "ID  NAME         F",
        " 0  E_X        1.5",
        "10  E_LONGER  2.25",
    ]
    # A bool is not a number; a column of mixed cells is left-aligned.
    flags = figures.format_table(("A", "B"), [(True, 1), (False, "x")])
    assert flags.splitlines() == ["A      B", "True   1", "False  x"]
