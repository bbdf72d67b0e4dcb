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

import pytest

from mpevent.tools import bench
from mpevent.tools.bench import report, runner
from mpevent.tools.bench.e2e import split_evenly
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


def test_targets_from_figures():
    cost = {
        "cases": {
            "raise_0": {"median": 100.0},
            "raise_1": {"median": 1000.0},
            "raise_64": {"median": 1050.0},
            "inline": {"median": 4000.0},
        }
    }

    def row(pipeline, p, s, rate, lost=0, **extra):
        base = {"pipeline": pipeline, "producers": p, "senders": s, "rate": rate, "lost": lost}
        return base | extra

    e2e = {
        "summary": [
            row("mpevent", 2, 1, 300_000.0),
            row("mpevent", 4, 1, 320_000.0),
            row("mp_queue", 2, 1, 100_000.0),
            row("faster_fifo", 2, 1, 200_000.0),
            row("bare", 1, 1, 400_000.0, send_rate=400_000.0),
        ]
    }
    lat = {"loads": [{"load": 0.5, "p99_ns": 800_000.0, "delivered": 10, "raised": 10}]}
    got = report.targets(_results(producer_cost=cost, end_to_end=e2e, latency=lat))
    verdicts = [t["verdict"] for t in got]
    # 1 sub 0.25 PASS; none 0.025 PASS; 64 1.05 PASS; x3 Queue PASS; x1.5 ff MISS;
    # best one-sender 320k / 400k = 0.8 PASS; p99 0.8 ms PASS.
    assert verdicts == ["PASS", "PASS", "PASS", "PASS", "MISS", "PASS", "PASS"]
    assert got[5]["ratio"] == pytest.approx(0.8)
    # Losing events turns the end-to-end targets into misses whatever the rate.
    e2e["summary"][0]["lost"] = 1
    got = report.targets(_results(producer_cost=cost, end_to_end=e2e, latency=lat))
    assert got[3]["verdict"] == "MISS"
    # Sections that did not run: n/a, not a failure.
    assert {t["verdict"] for t in report.targets(_results())} == {"n/a"}


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


def test_smoke_run_has_every_section(tmp_path: Path, capsys):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    assert bench.main(["--smoke", "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    for heading in ("1. producer cost", "2. end to end", "3. fan-out", "4. raise-to-receive",
                    "5. memory", "targets"):  # fmt: skip
        assert heading in printed
    data = json.loads(out.read_text())
    assert {"meta", "notes", "producer_cost", "end_to_end", "fanout", "latency", "memory",
            "targets"} <= set(data)  # fmt: skip

    cases = data["producer_cost"]["cases"]
    for case in ("raise_0", "raise_1", "raise_8", "raise_64", "inline", "mp_queue"):
        assert cases[case]["n"] == 3 * 20
        assert 0 < cases[case]["median"] <= cases[case]["p99"]
    assert data["producer_cost"]["bus_totals"]["dropped"] == 0  # timed calls all enqueued

    summary = data["end_to_end"]["summary"]
    mpevent = [r for r in summary if r["pipeline"] == "mpevent"]
    assert {(r["producers"], r["senders"]) for r in mpevent} == {
        (p, s) for p in (1, 2, 4) for s in (1, 2)
    }
    for run in data["end_to_end"]["runs"]:
        assert run["rate"] > 0
        if run["pipeline"] == "mpevent":
            assert run["delivered"] == run["raised"] == 400
            totals = run["bus_totals"]
            assert totals["enqueued"] == totals["dispatched"] == 400
    assert any(r["pipeline"] == "mp_queue" for r in summary)
    assert any(r["pipeline"] == "bare" and r["send_rate"] > 0 for r in summary)
    # The CPU profile: every role of every pipeline measured, real CPU time.
    for r in summary:
        roles = {"sender", "sink"} if r["pipeline"].startswith("bare") else set(PROFILE_ROLES)
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

    assert len(data["targets"]) == 7
    assert all(0 < ns < 10_000 for ns in data["meta"]["python_ns_per_step"])
    assert "machine speed" in printed
    assert {t["verdict"] for t in data["targets"]} <= {"PASS", "MISS", "n/a"}
    if runner.optional_module("matplotlib") is not None:
        assert png.stat().st_size > 0
    else:
        assert any("matplotlib" in n for n in data["notes"])


def test_missing_optional_packages_are_skipped_with_a_note(monkeypatch, tmp_path, capsys):
    real = runner.optional_module
    monkeypatch.setattr(
        runner, "optional_module", lambda name: None if name == "faster_fifo" else real(name)
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    png = tmp_path / "none.png"
    assert bench.main(["--smoke", "--sections", "cost", "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "faster_fifo not installed" in printed
    assert "matplotlib not installed" in printed
    assert "faster_fifo.Queue.put" not in printed
    assert not png.exists()
