"""The tcp: endpoint (OpenSIPS event_stream) over real TCP connections on loopback.

Each test drives a :class:`StreamEndpoint` as the sender's loop does (poll
what ``wants()`` says, call ``ready``; call ``tick`` when ``due_ns()`` has
come) against a peer the test runs in the same thread, pumped between
polls: it accepts, reads (or stops reading), answers (or not). Counters are
the sender's own (:class:`SubscriptionStats` on a real segment) and must
add up after every step: ``routed = sent + failed + dropped + pending``.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator

import orjson
import pytest

from mpevent.processes.sender import stream
from mpevent.processes.sender.accounts import PerMessage, SubscriptionStats
from mpevent.processes.sender.backlog import BacklogBudget, BacklogLimits
from mpevent.processes.sender.batch import LaneBatch, Message
from mpevent.processes.sender.mmsg import Outbox, address_of
from mpevent.processes.sender.stream import StreamEndpoint
from mpevent.processes.sender.transports import Transports
from mpevent.protocol.destination import StreamDestination
from mpevent.protocol.jsonstream import JsonSplitter
from mpevent.protocol.payload import Notification
from mpevent.shm.layout import Geometry
from mpevent.shm.segment import Segment
from mpevent.system import free_port

NOTE = Notification("E_TEST")
CLOSE = b"}"
BIG = 1 << 30  # a bound that never binds
RECORD_HEADER = struct.Struct("<IIQ")  # as a lane record: length, event id, raise time


@pytest.fixture
def seg() -> Iterator[Segment]:
    segment = Segment.create(Geometry(lanes=1, lane_size=4096, max_events=4, max_subs=8, relays=0))
    yield segment
    segment.close()


def stats_for(seg: Segment, slot: int = 0) -> SubscriptionStats:
    return SubscriptionStats(seg, 0, slot, 100 + slot)


def adds_up(st: SubscriptionStats) -> bool:
    return st.routed == st.sent + st.failed + st.dropped + st.pending


def bodies(n: int, pad: int = 0, start: int = 0) -> list[bytes]:
    """Params of ``n`` events, numbered from ``start``, all of one size."""
    return [b'{"n":"%06d","pad":"%s"}' % (start + i, b"x" * pad) for i in range(n)]


def batch_of(outbox: Outbox, params: list[bytes]) -> tuple[LaneBatch, list[bytes]]:
    """A lane batch of E_TEST events with these params (b"": none), laid out
    as lane records and packed as the loop packs it; and the notifications."""
    stretch = b"".join(RECORD_HEADER.pack(len(p), 0, 1000 + i) + p for i, p in enumerate(params))
    base = outbox.load(memoryview(stretch))
    batch = LaneBatch(outbox, [NOTE])
    at = 0
    for body in params:
        at += RECORD_HEADER.size
        if body:
            batch.pieces += (address_of(NOTE.prefix), len(NOTE.prefix), base + at, len(body))
            batch.pieces += (address_of(CLOSE), 1)
        else:
            batch.pieces += (address_of(NOTE.bare), len(NOTE.bare), 0, 0, 0, 0)
        batch.sizes.append(len(NOTE.build(body)))
        batch.bodies.append((0, at, len(body)))
        at += len(body)
    outbox.pack(batch.pieces)
    return batch, [NOTE.build(body) for body in params]


def tcp(port: int, host: str = "127.0.0.1", **options) -> StreamDestination:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return StreamDestination("tcp", family, host, port, **options)


def endpoint(dest: StreamDestination, limits: BacklogLimits | None = None, **kw) -> StreamEndpoint:
    limits = limits or BacklogLimits(1000, BIG, BIG)
    return StreamEndpoint(dest, limits, BacklogBudget(limits.sender_backlog_bytes), **kw)


def request(text: bytes, request_id: int) -> bytes:
    return text[:-1] + b',"id":%d}' % request_id


class Peer:
    """A TCP server the test pumps: accepts, reads what it is sent (unless
    told not to), and answers each request with what ``answer`` returns."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        answer: Callable[[dict], bytes | None] | None = None,
        rcvbuf: int = 0,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.rcvbuf = rcvbuf
        if rcvbuf:  # inherited by accepted connections: their window stays small
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind((host, port))
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.answer = answer
        self.reading = True
        self.hold_replies = False  # keep answers in `outgoing` until told
        self.trickle = 0  # when > 0: write at most this many bytes per pump
        self.conns: list[socket.socket] = []
        self.streams: list[bytearray] = []  # what each connection received
        self.splitters: list[JsonSplitter] = []
        self.outgoing = bytearray()  # replies for the newest connection
        self.eof = 0  # connections the endpoint closed

    def pump(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                break
            conn.setblocking(False)
            self.conns.append(conn)
            self.streams.append(bytearray())
            self.splitters.append(JsonSplitter())
            self.outgoing.clear()
        if self.reading:
            for i, conn in enumerate(self.conns):
                if conn.fileno() < 0:
                    continue
                while True:
                    try:
                        data = conn.recv(1 << 16)
                    except BlockingIOError:
                        break
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        conn.close()
                        self.eof += 1
                        break
                    self.streams[i] += data
                    for text in self.splitters[i].feed(data):
                        if self.answer is not None and i == len(self.conns) - 1:
                            reply = self.answer(orjson.loads(text))
                            if reply is not None:
                                self.outgoing += reply
        if self.outgoing and not self.hold_replies and self.conns and self.conns[-1].fileno() >= 0:
            chunk = self.outgoing[: self.trickle] if self.trickle else self.outgoing
            try:
                went = self.conns[-1].send(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                went = 0
            del self.outgoing[:went]

    def texts(self, connection: int = -1) -> list[bytes]:
        return JsonSplitter().feed(bytes(self.streams[connection]))

    def received(self) -> bytes:
        return b"".join(self.streams)

    def drop_connections(self) -> None:
        for conn in self.conns:
            conn.close()

    def close(self) -> None:
        self.drop_connections()
        self.listener.close()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.close()


def drive(
    ep: StreamEndpoint,
    until: Callable[[], bool],
    peers: tuple[Peer, ...] | list[Peer] = (),
    timeout: float = 15.0,
) -> None:
    """Run the endpoint as the sender's loop would until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        for peer in peers:
            peer.pump()
        if until():
            return
        assert time.monotonic() < deadline, "the condition did not come true in time"
        wait_ms = 5.0
        due = ep.due_ns()
        if due:
            wait_ms = min(wait_ms, max(0.0, (due - time.monotonic_ns()) / 1e6))
        want = ep.wants()
        if want is None:
            time.sleep(wait_ms / 1000)
        else:
            poller = select.poll()
            poller.register(*want)
            for _, revents in poller.poll(wait_ms):
                ep.ready(revents)
        due = ep.due_ns()
        now = time.monotonic_ns()
        if due and now >= due:
            ep.tick(now)


class Failures:
    """``on_failed``: every message told, with its owner and errno."""

    def __init__(self) -> None:
        self.calls: list[tuple[Message, SubscriptionStats, int]] = []

    def __call__(self, message: Message, owner: SubscriptionStats, code: int) -> None:
        self.calls.append((message, owner, code))

    def codes(self) -> set[int]:
        return {code for _, _, code in self.calls}


# -- delivery ----------------------------------------------------------------


def test_notifications_arrive_back_to_back_in_order_one_write_per_batch(
    seg, peers, monkeypatch
) -> None:
    calls = []
    real = socket.socket.sendmsg

    def counting(sock, buffers, *args):
        calls.append(len(buffers))
        return real(sock, buffers, *args)

    monkeypatch.setattr(socket.socket, "sendmsg", counting)
    peer = Peer()
    peers.append(peer)
    ep = endpoint(tcp(peer.port))
    st = stats_for(seg)
    outbox = Outbox()
    batch, first = batch_of(outbox, bodies(200))
    ep.send(batch, range(200), st)  # while connecting: they wait, then go in one write
    assert adds_up(st)
    drive(ep, lambda: ep.connected and st.pending == 0, peers)
    batch, second = batch_of(outbox, [*bodies(99, start=200), b""])  # one without params
    ep.send(batch, range(100), st)  # connected, nothing waiting: written at once
    expected = b"".join(first + second)
    drive(ep, lambda: len(peer.received()) >= len(expected), peers)
    assert peer.received() == expected and len(peer.streams) == 1
    assert peer.texts()[-1] == b'{"jsonrpc":"2.0","method":"E_TEST"}'
    assert (st.routed, st.sent, st.pending, st.bytes) == (300, 300, 0, len(expected))
    assert adds_up(st)
    assert calls == [200, 100]  # never one syscall per message
    ep.close()
    drive(ep, lambda: peer.eof == 1, peers)


def test_method_replaces_the_event_name(seg, peers) -> None:
    peer = Peer()
    peers.append(peer)
    ep = endpoint(tcp(peer.port, method="dispatch@edge"))  # not an event name: any printable
    st = stats_for(seg)
    batch, _ = batch_of(Outbox(), [b'{"ip":"1.2.3.4"}', b"", b"[1,2]"])
    ep.send(batch, range(3), st)
    drive(ep, lambda: st.sent == 3, peers)
    drive(ep, lambda: len(peer.texts()) == 3, peers)
    assert peer.texts() == [
        b'{"jsonrpc":"2.0","method":"dispatch@edge","params":{"ip":"1.2.3.4"}}',
        b'{"jsonrpc":"2.0","method":"dispatch@edge"}',
        b'{"jsonrpc":"2.0","method":"dispatch@edge","params":[1,2]}',
    ]
    assert st.bytes == len(peer.received()) and adds_up(st)
    ep.close()


def test_a_run_of_several_subscriptions_counts_each_its_own(seg, peers) -> None:
    peer = Peer()
    peers.append(peer)
    ep = endpoint(tcp(peer.port))
    a, b = stats_for(seg, 0), stats_for(seg, 1)
    drive(ep, lambda: ep.connected, peers)
    batch, expected = batch_of(Outbox(), bodies(40))
    owners = [a if i % 4 else b for i in range(40)]
    ep.send(batch, range(40), PerMessage(owners))
    drive(ep, lambda: len(peer.received()) == len(b"".join(expected)), peers)
    assert (a.routed, a.sent, b.routed, b.sent) == (30, 30, 10, 10)
    assert b.bytes == sum(len(t) for t in expected[::4]) and adds_up(a) and adds_up(b)
    ep.close()


def test_ipv6_loopback(seg, peers) -> None:
    try:
        peer = Peer(host="::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    peers.append(peer)
    ep = endpoint(tcp(peer.port, host="::1"))
    st = stats_for(seg)
    batch, expected = batch_of(Outbox(), bodies(10))
    ep.send(batch, range(10), st)
    drive(ep, lambda: len(peer.received()) == len(b"".join(expected)), peers)
    assert peer.received() == b"".join(expected) and st.sent == 10 and adds_up(st)
    assert ep.wants()[0] == ep._sock.fileno() and ep._sock.family == socket.AF_INET6
    ep.close()


# -- a peer that is down, slow or gone -------------------------------------------------


def test_events_wait_for_a_peer_that_is_not_listening_and_arrive_when_it_is(seg, peers) -> None:
    port = free_port(socket.SOCK_STREAM)
    ep = Transports(BacklogLimits(1000, BIG, BIG), BacklogBudget(BIG)).open(tcp(port))
    assert isinstance(ep, StreamEndpoint)
    st = stats_for(seg)
    drive(ep, lambda: ep.last_errno == errno.ECONNREFUSED)
    assert not ep.connected and ep.wants() is None and ep.due_ns() > 0  # a retry is due
    batch, expected = batch_of(Outbox(), bodies(50))
    ep.send(batch, range(50), st)
    assert (st.routed, st.pending, st.sent, st.failed, st.dropped) == (50, 50, 0, 0, 0)
    drive(ep, lambda: ep.last_errno == errno.ECONNREFUSED and ep.due_ns() > time.monotonic_ns())
    assert st.pending == 50  # still waiting, after more refusals
    peer = Peer(port=port)
    peers.append(peer)
    drive(ep, lambda: st.pending == 0, peers)
    drive(ep, lambda: len(peer.received()) == len(b"".join(expected)), peers)
    assert peer.received() == b"".join(expected) and st.sent == 50 and adds_up(st)
    ep.close()


def test_reconnects_back_off_from_50_ms_doubling(seg) -> None:
    ep = endpoint(tcp(free_port(socket.SOCK_STREAM)))
    intervals = []
    for _ in range(5):
        # Step until the attempt in progress fails; measure the retry it schedules.
        while True:
            before = time.monotonic_ns()
            want = ep.wants()
            if want is not None:
                poller = select.poll()
                poller.register(*want)
                for _, revents in poller.poll(1000):
                    ep.ready(revents)
            elif ep.due_ns() <= before:
                ep.tick(before)
            else:
                time.sleep(max(0.0, (ep.due_ns() - before) / 1e9))
                continue
            after = time.monotonic_ns()
            if not ep.connected and ep.wants() is None and ep.due_ns() > after:
                intervals.append((ep.due_ns() - after, ep.due_ns() - before))
                break
    for (low, high), ms in zip(intervals, (50, 100, 200, 400, 800), strict=True):
        assert low <= ms * 1_000_000 <= high, (intervals, ms)
    assert ep.last_errno == errno.ECONNREFUSED
    ep.close()
    assert ep.due_ns() == 0 and ep.wants() is None


def test_a_connection_that_worked_resets_the_backoff(seg, peers) -> None:
    port = free_port(socket.SOCK_STREAM)
    ep = endpoint(tcp(port))
    drive(ep, lambda: ep._backoff_ns >= 8 * stream.BACKOFF_FIRST_NS, timeout=30)  # refused a while
    peer = Peer(port=port)
    peers.append(peer)
    drive(ep, lambda: ep.connected, peers)
    peer.drop_connections()
    before = time.monotonic_ns()
    drive(ep, lambda: not ep.connected)
    assert ep.last_errno == stream.PEER_CLOSED
    assert ep.due_ns() - before <= stream.BACKOFF_FIRST_NS + 5_000_000  # back to the first step
    drive(ep, lambda: ep.connected, peers)  # and it comes back
    ep.close()


def test_a_peer_that_stops_reading_fills_the_backlog_then_drops_counted(seg, peers) -> None:
    peer = Peer(rcvbuf=4096)
    peer.reading = False
    peers.append(peer)
    limits = BacklogLimits(100, BIG, BIG)
    budget = BacklogBudget(BIG)
    ep = StreamEndpoint(tcp(peer.port), limits, budget)
    st = stats_for(seg)
    drive(ep, lambda: ep.connected, peers)
    outbox = Outbox()
    sent = 0
    for round_ in range(2000):
        batch, _ = batch_of(outbox, bodies(100, pad=1000, start=100 * round_))
        ep.send(batch, range(100), st)
        assert adds_up(st)
        if st.dropped:
            break
        drive(ep, lambda: True, peers)  # one pass of the loop
    else:
        pytest.fail("the socket never filled up")
    assert 100 <= st.pending <= 101  # the backlog, and maybe one written in part
    assert len(ep.backlog) == 100 and budget.used == ep.backlog.bytes
    sent = st.sent
    # More finds the backlog full: dropped, all of it.
    batch, _ = batch_of(outbox, bodies(100, pad=1000, start=10**5))
    ep.send(batch, range(100), st)
    assert st.sent == sent and st.pending <= 101 and adds_up(st)
    # The peer reads again: what waited goes, in order, after what went before.
    peer.reading = True
    drive(ep, lambda: st.pending == 0, peers)
    drive(ep, lambda: len(peer.received()) == st.bytes, peers)
    texts = peer.texts()
    numbers = [int(orjson.loads(t)["params"]["n"]) for t in texts]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers) == st.sent
    assert st.sent + st.dropped == st.routed and adds_up(st) and budget.used == 0
    ep.close()


def test_a_peer_that_goes_away_and_comes_back_gets_what_waited(seg, peers) -> None:
    peer = Peer()
    peers.append(peer)
    ep = endpoint(tcp(peer.port))
    st = stats_for(seg)
    outbox = Outbox()
    batch, first = batch_of(outbox, bodies(20))
    ep.send(batch, range(20), st)
    drive(ep, lambda: len(peer.received()) == len(b"".join(first)), peers)
    peer.close()  # the peer goes: the endpoint sees the EOF
    drive(ep, lambda: not ep.connected)
    assert ep.last_errno in (stream.PEER_CLOSED, errno.ECONNREFUSED)
    batch, second = batch_of(outbox, bodies(30, start=20))
    ep.send(batch, range(30), st)
    assert st.pending == 30 and adds_up(st)
    back = Peer(port=peer.port)
    peers.append(back)
    drive(ep, lambda: len(back.received()) == len(b"".join(second)), [back])
    assert back.received() == b"".join(second) and len(back.streams) == 1
    assert (st.sent, st.pending, st.failed, st.dropped) == (50, 0, 0, 0)
    ep.close()


def test_a_message_cut_by_a_broken_connection_goes_again_whole(seg, peers) -> None:
    peer = Peer(rcvbuf=4096)
    peer.reading = False
    peers.append(peer)
    ep = endpoint(tcp(peer.port), BacklogLimits(10**5, BIG, BIG))
    st = stats_for(seg)
    drive(ep, lambda: ep.connected, peers)
    outbox = Outbox()
    for round_ in range(2000):
        batch, _ = batch_of(outbox, bodies(100, pad=777, start=100 * round_))
        ep.send(batch, range(100), st)
        drive(ep, lambda: True, peers)
        if ep._partial is not None:  # the socket took a part of one: the case of this test
            break
    else:
        pytest.fail("no message was ever written in part")
    cut = ep._partial[0]
    waiting = st.pending
    sent_before = st.bytes
    peer.close()  # unread data: the kernel resets the connection
    drive(ep, lambda: not ep.connected)
    assert st.pending == waiting and adds_up(st)  # nothing was lost with it, nor failed
    back = Peer(port=peer.port)
    peers.append(back)
    drive(ep, lambda: st.pending == 0, [back], timeout=30)
    drive(ep, lambda: len(back.received()) == st.bytes - sent_before, [back])
    texts = back.texts()
    assert texts[0] == cut  # whole, first, on the new stream
    assert len(texts) == waiting and b"".join(texts) == back.received()
    assert adds_up(st) and st.failed == 0
    ep.close()


def test_a_peer_not_holding_while_down_fails_at_once(seg) -> None:
    failures = Failures()
    ep = endpoint(tcp(free_port(socket.SOCK_STREAM)), on_failed=failures, hold_while_down=False)
    st = stats_for(seg)
    drive(ep, lambda: ep.last_errno == errno.ECONNREFUSED and ep.wants() is None)
    batch, expected = batch_of(Outbox(), bodies(5))
    ep.send(batch, range(5), st)
    assert (st.failed, st.refused, st.pending) == (5, 5, 0) and adds_up(st)
    assert [m.notification() for m, _, _ in failures.calls] == expected
    assert failures.codes() == {errno.ECONNREFUSED} and {o for _, o, _ in failures.calls} == {st}
    # One message on its own (a virtual subscription's failover) too.
    ep.send_message(failures.calls[0][0], st)
    assert (st.routed, st.failed) == (6, 6) and len(failures.calls) == 6
    ep.close()


def test_connect_timeout(seg, peers, monkeypatch) -> None:
    monkeypatch.setattr(stream, "CONNECT_TIMEOUT_NS", 300_000_000)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once full, the kernel ignores further SYNs
        for _ in range(3):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        time.sleep(0.1)
        ep = endpoint(tcp(listener.getsockname()[1]))
        st = stats_for(seg)
        batch, _ = batch_of(Outbox(), bodies(3))
        ep.send(batch, range(3), st)
        started = time.monotonic()
        drive(ep, lambda: ep.last_errno != 0)
        assert ep.last_errno == errno.ETIMEDOUT and time.monotonic() - started >= 0.25
        assert st.pending == 3 and adds_up(st)  # they wait for the next attempt
        ep.close()
        assert (st.dropped, st.pending) == (3, 0) and adds_up(st)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# -- reliable mode ---------------------------------------------------------------


def answer_result(req: dict) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "result": "OK", "id": req["id"]})


def answer_error(req: dict) -> bytes:
    return orjson.dumps(
        {"jsonrpc": "2.0", "error": {"code": 500, "message": "no"}, "id": req["id"]}
    )


def test_reliable_requests_carry_unique_ids_and_results_count_sent(seg, peers) -> None:
    peer = Peer(answer=answer_result)
    peers.append(peer)
    ep = endpoint(tcp(peer.port, reliable=True))
    st = stats_for(seg)
    outbox = Outbox()
    batch, first = batch_of(outbox, bodies(20))
    ep.send(batch, range(20), st)
    drive(ep, lambda: st.sent == 20, peers)
    batch, second = batch_of(outbox, bodies(5, start=20))
    ep.send(batch, range(5), st)
    drive(ep, lambda: st.sent == 25, peers)
    texts = peer.texts()
    ids = [orjson.loads(t)["id"] for t in texts]
    assert len(set(ids)) == 25
    assert texts == [request(note, i) for note, i in zip(first + second, ids, strict=True)]
    assert st.bytes == len(peer.received()) and st.pending == 0 and adds_up(st)
    assert ep.idle() and ep.due_ns() == 0
    ep.close()


def test_reliable_error_replies_count_failed_and_are_told(seg, peers) -> None:
    peer = Peer(answer=answer_error)
    peers.append(peer)
    failures = Failures()
    ep = endpoint(tcp(peer.port, reliable=True), on_failed=failures)
    st = stats_for(seg)
    batch, expected = batch_of(Outbox(), bodies(10))
    ep.send(batch, range(10), st)
    drive(ep, lambda: st.failed == 10, peers)
    assert (st.sent, st.pending) == (0, 0) and adds_up(st)
    assert [m.notification() for m, _, _ in failures.calls] == expected  # without the id
    assert failures.codes() == {stream.ERROR_REPLY}
    ep.close()


def test_reliable_silence_fails_after_the_timeout(seg, peers) -> None:
    peer = Peer(answer=lambda req: None)
    peers.append(peer)
    failures = Failures()
    ep = endpoint(tcp(peer.port, reliable=True, timeout_ms=300), on_failed=failures)
    st = stats_for(seg)
    batch, _ = batch_of(Outbox(), bodies(10))
    ep.send(batch, range(10), st)
    drive(ep, lambda: len(peer.texts()) == 10 if peer.streams else False, peers)
    written = time.monotonic()
    assert (st.pending, st.failed) == (10, 0) and not ep.idle()
    assert ep.due_ns() > time.monotonic_ns()  # the first reply deadline
    drive(ep, lambda: st.failed == 10, peers)
    assert time.monotonic() - written >= 0.2  # not before its time (written a moment before)
    assert failures.codes() == {errno.ETIMEDOUT} and st.pending == 0 and adds_up(st)
    assert ep.connected  # a timeout is no reason to drop the connection
    ep.close()


def test_reliable_replies_coalesced_out_of_order_and_split_byte_by_byte(seg, peers) -> None:
    peer = Peer(answer=answer_result)
    peer.hold_replies = True
    peers.append(peer)
    ep = endpoint(tcp(peer.port, reliable=True, timeout_ms=60_000))
    st = stats_for(seg)
    outbox = Outbox()
    batch, _ = batch_of(outbox, bodies(10))
    ep.send(batch, range(10), st)
    drive(ep, lambda: len(peer.texts()) == 10 if peer.streams else False, peers)
    ids = [orjson.loads(t)["id"] for t in peer.texts()]
    # All at once, last first, with whitespace, an unknown id, and strings full of
    # what could end a text too early.
    replies = [
        b'{"jsonrpc":"2.0","result":{"x":"}\\"{]"},"id":%d}' % ids[9],
        b' \n{"jsonrpc":"2.0","result":"OK","id":999999}\r\n',
        *(b'{"id":%d,"result":"a\\\\"}\t' % i for i in reversed(ids[:9])),
    ]
    peer.outgoing[:] = b"".join(replies)
    peer.hold_replies = False
    drive(ep, lambda: st.sent == 10, peers)
    assert st.pending == 0 and adds_up(st)
    # Then replies a byte at a time.
    peer.trickle = 1
    batch, _ = batch_of(outbox, bodies(5, start=10))
    ep.send(batch, range(5), st)
    drive(ep, lambda: st.sent == 15, peers)
    assert st.pending == 0 and st.failed == 0 and adds_up(st) and ep.connected
    ep.close()


def test_reliable_a_reply_with_neither_result_nor_error_fails(seg, peers) -> None:
    peer = Peer(answer=lambda req: b'{"jsonrpc":"2.0","id":%d}' % req["id"])
    peers.append(peer)
    failures = Failures()
    ep = endpoint(tcp(peer.port, reliable=True), on_failed=failures)
    st = stats_for(seg)
    batch, _ = batch_of(Outbox(), bodies(4))
    ep.send(batch, range(4), st)
    drive(ep, lambda: st.failed == 4, peers)
    assert failures.codes() == {stream.BAD_REPLY} and st.sent == 0 and adds_up(st)
    assert ep.connected
    ep.close()


def test_reliable_connection_loss_fails_the_unanswered(seg, peers) -> None:
    peer = Peer(answer=lambda req: None)
    peers.append(peer)
    failures = Failures()
    ep = endpoint(tcp(peer.port, reliable=True, timeout_ms=60_000), on_failed=failures)
    st = stats_for(seg)
    batch, _ = batch_of(Outbox(), bodies(10))
    ep.send(batch, range(10), st)
    drive(ep, lambda: len(peer.texts()) == 10 if peer.streams else False, peers)
    peer.drop_connections()
    drive(ep, lambda: st.failed == 10)
    assert failures.codes() <= {stream.PEER_CLOSED, errno.EPIPE, errno.ECONNRESET}
    assert st.pending == 0 and adds_up(st)
    ep.close()


def test_reliable_garbage_from_the_peer_resets_the_connection(seg, peers) -> None:
    peer = Peer(answer=lambda req: b"OK\n")
    peers.append(peer)
    failures = Failures()
    ep = endpoint(tcp(peer.port, reliable=True), on_failed=failures)
    st = stats_for(seg)
    batch, _ = batch_of(Outbox(), bodies(3))
    ep.send(batch, range(3), st)
    drive(ep, lambda: st.failed == 3, peers)
    assert failures.codes() == {stream.BAD_REPLY} and ep.last_errno == stream.BAD_REPLY
    drive(ep, lambda: peer.eof == 1, peers)  # the endpoint closed it
    assert adds_up(st)
    ep.close()


def test_reliable_requests_awaiting_replies_are_bounded(seg, peers) -> None:
    peer = Peer(answer=lambda req: None)
    peers.append(peer)
    ep = endpoint(tcp(peer.port, reliable=True, timeout_ms=60_000), BacklogLimits(4, BIG, BIG))
    st = stats_for(seg)
    drive(ep, lambda: ep.connected, peers)
    batch, _ = batch_of(Outbox(), bodies(10))
    ep.send(batch, range(10), st)
    drive(ep, lambda: len(peer.texts()) == 4 if peer.streams else False, peers)
    drive(ep, lambda: time.sleep(0.05) or True, peers)
    # Four written and awaiting, four in the backlog, two dropped.
    assert len(peer.texts()) == 4 and len(ep.backlog) == 4
    assert (st.pending, st.dropped) == (8, 2) and adds_up(st)
    peer.answer = answer_result
    for text in peer.texts():
        peer.outgoing += answer_result(orjson.loads(text))
    drive(ep, lambda: st.sent == 8, peers)
    assert st.pending == 0 and adds_up(st)
    ep.close()


def test_close_drops_what_waits_and_what_awaits_a_reply(seg, peers) -> None:
    peer = Peer(answer=lambda req: None)
    peers.append(peer)
    ep = endpoint(tcp(peer.port, reliable=True, timeout_ms=60_000))
    down = endpoint(tcp(free_port(socket.SOCK_STREAM)))
    st, other = stats_for(seg, 0), stats_for(seg, 1)
    batch, _ = batch_of(Outbox(), bodies(6))
    ep.send(batch, range(6), st)
    down.send(batch, range(6), other)
    drive(ep, lambda: len(peer.texts()) == 6 if peer.streams else False, peers)
    assert st.pending == other.pending == 6
    ep.close()
    down.close()
    for counters in (st, other):
        assert (counters.dropped, counters.pending) == (6, 0) and adds_up(counters)
