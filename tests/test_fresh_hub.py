"""The hub and the senders start in fresh interpreters, never forked from the application.

What that must give an application: ``EventBus`` works in a process that
already runs threads, with no warning from mpevent on any Python; the hub
and senders hold none of the application's descriptors; they still die
with their creator and leave nothing behind. Each check runs a real
application in a subprocess of the interpreter under test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from mpevent import EventBus
from mpevent.shm.layout import S_PID
from mpevent.system import free_port

APP_WITH_THREADS = textwrap.dedent(
    """
    import socket, sys, threading, time
    from mpevent import EventBus

    stop = threading.Event()
    workers = [threading.Thread(target=stop.wait, daemon=True) for _ in range(3)]
    for t in workers:
        t.start()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(20)
    with EventBus() as bus:
        bus.publish_event("E_THREADS")
        bus.subscribe("E_THREADS", f"udp:127.0.0.1:{sink.getsockname()[1]}")
        assert bus.raise_event("E_THREADS", {"n": 1})
        print(sink.recv(1000).decode())
    stop.set()
    """
)


def run_python(code: str, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_eventbus_in_a_threaded_process_gives_no_warning() -> None:
    """With every DeprecationWarning shown (``-W error`` would not do:
    CPython swallows this one, issued after the fork), stderr stays empty."""
    got = run_python(APP_WITH_THREADS, "-W", "always::DeprecationWarning")
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == '{"jsonrpc":"2.0","method":"E_THREADS","params":{"n":1}}'
    assert got.stderr == ""


@pytest.mark.skipif(sys.version_info < (3, 12), reason="the fork warning exists from 3.12 on")
def test_the_warning_check_sees_a_fork_from_a_threaded_process() -> None:
    """The control for the test above: the same way of looking does see the
    warning a fork from a threaded process gets, so an empty stderr there
    means something."""
    code = textwrap.dedent(
        """
        import os, threading
        t = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
        t.start()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        """
    )
    got = run_python(code, "-W", "always::DeprecationWarning")
    assert "DeprecationWarning" in got.stderr and "fork" in got.stderr


def _socket_inodes(pid: int) -> set[str]:
    """``socket:[inode]`` links among a process's open descriptors."""
    out = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


def test_hub_and_senders_hold_no_descriptor_of_the_application() -> None:
    """A listening socket the application opened before the bus (inheritable,
    as a socket handed over by systemd or a shell would be) is in no mpevent
    process; once the application closes it, the port is free again."""
    port = free_port(socket.SOCK_STREAM)
    listener = socket.create_server(("127.0.0.1", port))
    os.set_inheritable(listener.fileno(), True)
    inode = f"socket:[{os.fstat(listener.fileno()).st_ino}]"
    with EventBus(senders=2) as bus:
        hub = psutil.Process(bus.hub_pid)
        deadline = time.monotonic() + 20
        while len(hub.children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        mpevent_pids = [hub.pid, *(p.pid for p in hub.children())]
        assert len(mpevent_pids) == 3
        for pid in mpevent_pids:
            assert inode not in _socket_inodes(pid), f"process {pid} holds the app's socket"
        listener.close()
        again = socket.create_server(("127.0.0.1", port))  # nobody kept it bound
        again.close()


def test_hub_and_senders_stop_when_their_creator_is_killed() -> None:
    """SIGKILL to the application: its hub notices and stops, and so do the senders."""
    code = textwrap.dedent(
        """
        import time
        from mpevent import EventBus
        bus = EventBus(senders=2)
        print(bus.hub_pid, flush=True)
        time.sleep(120)
        """
    )
    app = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        hub = psutil.Process(int(app.stdout.readline()))
        deadline = time.monotonic() + 20
        while len(hub.children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        family = [hub, *hub.children()]
        assert len(family) == 3
        app.send_signal(signal.SIGKILL)
        app.wait()
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"still running after their creator died: {alive}"
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
        app.stdout.close()


def test_eventbus_returns_once_every_sender_serves() -> None:
    """A sender starts in a fresh interpreter after the hub (about 0.1 s): the
    bus must not return before each one serves, or the first events would
    wait for it."""
    with EventBus(senders=3) as bus:
        layout = bus.segment.layout
        pids = {bus.segment.words[layout.sender_word(i) + S_PID] for i in range(3)}
        children = {p.pid for p in psutil.Process(bus.hub_pid).children()}
        assert pids == children and len(pids) == 3
