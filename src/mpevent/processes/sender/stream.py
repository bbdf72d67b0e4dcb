"""The ``tcp:`` endpoint: OpenSIPS event_stream, JSON-RPC texts on one TCP connection.

:class:`StreamEndpoint` serves one :class:`~mpevent.protocol.destination.StreamDestination`
from the sender's loop, behind the same interface as the datagram endpoint
(:mod:`mpevent.processes.sender.endpoints`), so it never blocks and counts
every message exactly once.

The connection
    One per destination, ``TCP_NODELAY``, opened without blocking
    (``connect_ex``, then ``POLLOUT`` and ``SO_ERROR``) within
    :data:`CONNECT_TIMEOUT_NS`. The endpoint connects as soon as it is made,
    and again after a refusal, a timeout, an error or the peer's EOF, with a
    backoff from :data:`BACKOFF_FIRST_NS` doubling to :data:`BACKOFF_MAX_NS`,
    back to the first after a connection was established. :meth:`~StreamEndpoint.due_ns`
    tells the loop when to call :meth:`~StreamEndpoint.tick` for it.

The bytes
    Each event is one JSON-RPC 2.0 notification, exactly the datagram
    event_datagram would send, texts back to back with no framing; with a
    METHOD, its name replaces the event's. Whatever waits goes out with one
    ``sendmsg`` (up to ``IOV_MAX`` texts, no copy), never one syscall per
    message.

What waits, and what is counted
    While connecting, while disconnected and while the peer reads slowly,
    messages wait in the destination's bounded
    :class:`~mpevent.processes.sender.backlog.Backlog` (the same three bounds
    as a datagram destination's); what finds it full is dropped. A message
    counts as sent, with its bytes, once all of its bytes were written to
    the socket. The one message a full socket took only part of is held
    beside the backlog (one text, at most a datagram's size), and when the
    connection breaks it goes again, whole, on the next one: the peer sees a
    new stream. Until its fate is known a message is pending (in the
    backlog, that half-written slot, or awaiting its reply).

Reliable mode (``destination.reliable``, OpenSIPS's ``reliable_mode``)
    Each event is a request: the same text with ``,"id":N`` before its last
    ``}``, N unique over the endpoint's life. Replies are split from the
    stream by :class:`~mpevent.protocol.jsonstream.JsonSplitter` and matched
    by id: ``result`` counts sent, ``error`` failed (:data:`ERROR_REPLY`),
    neither failed (:data:`BAD_REPLY`), an unknown id is ignored, and a
    request unanswered ``timeout_ms`` after it was written fails with
    ETIMEDOUT. When the connection is lost, what was written and not
    answered fails (as OpenSIPS). A stream that is not JSON texts, or a
    reply over :data:`MAX_REPLY` bytes, resets the connection (EPROTO). At
    most ``backlog`` requests (and ``backlog_bytes`` of their texts) await
    replies at once; beyond that, messages wait in the backlog. Without
    reliable mode, what the peer sends is read and discarded, so its EOF is
    seen.

For event_virtual's FAILOVER, every failure goes through one place
(:meth:`StreamEndpoint._fail`), which calls ``on_failed(message, owner,
errno)`` after counting it (the message as raised, so the next member
builds its own bytes); to be able to, the endpoint keeps a
:class:`~mpevent.processes.sender.batch.Message` beside each text that waits
or awaits a reply, only when ``on_failed`` is given. With
``hold_while_down=False`` nothing waits for a connection that is not there:
what arrives while it is down fails at once (the last connect errno, or
ENOTCONN), and what waited when it went down fails with it.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections import deque
from collections.abc import Sequence
from itertools import islice

import orjson

from mpevent.processes.sender.accounts import Ledger, SubscriptionStats
from mpevent.processes.sender.backlog import Backlog, BacklogBudget, BacklogLimits
from mpevent.processes.sender.batch import LaneBatch, Message
from mpevent.processes.sender.endpoints import Endpoint, Failed
from mpevent.protocol.destination import StreamDestination
from mpevent.protocol.jsonstream import JsonSplitter, JsonStreamError
from mpevent.protocol.payload import Notification, bare_notification, params_prefix

__all__ = [
    "BACKOFF_FIRST_NS",
    "BACKOFF_MAX_NS",
    "BAD_REPLY",
    "CONNECT_TIMEOUT_NS",
    "ERROR_REPLY",
    "MAX_REPLY",
    "PEER_CLOSED",
    "StreamEndpoint",
]

CONNECT_TIMEOUT_NS = 2_000_000_000
BACKOFF_FIRST_NS = 50_000_000
BACKOFF_MAX_NS = 5_000_000_000
#: The errno a request answered with an ``error`` member fails with.
ERROR_REPLY = errno.EREMOTEIO
#: The errno a reply with neither ``result`` nor ``error``, or a stream that
#: is not JSON texts, fails with.
BAD_REPLY = errno.EPROTO
#: The errno for the peer's EOF: it closed the connection.
PEER_CLOSED = errno.ECONNRESET
#: The bound on one reply text: replies are a few dozen bytes.
MAX_REPLY = 1 << 16

# Texts per sendmsg (the kernel's bound on an iovec), and bytes per attempt:
# a slow peer takes a little at a time, and reliable mode builds a request
# (with a fresh id) for each text tried.
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
_WRITE_CHUNK = 1 << 18
_READ_SIZE = 1 << 16
_READS_PER_READY = 16  # then back to the loop; poll says again if more waits

_DOWN, _CONNECTING, _UP, _CLOSED = range(4)


class _MethodNotification(Notification):
    """Notifications under a destination's METHOD instead of the event's name.

    METHOD's rules (any printable text up to 255 bytes) are wider than an
    event name's, which :class:`Notification` checks; the bytes are built
    the same way.
    """

    __slots__ = ()

    def __init__(self, method: str) -> None:
        self.name = method
        self.prefix = params_prefix(method)
        self.bare = bare_notification(method)


class StreamEndpoint(Endpoint):
    """A ``tcp:`` destination: its connection, its backlog, its requests (see the module doc)."""

    __slots__ = (
        "_awaiting",
        "_awaiting_bytes",
        "_backoff_ns",
        "_connect_deadline",
        "_held",
        "_limits",
        "_next_id",
        "_note",
        "_partial",
        "_partial_at",
        "_retry_at",
        "_sock",
        "_splitter",
        "_state",
        "_timeout_ns",
        "backlog",
        "destination",
        "hold_while_down",
        "last_errno",
        "on_failed",
        "reliable",
    )

    def __init__(
        self,
        destination: StreamDestination,
        limits: BacklogLimits,
        budget: BacklogBudget,
        on_failed: Failed | None = None,
        hold_while_down: bool = True,
    ) -> None:
        self.destination = destination
        self.backlog = Backlog(limits, budget)
        self.on_failed = on_failed
        self.hold_while_down = hold_while_down
        self.reliable = destination.reliable
        self.last_errno = 0  # why the last connection failed or ended
        self._limits = limits
        self._note = _MethodNotification(destination.method) if destination.method else None
        self._timeout_ns = destination.timeout_ms * 1_000_000
        # With on_failed: the Message of each backlog entry, in the same order.
        self._held: deque[Message | None] = deque()
        self._sock: socket.socket | None = None
        self._state = _DOWN
        self._retry_at = 0
        self._connect_deadline = 0
        self._backoff_ns = BACKOFF_FIRST_NS
        # The message a full socket took only part of: (wire bytes, its Message
        # or None, owner, request id); _partial_at of its bytes are written.
        self._partial: tuple[bytes, Message | None, SubscriptionStats, int] | None = None
        self._partial_at = 0
        # Reliable mode: request id -> (Message or None, owner, reply deadline,
        # wire size), oldest first (one timeout for all, so deadlines ascend).
        self._awaiting: dict[int, tuple[Message | None, SubscriptionStats, int, int]] = {}
        self._awaiting_bytes = 0
        self._next_id = 1
        self._splitter = JsonSplitter(MAX_REPLY)
        self._connect(time.monotonic_ns())

    # -- what the loop sees -------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._state == _UP

    def wants(self) -> tuple[int, int] | None:
        sock = self._sock
        if sock is None:
            return None
        if self._state == _CONNECTING:
            return sock.fileno(), select.POLLOUT
        if self._partial is not None or (self.backlog.datagrams and self._window(1)):
            return sock.fileno(), select.POLLIN | select.POLLOUT
        return sock.fileno(), select.POLLIN  # replies, and the peer's EOF

    def idle(self) -> bool:
        return not self.backlog.datagrams and self._partial is None and not self._awaiting

    def due_ns(self) -> int:
        state = self._state
        if state == _DOWN:
            return self._retry_at
        if state == _CONNECTING:
            return self._connect_deadline
        if self._awaiting:
            return next(iter(self._awaiting.values()))[2]
        return 0

    def tick(self, now_ns: int) -> None:
        state = self._state
        if state == _DOWN:
            if now_ns >= self._retry_at:
                self._connect(now_ns)
        elif state == _CONNECTING:
            if now_ns >= self._connect_deadline:
                self._lost(errno.ETIMEDOUT)
        elif self._awaiting:
            self._expire(now_ns)

    def ready(self, revents: int) -> None:
        sock = self._sock
        if sock is None:
            return
        if self._state == _CONNECTING:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._lost(code)
            elif revents & (select.POLLERR | select.POLLHUP):
                self._lost(errno.ECONNREFUSED)
            elif revents & select.POLLOUT:
                self._established()
            return
        if revents & (select.POLLIN | select.POLLHUP | select.POLLERR) and not self._read():
            return  # the connection is gone
        if revents & select.POLLOUT or (self.reliable and self.backlog.datagrams):
            self._flush()  # (replies may have opened the window)

    def send(self, batch: LaneBatch, messages: Sequence[int], ledger: Ledger) -> None:
        ledger.count_routed(0, len(messages))
        held = [batch.message(m) for m in messages] if self.on_failed is not None else None
        self._take(self._texts(batch, messages), held, ledger)

    def send_message(self, message: Message, owner: SubscriptionStats) -> None:
        owner.routed += 1
        note = self._note
        text = message.notification() if note is None else note.build(message.params)
        self._take([text], [message] if self.on_failed is not None else None, owner)

    def close(self) -> None:
        """Drop what waits and what awaits a reply (counted), close the connection."""
        for owner in self.backlog.empty():
            owner.dropped += 1
        self._held.clear()
        if self._partial is not None:
            owner = self._partial[2]
            owner.pending -= 1
            owner.dropped += 1
            self._partial = None
        for _, owner, _, _ in self._awaiting.values():
            owner.pending -= 1
            owner.dropped += 1
        self._awaiting.clear()
        self._awaiting_bytes = 0
        self._close_socket()
        self._state = _CLOSED

    # -- the connection -----------------------------------------------------

    def _connect(self, now_ns: int) -> None:
        dest = self.destination
        try:
            sock = socket.socket(dest.family, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE: as a refusal, tried again later
            self._lost(exc.errno or errno.EIO)
            return
        self._sock = sock
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(dest.sockaddr)
        if code == 0:
            self._established()
        elif code in (errno.EINPROGRESS, errno.EAGAIN):
            self._state = _CONNECTING
            self._connect_deadline = now_ns + CONNECT_TIMEOUT_NS
        else:
            self._lost(code)

    def _established(self) -> None:
        self._state = _UP
        self._backoff_ns = BACKOFF_FIRST_NS
        self._splitter.reset()
        self._flush()

    def _lost(self, code: int) -> None:
        """The connection failed or ended with errno ``code``: what awaited
        a reply fails (and, not holding while down, what waited); try again
        after the backoff."""
        self._close_socket()
        self._state = _DOWN
        self.last_errno = code
        self._retry_at = time.monotonic_ns() + self._backoff_ns
        self._backoff_ns = min(2 * self._backoff_ns, BACKOFF_MAX_NS)
        self._splitter.reset()
        awaiting, self._awaiting = self._awaiting, {}
        self._awaiting_bytes = 0
        for message, owner, _, _ in awaiting.values():
            owner.pending -= 1
            self._fail(message, owner, code)
        self._partial_at = 0  # sent again whole, on the next connection
        if not self.hold_while_down:
            if self._partial is not None:
                _, message, owner, _ = self._partial
                self._partial = None
                owner.pending -= 1
                self._fail(message, owner, code)
            while self.backlog.datagrams:
                _, owner, message = self._pop()
                self._fail(message, owner, code)

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- writing ------------------------------------------------------------

    def _take(self, notes: list[bytes], held: list[Message] | None, ledger: Ledger) -> None:
        """Messages routed here (counted routed): write, keep or fail them."""
        if self._state == _DOWN:
            now = time.monotonic_ns()
            if now >= self._retry_at:
                self._connect(now)
            if self._state == _DOWN and not self.hold_while_down:
                self._fail_run(held, ledger, 0, len(notes), self.last_errno or errno.ENOTCONN)
                return
        if self._state != _UP or self._partial is not None or self.backlog.datagrams:
            self._keep(notes, held, ledger, 0)  # behind what waits: order kept
        else:
            self._write_run(notes, held, ledger)

    def _texts(self, batch: LaneBatch, messages: Sequence[int]) -> list[bytes]:
        note = self._note
        if note is None:
            return [batch.datagram(m) for m in messages]
        view, bodies = batch.outbox.view, batch.bodies
        texts = []
        for m in messages:
            _, at, n = bodies[m]
            texts.append(note.build(view[at : at + n]))
        return texts

    def _requests(self, notes: list[bytes]) -> list[bytes]:
        """The wire texts of ``notes``: themselves, or requests with fresh ids."""
        if not self.reliable:
            return notes
        first = self._next_id
        self._next_id += len(notes)
        return [b'%b,"id":%d}' % (note[:-1], first + i) for i, note in enumerate(notes)]

    def _window(self, wanted: int) -> int:
        """How many of ``wanted`` messages may be written now: all, or in
        reliable mode what the bound on requests awaiting replies leaves."""
        if not self.reliable:
            return wanted
        limits = self._limits
        if self._awaiting_bytes >= limits.backlog_bytes:
            return 0
        return max(0, min(wanted, limits.backlog - len(self._awaiting)))

    def _write_run(self, notes: list[bytes], held: list[Message] | None, ledger: Ledger) -> None:
        """Connected, nothing waiting: write the run at once, keep what the socket did not take."""
        count = len(notes)
        wires = self._requests(notes[: self._window(count)])
        lens = [len(w) for w in wires]
        try:
            written = self._sendmsg(wires, lens)
        except OSError as exc:
            code = exc.errno or errno.EIO
            self._lost(code)
            if self.hold_while_down:
                self._keep(notes, held, ledger, 0)  # for the next connection
            else:
                self._fail_run(held, ledger, 0, count, code)
            return
        k = 0
        for size in lens:
            if written < size:
                break
            written -= size
            k += 1
        first = self._next_id - len(wires)  # request ids (reliable mode)
        if self.reliable:
            now = time.monotonic_ns()
            for j in range(k):
                self._awaits(held[j] if held else None, ledger.owner(j), first + j, lens[j], now)
        else:
            ledger.count_sent(lens, range(count), 0, k)
        if written:  # message k went in part: it goes on first
            owner = ledger.owner(k)
            owner.pending += 1
            self._partial = (wires[k], held[k] if held else None, owner, first + k)
            self._partial_at = written
            k += 1
        self._keep(notes, held, ledger, k)

    def _flush(self) -> None:
        """Write what waits, oldest first, until the socket or the window is full."""
        backlog = self.backlog
        while self._state == _UP:
            bufs: list[bytes | memoryview] = []
            lens: list[int] = []
            partial = self._partial
            if partial is not None:
                head = memoryview(partial[0])[self._partial_at :]
                bufs.append(head)
                lens.append(len(head))
            notes: list[bytes] = []
            size = lens[0] if lens else 0
            for note in islice(backlog.datagrams, self._window(_IOV_MAX - len(bufs))):
                notes.append(note)
                size += len(note)
                if size >= _WRITE_CHUNK:
                    break
            wires = self._requests(notes)
            if not bufs and not wires:
                return
            bufs += wires
            lens += map(len, wires)
            try:
                written = self._sendmsg(bufs, lens)
            except OSError as exc:
                self._lost(exc.errno or errno.EIO)
                return
            now = time.monotonic_ns()
            if partial is not None:
                if written < lens[0]:
                    self._partial_at += written
                    return
                written -= lens[0]
                self._partial = None
                self._partial_at = 0
                wire, message, owner, request_id = partial
                owner.pending -= 1
                self._written(message, owner, request_id, len(wire), now)
            first = self._next_id - len(wires)
            for j, wire in enumerate(wires):
                if written < len(wire):
                    if written:  # in part: it goes on first, next time
                        _, owner, message = self._pop()
                        owner.pending += 1
                        self._partial = (wire, message, owner, first + j)
                        self._partial_at = written
                    return  # the socket is full
                written -= len(wire)
                _, owner, message = self._pop()
                self._written(message, owner, first + j, len(wire), now)

    def _sendmsg(self, bufs: Sequence[bytes | memoryview], lens: list[int]) -> int:
        """Write ``bufs`` as far as the socket takes them; returns the bytes written.

        Raises OSError when the connection failed (not for a full socket)."""
        sock = self._sock
        assert sock is not None
        total = 0
        for at in range(0, len(bufs), _IOV_MAX):
            try:
                went = sock.sendmsg(bufs[at : at + _IOV_MAX])
            except BlockingIOError:
                break
            total += went
            if went < sum(lens[at : at + _IOV_MAX]):
                break
        return total

    def _written(
        self,
        message: Message | None,
        owner: SubscriptionStats,
        request_id: int,
        size: int,
        now: int,
    ) -> None:
        """All of a message's bytes are on the socket: sent, or a request awaiting its reply."""
        if self.reliable:
            self._awaits(message, owner, request_id, size, now)
        else:
            owner.sent += 1
            owner.bytes += size

    def _awaits(
        self,
        message: Message | None,
        owner: SubscriptionStats,
        request_id: int,
        size: int,
        now: int,
    ) -> None:
        self._awaiting[request_id] = (message, owner, now + self._timeout_ns, size)
        self._awaiting_bytes += size
        owner.pending += 1

    def _keep(
        self, notes: list[bytes], held: list[Message] | None, ledger: Ledger, start: int
    ) -> None:
        """Keep messages ``start..`` in the backlog; the first that does not fit is
        dropped, and every one after it in this run (as the datagram endpoint)."""
        backlog = self.backlog
        count = len(notes)
        for k in range(start, count):
            note = notes[k]
            if not backlog.room(len(note)):
                ledger.count_dropped(k, count)
                return
            backlog.push(note, ledger.owner(k))
            if held is not None:
                self._held.append(held[k])

    def _pop(self) -> tuple[bytes, SubscriptionStats, Message | None]:
        """Take the backlog's oldest entry out: its text, owner and Message (with on_failed)."""
        note = self.backlog.first()
        owner = self.backlog.pop()
        return note, owner, self._held.popleft() if self._held else None

    # -- reading ------------------------------------------------------------

    def _read(self) -> bool:
        """Read what the peer sent; False when the connection is gone."""
        sock = self._sock
        assert sock is not None
        for _ in range(_READS_PER_READY):
            try:
                data = sock.recv(_READ_SIZE)
            except BlockingIOError:
                return True
            except OSError as exc:
                self._lost(exc.errno or errno.EIO)
                return False
            if not data:
                self._lost(PEER_CLOSED)
                return False
            if self.reliable and not self._replies(data):
                return False
            if len(data) < _READ_SIZE:
                return True
        return True

    def _replies(self, data: bytes) -> bool:
        """Match the replies ``data`` completes; False when the stream is broken."""
        try:
            replies = [orjson.loads(text) for text in self._splitter.feed(data)]
        except (JsonStreamError, orjson.JSONDecodeError):
            self._lost(BAD_REPLY)
            return False
        awaiting = self._awaiting
        for reply in replies:
            if not isinstance(reply, dict):
                continue  # a batch's replies: this endpoint sends no batches
            request_id = reply.get("id")
            if type(request_id) is not int or request_id not in awaiting:
                continue  # not ours (any more): ignored
            message, owner, _, size = awaiting.pop(request_id)
            self._awaiting_bytes -= size
            owner.pending -= 1
            if reply.get("error") is not None:
                self._fail(message, owner, ERROR_REPLY)
            elif "result" in reply:
                owner.sent += 1
                owner.bytes += size
            else:
                self._fail(message, owner, BAD_REPLY)
        return True

    def _expire(self, now_ns: int) -> None:
        """Requests unanswered for ``timeout_ms`` fail (ETIMEDOUT), oldest first."""
        awaiting = self._awaiting
        while awaiting:
            request_id, (message, owner, deadline, size) = next(iter(awaiting.items()))
            if deadline > now_ns:
                break
            del awaiting[request_id]
            self._awaiting_bytes -= size
            owner.pending -= 1
            self._fail(message, owner, errno.ETIMEDOUT)
        if self.backlog.datagrams:
            self._flush()  # the window has room again

    # -- failures: every one goes through here -----------------------------

    def _fail(self, message: Message | None, owner: SubscriptionStats, code: int) -> None:
        """One message failed with errno ``code``: counted, then told to ``on_failed``."""
        owner.fail(code)
        if self.on_failed is not None and message is not None:
            self.on_failed(message, owner, code)

    def _fail_run(
        self, held: list[Message] | None, ledger: Ledger, start: int, end: int, code: int
    ) -> None:
        """Messages ``start..end-1`` of a run failed with errno ``code``."""
        if held is None:
            ledger.count_failed(start, end, code)
            return
        for k in range(start, end):
            self._fail(held[k], ledger.owner(k), code)
