"""The shared test harness: sinks, the daemon under test, waiting, forked children, bus checks.

Every test module imports its helpers from here; ``conftest.py`` holds only
the fixtures (and the autouse leak check). Process and socket plumbing comes
from :mod:`mpevent.system` (``fork_call``, ``reap``, ``Supervised``,
``set_rcvbuf``, ``free_port``): the tests use the library's own helpers, not
copies of them.

* waiting: :func:`wait_for` (nothing asserts a duration beyond a generous bound);
* processes: :func:`running`, :class:`Kids` (forked children, always ended in
  ``os._exit`` so no pytest code ever runs in them), :func:`gone`,
  :func:`live_children`, :func:`sender_processes`;
* sinks: :class:`UdpSink`, :class:`UnixSink`, :class:`Collector` (a forked
  reader, so the test process's GIL never slows the reading down),
  :class:`TcpSink` (an event_stream peer in a thread: answers, errors or
  silence in reliable mode; can stop reading and be restarted);
* the daemon under test: :class:`Daemon` (``mpevent serve`` in tmp_path);
* bus checks: :func:`raise_retrying`, :func:`check_stream`,
  :func:`check_accounting` and the predicates to wait on (:func:`drained`,
  :func:`backlogs_empty`, :func:`ring_empty`).

Counters are read once the bus is quiescent: producers and senders update
them without a common snapshot.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import psutil
import pytest

from mpevent.api.client import MIClient, MIUnavailable
from mpevent.protocol.jsonstream import JsonSplitter
from mpevent.shm.layout import L_HEAD, L_TAIL
from mpevent.system import Supervised, fork_call, free_port, reap, set_rcvbuf

if TYPE_CHECKING:  # conftest imports this module: collecting a protocol test needs no bus
    from mpevent import EventBus

T = TypeVar("T")

# OpenSIPS's MI methods for its event interface and process facts, by
# OpenSIPS's names (what its tools call): the hub must answer every one,
# under its 4.x name and under the older name 4.x keeps as an alias.
OPENSIPS_MI_METHODS = frozenset(
    {
        "event_subscribe",
        "events_list",
        "subscribers_list",
        "raise_event",
        "get_statistics",
        "list_statistics",
        "reset_statistics",
        "reset_all_statistics",
        "ps",
        "uptime",
        "version",
        "which",
        "evi:subscribe",
        "evi:list",
        "evi:subscribers",
        "evi:raise",
        "statistics:get",
        "statistics:list",
        "statistics:reset",
        "statistics:reset_all",
        "core:ps",
        "core:uptime",
        "core:version",
        "core:which",
    }
)

_QLEN_PATH = Path("/proc/sys/net/unix/max_dgram_qlen")
# How many datagrams a UNIX datagram socket queues before the sender sees EAGAIN.
UNIX_QLEN = int(_QLEN_PATH.read_text()) if _QLEN_PATH.exists() else 10
# As root, past net.core.rmem_max: the kernel must not drop datagrams for a sink.
SINK_RCVBUF = 64 << 20


# -- waiting --------------------------------------------------------------------


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01) -> T:
    """Poll ``predicate`` until it returns a truthy value, or ``timeout`` passes;
    its last value. Generous by default: the machine is shared."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# -- processes ------------------------------------------------------------------


@contextlib.contextmanager
def running(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """``proc`` for the block; then killed if it still runs, reaped, its pipes closed."""
    with proc:  # Popen's own exit closes the pipes and waits
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


class Kids:
    """The test's forked children (:func:`mpevent.system.fork_call`); whatever
    is left at teardown is killed and reaped."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self._lock = threading.Lock()  # children are forked from threads too

    def fork(self, fn: Callable[..., int | None], *args: Any) -> int:
        pid = fork_call(fn, *args)
        with self._lock:
            self.pids.add(pid)
        return pid

    def wait(self, pid: int, timeout: float = 30.0) -> int:
        """Its exit code (-N: killed by signal N). Still running after
        ``timeout`` s means deadlocked as far as the test is concerned: it is
        killed and :class:`TimeoutError` fails the test."""
        try:
            return reap(pid, timeout)
        finally:
            with self._lock:
                self.pids.discard(pid)

    def kill_all(self) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()


def gone(proc: psutil.Process) -> bool:
    """``proc`` has exited (a zombie not yet reaped counts as exited)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def live_children(pid: int) -> list[psutil.Process]:
    """The children of ``pid`` that have not exited."""
    return [p for p in psutil.Process(pid).children() if not gone(p)]


def sender_processes(bus: EventBus, count: int) -> list[psutil.Process]:
    """The bus's ``count`` sender processes (the hub's children), once they all run."""
    found = wait_for(
        lambda: (alive := live_children(bus.hub_pid)) and len(alive) == count and alive
    )
    assert found, f"the hub did not start {count} sender(s): {live_children(bus.hub_pid)}"
    return found


# -- sinks ------------------------------------------------------------------------


class UdpSink:
    """A UDP socket on loopback that collects datagrams; its receive buffer
    holds tens of thousands of them."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        set_rcvbuf(self.sock, SINK_RCVBUF)
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

    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped at this socket (receive buffer full):
        delivered by mpevent, lost by the reader. 0 when the kernel does not say."""
        if self.sock.family != socket.AF_INET:
            return 0
        inode = str(os.fstat(self.sock.fileno()).st_ino)
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] == inode:
                return int(fields[-1])
        return 0

    def close(self) -> None:
        self.sock.close()


class UnixSink(UdpSink):
    """A UNIX datagram socket at ``path`` (in the test's temporary directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.address = f"unix:{path}"

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


class TcpSink:
    """An event_stream peer on loopback, served by a thread: it accepts
    connections, splits what arrives into JSON texts and keeps them.

    ``answer``: what a request (a text with an id, reliable mode) gets:
    ``"result"``, ``"error"`` or ``"silence"``. ``reading`` can be cleared to
    stop reading (the sender's socket then fills up); :meth:`stop` closes the
    listener and every connection, :meth:`start` listens again on the same
    port (a peer that restarts).
    """

    def __init__(self, answer: str = "result", port: int | None = None) -> None:
        self.answer = answer
        self.port = port or free_port(socket.SOCK_STREAM)
        self.address = f"tcp:127.0.0.1:{self.port}"
        self.texts: list[bytes] = []
        self.connections = 0  # accepted so far
        self.reading = threading.Event()
        self.reading.set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.start()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, args=(listener,), daemon=True)
        self._thread.start()

    def _serve(self, listener: socket.socket) -> None:
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        peers: dict[int, tuple[socket.socket, Any]] = {}
        try:
            while not self._stop.is_set():
                for fd, _ in poller.poll(20):
                    if fd == listener.fileno():
                        conn, _ = listener.accept()
                        peers[conn.fileno()] = (conn, JsonSplitter(1 << 20))
                        poller.register(conn, select.POLLIN)
                        self.connections += 1
                        continue
                    if not self.reading.is_set():
                        continue
                    conn, splitter = peers[fd]
                    data = conn.recv(1 << 16)
                    if not data:
                        poller.unregister(fd)
                        conn.close()
                        del peers[fd]
                        continue
                    for text in splitter.feed(data):
                        self._take(conn, text)
                if not self.reading.is_set():
                    time.sleep(0.01)
        finally:
            for conn, _ in peers.values():
                conn.close()
            listener.close()

    def _take(self, conn: socket.socket, text: bytes) -> None:
        with self._lock:
            self.texts.append(text)
        message = orjson.loads(text)
        if "id" not in message or self.answer == "silence":
            return
        if self.answer == "error":
            reply = {"jsonrpc": "2.0", "error": {"code": 500, "message": "no"}, "id": message["id"]}
        else:
            reply = {"jsonrpc": "2.0", "result": "OK", "id": message["id"]}
        conn.sendall(orjson.dumps(reply))

    def notifications(self) -> list[bytes]:
        """What arrived, with any request id taken out: the notification bytes."""
        with self._lock:
            texts = list(self.texts)
        out = []
        for text in texts:
            message = orjson.loads(text)
            message.pop("id", None)
            out.append(orjson.dumps(message))
        return out

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    close = stop


def _collect(
    sock: socket.socket,
    out: Path,
    expect: int | None,
    until: bytes | None,
    linger: float,
    idle: float,
    burst_pause: float | None,
) -> int:
    sock.setblocking(False)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    got: list[bytes] = []
    stop_at = None
    last = time.monotonic()
    while True:
        before = len(got)
        try:
            while True:  # a burst: everything the socket holds
                data = sock.recv(1 << 17)
                got.append(data)
                if stop_at is None and (
                    (expect is not None and len(got) >= expect) or data == until
                ):
                    stop_at = time.monotonic() + linger  # then watch for extras
        except BlockingIOError:
            pass
        now = time.monotonic()
        if len(got) != before:
            last = now
        if (stop_at is not None and now >= stop_at) or now - last > idle:
            break
        if burst_pause:
            time.sleep(burst_pause)
        else:
            poller.poll(50)
    with open(out, "wb") as f:
        f.write(b"".join(struct.pack("<I", len(d)) + d for d in got))
    return 0


class Collector:
    """Reads ``sink`` in a forked process until it has ``expect`` datagrams
    (or has seen the datagram ``until``), then ``linger`` seconds more to
    catch duplicates; gives up after ``idle`` seconds without a datagram.
    ``burst_pause``: read until EAGAIN, then sleep that long (a slow reader).
    What it got comes back through the file ``out``.
    """

    def __init__(
        self,
        kids: Kids,
        sink: UdpSink,
        out: Path,
        *,
        expect: int | None = None,
        until: bytes | None = None,
        linger: float = 0.3,
        idle: float = 15.0,
        burst_pause: float | None = None,
    ) -> None:
        self.kids = kids
        self.sink = sink
        self.out = out
        self.pid = kids.fork(_collect, sink.sock, out, expect, until, linger, idle, burst_pause)

    def collected(self, timeout: float = 60.0) -> list[bytes]:
        code = self.kids.wait(self.pid, timeout)
        assert code == 0, f"collector exited with {code}"
        raw = self.out.read_bytes()
        got, at = [], 0
        while at < len(raw):
            (n,) = struct.unpack_from("<I", raw, at)
            got.append(raw[at + 4 : at + 4 + n])
            at += 4 + n
        return got


# -- the daemon under test ------------------------------------------------------------


class Daemon:
    """A running ``mpevent serve`` (a :class:`~mpevent.system.Supervised`
    child), isolated in ``tmp_path``: its own segment name, MI ports and
    runtime directory; its output in ``tmp_path / "serve.log"``."""

    def __init__(
        self, tmp_path: Path, extra_args: tuple[str, ...] = (), config: str | None = None
    ) -> None:
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
        self.log_path.write_bytes(b"")  # a hub started again in tmp_path logs afresh
        self.process = Supervised("mpevent serve", args, env=env, log=self.log_path)
        self.proc = self.process.proc
        self.wait_ready()

    def mi(self, method: str, params: Any = None, transport: str = "udp", timeout: float = 5.0):
        return MIClient(getattr(self, transport), timeout=timeout).call(method, params)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.process.alive():
                raise RuntimeError(f"mpevent serve exited {self.proc.returncode}: {self.log()}")
            try:
                self.mi("version", timeout=0.2)
                return
            except MIUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def log(self) -> str:
        return self.process.log()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (SIGKILL after ``timeout`` s); its exit code. Idempotent."""
        code = self.process.stop(sig, timeout)
        assert code is not None
        return code


# -- raising and checking on an EventBus ---------------------------------------------


def raise_retrying(
    raise_event: Callable[[str, Any], bool], event: str, params: Any, timeout: float = 30.0
) -> int:
    """Raise until accepted (False: ring full); returns how often it was refused."""
    refused = 0
    deadline = 0.0
    while not raise_event(event, params):
        if not refused:
            deadline = time.monotonic() + timeout
        elif time.monotonic() > deadline:
            raise AssertionError(f"{event}: raise_event refused for {timeout} s")
        refused += 1
        time.sleep(0.0002)
    return refused


def check_stream(
    got: list[bytes], expected: dict[Hashable, list[bytes]], what: str, sink: UdpSink | None = None
) -> None:
    """``got`` holds every expected datagram exactly once, each stream in order,
    and nothing else (a corrupt datagram is "something else")."""
    index: dict[bytes, tuple[Hashable, int]] = {}
    for key, stream in expected.items():
        for i, datagram in enumerate(stream):
            index[datagram] = (key, i)
    drops = f" (kernel receive drops: {sink.kernel_drops()})" if sink else ""
    unknown = [d for d in got if d not in index]
    assert not unknown, f"{what}: {len(unknown)} datagrams never raised, e.g. {unknown[:3]}"
    dupes = {d: n for d, n in Counter(got).items() if n > 1}
    assert not dupes, f"{what}: {len(dupes)} datagrams delivered more than once, e.g. {dupes}"
    seqs: dict[Hashable, list[int]] = defaultdict(list)
    for d in got:
        key, i = index[d]
        seqs[key].append(i)
    for key, stream in expected.items():
        mine = seqs[key]
        if mine == list(range(len(stream))):
            continue
        missing = sorted(set(range(len(stream))) - set(mine))
        disorder = next((j for j in range(1, len(mine)) if mine[j] < mine[j - 1]), None)
        raise AssertionError(
            f"{what}, stream {key!r}: got {len(mine)} of {len(stream)}; "
            f"{len(missing)} missing (first {missing[:5]}); "
            f"first out of order at position {disorder}{drops}"
        )


def event_stats(bus: EventBus, name: str) -> dict[str, int]:
    """The counters of event ``name``."""
    return bus.stats()["events"][name]


def destination_stats(bus: EventBus, event: str, sock: str) -> dict[str, Any]:
    """The counters of the one subscription of ``event`` to ``sock``."""
    rows = [r for r in bus.stats()["destinations"] if r["event"] == event and r["socket"] == sock]
    assert len(rows) == 1, f"no single stats row for {event} -> {sock}: {bus.stats()}"
    return rows[0]


def drained(bus: EventBus) -> bool:
    """Every enqueued event has been taken from the ring and accounted for."""
    return all(
        e["enqueued"] == e["dispatched"] + e["unrouted"] + e["send_oversize"]
        for e in bus.stats()["events"].values()
    )


def backlogs_empty(bus: EventBus) -> bool:
    """No destination has a datagram waiting in its backlog: everything routed
    to it was sent, failed or dropped."""
    return all(row["pending"] == 0 for row in bus.stats()["destinations"])


def ring_empty(bus: EventBus) -> bool:
    """Every lane's records have been taken and committed by a sender.

    Read from the lane control words because after a producer was killed
    with SIGKILL the event counters cannot tell until the hub has reclaimed
    its lane.
    """
    seg = bus.segment
    words, layout = seg.words, seg.layout
    return all(
        words[layout.lane_word(lane) + L_TAIL] == words[layout.lane_word(lane) + L_HEAD]
        for lane in range(layout.geometry.ring_lanes)  # shared lanes too
    )


def check_accounting(stats: dict[str, Any], *, nothing_pending: bool = True) -> None:
    """Every event and datagram of a quiescent bus is accounted for once.

    Per event, everything enqueued was dispatched, unrouted or refused as too
    large by the sender; per destination, everything routed was sent,
    failed, dropped or is pending in the backlog, and with ``nothing_pending``
    (the test has let every destination finish) nothing is.
    ``raised`` is not checked here: it is the sum of enqueued, dropped and
    rejected by definition, so the tests compare it with the calls they made.
    """
    for name, e in stats["events"].items():
        assert e["enqueued"] == e["dispatched"] + e["unrouted"] + e["send_oversize"], (name, e)
        assert e["oversize"] <= e["rejected"], (name, e)
    for row in stats["destinations"]:
        for counts in [row, *row.get("members", ())]:  # a virtual one's members too
            assert counts["pending"] >= 0, row
            assert counts["in_handoff"] >= 0, row
            assert counts["routed"] == (
                counts["sent"] + counts["failed"] + counts["dropped"] + counts["pending"]
            ), row
            if nothing_pending:
                assert counts["pending"] == 0, row
    assert stats["lost_in_flight"] == 0, stats


# Tests that fork producers from a process running threads on purpose (the
# fork-safety promise under test, or a killer thread beside forked
# producers): Python 3.12+ warns about exactly that; it is the test's fork.
forks_from_threads = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"
)
