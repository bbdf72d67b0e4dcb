"""Chaos: the transports beyond datagrams under faults (issue 11, "Fault tests").

What each test breaks, and what must hold meanwhile:

* a private broker SIGKILLed mid-stream, then restarted
  (:func:`test_broker_killed_mid_stream_then_restarted`): producers never
  block (raise p99 during the outage within a generous factor of before, no
  call anywhere near a broker's timeouts), the datagram subscriber of the
  same event gets everything, in order and on time, delivery to the broker
  resumes within 5 s of the restart (an event raised after the kill reaches
  the consumer), and per broker destination the distinct notifications the
  consumer got plus the counted dropped and failed equal routed, with no
  more duplicates than counted re-publishes;
* a broker that is unresponsive (every process SIGSTOPped: connected,
  silent) and, in the long run, one that is dead and stays dead
  (:func:`test_datagram_subscribers_while_the_broker_is_down`): datagram
  subscribers get 100 %, their latency p99 meanwhile within a generous
  factor of before (the issue's figure; printed with ``-s``);
* a TCP peer that stops reading: its bounded backlog fills, drops are
  counted, a UDP subscriber of the same event gets everything, and what was
  kept arrives in order once the peer reads again;
* a TCP peer that restarts: reconnected, what waited arrives, and only what
  was written around a drop may be missing (counted sent: TCP took it);
* reliable mode at volume with peers that answer errors, nothing, or both
  by id: counted failed (timeouts among them), exactly; through virtual
  FAILOVER a UDP member gets every event.

Lengths: ``make test`` runs the short version (a 2.5 s broker outage, a few
TCP restarts); ``make chaos`` sets ``MPEVENT_CHAOS_ROUNDS``, which here
selects the long one (the broker down for 10 s, more restarts and events);
``MPEVENT_BROKER_OUTAGE_SECONDS`` sets the outage on its own.

Timing: a datagram's latency is the kernel's receive timestamp
(``SO_TIMESTAMPNS``) minus the raise time the producer put in its params,
both ``CLOCK_REALTIME``, so the reader's own delays never count. Raise
durations are measured in a forked producer of its own (no thread of the
test competes with it for the GIL), ``perf_counter_ns`` around each call
(``CLOCK_MONOTONIC``, the clock of the test's phase marks too).

The broker queue is durable and the destination ``persistent``: what the
broker confirmed is on its disk, still in the queue after a SIGKILL and a
restart, so ``sent`` can be compared with what the consumer got. A queue
that did not survive the restart would have let the broker confirm, then
discard, whatever the relay published before the consumer declared the
queue again: ``sent`` and the consumer would disagree through no fault of
mpevent. The consumer (:class:`mpevent.tools.broker.Consumer`) reconnects
by itself after the restart and declares the queue again; it acknowledges
what it stored every 50 ms, so what it got just before the kill and had not
acknowledged comes again marked ``redelivered``: those duplicates are the
consumer's, told apart from the relay's re-publishes.

Every test waits, after subscribing, until the senders route by the new
table (:func:`_routes_loaded`): ``subscribe`` returns before they do."""

from __future__ import annotations

import contextlib
import math
import os
import random
import secrets
import select
import signal
import socket
import struct
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from support import (
    Kids,
    TcpSink,
    UdpSink,
    check_accounting,
    destination_stats,
    drained,
    forks_from_threads,
    raise_retrying,
    sender_processes,
    wait_for,
)

from mpevent import EventBus, encode_notification
from mpevent.shm.layout import R_CONNECTED
from mpevent.tools.broker import Consumer, Delivery, PrivateBroker
from mpevent.tools.figures import percentile

pytestmark = [pytest.mark.chaos, forks_from_threads]

LONG = "MPEVENT_CHAOS_ROUNDS" in os.environ  # make chaos
OUTAGE = float(os.environ.get("MPEVENT_BROKER_OUTAGE_SECONDS", "10" if LONG else "2.5"))
WARMUP = 0.3  # seconds of traffic before the measured phases
BEFORE = 3.0 if LONG else 1.5  # seconds of steady traffic before a fault
AFTER = 3.0 if LONG else 1.5  # ...and after it is repaired
RATE = 1000  # events per second from the paced producer
TCP_RESTARTS = 10 if LONG else 3
RELIABLE_EVENTS = 10000 if LONG else 2000

# Generous bounds: the machine has 2 cores, shared with a broker that boots.
RAISE_FACTOR, RAISE_SLACK_NS = 3, 50_000  # raise p99 during a fault <= 3 x before + 50 µs
SLOWEST_RAISE_NS = 500_000_000  # no single raise may take this long (a broker call would)
# Datagram p99: 3 x before + 2 ms. Before's own p99 over 0.5 s slices varies
# from 0.3 to several ms here (other test runs share the 2 cores): the slack.
LATENCY_FACTOR, LATENCY_SLACK_NS = 3, 2_000_000
RESUME_BOUND_S = 5.0  # the figure: delivery to the broker resumes within 5 s

# The kernel's receive timestamp of a datagram (include/uapi/asm-generic/socket.h).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("@qq")


# -- marks, raises and latencies ------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    """A moment on both clocks: monotonic (raise durations) and wall (raise times in params)."""

    mono: int
    wall: int

    @classmethod
    def now(cls) -> Mark:
        return cls(time.perf_counter_ns(), time.time_ns())


def _paced_producer(bus: EventBus, event: str, rate: int, control: int, out: Path) -> int:
    """A forked producer: waits for b"g" on ``control``, raises ``rate`` events a
    second ({"seq", "t": raise wall time}) until b"s", timing every call; the
    calls' start times and durations go to ``out``."""
    os.read(control, 1)
    poller = select.poll()
    poller.register(control, select.POLLIN)
    starts, took = array("q"), array("q")
    clock, wall = time.perf_counter_ns, time.time_ns
    batch = 10
    period = 1_000_000_000 * batch // rate
    seq = refused = 0
    next_at = clock()
    while not poller.poll(0):
        for _ in range(batch):
            params = {"seq": seq, "t": wall()}
            t0 = clock()
            ok = bus.raise_event(event, params)
            t1 = clock()
            starts.append(t0)
            took.append(t1 - t0)
            if ok:
                seq += 1  # the next seq only once this one is in the ring: no gaps
            else:
                refused += 1
        next_at += period
        delay = next_at - clock()
        if delay > 0:
            time.sleep(delay / 1e9)
        else:
            next_at = clock()  # behind (a busy machine): no burst to catch up
    with open(out, "wb") as f:
        f.write(struct.pack("<qq", seq, refused))
        starts.tofile(f)
        took.tofile(f)
    return 0


@dataclass
class Raises:
    """What the paced producer did: ``accepted`` events (seq 0..accepted-1)."""

    accepted: int
    refused: int
    starts: array
    took: array

    def durations(self, lo: Mark, hi: Mark) -> list[int]:
        """The durations (ns) of the calls that started in [lo, hi)."""
        return [d for s, d in zip(self.starts, self.took, strict=True) if lo.mono <= s < hi.mono]


class PacedProducer:
    """:func:`_paced_producer` in a forked child: forked at once (before the
    test starts threads), raising from :meth:`go` to :meth:`stop`."""

    def __init__(self, kids: Kids, bus: EventBus, event: str, rate: int, out: Path) -> None:
        self.kids = kids
        self.out = out
        read, self._control = os.pipe()
        try:
            self.pid = kids.fork(_paced_producer, bus, event, rate, read, out)
        finally:
            os.close(read)

    def go(self) -> Mark:
        os.write(self._control, b"g")
        return Mark.now()

    def stop(self) -> Raises:
        os.write(self._control, b"s")
        os.close(self._control)
        assert self.kids.wait(self.pid, 30) == 0, "the producer failed"
        raw = self.out.read_bytes()
        accepted, refused = struct.unpack_from("<qq", raw)
        calls = (len(raw) - 16) // 16
        starts, took = array("q"), array("q")
        starts.frombytes(raw[16 : 16 + 8 * calls])
        took.frombytes(raw[16 + 8 * calls :])
        return Raises(accepted, refused, starts, took)


class StampedUdpSink(UdpSink):
    """A :class:`UdpSink` whose datagrams carry the kernel's receive time."""

    def __init__(self) -> None:
        super().__init__()
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def receive_stamped(self, count: int, timeout: float = 10.0) -> list[tuple[bytes, int]]:
        """Up to ``count`` (datagram, receive wall time in ns), waiting at most
        ``timeout`` for each."""
        got = []
        self.sock.settimeout(timeout)
        space = socket.CMSG_SPACE(TIMESPEC.size)
        try:
            while len(got) < count:
                data, ancillary, _, _ = self.sock.recvmsg(70000, space)
                stamp = 0
                for level, kind, raw in ancillary:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = TIMESPEC.unpack(raw[: TIMESPEC.size])
                        stamp = sec * 1_000_000_000 + nsec
                assert stamp, "a datagram without its kernel receive timestamp"
                got.append((data, stamp))
        except TimeoutError:
            pass
        return got


def _check_datagrams(got: list[tuple[bytes, int]], n: int, event: str, sink: UdpSink) -> None:
    """Exactly seq 0..n-1 in order, each byte-identical to the notification raised."""
    params = [orjson.loads(data)["params"] for data, _ in got]
    seqs = [p["seq"] for p in params]
    missing = sorted(set(range(n)) - set(seqs))
    assert seqs == list(range(n)), (
        f"datagram subscriber got {len(seqs)} of {n}, {len(missing)} missing "
        f"(first {missing[:5]}), kernel receive drops {sink.kernel_drops()}"
    )
    for (data, _), p in zip(got, params, strict=True):
        assert data == encode_notification(event, p)


def _latencies(got: list[tuple[bytes, int]], lo: Mark, hi: Mark) -> list[int]:
    """Receive time minus raise time (ns) of the datagrams raised in [lo, hi)."""
    out = []
    for data, received in got:
        raised = orjson.loads(data)["params"]["t"]
        if lo.wall <= raised < hi.wall:
            out.append(received - raised)
    return out


def _p99(samples: list[int]) -> float:
    assert samples, "no samples in a phase: the phases are too short for the rate"
    return percentile(samples, 99)


def _us(ns: float) -> str:
    return f"{ns / 1000:.0f} µs"


def _spread(got: list[tuple[bytes, int]], lo: Mark, hi: Mark, windows: int) -> list[float]:
    """The latency p99 of each of ``windows`` equal slices of [lo, hi): how much it varies."""
    step = (hi.wall - lo.wall) // windows
    out = []
    for i in range(windows):
        a = Mark(0, lo.wall + i * step)
        b = Mark(0, lo.wall + (i + 1) * step)
        samples = _latencies(got, a, b)
        if samples:
            out.append(percentile(samples, 99))
    return out


def _routes_loaded(bus: EventBus) -> None:
    """Wait until every sender has begun two more loops: each loop starts by
    reloading a changed table, so the subscriptions made so far are routed.

    ``subscribe`` returns once the hub stored the table and rang the senders;
    an event raised before a sender's next loop is routed by the table it
    had, so an event that already had subscribers could miss the new one.
    """
    start = [s["loops"] for s in bus.stats()["senders"]]
    assert wait_for(
        lambda: all(s["loops"] >= n + 2 for s, n in zip(bus.stats()["senders"], start, strict=True))
    ), "a sender does not loop"


# -- the broker side ------------------------------------------------------------------


def _queue_name(tag: str) -> str:
    return f"mpevent-chaos-{tag}-{os.getpid()}-{secrets.token_hex(3)}"


def _relay_connected(bus: EventBus, slot: int = 0) -> bool:
    seg = bus.segment
    return bool(seg.words[seg.layout.relay_word(slot) + R_CONNECTED])


@dataclass
class Tally:
    """What a consumer got, by seq: distinct, duplicates, and the duplicates the
    broker redelivered itself (unacknowledged by the consumer at the kill)."""

    distinct: int
    duplicates: int
    redelivered_duplicates: int
    in_order: bool  # the first arrival of each seq, in raise order

    @classmethod
    def of(cls, deliveries: list[Delivery]) -> Tally:
        seen: set[int] = set()
        firsts: list[int] = []
        duplicates = redelivered = 0
        for d in deliveries:
            seq = orjson.loads(d.body)["params"]["seq"]
            if seq in seen:
                duplicates += 1
                redelivered += d.redelivered
            else:
                seen.add(seq)
                firsts.append(seq)
        return cls(len(seen), duplicates, redelivered, firsts == sorted(firsts))


@dataclass
class Resume:
    """Seconds from the broker being ready again to: the relay's connection
    confirming; the consumer getting the first event raised after the kill
    (delivery resumed: none of those can have reached the broker before);
    the first event raised after the restart (the relay caught up)."""

    relay_s: float
    resumed_s: float
    caught_up_s: float


def _watch_resume(
    bus: EventBus, consumer: Consumer, killed: Mark, ready: Mark, timeout: float
) -> Resume:
    """Poll until an event raised after ``ready`` reached the consumer."""
    nan = float("nan")
    relay_s = resumed_s = caught_up_s = nan
    scanned = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        elapsed = (time.perf_counter_ns() - ready.mono) / 1e9
        if math.isnan(relay_s) and _relay_connected(bus):
            relay_s = elapsed
        deliveries = consumer.deliveries
        for d in deliveries[scanned:]:
            raised = orjson.loads(d.body)["params"]["t"]
            if math.isnan(resumed_s) and raised >= killed.wall:
                resumed_s = elapsed
            if raised >= ready.wall:
                caught_up_s = elapsed
                break
        scanned = len(deliveries)
        if not math.isnan(caught_up_s):
            break
        time.sleep(0.01)
    return Resume(relay_s, resumed_s, caught_up_s)


def _broker_settled(bus: EventBus, sock: str, routed: int) -> dict[str, Any] | None:
    row = destination_stats(bus, "E_MIX", sock)
    return row if row["routed"] == routed and row["pending"] == 0 else None


def _consumer_caught_up(consumer: Consumer, sent: int, timeout: float) -> list[Delivery]:
    """Wait until the consumer has ``sent`` distinct messages, then a little
    more for duplicates; what it got."""
    wait_for(lambda: Tally.of(consumer.deliveries).distinct >= sent, timeout=timeout, interval=0.1)
    time.sleep(0.5)
    return consumer.deliveries


@contextlib.contextmanager
def _frozen(broker: PrivateBroker) -> Iterator[None]:
    """Every process of the broker stopped (SIGSTOP): connected, answering nothing."""
    pids = broker.pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# -- 1. the broker killed mid-stream, then restarted --------------------------------------


@pytest.mark.timeout(600)
def test_broker_killed_mid_stream_then_restarted(
    fresh_broker: PrivateBroker, kids: Kids, tmp_path: Path
) -> None:
    key = _queue_name("kill")
    sock = fresh_broker.socket(key, persistent=True)
    udp = StampedUdpSink()
    consumer: Consumer | None = None
    try:
        with EventBus(lanes=4) as bus:
            bus.publish_event("E_MIX")
            bus.subscribe("E_MIX", udp.address, expire=None)
            bus.subscribe("E_MIX", sock, expire=None)
            _routes_loaded(bus)
            producer = PacedProducer(kids, bus, "E_MIX", RATE, tmp_path / "raises.bin")
            consumer = fresh_broker.consume(key, durable=True)
            assert wait_for(lambda: _relay_connected(bus), timeout=30), "the relay never connected"
            producer.go()
            time.sleep(WARMUP)  # the first raise claims a lane; the sender's first wake-ups
            start = Mark.now()
            time.sleep(BEFORE)
            fresh_broker.sync_metadata()  # the durable queue declared above survives the crash
            killed = Mark.now()
            fresh_broker.kill()
            assert wait_for(lambda: not _relay_connected(bus), timeout=10), "relay saw no loss"
            time.sleep(max(0.0, OUTAGE - (time.perf_counter_ns() - killed.mono) / 1e9))
            restarting = Mark.now()
            fresh_broker.restart()
            ready = Mark.now()
            resume = _watch_resume(bus, consumer, killed, ready, timeout=60)
            time.sleep(AFTER)
            raises = producer.stop()
            end = Mark.now()
            n = raises.accepted

            got = udp.receive_stamped(n)
            assert not udp.quiet(0.2), "the datagram subscriber got more than was raised"
            row = wait_for(lambda: _broker_settled(bus, sock, n), timeout=120, interval=0.1)
            assert row, (
                f"the broker destination never settled: {destination_stats(bus, 'E_MIX', sock)}"
            )
            deliveries = _consumer_caught_up(consumer, row["sent"], timeout=60)
            assert wait_for(lambda: drained(bus))
            stats = bus.stats()
    finally:
        if consumer is not None:
            consumer.close()
        udp.close()

    tally = Tally.of(deliveries)
    before = raises.durations(start, killed)
    outage = raises.durations(killed, restarting)
    booting = raises.durations(restarting, ready)
    after = raises.durations(ready, end)
    lat = {
        "before": _latencies(got, start, killed),
        "outage": _latencies(got, killed, restarting),
        "booting": _latencies(got, restarting, ready),
        "after": _latencies(got, ready, end),
    }
    print(
        f"\nbroker killed {OUTAGE:g} s, restart took {(ready.mono - restarting.mono) / 1e9:.1f} s; "
        f"raised {n} ({raises.refused} refused) at {RATE}/s\n"
        f"  raise p99: before {_us(_p99(before))}, outage {_us(_p99(outage))}, "
        f"broker booting {_us(_p99(booting))}, after {_us(_p99(after))}; "
        f"slowest {_us(max(raises.took))}\n"
        f"  datagram latency p99: "
        + ", ".join(f"{k} {_us(_p99(v))}" for k, v in lat.items())
        + f"\n  after the restart: relay confirming in {resume.relay_s:.2f} s, delivery resumed "
        f"(an event raised after the kill reached the consumer) in {resume.resumed_s:.2f} s, "
        f"caught up (one raised after the restart) in {resume.caught_up_s:.2f} s\n"
        f"  broker destination: routed {row['routed']} sent {row['sent']} dropped {row['dropped']} "
        f"failed {row['failed']} republished {row['republished']}; consumer got {len(deliveries)}, "
        f"{tally.distinct} distinct, {tally.duplicates} duplicates "
        f"({tally.redelivered_duplicates} redelivered by the broker)"
    )

    # Producers never block: a fault of the broker is not a producer's.
    assert raises.refused == 0, "the ring was full: the sender fell behind"
    assert _p99(outage) <= RAISE_FACTOR * _p99(before) + RAISE_SLACK_NS
    assert max(raises.took) < SLOWEST_RAISE_NS
    # The datagram subscriber got everything, in order, on time.
    _check_datagrams(got, n, "E_MIX", udp)
    assert _p99(lat["outage"]) <= LATENCY_FACTOR * _p99(lat["before"]) + LATENCY_SLACK_NS
    # Delivery to the broker resumed, within the bound.
    assert resume.resumed_s <= RESUME_BOUND_S, resume
    assert not math.isnan(resume.caught_up_s), resume
    # Per broker destination: what the consumer got + counted losses = routed;
    # duplicates only from counted re-publishes (or the broker's own redelivery).
    assert tally.distinct + row["dropped"] + row["failed"] == row["routed"] == n, (tally, row)
    assert tally.distinct == row["sent"], (tally, row)
    assert tally.duplicates - tally.redelivered_duplicates <= row["republished"], (tally, row)
    assert tally.in_order, "the broker got the events out of order"
    check_accounting(stats)
    udp_row = next(r for r in stats["destinations"] if r["socket"] == udp.address)
    assert udp_row["sent"] == n, udp_row


# -- 5. datagram subscribers while the broker is down ------------------------------------------


@pytest.mark.timeout(600)
# Killed is also test 1's outage (its datagram latency is asserted there): on
# its own, with no restart after it, only in the long run.
@pytest.mark.parametrize("how", ["frozen", "killed"] if LONG else ["frozen"])
def test_datagram_subscribers_while_the_broker_is_down(
    how: str, fresh_broker: PrivateBroker, kids: Kids, tmp_path: Path
) -> None:
    """The issue's figure: the broker down for ``OUTAGE`` s (killed, or every
    process stopped: connected and silent), datagram subscribers get 100 %,
    their latency p99 during it within a generous factor of before (and the
    spread of before's p99 over 0.5 s slices is printed beside it)."""
    key = _queue_name(how)
    sock = fresh_broker.socket(key, persistent=True)
    udp = StampedUdpSink()
    consumer: Consumer | None = None
    try:
        with EventBus(lanes=4) as bus:
            bus.publish_event("E_MIX")
            bus.subscribe("E_MIX", udp.address, expire=None)
            bus.subscribe("E_MIX", sock, expire=None)
            _routes_loaded(bus)
            producer = PacedProducer(kids, bus, "E_MIX", RATE, tmp_path / "raises.bin")
            if how == "frozen":  # it comes back: what it then gets is checked
                consumer = fresh_broker.consume(key, durable=True)
            assert wait_for(lambda: _relay_connected(bus), timeout=30), "the relay never connected"
            producer.go()
            time.sleep(WARMUP)  # the first raise claims a lane; the sender's first wake-ups
            start = Mark.now()
            time.sleep(BEFORE)
            down = Mark.now()
            if how == "killed":
                fresh_broker.sync_metadata()
                fresh_broker.kill()
                time.sleep(OUTAGE)
                back = Mark.now()
            else:
                with _frozen(fresh_broker):
                    time.sleep(OUTAGE)
                    back = Mark.now()
            time.sleep(AFTER)
            raises = producer.stop()
            end = Mark.now()
            n = raises.accepted
            got = udp.receive_stamped(n)
            assert not udp.quiet(0.2)
            if consumer is not None:  # it answers again: everything reaches it
                row = wait_for(lambda: _broker_settled(bus, sock, n), timeout=120, interval=0.1)
                assert row, destination_stats(bus, "E_MIX", sock)
                deliveries = _consumer_caught_up(consumer, row["sent"], timeout=60)
            else:  # it stays dead: the relay holds what it could, until close
                row = destination_stats(bus, "E_MIX", sock)
                deliveries = []
            assert wait_for(lambda: drained(bus))
            stats = bus.stats()
    finally:
        if consumer is not None:
            consumer.close()
        udp.close()

    before = _latencies(got, start, down)
    during = _latencies(got, down, back)
    spread = _spread(got, start, down, max(1, int(BEFORE / 0.5)))
    raise_before, raise_during = raises.durations(start, down), raises.durations(down, back)
    tally = Tally.of(deliveries)
    print(
        f"\nbroker {how} for {OUTAGE:g} s, {n} events at {RATE}/s: datagrams delivered "
        f"{len(got)}/{n} ({100 * len(got) / n:.1f} %); latency p99 before {_us(_p99(before))} "
        f"(0.5 s slices: {', '.join(_us(p) for p in spread)}), while down {_us(_p99(during))}, "
        f"after {_us(_p99(_latencies(got, back, end)))}; raise p99 before "
        f"{_us(_p99(raise_before))}, while down {_us(_p99(raise_during))}\n"
        f"  broker destination: routed {row['routed']} sent {row['sent']} dropped {row['dropped']} "
        f"pending {row['pending']} republished {row['republished']}"
        + (
            f"; consumer got {tally.distinct} distinct, {tally.duplicates} duplicates"
            if consumer
            else ""
        )
    )
    _check_datagrams(got, n, "E_MIX", udp)
    assert _p99(during) <= LATENCY_FACTOR * _p99(before) + LATENCY_SLACK_NS
    assert _p99(raise_during) <= RAISE_FACTOR * _p99(raise_before) + RAISE_SLACK_NS
    assert max(raises.took) < SLOWEST_RAISE_NS
    check_accounting(stats, nothing_pending=how == "frozen")
    if how == "frozen":
        assert tally.distinct + row["dropped"] + row["failed"] == row["routed"] == n, (tally, row)
        assert tally.duplicates - tally.redelivered_duplicates <= row["republished"], (tally, row)
    else:
        assert row["pending"] > 0, "a dead broker: the relay holds what it could"


# -- TCP helpers --------------------------------------------------------------------------


def _seqs(texts: list[bytes]) -> list[int]:
    return [orjson.loads(t)["params"]["seq"] for t in texts]


class UdpReader(threading.Thread):
    """Reads a :class:`UdpSink` in a thread until :meth:`finish`, so a long
    run never overflows its receive buffer."""

    def __init__(self, sink: UdpSink) -> None:
        super().__init__(daemon=True)
        self.sink = sink
        self.got: list[bytes] = []
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.is_set():
            self.got += self.sink.receive(1 << 30, timeout=0.1)

    def finish(self, count: int, timeout: float = 30.0) -> list[bytes]:
        """What it read once ``count`` arrived (or ``timeout`` passed), and what came after."""
        wait_for(lambda: len(self.got) >= count, timeout=timeout)
        self.close()
        self.got += self.sink.quiet(0.2)
        return self.got

    def close(self) -> None:
        """Stop reading (before the sink is closed)."""
        self._done.set()
        if self.is_alive():
            self.join()


def _connected_to(bus: EventBus, port: int) -> bool:
    """A sender holds an established TCP connection to ``port``."""
    for proc in sender_processes(bus, 1):
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == port and conn.status == "ESTABLISHED":
                    return True
    return False


def _row(bus: EventBus, event: str, sock: str) -> dict[str, Any]:
    return destination_stats(bus, event, sock)


def _settled(bus: EventBus) -> bool:
    return drained(bus) and all(r["pending"] == 0 for r in bus.stats()["destinations"])


# -- 2. a TCP peer that stops reading ---------------------------------------------------------


@pytest.mark.timeout(300)
def test_tcp_peer_that_stops_reading_fills_its_backlog_alone() -> None:
    backlog_bytes = 256 << 10
    pad = "x" * 1000
    tcp, udp = TcpSink(), UdpSink()
    reader = UdpReader(udp)
    try:
        with EventBus(lanes=2, backlog_bytes=backlog_bytes) as bus:
            bus.publish_event("E_SLOW")
            bus.subscribe("E_SLOW", tcp.address, expire=None)
            bus.subscribe("E_SLOW", udp.address, expire=None)
            _routes_loaded(bus)
            seq = 0

            def raise_block(count: int) -> None:
                nonlocal seq
                for _ in range(count):
                    raise_retrying(bus.raise_event, "E_SLOW", {"seq": seq, "pad": pad})
                    seq += 1

            raise_block(200)
            assert wait_for(lambda: len(tcp.texts) == 200), "the peer never got the first events"
            first_phase = seq
            tcp.reading.clear()
            # Until its backlog is full and drops: the socket buffers take megabytes first.
            cap = 200_000
            while _row(bus, "E_SLOW", tcp.address)["dropped"] == 0:
                assert seq < cap, f"no drop after {seq} events: {_row(bus, 'E_SLOW', tcp.address)}"
                raise_block(500)
            raise_block(2000)  # well past full
            assert wait_for(lambda: _row(bus, "E_SLOW", tcp.address)["routed"] == seq)
            stuck = _row(bus, "E_SLOW", tcp.address)
            text_size = len(encode_notification("E_SLOW", {"seq": seq, "pad": pad}))
            stuck_phase = seq
            tcp.reading.set()
            assert wait_for(lambda: _row(bus, "E_SLOW", tcp.address)["pending"] == 0, timeout=30)
            raise_block(200)  # the backlog has room again: these all arrive
            total = seq
            udp_got = reader.finish(total)
            assert wait_for(lambda: len(tcp.texts) >= _row(bus, "E_SLOW", tcp.address)["sent"])
            assert wait_for(lambda: _settled(bus), timeout=30), bus.stats()["destinations"]
            row = _row(bus, "E_SLOW", tcp.address)
            udp_row = _row(bus, "E_SLOW", udp.address)
            stats = bus.stats()
            time.sleep(0.2)
            received = _seqs(tcp.texts)
    finally:
        reader.close()
        tcp.close()
        udp.close()

    print(
        f"\ntcp peer stopped reading: {total} raised, {row['dropped']} dropped, "
        f"at most {stuck['pending']} waiting ({stuck['pending'] * text_size >> 10} kB of "
        f"{backlog_bytes >> 10} kB), {len(received)} arrived, in order"
    )
    assert _seqs(udp_got) == list(range(total)), "the UDP subscriber missed events"
    assert udp_row["sent"] == total and udp_row["dropped"] == 0, udp_row
    # The stuck peer: its backlog stayed bounded, what found it full was dropped
    # and counted, what was kept arrived in order, nothing twice.
    assert stuck["pending"] * text_size <= backlog_bytes + text_size, stuck
    assert row["dropped"] > 0 and row["failed"] == 0, row
    assert row["routed"] == total == row["sent"] + row["dropped"], row
    assert received == sorted(set(received)), "out of order or duplicated"
    assert len(received) == row["sent"], (len(received), row)
    lost = set(range(total)) - set(received)
    assert all(first_phase <= s < stuck_phase for s in lost), "dropped outside the stuck phase"
    assert set(range(stuck_phase, total)) <= set(received), "what came after was lost"
    check_accounting(stats)


# -- 3. a TCP peer that restarts -------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_tcp_peer_that_restarts_is_reconnected_and_counted_right() -> None:
    """First by steps: the peer stops, what is raised waits (pending), the peer
    comes back, it arrives. Then under a steady stream with restarts at random
    moments: order kept, nothing twice, and what is missing was raised within
    a second of a stop (written to a connection the peer closed: counted
    sent, as TCP accepted it); everything after the last restart arrives."""
    rng = random.Random(int(os.environ.get("MPEVENT_CHAOS_SEED", "11")))
    tcp = TcpSink()
    raised_at: list[float] = []  # monotonic time of each seq's raise
    stops: list[float] = []
    try:
        with EventBus(lanes=2) as bus:
            bus.publish_event("E_TCP")
            bus.subscribe("E_TCP", tcp.address, expire=None)
            _routes_loaded(bus)
            lock = threading.Lock()

            def raise_one() -> None:
                with lock:
                    seq = len(raised_at)
                    raise_retrying(bus.raise_event, "E_TCP", {"seq": seq})
                    raised_at.append(time.monotonic())

            def row() -> dict[str, Any]:
                return _row(bus, "E_TCP", tcp.address)

            # By steps.
            for step in range(2):
                for _ in range(300):
                    raise_one()
                total = len(raised_at)
                assert wait_for(lambda total=total: len(tcp.texts) == total), len(tcp.texts)
                assert wait_for(lambda total=total: row()["sent"] == total), row()
                stops.append(time.monotonic())
                tcp.stop()
                assert wait_for(lambda: not _connected_to(bus, tcp.port)), "drop not seen"
                for _ in range(300):
                    raise_one()
                total = len(raised_at)
                assert wait_for(lambda total=total: row()["routed"] == total), row()
                time.sleep(0.2)  # it stays down a while: they wait
                waiting = row()
                assert waiting["pending"] == 300 and waiting["sent"] == total - 300, waiting
                tcp.start()
                assert wait_for(lambda total=total: len(tcp.texts) == total, timeout=15), (
                    len(tcp.texts),
                    row(),
                )
                assert tcp.connections == step + 2
                assert _seqs(tcp.texts) == list(range(total)), "lost or disordered"

            # Under a steady stream.
            stop = threading.Event()

            def stream() -> None:
                while not stop.is_set():
                    raise_one()
                    time.sleep(0.0005)

            producer = threading.Thread(target=stream)
            producer.start()
            try:
                for _ in range(TCP_RESTARTS):
                    # Connected and flowing, then stopped at a random moment of the stream.
                    assert wait_for(lambda: _connected_to(bus, tcp.port), timeout=15), row()
                    time.sleep(rng.uniform(0.05, 0.4))
                    stops.append(time.monotonic())
                    tcp.stop()
                    time.sleep(rng.uniform(0.05, 0.5))
                    last_start = time.monotonic()
                    tcp.start()
                assert wait_for(lambda: _connected_to(bus, tcp.port), timeout=15), row()
                time.sleep(0.3)
            finally:
                stop.set()
                producer.join()
            total = len(raised_at)
            assert wait_for(lambda: _settled(bus), timeout=30), row()
            final = row()
            time.sleep(0.3)  # the peer's thread reads what was written last
            received = _seqs(tcp.texts)
            connections = tcp.connections
            stats = bus.stats()
    finally:
        tcp.close()

    lost = sorted(set(range(total)) - set(received))
    print(
        f"\ntcp peer restarted {TCP_RESTARTS + 2} times: {total} raised, {len(received)} arrived, "
        f"{len(lost)} written to a closing connection (counted sent), {connections} connections"
    )
    assert received == sorted(set(received)), "out of order or duplicated"
    assert final["routed"] == total == final["sent"] + final["dropped"] + final["failed"], final
    assert final["dropped"] == final["failed"] == 0, final
    assert len(received) <= final["sent"], "more arrived than was counted sent"
    for s in lost:
        assert any(at - 1.0 <= raised_at[s] <= at + 1.0 for at in stops), (
            f"seq {s} lost {min(abs(raised_at[s] - at) for at in stops):.2f} s from any stop"
        )
    arrived = set(received)
    late = [s for s in range(total) if raised_at[s] >= last_start and s not in arrived]
    assert not late, f"{len(late)} raised after the last restart never arrived: {late[:5]}"
    assert connections == TCP_RESTARTS + 3
    check_accounting(stats)


# -- 4. reliable mode: errors, silence, and FAILOVER -----------------------------------------------


class ParitySink(TcpSink):
    """A reliable-mode peer that answers ``result`` to even seqs, ``error`` to odd:
    replies matched by id give exact counts."""

    def _take(self, conn: socket.socket, text: bytes) -> None:
        message = orjson.loads(text)
        self.answer = "error" if message["params"]["seq"] % 2 else "result"
        super()._take(conn, text)


@pytest.mark.timeout(300)
def test_reliable_mode_errors_and_silence_counted_failed_and_failed_over_at_volume() -> None:
    n = RELIABLE_EVENTS
    errors, silent, parity = TcpSink("error"), TcpSink("silence"), ParitySink()
    fo_errors, fo_silent = TcpSink("error"), TcpSink("silence")
    udp_a, udp_b = UdpSink(), UdpSink()
    sinks: list[Any] = [errors, silent, parity, fo_errors, fo_silent, udp_a, udp_b]
    socks = {
        "errors": f"{errors.address};reliable",
        "silent": f"{silent.address};reliable;timeout=300",
        "parity": f"{parity.address};reliable",
        "fo_errors": f"virtual:FAILOVER {fo_errors.address};reliable {udp_a.address}",
        "fo_silent": f"virtual:FAILOVER {fo_silent.address};reliable;timeout=300 {udp_b.address}",
    }
    reader_a, reader_b = UdpReader(udp_a), UdpReader(udp_b)
    try:
        with EventBus(lanes=2) as bus:
            bus.publish_event("E_REL")
            for sock in socks.values():
                bus.subscribe("E_REL", sock, expire=None)
            _routes_loaded(bus)
            sent = []
            for i in range(n):
                raise_retrying(bus.raise_event, "E_REL", {"seq": i})
                sent.append(encode_notification("E_REL", {"seq": i}))
            got_a, got_b = reader_a.finish(n), reader_b.finish(n)
            assert wait_for(lambda: _settled(bus), timeout=60), bus.stats()["destinations"]
            rows = {name: _row(bus, "E_REL", sock) for name, sock in socks.items()}
            stats = bus.stats()
    finally:
        reader_a.close()
        reader_b.close()
        for sink in sinks:
            sink.close()

    summary = ", ".join(
        f"{name}: sent {r['sent']} failed {r['failed']} timeouts {r['timeouts']}"
        for name, r in rows.items()
    )
    print(f"\nreliable mode, {n} events: {summary}")
    check_accounting(stats)
    assert rows["errors"]["failed"] == n and rows["errors"]["sent"] == 0, rows["errors"]
    assert rows["silent"]["failed"] == rows["silent"]["timeouts"] == n, rows["silent"]
    assert rows["parity"]["sent"] == (n + 1) // 2 and rows["parity"]["failed"] == n // 2
    for sink in (errors, silent, parity):  # requests with ids, each once, in order
        ids = [orjson.loads(t)["id"] for t in sink.texts]
        assert len(set(ids)) == len(ids) == n, "request ids not unique"
        assert sink.notifications() == sent
    for name, got in (("fo_errors", got_a), ("fo_silent", got_b)):
        missing = sorted(set(_seqs(sent)) - set(_seqs(got)))
        assert not missing, (
            f"{name}: the UDP member missed {len(missing)}: {missing[:20]} {rows[name]}"
        )
        assert len(got) == n, f"{name}: duplicates"
        first, second = rows[name]["members"]
        assert first["routed"] == first["failed"] >= 1, first
        assert second["sent"] == n and second["failed"] == 0, second
    assert rows["fo_silent"]["members"][0]["timeouts"] == rows["fo_silent"]["members"][0]["failed"]
