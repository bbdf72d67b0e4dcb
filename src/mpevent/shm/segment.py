"""The shared-memory segment: create, attach, map, claim lanes, remove.

Two kinds of segment, one layout (:mod:`mpevent.shm.layout`):

* **anonymous** (embedded mode): a ``memfd`` that only processes forked from
  its creator can see. It has no name, so nothing can be left in
  ``/dev/shm`` even when every process is killed with SIGKILL.
* **named** (daemon mode): ``/dev/shm/<name>``, so unrelated processes can
  attach. The creator removes it on close.

Both are created with mode 0600. We map the file ourselves instead of using
``multiprocessing.shared_memory``: on Python 3.11 that registers even attached
segments with the resource tracker, which unlinks them when the attaching
process exits.

Lane ownership is a POSIX record lock (``lockf``) on byte ``lane`` of the
segment file. The kernel drops it when the owner dies, it is not inherited by
``fork`` (a child must claim its own lane), and claiming is rare, so a
producer with a lane of its own takes no lock across processes on its fast
path.

A shared (overflow) lane's lock is the same kind of lock on the lane's own
byte, but held only for one push (:class:`SharedLaneLock`): that is what a
process without a lane of its own pays per raise. A holder killed mid-push
has its lock dropped by the kernel, and its unpublished record does not
exist (see :mod:`mpevent.shm.ring`).

Beware of POSIX lock semantics: closing *any* descriptor of the file drops
all of the process's locks on it, so a process keeps exactly one descriptor
per segment open; and the locks belong to the process, not the thread, so
its threads are kept apart by the ``threading.Lock`` each
:class:`SharedLaneLock` comes with (one object per shared lane per mapping).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import threading
import weakref
from pathlib import Path

from mpevent.shm.layout import (
    H_HANDOFF_SIZE,
    H_LANE_SIZE,
    H_LANES,
    H_MAGIC,
    H_MAX_EVENTS,
    H_MAX_SUBS,
    H_OVERFLOW_LANES,
    H_RELAYS,
    H_SENDERS,
    H_TABLE_BYTES,
    H_VERSION,
    L_CLAIMS,
    L_OWNER_PID,
    LAYOUT_VERSION,
    MAGIC,
    Geometry,
    Layout,
)

SHM_DIR = Path("/dev/shm")
# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding).
_FLOCK = struct.Struct("@hhqqi4x")
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
SEGMENT_MODE = 0o600


class SegmentError(RuntimeError):
    """The segment cannot be created or attached (names the reason)."""


def shm_path(name: str) -> Path:
    if not name or "/" in name or name in (".", "..") or len(name) > 200:
        raise ValueError(f"invalid segment name {name!r}: use a short name without '/'")
    return SHM_DIR / name


_segments: weakref.WeakSet[Segment] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Record locks are not inherited: the child holds none of its parent's lanes.
    for seg in list(_segments):
        seg.claimed.clear()
        seg.held.clear()
        seg.shared_locks.clear()  # another thread may have held one at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


class Segment:
    """One process's mapping of a segment."""

    def __init__(self, fd: int, layout: Layout, name: str | None, owner: bool):
        self.fd = fd
        self.layout = layout
        self.name = name
        self.owner = owner
        # MAP_POPULATE: fault every page in now, not on the producers' fast
        # path (a first touch of a shared page costs microseconds).
        self._mmap = mmap.mmap(fd, layout.size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        self.buf = memoryview(self._mmap)
        self.words = self.buf.cast("Q")
        self._closed = False
        self.claimed: set[int] = set()  # lanes this process produces into
        self.held: set[int] = set()  # dead producers' lanes this process reclaims
        self.shared_locks: dict[int, SharedLaneLock] = {}  # one per shared lane, made on use
        _segments.add(self)

    @classmethod
    def create(cls, geometry: Geometry, name: str | None = None) -> Segment:
        layout = Layout.of(geometry)
        if name is None:
            fd = os.memfd_create("mpevent", os.MFD_CLOEXEC)
        else:
            path = shm_path(name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, SEGMENT_MODE)
            except FileExistsError:
                raise SegmentError(f"segment {path} already exists") from None
        try:
            os.fchmod(fd, SEGMENT_MODE)
            os.ftruncate(fd, layout.size)
            # Allocate every page up front: the segment's memory is fixed at
            # creation (memory stays bounded whatever the load), and a full
            # /dev/shm fails here, with a clear error, rather than as SIGBUS
            # in a producer later.
            try:
                os.posix_fallocate(fd, 0, layout.size)
            except OSError as exc:
                raise SegmentError(
                    f"cannot allocate {layout.size} bytes of shared memory: {exc}"
                ) from None
            seg = cls(fd, layout, name, owner=True)
        except BaseException:
            os.close(fd)
            if name is not None:
                shm_path(name).unlink(missing_ok=True)
            raise
        w = seg.words
        w[H_VERSION] = LAYOUT_VERSION
        w[H_LANES] = geometry.lanes
        w[H_LANE_SIZE] = geometry.lane_size
        w[H_SENDERS] = geometry.senders
        w[H_MAX_EVENTS] = geometry.max_events
        w[H_MAX_SUBS] = geometry.max_subs
        w[H_TABLE_BYTES] = geometry.table_bytes
        w[H_OVERFLOW_LANES] = geometry.overflow_lanes
        w[H_RELAYS] = geometry.relays
        w[H_HANDOFF_SIZE] = geometry.handoff_size
        w[H_MAGIC] = MAGIC  # last: an attacher that sees it sees the geometry
        return seg

    @classmethod
    def attach(cls, name: str) -> Segment:
        path = shm_path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SegmentError(f"no segment {path}: is 'mpevent serve' running?") from None
        try:
            return cls._map_existing(fd, f"segment {path}", name)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def adopt(cls, fd: int) -> Segment:
        """Map the segment behind a descriptor this process inherited.

        A hub or sender started in a fresh interpreter gets the segment this
        way; the descriptor becomes the segment's (closed with it), and
        is not inherited further except where a child is given it by name.
        """
        os.set_inheritable(fd, False)
        return cls._map_existing(fd, f"the segment of descriptor {fd}", None)

    @classmethod
    def _map_existing(cls, fd: int, what: str, name: str | None) -> Segment:
        """Check the header of an existing segment and map it (not its owner)."""
        size = os.fstat(fd).st_size
        if size < 4096:
            raise SegmentError(f"{what} is too small ({size} bytes)")
        with mmap.mmap(fd, 4096) as head:
            words = memoryview(head).cast("Q")
            try:
                magic, version = words[H_MAGIC], words[H_VERSION]
                numbers = {
                    "lanes": words[H_LANES],
                    "lane_size": words[H_LANE_SIZE],
                    "senders": words[H_SENDERS],
                    "max_events": words[H_MAX_EVENTS],
                    "max_subs": words[H_MAX_SUBS],
                    "table_bytes": words[H_TABLE_BYTES],
                    "overflow_lanes": words[H_OVERFLOW_LANES],
                    "relays": words[H_RELAYS],
                    "handoff_size": words[H_HANDOFF_SIZE],
                }
            finally:
                words.release()
        # The magic is written last by the creator: without it the rest
        # of the header is not there yet (or this is not our file).
        if magic != MAGIC or version != LAYOUT_VERSION:
            raise SegmentError(
                f"{what} is not an mpevent segment of layout {LAYOUT_VERSION} "
                "(or it is still being created)"
            )
        try:
            geometry = Geometry(**numbers)
        except (TypeError, ValueError) as exc:
            raise SegmentError(f"{what} has a bad header: {exc}") from None
        layout = Layout.of(geometry)
        if layout.size != size:
            raise SegmentError(f"{what} is {size} bytes, its header says {layout.size}")
        return cls(fd, layout, name, owner=False)

    # -- lanes ------------------------------------------------------------

    def claim_lane(self, pid: int, sender: int | None = None) -> int | None:
        """Take the first free dedicated lane for this process; None when all are owned.

        A lane is free when nobody holds its lock *and* its owner word is 0.
        A lane whose owner died still names that owner until the hub has
        let its sender drain it and made its counters add up
        (:mod:`mpevent.processes.reclaim`); until then it is skipped.
        ``sender``: only a lane that sender drains (a process leaving a
        shared lane keeps its sender, so its events stay in order).
        """
        layout = self.layout
        for lane in range(layout.geometry.lanes):
            if sender is not None and layout.lane_sender(lane) != sender:
                continue
            if lane in self.claimed or lane in self.held:
                continue  # our own lock would not stop us from taking it twice
            if not self._try_lock(lane):
                continue
            w = self.layout.lane_word(lane)
            if self.words[w + L_OWNER_PID]:
                self._unlock(lane)  # a dead owner's lane, not reclaimed yet
                continue
            self.claimed.add(lane)
            self.words[w + L_CLAIMS] += 1
            self.words[w + L_OWNER_PID] = pid
            return lane
        return None

    def hold_dead_lane(self, lane: int) -> bool:
        """Lock a lane whose owner died, so nobody claims it while it is reclaimed."""
        if lane in self.claimed or lane in self.held:
            return lane in self.held
        if not self.words[self.layout.lane_word(lane) + L_OWNER_PID]:
            return False  # free, not dead
        if not self._try_lock(lane):
            return False  # its owner is alive
        self.held.add(lane)
        return True

    def free_held_lane(self, lane: int) -> None:
        """Mark a held lane free and let producers claim it."""
        self.words[self.layout.lane_word(lane) + L_OWNER_PID] = 0
        self.held.discard(lane)
        self._unlock(lane)

    def shared_lane_lock(self, lane: int) -> SharedLaneLock:
        """This mapping's lock of shared lane ``lane`` (the same object for
        every caller in the process, so its threads exclude each other)."""
        lock = self.shared_locks.get(lane)
        if lock is None:
            if lane not in self.layout.shared_lanes():
                raise ValueError(f"lane {lane} is not a shared lane")
            lock = self.shared_locks.setdefault(lane, SharedLaneLock(self.fd, lane))
        return lock

    def _try_lock(self, lane: int) -> bool:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, lane)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def _unlock(self, lane: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, lane)

    def lane_owner(self, lane: int) -> int | None:
        """Pid of the live process holding ``lane``, or None.

        F_GETLK only reports, so probing never takes or drops a lock (a
        try-lock and unlock would drop our own claim: POSIX record locks
        belong to the process).
        """
        if lane in self.claimed or lane in self.held:
            return os.getpid()
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, lane, 1, 0)
        got = fcntl.fcntl(self.fd, fcntl.F_GETLK, probe)
        l_type, _, _, _, pid = _FLOCK.unpack(got)
        return None if l_type == fcntl.F_UNLCK else pid

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        """Unmap and close; the creator of a named segment also removes it."""
        if self._closed:
            return
        self._closed = True
        self.words.release()
        self.buf.release()
        try:
            self._mmap.close()
        except BufferError:
            # Someone still holds a view (a producer handle); the mapping goes
            # away with the process. The descriptor and the name do not wait.
            pass
        os.close(self.fd)
        if self.owner and self.name is not None:
            self.unlink()

    def unlink(self) -> None:
        if self.name is not None:
            shm_path(self.name).unlink(missing_ok=True)


class SharedLaneLock:
    """Makes a shared lane single-writer for as long as it is held.

    A record lock on the lane's byte (the kernel drops it when its holder
    dies), taken after a ``threading.Lock`` (the record lock belongs to the
    whole process). Held for one push and its count: a writer that waits
    (``F_SETLKW``) waits for at most that, or for the holder's death. Taking
    and releasing it are syscalls that order memory (the kernel's own
    locking), so the next holder sees the lane's words as the last one left
    them, on any machine.
    """

    __slots__ = ("_fd", "_lane", "_local")

    def __init__(self, fd: int, lane: int):
        self._fd = fd
        self._lane = lane
        self._local = threading.Lock()

    def acquire(self) -> None:
        self._local.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, self._lane)
        except BaseException:
            self._local.release()
            raise

    def try_acquire(self) -> bool:
        """Take it only if nobody holds it (the hub never waits for producers)."""
        if not self._local.acquire(blocking=False):
            return False
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._lane)
        except OSError as exc:
            self._local.release()
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def release(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._lane)
        self._local.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
