"""Chaos: subscribers that vanish and come back; the others lose nothing."""

from __future__ import annotations

import socket
import threading
import time

import orjson
import psutil
import pytest
from support import UdpSink, wait_for

from mpevent import EventBus


@pytest.mark.chaos
@pytest.mark.timeout(300)
def test_vanishing_unix_subscriber_costs_the_others_nothing(tmp_path):
    healthy = UdpSink()
    path = tmp_path / "flaky.sock"
    closed_port = UdpSink()
    dead_udp = closed_port.address
    closed_port.close()  # a port nobody listens on
    stop = threading.Event()
    with EventBus() as bus:
        bus.publish_event("E_FLAKY")
        bus.subscribe("E_FLAKY", healthy.address, expire=None)
        bus.subscribe("E_FLAKY", f"unix:{path}", expire=None)
        bus.subscribe("E_FLAKY", dead_udp, expire=None)

        raised = []

        def produce() -> None:
            n = 0
            while not stop.is_set():
                if bus.raise_event("E_FLAKY", {"n": n}):
                    raised.append(n)
                n += 1
                time.sleep(0.0002)

        producer = threading.Thread(target=produce)
        producer.start()
        back_for = []
        try:
            for _ in range(5):  # vanish, come back, read a while, vanish again
                time.sleep(0.1)  # gone: the path does not exist
                flaky = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                flaky.bind(str(path))
                flaky.settimeout(5)
                # It comes back: within the reconnect interval it gets events again.
                got = orjson.loads(flaky.recv(65536))
                back_for.append(got["params"]["n"])
                flaky.close()
                path.unlink()
        finally:
            stop.set()
            producer.join()
        expected = len(raised)
        received = healthy.receive(expected, timeout=10)
        assert wait_for(lambda: all(r["pending"] == 0 for r in bus.stats()["destinations"]))
        rows = {r["socket"]: r for r in bus.stats()["destinations"]}
    healthy.close()

    assert [orjson.loads(d)["params"]["n"] for d in received] == raised
    assert len(back_for) == 5
    flaky_row = rows[f"unix:{path}"]
    assert flaky_row["failed"] > 0 and flaky_row["sent"] > 0
    assert flaky_row["enoent"] + flaky_row["econnrefused"] > 0
    assert rows[dead_udp]["econnrefused"] > 0
    for row in rows.values():
        # Each term is counted on its own; with nothing pending, every
        # datagram routed was sent, failed or dropped.
        assert row["pending"] == 0, row
        assert row["routed"] == expected == row["sent"] + row["failed"] + row["dropped"], row


@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_stuck_subscriber_that_goes_away_then_comes_back(tmp_path):
    """Its backlog fails when it goes, nothing stays stuck, the new one gets events."""
    path = tmp_path / "stuck.sock"
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.bind(str(path))  # never read: 10 datagrams queue, the rest wait in the backlog
    with EventBus(backlog=1000) as bus:
        bus.publish_event("E_STUCK")
        bus.subscribe("E_STUCK", f"unix:{path}", expire=None)
        for n in range(200):
            assert bus.raise_event("E_STUCK", {"n": n})

        def row():
            return bus.stats()["destinations"][0]

        assert wait_for(lambda: row()["pending"] > 100), row()
        stuck.close()
        path.unlink()
        # The sender learns it when the socket turns writable (the peer is gone).
        assert wait_for(lambda: row()["pending"] == 0, timeout=10), row()
        back = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        back.bind(str(path))
        back.settimeout(5)
        try:
            assert wait_for(lambda: bus.raise_event("E_STUCK", {"n": "back"}) and True)
            got = orjson.loads(back.recv(65536))
            assert got["params"] == {"n": "back"}
        finally:
            back.close()
            path.unlink()
        assert wait_for(lambda: row()["routed"] == 201 and row()["pending"] == 0), row()
        r = row()
    assert r["pending"] == 0, r
    assert r["routed"] == 201 == r["sent"] + r["failed"] + r["dropped"], r
    assert r["failed"] >= 100, r


@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_a_killed_senders_backlog_is_counted_not_left_pending(tmp_path):
    path = tmp_path / "slow.sock"
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    slow.bind(str(path))  # never read: the sender's backlog holds the rest
    try:
        with EventBus(backlog=1000) as bus:
            bus.publish_event("E_SLOW")
            bus.subscribe("E_SLOW", f"unix:{path}", expire=None)
            for n in range(300):
                assert bus.raise_event("E_SLOW", {"n": n})

            def row():
                return bus.stats()["destinations"][0]

            assert wait_for(lambda: row()["pending"] > 200), row()
            (sender,) = psutil.Process(bus.hub_pid).children()
            sender.kill()
            sender.wait(10)
            # Its successor counts what the backlog held as dropped.
            assert wait_for(lambda: row()["pending"] == 0, timeout=10), row()
            r = row()
        assert r["pending"] == 0, r
        assert r["routed"] == 300 == r["sent"] + r["failed"] + r["dropped"], r
        assert r["dropped"] > 200, r
    finally:
        slow.close()
        path.unlink()
