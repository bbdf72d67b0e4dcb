"""Process plumbing: starting a run's children, starting them together, and
the sockets and queues they share.

:class:`Spawner` starts each child of a run (forked: the bus, sockets and
queues are inherited), watches it for :class:`~.memory.MemoryMonitor`,
collects the CPU time it used, and never leaves one running: on the way
out each is given a grace period, then killed and reaped.
:class:`StartLine` releases a run's workers together, after the parent took
the start time. The sink sockets get a receive buffer large enough that the
sink is never the bottleneck; :func:`udp_drops` says when the kernel dropped
at one anyway. pyzmq's sockets meet on an abstract UNIX address
(:func:`zmq_endpoint`): the fastest local transport, and no file to leave
behind.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import resource
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mpevent.system import set_rcvbuf
from mpevent.tools.bench.memory import SAMPLE_EVERY, MemoryMonitor

SINK_RCVBUF = 64 << 20  # per sink socket (memory is only taken as datagrams queue)
QUEUE_MAXSIZE = 10_000  # multiprocessing.Queue bound (puts block beyond it)
ZMQ_HWM = QUEUE_MAXSIZE  # pyzmq's high-water marks, in messages (the default is 1000)
ZMQ_LINGER_MS = 60_000  # a closing pyzmq socket delivers what it holds, but not forever
FASTER_FIFO_BYTES = 4 << 20  # faster_fifo.Queue bound (the default is 1 MB)
BARRIER_TIMEOUT = 60.0

CTX = mp.get_context("fork")  # the bus is inherited: children must be forked


class Spawner:
    """Starts one run's child processes; on exit none is left running.

    On a normal exit each child gets a grace period to finish, then is
    killed; after an exception they are killed at once. Always reaped.
    """

    def __init__(self, monitor: MemoryMonitor, pipeline: str):
        self.monitor = monitor
        self.pipeline = pipeline
        self.procs: list[Any] = []
        self._cpu: list[tuple[str, Any]] = []  # (role, the CPU seconds a child reports)

    def start(
        self, role: str, target: Callable[..., Any], *args: Any, pipeline: str | None = None
    ) -> Any:
        pipeline = pipeline or self.pipeline
        cpu = CTX.RawValue("d", math.nan)
        proc = CTX.Process(
            target=_report_cpu,
            args=(cpu, target, *args),
            name=f"bench-{pipeline}-{role}",
            daemon=True,
        )
        proc.start()
        self.procs.append(proc)
        self._cpu.append((role, cpu))
        self.monitor.watch(proc.pid, pipeline, role)
        return proc

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds (user + system) per role of the children that finished."""
        out: dict[str, float] = {}
        for role, cpu in self._cpu:
            if not math.isnan(cpu.value):
                out[role] = out.get(role, 0.0) + cpu.value
        return out

    def wait(self, procs: Sequence[Any], timeout: float) -> None:
        """Wait for ``procs`` to exit, sampling memory meanwhile; raise on failure."""
        deadline = time.monotonic() + timeout
        for proc in procs:
            while proc.exitcode is None:
                self.monitor.sample(force=False)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} did not finish within {timeout:.0f} s")
                proc.join(SAMPLE_EVERY)
            if proc.exitcode != 0:
                raise RuntimeError(f"{proc.name} exited with code {proc.exitcode}")

    def receive(self, conn: Any, timeout: float) -> Any:
        """The next object from ``conn``, sampling memory while waiting."""
        deadline = time.monotonic() + timeout
        while not conn.poll(SAMPLE_EVERY):
            self.monitor.sample(force=False)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.pipeline}: no result within {timeout:.0f} s")
        return conn.recv()

    def __enter__(self) -> Spawner:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        grace = time.monotonic() + (10.0 if exc_type is None else 0.0)
        for proc in self.procs:
            proc.join(max(0.0, grace - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        self.monitor.forget_dead()


def _report_cpu(cpu: Any, target: Callable[..., Any], *args: Any) -> None:
    """A child's body: ``target``, then the CPU time it used, for the profile."""
    target(*args)
    usage = resource.getrusage(resource.RUSAGE_SELF)  # microseconds, not clock ticks
    cpu.value = usage.ru_utime + usage.ru_stime


def udp_socket(rcvbuf: int = SINK_RCVBUF) -> socket.socket:
    """A sink socket on loopback with a ``rcvbuf``-byte receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    set_rcvbuf(sock, rcvbuf)  # beyond net.core.rmem_max as root: the sink must keep up
    sock.bind(("127.0.0.1", 0))
    return sock


def udp_addr(sock: socket.socket) -> str:
    """The socket as a subscription address."""
    host, port = sock.getsockname()
    return f"udp:{host}:{port}"


def udp_drops(socks: Iterable[socket.socket]) -> int | None:
    """Datagrams the kernel dropped at these sockets (full receive buffer), from
    /proc/net/udp; None where that file is not there."""
    inodes = {str(os.fstat(s.fileno()).st_ino) for s in socks}
    try:
        with open("/proc/net/udp") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    total = 0
    for line in lines:
        fields = line.split()
        if len(fields) >= 13 and fields[9] in inodes:
            total += int(fields[-1])
    return total


@contextlib.contextmanager
def closing_queue(q: Any, stop: int = 0) -> Any:
    """Put ``stop`` end marks (None) in ``q`` on the way out, then close it if it is a
    multiprocessing.Queue: its feeder thread is flushed and joined (abandoned after
    an error, when nobody may read any more), so no thread outlives the run."""
    failed = False
    try:
        yield q
    except BaseException:
        failed = True
        raise
    finally:
        for _ in range(stop):
            with contextlib.suppress(Exception):
                q.put(None, timeout=1.0)
        if hasattr(q, "join_thread"):
            if failed:
                q.cancel_join_thread()
            q.close()
            q.join_thread()


class StartLine:
    """The workers of a run get ready (forked, set up), then start together, only
    after the parent took the start time."""

    def __init__(self, workers: int):
        self._ready = CTX.Barrier(workers + 1)
        self._go = CTX.Event()

    def wait(self) -> None:
        """In a worker: ready; returns when the parent says go."""
        self._ready.wait(BARRIER_TIMEOUT)
        if not self._go.wait(BARRIER_TIMEOUT):
            os._exit(4)

    def release(self) -> int:
        """In the parent: wait until every worker is ready; the start time (monotonic ns)."""
        self._ready.wait(BARRIER_TIMEOUT)
        t0 = time.monotonic_ns()
        self._go.set()
        return t0


def zmq_endpoint() -> str:
    """A fresh abstract-namespace ipc address for one pyzmq pipeline (no socket file)."""
    return f"ipc://@mpevent-bench-{os.getpid()}-{secrets.token_hex(6)}"


def zmq_socket(zmq: Any, kind: int, endpoint: str, bind: bool) -> tuple[Any, Any]:
    """A context of this process's own and one socket on ``endpoint``; close both with
    :func:`zmq_close`. Only ever in the process that uses it: a zmq context does
    not survive a fork."""
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.SNDHWM, ZMQ_HWM)
    sock.setsockopt(zmq.RCVHWM, ZMQ_HWM)
    sock.setsockopt(zmq.LINGER, ZMQ_LINGER_MS)
    (sock.bind if bind else sock.connect)(endpoint)
    return ctx, sock


def zmq_close(ctx: Any, sock: Any) -> None:
    """Close, and wait (at most the linger time) until what was sent has gone out."""
    sock.close()
    ctx.term()


def make_queue(kind: str, ff: Any) -> Any:
    if kind == "mp_queue":
        return CTX.Queue(maxsize=QUEUE_MAXSIZE)
    return ff.Queue(max_size_bytes=FASTER_FIFO_BYTES)
