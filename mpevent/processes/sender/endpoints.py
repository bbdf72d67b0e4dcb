"""Endpoints: one destination each, one class per transport kind.

The sender's loop drives every destination through the small
:class:`Endpoint` interface; :func:`open_endpoint` picks the class for a
destination's kind. Today there is one, :class:`DatagramEndpoint` (``udp:``
and ``unix:``); a stream (``tcp:``) or broker (``rabbitmq:``) endpoint
implements the same four members and keeps its waiting messages in a
bounded :class:`~mpevent.processes.sender.backlog.Backlog` too.

What every endpoint promises the loop:

* :meth:`Endpoint.send` never blocks, and counts each message it is given
  exactly once in the run's ledger (:mod:`mpevent.processes.sender.accounts`):
  routed at once, then sent, failed or dropped, or kept in its backlog
  (pending) and counted when it leaves it;
* it never touches the loop's poll registry: :meth:`Endpoint.wants` says
  which descriptor it waits on, and for what, and the loop asks after each
  call into the endpoint and registers it;
* :meth:`Endpoint.close` releases everything; what still waited is dropped
  (counted).

A datagram endpoint is a connected non-blocking socket: a connected socket
reports ECONNREFUSED (UDP port closed, UNIX listener gone) and ENOENT (UNIX
path gone) for this destination alone. EAGAIN (a UNIX receiver's queue is
full) keeps the datagram, and every later one, in the backlog, so order is
kept; the backlog is flushed when the socket is writable. A UNIX listener
that went away may come back on the same path: the socket is closed, what
waited fails, and the next datagram connects again (at most every
:data:`RECONNECT_INTERVAL_NS`).
"""

from __future__ import annotations

import errno
import select
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

from mpevent.processes.sender import mmsg
from mpevent.processes.sender.accounts import Ledger
from mpevent.processes.sender.backlog import Backlog, BacklogBudget, BacklogLimits
from mpevent.processes.sender.batch import LaneBatch
from mpevent.protocol.destination import Destination

__all__ = ["BacklogLimits", "DatagramEndpoint", "Endpoint", "open_endpoint"]

RECONNECT_INTERVAL_NS = 50_000_000
# A UNIX datagram socket whose peer is gone; a listener may bind the path again.
_PEER_GONE = (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN)


class Endpoint(ABC):
    """One destination as the sender's loop drives it (see the module doc)."""

    __slots__ = ()

    destination: Destination

    @abstractmethod
    def send(self, batch: LaneBatch, messages: Sequence[int], ledger: Ledger) -> None:
        """Send messages of ``batch`` in order, without blocking.

        ``messages`` are indices into the batch, and the batch's outbox is
        packed in this order: its message ``k`` is ``messages[k]``.
        ``ledger`` counts them (message ``k`` is ``ledger.owner(k)``'s).
        """

    @abstractmethod
    def wants(self) -> tuple[int, int] | None:
        """(descriptor, poll events) this endpoint waits for; None: nothing."""

    @abstractmethod
    def ready(self, revents: int) -> None:
        """``poll`` reported ``revents`` on the descriptor of :meth:`wants`."""

    @abstractmethod
    def close(self) -> None:
        """Drop what waits (counted) and release the descriptor."""


class DatagramEndpoint(Endpoint):
    """A UDP or UNIX datagram destination: its connected socket and its backlog."""

    __slots__ = ("backlog", "destination", "last_errno", "retry_at", "sock")

    def __init__(self, destination: Destination, limits: BacklogLimits, budget: BacklogBudget):
        self.destination = destination
        self.backlog = Backlog(limits, budget)
        self.sock: socket.socket | None = None
        self.last_errno = 0  # why the last send or connect failed
        self.retry_at = 0  # monotonic ns: when to try connecting again
        self._connect()

    def _connect(self) -> bool:
        dest = self.destination
        sock = socket.socket(dest.family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(dest.sockaddr)
        except OSError as exc:
            sock.close()
            self.last_errno = exc.errno or errno.EIO
            self.retry_at = time.monotonic_ns() + RECONNECT_INTERVAL_NS
            return False
        self.sock = sock
        return True

    def _connected(self) -> bool:
        if self.sock is not None:
            return True
        return time.monotonic_ns() >= self.retry_at and self._connect()

    def send(self, batch: LaneBatch, messages: Sequence[int], ledger: Ledger) -> None:
        count = len(messages)
        ledger.count_routed(0, count)
        if self.backlog.datagrams:
            self._keep(batch, messages, 0, ledger)  # behind what waits: order kept
            return
        if not self._connected():
            ledger.count_failed(0, count, self.last_errno)
            return
        sock = self.sock
        outbox = batch.outbox if mmsg.AVAILABLE else None
        k = 0
        while k < count:
            try:
                if outbox is not None:
                    went = outbox.send(sock, k, count - k)
                else:
                    sock.send(batch.datagram(messages[k]))
                    went = 1
            except BlockingIOError:
                self._keep(batch, messages, k, ledger)
                return
            except OSError as exc:
                code = exc.errno or errno.EIO
                ledger.owner(k).fail(code)
                self._failed(code)
                k += 1
                if not self._connected():
                    ledger.count_failed(k, count, self.last_errno)  # the listener is gone for now
                    return
                sock = self.sock
                continue
            ledger.count_sent(batch.sizes, messages, k, k + went)
            k += went

    def _keep(self, batch: LaneBatch, messages: Sequence[int], start: int, ledger: Ledger) -> None:
        """Keep messages ``start..`` as datagrams until the socket is writable.

        The first that does not fit a bound is dropped, and every one after
        it in this run (counted): the run is one batch, a burst, and most of
        the time the bound that stopped the first stops the rest.
        """
        backlog = self.backlog
        sizes = batch.sizes
        count = len(messages)
        for k in range(start, count):
            message = messages[k]
            if not backlog.room(sizes[message]):
                ledger.count_dropped(k, count)
                return
            backlog.push(batch.datagram(message), ledger.owner(k))

    def _failed(self, code: int) -> None:
        self.last_errno = code
        if self.destination.kind == "unix" and code in _PEER_GONE:
            # The listener went away; a new one may bind the same path, so
            # the next datagram reconnects. What waited for this socket fails.
            self._close_socket()
            for owner in self.backlog.empty():
                owner.fail(code)
            self.retry_at = 0

    def wants(self) -> tuple[int, int] | None:
        if self.backlog.datagrams and self.sock is not None:
            return self.sock.fileno(), select.POLLOUT
        return None

    def ready(self, revents: int) -> None:
        """Send what the backlog holds, oldest first, until the socket is full."""
        backlog = self.backlog
        while backlog.datagrams:
            sock = self.sock
            if sock is None:  # not after _failed, which empties the backlog
                for owner in backlog.empty():
                    owner.fail(self.last_errno)
                return
            datagram = backlog.first()
            try:
                sock.send(datagram)
            except BlockingIOError:
                return
            except OSError as exc:
                code = exc.errno or errno.EIO
                backlog.pop().fail(code)
                self._failed(code)
                continue
            owner = backlog.pop()
            owner.sent += 1
            owner.bytes += len(datagram)

    def close(self) -> None:
        for owner in self.backlog.empty():
            owner.dropped += 1
        self._close_socket()

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


_KINDS: dict[str, type[DatagramEndpoint]] = {"udp": DatagramEndpoint, "unix": DatagramEndpoint}


def open_endpoint(
    destination: Destination, limits: BacklogLimits, budget: BacklogBudget
) -> Endpoint:
    """The endpoint of ``destination``'s transport; its backlog is bounded by
    ``limits`` and shares ``budget`` with the sender's other endpoints."""
    return _KINDS[destination.kind](destination, limits, budget)
