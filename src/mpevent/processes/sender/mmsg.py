"""Batched datagram sends: ``sendmmsg(2)`` of one lane batch to each destination.

Python's :mod:`socket` has no ``sendmmsg``; this module reaches it in the C
library through :mod:`ctypes`. One call sends a whole batch to one
connected socket: the syscall's entry and exit, the descriptor lookup and,
with a receiver that keeps up, most of its wake-ups are paid once per batch
instead of once per datagram.

The datagrams are never built as Python objects on this path. An
:class:`Outbox` holds a copy of the lane stretch the batch came from (one
``memcpy``); each datagram is three pieces (``iovec``), the event's
notification prefix, the params in that copy and the closing ``}``, which
the kernel gathers. The sender describes messages as six integers each
(three address and length pairs), :meth:`Outbox.pack` writes them into the
``iovec`` array with one ``struct.pack_into``, and the ``mmsghdr`` array is
built once (message ``i`` always uses ``iovec[3i:3i+3]``, no address: the
sockets are connected). A batch packed once is sent to any number of
destinations.

Where the C library has no ``sendmmsg`` (not Linux), :data:`AVAILABLE` is
false and callers send datagrams one at a time. ``MPEVENT_NO_SENDMMSG=1`` in
the environment forces that fallback (the tests run both ways); the senders
start in fresh interpreters, so the environment is how a switch reaches them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

#: Messages per call; the kernel's limit is UIO_MAXIOV (1024).
MAX_MESSAGES = 256
#: Bytes of lane stretch an outbox holds: a batch's records, copied.
STRETCH_BYTES = 1 << 20
PIECES = 3  # iovecs per message: prefix, params, "}"
INTS_PER_MESSAGE = 2 * PIECES


class _IoVec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _MsgHdr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    )


class _MMsgHdr(ctypes.Structure):
    _fields_ = (("hdr", _MsgHdr), ("len", ctypes.c_uint))


def _libc_sendmmsg():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sendmmsg
    except (AttributeError, OSError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_sendmmsg = _libc_sendmmsg()
# An iovec is (pointer, size_t); both are size_t wide wherever Linux runs,
# so an array of them packs as native ``N``s.
assert struct.calcsize("2N") == ctypes.sizeof(_IoVec)
_HDR_BYTES = ctypes.sizeof(_MMsgHdr)

#: Whether datagrams really go out in batches here (else one send per datagram).
AVAILABLE = _sendmmsg is not None and os.environ.get("MPEVENT_NO_SENDMMSG") != "1"


def address_of(data: bytes) -> int:
    """Where the bytes of ``data`` are; valid while the caller keeps it alive."""
    return ctypes.cast(data, ctypes.c_void_p).value or 0


class Outbox:
    """One process's sendmmsg state: a stretch buffer and the message arrays.

    Not shareable between threads: every batch reuses them.
    """

    __slots__ = ("_base", "_buffer", "_iov_raw", "_iovs", "_msgs", "_msgs_at", "view")

    def __init__(self) -> None:
        self._buffer = ctypes.create_string_buffer(STRETCH_BYTES)
        #: The copied stretch: bodies are at the offsets the lane reader gave.
        self.view = memoryview(self._buffer).cast("B")
        self._base = ctypes.addressof(self._buffer)
        self._iovs = (_IoVec * (PIECES * MAX_MESSAGES))()
        self._iov_raw = memoryview(self._iovs).cast("B")
        self._msgs = (_MMsgHdr * MAX_MESSAGES)()
        iov0 = ctypes.addressof(self._iovs)
        for i in range(MAX_MESSAGES):
            self._msgs[i].hdr.iov = iov0 + i * PIECES * ctypes.sizeof(_IoVec)
            self._msgs[i].hdr.iovlen = PIECES
        self._msgs_at = ctypes.addressof(self._msgs)

    def load(self, stretch: memoryview) -> int:
        """Copy a lane stretch in; returns the address its first byte now has."""
        self.view[: len(stretch)] = stretch
        return self._base

    def pack(self, pieces: list[int]) -> None:
        """Describe the messages to send: six integers each, see the module doc."""
        struct.pack_into(f"{len(pieces)}N", self._iov_raw, 0, *pieces)

    def send(self, sock: socket.socket, first: int, count: int) -> int:
        """Send packed messages ``first .. first+count-1`` as far as one call goes.

        Returns how many went (at least one). Raises the ``OSError`` that
        ``sock.send`` of message ``first`` would have raised when not even
        that one went (``BlockingIOError`` when the socket is full).
        """
        count = min(count, MAX_MESSAGES - first)
        at = self._msgs_at + first * _HDR_BYTES
        while True:
            sent = _sendmmsg(sock.fileno(), at, count, 0)
            if sent >= 0:
                return sent
            code = ctypes.get_errno()
            if code != errno.EINTR:
                # OSError(code, ...) is the subclass sock.send raises: BlockingIOError, ...
                raise OSError(code, os.strerror(code))
