"""The private RabbitMQ broker (mpevent.tools.broker) and its pika consumer.

These run a real rabbitmq-server; without one they skip (and fail in CI).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pika
import pika.exceptions
import psutil
import pytest

from mpevent.tools.bench import amqp_clients
from mpevent.tools.bench.amqp_clients import Confirms, notification_body
from mpevent.tools.broker import EPMD, HOST, PrivateBroker

BODY = b'{"jsonrpc":"2.0","method":"E_TEST","params":{"n":%d}}'


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def _listeners(proc: psutil.Process) -> list:
    # net_connections is psutil 6's name; pyproject allows 5.9.
    sockets = getattr(proc, "net_connections", None) or proc.connections
    return sockets(kind="inet")


def _gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    """Those of ``pids`` still in the process table after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = {pid for pid in pids if psutil.pid_exists(pid)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _node_processes(node: str) -> list[int]:
    """Processes anywhere on the machine whose command line names the node."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if node.split("@")[0] in " ".join(proc.info["cmdline"] or ()):
            found.append(proc.info["pid"])
    return found


def _publish_confirmed(
    broker: PrivateBroker, exchange: str, key: str, numbers: range, persistent: bool = False
) -> None:
    connection = broker.connect()
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # basic_publish returns once the broker confirmed
        props = pika.BasicProperties(
            content_type="application/json", delivery_mode=2 if persistent else None
        )
        for n in numbers:
            channel.basic_publish(exchange, key, BODY % n, props, mandatory=True)
    finally:
        connection.close()


def test_start_stop_leaves_nothing_behind(broker_runs: None) -> None:
    broker = PrivateBroker()
    broker.start()
    try:
        assert broker.dir is not None
        data_dir: Path = broker.dir
        assert data_dir.stat().st_mode & 0o777 == 0o700
        assert data_dir.owner() == "rabbitmq"
        pids = broker.pids()
        names = {psutil.Process(pid).name() for pid in pids}
        assert {"beam.smp", "epmd"} <= names, names
        # The node registered with its own epmd, not a system one.
        names_out = subprocess.run(
            [str(EPMD), "-port", str(broker.epmd_port), "-names"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        assert broker.node.split("@")[0] in names_out
        # Every listener of the node is on loopback.
        listeners = [
            c.laddr
            for pid in pids
            if psutil.pid_exists(pid)
            for c in _listeners(psutil.Process(pid))
            if c.status == psutil.CONN_LISTEN
        ]
        ports = {addr.port for addr in listeners}
        assert {broker.port, broker.dist_port, broker.epmd_port} <= ports
        assert all(addr.ip in ("127.0.0.1", "::1") for addr in listeners), listeners
        # rabbitmqctl reaches the node through the private epmd and cookie.
        connection = broker.connect()
        connection.channel().queue_declare("mpevent-test-ctl")
        assert "mpevent-test-ctl" in broker.ctl("list_queues", "name")
        connection.close()
    finally:
        broker.stop()
    assert broker.dir is None
    assert not data_dir.exists()
    assert not _gone(pids), "broker processes left after stop()"
    assert not _node_processes(broker.node)
    for port in (broker.port, broker.dist_port, broker.epmd_port):
        assert not _listening(port), port


def test_publish_with_confirms_reaches_consumer(broker: PrivateBroker) -> None:
    with broker.consume("k.confirms", "mpevent-test-confirms") as consumer:
        _publish_confirmed(broker, "mpevent-test-confirms", "k.confirms", range(200))
        got = consumer.wait_for(200, timeout=30)
        assert [d.body for d in got] == [BODY % n for n in range(200)]
        assert {(d.exchange, d.routing_key, d.content_type) for d in got} == {
            ("mpevent-test-confirms", "k.confirms", "application/json")
        }
        # Confirms are real: a mandatory message nobody is bound for comes back.
        with pytest.raises(pika.exceptions.UnroutableError):
            _publish_confirmed(broker, "mpevent-test-confirms", "k.nobody", range(1))
        time.sleep(0.2)
        assert len(consumer.deliveries) == 200


def test_default_exchange_queue_named_after_the_key(broker: PrivateBroker) -> None:
    with broker.consume("mpevent-test-direct") as consumer:
        _publish_confirmed(broker, "", "mpevent-test-direct", range(3), persistent=True)
        got = consumer.wait_for(3)
        assert [d.body for d in got] == [BODY % n for n in range(3)]
        assert {d.delivery_mode for d in got} == {2}
    # The queue went with the consumer: nothing routes there any more.
    with pytest.raises(pika.exceptions.UnroutableError):
        _publish_confirmed(broker, "", "mpevent-test-direct", range(1))


def test_socket_text(broker: PrivateBroker) -> None:
    assert broker.url == f"amqp://guest:guest@127.0.0.1:{broker.port}/"
    assert broker.socket("k") == f"rabbitmq:127.0.0.1:{broker.port}/k"
    assert (
        broker.socket("a.b", exchange="ev", persistent=True, vhost=None, max_age=500)
        == f"rabbitmq:127.0.0.1:{broker.port}/exchange=ev;persistent;max_age=500?a.b"
    )


def test_kill_then_restart_on_the_same_port_keeps_data(fresh_broker: PrivateBroker) -> None:
    broker = fresh_broker
    port = broker.port
    consumer = broker.consume("k.chaos", "mpevent-test-chaos", durable=True)
    try:
        # A durable queue nobody reads: what it holds must survive the crash.
        connection = broker.connect()
        channel = connection.channel()
        channel.queue_declare("mpevent-test-kept", durable=True)
        connection.close()
        _publish_confirmed(broker, "", "mpevent-test-kept", range(10), persistent=True)
        _publish_confirmed(broker, "mpevent-test-chaos", "k.chaos", range(50), persistent=True)
        assert len(consumer.wait_for(50, timeout=30)) >= 50

        broker.sync_metadata()  # the queues just declared, on disk before the crash
        before = broker.pids()
        crashed = {pid for pid in before if psutil.Process(pid).name() != "epmd"}
        broker.kill()
        assert not broker.running
        # Closed once the kernel has torn the killed VM down (a moment, on a busy machine).
        deadline = time.monotonic() + 10
        while _listening(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _listening(port)
        # Dead at once (init reaps the orphans a moment later).
        for pid in crashed:
            if psutil.pid_exists(pid):
                assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            broker.connect()

        broker.restart()
        assert broker.port == port
        assert not crashed & broker.pids()
        connection = broker.connect()
        kept = connection.channel().queue_declare("mpevent-test-kept", passive=True)
        assert kept.method.message_count == 10
        connection.close()
        _publish_confirmed(broker, "mpevent-test-chaos", "k.chaos", range(50, 100), persistent=True)
        deadline = time.monotonic() + 30
        expected = {BODY % n for n in range(100)}
        while set(consumer.bodies()) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(consumer.bodies()) == expected
        assert consumer.reconnects >= 1
        # A message seen twice was redelivered after the crash, and says so.
        seen: set[bytes] = set()
        for d in consumer.deliveries:
            assert d.body not in seen or d.redelivered
            seen.add(d.body)
    finally:
        consumer.close()
    pids = broker.pids()
    broker.stop()
    assert not _gone(pids)


def test_confirm_tracking_settles_single_and_multiple_acks() -> None:
    confirms = Confirms()
    for _ in range(6):
        confirms.published()
    confirms.settle(2, multiple=False)  # out of order: tag 1 stays outstanding
    assert (confirms.confirmed, list(confirms.outstanding)) == (1, [1, 3, 4, 5, 6])
    confirms.settle(4, multiple=True, nack=True)
    assert (confirms.confirmed, confirms.nacked, list(confirms.outstanding)) == (4, 3, [5, 6])
    confirms.settle(4, multiple=False)  # settled already: counted once only
    confirms.settle(6, multiple=True)
    assert (confirms.confirmed, confirms.nacked, list(confirms.outstanding)) == (6, 3, [])


def test_client_comparison_measures_each_installed_client(broker: PrivateBroker) -> None:
    body = notification_body()
    assert len(body) == 100
    assert json.loads(body)["jsonrpc"] == "2.0"
    result = amqp_clients.run(messages=300, rounds=1, window=50, broker=broker)
    by_name = {c["client"]: c for c in result["clients"]}
    assert set(by_name) == {c.name for c in amqp_clients.CLIENTS}
    assert by_name["pika-select"]["skipped"] is None  # pika is a dependency
    for c in by_name.values():
        if c["skipped"]:
            assert "not installed" in c["skipped"]
            continue
        assert c["rate"] > 0 and c["cpu_us"] > 0, c
        assert [r["nacked"] for r in c["rounds"]] == [0]
    text = amqp_clients.report(result)
    for name in by_name:
        assert name in text
    # The queue the loops filled is gone from the session broker.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        connection = broker.connect()
        try:
            connection.channel().queue_declare(amqp_clients.QUEUE, passive=True)
        finally:
            if connection.is_open:
                connection.close()
