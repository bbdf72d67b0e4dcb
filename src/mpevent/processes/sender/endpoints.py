"""Endpoints: one destination each, one class per transport kind.

The sender's loop drives every destination through the small
:class:`Endpoint` interface; :mod:`mpevent.processes.sender.transports`
picks the class for a destination's kind. This module holds the interface
and :class:`DatagramEndpoint` (``udp:`` and ``unix:``); the stream
(``tcp:``), hand-off (``rabbitmq:``) and virtual endpoints implement the
same members in modules of their own, and keep what waits in a bounded
:class:`~mpevent.processes.sender.backlog.Backlog` too.

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
from collections.abc import Callable, Sequence

from mpevent.processes.sender import mmsg
from mpevent.processes.sender.accounts import Ledger, SubscriptionStats
from mpevent.processes.sender.backlog import Backlog, BacklogBudget, BacklogLimits
from mpevent.processes.sender.batch import LaneBatch, Message
from mpevent.protocol.destination import Destination

#: Called after a message was counted failed, with the message, its owner
#: and the errno: how a virtual FAILOVER subscription hands it to its next
#: member.
Failed = Callable[[Message, SubscriptionStats, int], None]

__all__ = ["BacklogLimits", "DatagramEndpoint", "Endpoint", "Failed"]

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

    def send_message(self, message: Message, owner: SubscriptionStats) -> None:
        """Send one message on its own (a virtual subscription's failover),
        counted like :meth:`send` counts a run of one."""
        raise NotImplementedError(f"{type(self).__name__} cannot take a message on its own")

    def parts(self) -> tuple[Endpoint, ...]:
        """The endpoints the loop watches and ticks for this one: itself, or
        a virtual destination's members (each with its own descriptor)."""
        return (self,)

    def idle(self) -> bool:
        """Nothing waits to be sent or answered (a stopping sender may go)."""
        return self.wants() is None

    def due_ns(self) -> int:
        """When :meth:`tick` must run next (monotonic ns); 0: never. The loop
        asks after each call into the endpoint, like :meth:`wants`, and
        sleeps no longer than the earliest."""
        return 0

    def tick(self, now_ns: int) -> None:  # noqa: B027 (most endpoints have no timers)
        """Time has come (see :meth:`due_ns`): reconnect, time replies out."""


class DatagramEndpoint(Endpoint):
    """A UDP or UNIX datagram destination: its connected socket and its backlog."""

    __slots__ = ("backlog", "destination", "last_errno", "on_failed", "retry_at", "sock")

    def __init__(
        self,
        destination: Destination,
        limits: BacklogLimits,
        budget: BacklogBudget,
        on_failed: Failed | None = None,
    ):
        """``on_failed``: told of each message of a batch that failed (what
        failed waiting in the backlog is not: it is kept as bytes only)."""
        self.destination = destination
        self.backlog = Backlog(limits, budget)
        self.on_failed = on_failed
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
            self._hand_over(batch, messages, 0, ledger, self.last_errno)
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
                if self.on_failed is not None:
                    self.on_failed(batch.message(messages[k]), ledger.owner(k), code)
                self._failed(code)
                k += 1
                if not self._connected():
                    ledger.count_failed(k, count, self.last_errno)  # the listener is gone for now
                    self._hand_over(batch, messages, k, ledger, self.last_errno)
                    return
                sock = self.sock
                continue
            ledger.count_sent(batch.sizes, messages, k, k + went)
            k += went

    def _hand_over(
        self, batch: LaneBatch, messages: Sequence[int], start: int, ledger: Ledger, code: int
    ) -> None:
        """Tell ``on_failed`` of messages ``start..`` (counted failed already)."""
        if self.on_failed is not None:
            for k in range(start, len(messages)):
                self.on_failed(batch.message(messages[k]), ledger.owner(k), code)

    def send_message(self, message: Message, owner: SubscriptionStats) -> None:
        owner.routed += 1
        datagram = message.notification()
        if self.backlog.datagrams:
            self._keep_one(datagram, owner)  # behind what waits: order kept
            return
        if not self._connected():
            owner.fail(self.last_errno)
            if self.on_failed is not None:
                self.on_failed(message, owner, self.last_errno)
            return
        try:
            self.sock.send(datagram)  # type: ignore[union-attr]
        except BlockingIOError:
            self._keep_one(datagram, owner)
            return
        except OSError as exc:
            code = exc.errno or errno.EIO
            owner.fail(code)
            self._failed(code)
            if self.on_failed is not None:
                self.on_failed(message, owner, code)
            return
        owner.sent += 1
        owner.bytes += len(datagram)

    def _keep_one(self, datagram: bytes, owner: SubscriptionStats) -> None:
        if self.backlog.room(len(datagram)):
            self.backlog.push(datagram, owner)
        else:
            owner.dropped += 1

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
