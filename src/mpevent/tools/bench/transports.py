"""Section 6, transports: ``tcp:`` and ``rabbitmq:`` delivery against each one's own raw loop.

Per transport, side by side in the same run, rounds interleaved and shuffled:

* ``tcp:``: one producer raising N events as fast as it can, one sender,
  one ``tcp:`` destination, read by a reader process that counts the JSON
  texts on the stream; against one process doing ``sendall`` of the same
  notifications, one per message, to the same kind of reader (``TCP_NODELAY``,
  as the stream endpoint's connection has). Delivered is what the reader
  counted; the bytes it read must be the notifications' exact sum.
* ``rabbitmq:``: the same producer and sender, one ``rabbitmq:`` destination
  served by its relay, counted when the broker confirmed it (the
  destination row's ``sent``); against pika ``SelectConnection``'s own publish
  loop with confirms and the relay's window (:mod:`.amqp_clients`'s loop, in
  a forked child), the same body size, to the same queue of one private
  broker (:class:`~mpevent.tools.broker.PrivateBroker`, started once for the
  section). The raw loop's time includes its connect and close (a few ms);
  the relay is connected before mpevent's clock starts. The relay's hand-off
  lane and backlog are sized to hold a whole run, so the producer never
  waits and nothing is dropped: the rate is the relay's own.
* the producer's cost per ``raise_event`` with one ``udp:``, one ``tcp:`` and
  one ``rabbitmq:`` subscriber, timed call by call as in section 1
  (:func:`.cost._timed_calls`, net of the timer), on each fast path.

The CPU per delivered event is every mpevent process's (producer, sender,
relay, hub) or the raw loop's, plus the peer's: the reader, or the broker
(all its processes and threads). Without a broker (no ``rabbitmq-server``,
not root) the RabbitMQ cases are skipped with a note.

:class:`TextCounter` (pure) is how the readers count texts: a notification
starts with ``{"jsonrpc"``, so counting that mark in C (``bytes.count``), with
the marks that straddle two reads, keeps the reader far from the bottleneck.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import random
import socket
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import psutil

from mpevent import defaults
from mpevent.api.bus import EventBus
from mpevent.processes.relay import WINDOW
from mpevent.processes.sender.backlog import ENTRY_OVERHEAD
from mpevent.protocol.payload import encode_notification
from mpevent.shm.layout import R_CONNECTED
from mpevent.tools.bench import amqp_clients
from mpevent.tools.bench.bodies import mpevent_producer
from mpevent.tools.bench.config import DATAGRAM, EVENT, PARAMS, PURE, Config
from mpevent.tools.bench.cost import net_of_timer, time_rounds
from mpevent.tools.bench.cpu import CpuMark, other_cores
from mpevent.tools.bench.extras import Extras, raiser
from mpevent.tools.bench.memory import MemoryMonitor
from mpevent.tools.bench.plumbing import CTX, Spawner, StartLine, udp_addr, udp_socket
from mpevent.tools.figures import median, per_second, ratio

HOST = "127.0.0.1"
MARK = b'{"jsonrpc"'  # how every notification starts: one per text
QUEUE = amqp_clients.QUEUE  # the broker queue both sides publish to (default exchange)
READY_TIMEOUT = 30.0
POLL = 0.0005  # seconds between looks at the rabbitmq: row's sent count
ROLES = ("producer", "sender", "relay", "hub", "peer")  # the peer: reader or broker
RAW = {"tcp": "bare_tcp", "rabbitmq": "pika_select"}  # each transport's own raw loop
MPEVENT = {"tcp": "mpevent_tcp", "rabbitmq": "mpevent_rabbitmq"}
LABELS = {
    "mpevent_tcp": "mpevent: 1 producer, 1 sender",
    "bare_tcp": "bare sendall loop, same bytes",
    "mpevent_rabbitmq": "mpevent: 1 producer, 1 sender, relay",
    "pika_select": f"pika SelectConnection loop, confirms, window {WINDOW}",
}
COST_EVENTS = {"udp": "E_T_UDP", "tcp": "E_T_TCP", "rabbitmq": "E_T_RABBITMQ"}
# A hand-off record: ring header, slot/member/subscription prefix, the params;
# with room to spare (sizing the relay's hand-off lane for a whole run).
HANDOFF_RECORD_BYTES = 192

assert DATAGRAM.startswith(MARK)


class TextCounter:
    """Counts the notifications on a stream read in arbitrary pieces: pure.

    Each text starts with :data:`MARK`; a mark that two reads split is
    counted once, from the last bytes of the stream kept between feeds.
    """

    __slots__ = ("_tail", "bytes", "texts")

    def __init__(self) -> None:
        self.texts = 0
        self.bytes = 0
        self._tail = b""  # the stream's last len(MARK) - 1 bytes

    def feed(self, data: bytes | bytearray, n: int | None = None) -> None:
        """Count ``data[:n]`` (all of it without ``n``)."""
        n = len(data) if n is None else n
        if not n:
            return
        keep = len(MARK) - 1
        texts = data.count(MARK, 0, n)
        if self._tail:
            # Neither side alone can hold a whole mark: what this finds straddles.
            texts += (self._tail + data[: min(keep, n)]).count(MARK)
        self._tail = (self._tail + data[max(0, n - keep) : n])[-keep:]
        self.texts += texts
        self.bytes += n


# -- the children's bodies --------------------------------------------------------


def stream_reader(
    listener: socket.socket, expected: int | None, idle: float, ready: Any, result: Any
) -> None:
    """Accept one connection, count its texts until ``expected`` (None: until EOF)
    or ``idle`` seconds of silence; say when the first text came (the warm-up)."""
    listener.settimeout(READY_TIMEOUT)
    conn, _ = listener.accept()
    listener.close()
    conn.settimeout(idle)
    buf = bytearray(1 << 18)
    recv_into = conn.recv_into
    counter = TextCounter()
    clock = time.monotonic_ns
    last = 0
    warmed = False
    try:
        while expected is None or counter.texts < expected:
            n = recv_into(buf)
            if not n:
                break
            last = clock()
            counter.feed(buf, n)
            if not warmed and counter.texts:
                ready.send(True)
                warmed = True
    except TimeoutError:
        pass
    result.send((counter.texts, counter.bytes, last))
    conn.close()


def bare_stream_sender(port: int, count: int, start: StartLine, conn: Any) -> None:
    """Connect, send the warm-up text, then ``count`` notifications, one ``sendall``
    each: the bytes mpevent's producer raises (``seq`` 0 to count - 1)."""
    notes = [encode_notification(EVENT, {**PARAMS, "seq": seq}) for seq in range(count)]
    out = socket.create_connection((HOST, port), timeout=READY_TIMEOUT)
    out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the stream endpoint's
    out.settimeout(None)
    out.sendall(DATAGRAM)
    sendall = out.sendall
    start.wait()
    t0 = time.monotonic_ns()
    for note in notes:
        sendall(note)
    conn.send(time.monotonic_ns() - t0)
    out.close()


def pika_loop(port: int, count: int, body: bytes, window: int, start: StartLine, conn: Any) -> None:
    """:mod:`.amqp_clients`'s pika SelectConnection loop: connect, publish ``count``
    with confirms and ``window`` unconfirmed at most, close; its time and nacks."""
    loop = amqp_clients.LOOPS["pika-select"]
    start.wait()
    t0 = time.monotonic_ns()
    nacked = loop(port, count, body, window)
    conn.send((time.monotonic_ns() - t0, nacked))


# -- processes and their CPU -------------------------------------------------------


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds used so far by live processes, every thread of each (a broker's
    VM runs many): ``/proc/PID/task/*/schedstat``, else psutil's clock ticks."""
    total = 0.0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            tasks = []
        got = 0.0
        for tid in tasks:
            path = f"/proc/{pid}/task/{tid}/schedstat"
            with contextlib.suppress(OSError, ValueError, IndexError), open(path) as f:
                got += int(f.read().split()[0]) / 1e9
        if not got:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                got = t.user + t.system
        total += got
    return total


def mpevent_processes(bus: EventBus) -> dict[str, list[int]]:
    """The bus's own processes by role: its hub, and the hub's senders and relays
    (``python -m mpevent.processes ROLE SPEC``)."""
    roles: dict[str, list[int]] = {"hub": [bus.hub_pid]}
    for child in psutil.Process(bus.hub_pid).children():
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        at = cmd.index("mpevent.processes") if "mpevent.processes" in cmd else -1
        role = cmd[at + 1] if 0 <= at < len(cmd) - 1 else "sender"
        roles.setdefault(role, []).append(child.pid)
    return roles


def _cpu_by_pid(roles: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    return {role: {pid: cpu_seconds([pid]) for pid in pids} for role, pids in roles.items()}


def _cpu_used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict:
    """CPU seconds per role between two readings; a process that ended meanwhile
    (a broker's short-lived helper) counts 0, never a negative figure."""
    return {
        role: sum(max(0.0, after[role].get(pid, 0.0) - used) for pid, used in pids.items())
        for role, pids in before.items()
    }


def _watch(monitor: MemoryMonitor, roles: dict[str, list[int]], pipeline: str) -> None:
    for role, pids in roles.items():
        for pid in pids:
            monitor.watch(pid, pipeline, role)


def _wait(what: str, ready: Callable[[], Any], timeout: float = READY_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := ready()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"transports: {what} within {timeout:g} s")
        time.sleep(0.001)
    return got


def _relay_connected(bus: EventBus) -> bool:
    seg = bus.segment
    relays = seg.layout.geometry.relays
    return any(seg.words[seg.layout.relay_word(r) + R_CONNECTED] for r in range(relays))


def _row(bus: EventBus, event: str) -> dict[str, Any]:
    (row,) = [r for r in bus.stats()["destinations"] if r["event"] == event]
    return row


def _settled(bus: EventBus) -> bool:
    stats = bus.stats()
    t = stats["totals"]
    drained = t["dispatched"] + t["unrouted"] + t["send_oversize"] + t["lost"] >= t["enqueued"]
    return drained and all(r["pending"] == 0 for r in stats["destinations"])


def _raise_until_taken(raise_event: Callable[..., bool], event: str) -> None:
    _wait(f"{event}: a warm-up raise was not taken", lambda: raise_event(event, PARAMS))


# -- the broker ------------------------------------------------------------------


@contextlib.contextmanager
def _channel(broker: Any) -> Any:
    connection = broker.connect()
    try:
        yield connection.channel()
    finally:
        connection.close()


def _queue_depth(broker: Any) -> int:
    with _channel(broker) as channel:
        return channel.queue_declare(QUEUE, passive=True).method.message_count


def _purge(broker: Any) -> None:
    with _channel(broker) as channel:
        channel.queue_declare(QUEUE)
        channel.queue_purge(QUEUE)


def start_broker(notes: list[str]) -> Any:
    """A started private broker, or None with a note saying why the RabbitMQ
    cases are skipped."""
    from mpevent.tools.broker import BrokerError, PrivateBroker, available

    ok, reason = available()
    if not ok:
        notes.append(f"rabbitmq: cases skipped, no private broker: {reason}")
        return None
    broker = PrivateBroker()
    try:
        broker.start()
    except BrokerError as exc:
        broker.stop()
        notes.append(f"rabbitmq: cases skipped, the private broker did not start: {exc}")
        return None
    return broker


# -- the runs ----------------------------------------------------------------------


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    sock.listen(4)
    return sock


def _notes_bytes(count: int) -> int:
    """The bytes of the notifications with ``seq`` 0 to count - 1 (DATAGRAM has 0)."""
    base = len(DATAGRAM) - 1
    return sum(base + len(str(seq)) for seq in range(count))


def run_tcp(kind: str, n: int, cfg: Config, monitor: MemoryMonitor) -> dict[str, Any]:
    """One ``tcp:`` run: mpevent (``mpevent_tcp``) or the bare loop (``bare_tcp``)."""
    mark = CpuMark.now()
    listener = _listener()
    port = listener.getsockname()[1]
    pipes = [CTX.Pipe(duplex=False) for _ in range(3)]
    (res_r, res_w), (ready_r, ready_w), (aux_r, aux_w) = pipes
    start = StartLine(1)
    with contextlib.ExitStack() as stack:
        stack.callback(listener.close)
        for r, w in pipes:
            stack.callback(r.close)
            stack.callback(w.close)
        bus = None
        if kind == MPEVENT["tcp"]:
            bus = stack.enter_context(EventBus(senders=1))
            bus.publish_event(EVENT)
        sp = stack.enter_context(Spawner(monitor, kind))
        args = (listener, n + 1, cfg.idle_timeout, ready_w, res_w)
        reader = sp.start("reader", stream_reader, *args)
        roles: dict[str, list[int]] = {}
        if bus is not None:
            bus.subscribe(EVENT, f"tcp:{HOST}:{port}", expire=None)
            roles = mpevent_processes(bus)
            _watch(monitor, roles, kind)
            _raise_until_taken(bus.raise_event, EVENT)  # the warm-up text (seq 0)
            worker = sp.start("producer", mpevent_producer, bus, start, n, 0)
        else:
            worker = sp.start("sender", bare_stream_sender, port, n, start, aux_w)
        sp.receive(ready_r, READY_TIMEOUT)  # the warm-up arrived: connected, serving
        before = _cpu_by_pid(roles)
        t0 = start.release()
        monitor.sample()
        sp.wait([worker, reader], cfg.run_timeout)
        texts, got_bytes, last = sp.receive(res_r, cfg.run_timeout)
        after = _cpu_by_pid(roles)
        monitor.sample()
        delivered = texts - 1  # the warm-up is not the run's
        result: dict[str, Any] = {
            "transport": "tcp",
            "pipeline": kind,
            "events": n,
            "delivered": delivered,
            "lost": n - delivered,
            "bytes_ok": got_bytes - len(DATAGRAM) == _notes_bytes(n),
            "seconds": (last - t0) / 1e9,
            "rate": per_second(delivered, (last - t0) / 1e9) if delivered > 0 else math.nan,
        }
        if bus is None:
            result["send_rate"] = per_second(n, sp.receive(aux_r, cfg.run_timeout) / 1e9)
        else:
            result["destination"] = _row(bus, EVENT)
    cpu = sp.cpu_by_role()
    cpu["peer"] = cpu.pop("reader", math.nan)
    cpu.update(_cpu_used(before, after))
    return _with_cpu(result, cpu, mark)


def run_rabbitmq(
    kind: str, n: int, cfg: Config, monitor: MemoryMonitor, broker: Any
) -> dict[str, Any]:
    """One ``rabbitmq:`` run: mpevent (``mpevent_rabbitmq``) or pika's loop (``pika_select``)."""
    _purge(broker)
    mark = CpuMark.now()
    aux_r, aux_w = CTX.Pipe(duplex=False)
    start = StartLine(1)
    body = encode_notification(EVENT, {**PARAMS, "seq": n // 2})  # mpevent's typical size
    with contextlib.ExitStack() as stack:
        stack.callback(aux_r.close)
        stack.callback(aux_w.close)
        bus = None
        roles: dict[str, list[int]] = {}
        if kind == MPEVENT["rabbitmq"]:
            # Room for the whole run in the hand-off lane and the relay's backlog.
            held = n + WINDOW
            handoff = 1 << max(
                defaults.HANDOFF_SIZE.bit_length() - 1, (n * HANDOFF_RECORD_BYTES).bit_length()
            )
            bus = stack.enter_context(
                EventBus(
                    senders=1,
                    relays=1,
                    handoff_size=handoff,
                    backlog=max(defaults.BACKLOG, held),
                    backlog_bytes=max(
                        defaults.BACKLOG_BYTES, held * (len(body) + 8 + ENTRY_OVERHEAD)
                    ),
                )
            )
            bus.publish_event(EVENT)
            bus.subscribe(EVENT, broker.socket(QUEUE), expire=None)
            _wait("the relay did not connect", lambda: _relay_connected(bus))
            roles = mpevent_processes(bus)
            _watch(monitor, roles, kind)
        sp = stack.enter_context(Spawner(monitor, kind))
        if bus is not None:
            worker = sp.start("producer", mpevent_producer, bus, start, n, 0)
        else:
            args = (broker.port, n, body, WINDOW, start, aux_w)
            worker = sp.start("publisher", pika_loop, *args)
        roles["peer"] = sorted(broker.pids())
        before = _cpu_by_pid(roles)
        t0 = start.release()
        monitor.sample()
        result: dict[str, Any] = {"transport": "rabbitmq", "pipeline": kind, "events": n}
        if bus is not None:
            deadline = time.monotonic() + cfg.run_timeout
            while True:
                row = _row(bus, EVENT)
                if row["sent"] + row["failed"] + row["dropped"] >= n:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind}: {row['sent']} of {n} confirmed")
                monitor.sample(force=False)
                time.sleep(POLL)
            seconds = (time.monotonic_ns() - t0) / 1e9
            sp.wait([worker], cfg.run_timeout)
            delivered, nacked = row["sent"], row["failed"]
            result["destination"] = row
        else:
            elapsed_ns, nacked = sp.receive(aux_r, cfg.run_timeout)
            seconds = elapsed_ns / 1e9
            sp.wait([worker], cfg.run_timeout)
            delivered = n - nacked
        after = _cpu_by_pid(roles)
        monitor.sample()
    result.update(
        delivered=delivered,
        lost=n - delivered,
        nacked=nacked,
        in_queue=_queue_depth(broker),
        seconds=seconds,
        rate=per_second(delivered, seconds) if delivered > 0 else math.nan,
    )
    cpu = sp.cpu_by_role()
    if "publisher" in cpu:
        cpu["sender"] = cpu.pop("publisher")  # the raw loop publishes where a sender would
    cpu.update(_cpu_used(before, after))
    return _with_cpu(result, cpu, mark)


def _with_cpu(result: dict[str, Any], cpu: dict[str, float], mark: CpuMark) -> dict[str, Any]:
    got = result["delivered"]
    per_event = {role: cpu[role] / got * 1e6 for role in ROLES if role in cpu} if got > 0 else {}
    result["cpu_us_per_event"] = per_event
    result["cpu_us_total"] = sum(v for v in per_event.values() if not math.isnan(v))
    result["other_cores"] = other_cores(mark, CpuMark.now())
    return result


# -- the producer's cost per subscriber kind ------------------------------------------


def cost_label(case: str, compiled: bool | None = None) -> str:
    """``raise_1_tcp`` -> "raise_event, 1 tcp: subscriber" (", compiled" / ", pure path")."""
    if case == "timer":
        return "timer overhead (subtracted)"
    kind = case.removeprefix("raise_1_").removesuffix(PURE)
    text = f"raise_event, 1 {kind}: subscriber"
    if case.endswith(PURE):
        return f"{text}, pure path"
    return f"{text}, compiled" if compiled else text


def transport_cost(
    cfg: Config, monitor: MemoryMonitor, extras: Extras, rng: random.Random, broker: Any
) -> dict[str, Any]:
    """Per-call ``raise_event`` cost with one subscriber of each transport, timed and
    interleaved as section 1 does; between samples every destination is left to
    drain, so each timed call finds the same state."""
    kinds = ["udp", "tcp", *(["rabbitmq"] if broker is not None else [])]
    sink = udp_socket(4 << 20)
    sink.setblocking(False)
    listener = _listener()
    # The reader's result pipe is never read here: it reads until the bus hangs up.
    (ready_r, ready_w), (_, res_w) = pipes = [CTX.Pipe(duplex=False) for _ in range(2)]
    with contextlib.ExitStack() as stack:
        stack.callback(sink.close)
        stack.callback(listener.close)
        for r, w in pipes:
            stack.callback(r.close)
            stack.callback(w.close)
        # The reader first: it reads until the bus (closed before it is reaped) hangs up.
        sp = stack.enter_context(Spawner(monitor, "mpevent_tcp"))
        sp.start("reader", stream_reader, listener, None, cfg.run_timeout, ready_w, res_w)
        if broker is not None:
            _purge(broker)
        bus = stack.enter_context(EventBus(senders=1))
        _watch(monitor, mpevent_processes(bus), "mpevent")
        addresses = {"udp": udp_addr(sink), "tcp": f"tcp:{HOST}:{listener.getsockname()[1]}"}
        if broker is not None:
            addresses["rabbitmq"] = broker.socket(QUEUE)
        for kind in kinds:
            bus.publish_event(COST_EVENTS[kind])
            bus.subscribe(COST_EVENTS[kind], addresses[kind], expire=None)
        if broker is not None:
            _wait("the relay did not connect", lambda: _relay_connected(bus))
        cases: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
        for suffix, compiled in extras.paths.items():
            raise_event = raiser(bus, compiled)
            for kind in kinds:
                cases[f"raise_1_{kind}{suffix}"] = (raise_event, (COST_EVENTS[kind], PARAMS))
            for kind in kinds:  # claims the path's lane and warms every route, untimed
                _raise_until_taken(raise_event, COST_EVENTS[kind])
        sp.receive(ready_r, READY_TIMEOUT)  # the tcp: warm-up arrived
        cases["timer"] = (operator.is_, (EVENT, PARAMS))

        def settle() -> None:
            """Every destination drained and the sink emptied: each sample starts alike."""
            with contextlib.suppress(RuntimeError):
                _wait("settle", lambda: _settled(bus))
            try:
                while sink.recv(65536):
                    pass
            except BlockingIOError:
                pass

        samples, cpu = time_rounds(cases, cfg, rng, settle, monitor)
        stats = bus.stats()
    timer, results = net_of_timer(samples, cpu, partial(cost_label, compiled=extras.compiled))
    for name, r in results.items():
        if name != "timer":
            suffix = PURE if name.endswith(PURE) else ""
            r["x_udp"] = ratio(r["median"], results[f"raise_1_udp{suffix}"]["median"])
    return {
        "rounds": cfg.cost_rounds,
        "calls_per_round": cfg.cost_sample,
        "timer_overhead_ns": timer,
        "cases": results,
        "totals": stats["totals"],
        "destinations": stats["destinations"],
    }


# -- the section ----------------------------------------------------------------------


def transports(
    cfg: Config, monitor: MemoryMonitor, extras: Extras, rng: random.Random, notes: list[str]
) -> dict[str, Any]:
    """The section's figures; a note in ``notes`` for each part it skipped."""
    with contextlib.ExitStack() as stack:
        broker = start_broker(notes)
        if broker is not None:
            stack.callback(broker.stop)
        cost = transport_cost(cfg, monitor, extras, rng, broker)
        cases = [("tcp", MPEVENT["tcp"]), ("tcp", RAW["tcp"])]
        if broker is not None:
            cases += [("rabbitmq", MPEVENT["rabbitmq"]), ("rabbitmq", RAW["rabbitmq"])]
        runs = []
        for _ in range(cfg.transport_rounds):
            order = list(cases)
            rng.shuffle(order)
            for transport, kind in order:
                if transport == "tcp":
                    runs.append(run_tcp(kind, cfg.tcp_events, cfg, monitor))
                else:
                    runs.append(run_rabbitmq(kind, cfg.broker_events, cfg, monitor, broker))
        version = None
        if broker is not None:
            with _channel(broker) as channel:
                channel.queue_delete(QUEUE)
                found = channel.connection._impl.server_properties.get("version", "?")
                found = found.decode() if isinstance(found, bytes) else found
                version = f"RabbitMQ {found}"
    return {
        "rounds": cfg.transport_rounds,
        "tcp_events": cfg.tcp_events,
        "broker_events": cfg.broker_events,
        "window": WINDOW,
        "broker": version,
        "summary": summarize_runs(runs, cases),
        "runs": runs,
        "producer_cost": cost,
    }


def summarize_runs(runs: list[dict[str, Any]], cases: list[tuple[str, str]]) -> list[dict]:
    """Per case: median rate and CPU over the rounds, sums of what was delivered,
    and the ratios to its transport's raw loop (pure)."""
    summary = []
    for transport, kind in cases:
        mine = [r for r in runs if r["pipeline"] == kind]
        roles = [role for role in ROLES if any(role in r["cpu_us_per_event"] for r in mine)]
        row: dict[str, Any] = {
            "transport": transport,
            "pipeline": kind,
            "label": LABELS[kind],
            "rate": median([r["rate"] for r in mine]),
            "rates": [r["rate"] for r in mine],
            "events": sum(r["events"] for r in mine),
            "delivered": sum(r["delivered"] for r in mine),
            "lost": sum(r["lost"] for r in mine),
            "cpu_us_per_event": {
                role: median([r["cpu_us_per_event"].get(role, math.nan) for r in mine])
                for role in roles
            },
            "cpu_us_total": median([r["cpu_us_total"] for r in mine]),
        }
        if transport == "tcp":
            row["bytes_ok"] = all(r["bytes_ok"] for r in mine)
        else:  # what the broker's queue held after each run: the run's events
            row["in_queue"] = [r["in_queue"] for r in mine]
            row["in_queue_ok"] = all(r["in_queue"] == r["events"] for r in mine)
        summary.append(row)
    for row in summary:
        raw = next((r for r in summary if r["pipeline"] == RAW[row["transport"]]), None)
        row["x_raw"] = ratio(row["rate"], raw and raw["rate"])
        row["cpu_x_raw"] = ratio(row["cpu_us_total"], raw and raw["cpu_us_total"])
    return summary
