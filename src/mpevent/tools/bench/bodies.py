"""What the children of a run do: sinks, producers, queue and pyzmq senders and
consumers, the producers' sender threads, a lane holder, the bare sendto loop.

Each body runs in a process :class:`~.plumbing.Spawner` forked, so its
arguments (the bus, sockets, queues, pipes, the pyzmq module) are inherited,
not pickled; a pyzmq context is only ever made in the process that uses it.
The timed workers wait on their :class:`~.plumbing.StartLine`; sinks report
what they counted on a pipe. An mpevent producer that finds its lane full
retries until the event fits, so mpevent loses nothing in the throughput
runs (its ``dropped`` counter then counts the retries); a pyzmq producer
whose socket is full (high-water mark) waits in ``send``, as a full queue's
``put`` does.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import os
import queue as queue_module
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from mpevent.api.bus import EventBus
from mpevent.protocol.payload import params_prefix
from mpevent.tools.bench.config import DATAGRAM, EVENT, EVENT_BYTES, PARAMS
from mpevent.tools.bench.extras import raiser
from mpevent.tools.bench.plumbing import StartLine, zmq_close, zmq_socket

BACKOFF = 1e-3  # an mpevent producer that finds its lane full sleeps this long
GIVE_UP = 60.0  # a producer that cannot enqueue for this long exits with an error
FASTER_FIFO_BATCH = 256  # get_many batch of the faster_fifo sender (as mpevent's BATCH)
PACE_NS = 100_000  # a paced producer sleeps only when its next event is further away
PR_SET_TIMERSLACK = 29  # Linux prctl option, not in the os module


def _low_timer_slack() -> None:
    """Ask Linux for precise sleeps (the default slack adds up to 50 us)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)  # 1 us


def count_sink(sock: socket.socket, expected: int, idle: float, conn: Any) -> None:
    """Count datagrams until ``expected`` or ``idle`` seconds of silence."""
    sock.settimeout(idle)
    buf = bytearray(65536)
    recv_into = sock.recv_into
    clock = time.monotonic_ns
    got = first = last = 0
    try:
        while got < expected:
            recv_into(buf)
            last = clock()
            if not got:
                first = last
            got += 1
    except TimeoutError:
        pass
    conn.send((got, first, last))


def fanout_sink(socks: list[socket.socket], expected: int, idle: float, conn: Any) -> None:
    """Count datagrams over many sockets (epoll), draining each ready socket."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    buf = bytearray(65536)
    clock = time.monotonic_ns
    got = first = last = 0
    while got < expected:
        ready = sel.select(idle)
        if not ready:
            break
        for key, _ in ready:
            recv_into = key.fileobj.recv_into  # type: ignore[union-attr]
            try:
                while True:
                    recv_into(buf)
                    got += 1
            except BlockingIOError:
                pass
        last = clock()
        if not first:
            first = last
    sel.close()
    conn.send((got, first, last))


def latency_sink(sock: socket.socket, expected: int, skip: int, idle: float, conn: Any) -> None:
    """Receive time minus the raise time the datagram carries (``"t":NS}}`` at its end)."""
    sock.settimeout(idle)
    buf = bytearray(65536)
    recv_into = sock.recv_into
    clock = time.monotonic_ns
    latencies = array.array("q")
    append = latencies.append
    got = 0
    try:
        while got < expected:
            n = recv_into(buf)
            now = clock()
            got += 1
            if got > skip:
                colon = buf.rfind(b":", 0, n)
                append(now - int(buf[colon + 1 : n - 2]))
    except TimeoutError:
        pass
    conn.send(got)
    conn.send_bytes(latencies.tobytes())


def _retry(raise_event: Callable[[str, Any], bool], params: dict[str, Any]) -> None:
    """The lane is full: back off until the event fits (nothing is lost)."""
    deadline = time.monotonic() + GIVE_UP
    while not raise_event(EVENT, params):
        if time.monotonic() > deadline:
            os._exit(3)  # nobody drains: the parent reports the exit code
        time.sleep(BACKOFF)


def mpevent_producer(
    bus: EventBus, start: StartLine, count: int, seq0: int, compiled: bool | None = None
) -> None:
    """Raise ``count`` events through the path ``compiled`` names (None: the bus's own)."""
    raise_event = raiser(bus, compiled)
    base = PARAMS
    start.wait()
    for seq in range(seq0, seq0 + count):
        params = {**base, "seq": seq}
        if not raise_event(EVENT, params):
            _retry(raise_event, params)


def paced_producer(bus: EventBus, start: StartLine, rate: float, count: int) -> None:
    """Raise ``count`` events at ``rate``/s on a fixed schedule, each carrying its raise time.

    The producer raises every event due within the next PACE_NS (100 us)
    at once, then sleeps (timer slack 1 us) until the next one is due: it
    leaves the CPUs to the sender and the sink, as a worker busy with its own
    work would. Sleeping before every event instead would cost it most of a
    core at 50 % load on this kind of machine (a sleep costs ~20 us of CPU in
    a VM), CPU the sender then lacks. Late (a sleep overshot), it raises what
    is due at once. The raise time in the params is taken at the raise, so
    raising early or late does not bias the figures.
    """
    _low_timer_slack()
    raise_event = bus.raise_event
    clock = time.monotonic_ns
    sleep = time.sleep
    base = PARAMS
    interval = 1e9 / rate
    start.wait()
    begin = clock()
    for seq in range(count):
        due = begin + int(seq * interval)
        ahead = due - clock()
        if ahead > PACE_NS:
            sleep(ahead / 1e9)
        params = {**base, "seq": seq, "t": clock()}
        if not raise_event(EVENT, params):
            _retry(raise_event, params)


def queue_producer(q: Any, start: StartLine, count: int, seq0: int) -> None:
    put = q.put
    base = PARAMS
    start.wait()
    for seq in range(seq0, seq0 + count):
        put((EVENT, {**base, "seq": seq}))


_FLUSH = object()  # SenderThread.flush's mark, in the place of an event name


class SenderThread:
    """A producer's own background sender, the way ``logging.QueueHandler`` (with a
    ``QueueListener``) and statsd clients do it: the caller only puts
    ``(name, params)`` on a ``SimpleQueue``; a thread of the same process, under
    the same GIL, encodes the notification with orjson and sends it."""

    def __init__(self, target: tuple[str, int]):
        self._queue: queue_module.SimpleQueue[Any] = queue_module.SimpleQueue()
        self.put = self._queue.put
        self._target = target
        self._thread = threading.Thread(target=self._run, name="bench-sender", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sendto = out.sendto
        dumps = orjson.dumps
        get = self._queue.get
        target = self._target
        while (item := get()) is not None:
            name, params = item
            if name is _FLUSH:
                params.set()
                continue
            sendto(dumps({"jsonrpc": "2.0", "method": name, "params": params}), target)
        out.close()

    def flush(self) -> None:
        """Until everything put so far has been sent (a blocking wait: no CPU spent)."""
        done = threading.Event()
        self.put((_FLUSH, done))
        done.wait()

    def close(self) -> None:
        """Send what is queued, then end the thread."""
        self.put(None)
        self._thread.join()


def thread_producer(start: StartLine, count: int, seq0: int, target: tuple[str, int]) -> None:
    """Put ``count`` events for this process's sender thread; return once it sent them
    (the process's CPU time, the thread's included, is the producer's)."""
    sender = SenderThread(target)
    queue_producer(sender, start, count, seq0)
    sender.close()


def zmq_datagram(message: bytes, prefixes: dict[bytes, bytes]) -> bytes:
    """The notification of a pyzmq message ``name + b" " + params``, built the way
    mpevent's sender builds it (the event's prefix, the params as they came, ``}``):
    the bytes ``orjson.dumps`` of the envelope gives, without decoding the params
    again. ``prefixes`` caches the prefix per event name."""
    name, _, params = message.partition(b" ")
    prefix = prefixes.get(name)
    if prefix is None:
        prefix = prefixes[name] = params_prefix(name.decode())
    return prefix + params + b"}"


def zmq_producer(zmq: Any, endpoint: str, start: StartLine, count: int, seq0: int) -> None:
    """PUSH ``count`` events without blocking (waiting only when the socket is full),
    then this producer's end mark (an empty message)."""
    ctx, sock = zmq_socket(zmq, zmq.PUSH, endpoint, bind=False)
    send = sock.send
    dumps = orjson.dumps
    name = EVENT_BYTES
    noblock, again = zmq.NOBLOCK, zmq.Again
    base = PARAMS
    start.wait()
    for seq in range(seq0, seq0 + count):
        message = name + b" " + dumps({**base, "seq": seq})
        try:
            send(message, noblock)
        except again:
            send(message)
    send(b"")
    zmq_close(ctx, sock)


def zmq_sender(
    zmq: Any, endpoint: str, target: tuple[str, int], producers: int, ready: Any
) -> None:
    """PULL, build each notification, sendto; stop at the end mark of every producer."""
    ctx, sock = zmq_socket(zmq, zmq.PULL, endpoint, bind=True)
    ready.send(True)  # bound: the producers may connect
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sendto = out.sendto
    recv = sock.recv
    prefixes: dict[bytes, bytes] = {}
    ends = 0
    while ends < producers:
        message = recv()
        if message:
            sendto(zmq_datagram(message, prefixes), target)
        else:
            ends += 1
    out.close()
    zmq_close(ctx, sock)


def zmq_consumer(zmq: Any, endpoint: str, counter: Any, ready: Any) -> None:
    """Producer-cost section: PULL and count what was taken, until an end mark."""
    ctx, sock = zmq_socket(zmq, zmq.PULL, endpoint, bind=True)
    ready.send(True)
    recv = sock.recv
    while recv():
        counter.value += 1
    zmq_close(ctx, sock)


def hold_lane(bus: EventBus, event: str, ready: Any, stop: Any, timeout: float) -> None:
    """Own a lane of ``bus`` (a first raise claims it) until ``stop`` is set."""
    bus.raise_event(event, PARAMS)
    ready.send(bus.producer.lane)
    stop.wait(timeout)


def queue_sender(q: Any, batched: bool, target: tuple[str, int]) -> None:
    """Get, encode with orjson, sendto; stop at a ``None``.

    ``batched`` (faster_fifo): take up to FASTER_FIFO_BATCH messages per
    ``get_many``, its fast way. Extra ``None`` in a batch go back for the
    other senders.
    """
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sendto = out.sendto
    dumps = orjson.dumps
    if not batched:
        get = q.get
        while (item := get()) is not None:
            name, params = item
            sendto(dumps({"jsonrpc": "2.0", "method": name, "params": params}), target)
        return
    get_many = q.get_many
    while True:
        try:
            items = get_many(timeout=1.0, max_messages_to_get=FASTER_FIFO_BATCH)
        except queue_module.Empty:
            continue
        for i, item in enumerate(items):
            if item is None:
                for _ in range(items[i + 1 :].count(None)):
                    q.put(None)
                return
            name, params = item
            sendto(dumps({"jsonrpc": "2.0", "method": name, "params": params}), target)


def queue_consumer(q: Any, batched: bool, counter: Any) -> None:
    """Producer-cost section: empty the queue, count what was taken, until ``None``."""
    if batched:
        while True:
            try:
                items = q.get_many(timeout=1.0, max_messages_to_get=FASTER_FIFO_BATCH)
            except queue_module.Empty:
                continue
            if items[-1] is None:
                return
            counter.value += len(items)
    get = q.get
    while get() is not None:
        counter.value += 1


def bare_sender(
    targets: list[tuple[str, int]], count: int, connected: bool, start: StartLine, conn: Any
) -> None:
    """Nothing but sendto of a prebuilt datagram, ``count`` times to every target."""
    datagram = DATAGRAM
    clock = time.monotonic_ns
    if connected:
        out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        out.connect(targets[0])
        send = out.send
        start.wait()
        t0 = clock()
        for _ in range(count):
            send(datagram)
    else:
        out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sendto = out.sendto
        start.wait()
        t0 = clock()
        if len(targets) == 1:
            target = targets[0]
            for _ in range(count):
                sendto(datagram, target)
        else:
            for _ in range(count):
                for target in targets:
                    sendto(datagram, target)
    conn.send(clock() - t0)
