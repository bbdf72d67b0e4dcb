"""tcp: and virtual: destinations end to end: a real bus, its sender loop, real peers.

The endpoint tests drive one endpoint by hand; here the sender's own loop
does (poll registrations, timers for reconnects and reply timeouts, naps),
and the counters are read back through ``EventBus.stats()``.
"""

from __future__ import annotations

import pytest
from support import TcpSink, UdpSink, check_accounting, drained, raise_retrying, wait_for

from mpevent import EventBus, encode_notification


def raise_all(bus: EventBus, name: str, n: int) -> list[bytes]:
    sent = []
    for i in range(n):
        raise_retrying(bus.raise_event, name, {"seq": i})
        sent.append(encode_notification(name, {"seq": i}))
    return sent


def row_of(bus: EventBus, event: str) -> dict:
    (row,) = [r for r in bus.stats()["destinations"] if r["event"] == event]
    return row


def settled(bus: EventBus) -> bool:
    stats = bus.stats()
    return drained(bus) and all(r["pending"] == 0 for r in stats["destinations"])


@pytest.fixture
def tcp_sink():
    sink = TcpSink()
    yield sink
    sink.close()


@pytest.mark.timeout(60)
def test_tcp_gets_every_notification_in_order_back_to_back(tcp_sink) -> None:
    with EventBus(lanes=2) as bus:
        bus.publish_event("E_A")
        bus.subscribe("E_A", tcp_sink.address)
        sent = raise_all(bus, "E_A", 3000)
        wait_for(lambda: len(tcp_sink.texts) >= 3000, timeout=30)
        assert tcp_sink.texts == sent
        wait_for(lambda: settled(bus))
        stats = bus.stats()
        check_accounting(stats)
        row = row_of(bus, "E_A")
        assert (row["routed"], row["sent"], row["bytes"]) == (3000, 3000, sum(map(len, sent)))
        assert tcp_sink.connections == 1


@pytest.mark.timeout(60)
def test_tcp_method_and_a_peer_that_starts_late() -> None:
    sink = TcpSink()
    sink.stop()  # nobody listens yet: the events wait in the backlog
    try:
        with EventBus(lanes=2) as bus:
            bus.publish_event("E_A")
            bus.subscribe("E_A", f"{sink.address}/my_method")
            sent = raise_all(bus, "E_A", 200)
            wait_for(lambda: row_of(bus, "E_A")["routed"] == 200)
            assert row_of(bus, "E_A")["pending"] == 200
            sink.start()
            wait_for(lambda: len(sink.texts) >= 200, timeout=30)  # reconnected (backoff)
            assert sink.texts == [t.replace(b'"E_A"', b'"my_method"') for t in sent]
            wait_for(lambda: settled(bus))
            check_accounting(bus.stats())
    finally:
        sink.close()


@pytest.mark.timeout(60)
def test_reliable_results_count_sent_and_errors_fail_over_to_the_next_member() -> None:
    good, bad, udp = TcpSink("result"), TcpSink("error"), UdpSink()
    try:
        with EventBus(lanes=2) as bus:
            bus.publish_event("E_OK")
            bus.publish_event("E_FO")
            bus.subscribe("E_OK", f"{good.address};reliable")
            bus.subscribe("E_FO", f"virtual:FAILOVER {bad.address};reliable {udp.address}")
            ok = raise_all(bus, "E_OK", 100)
            fo = raise_all(bus, "E_FO", 50)
            assert sorted(udp.receive(50)) == sorted(fo)  # each one after its error reply
            wait_for(lambda: settled(bus))
            assert good.notifications() == ok
            stats = bus.stats()
            check_accounting(stats)
            assert row_of(bus, "E_OK")["sent"] == 100
            first, second = row_of(bus, "E_FO")["members"]
            assert first["routed"] == first["failed"] >= 1  # it failed, then went to the back
            assert second["sent"] == 50
    finally:
        for sink in (good, bad, udp):
            sink.close()


@pytest.mark.timeout(60)
def test_reliable_silence_times_out_counted_and_fails_over() -> None:
    silent, udp = TcpSink("silence"), UdpSink()
    try:
        with EventBus(lanes=2) as bus:
            bus.publish_event("E_FO")
            bus.subscribe(
                "E_FO", f"virtual:FAILOVER {silent.address};reliable;timeout=200 {udp.address}"
            )
            sent = raise_all(bus, "E_FO", 5)
            got = udp.receive(5, timeout=10)
            assert sorted(got) == sorted(sent)
            wait_for(lambda: settled(bus))
            check_accounting(bus.stats())
            first, second = row_of(bus, "E_FO")["members"]
            assert first["timeouts"] == first["failed"] >= 1
            assert second["sent"] == 5
    finally:
        silent.close()
        udp.close()


@pytest.mark.timeout(60)
def test_parallel_and_round_robin_over_tcp_and_udp(tcp_sink) -> None:
    udp_all, rr_a, rr_b = UdpSink(), UdpSink(), UdpSink()
    try:
        with EventBus(lanes=2) as bus:
            bus.publish_event("E_P")
            bus.publish_event("E_R")
            bus.subscribe("E_P", f"virtual:PARALLEL {tcp_sink.address} {udp_all.address}")
            bus.subscribe("E_R", f"virtual:ROUND-ROBIN {rr_a.address}\t{rr_b.address}")
            parallel = raise_all(bus, "E_P", 300)
            rr = raise_all(bus, "E_R", 300)
            assert udp_all.receive(300) == parallel
            a, b = rr_a.receive(150), rr_b.receive(150)
            assert sorted(a + b) == sorted(rr)
            wait_for(lambda: len(tcp_sink.texts) >= 300)
            assert tcp_sink.texts == parallel
            wait_for(lambda: settled(bus))
            check_accounting(bus.stats())
            members = row_of(bus, "E_R")["members"]
            assert [m["sent"] for m in members] == [150, 150]
            assert row_of(bus, "E_P")["routed"] == 600  # each member counted its own
    finally:
        for sink in (udp_all, rr_a, rr_b):
            sink.close()
