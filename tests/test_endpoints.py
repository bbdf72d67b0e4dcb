"""Datagram endpoints over real sockets: backlogs bounded three ways, exact counts.

A UNIX receiver that never reads takes ``net.unix.max_dgram_qlen``
datagrams (or fewer, large ones) and then refuses with EAGAIN; what the
endpoint cannot send waits in its backlog, bounded by ``backlog``
datagrams and ``backlog_bytes`` bytes per destination and
``sender_backlog_bytes`` for all of a sender's backlogs together. What
finds a bound reached is dropped. The counters are the sender's own
(:class:`SubscriptionStats` on a real segment) and must always add up:
``routed = sent + failed + dropped + pending``.
"""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpevent import EventBus
from mpevent.processes.sender import mmsg
from mpevent.processes.sender.accounts import (
    PerMessage,
    SubscriptionStats,
    drop_predecessor_backlogs,
)
from mpevent.processes.sender.backlog import ENTRY_OVERHEAD, BacklogBudget, BacklogLimits
from mpevent.processes.sender.batch import LaneBatch
from mpevent.processes.sender.endpoints import DatagramEndpoint
from mpevent.processes.sender.mmsg import Outbox, address_of
from mpevent.processes.sender.transports import Transports
from mpevent.protocol.config import ConfigError, load
from mpevent.protocol.destination import Destination, parse_destination
from mpevent.protocol.payload import Notification
from mpevent.shm.layout import D_DROPPED, D_FAILED, D_ID, D_PENDING, D_ROUTED, D_SENT, Geometry
from mpevent.shm.segment import Segment

NOTE = Notification("E_TEST")
CLOSE = b"}"
BIG = 1 << 30  # a bound that never binds


@pytest.fixture
def seg() -> Iterator[Segment]:
    segment = Segment.create(Geometry(lanes=1, lane_size=4096, max_events=4, max_subs=8))
    yield segment
    segment.close()


class Stuck:
    """A UNIX datagram receiver that reads only when told to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.dest = parse_destination(f"unix:{path}")

    def read_all(self) -> list[bytes]:
        got = []
        while True:
            try:
                got.append(self.sock.recv(70000))
            except BlockingIOError:
                return got

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def stuck(tmp_path: Path) -> Iterator[list[Stuck]]:
    receivers = [Stuck(tmp_path / f"stuck{i}.sock") for i in range(3)]
    yield receivers
    for r in receivers:
        r.close()


def stats_for(seg: Segment, slot: int, dest: Destination) -> SubscriptionStats:
    """The counters sender 0 keeps for a subscription to ``dest`` in ``slot``."""
    return SubscriptionStats(seg, 0, slot, 100 + slot)


def batch_of(outbox: Outbox, bodies: list[bytes]) -> tuple[LaneBatch, list[bytes]]:
    """A lane batch of E_TEST events with these params, packed as the loop
    packs it; and the datagrams a receiver must get."""
    base = outbox.load(memoryview(b"".join(bodies)))
    batch = LaneBatch(outbox, [NOTE])
    at = 0
    for body in bodies:
        batch.pieces += (address_of(NOTE.prefix), len(NOTE.prefix), base + at, len(body))
        batch.pieces += (address_of(CLOSE), 1)
        batch.sizes.append(len(NOTE.prefix) + len(body) + 1)
        batch.bodies.append((0, at, len(body)))
        at += len(body)
    outbox.pack(batch.pieces)
    return batch, [NOTE.build(body) for body in bodies]


def bodies(n: int, pad: int = 0, start: int = 0) -> list[bytes]:
    """Params of ``n`` events, numbered from ``start``, all of one size."""
    return [b'{"n":"%06d","pad":"%s"}' % (start + i, b"x" * pad) for i in range(n)]


def adds_up(st: SubscriptionStats) -> bool:
    return st.routed == st.sent + st.failed + st.dropped + st.pending


@pytest.mark.parametrize("batched", [True, False], ids=["sendmmsg", "one-send-per-datagram"])
def test_count_bound_keeps_order_and_flushes_when_writable(
    seg, stuck, monkeypatch, batched
) -> None:
    monkeypatch.setattr(mmsg, "AVAILABLE", batched and mmsg.AVAILABLE)
    rx = stuck[0]
    budget = BacklogBudget(BIG)
    ep = DatagramEndpoint(rx.dest, BacklogLimits(5, BIG, BIG), budget)
    st = stats_for(seg, 0, rx.dest)
    outbox = Outbox()
    batch, expected = batch_of(outbox, bodies(50))
    ep.send(batch, range(50), st)
    queued = st.sent  # what the receiver's queue took before EAGAIN
    assert 1 <= queued < 45
    assert (st.routed, st.pending, st.dropped, st.failed) == (50, 5, 45 - queued, 0)
    assert adds_up(st)
    assert ep.wants() == (ep.sock.fileno(), select.POLLOUT)
    assert (
        budget.used
        == ep.backlog.bytes
        == sum(len(d) + ENTRY_OVERHEAD for d in expected[queued : queued + 5])
    )

    # The counters reach the segment, pending counted on its own.
    st.store(seg.words)
    w = st.word
    assert seg.words[w + D_PENDING] == 5 and seg.words[w + D_ROUTED] == 50
    assert seg.words[w + D_ID] == st.sub_id

    got = rx.read_all()
    ep.ready(select.POLLOUT)
    got += rx.read_all()
    # What was kept went out in order, right behind what the queue took.
    assert got == expected[: queued + 5]
    assert (st.sent, st.pending, st.bytes) == (queued + 5, 0, sum(map(len, got)))
    assert adds_up(st) and budget.used == 0 and ep.wants() is None
    ep.close()


def test_bytes_bound_per_destination(seg, stuck) -> None:
    rx = stuck[0]
    outbox = Outbox()
    batch, expected = batch_of(outbox, bodies(40, pad=1000))
    charge = len(expected[0]) + ENTRY_OVERHEAD
    limits = BacklogLimits(1000, backlog_bytes=3 * charge + charge // 2, sender_backlog_bytes=BIG)
    ep = DatagramEndpoint(rx.dest, limits, BacklogBudget(BIG))
    st = stats_for(seg, 0, rx.dest)
    ep.send(batch, range(40), st)
    assert st.pending == 3 and ep.backlog.bytes == 3 * charge <= limits.backlog_bytes
    assert st.dropped == 40 - st.sent - 3 > 0
    assert adds_up(st)
    # A later batch finds the backlog full: all of it is dropped.
    batch, _ = batch_of(outbox, bodies(10, pad=1000, start=40))
    ep.send(batch, range(10), st)
    assert st.pending == 3 and st.dropped == 50 - st.sent - 3 and adds_up(st)
    ep.close()  # what waited is dropped
    assert (st.pending, st.dropped, st.sent) == (0, 50 - st.sent, st.sent) and adds_up(st)


def test_sender_bound_is_shared_by_all_its_backlogs(seg, stuck) -> None:
    outbox = Outbox()
    batch, expected = batch_of(outbox, bodies(30, pad=2000))
    charge = len(expected[0]) + ENTRY_OVERHEAD
    limits = BacklogLimits(backlog=1000, backlog_bytes=4 * charge, sender_backlog_bytes=10 * charge)
    budget = BacklogBudget(limits.sender_backlog_bytes)
    endpoints = [Transports(limits, budget).open(rx.dest) for rx in stuck]
    counters = [stats_for(seg, i, rx.dest) for i, rx in enumerate(stuck)]
    for ep, st in zip(endpoints, counters, strict=True):
        ep.send(batch, range(30), st)
    # Four each for the first two (their own bound), the last two the sender has left.
    assert [st.pending for st in counters] == [4, 4, 2]
    assert budget.used == 10 * charge == sum(ep.backlog.bytes for ep in endpoints)
    for st in counters:
        assert st.dropped == 30 - st.sent - st.pending > 0 and adds_up(st)
    # The first destination reads: its room goes back to the sender's budget,
    # and the third may keep more of what comes next.
    stuck[0].read_all()
    endpoints[0].ready(select.POLLOUT)
    assert counters[0].pending == 0 and budget.used == 6 * charge
    more, _ = batch_of(outbox, bodies(10, pad=2000, start=30))
    endpoints[2].send(more, range(10), counters[2])
    assert counters[2].pending == 4 and budget.used == 8 * charge
    for ep, st in zip(endpoints, counters, strict=True):
        ep.close()
        assert st.pending == 0 and adds_up(st)
    assert budget.used == 0


def test_a_run_of_several_subscriptions_counts_each_its_own(seg, stuck) -> None:
    rx = stuck[0]
    ep = DatagramEndpoint(rx.dest, BacklogLimits(4, BIG, BIG), BacklogBudget(BIG))
    a, b = stats_for(seg, 0, rx.dest), stats_for(seg, 1, rx.dest)
    outbox = Outbox()
    batch, expected = batch_of(outbox, bodies(40))
    owners = [a if i % 4 else b for i in range(40)]  # b owns every fourth
    ep.send(batch, range(40), PerMessage(owners))
    assert (a.routed, b.routed) == (30, 10)
    assert a.sent + b.sent + a.pending + b.pending + a.dropped + b.dropped == 40
    assert a.pending + b.pending == 4
    assert adds_up(a) and adds_up(b)
    got = rx.read_all()
    ep.ready(select.POLLOUT)
    got += rx.read_all()
    assert got == expected[: len(got)]
    assert a.bytes + b.bytes == sum(map(len, got))
    assert b.sent == sum(1 for d in got if d in expected[::4])
    ep.close()


def test_a_receiver_that_goes_away_fails_what_waited_and_frees_the_budget(seg, stuck) -> None:
    rx = stuck[0]
    budget = BacklogBudget(BIG)
    ep = DatagramEndpoint(rx.dest, BacklogLimits(100, BIG, BIG), budget)
    st = stats_for(seg, 0, rx.dest)
    batch, _ = batch_of(Outbox(), bodies(60))
    ep.send(batch, range(60), st)
    assert st.pending == 60 - st.sent and st.dropped == 0
    rx.close()  # gone: the socket turns writable with an error
    ep.ready(select.POLLOUT | select.POLLERR)
    assert st.pending == 0 and st.failed == 60 - st.sent and adds_up(st)
    assert st.refused + st.enoent == st.failed
    assert budget.used == 0 and ep.wants() is None and ep.sock is None
    assert ep.last_errno in (errno.ECONNREFUSED, errno.ENOTCONN, errno.ENOENT)
    ep.close()


def test_a_killed_senders_backlog_becomes_dropped_and_pending_zero(seg) -> None:
    dest = parse_destination("udp:127.0.0.1:9")
    st = stats_for(seg, 3, dest)
    st.routed, st.sent, st.failed, st.dropped, st.pending = 20, 9, 2, 3, 6
    st.store(seg.words)
    # Killed between storing routed and the rest: one more routed than fates.
    seg.words[st.word + D_ROUTED] = 21
    assert drop_predecessor_backlogs(seg, 0) == 7
    w = st.word
    assert seg.words[w + D_PENDING] == 0 and seg.words[w + D_DROPPED] == 10
    assert (seg.words[w + D_SENT], seg.words[w + D_FAILED]) == (9, 2)
    # Its successor's counters start from there.
    again = stats_for(seg, 3, dest)
    assert (again.routed, again.dropped, again.pending) == (21, 10, 0) and adds_up(again)


def test_limits_are_checked_where_they_are_given(tmp_path: Path) -> None:
    assert BacklogLimits() == BacklogLimits(16384, 4 << 20, 64 << 20)
    for key in ("backlog", "backlog_bytes", "sender_backlog_bytes"):
        with pytest.raises(ValueError, match=f"^{key} must be at least 1"):
            BacklogLimits(**{key: 0})
        with pytest.raises(ValueError, match=key):
            EventBus(**{key: 0})  # before anything is started
        path = tmp_path / f"{key}.toml"
        path.write_text(f"[segment]\n{key} = -1\n")
        with pytest.raises(ConfigError, match=f"key segment.{key}: "):
            load(path)
    with pytest.raises(TypeError, match="backlog_bytes must be an int"):
        BacklogLimits(backlog_bytes=True)
    path = tmp_path / "ok.toml"
    path.write_text("[segment]\nbacklog = 10\nbacklog_bytes = 2000\nsender_backlog_bytes = 9000\n")
    assert load(path).backlog == BacklogLimits(10, 2000, 9000)
