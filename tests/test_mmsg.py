"""Outbox: sendmmsg through ctypes, datagrams gathered from pieces, over real sockets.

Each test sends what a sender would: params copied into the outbox from a
"lane stretch", a notification prefix and the closing brace around them,
and checks what a receiver gets against the datagrams built the plain way.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpevent.processes.sender import mmsg
from mpevent.processes.sender.mmsg import MAX_MESSAGES, Outbox, address_of
from mpevent.protocol.payload import Notification
from mpevent.system import set_rcvbuf

pytestmark = pytest.mark.skipif(not mmsg.AVAILABLE, reason="no sendmmsg in this C library")
NOTE = Notification("E_TEST")
CLOSE = b"}"


@pytest.fixture
def udp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    set_rcvbuf(rx, 64 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    tx.setblocking(False)
    yield tx, rx
    tx.close()
    rx.close()


def load(outbox: Outbox, bodies: list[bytes]) -> list[bytes]:
    """Put ``bodies`` in the outbox as a lane stretch would be, pack one message
    each (no params for an empty body); returns the datagrams expected."""
    stretch = b"".join(bodies)
    base = outbox.load(memoryview(stretch))
    pieces: list[int] = []
    at = 0
    for body in bodies:
        if body:
            pieces += (address_of(NOTE.prefix), len(NOTE.prefix), base + at, len(body))
            pieces += (address_of(CLOSE), 1)
        else:
            pieces += (address_of(NOTE.bare), len(NOTE.bare), 0, 0, 0, 0)
        at += len(body)
    outbox.pack(pieces)
    return [NOTE.build(body) for body in bodies]


def send_all(outbox: Outbox, sock: socket.socket, count: int, first: int = 0) -> list[int]:
    """What the sender does: call again from where the last call stopped."""
    counts = []
    while first < count:
        n = outbox.send(sock, first, count - first)
        assert 1 <= n <= count - first
        counts.append(n)
        first += n
    return counts


def test_a_batch_arrives_whole_and_in_order_in_one_call(udp_pair) -> None:
    tx, rx = udp_pair
    outbox = Outbox()
    bodies = [b'{"seq":%d,"pad":"%s"}' % (i, b"x" * (i * 7 % 1400)) for i in range(MAX_MESSAGES)]
    expected = load(outbox, bodies)
    assert send_all(outbox, tx, len(bodies)) == [MAX_MESSAGES]  # one syscall
    assert [rx.recv(65536) for _ in expected] == expected


def test_one_packing_serves_every_destination(udp_pair) -> None:
    tx, rx = udp_pair
    rx2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx2, tx2:
        rx2.bind(("127.0.0.1", 0))
        rx2.settimeout(5)
        tx2.connect(rx2.getsockname())
        outbox = Outbox()
        expected = load(outbox, [b'{"a":1}', b"", b'{"b":[1,2]}'])
        send_all(outbox, tx, 3)
        send_all(outbox, tx2, 3)
        assert [rx.recv(100) for _ in expected] == expected
        assert [rx2.recv(100) for _ in expected] == expected


def test_sending_from_the_middle_of_a_batch(udp_pair) -> None:
    tx, rx = udp_pair
    outbox = Outbox()
    expected = load(outbox, [b'{"n":%d}' % i for i in range(10)])
    send_all(outbox, tx, 10, first=7)
    assert [rx.recv(100) for _ in range(3)] == expected[7:]


def test_no_params_and_the_largest_datagram(udp_pair) -> None:
    tx, rx = udp_pair
    outbox = Outbox()
    biggest = b'"' + b"y" * (65457 - len(NOTE.prefix) - 3) + b'"'
    expected = load(outbox, [b"", biggest, b""])
    assert len(expected[1]) == 65457
    send_all(outbox, tx, 3)
    assert [rx.recv(65536) for _ in expected] == expected


def test_full_unix_receiver_takes_part_then_raises_blocking(tmp_path) -> None:
    """A UNIX receiver's queue holds a few datagrams (net.unix.max_dgram_qlen):
    the call sends those, says how many, and the next call raises
    BlockingIOError, as send would."""
    path = str(tmp_path / "rx.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    tx.connect(path)
    os.unlink(path)  # the bound socket stays reachable through tx's connection
    with rx, tx:
        tx.setblocking(False)
        outbox = Outbox()
        expected = load(outbox, [b'{"n":%d}' % i for i in range(200)])
        taken = outbox.send(tx, 0, 200)
        assert 1 <= taken < 200
        with pytest.raises(BlockingIOError):
            outbox.send(tx, taken, 200 - taken)
        rx.setblocking(False)
        got = []
        with pytest.raises(BlockingIOError):
            while True:
                got.append(rx.recv(100))
        assert got == expected[:taken]
        # Room again: the rest goes on, in order.
        assert outbox.send(tx, taken, 3) == 3
        assert [rx.recv(100) for _ in range(3)] == expected[taken : taken + 3]


def test_closed_udp_port_raises_connection_refused_like_send() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tx:
        tx.connect(rx.getsockname())
        rx.close()
        outbox = Outbox()
        load(outbox, [b'{"a":1}', b'{"b":2}'])
        # The first datagram goes; the ICMP it provokes is the next call's error.
        assert outbox.send(tx, 0, 1) == 1
        with pytest.raises(ConnectionRefusedError) as exc:
            for _ in range(100):
                outbox.send(tx, 0, 2)
        assert exc.value.errno == errno.ECONNREFUSED


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=MAX_MESSAGES), st.integers(0, 300))
def test_property_what_goes_in_comes_out(udp_pair, bodies: list[bytes], first: int) -> None:
    tx, rx = udp_pair
    first = min(first, len(bodies) - 1)
    outbox = Outbox()
    expected = load(outbox, bodies)
    send_all(outbox, tx, len(bodies), first)
    assert [rx.recv(65536) for _ in expected[first:]] == expected[first:]
