"""The benchmark: its verdicts and report, and a tiny run of every section end to end.

The statistics and tables it shares with the CLI and the demo are tested in
test_figures.py.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import orjson
import pytest
from support import forks_from_threads

from mpevent.protocol.payload import encode_notification
from mpevent.tools import bench
from mpevent.tools.bench import bodies, cost, extras, report, transports
from mpevent.tools.bench.config import DATAGRAM, EVENT, EVENT_BYTES, PARAMS, THREAD_SENDERS
from mpevent.tools.bench.e2e import split_evenly
from mpevent.tools.bench.plumbing import udp_socket
from mpevent.tools.bench.report import PROFILE_ROLES

# -- pure helpers --------------------------------------------------------------


def test_verdicts_and_targets():
    assert report.verdict(0.3, "<=", 0.4) == "PASS"
    assert report.verdict(0.4, "<=", 0.4) == "PASS"
    assert report.verdict(0.5, "<=", 0.4) == "MISS"
    assert report.verdict(3.5, ">=", 3) == "PASS"
    assert report.verdict(2.9, ">=", 3) == "MISS"
    assert report.verdict(3.5, ">=", 3, ok=False) == "MISS"  # e.g. it lost events
    assert report.verdict(None, ">=", 3) == "n/a"
    assert report.verdict(math.nan, ">=", 3) == "n/a"
    with pytest.raises(ValueError):
        report.verdict(1, "<", 2)
    t = report.target("x <= 0.4 inline", 0.25, "<=", 0.4, "1 vs 4")
    assert t == {
        "target": "x <= 0.4 inline",
        "figure": "1 vs 4",
        "ratio": 0.25,
        "goal": "<= 0.4",
        "verdict": "PASS",
        "note": "",
    }


def test_loss_and_split():
    assert report.fmt_loss(99, 100) == "99/100 (1.00% lost)"
    assert report.fmt_loss(0, 0) == "0/0 (0.00% lost)"
    assert split_evenly(10, 3) == [4, 3, 3]
    assert sum(split_evenly(12_001, 4)) == 12_001


def test_report_tables_are_titled_and_underlined():
    text = report.render_cpu_profile(
        [{"pipeline": "bare", "producers": 1, "senders": 1, "cpu_us_per_event": {"sink": 2.0}}]
    )
    title, header, rule, row = text.splitlines()
    assert title.startswith("   CPU per delivered event")
    assert header.startswith("pipeline") and row.startswith("bare sendto loop")
    assert set(rule) == {"-", " "} and len(rule) == len(header)
    # The last column is right-aligned: its figure ends where its header does.
    assert header.endswith("2 cores / total") and row.endswith(" 1,000,000")
    assert len(row) == len(header)


def _results(**sections):
    base = {
        "meta": {
            "mode": "test",
            "cpus": 2,
            "python": "3.11",
            "platform": "Linux",
            "seconds": 1.0,
            "section_seconds": {},
        },
        "notes": [],
    }
    return base | sections


def test_cpu_profile_table_sums_roles_and_keeps_the_chosen_producer_count():
    summary = [
        {"pipeline": "mpevent", "producers": 2, "senders": 1,
         "cpu_us_per_event": {"producer": 1.5, "sender": 3.5, "sink": 3.0}},
        {"pipeline": "mpevent", "producers": 4, "senders": 1,
         "cpu_us_per_event": {"producer": 9.0, "sender": 9.0, "sink": 9.0}},
        {"pipeline": "bare", "producers": 1, "senders": 1,
         "cpu_us_per_event": {"sender": 4.0, "sink": 1.0}},
    ]  # fmt: skip
    lines = report.render_cpu_profile(summary).splitlines()
    rows = [line.split() for line in lines[3:]]
    assert rows[0] == ["mpevent", "1", "1.50", "3.50", "3.00", "8.00", "250,000"]
    assert rows[1][-2:] == ["5.00", "400,000"]  # bare: no producer column value
    assert len(rows) == 2  # the 4-producer row is left out


def _cost_cases(**medians):
    return {"cases": {case: {"median": m} for case, m in medians.items()}}


def _e2e_row(pipeline, p, s, rate, lost=0, **extra):
    base = {"pipeline": pipeline, "producers": p, "senders": s, "rate": rate, "lost": lost}
    return base | extra


TARGET_COST = _cost_cases(
    raise_0=50.0, raise_1=300.0, raise_64=310.0, raise_0_pure=150.0, raise_1_pure=1500.0,
    raise_64_pure=1800.0, inline=4000.0, pyzmq=2000.0, dumps=100.0,
)  # fmt: skip
TARGET_E2E = {
    "summary": [
        _e2e_row("mpevent", 2, 1, 420_000.0),
        _e2e_row("mpevent_pure", 2, 1, 210_000.0),
        _e2e_row("mp_queue", 2, 1, 100_000.0),
        _e2e_row("faster_fifo", 2, 1, 150_000.0),
        _e2e_row("pyzmq", 2, 1, 200_000.0),
        _e2e_row("bare", 1, 1, 300_000.0, send_rate=300_000.0),
    ]
}
TARGET_LATENCY = {"loads": [{"load": 0.5, "p99_ns": 800_000.0, "delivered": 10, "raised": 10}]}


def test_targets_are_the_compiled_paths_with_the_pure_paths_beside():
    meta = {"compiled": True, "pure_beside": True}
    got = report.targets(
        _results(
            meta=meta, producer_cost=TARGET_COST, end_to_end=TARGET_E2E, latency=TARGET_LATENCY
        )
    )
    # 2.8 x faster_fifo misses 3 x; everything else passes, latency too (the
    # transports section did not run: its four are n/a).
    assert [t["verdict"] for t in got] == ["PASS"] * 5 + ["MISS"] + ["PASS"] * 4 + ["n/a"] * 4
    ratios = [t["ratio"] for t in got]
    assert ratios[:5] == pytest.approx([0.075, 0.15, 3.0, 0.0125, 310 / 300])
    assert ratios[5:9] == pytest.approx([2.8, 4.2, 2.1, 1.4])
    pure = [t["pure"] for t in got]
    assert pure[:5] == pytest.approx([0.375, 0.75, 15.0, 0.0375, 1.2])
    assert pure[5:9] == pytest.approx([1.4, 2.1, 1.05, 0.7])
    assert got[9]["pure"] is None  # latency: the default path only
    # Losing events turns the end-to-end targets into misses whatever the rate.
    lossy = {"summary": [_e2e_row("mpevent", 2, 1, 900_000.0, lost=1), *TARGET_E2E["summary"][1:]]}
    got = report.targets(_results(meta=meta, producer_cost=TARGET_COST, end_to_end=lossy))
    assert {t["verdict"] for t in got[5:9]} == {"MISS"}
    # Sections that did not run: n/a, not a failure.
    assert {t["verdict"] for t in report.targets(_results(meta=meta))} == {"n/a"}
    # A pipeline that did not run says so.
    no_zmq = {"summary": [r for r in TARGET_E2E["summary"] if r["pipeline"] != "pyzmq"]}
    got = report.targets(_results(meta=meta, end_to_end=no_zmq))
    assert (got[7]["verdict"], got[7]["note"]) == ("n/a", "pyzmq not run")


def test_targets_without_a_compiled_path_show_the_pure_figures_and_no_verdict():
    cost = _cost_cases(raise_0=150.0, raise_1=1500.0, raise_64=1800.0, inline=4000.0, dumps=100.0)
    e2e = {"summary": [_e2e_row("mpevent", 2, 1, 210_000.0), *TARGET_E2E["summary"][2:]]}
    for meta in ({"compiled": False}, {"compiled": None}, {}):
        got = report.targets(_results(meta=meta, producer_cost=cost, end_to_end=e2e))
        assert {t["verdict"] for t in got} == {"n/a"}
        assert got[0]["note"] == "compiled path not active"
        assert got[0]["figure"] == "pure: 1,500 ns vs 4,000 ns"
        assert [t["pure"] for t in got[:9]] == pytest.approx(
            [0.375, None, 15.0, 0.0375, 1.2, 1.4, 2.1, 1.05, 0.7]
        )


def _transport_row(transport, pipeline, rate, lost=0):
    return {"transport": transport, "pipeline": pipeline, "rate": rate, "lost": lost}


def test_transport_targets_compare_with_each_transports_raw_loop():
    section = {
        "summary": [
            _transport_row("tcp", "mpevent_tcp", 90_000.0),
            _transport_row("tcp", "bare_tcp", 100_000.0),
            _transport_row("rabbitmq", "mpevent_rabbitmq", 15_000.0, lost=1),
            _transport_row("rabbitmq", "pika_select", 10_000.0),
        ],
        "producer_cost": _cost_cases(
            raise_1_udp=200.0, raise_1_tcp=210.0, raise_1_rabbitmq=230.0,
            raise_1_udp_pure=1000.0, raise_1_tcp_pure=900.0, raise_1_rabbitmq_pure=1050.0,
        ),
    }  # fmt: skip
    meta = {"compiled": True, "pure_beside": True}
    got = report.targets(_results(meta=meta, transports=section))[10:]
    assert [t["ratio"] for t in got] == pytest.approx([0.9, 1.5, 1.05, 1.15])
    # A lost event misses whatever the rate; 15 % dearer misses 10 %.
    assert [t["verdict"] for t in got] == ["PASS", "MISS", "PASS", "MISS"]
    assert [t["pure"] for t in got] == pytest.approx([None, None, 0.9, 1.05])
    # No broker: the rabbitmq: rows are missing, and their targets say so.
    section["summary"] = section["summary"][:2]
    del section["producer_cost"]["cases"]["raise_1_rabbitmq"]
    got = report.targets(_results(meta=meta, transports=section))[10:]
    assert [(t["verdict"], t["note"]) for t in got] == [
        ("PASS", ""), ("n/a", "rabbitmq not run"), ("PASS", ""), ("n/a", "rabbitmq not run")
    ]  # fmt: skip


def test_text_counter_counts_each_notification_once_however_the_stream_is_cut():
    import random

    stream = b"".join(encode_notification(EVENT, {**PARAMS, "seq": s}) for s in range(300))
    rng = random.Random(7)
    for _ in range(50):
        counter = transports.TextCounter()
        at = 0
        while at < len(stream):
            step = rng.choice((1, 3, 9, 10, 11, 64, 1000))
            buf = bytearray(stream[at : at + step]) + b"junk"  # what a reused buffer holds
            counter.feed(buf, min(step, len(stream) - at))
            at += step
        assert (counter.texts, counter.bytes) == (300, len(stream))
    one = transports.TextCounter()
    one.feed(stream)
    assert one.texts == 300
    assert transports._notes_bytes(300) == len(stream)  # what the tcp: readers must get


def test_cost_labels_name_the_path():
    assert cost.cost_label("raise_1") == "raise_event, 1 subscriber"
    assert cost.cost_label("raise_64", compiled=True) == "raise_event, 64 subscribers, compiled"
    assert cost.cost_label("raise_0_pure", compiled=True) == "raise_event, 0 subscribers, pure path"
    assert cost.cost_label("raise_shared_pure").startswith("raise_event, every lane owned")
    assert cost.cost_label("dumps") == "orjson.dumps(params) alone (the floor)"


def test_detect_says_what_a_run_lacks(monkeypatch):
    monkeypatch.setattr(extras, "optional_module", lambda name: None)
    for flag, says in ((None, "no compiled fast path"), (False, "mpevent.COMPILED is False")):
        monkeypatch.setattr(extras, "compiled_flag", lambda flag=flag: flag)
        found, notes = extras.detect()
        assert (found.ff, found.zmq, found.compiled, found.pure_beside) == (None, None, flag, False)
        assert found.paths == {"": None} and found.mpevent_kinds == ["mpevent"]
        assert [n.split(" ")[0] for n in notes[:2]] == ["faster_fifo", "pyzmq"]
        assert says in notes[2]
    _, notes = extras.detect(use_faster_fifo=False)
    assert notes[0] == "faster_fifo skipped (--no-faster-fifo)"
    monkeypatch.setattr(extras, "compiled_flag", lambda: True)
    found, notes = extras.detect()
    if found.pure_beside:  # this Producer chooses its path
        assert found.paths == {"": None, "_pure": False}
        assert found.mpevent_kinds == ["mpevent", "mpevent_pure"]
    else:
        assert "compiled= argument" in notes[-1]


# -- the anchors' bodies, on real sockets ----------------------------------------


def test_pyzmq_pipeline_sends_the_notification_mpevent_sends():
    prefixes: dict[bytes, bytes] = {}
    message = EVENT_BYTES + b" " + orjson.dumps(PARAMS)
    assert bodies.zmq_datagram(message, prefixes) == DATAGRAM == encode_notification(EVENT, PARAMS)
    other = {"a": [1, "x y"], "b": None}
    message = b"E_OTHER " + orjson.dumps(other)
    assert bodies.zmq_datagram(message, prefixes) == encode_notification("E_OTHER", other)
    assert set(prefixes) == {EVENT_BYTES, b"E_OTHER"}  # one prefix per event, built once


def test_sender_thread_encodes_and_sends_what_the_caller_put():
    sink = udp_socket(1 << 20)
    sink.settimeout(10)
    try:
        sender = bodies.SenderThread(sink.getsockname())
        for seq in range(3):
            sender.put((EVENT, {**PARAMS, "seq": seq}))
        sender.flush()  # returns once all three were sent
        sink.setblocking(False)
        got = [sink.recv(65536) for _ in range(3)]
        assert got == [encode_notification(EVENT, {**PARAMS, "seq": s}) for s in range(3)]
        sender.close()
        assert not sender._thread.is_alive()
    finally:
        sink.close()


def test_parser_defaults():
    parser = bench.build_parser(prog="mpevent bench")
    assert parser.prog == "mpevent bench"
    args = parser.parse_args(["--json"])
    assert args.json == "bench-results.json"
    args = parser.parse_args(["--quick", "--json", "x.json", "--plot", "c.png"])
    assert (args.quick, args.json, args.plot) == (True, "x.json", "c.png")
    assert "--smoke" not in parser.format_help()  # the test suite's, not a user option


def test_unknown_section_is_an_error(capsys):
    assert bench.main(["--smoke", "--sections", "cost,nope"]) == 2
    assert "nope" in capsys.readouterr().err


# -- a tiny real run -----------------------------------------------------------


@forks_from_threads  # the bench's own children, forked beside its pyzmq and sender threads
def test_smoke_run_has_every_section(tmp_path: Path, capsys):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    assert bench.main(["--smoke", "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    for heading in ("1. producer cost", "2. end to end", "3. fan-out", "4. raise-to-receive",
                    "5. memory", "6. transports", "targets"):  # fmt: skip
        assert heading in printed
    data = json.loads(out.read_text())
    assert {"meta", "notes", "producer_cost", "end_to_end", "fanout", "latency", "memory",
            "transports", "targets"} <= set(data)  # fmt: skip

    meta = data["meta"]
    assert f"mpevent.COMPILED {report.fmt_compiled(meta['compiled'])};" in printed
    paths = ["", "_pure"] if meta["pure_beside"] else [""]
    assert meta["pure_beside"] == bool(meta["compiled"])  # the pure path runs beside a compiled one
    cases = data["producer_cost"]["cases"]
    mine = [f"raise_{n}{sfx}" for sfx in paths for n in (0, 1, 8, 64, "shared")]
    others = ["inline", "dumps", "thread", "mp_queue"]
    others += [name for name in ("pyzmq", "faster_fifo") if meta[name]]
    assert set(cases) == {*mine, *others, "timer"}
    for case in [*mine, *others]:
        assert cases[case]["n"] == 3 * 20
        assert 0 <= cases[case]["median"] <= cases[case]["p99"]
        # A compiled call with nobody subscribed costs about what the timer
        # subtracted, so it may net 0 even at p99; every other case costs more.
        assert cases[case]["p99"] > 0 or (case.startswith("raise_0") and meta["compiled"])
    assert data["producer_cost"]["bus_totals"]["dropped"] == 0  # timed calls all enqueued
    # Every lane owned: each raise (one untimed per path, then the timed ones) is
    # counted once, and with shared lanes every one of them enqueued.
    shared = data["producer_cost"]["shared_lanes"]
    assert shared["enqueued"] + shared["dropped"] == len(paths) * (1 + 3 * 20)
    assert shared["dropped"] == 0

    summary = data["end_to_end"]["summary"]
    shapes = {(r["pipeline"], r["producers"], r["senders"]) for r in summary}
    queues = ["mp_queue", *(["faster_fifo"] if meta["faster_fifo"] else [])]
    full = [f"mpevent{sfx}" for sfx in paths] + queues
    assert shapes == {
        *((k, p, s) for k in full for p in (1, 2, 4) for s in (1, 2)),
        *(("pyzmq", p, 1) for p in (1, 2, 4) if meta["pyzmq"]),
        *(("thread", p, THREAD_SENDERS) for p in (1, 2, 4)),
        ("bare", 1, 1),
        ("bare_connected", 1, 1),
    }
    for run in data["end_to_end"]["runs"]:
        assert run["rate"] > 0
        if run["pipeline"].startswith("mpevent"):
            totals = run["bus_totals"]
            assert totals["enqueued"] == totals["dispatched"] == 400
        if run["pipeline"] in (*full, "pyzmq", "thread"):
            assert run["delivered"] == run["raised"] == 400, run
    assert any(r["pipeline"] == "bare" and r["send_rate"] > 0 for r in summary)
    # The CPU profile: every role of every pipeline measured, real CPU time
    # (the thread pipeline sends from its producers: no sender process).
    for r in summary:
        roles = set(PROFILE_ROLES)
        if r["pipeline"].startswith("bare"):
            roles = {"sender", "sink"}
        elif r["pipeline"] == "thread":
            roles = {"producer", "sink"}
        assert set(r["cpu_us_per_event"]) == roles, r
        assert all(v > 0 for v in r["cpu_us_per_event"].values()), r
    assert "CPU per delivered event" in printed

    fan = data["fanout"]["summary"]
    assert {r["subscribers"] for r in fan} == {1, 8, 64}
    for r in fan:
        assert r["rate"] > 0
        if r["pipeline"] == "mpevent":
            assert r["delivered"] == r["expected"]

    lat = data["latency"]
    assert lat["capacity"] > 0
    assert [r["load"] for r in lat["loads"]] == [0.1, 0.5, 0.9]
    for r in lat["loads"]:
        assert r["delivered"] == r["raised"]
        assert 0 < r["p50_ns"] <= r["p99_ns"] <= r["p999_ns"] <= r["max_ns"] < 10e9
        assert 0 < r["busy_cores"] <= os.cpu_count() + 0.5  # ours at least, at most all
        assert r["send_age_p99_us"] >= 1  # the sender measured its part

    mem = data["memory"]
    assert mem["segment_bytes"] > 0
    roles = {r["role"] for r in mem["roles"] if r["pipeline"] == "mpevent"}
    assert {"producer", "hub", "sender", "sink"} <= roles
    assert all(r["peak_rss"] > 0 for r in mem["roles"])

    _check_transports(data, paths)

    assert len(data["targets"]) == 14
    assert all(0 < ns < 10_000 for ns in data["meta"]["python_ns_per_step"])
    assert "machine speed" in printed
    assert {t["verdict"] for t in data["targets"]} <= {"PASS", "MISS", "n/a"}
    if extras.optional_module("matplotlib") is not None:
        assert png.stat().st_size > 0
    else:
        assert any("matplotlib" in n for n in data["notes"])


def _check_transports(data: dict, paths: list[str]) -> None:
    """Section 6 of the smoke run: every tcp: case, the rabbitmq: ones when a
    private broker can run here (else a note), nothing lost, the CPU measured."""
    from mpevent.tools.broker import available

    section = data["transports"]
    broker, _ = available()
    kinds = ["udp", "tcp", *(["rabbitmq"] if broker else [])]
    pipelines = ["mpevent_tcp", "bare_tcp"]
    pipelines += ["mpevent_rabbitmq", "pika_select"] if broker else []
    assert [r["pipeline"] for r in section["summary"]] == pipelines
    if not broker:
        assert any(n.startswith("rabbitmq: cases skipped") for n in data["notes"])
    for run in section["runs"]:
        n = 2000 if run["transport"] == "tcp" else 500
        assert run["events"] == run["delivered"] == n and run["lost"] == 0, run
        assert run["rate"] > 0
        roles = {"producer", "sender", "hub", "peer"}
        if run["pipeline"] == "mpevent_rabbitmq":
            roles.add("relay")
        elif not run["pipeline"].startswith("mpevent"):
            roles = {"sender", "peer"}
        assert set(run["cpu_us_per_event"]) == roles, run
        assert all(v >= 0 for v in run["cpu_us_per_event"].values()), run
        for role in roles - {"hub"}:  # an idle hub may use nothing measurable
            assert run["cpu_us_per_event"][role] > 0, (role, run)
        if run["transport"] == "tcp":
            assert run["bytes_ok"], run  # the reader got exactly the notifications' bytes
        else:
            assert run["in_queue"] == n and run["nacked"] == 0, run  # all in the broker's queue
        if run["pipeline"].startswith("mpevent"):
            row = run["destination"]
            assert row["sent"] == row["routed"] == n + (run["transport"] == "tcp"), row
            assert row["dropped"] == row["failed"] == row["pending"] == 0, row
    for row in section["summary"]:
        assert row["x_raw"] > 0 and row["cpu_x_raw"] > 0
    cost_cases = section["producer_cost"]["cases"]
    assert set(cost_cases) == {f"raise_1_{k}{sfx}" for k in kinds for sfx in paths} | {"timer"}
    for case, c in cost_cases.items():
        assert c["n"] == 3 * 20 and 0 <= c["median"] <= c["p99"], case
    for row in section["producer_cost"]["destinations"]:
        assert row["dropped"] == row["failed"] == row["pending"] == 0, row
        assert row["sent"] == row["routed"] >= 1 + 3 * 20 * len(paths), row


def test_missing_optional_packages_are_skipped_with_a_note(monkeypatch, tmp_path, capsys):
    real = extras.optional_module
    missing = {"faster_fifo", "zmq"}
    monkeypatch.setattr(
        extras, "optional_module", lambda name: None if name in missing else real(name)
    )
    monkeypatch.setattr(extras, "compiled_flag", lambda: None)  # a build without the choice
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    png = tmp_path / "none.png"
    assert bench.main(["--smoke", "--sections", "cost", "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "faster_fifo not installed" in printed
    assert "pyzmq not installed" in printed
    assert "no compiled fast path" in printed and "mpevent.COMPILED n/a;" in printed
    assert "matplotlib not installed" in printed
    assert "faster_fifo.Queue.put" not in printed
    assert "pyzmq PUSH send" not in printed
    assert "subscriber, pure path" not in printed  # no pure rows beside the default
    assert not png.exists()
