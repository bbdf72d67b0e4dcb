"""Shared fixtures: every test must leave no process, segment or socket file behind."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

SHM = Path("/dev/shm")
SO_RCVBUFFORCE = 33  # Linux; the socket module does not export it
# The MI methods DESIGN.md promises (OpenSIPS's names).
DESIGN_METHODS = {
    "event_subscribe",
    "events_list",
    "subscribers_list",
    "raise_event",
    "get_statistics",
    "list_statistics",
    "reset_statistics",
    "ps",
    "uptime",
    "version",
    "which",
}


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


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


class UdpSink:
    """A UDP socket on loopback that collects datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:  # as root, beyond net.core.rmem_max: the kernel must not drop for us
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"udp:127.0.0.1:{self.sock.getsockname()[1]}"

    def receive(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Up to ``count`` datagrams, waiting at most ``timeout`` for each."""
        got = []
        self.sock.settimeout(timeout)
        try:
            while len(got) < count:
                got.append(self.sock.recv(70000))
        except TimeoutError:
            pass
        return got

    def quiet(self, wait: float = 0.3) -> list[bytes]:
        """Whatever else arrives within ``wait`` seconds (expected: nothing)."""
        return self.receive(1 << 30, timeout=wait)

    def close(self) -> None:
        self.sock.close()


class UnixSink(UdpSink):
    """A UNIX datagram socket in the test's temporary directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.address = f"unix:{path}"

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


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


@contextlib.contextmanager
def running(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """``proc`` for the block; then killed if it still runs, reaped, its pipes closed."""
    with proc:  # Popen's own exit closes the pipes and waits
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Poll ``predicate`` until it returns a truthy value; generous for a noisy CI."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port nobody uses right now on 127.0.0.1 (UDP and TCP checked)."""
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        other = socket.SOCK_STREAM if kind == socket.SOCK_DGRAM else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, other) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


class Daemon:
    """A running ``mpevent serve`` in a subprocess, isolated in tmp_path."""

    def __init__(self, tmp_path: Path, extra_args: tuple[str, ...] = (), config: str | None = None):
        import secrets
        import subprocess
        import sys

        self.name = f"mpevent-test-{os.getpid()}-{secrets.token_hex(3)}"
        self.udp_port = free_port()
        self.http_port = free_port(socket.SOCK_STREAM)
        self.run_dir = tmp_path / "run"
        self.unix_path = self.run_dir / "mi.sock"
        self.udp = f"udp:127.0.0.1:{self.udp_port}"
        self.unix = f"unix:{self.unix_path}"
        self.http = f"http://127.0.0.1:{self.http_port}/mi"
        self.log_path = tmp_path / "serve.log"
        self.config_path = tmp_path / "mpevent.toml"
        args = [
            sys.executable, "-m", "mpevent", "serve",
            "--name", self.name,
            "--mi-udp", f"127.0.0.1:{self.udp_port}",
            "--mi-unix", str(self.unix_path),
            "--mi-http", f"127.0.0.1:{self.http_port}",
            "--log-level", "debug",
        ]  # fmt: skip
        if config is not None:
            self.config_path.write_text(config)
            args += ["--config", str(self.config_path)]
        args += list(extra_args)
        env = dict(os.environ, XDG_RUNTIME_DIR=str(self.run_dir))
        self.run_dir.mkdir(exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()

    def mi(self, method: str, params=None, transport: str = "udp", timeout: float = 5.0):
        from mpevent.api.client import MIClient

        return MIClient(getattr(self, transport), timeout=timeout).call(method, params)

    def wait_ready(self, timeout: float = 20.0) -> None:
        from mpevent.api.client import MIUnavailable

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mpevent serve exited {self.proc.returncode}: {self.log()}")
            try:
                self.mi("version", timeout=0.2)
                return
            except MIUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = 15, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    code = d.stop()
    assert code == 0, f"mpevent serve exited {code}:\n{d.log()}"
