"""``mpevent serve`` as an operator runs it: attach by name, restarts, signals, config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from support import Daemon, UdpSink, wait_for

import mpevent
from mpevent.protocol.payload import encode_notification


def _subscribers(d: Daemon, event: str) -> list[str]:
    result = d.mi("subscribers_list", [event])
    return [s["socket"] for s in result["Event"]["Subscribers"]]


def test_unrelated_process_attaches_by_name_and_raises(daemon: Daemon, udp_sink: UdpSink):
    daemon.mi("event_publish", ["E_ATTACH"])
    daemon.mi("event_subscribe", ["E_ATTACH", udp_sink.address, 60])
    # A fresh interpreter, not forked from the hub: it only knows the name.
    script = textwrap.dedent(f"""
        import mpevent
        conn = mpevent.connect({daemon.name!r})
        ok = [conn.raise_event("E_ATTACH", {{"n": i}}) for i in range(100)]
        assert all(ok), ok
        conn.close()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    got = udp_sink.receive(100)
    assert got == [encode_notification("E_ATTACH", {"n": i}) for i in range(100)]


def test_attached_producer_survives_a_hub_restart(tmp_path: Path, udp_sink: UdpSink):
    first = Daemon(tmp_path)
    try:
        first.mi("event_publish", ["E_LIFE"])
        first.mi("event_subscribe", ["E_LIFE", udp_sink.address, 60])
        conn = mpevent.connect(first.name)
        assert conn.raise_event("E_LIFE", {"n": 1})
        assert udp_sink.receive(1) == [encode_notification("E_LIFE", {"n": 1})]
        assert first.stop() == 0
    finally:
        first.stop()
    try:
        # The hub is gone: raising never raises into the caller, never
        # blocks, and what could not be delivered is counted.
        slowest = 0.0
        for i in range(2000):
            t0 = time.perf_counter()
            assert conn.raise_event("E_LIFE", {"n": i}) is False
            slowest = max(slowest, time.perf_counter() - t0)
        assert conn.undelivered == 2000
        assert slowest < 0.5, f"a raise took {slowest:.3f} s with the hub down"

        # A new hub on the same name: the producer reattaches by itself.
        second = Daemon(tmp_path, extra_args=("--name", first.name))
        try:
            second.mi("event_publish", ["E_LIFE"])
            second.mi("event_subscribe", ["E_LIFE", udp_sink.address, 60])

            def delivered_again() -> bool:
                return conn.raise_event("E_LIFE", {"n": "back"})

            assert wait_for(delivered_again, timeout=20), "never reattached"
            assert conn.reattached == 1
            assert udp_sink.receive(1) == [encode_notification("E_LIFE", {"n": "back"})]
        finally:
            conn.close()
            assert second.stop() == 0
    finally:
        conn.close()


def test_sigterm_drains_and_leaves_nothing_behind(tmp_path: Path, udp_sink: UdpSink):
    d = Daemon(tmp_path)
    segment = Path("/dev/shm") / d.name
    try:
        d.mi("event_publish", ["E_DRAIN"])
        d.mi("event_subscribe", ["E_DRAIN", udp_sink.address, 60])
        conn = mpevent.connect(d.name)
        sent = sum(conn.raise_event("E_DRAIN", {"n": i}) for i in range(20000))
        conn.close()
        assert segment.exists()
        children = {p.pid for p in psutil.Process(d.proc.pid).children()}
        assert children, "the hub has sender processes"
    finally:
        code = d.stop(signal.SIGTERM)
    assert code == 0, d.log()
    # Everything that was in the ring was delivered before the hub exited.
    assert len(udp_sink.receive(sent, timeout=5)) == sent
    assert not segment.exists()
    assert not any(p.is_socket() or p.is_fifo() for p in d.run_dir.iterdir())
    assert not any(psutil.pid_exists(pid) for pid in children)


def test_sighup_applies_a_changed_permanent_subscription(tmp_path: Path):
    a, b = UdpSink(), UdpSink()
    config = 'events = ["E_CONF"]\n[[subscribe]]\nevent = "E_CONF"\nsocket = "{}"\n'
    d = Daemon(tmp_path, config=config.format(a.address))
    try:
        assert _subscribers(d, "E_CONF") == [a.address]
        listed = d.mi("subscribers_list", ["E_CONF", a.address])["Event"]["Subscriber"]
        assert listed["expire"] == "never"
        d.config_path.write_text(config.format(b.address))
        d.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: _subscribers(d, "E_CONF") == [b.address], timeout=10), d.log()
        d.mi("raise_event", ["E_CONF", {"x": 1}])
        assert b.receive(1) == [encode_notification("E_CONF", {"x": 1})]
        assert a.quiet() == []
        # A broken file on SIGHUP keeps the running configuration.
        d.config_path.write_text("events = [1, 2]\n")
        d.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "not reloaded" in d.log(), timeout=10), d.log()
        assert _subscribers(d, "E_CONF") == [b.address]
    finally:
        assert d.stop() == 0, d.log()
        a.close()
        b.close()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[segment]\nlanes = 'many'\n", "segment.lanes"),
        ("[segment]\nlane_size = 1000\n", "segment.lane_size"),
        ("[segmnt]\nlanes = 2\n", "segmnt"),
        ("[mi]\nudp = '10.1.2.3:8080'\n", "mi.udp"),
        ("[mi]\nunix_mode = 'rw'\n", "mi.unix_mode"),
        ("[log]\nlevel = 'loud'\n", "log.level"),
        ("[[subscribe]]\nevent = 'E_X'\nsocket = 'udp:127.0.0.1'\n", "subscribe[0].socket"),
        ("events = ['bad name']\n", "events[0]"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path: Path, text: str, key: str):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path / "run"))
    proc = subprocess.run(
        [sys.executable, "-m", "mpevent", "serve", "--config", str(path), "--name", "mpevent-bad"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr
    assert key in proc.stderr
    assert not Path("/dev/shm/mpevent-bad").exists()


def test_second_hub_on_the_same_name_refuses(daemon: Daemon, tmp_path: Path):
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path / "run2"))
    proc = subprocess.run(
        [sys.executable, "-m", "mpevent", "serve", "--name", daemon.name, "--mi-udp", ""],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 3, proc.stderr
    assert "running hub" in proc.stderr
    assert daemon.mi("version")  # the first one is untouched


def test_a_killed_hub_is_replaced_and_its_stale_segment_removed(tmp_path: Path, udp_sink):
    first = Daemon(tmp_path)
    hub = psutil.Process(first.proc.pid)
    senders = hub.children()
    first.stop(signal.SIGKILL)
    for p in senders:  # senders notice their hub is gone and leave
        p.wait(10)
    assert (Path("/dev/shm") / first.name).exists(), "SIGKILL leaves the segment"
    second = Daemon(tmp_path, extra_args=("--name", first.name))
    try:
        assert "stale segment" in second.log()
        second.mi("event_publish", ["E_NEW"])
        second.mi("event_subscribe", ["E_NEW", udp_sink.address, 60])
        second.mi("raise_event", ["E_NEW"])
        assert udp_sink.receive(1) == [encode_notification("E_NEW")]
    finally:
        assert second.stop() == 0, second.log()
    assert not (Path("/dev/shm") / first.name).exists()


def test_producers_keep_running_when_the_hub_is_killed(tmp_path: Path, udp_sink):
    first = Daemon(tmp_path, extra_args=("--lane-size", "131072"))
    name = first.name
    first.mi("event_publish", ["E_K"])
    first.mi("event_subscribe", ["E_K", udp_sink.address, 60])
    conn = mpevent.connect(name)
    try:
        assert conn.raise_event("E_K", {"n": -1})
        assert udp_sink.receive(1)
        first.stop(signal.SIGKILL)
        # Nobody drains any more: the lane fills, then every raise is a
        # counted drop. Never an exception, never a wait.
        refused = 0
        slowest = 0.0
        for i in range(20000):
            t0 = time.perf_counter()
            refused += not conn.raise_event("E_K", {"n": i})
            slowest = max(slowest, time.perf_counter() - t0)
        e = conn.stats()["events"]["E_K"]
        assert refused > 0
        assert e["dropped"] == refused
        assert slowest < 0.5
        second = Daemon(tmp_path, extra_args=("--name", name))
        try:
            second.mi("event_publish", ["E_K"])
            second.mi("event_subscribe", ["E_K", udp_sink.address, 60])
            udp_sink.quiet(0.2)  # whatever the old sender sent before it died
            assert wait_for(lambda: conn.raise_event("E_K", {"n": "again"}), timeout=20)
            assert conn.reattached == 1
            assert encode_notification("E_K", {"n": "again"}) in udp_sink.receive(1)
        finally:
            assert second.stop() == 0, second.log()
    finally:
        conn.close()
