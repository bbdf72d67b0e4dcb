"""The chart: sections 1-4 and 6 of a run's results in one PNG (``--plot``).

matplotlib is optional (``pip install 'mpevent[bench]'``): without it no
chart is written and :func:`plot` returns a note saying so.
"""

from __future__ import annotations

from typing import Any

from mpevent.tools.bench.config import PIPELINE_LABELS, PIPELINES, THREAD_SENDERS
from mpevent.tools.bench.report import find


def plot(results: dict[str, Any], path: str) -> str | None:
    """Write a chart of the results; returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install 'mpevent[bench]'): no chart written"
    fig, axes = plt.subplots(3, 2, figsize=(13, 13.5))
    fig.suptitle(f"mpevent benchmark ({results['meta']['mode']}, {results['meta']['cpus']} CPUs)")
    ax = axes[0][0]
    cost = results.get("producer_cost")
    if cost:
        cases = [c for c in cost["cases"] if c != "timer"]
        labels = [cost["cases"][c]["label"].replace(", ", "\n") for c in cases]
        meds = [cost["cases"][c]["median"] for c in cases]
        p99 = [cost["cases"][c]["p99"] for c in cases]
        x = range(len(cases))
        ax.bar([i - 0.2 for i in x], meds, 0.4, label="median")
        ax.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
        ax.set_xticks(list(x), labels, fontsize=7, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("ns per call")
        ax.set_title("1. producer cost")
        ax.legend()
    ax = axes[0][1]
    e2e = results.get("end_to_end")
    if e2e:
        configs = sorted(
            {
                (r["producers"], r["senders"])
                for r in e2e["summary"]
                if not r["pipeline"].startswith("bare")
            }
        )
        kinds = [k for k in PIPELINES if any(r["pipeline"] == k for r in e2e["summary"])]
        width = 0.8 / len(kinds)
        for i, kind in enumerate(kinds):
            vals = [
                (find(e2e["summary"], pipeline=kind, producers=p, senders=s) or {}).get("rate", 0)
                for p, s in configs
            ]
            ax.bar(
                [j + i * width for j in range(len(configs))],
                vals,
                width,
                label=PIPELINE_LABELS[kind],
            )
        bare = find(e2e["summary"], pipeline="bare")
        if bare:
            ax.axhline(bare["send_rate"], color="grey", linestyle="--", label="bare sendto loop")
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(configs))],
            [f"{p}p\nthread" if s == THREAD_SENDERS else f"{p}p/{s}s" for p, s in configs],
        )
        ax.set_ylabel("delivered events/s")
        ax.set_title("2. end to end (producers/senders)")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
        ax.legend(fontsize=7, loc="upper center", ncol=2, framealpha=0.9)
    ax = axes[1][0]
    fan = results.get("fanout")
    if fan:
        subs = sorted({r["subscribers"] for r in fan["summary"]})
        m = [
            (find(fan["summary"], pipeline="mpevent", subscribers=n) or {}).get("rate", 0)
            for n in subs
        ]
        b = [
            (find(fan["summary"], pipeline="bare", subscribers=n) or {}).get("send_rate", 0)
            for n in subs
        ]
        ax.bar([i - 0.2 for i in range(len(subs))], m, 0.4, label="mpevent delivered")
        ax.bar([i + 0.2 for i in range(len(subs))], b, 0.4, label="bare sendto loop")
        ax.set_xticks(list(range(len(subs))), [str(n) for n in subs])
        ax.set_xlabel("subscribers")
        ax.set_ylabel("datagrams/s")
        ax.set_title("3. fan-out")
        ax.legend(fontsize=7)
    ax = axes[1][1]
    lat = results.get("latency")
    if lat:
        loads = [f"{r['load']:.0%}" for r in lat["loads"]]
        for key, label in (("p50_ns", "p50"), ("p99_ns", "p99"), ("p999_ns", "p99.9")):
            ax.plot(loads, [r[key] / 1000 for r in lat["loads"]], marker="o", label=label)
        ax.axhline(1000, color="red", linestyle=":", label="1 ms")
        ax.set_yscale("log")
        ax.set_xlabel("load (share of capacity)")
        ax.set_ylabel("us")
        ax.set_title("4. raise-to-receive latency")
        ax.legend(fontsize=7)
    _plot_transports(results.get("transports"), axes[2])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _plot_transports(section: dict[str, Any] | None, axes: Any) -> None:
    """Section 6: each transport's rate and CPU per event beside its raw loop's."""
    if not section:
        return
    transports = list(dict.fromkeys(r["transport"] for r in section["summary"]))
    ticks = [f"{t}:" for t in transports]
    for ax, key, unit in (
        (axes[0], "rate", "delivered events/s"),
        (axes[1], "cpu_us_total", "CPU us per delivered event"),
    ):
        for i, (side, offset) in enumerate((("mpevent", -0.2), ("raw loop", 0.2))):
            values = [
                next(
                    (
                        r[key]
                        for r in section["summary"]
                        if r["transport"] == t and r["pipeline"].startswith("mpevent") == (i == 0)
                    ),
                    0,
                )
                for t in transports
            ]
            ax.bar([j + offset for j in range(len(transports))], values, 0.4, label=side)
        ax.set_xticks(list(range(len(transports))), ticks)
        ax.set_yscale("log")
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)
    axes[0].set_title("6. transports: delivered rate")
    axes[1].set_title("6. transports: CPU per event (peer included)")
