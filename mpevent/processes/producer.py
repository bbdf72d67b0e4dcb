"""The producer side: ``raise_event``, the fast path every worker runs.

A :class:`Producer` lives in every process that maps the segment. The first
``raise_event`` in a process claims a lane (a kernel-released record lock,
see :mod:`mpevent.shm.segment`); after ``os.fork`` the child forgets the
parent's lane and claims its own on its first raise, with no call needed
from the application (``os.register_at_fork``, no ``getpid()`` per call).

Per call, when nobody is subscribed: a dict lookup, one load from shared
memory and a counter. Otherwise: params encoded with orjson, the size
checked, one record copied into the lane under a process-local lock, the
tail published, and the sender's doorbell rung only if it sleeps. No
syscall, nothing that depends on the number of subscribers.

Threads of one process share the lane behind a ``threading.Lock``; the lock
is re-created in a forked child, so a fork while another thread holds it
cannot leave the child deadlocked.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import orjson

from mpevent.protocol.payload import (
    MAX_DATAGRAM,
    DatagramTooLarge,
    PayloadError,
    check_event_name,
    encode_params,
    params_prefix,
)
from mpevent.shm.doorbell import Doorbell
from mpevent.shm.layout import (
    H_HUB_PID,
    HUB_GONE,
    P_DROPPED,
    P_ENQUEUED,
    P_NO_SUBSCRIBER,
    P_OVERSIZE,
    P_REJECTED,
    S_SLEEPING,
)
from mpevent.shm.ring import LaneWriter, max_body
from mpevent.shm.segment import Segment
from mpevent.shm.table import event_names

_NO_LANE_RETRY_NS = 1_000_000_000
_HEALTH_CHECK_NS = 500_000_000
_GIL = getattr(sys, "_is_gil_enabled", lambda: True)()
_dumps = orjson.dumps
_clock = time.monotonic_ns
_producers: weakref.WeakSet[Producer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for producer in list(_producers):
        producer._forget_lane()


os.register_at_fork(after_in_child=_after_fork_in_child)


class UnknownEvent(ValueError):
    """``raise_event`` for an event nobody declared (``publish_event``)."""


class Producer:
    """Raises events into a segment from any process that maps it."""

    def __init__(
        self,
        seg: Segment,
        doorbells: list[Doorbell],
        on_hub_down: Callable[[], None] | None = None,
    ):
        #: Called (from the slow paths only) when the hub looks gone; the
        #: daemon client uses it to reattach. Embedded buses have no hook.
        self.on_hub_down = on_hub_down
        #: raise_event calls that returned False because the hub was gone.
        self.undelivered = 0
        self.bind(seg, doorbells)
        _producers.add(self)

    def bind(self, seg: Segment, doorbells: list[Doorbell]) -> None:
        """Raise into ``seg`` from now on (also: reattach to a new segment)."""
        self._seg = seg
        self._words = seg.words
        self._layout = seg.layout
        self._doorbells = doorbells
        self._ids: dict[str, int] = {}
        self._prefix_len: list[int] = []
        self._max_params: list[int] = []  # largest encoded params per event id
        self._max_body = max_body(seg.layout.geometry.lane_size)
        self._sub_count_at = seg.layout.sub_count_word(0)
        self._next_health_check = 0
        self._forget_lane()

    def _forget_lane(self) -> None:
        self._lock = threading.Lock()
        self._lane: LaneWriter | None = None
        self._lane_index = -1
        self._counters_at = 0
        # Per event raised since the lane was claimed: (event id, its
        # subscriber count word, its counter block, its no-subscriber count
        # word when a plain += may count, else 0, the largest params it may
        # carry). The fast path's only lookup: all it needs, precomputed.
        self._fast: dict[str, tuple[int, int, int, int, int]] = {}
        self._sleep_word = 0
        self._doorbell: Doorbell | None = None
        self._retry_claim_ns = 0

    # -- events -----------------------------------------------------------

    def event_id(self, name: str) -> int:
        event_id = self._ids.get(name)
        if event_id is None:
            event_id = self._lookup(name)
        return event_id

    def _lookup(self, name: Any) -> int:
        """Learn the events declared since we last looked (rare, so locked:
        two threads must not both append the same events)."""
        check_event_name(name)
        with self._lock:
            start = len(self._prefix_len)
            for event_id, new_name in enumerate(event_names(self._seg, start), start):
                prefix_len = len(params_prefix(new_name))
                self._prefix_len.append(prefix_len)
                self._max_params.append(min(MAX_DATAGRAM - prefix_len - 1, self._max_body))
                self._ids[new_name] = event_id  # last: the lists are ready when it is seen
        try:
            return self._ids[name]
        except KeyError:
            raise UnknownEvent(f"event {name!r} is not published") from None

    def has_subscribers(self, name: str) -> bool:
        count = self._words[self._sub_count_at + self.event_id(name)]
        return 0 < count < HUB_GONE

    # -- the fast path ----------------------------------------------------

    def raise_event(self, event: str, params: Any = None) -> bool:
        """Queue one event for every subscriber; True when enqueued.

        False when nobody is subscribed or the lane is full (both counted).
        ``TypeError``/``ValueError`` for bad input, ``DatagramTooLarge``
        (a ``ValueError``) when the notification would exceed the limit.
        """
        try:
            event_id, sub_word, counters, idle_word, max_params = self._fast[event]
        except (KeyError, TypeError):
            return self._raise_first(event, params)
        words = self._words
        subscribers = words[sub_word]
        if not subscribers:
            if idle_word:
                # Atomic under the GIL: no eval-breaker check (so no thread
                # switch) between the load and the store of ``+=`` on a
                # memoryview item; a lock would double this path's cost.
                words[idle_word] += 1
                return False
            return self._count_no_subscriber(counters)
        if subscribers >= HUB_GONE:
            return self._hub_down()  # the hub stopped: see mpevent.shm.table.clear_counts
        if params.__class__ is dict and params:  # the common case, inlined
            try:
                body = _dumps(params)
            except TypeError:
                body = self._encode(params, counters)  # says what is wrong
            else:
                # find(), not "in": bytes.__contains__ first tries the needle
                # as an int and pays for the TypeError it then swallows. A
                # "null" may be NaN or infinity, which encode_params refuses.
                if body.find(b"null") >= 0:
                    body = self._encode(params, counters)
        else:
            body = self._encode(params, counters)
        if len(body) > max_params:
            self._count_rejected(counters, True)
            self._refuse_oversize(event, event_id, len(body))
        raised_ns = _clock()
        lock = self._lock
        lock.acquire()  # not "with": the explicit calls cost half as much
        try:
            lane = self._lane
            if lane is None or not lane.push(event_id, body, raised_ns):
                words[counters + P_DROPPED] += 1
                dropped = True
            else:
                words[counters + P_ENQUEUED] += 1
                dropped = False
        finally:
            lock.release()
        if dropped:
            if self._lane is None:
                self._claim()  # every lane was owned: look again (rate-limited)
            if self.on_hub_down is not None:
                self._check_hub()  # a full lane may mean nobody drains it any more
            return False
        if words[self._sleep_word]:
            words[self._sleep_word] = 0
            self._doorbell.ring()
        return True

    def _encode(self, params: Any, counters: int) -> bytes:
        """encode_params, counting what it refuses as rejected."""
        try:
            return encode_params(params)
        except (TypeError, ValueError):
            self._count_rejected(counters, False)
            raise

    def _refuse_oversize(self, event: str, event_id: int, params_len: int) -> None:
        size = self._prefix_len[event_id] + params_len + 1
        if size > MAX_DATAGRAM:
            raise DatagramTooLarge(event, size)
        raise PayloadError(
            f"event {event!r}: {params_len} bytes of params do not fit a lane of "
            f"{self._layout.geometry.lane_size} bytes (lane_size)"
        )

    def _raise_first(self, event: Any, params: Any) -> bool:
        """The first raise of ``event`` on this lane: learn it, then the fast path."""
        event_id = self._ids.get(event) if event.__class__ is str else None
        if event_id is None:
            event_id = self._lookup(event)  # raises for a bad or unknown name
        if self._lane is None:
            self._claim()
        # Under the lock, as _claim clears the entries: one made from a
        # counter block a concurrent claim just replaced must not survive.
        with self._lock:
            counters = self._counters_at + event_id * 8
            # Without a GIL, or counting in the spare block that lane-less
            # processes share, the count takes the lock (word 0 is never one).
            unlocked = _GIL and self._lane is not None
            self._fast[event] = (
                event_id,
                self._sub_count_at + event_id,
                counters,
                counters + P_NO_SUBSCRIBER if unlocked else 0,
                self._max_params[event_id],
            )
        return self.raise_event(event, params)

    def _count_no_subscriber(self, counters: int) -> bool:
        with self._lock:
            self._words[counters + P_NO_SUBSCRIBER] += 1
        return False

    def _health_check_due(self) -> bool:
        """Looking for a new hub costs syscalls: at most every _HEALTH_CHECK_NS."""
        now = _clock()
        if now < self._next_health_check:
            return False
        self._next_health_check = now + _HEALTH_CHECK_NS
        return True

    def _hub_down(self) -> bool:
        """The hub stopped: count, maybe reattach, never raise."""
        self.undelivered += 1
        if self.on_hub_down is not None and self._health_check_due():
            self.on_hub_down()
        return False

    def _check_hub(self) -> None:
        """On a full lane: is the hub alive?"""
        if not self._health_check_due():
            return
        pid = self._words[H_HUB_PID]
        if not pid:
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            self.on_hub_down()
        except PermissionError:
            pass  # alive, and someone else's

    def _count_rejected(self, counters: int, oversize: bool) -> None:
        with self._lock:
            words = self._words
            words[counters + P_REJECTED] += 1
            if oversize:
                words[counters + P_OVERSIZE] += 1

    # -- lanes ------------------------------------------------------------

    def _claim(self) -> None:
        with self._lock:
            if self._lane is not None:
                return
            layout = self._layout
            now = time.monotonic_ns()
            if now < self._retry_claim_ns:
                return  # every lane was owned a moment ago: look again later
            lane = self._seg.claim_lane(os.getpid())
            if lane is None:
                # Every lane is owned: count in the spare block (see
                # _SpareLock) and look for a free lane again after the
                # interval, however often this process raises meanwhile.
                self._retry_claim_ns = now + _NO_LANE_RETRY_NS
                if not isinstance(self._lock, _SpareLock):
                    self._counters_at = layout.prod_counter_word(layout.geometry.lanes, 0)
                    self._lock = _SpareLock(self._seg.fd, layout.geometry.lanes)
                return
            g = layout.geometry
            self._lane = LaneWriter(
                self._seg.buf,
                self._words,
                layout.lane_word(lane),
                layout.lane_data(lane),
                g.lane_size,
            )
            self._lane_index = lane
            self._fast.clear()  # their counters were the spare block's
            if isinstance(self._lock, _SpareLock):
                self._lock = threading.Lock()
            self._counters_at = layout.prod_counter_word(lane, 0)
            sender = layout.lane_sender(lane)
            self._sleep_word = layout.sender_word(sender) + S_SLEEPING
            self._doorbell = self._doorbells[sender]

    @property
    def lane(self) -> int:
        """The lane this process writes to (-1 before its first raise)."""
        return self._lane_index


class _SpareLock:
    """Guards the spare counter block, which lane-less processes share.

    Only used when every lane is owned, a degraded mode: a record lock per
    raise (a syscall) is acceptable there, and the kernel drops it if the
    holder dies. After the retry interval the producer tries to claim a lane
    again.
    """

    def __init__(self, fd: int, byte: int):
        self._fd = fd
        self._byte = byte
        self._local = threading.Lock()

    def acquire(self) -> None:
        self._local.acquire()
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, self._byte)

    def release(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._byte)
        self._local.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
