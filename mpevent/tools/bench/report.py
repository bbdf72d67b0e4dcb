"""The report: the targets with their verdicts, every section's table as printed, the JSON.

:func:`targets` turns the figures into the project's goals, each with its
measured ratio and PASS, MISS or n/a (a section that did not run is not a
failure); :func:`render_report` is the text ``mpevent bench`` prints;
:func:`write_json` writes the results as they are (what ``--json`` gives).
Tables and number formats are :mod:`mpevent.tools.figures`'s, shared with
the CLI and the demo. Pure code: figures in, text out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from mpevent.tools.bench.config import PIPELINE_LABELS
from mpevent.tools.figures import (
    fmt_bytes,
    fmt_num,
    fmt_ratio,
    fmt_us,
    format_table,
    is_missing,
    ratio,
)

PROFILE_ROLES = ("producer", "sender", "sink")


def verdict(value: float | None, op: str, limit: float, ok: bool = True) -> str:
    """PASS when ``value op limit`` holds (and ``ok``), MISS when not, n/a without a value."""
    if is_missing(value):
        return "n/a"
    if op == "<=":
        passed = value <= limit
    elif op == ">=":
        passed = value >= limit
    else:
        raise ValueError(f"unknown comparison {op!r}")
    return "PASS" if passed and ok else "MISS"


def target(
    name: str, value: float | None, op: str, limit: float, figure: str, ok: bool = True, note=""
) -> dict[str, Any]:
    """One target line: the measured ratio, the goal, the verdict."""
    return {
        "target": name,
        "figure": figure,
        "ratio": value,
        "goal": f"{op} {limit:g}",
        "verdict": verdict(value, op, limit, ok),
        "note": note,
    }


def fmt_loss(delivered: int, raised: int) -> str:
    """``delivered/raised`` and the share lost."""
    lost = 1 - delivered / raised if raised else 0.0
    return f"{delivered}/{raised} ({lost:.2%} lost)"


def render_cpu_profile(summary: Sequence[dict[str, Any]], producers: int = 2) -> str:
    """Where the CPU goes, per delivered event, in the end-to-end runs with
    ``producers`` producers: on two cores every pipeline is bound by the sum."""
    rows = []
    for r in summary:
        if r["producers"] != producers and not r["pipeline"].startswith("bare"):
            continue
        cpu = r.get("cpu_us_per_event") or {}
        total = sum(v for v in cpu.values() if not is_missing(v))
        rows.append(
            [
                PIPELINE_LABELS[r["pipeline"]],
                "" if r["pipeline"].startswith("bare") else r["senders"],
                *(fmt_num(cpu.get(role), 2) if role in cpu else "" for role in PROFILE_ROLES),
                fmt_num(total, 2),
                fmt_num(2e6 / total) if total else None,
            ]
        )
    return format_table(
        ["pipeline", "send", *PROFILE_ROLES, "total", "2 cores / total"],
        rows,
        align="lrrrrrr",
        rule=True,
        title=(
            f"   CPU per delivered event, us (user + system, each process's own), "
            f"{producers} producers; the last column is the rate two fully used cores allow"
        ),
    )


def find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured ratio and PASS/MISS (n/a when not run)."""
    out = []
    cost = results.get("producer_cost", {}).get("cases", {})

    def med(case: str) -> float | None:
        return cost[case]["median"] if case in cost else None

    one, inline, none, many = med("raise_1"), med("inline"), med("raise_0"), med("raise_64")
    out.append(
        target(
            "raise_event 1 subscriber median <= 0.4 x inline",
            ratio(one, inline),
            "<=",
            0.4,
            f"{fmt_num(one)} ns vs {fmt_num(inline)} ns",
        )
    )
    out.append(
        target(
            "raise_event no subscriber median <= 0.05 x inline",
            ratio(none, inline),
            "<=",
            0.05,
            f"{fmt_num(none)} ns vs {fmt_num(inline)} ns",
        )
    )
    out.append(
        target(
            "raise_event 64 subscribers <= 1.1 x 1 subscriber",
            ratio(many, one),
            "<=",
            1.1,
            f"{fmt_num(many)} ns vs {fmt_num(one)} ns",
        )
    )
    e2e = results.get("end_to_end", {}).get("summary", [])
    mine = find(e2e, pipeline="mpevent", producers=2, senders=1)
    lossless = bool(mine) and mine["lost"] == 0
    for base, limit in (("mp_queue", 3.0), ("faster_fifo", 2.0)):
        other = find(e2e, pipeline=base, producers=2, senders=1)
        out.append(
            target(
                f"end-to-end 2 producers 1 sender >= {limit:g} x {PIPELINE_LABELS[base]}, 0 loss",
                ratio(mine["rate"], other["rate"]) if mine and other else None,
                ">=",
                limit,
                f"{fmt_num(mine and mine['rate'])} vs {fmt_num(other and other['rate'])} ev/s"
                + (f", mpevent lost {mine['lost']}" if mine else ""),
                ok=lossless,
                note="" if other or not mine else f"{base} not run",
            )
        )
    bare = find(e2e, pipeline="bare")
    one_sender = [r for r in e2e if r["pipeline"] == "mpevent" and r["senders"] == 1]
    best = max(one_sender, key=lambda r: r["rate"]) if one_sender else None
    out.append(
        target(
            "one sender's delivered rate >= 0.7 x bare sendto loop",
            ratio(best["rate"], bare["send_rate"]) if best and bare else None,
            ">=",
            0.7,
            (
                f"{fmt_num(best['rate'])} ev/s ({best['producers']} producers) vs "
                f"{fmt_num(bare['send_rate'])}/s"
                if best and bare
                else "-"
            ),
        )
    )
    lat = results.get("latency", {}).get("loads", [])
    half = find(lat, load=0.5)
    p99_ms = half["p99_ns"] / 1e6 if half else None
    out.append(
        target(
            "latency at 50% of capacity p99 <= 1 ms",
            p99_ms,
            "<=",
            1.0,
            f"p99 {fmt_us(half['p99_ns'])} us" if half else "-",
            ok=bool(half) and half["delivered"] == half["raised"],
        )
    )
    return out


def render_report(results: dict[str, Any]) -> str:
    """Every section's table and the targets, as printed."""
    meta = results["meta"]
    parts = [
        f"mpevent benchmark ({meta['mode']}): {meta['cpus']} CPUs, Python {meta['python']}, "
        f"{meta['platform']}; {meta['seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in meta['section_seconds'].items())})"
    ]
    background = meta.get("other_cores") or {}
    if any(v is not None for v in background.values()):
        parts[0] += "\nCPU kept busy by other processes meanwhile (cores, average): " + ", ".join(
            f"{k} {v:.2f}" for k, v in background.items() if v is not None
        )
    speed = meta.get("python_ns_per_step")
    if speed:
        parts[0] += (
            f"\nmachine speed (a fixed pure-Python loop, ns per step; lower is faster): "
            f"{speed[0]:.1f} at the start, {speed[1]:.1f} at the end"
        )
    parts[0] += "".join(f"\nnote: {n}" for n in results["notes"])

    cost = results.get("producer_cost")
    if cost:
        rows = []
        order = [f"raise_{n}" for n in (0, 1, 8, 64)] + ["inline", "mp_queue", "faster_fifo"]
        for case in order:
            c = cost["cases"].get(case)
            if c is None:
                continue
            rows.append(
                [
                    c["label"],
                    fmt_num(c["median"]),
                    fmt_num(c["p99"]),
                    fmt_ratio(c["x_inline"], 3),
                    fmt_num(c["cpu_ns"]),
                ]
            )
        t = cost["cases"]["timer"]
        rows.append([t["label"], fmt_num(t["median"]), fmt_num(t["p99"]), "", fmt_num(t["cpu_ns"])])
        parts.append(
            format_table(
                ["case", "median ns", "p99 ns", "x inline", "CPU ns/call"],
                rows,
                align="lrrrr",
                rule=True,
                title=(
                    f"1. producer cost per call ({cost['rounds']} rounds x "
                    f"{cost['calls_per_round']} calls per case, each call timed)"
                ),
            )
        )
        bt = cost["bus_totals"]
        parts[-1] += (
            f"\n  mpevent: enqueued {bt['enqueued']}, dropped {bt['dropped']}, "
            f"no_subscriber {bt['no_subscriber']}, dispatched {bt['dispatched']}"
        )

    e2e = results.get("end_to_end")
    if e2e:
        rows = []
        for r in e2e["summary"]:
            if r["pipeline"].startswith("bare"):
                continue
            bus = r.get("bus_totals")
            rows.append(
                [
                    PIPELINE_LABELS[r["pipeline"]],
                    r["producers"],
                    r["senders"],
                    fmt_num(r["rate"]),
                    fmt_ratio(r["x_mp_queue"]) if r["pipeline"] != "mp_queue" else "",
                    fmt_ratio(r["x_faster_fifo"]) if r["pipeline"] == "mpevent" else "",
                    fmt_loss(r["delivered"], r["raised"]),
                    bus["dropped"] if bus else "",
                ]
            )
        parts.append(
            format_table(
                [
                    "pipeline",
                    "prod",
                    "send",
                    "events/s",
                    "x Queue",
                    "x ff",
                    "delivered/raised",
                    "retries",
                ],
                rows,
                title=(
                    f"2. end to end, 1 UDP subscriber ({e2e['rounds']} round(s) x "
                    f"{e2e['events_per_run']} events per case; median events/s)"
                ),
                align="lrrrrrrr",
                rule=True,
            )
        )
        for r in e2e["summary"]:
            if r["pipeline"].startswith("bare"):
                parts[-1] += (
                    f"\n  {PIPELINE_LABELS[r['pipeline']]} (1 process, prebuilt datagram): "
                    f"sends {fmt_num(r['send_rate'])}/s, sink got {fmt_num(r['rate'])}/s, "
                    f"{fmt_loss(r['delivered'], r['raised'])}"
                )
        total = find(e2e["summary"], pipeline="mpevent", producers=2, senders=1)
        if total:
            bt = total["bus_totals"]
            parts[-1] += (
                "\n  mpevent 2p/1s counters: "
                + ", ".join(
                    f"{k} {bt[k]}" for k in ("raised", "enqueued", "dropped", "dispatched", "lost")
                )
                + " (dropped = lane-full retries)"
            )
        parts.append(render_cpu_profile(e2e["summary"]))

    fan = results.get("fanout")
    if fan:
        rows = []
        for n in sorted({r["subscribers"] for r in fan["summary"]}):
            m = find(fan["summary"], pipeline="mpevent", subscribers=n)
            b = find(fan["summary"], pipeline="bare", subscribers=n)
            rows.append(
                [
                    n,
                    fmt_num(m and m["rate"]),
                    fmt_num(b and b["send_rate"]),
                    fmt_ratio(m and m.get("x_bare")),
                    f"{m['delivered']}/{m['expected']}" if m else "-",
                    f"{b['delivered']}/{b['expected']}" if b else "-",
                ]
            )
        parts.append(
            format_table(
                [
                    "subscribers",
                    "mpevent dgram/s",
                    "bare sendto/s",
                    "x bare",
                    "mpevent delivered",
                    "bare delivered",
                ],
                rows,
                align="lrrrrr",
                rule=True,
                title=(
                    f"3. fan-out, 1 producer, 1 sender, one selectors sink "
                    f"({fan['rounds']} round(s) x {fan['datagrams_per_run']} datagrams)"
                ),
            )
        )

    lat = results.get("latency")
    if lat:
        rows = [
            [
                f"{r['load']:.0%}",
                fmt_num(r["target_rate"]),
                fmt_num(r["achieved_rate"]),
                fmt_us(r["p50_ns"]),
                fmt_us(r["p99_ns"]),
                fmt_us(r["p999_ns"]),
                fmt_us(r["max_ns"]),
                f"{r['delivered']}/{r['raised']}",
                " / ".join(fmt_us(run["p99_ns"]) for run in r["runs"]),
                fmt_num(r["send_age_p99_us"]),
                fmt_num(r["busy_cores"], 2),
                fmt_num(r["other_cores"], 2),
            ]
            for r in lat["loads"]
        ]
        parts.append(
            format_table(
                [
                    "load",
                    "target ev/s",
                    "achieved",
                    "p50 us",
                    "p99 us",
                    "p99.9 us",
                    "max us",
                    "delivered",
                    "p99 us per round",
                    "raise-to-send p99 <=",
                    "cores busy",
                    "other load",
                ],
                rows,
                align="l" + "r" * 11,
                rule=True,
                title=(
                    f"4. raise-to-receive latency, 1 producer 1 sender "
                    f"(capacity {fmt_num(lat['capacity'])} ev/s, {lat['seconds_per_load']:g} s "
                    f"per load and round)"
                ),
            )
        )

    mem = results.get("memory")
    if mem:
        rows = [
            [
                PIPELINE_LABELS.get(r["pipeline"], r["pipeline"]),
                r["role"],
                r["processes"],
                fmt_bytes(r["peak_rss"]),
                fmt_bytes(r["peak_uss"]),
            ]
            for r in mem["roles"]
        ]
        parts.append(
            format_table(
                ["pipeline", "role", "processes", "peak RSS", "peak USS"],
                rows,
                title=(
                    f"5. memory: peak per process and role; mpevent segment "
                    f"{fmt_bytes(mem['segment_bytes'])} ({mem['segment_bytes']} bytes: "
                    f"{mem['geometry']})"
                ),
                align="llrrr",
                rule=True,
            )
        )

    rows = [
        [t["target"], t["figure"], fmt_ratio(t["ratio"], 3), t["goal"], t["verdict"]]
        for t in results["targets"]
    ]
    parts.append(
        format_table(
            ["target", "figures", "ratio", "goal", "verdict"],
            rows,
            align="llrll",
            rule=True,
            title="targets",
        )
    )
    return "\n\n".join(parts)


def write_json(results: dict[str, Any], path: str) -> None:
    """The results, indented, as ``--json`` writes them."""
    with open(path, "wb") as f:
        f.write(orjson.dumps(results, option=orjson.OPT_INDENT_2))
