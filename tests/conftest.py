"""Fixtures; every test must leave no process, segment or socket file behind.

The helpers the fixtures hand out (sinks, the daemon, forked children) are
in ``support.py``, which test modules import directly.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support import Daemon, Kids, UdpSink, UnixSink

from mpevent.tools.broker import INSTALL_HINT, PrivateBroker, available

SHM = Path("/dev/shm")
# The session's broker: its processes come and go on their own (the disk
# monitor's df), so the leak check never counts them.
_SESSION_BROKERS: list[PrivateBroker] = []


def pytest_report_header() -> str:
    """Which producer path this run tests (``MPEVENT_NO_EXTENSIONS=1``: the pure one)."""
    from mpevent.processes import fastpath

    return f"mpevent producer path: {fastpath.describe()}"


def _children() -> set[int]:
    pids = {p.pid for p in psutil.Process().children(recursive=True)}
    for broker in _SESSION_BROKERS:
        pids -= broker.pids()
    return pids


def _mpevent_segments() -> set[str]:
    """Our segments: test names carry the test process's pid (another test run
    on the same machine must not fail this one)."""
    names = set()
    for p in SHM.iterdir():
        if "mpevent" not in p.name:
            continue
        owner = re.search(r"-(\d+)(?:-|$)", p.name)
        if owner is None or int(owner.group(1)) == os.getpid():
            names.add(p.name)
    return names


@pytest.fixture(autouse=True)
def no_leaks(tmp_path: Path) -> Iterator[None]:
    """Fail a test that leaves child processes, segments or socket files behind."""
    before_children = _children()
    before_segments = _mpevent_segments()
    yield
    deadline = time.monotonic() + 10
    while True:
        extra = _children() - before_children
        # Zombies of our own forks are reaped by the tests; give stragglers time.
        extra = {pid for pid in extra if psutil.pid_exists(pid)}
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    leaked_segments = _mpevent_segments() - before_segments
    sockets = [p for p in tmp_path.rglob("*") if p.is_socket()]
    for pid in extra:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    for name in leaked_segments:
        (SHM / name).unlink(missing_ok=True)
    assert not extra, f"test left processes running: {sorted(extra)}"
    assert not leaked_segments, f"test left shared-memory segments: {sorted(leaked_segments)}"
    assert not sockets, f"test left socket files: {sockets}"


@pytest.fixture
def udp_sink() -> Iterator[UdpSink]:
    sink = UdpSink()
    yield sink
    sink.close()


@pytest.fixture
def unix_sink(tmp_path: Path) -> Iterator[UnixSink]:
    sink = UnixSink(tmp_path / "sink.sock")
    yield sink
    sink.close()


@pytest.fixture
def kids() -> Iterator[Kids]:
    """The test's forked children: whatever a failing test left running is killed."""
    k = Kids()
    yield k
    k.kill_all()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    code = d.stop()
    assert code == 0, f"mpevent serve exited {code}:\n{d.log()}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests that need a broker; with MPEVENT_BROKER=off (make test runs
    them in a pass of their own: the broker is the same whatever the interpreter or
    the producer's path) leave them out of this run, and say so."""
    needing, others = [], []
    for item in items:
        if {"broker", "fresh_broker", "broker_runs"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)
        (needing if item.get_closest_marker("broker") else others).append(item)
    if os.environ.get("MPEVENT_BROKER") == "off" and needing:
        config.hook.pytest_deselected(items=needing)
        items[:] = others


def _require_broker() -> None:
    """Broker tests skip on a developer machine without RabbitMQ, and fail in CI."""
    ok, reason = available()
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the broker tests: {reason}")
    hint = "" if "apt-get" in reason else f" (they need rabbitmq-server, {INSTALL_HINT}, and root)"
    pytest.skip(f"no private RabbitMQ broker: {reason}{hint}")


@pytest.fixture
def broker_runs() -> None:
    """For a test that starts brokers of its own: skip (or, in CI, fail) where none can run."""
    _require_broker()


@pytest.fixture(scope="session")
def broker() -> Iterator[PrivateBroker]:
    """One private RabbitMQ broker for the whole session (tests must not kill it)."""
    _require_broker()
    b = PrivateBroker()
    b.start()
    _SESSION_BROKERS.append(b)
    yield b
    _SESSION_BROKERS.remove(b)
    b.stop()


@pytest.fixture
def fresh_broker() -> Iterator[PrivateBroker]:
    """A broker of the test's own, to kill and restart; stopped before the leak check."""
    _require_broker()
    b = PrivateBroker()
    b.start()
    yield b
    b.stop()
