"""Batched datagram sends: many datagrams on one connected socket per syscall.

Python's :mod:`socket` has no ``sendmmsg(2)``; this module reaches it in the
C library through :mod:`ctypes`. A sender hands a destination all the
datagrams a lane batch has for it, and one ``sendmmsg`` call sends them:
the syscall's entry and exit, the descriptor lookup and, with a receiver
that keeps up, most wake-ups of the receiving process are paid once per
batch instead of once per datagram.

How the call is fed, cheaply from Python: the datagrams are joined and
copied into one buffer this object owns (a ``memcpy``), and the ``iovec``
array that points into it is written with a single ``struct.pack_into``.
The ``mmsghdr`` array is built once: message ``i`` always uses ``iovec[i]``
and no address (the socket is connected).

:class:`BatchSend` behaves like ``socket.send`` for a batch: it returns how
many leading datagrams the kernel took (at least one), or raises the
``OSError`` of the first datagram it could not send, exactly as
``sock.send`` of that datagram would have. Where the C library has no
``sendmmsg`` (not Linux), it sends them one by one with ``sock.send``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Sequence
from itertools import accumulate

#: Datagrams per call; the kernel's limit is UIO_MAXIOV (1024).
MAX_MESSAGES = 256
#: Bytes per call: the buffer the datagrams are copied into.
BUFFER_BYTES = 1 << 20


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
# so an array of them packs as 2 * count native ``N``.
assert struct.calcsize("2N") == ctypes.sizeof(_IoVec)

#: Whether datagrams really go out in batches here (else one send per datagram).
AVAILABLE = _sendmmsg is not None


class BatchSend:
    """``sendmmsg`` for one process: ``send(sock, datagrams, start)``.

    Not shareable between threads: the buffer and the arrays are reused by
    every call.
    """

    __slots__ = ("_base", "_buffer", "_iov_raw", "_iovs", "_msgs", "_msgs_at", "_view")

    def __init__(self) -> None:
        self._buffer = ctypes.create_string_buffer(BUFFER_BYTES)
        self._view = memoryview(self._buffer).cast("B")
        self._base = ctypes.addressof(self._buffer)
        self._iovs = (_IoVec * MAX_MESSAGES)()
        self._iov_raw = memoryview(self._iovs).cast("B")
        self._msgs = (_MMsgHdr * MAX_MESSAGES)()
        iov0 = ctypes.addressof(self._iovs)
        for i in range(MAX_MESSAGES):
            self._msgs[i].hdr.iov = iov0 + i * ctypes.sizeof(_IoVec)
            self._msgs[i].hdr.iovlen = 1
        self._msgs_at = ctypes.addressof(self._msgs)

    def send(self, sock: socket.socket, datagrams: Sequence[bytes], start: int = 0) -> int:
        """Send ``datagrams[start:]`` (as many as one call takes); returns how many went.

        Raises the ``OSError`` of ``datagrams[start]`` when not even that
        one could be sent (``BlockingIOError`` when the socket is full).
        """
        if _sendmmsg is None:
            sock.send(datagrams[start])
            return 1
        # As many as fit in one call, and always at least one (a datagram
        # is at most 64 KiB, the buffer far larger).
        end = min(len(datagrams), start + MAX_MESSAGES)
        lens = [len(d) for d in datagrams[start:end]]
        total = 0
        for i, n in enumerate(lens):
            if total + n > BUFFER_BYTES:
                end = start + i
                del lens[i:]
                break
            total += n
        count = end - start
        self._view[:total] = b"".join(datagrams[start:end])
        offsets = accumulate(lens, initial=self._base)
        # offsets has one more item than lens (the end): zip stops before it.
        flat = [x for pair in zip(offsets, lens, strict=False) for x in pair]
        struct.pack_into(f"{2 * count}N", self._iov_raw, 0, *flat)
        sent = _sendmmsg(sock.fileno(), self._msgs_at, count, 0)
        if sent < 0:
            code = ctypes.get_errno()
            if code == errno.EINTR:
                return self.send(sock, datagrams, start)
            # OSError(code, ...) is the subclass sock.send raises: BlockingIOError, ...
            raise OSError(code, os.strerror(code))
        return sent
