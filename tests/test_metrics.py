"""Prometheus metrics: the pure renderer (mpevent.protocol.metrics) on crafted
data, and ``GET /metrics`` of a running daemon, both read back with
prometheus_client's own parser."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Daemon, UdpSink, wait_for

from mpevent.protocol import metrics
from mpevent.protocol.mi_views import flat_statistics

AGE_BUCKETS = 16  # the segment's age histogram (mpevent.shm.layout.AGE_BUCKETS)


def parse(text: str) -> dict[str, Any]:
    """Family name (as prometheus_client names it: counters without _total) -> family."""
    families = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"{family.name} twice"
        families[family.name] = family
    return families


def samples(family: Any, name: str | None = None) -> dict[tuple, float]:
    """Samples of ``family`` named ``name`` (default: the counter's _total or the
    gauge's own name), by their sorted label items."""
    if name is None:
        name = family.name + ("_total" if family.type == "counter" else "")
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}


def _event_sums(**values: int) -> dict[str, int]:
    sums = dict.fromkeys((key for key, _ in metrics.EVENT_METRICS), 0)
    sums.update(values)
    return sums


NASTY_SOCKET = 'unix:/tmp/a "quoted" \\dir\\\nnewline'


def crafted() -> dict[str, Any]:
    hist = [0] * AGE_BUCKETS
    hist[0], hist[3], hist[10], hist[-1] = 5, 7, 2, 1  # the last bucket: older than 2**14 us
    return {
        "events": {
            "E_A": _event_sums(
                raised=10,
                enqueued=8,
                dropped=1,
                rejected=1,
                oversize=1,
                dispatched=8,
                taken=8,
                no_subscriber=4,
            ),
            "E_B": _event_sums(lost=3, unrouted=2, send_oversize=1),
        },
        "destinations": [
            {
                "event": "E_A",
                "socket": "udp:127.0.0.1:9000",
                "routed": 8,
                "sent": 6,
                "bytes": 600,
                "failed": 1,
                "dropped": 0,
                "pending": 1,
            },
            {
                "event": "E_A",
                "socket": NASTY_SOCKET,
                "routed": 8,
                "sent": 8,
                "bytes": 800,
                "failed": 0,
                "dropped": 0,
                "pending": 0,
            },
            # Two brokers that differ only in a masked password print alike.
            {
                "event": "E_B",
                "socket": "rabbitmq:u:***@h/k",
                "routed": 1,
                "sent": 1,
                "bytes": 10,
                "failed": 0,
                "dropped": 2,
                "pending": 0,
            },
            {
                "event": "E_B",
                "socket": "rabbitmq:u:***@h/k",
                "routed": 3,
                "sent": 2,
                "bytes": 20,
                "failed": 0,
                "dropped": 1,
                "pending": 4,
            },
        ],
        "senders": [
            {"sender": 0, "loops": 123, "age_max_us": 20000, "age_hist": hist},
            {"sender": 1, "loops": 0, "age_max_us": 0, "age_hist": [0] * AGE_BUCKETS},
        ],
        "repaired": 2,
        "shared_lane_writers": 1,
    }


PROCESSES = [
    {"ID": 0, "PID": 10, "Type": "hub", "CPU": 1.5, "RSS": 1000},
    {"ID": 1, "PID": 11, "Type": "sender 0", "CPU": 0.25, "RSS": 2000},
    {"ID": 2, "PID": 12, "Type": "sender 1", "CPU": 0.0, "RSS": 3000},
    {"ID": 3, "PID": 13, "Type": "producer lane 4", "CPU": 2.0, "RSS": 4000},
]


def test_rendered_text_parses_with_names_types_and_values():
    text = metrics.render(
        crafted(), uptime=12.5, processes=PROCESSES, start_time=1700000000.25, version="1.2.3"
    )
    fams = parse(text)
    expected_types = {
        "mpevent_info": "gauge",
        "mpevent_uptime_seconds": "gauge",
        "mpevent_start_time_seconds": "gauge",
        "mpevent_processes": "gauge",
        "mpevent_process_cpu_seconds": "counter",
        "mpevent_process_resident_memory_bytes": "gauge",
        "mpevent_destination_pending": "gauge",
        "mpevent_sender_batch_wait_seconds": "histogram",
        "mpevent_sender_batch_wait_max_seconds": "gauge",
        "mpevent_sender_loops": "counter",
        "mpevent_repaired_records": "counter",
        "mpevent_shared_lane_writers": "counter",
    }
    for key, _ in metrics.EVENT_METRICS:
        expected_types[f"mpevent_event_{key}"] = "counter"
    for suffix in ("routed", "sent", "bytes", "failed", "dropped"):
        expected_types[f"mpevent_destination_{suffix}"] = "counter"
    assert {name: fam.type for name, fam in fams.items()} == expected_types
    # Every counter's samples end in _total, every family has help.
    for fam in fams.values():
        assert fam.documentation
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), fam

    assert samples(fams["mpevent_uptime_seconds"]) == {(): 12.5}
    assert samples(fams["mpevent_start_time_seconds"]) == {(): 1700000000.25}
    assert samples(fams["mpevent_info"]) == {(("version", "1.2.3"),): 1}
    raised = samples(fams["mpevent_event_raised"])
    assert raised == {(("event", "E_A"),): 10, (("event", "E_B"),): 0}
    assert samples(fams["mpevent_event_lost"])[(("event", "E_B"),)] == 3
    assert samples(fams["mpevent_event_no_subscriber"])[(("event", "E_A"),)] == 4
    assert samples(fams["mpevent_repaired_records"]) == {(): 2}
    assert samples(fams["mpevent_sender_loops"]) == {(("sender", "0"),): 123, (("sender", "1"),): 0}
    assert samples(fams["mpevent_sender_batch_wait_max_seconds"])[(("sender", "0"),)] == 0.02


def test_label_values_with_quotes_backslashes_and_newlines_round_trip():
    text = metrics.render(crafted(), uptime=1)
    # Escaped in the text: no raw newline inside a sample line.
    line = next(x for x in text.splitlines() if 'a \\"quoted' in x)
    assert '\\"quoted\\" \\\\dir\\\\\\nnewline"' in line, line
    sent = samples(parse(text)["mpevent_destination_sent"])
    assert sent[(("event", "E_A"), ("socket", NASTY_SOCKET))] == 8
    assert sent[(("event", "E_A"), ("socket", "udp:127.0.0.1:9000"))] == 6
    assert metrics.escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_destinations_printing_alike_are_one_series_with_summed_counts():
    fams = parse(metrics.render(crafted(), uptime=1))
    key = (("event", "E_B"), ("socket", "rabbitmq:u:***@h/k"))
    assert samples(fams["mpevent_destination_routed"])[key] == 4
    assert samples(fams["mpevent_destination_bytes"])[key] == 30
    assert samples(fams["mpevent_destination_dropped"])[key] == 3
    assert samples(fams["mpevent_destination_pending"])[key] == 4
    assert len(samples(fams["mpevent_destination_sent"])) == 3


def test_batch_wait_histogram_is_cumulative_with_power_of_two_bounds():
    fam = parse(metrics.render(crafted(), uptime=1))["mpevent_sender_batch_wait_seconds"]
    buckets = [
        (s.labels["le"], s.value)
        for s in fam.samples
        if s.name.endswith("_bucket") and s.labels["sender"] == "0"
    ]
    # One bucket per closed age bucket (2**0 .. 2**14 us), then +Inf.
    assert [le for le, _ in buckets[:-1]] == [
        metrics.format_value((1 << k) / 1e6) for k in range(AGE_BUCKETS - 1)
    ]
    assert [float(le) for le, _ in buckets[:3]] == [1e-6, 2e-6, 4e-6]
    assert float(buckets[-2][0]) == pytest.approx(0.016384)
    assert buckets[-1][0] == "+Inf"
    counts = [value for _, value in buckets]
    assert counts == sorted(counts)  # cumulative
    assert counts[0] == 5 and counts[2] == 5 and counts[3] == 12 and counts[10] == 14
    assert counts[-2] == 14 and counts[-1] == 15  # the open bucket only in +Inf
    count = {s.labels["sender"]: s.value for s in fam.samples if s.name.endswith("_count")}
    assert count == {"0": 15, "1": 0}
    assert not [s for s in fam.samples if s.name.endswith("_sum")]  # not known: not made up


def test_processes_by_type_and_per_process_figures():
    fams = parse(metrics.render(crafted(), uptime=1, processes=PROCESSES))
    by_type = {dict(k)["type"]: v for k, v in samples(fams["mpevent_processes"]).items()}
    assert by_type == {"hub": 1, "sender": 2, "relay": 0, "producer": 1}
    cpu = samples(fams["mpevent_process_cpu_seconds"])
    assert cpu[(("process", "sender 0"), ("type", "sender"))] == 0.25
    rss = samples(fams["mpevent_process_resident_memory_bytes"])
    assert rss[(("process", "producer lane 4"), ("type", "producer"))] == 4000


def test_empty_bus_still_renders_every_family():
    fams = parse(metrics.render({"events": {}, "destinations": [], "senders": []}, uptime=0))
    assert "mpevent_event_raised" in fams and "mpevent_destination_sent" in fams
    assert samples(fams["mpevent_event_raised"]) == {}
    assert "mpevent_info" not in fams  # no version given


# -- GET /metrics of a running daemon ----------------------------------------------


def _get(daemon: Daemon, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    url = f"http://127.0.0.1:{daemon.http_port}{path}"
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _scrape(daemon: Daemon) -> dict[str, Any]:
    status, headers, body = _get(daemon, "/metrics")
    assert status == 200, body
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(body.decode())


def test_get_metrics_matches_the_mi_statistics(daemon: Daemon, udp_sink: UdpSink):
    daemon.mi("event_publish", ["E_METRICS"])
    daemon.mi("event_subscribe", ["E_METRICS", udp_sink.address, 60])
    count = 7
    for i in range(count):
        assert daemon.mi("raise_event", ["E_METRICS", {"n": i}]) == "OK"
    got = udp_sink.receive(count)
    assert len(got) == count
    sent_bytes = sum(len(d) for d in got)

    dest = (("event", "E_METRICS"), ("socket", udp_sink.address))
    event = (("event", "E_METRICS"),)

    def settled() -> dict[str, Any] | None:
        fams = _scrape(daemon)
        hist = fams["mpevent_sender_batch_wait_seconds"]
        waited = sum(s.value for s in hist.samples if s.name.endswith("_count"))
        sent = samples(fams["mpevent_destination_sent"]).get(dest)
        return fams if (sent == count and waited == count) else None

    fams = wait_for(settled)
    assert fams, "the scrape never showed what the subscriber received"
    stats = daemon.mi("get_statistics")
    assert samples(fams["mpevent_event_raised"])[event] == stats["event:E_METRICS.raised"] == count
    assert samples(fams["mpevent_event_enqueued"])[event] == count
    assert samples(fams["mpevent_event_dispatched"])[event] == count
    assert samples(fams["mpevent_event_dropped"])[event] == 0
    prefix = f"destination:E_METRICS@{udp_sink.address}."
    assert samples(fams["mpevent_destination_sent"])[dest] == stats[prefix + "sent"]
    assert samples(fams["mpevent_destination_bytes"])[dest] == stats[prefix + "bytes"]
    assert samples(fams["mpevent_destination_bytes"])[dest] == sent_bytes
    assert samples(fams["mpevent_destination_routed"])[dest] == count
    assert samples(fams["mpevent_destination_failed"])[dest] == 0
    assert samples(fams["mpevent_destination_pending"])[dest] == 0

    # Processes: what the MI's ps shows, by type.
    ps = daemon.mi("ps")["Processes"]
    by_type = {dict(k)["type"]: v for k, v in samples(fams["mpevent_processes"]).items()}
    expected = dict.fromkeys(metrics.PROCESS_TYPES, 0)
    for row in ps:
        expected[metrics.process_type(row["Type"])] += 1
    assert by_type == expected and by_type["hub"] == 1 and by_type["sender"] >= 1
    cpu = samples(fams["mpevent_process_cpu_seconds"])
    assert cpu[(("process", "hub"), ("type", "hub"))] > 0
    uptime = samples(fams["mpevent_uptime_seconds"])[()]
    assert 0 < uptime < 600
    version = daemon.mi("version")["Server"]
    assert [dict(k)["version"] for k in samples(fams["mpevent_info"])] == [
        version.removeprefix("mpevent ")
    ]


def test_counters_do_not_follow_reset_statistics(daemon: Daemon, udp_sink: UdpSink):
    """Prometheus counters only grow: the MI's reset baselines do not apply."""
    daemon.mi("event_publish", ["E_RESET"])
    daemon.mi("event_subscribe", ["E_RESET", udp_sink.address, 60])
    daemon.mi("raise_event", ["E_RESET", {}])
    assert len(udp_sink.receive(1)) == 1
    daemon.mi("reset_statistics", {"statistics": ["event:E_RESET.raised"]})
    assert daemon.mi("get_statistics", {"statistics": ["event:E_RESET.raised"]}) == {
        "event:E_RESET.raised": 0
    }
    raised = samples(_scrape(daemon)["mpevent_event_raised"])
    assert raised[(("event", "E_RESET"),)] == 1


def test_http_paths_and_methods(daemon: Daemon):
    status, headers, body = _get(daemon, "/metrics", "HEAD")
    assert status == 200 and body == b""
    assert headers["Content-Type"] == metrics.CONTENT_TYPE
    assert int(headers["Content-Length"]) > 0
    assert _get(daemon, "/metrics?x=1")[0] == 200
    assert _get(daemon, "/nothing")[0] == 404
    assert _get(daemon, "/nothing", "HEAD")[0] == 404
    assert _get(daemon, "/mi")[0] == 405
    # Keep-alive: scrapes follow one another on one connection, and POST /mi too.
    conn = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        first = conn.getresponse()
        assert first.status == 200 and b"mpevent_uptime_seconds" in first.read()
        sock = conn.sock
        conn.request("POST", "/mi", b'{"jsonrpc":"2.0","method":"version","id":1}')
        second = conn.getresponse()
        assert second.status == 200 and b"mpevent" in second.read()
        conn.request("GET", "/metrics")
        third = conn.getresponse()
        assert third.status == 200 and parse(third.read().decode())
        assert conn.sock is sock  # never reconnected
    finally:
        conn.close()


def test_flat_statistics_and_metrics_name_the_same_counters():
    """Every per-event counter the MI names is in the metrics, and no more."""
    flat = flat_statistics({"events": crafted()["events"], "destinations": [], "totals": {}})
    mi_keys = {name.rsplit(".", 1)[1] for name in flat if name.startswith("event:E_A.")}
    assert mi_keys == {key for key, _ in metrics.EVENT_METRICS}
