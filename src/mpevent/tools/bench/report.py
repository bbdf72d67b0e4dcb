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

from mpevent.tools.bench.config import PIPELINE_LABELS, PURE, THREAD_SENDERS
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


def fmt_compiled(compiled: bool | None) -> str:
    """``mpevent.COMPILED`` as printed: True, False, or n/a for a build without the choice."""
    return "n/a" if compiled is None else str(bool(compiled))


def fmt_senders(row: dict[str, Any]) -> Any:
    """The "send" column: the sender processes, "thread" for one in each producer."""
    if row["pipeline"].startswith("bare"):
        return ""
    return "thread" if row["senders"] == THREAD_SENDERS else row["senders"]


def fmt_x(value: float | None) -> str:
    """A ratio to another pipeline; blank where that pipeline has no run of this shape."""
    return "" if value is None else fmt_ratio(value)


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
                fmt_senders(r),
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


def path_suffixes(meta: dict[str, Any]) -> tuple[str | None, str | None]:
    """The case suffix of the compiled path's figures and of the pure path's (None:
    not measured). The default path's cases have none; the pure path's beside a
    compiled default have PURE."""
    if meta.get("compiled"):
        return "", (PURE if meta.get("pure_beside") else None)
    return None, ""


def _cost_targets(cost: dict[str, Any]) -> list[tuple[str, str, float, Any]]:
    """(name, op, limit, measure): ``measure(suffix)`` gives (ratio, figures, ok, note)."""

    def med(case: str) -> float | None:
        return cost[case]["median"] if case in cost else None

    def against(case: str, base: str, missing: str = "") -> Any:
        # A raise_event base is the same path's; any other is one case for both paths.
        def measure(sfx: str) -> tuple[float | None, str, bool, str]:
            mine = med(f"{case}{sfx}")
            other = med(f"{base}{sfx}" if base.startswith("raise_") else base)
            note = missing if mine is not None and other is None else ""
            return ratio(mine, other), f"{fmt_num(mine)} ns vs {fmt_num(other)} ns", True, note

        return measure

    return [
        ("raise_event 1 subscriber <= 0.12 x inline", "<=", 0.12, against("raise_1", "inline")),
        (
            "raise_event 1 subscriber <= 0.3 x pyzmq send",
            "<=",
            0.3,
            against("raise_1", "pyzmq", "pyzmq not run"),
        ),
        (
            "raise_event 1 subscriber <= 3 x orjson.dumps alone",
            "<=",
            3.0,
            against("raise_1", "dumps"),
        ),
        ("raise_event no subscriber <= 0.02 x inline", "<=", 0.02, against("raise_0", "inline")),
        (
            "raise_event 64 subscribers <= 1.05 x 1 subscriber",
            "<=",
            1.05,
            against("raise_64", "raise_1"),
        ),
    ]


def _e2e_targets(e2e: list[dict[str, Any]]) -> list[tuple[str, str, float, Any]]:
    """The end-to-end targets, 2 producers and 1 sender, each lossless."""

    def against(base: str, limit: float) -> tuple[str, str, float, Any]:
        def measure(sfx: str) -> tuple[float | None, str, bool, str]:
            mine = find(e2e, pipeline=f"mpevent{sfx}", producers=2, senders=1)
            if base == "bare":
                other = find(e2e, pipeline="bare")
                rate = other and other["send_rate"]
            else:
                other = find(e2e, pipeline=base, producers=2, senders=1)
                rate = other and other["rate"]
            figure = f"{fmt_num(mine and mine['rate'])} vs {fmt_num(rate)} ev/s" + (
                f", mpevent lost {mine['lost']}" if mine else ""
            )
            note = "" if other or not mine else f"{base} not run"
            value = ratio(mine["rate"], rate) if mine and other else None
            return value, figure, bool(mine) and mine["lost"] == 0, note

        name = f"end-to-end 2 producers 1 sender >= {limit:g} x {PIPELINE_LABELS[base]}, 0 lost"
        return name, ">=", limit, measure

    return [
        against("faster_fifo", 3.0),
        against("mp_queue", 4.0),
        against("pyzmq", 2.0),
        against("bare", 1.3),
    ]


def _transport_targets(section: dict[str, Any]) -> list[tuple[str, str, float, Any]]:
    """Section 6's targets: each transport's delivered rate against its own raw
    loop (the default path only), and the producer's cost with a tcp: or
    rabbitmq: subscriber at most 10 % above a udp: one's (both paths; the
    producer never learns the transport, so a cheaper figure is noise)."""
    summary = section.get("summary", [])
    cost = section.get("producer_cost", {}).get("cases", {})
    ran = bool(section)

    def rate(transport: str, raw: str, what: str) -> tuple[str, str, float, Any]:
        def measure(sfx: str) -> tuple[float | None, str, bool, str]:
            mine = find(summary, pipeline=f"mpevent_{transport}")
            other = find(summary, pipeline=raw)
            if sfx or not mine or not other:
                note = f"{transport} not run" if ran and not sfx else ""
                return None, "-", True, note
            figure = (
                f"{fmt_num(mine['rate'])} vs {fmt_num(other['rate'])} ev/s, "
                f"mpevent lost {mine['lost']}"
            )
            return ratio(mine["rate"], other["rate"]), figure, mine["lost"] == 0, ""

        name = f"{transport}: delivered >= 0.8 x {what}, 0 lost"
        return name, ">=", 0.8, measure

    def same_cost(kind: str) -> tuple[str, str, float, Any]:
        def measure(sfx: str) -> tuple[float | None, str, bool, str]:
            mine, udp = cost.get(f"raise_1_{kind}{sfx}"), cost.get(f"raise_1_udp{sfx}")
            if not mine or not udp:
                return None, "-", True, f"{kind} not run" if ran and udp else ""
            figure = f"{fmt_num(mine['median'])} ns vs {fmt_num(udp['median'])} ns"
            return ratio(mine["median"], udp["median"]), figure, True, ""

        name = f"raise_event 1 {kind}: subscriber <= 1.1 x 1 udp: subscriber"
        return name, "<=", 1.1, measure

    return [
        rate("tcp", "bare_tcp", "a bare send loop of the same bytes"),
        rate("rabbitmq", "pika_select", "pika's own publish loop with confirms"),
        same_cost("tcp"),
        same_cost("rabbitmq"),
    ]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured ratio and PASS/MISS (n/a when not run).

    The verdicts are the compiled path's; ``pure`` is the same ratio for the
    pure-Python path, shown beside it. Without a compiled path the verdicts
    are n/a and the figures are the pure path's.
    """
    compiled, pure = path_suffixes(results.get("meta", {}))
    cost = results.get("producer_cost", {}).get("cases", {})
    e2e = results.get("end_to_end", {}).get("summary", [])
    out = []

    def add(name: str, op: str, limit: float, measure: Any) -> None:
        shown = compiled if compiled is not None else pure
        value, figure, ok, note = measure(shown)
        if compiled is None:
            value, figure = None, f"pure: {figure}"
            note = note or "compiled path not active"
        row = target(name, value, op, limit, figure, ok=ok, note=note)
        row["pure"] = measure(pure)[0] if pure is not None else None
        out.append(row)

    for args in [*_cost_targets(cost), *_e2e_targets(e2e)]:
        add(*args)
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
    out[-1]["pure"] = None
    for args in _transport_targets(results.get("transports", {})):
        add(*args)
    return out


TRANSPORT_ROLES = ("producer", "sender", "relay", "hub", "peer")


def render_transports(section: dict[str, Any]) -> str:
    """Section 6: each transport beside its raw loop, then the producer's cost per
    subscriber kind."""
    rows = []
    for r in section["summary"]:
        cpu = r["cpu_us_per_event"]
        raw = r["pipeline"] in ("bare_tcp", "pika_select")
        rows.append(
            [
                f"{r['transport']}:",
                r["label"],
                fmt_num(r["rate"]),
                "" if raw else fmt_ratio(r["x_raw"]),
                f"{r['delivered']}/{r['events']}",
                *(fmt_num(cpu.get(role), 2) if role in cpu else "" for role in TRANSPORT_ROLES),
                fmt_num(r["cpu_us_total"], 2),
                "" if raw else fmt_ratio(r["cpu_x_raw"]),
            ]
        )
    broker = section.get("broker") or "no broker"
    text = format_table(
        ["transport", "pipeline", "events/s", "x raw", "delivered", *TRANSPORT_ROLES, "total",
         "x raw"],
        rows,
        align="llrrr" + "r" * (len(TRANSPORT_ROLES) + 2),
        rule=True,
        title=(
            f"6. transports, against each one's raw loop ({section['rounds']} round(s); "
            f"tcp: {section['tcp_events']} events, rabbitmq: {section['broker_events']} events "
            f"to one queue of a private {broker}, window {section['window']}; median events/s, "
            "CPU us per delivered event; peer: the stream reader, or the broker)"
        ),
    )  # fmt: skip
    for r in section["summary"]:
        if r["transport"] == "tcp" and not r["bytes_ok"]:
            text += f"\n  {r['label']}: the reader did not get the exact bytes sent"
        if r["transport"] == "rabbitmq" and not r["in_queue_ok"]:
            text += f"\n  {r['label']}: messages in the queue after each run {r['in_queue']}"
    cost = section.get("producer_cost")
    if cost:
        rows = [
            [
                c["label"],
                fmt_num(c["median"]),
                fmt_num(c["p99"]),
                fmt_ratio(c.get("x_udp"), 3) if case != "timer" else "",
                fmt_num(c["cpu_ns"]),
            ]
            for case, c in cost["cases"].items()
        ]
        text += "\n\n" + format_table(
            ["case", "median ns", "p99 ns", "x udp", "CPU ns/call"],
            rows,
            align="lrrrr",
            rule=True,
            title=(
                f"   producer cost per call with 1 subscriber of each transport "
                f"({cost['rounds']} rounds x {cost['calls_per_round']} calls per case, timed as "
                f"in 1.)"
            ),
        )
    return text


def render_report(results: dict[str, Any]) -> str:
    """Every section's table and the targets, as printed."""
    meta = results["meta"]
    parts = [
        f"mpevent benchmark ({meta['mode']}): {meta['cpus']} CPUs, Python {meta['python']}, "
        f"{meta['platform']}; mpevent.COMPILED {fmt_compiled(meta.get('compiled'))}; "
        f"{meta['seconds']:.0f} s "
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
        mine = [f"raise_{n}" for n in (0, 1, 8, 64, "shared")]
        others = ["dumps", "pyzmq", "thread", "inline", "mp_queue", "faster_fifo"]
        for case in [*mine, *(f"{c}{PURE}" for c in mine), *others]:
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
        shared = cost.get("shared_lanes")
        if shared:
            parts[-1] += (
                f"\n  every lane owned ({shared['lanes']} lane, held by another process): "
                f"enqueued {shared['enqueued']}, dropped {shared['dropped']}"
                + (
                    "; refused: no shared lanes in this build, that row is a refusal's cost"
                    if shared["dropped"]
                    else ""
                )
            )

    e2e = results.get("end_to_end")
    if e2e:
        rows = []
        for r in e2e["summary"]:
            if r["pipeline"].startswith("bare"):
                continue
            bus = r.get("bus_totals")
            mpevent = r["pipeline"].startswith("mpevent")
            rows.append(
                [
                    PIPELINE_LABELS[r["pipeline"]],
                    r["producers"],
                    fmt_senders(r),
                    fmt_num(r["rate"]),
                    fmt_x(r["x_mp_queue"]) if r["pipeline"] != "mp_queue" else "",
                    fmt_x(r["x_faster_fifo"]) if mpevent else "",
                    fmt_x(r["x_pyzmq"]) if mpevent else "",
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
                    "x pyzmq",
                    "delivered/raised",
                    "retries",
                ],
                rows,
                title=(
                    f"2. end to end, 1 UDP subscriber ({e2e['rounds']} round(s) x "
                    f"{e2e['events_per_run']} events per case; median events/s)"
                ),
                align="lrrrrrrrr",
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

    tr = results.get("transports")
    if tr:
        parts.append(render_transports(tr))

    rows = [
        [
            t["target"],
            t["figure"],
            fmt_ratio(t["ratio"], 3),
            t["goal"],
            t["verdict"] + (f" ({t['note']})" if t["note"] else ""),
            "" if t["target"].startswith("latency") else fmt_ratio(t.get("pure"), 3),
        ]
        for t in results["targets"]
    ]
    parts.append(
        format_table(
            ["target", "figures", "ratio", "goal", "verdict", "pure path"],
            rows,
            align="llrllr",
            rule=True,
            title="targets: the verdicts are the compiled path's, the pure path's ratio beside",
        )
    )
    return "\n\n".join(parts)


def write_json(results: dict[str, Any], path: str) -> None:
    """The results, indented, as ``--json`` writes them."""
    with open(path, "wb") as f:
        f.write(orjson.dumps(results, option=orjson.OPT_INDENT_2))
