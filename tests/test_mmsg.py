"""BatchSend: sendmmsg through ctypes behaves like ``sock.send`` per datagram, over real sockets."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest
from conftest import SO_RCVBUFFORCE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpevent import mmsg
from mpevent.mmsg import BUFFER_BYTES, MAX_MESSAGES, BatchSend

pytestmark = pytest.mark.skipif(not mmsg.AVAILABLE, reason="no sendmmsg in this C library")


@pytest.fixture
def udp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    tx.setblocking(False)
    yield tx, rx
    tx.close()
    rx.close()


def send_all(sender: BatchSend, sock: socket.socket, datagrams: list[bytes]) -> list[int]:
    """What callers do: call again from where the last call stopped; the counts per call."""
    counts = []
    i = 0
    while i < len(datagrams):
        n = sender.send(sock, datagrams, i)
        assert 1 <= n <= len(datagrams) - i
        counts.append(n)
        i += n
    return counts


def test_many_datagrams_arrive_whole_and_in_order(udp_pair) -> None:
    tx, rx = udp_pair
    datagrams = [
        b"%d:" % i + bytes([i % 251]) * (i * 7 % 1500) for i in range(3 * MAX_MESSAGES + 5)
    ]
    counts = send_all(BatchSend(), tx, datagrams)
    # Batches really are batches: at most MAX_MESSAGES per call, and far
    # fewer calls than datagrams.
    assert max(counts) <= MAX_MESSAGES
    assert len(counts) == 4
    assert [rx.recv(65536) for _ in datagrams] == datagrams


def test_a_call_stops_at_the_buffer_size_and_the_next_one_goes_on(udp_pair) -> None:
    tx, rx = udp_pair
    big = 60_000
    datagrams = [bytes([i]) * big for i in range(2 * BUFFER_BYTES // big)]
    counts = send_all(BatchSend(), tx, datagrams)
    assert counts[0] == BUFFER_BYTES // big  # as many as fit, no more
    assert sum(counts) == len(datagrams)
    assert [rx.recv(65536) for _ in datagrams] == datagrams


def test_empty_and_largest_datagrams(udp_pair) -> None:
    tx, rx = udp_pair
    datagrams = [b"", b"x" * 65457, b"", b"y"]
    send_all(BatchSend(), tx, datagrams)
    assert [rx.recv(65536) for _ in datagrams] == datagrams


def test_full_unix_receiver_takes_part_then_raises_blocking(tmp_path) -> None:
    """A UNIX receiver's queue holds a few datagrams (net.unix.max_dgram_qlen):
    the call sends those, says how many, and the next call raises
    BlockingIOError as send would."""
    path = str(tmp_path / "rx.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    tx.connect(path)
    os.unlink(path)  # the bound socket stays reachable through tx's connection
    with rx, tx:
        tx.setblocking(False)
        datagrams = [b"n%d" % i for i in range(200)]
        sender = BatchSend()
        taken = sender.send(tx, datagrams, 0)
        assert 1 <= taken < len(datagrams)
        with pytest.raises(BlockingIOError):
            sender.send(tx, datagrams, taken)
        rx.setblocking(False)
        got = []
        with pytest.raises(BlockingIOError):
            while True:
                got.append(rx.recv(100))
        assert got == datagrams[:taken]
        # Room again: the rest goes, still in order.
        rest = datagrams[taken : taken + 3]
        assert sender.send(tx, rest, 0) == 3
        assert [rx.recv(100) for _ in rest] == rest


def test_closed_udp_port_raises_connection_refused_like_send() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tx:
        tx.connect(rx.getsockname())
        rx.close()
        sender = BatchSend()
        # The first datagram goes; the ICMP it provokes is the next call's error.
        assert sender.send(tx, [b"a"], 0) == 1
        with pytest.raises(ConnectionRefusedError) as exc:
            for _ in range(100):
                sender.send(tx, [b"b", b"c"], 0)
        assert exc.value.errno == errno.ECONNREFUSED


def test_without_sendmmsg_one_datagram_per_call(udp_pair, monkeypatch) -> None:
    tx, rx = udp_pair
    monkeypatch.setattr(mmsg, "_sendmmsg", None)
    datagrams = [b"one", b"two", b"three"]
    assert send_all(BatchSend(), tx, datagrams) == [1, 1, 1]
    assert [rx.recv(100) for _ in datagrams] == datagrams


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=600), st.integers(0, 20))
def test_property_what_goes_in_comes_out(udp_pair, datagrams: list[bytes], start: int) -> None:
    tx, rx = udp_pair
    start = min(start, len(datagrams) - 1)
    sender = BatchSend()
    i = start
    while i < len(datagrams):
        i += sender.send(tx, datagrams, i)
    assert [rx.recv(65536) for _ in datagrams[start:]] == datagrams[start:]
