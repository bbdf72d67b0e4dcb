"""Virtual destinations and broker hand-offs, as the sender drives them, over real sockets.

A :class:`VirtualEndpoint` hands each batch to its members by its policy
(PARALLEL, ROUND-ROBIN, FAILOVER), each member counting in its own block;
a :class:`HandoffEndpoint` writes each event into the relay's hand-off lane
with the subscription's slot, member and id before the params. The
batches are built as the loop builds them: records with their headers,
copied into a real outbox.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import UdpSink

from mpevent.processes.sender.accounts import GroupStats, SubscriptionStats
from mpevent.processes.sender.backlog import BacklogBudget, BacklogLimits
from mpevent.processes.sender.batch import LaneBatch
from mpevent.processes.sender.handoff import HandoffEndpoint
from mpevent.processes.sender.mmsg import Outbox, address_of
from mpevent.processes.sender.transports import Transports
from mpevent.protocol.destination import parse_destination
from mpevent.protocol.payload import Notification
from mpevent.shm.layout import HANDOFF_PREFIX, R_CONNECTED, Geometry
from mpevent.shm.ring import HANDOFF_HEADER, LaneReader
from mpevent.shm.segment import Segment

NOTE = Notification("E_TEST")
CLOSE = b"}"
RAISED_NS = 123_456_789


@pytest.fixture
def seg() -> Iterator[Segment]:
    segment = Segment.create(
        Geometry(lanes=1, lane_size=4096, max_events=4, max_subs=8, relays=2, handoff_size=1 << 17)
    )
    yield segment
    segment.close()


def transports(seg: Segment, relays: dict[str, int] | None = None) -> Transports:
    return Transports(BacklogLimits(), BacklogBudget(1 << 30), seg, 0, relays or {})


def batch_of(outbox: Outbox, bodies: list[bytes]) -> LaneBatch:
    """A lane batch of E_TEST events, records with headers as a lane holds
    them, copied and packed as the loop does."""
    stretch = bytearray()
    offsets = []
    for body in bodies:
        stretch += struct.pack("<QQ", len(body), RAISED_NS)
        offsets.append(len(stretch))
        stretch += body + b"\0" * (-len(body) % 8)
    base = outbox.load(memoryview(bytes(stretch)))
    batch = LaneBatch(outbox, [NOTE])
    for body, at in zip(bodies, offsets, strict=True):
        batch.pieces += (address_of(NOTE.prefix), len(NOTE.prefix), base + at, len(body))
        batch.pieces += (address_of(CLOSE), 1)
        batch.sizes.append(len(NOTE.prefix) + len(body) + 1)
        batch.bodies.append((0, at, len(body)))
    outbox.pack(batch.pieces)
    return batch


def bodies(n: int) -> list[bytes]:
    return [b'{"n":%d}' % i for i in range(n)]


def adds_up(st: SubscriptionStats) -> bool:
    return st.routed == st.sent + st.failed + st.dropped + st.pending + st.handed


def receive(sink: UdpSink, n: int) -> list[bytes]:
    return sink.receive(n, timeout=5)


@pytest.fixture
def sinks() -> Iterator[list[UdpSink]]:
    made = [UdpSink() for _ in range(3)]
    yield made
    for sink in made:
        sink.close()


def test_parallel_gives_every_member_every_event(seg, sinks) -> None:
    dest = parse_destination(f"virtual:PARALLEL {sinks[0].address} {sinks[1].address}")
    ep = transports(seg).open(dest)
    group = GroupStats(seg, 0, 0, 7, 2)
    batch = batch_of(Outbox(), bodies(5))
    ep.send(batch, range(5), group)
    want = [NOTE.build(b) for b in bodies(5)]
    assert receive(sinks[0], 5) == want and receive(sinks[1], 5) == want
    for member in group.members:
        assert (member.routed, member.sent) == (5, 5) and adds_up(member)
    ep.close()


def test_round_robin_alternates_and_leaves_the_batch_packed_for_the_next_destination(
    seg, sinks
) -> None:
    dest = parse_destination(f"virtual:ROUND-ROBIN {sinks[0].address} {sinks[1].address}")
    t = transports(seg)
    ep = t.open(dest)
    plain = t.open(parse_destination(sinks[2].address))
    group = GroupStats(seg, 0, 0, 7, 2)
    single = SubscriptionStats(seg, 0, 1, 8)
    batch = batch_of(Outbox(), bodies(5))
    ep.send(batch, range(5), group)
    plain.send(batch, range(5), single)  # after the virtual one, in the same batch
    want = [NOTE.build(b) for b in bodies(5)]
    assert receive(sinks[0], 3) == want[0::2]
    assert receive(sinks[1], 2) == want[1::2]
    assert receive(sinks[2], 5) == want
    assert [m.sent for m in group.members] == [3, 2] and single.sent == 5
    # The turn goes on from where the last batch left it.
    ep.send(batch_of(Outbox(), bodies(1)), range(1), group)
    assert receive(sinks[1], 1) == want[:1]
    for ep_ in (ep, plain):
        ep_.close()


def test_failover_skips_a_member_that_is_gone_and_sends_it_to_the_back(
    seg, sinks, tmp_path: Path
) -> None:
    gone = tmp_path / "gone.sock"  # nobody listens: ENOENT
    dest = parse_destination(f"virtual:FAILOVER unix:{gone} {sinks[0].address}")
    ep = transports(seg).open(dest)
    group = GroupStats(seg, 0, 0, 7, 2)
    ep.send(batch_of(Outbox(), bodies(4)), range(4), group)
    want = [NOTE.build(b) for b in bodies(4)]
    assert receive(sinks[0], 4) == want
    first, second = group.members
    assert (first.routed, first.failed, first.enoent) == (4, 4, 4)
    assert (second.routed, second.sent) == (4, 4)
    assert ep.order == [1, 0]  # the member that failed went to the back
    # The next batch goes to the member that works first: no failure at all.
    ep.send(batch_of(Outbox(), bodies(2)), range(2), group)
    assert receive(sinks[0], 2) == want[:2]
    assert first.routed == 4 and second.sent == 6
    assert adds_up(first) and adds_up(second)
    ep.close()


def test_failover_when_every_member_fails_counts_each_once_and_stops(seg, tmp_path) -> None:
    dest = parse_destination(f"virtual:FAILOVER unix:{tmp_path / 'a.sock'} unix:{tmp_path / 'b'}")
    ep = transports(seg).open(dest)
    group = GroupStats(seg, 0, 0, 7, 2)
    ep.send(batch_of(Outbox(), bodies(3)), range(3), group)
    assert [(m.routed, m.failed) for m in group.members] == [(3, 3), (3, 3)]
    ep.close()


def read_handoff(seg: Segment, relay: int) -> list[tuple[int, bytes, int]]:
    layout = seg.layout
    reader = LaneReader(
        seg.buf,
        seg.words,
        layout.handoff_word(0, relay),
        layout.handoff_data(0, relay),
        layout.geometry.handoff_size,
    )
    records, stretch, _ = reader.read_span(1000, 1 << 20)
    got = []
    for event_id, at, n in records:
        raised = struct.unpack_from("<Q", stretch, at - 8)[0]
        got.append((event_id, bytes(stretch[at : at + n]), raised))
    reader.release()
    return got


def test_handoff_writes_slot_member_and_id_before_the_params_and_drops_when_full(seg) -> None:
    dest = parse_destination("rabbitmq:127.0.0.1:5672/q")
    ep = transports(seg, {dest.spec(): 1}).open(dest)
    assert isinstance(ep, HandoffEndpoint)
    stats = SubscriptionStats(seg, 0, 3, 42)
    ep.send(batch_of(Outbox(), bodies(3)), range(3), stats)
    assert (stats.routed, stats.handed, stats.dropped) == (3, 3, 0)
    got = read_handoff(seg, 1)
    assert [g[0] for g in got] == [0, 0, 0] and {g[2] for g in got} == {RAISED_NS}
    for (_, body, _), params in zip(got, bodies(3), strict=True):
        assert HANDOFF_HEADER.unpack(body[:HANDOFF_PREFIX]) == (3, 0, 42)
        assert body[HANDOFF_PREFIX:] == params
    assert read_handoff(seg, 0) == []  # the other relay's lane got nothing
    # Nobody reads: the lane fills, and what does not fit is dropped and counted.
    big = [b'{"pad":"%s"}' % (b"x" * 4000)] * 64
    ep.send(batch_of(Outbox(), big), range(64), stats)
    assert stats.dropped > 0 and stats.handed + stats.dropped == 3 + 64
    assert adds_up(stats)


def test_a_failover_member_whose_broker_is_down_fails_at_once(seg, sinks) -> None:
    broker = parse_destination("rabbitmq:127.0.0.1:5672/q")
    dest = parse_destination(f"virtual:FAILOVER {broker} {sinks[0].address}")
    ep = transports(seg, {broker.spec(): 0}).open(dest)
    group = GroupStats(seg, 0, 0, 7, 2)
    ep.send(batch_of(Outbox(), bodies(2)), range(2), group)  # R_CONNECTED is 0: down
    assert receive(sinks[0], 2) == [NOTE.build(b) for b in bodies(2)]
    assert (group.members[0].failed, group.members[0].handed) == (2, 0)
    assert read_handoff(seg, 0) == []
    seg.words[seg.layout.relay_word(0) + R_CONNECTED] = 1  # the relay is connected again
    ep.order = [0, 1]
    ep.send(batch_of(Outbox(), bodies(1)), range(1), group)
    assert group.members[0].handed == 1 and len(read_handoff(seg, 0)) == 1
    assert all(adds_up(m) for m in group.members)


def test_a_plain_broker_destination_keeps_handing_off_while_its_broker_is_down(seg) -> None:
    dest = parse_destination("rabbitmq:127.0.0.1:5672/q")
    ep = transports(seg, {dest.spec(): 0}).open(dest)
    stats = SubscriptionStats(seg, 0, 0, 1)
    ep.send(batch_of(Outbox(), bodies(2)), range(2), stats)
    assert stats.handed == 2 and len(read_handoff(seg, 0)) == 2
