"""Waking a sleeping sender: a flag in shared memory plus a pipe.

A sender with nothing to do sets its ``sleeping`` word in the segment,
looks at its lanes once more and then waits in ``poll`` on the read end of
its doorbell. A producer that has just published a record checks the word
(one load, no syscall) and only when it is set clears it and writes one byte
to the doorbell, so only the empty-to-non-empty transition costs a syscall.

The flag store and the tail load on each side can be reordered by the CPU
(store-load reordering exists even on x86-64), so a wake-up can be lost. The
sender therefore never sleeps longer than :data:`MAX_SLEEP` seconds while
events flow, and :data:`IDLE_MAX_SLEEP` once it has had nothing to do for
:data:`IDLE_AFTER_NS`: a lost wake-up costs at most that delay, never a
stall. The window in which one can be lost is a few nanoseconds, so the
longer bound is almost never paid, and an idle sender wakes only a few
times a second (costing ~0.0 % of a core instead of ~2 %).

Embedded mode uses an anonymous pipe (inherited by every forked process);
daemon mode a FIFO in the runtime directory, which unrelated producers open
for writing.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_SLEEP = 0.02  # seconds: the longest sleep while events flow
IDLE_MAX_SLEEP = 0.25  # ... and after IDLE_AFTER_NS without any
IDLE_AFTER_NS = 1_000_000_000


class Doorbell:
    """One sender's doorbell: ``ring`` from anywhere, ``drain`` in the sender."""

    __slots__ = ("path", "read_fd", "write_fd")

    def __init__(self, read_fd: int, write_fd: int, path: Path | None = None):
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.path = path

    @classmethod
    def anonymous(cls) -> Doorbell:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        return cls(r, w)

    @classmethod
    def fifo(cls, path: Path) -> Doorbell:
        """Create a FIFO at ``path`` (the hub's side: reads and keeps it open)."""
        path.unlink(missing_ok=True)
        os.mkfifo(path, 0o660)
        # O_RDWR keeps the FIFO open for writers even while no producer has
        # it, so writers never get ENXIO and the reader never sees EOF.
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return cls(fd, fd, path)

    @classmethod
    def open_fifo(cls, path: Path) -> Doorbell:
        """A producer's write end of an existing FIFO."""
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise OSError(f"{path} is not a FIFO")
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        return cls(-1, fd, path)

    def ring(self) -> None:
        try:
            os.write(self.write_fd, b"\x01")
        except (BlockingIOError, BrokenPipeError):
            pass  # full: a wake-up is already pending; no reader: nobody to wake

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in {self.read_fd, self.write_fd} - {-1}:
            try:
                os.close(fd)
            except OSError:
                pass
        self.read_fd = self.write_fd = -1

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
