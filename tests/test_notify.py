"""systemd's Type=notify: ``mpevent serve`` says READY=1 and STOPPING=1 on $NOTIFY_SOCKET.

A test socket plays systemd: a UNIX datagram socket (on a path, or in the
abstract namespace as "@name"), whose address the daemon finds in its
environment, as a service started by systemd does.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Daemon

from mpevent.api.client import MIFifoClient
from mpevent.api.daemon import notify_address, sd_notify


def test_notify_address():
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@systemd-notify") == "\0systemd-notify"
    assert notify_address("") is None
    assert notify_address("vsock:2:1234") is None


class FakeSystemd:
    """What systemd listens with: a UNIX datagram socket."""

    def __init__(self, address: str, bind_to: str) -> None:
        self.address = address  # as $NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.path = None if bind_to.startswith("\0") else Path(bind_to)

    def messages(self, timeout: float) -> list[bytes]:
        """Every datagram that arrives until ``timeout`` s pass without one."""
        got = []
        self.sock.settimeout(timeout)
        try:
            while True:
                got.append(self.sock.recv(4096))
        except TimeoutError:
            return got

    def next(self, timeout: float = 30.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096)

    def close(self) -> None:
        self.sock.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


@pytest.fixture(params=["path", "abstract"])
def systemd(request, tmp_path: Path) -> Iterator[FakeSystemd]:
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        fake = FakeSystemd(path, path)
    else:
        name = f"mpevent-test-notify-{os.getpid()}-{secrets.token_hex(4)}"
        fake = FakeSystemd(f"@{name}", f"\0{name}")
    yield fake
    fake.close()


def test_sd_notify_sends_the_state(systemd: FakeSystemd):
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": systemd.address})
    assert systemd.next(5) == b"READY=1"


def test_sd_notify_without_systemd_is_a_no_op(tmp_path: Path):
    assert not sd_notify("READY=1", {})
    # A socket that is gone is logged, never fatal.
    assert not sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})


def test_serve_says_ready_once_listening_then_stopping(
    systemd: FakeSystemd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
    d = Daemon(tmp_path)
    try:
        assert systemd.next() == b"READY=1"
        # Ready means every listener answers: the UDP socket, the FIFO.
        assert d.mi("version", timeout=2.0)
        fifo = d.run_dir / "mpevent" / f"{d.name}_fifo"
        assert MIFifoClient(fifo, timeout=2.0).call("version")
        assert systemd.messages(0.3) == []  # once
    finally:
        code = d.stop()
    assert code == 0, d.log()
    assert systemd.messages(1.0) == [b"STOPPING=1"]


def test_ready_comes_only_after_the_hub_runs(
    systemd: FakeSystemd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A hub that cannot start (a config error) never says READY=1.
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
    bad = tmp_path / "bad.toml"
    bad.write_text('[mi]\nfifo = "relative"\n')
    done = subprocess.run(
        [sys.executable, "-m", "mpevent", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert systemd.messages(0.3) == []
