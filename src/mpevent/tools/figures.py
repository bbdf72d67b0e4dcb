"""Statistics and plain-text tables, written once for the CLI, the demo, the
benchmark, the load test and the tests.

* statistics: :func:`percentile` (of samples or of a histogram), :func:`median`,
  :func:`summarize`, :func:`ratio`, :func:`per_second`;
* numbers as text: :func:`fmt_num` (thousands separators), :func:`fmt_ratio`,
  :func:`fmt_us`, :func:`fmt_ms`, :func:`fmt_bytes`;
* :func:`format_table`: aligned columns, two spaces apart.

One percentile definition serves every figure mpevent prints: linear
interpolation between the closest ranks (numpy's default), so a p99 from the
benchmark, the demo, the load test's sink and the chaos tests means the
same thing. A missing figure is None or NaN; every formatter prints it as a
placeholder instead of failing. Pure code: no I/O, nothing mpevent-specific.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# -- statistics -----------------------------------------------------------------


def is_missing(x: float | None) -> bool:
    """A figure that was not measured: None or NaN."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def percentile(values: Iterable[float] | Mapping[float, int], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks (numpy's default).

    ``values`` are the samples in any order, or a histogram: a mapping of
    each value (a bucket) to how many samples had it, which stands for each
    value repeated that many times. NaN when there are no samples.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in 0..100, got {q}")
    if isinstance(values, Mapping):
        return _histogram_percentile(values, q)
    return _sorted_percentile(sorted(values), q)


def _rank(count: int, q: float) -> tuple[int, int, float]:
    """The two closest ranks to the ``q``-th percentile of ``count`` samples, and
    how far between them it lies."""
    pos = (count - 1) * q / 100
    lo = math.floor(pos)
    return lo, min(lo + 1, count - 1), pos - lo


def _sorted_percentile(data: Sequence[float], q: float) -> float:
    if not data:
        return math.nan
    lo, hi, frac = _rank(len(data), q)
    return data[lo] + (data[hi] - data[lo]) * frac


def _histogram_percentile(counts: Mapping[float, int], q: float) -> float:
    total = sum(counts.values())
    if total <= 0:
        return math.nan
    lo, hi, frac = _rank(total, q)
    low = high = math.nan
    seen = 0  # samples in the buckets below this one
    for value in sorted(counts):
        seen += counts[value]
        if math.isnan(low) and seen > lo:
            low = value
        if seen > hi:
            high = value
            break
    return low + (high - low) * frac


def median(values: Iterable[float]) -> float:
    return percentile(values, 50)


def summarize(values: Iterable[float]) -> dict[str, float]:
    """n, mean, median, p99, p99.9, min and max of ``values``
    (NaN for all but n when there are none)."""
    data = sorted(values)
    if not data:
        return {k: math.nan for k in ("median", "p99", "p999", "mean", "min", "max")} | {"n": 0}
    return {
        "n": len(data),
        "median": _sorted_percentile(data, 50),
        "p99": _sorted_percentile(data, 99),
        "p999": _sorted_percentile(data, 99.9),
        "mean": sum(data) / len(data),
        "min": data[0],
        "max": data[-1],
    }


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``; None when either is missing or the base is 0."""
    if is_missing(value) or is_missing(base) or base == 0:
        return None
    return value / base


def per_second(count: float, seconds: float) -> float:
    """``count`` per second over ``seconds``; NaN when no time went by."""
    return count / seconds if seconds > 0 else math.nan


# -- numbers as text --------------------------------------------------------------


def fmt_num(x: float | None, digits: int = 0) -> str:
    """A number with thousands separators; ``-`` for missing."""
    return "-" if is_missing(x) else f"{x:,.{digits}f}"


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    """``0.35x``; ``n/a`` for missing."""
    return "n/a" if is_missing(x) else f"{x:.{digits}f}x"


def fmt_us(ns: float | None) -> str:
    """Nanoseconds as microseconds, 1 decimal, thousands separators."""
    return "-" if is_missing(ns) else f"{ns / 1000:,.1f}"


def fmt_ms(ns: float | None, digits: int = 2) -> str:
    """Nanoseconds as ``1.23 ms``."""
    return "-" if is_missing(ns) else f"{ns / 1e6:.{digits}f} ms"


def fmt_bytes(n: float | None) -> str:
    """Bytes as MiB, 1 decimal."""
    return "-" if is_missing(n) else f"{n / (1 << 20):,.1f} MiB"


# -- tables ---------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    align: str = "",
    *,
    title: str | None = None,
    rule: bool = False,
) -> str:
    """Plain aligned columns, two spaces apart, no trailing blanks.

    ``align`` gives ``l``/``r`` per column; a column it leaves out is
    right-aligned when all its values are numbers, else left-aligned. None
    prints as ``-``, a float with ``:g`` (format figures before when their
    digits matter). ``title`` is a first line; ``rule`` underlines the
    headers with dashes.
    """
    rows = [list(row) for row in rows]
    width = len(headers)
    for row in rows:
        if len(row) != width:
            raise ValueError(f"row {row!r} has {len(row)} cells, expected {width}")
    sides = []
    for i in range(width):
        if i < len(align):
            sides.append(align[i])
        else:
            numeric = bool(rows) and all(is_number(row[i]) for row in rows)
            sides.append("r" if numeric else "l")
    text = [list(headers)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(line[i]) for line in text) for i in range(width)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(w) if side == "r" else cell.ljust(w)
            for cell, w, side in zip(cells, widths, sides, strict=True)
        ]
        return "  ".join(padded).rstrip()

    out = [] if title is None else [title]
    out.append(line(text[0]))
    if rule:
        out.append("  ".join("-" * w for w in widths))
    out.extend(line(cells) for cells in text[1:])
    return "\n".join(out)
