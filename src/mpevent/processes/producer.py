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

When every lane is owned (more producer processes than ``lanes``), a process
writes to a shared lane instead, always the one its pid picks, so its events
stay in order (:meth:`Producer._raise_shared`): per raise it takes that
lane's record lock, pushes from the tail the last writer published, counts,
and releases: a syscall per raise, the degraded mode. It looks for a lane
of its own every second, and moves to one only of the same sender and only
once that sender has taken all it wrote to the shared lane, so the sender
sends those first.

The compiled fast path (:mod:`mpevent.processes.fastpath` says whether it
runs) is ``_CompiledProducer``: the C base ``_fastpath.FastPath`` keeps the
attributes ``raise_event`` reads per call (``_fast``, ``_words``, ``_lane``,
``_sleep_word``, ``_doorbell``) in C slots, so this module's code sets them
the same way on both paths, and its ``raise_event`` runs the common path in
C. Everything else (first raise, shared lane, hub gone, bad input,
oversize) it hands, before any side effect, to :meth:`Producer.raise_event`
below, the reference; there, ``self._lane`` is a ``_fastpath.Lane``
(``_lane_writer``), so every push into this process's lane is one C call and
a thread switch never falls inside one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import orjson

from mpevent.processes import fastpath
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
    L_CLAIMS,
    L_HEAD,
    L_TAIL,
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
    """Raises events into a segment from any process that maps it.

    ``compiled``: the compiled fast path (True), the pure-Python one (False),
    or the process's default (None: :data:`mpevent.processes.fastpath.COMPILED`).
    """

    #: What pushes into this process's own lane (_CompiledProducer: the C one).
    _lane_writer: Callable[..., LaneWriter] = LaneWriter

    def __new__(cls, *args: Any, compiled: bool | None = None, **kwargs: Any) -> Producer:
        if cls is Producer and (fastpath.COMPILED if compiled is None else compiled):
            if _CompiledProducer is None:
                raise RuntimeError(f"the compiled fast path is not available: {fastpath.REASON}")
            return _CompiledProducer.__new__(_CompiledProducer)
        return super().__new__(cls)

    def __init__(
        self,
        seg: Segment,
        doorbells: list[Doorbell],
        on_hub_down: Callable[[], None] | None = None,
        *,
        compiled: bool | None = None,  # taken by __new__
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
        self._shared: _SharedLane | None = None  # while no lane is this process's own
        self._moving_to = -1  # a lane claimed while shared, used once it may be (_raise_shared)

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
            if self._lane is None:  # every lane is owned: no fast entry while shared
                return self._raise_shared(event, event_id, params)
        # Under the lock, as _claim clears the entries: one made from a
        # counter block a concurrent claim just replaced must not survive.
        with self._lock:
            counters = self._counters_at + event_id * 8
            # Without a GIL (or a lane: a concurrent bind forgot it) the
            # count takes the lock (word 0 is never one). The compiled path
            # reads 0 as "not for me": it pushes and counts only without a lock.
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
        """Claim a lane of this process's own. When every lane is owned, write
        to a shared lane meanwhile and look again after _NO_LANE_RETRY_NS,
        however often this process raises (a look costs a syscall per lane)."""
        with self._lock:
            if self._lane is not None or self._moving_to >= 0:
                return
            now = _clock()
            if now < self._retry_claim_ns:
                return  # every lane was owned a moment ago: look again later
            self._retry_claim_ns = now + _NO_LANE_RETRY_NS
            shared = self._shared
            # Leaving a shared lane, only for a lane of the same sender: it
            # sends what this process wrote there before anything from the
            # new lane (another sender could overtake it).
            sender = None if shared is None else shared.sender
            lane = self._seg.claim_lane(os.getpid(), sender)
            if lane is None:
                if shared is None:
                    self._join_shared()
            elif shared is None:
                self._use_lane(lane)
            else:
                self._moving_to = lane  # used once the sender took our records (_raise_shared)

    def _use_lane(self, lane: int) -> None:
        """Raise into ``lane``, this process's own, from now on (under ``_lock``)."""
        layout = self._layout
        self._lane = self._lane_writer(
            self._seg.buf,
            self._words,
            layout.lane_word(lane),
            layout.lane_data(lane),
            layout.geometry.lane_size,
        )
        self._lane_index = lane
        self._shared = None
        self._moving_to = -1
        self._fast.clear()
        self._counters_at = layout.prod_counter_word(lane, 0)
        sender = layout.lane_sender(lane)
        self._sleep_word = layout.sender_word(sender) + S_SLEEPING
        self._doorbell = self._doorbells[sender]

    def _join_shared(self) -> None:
        """Every lane is owned: write to this process's shared lane (under ``_lock``)."""
        layout = self._layout
        shared = _SharedLane(self._seg, layout.shared_lane_for(os.getpid()), self._doorbells)
        with shared.lock:
            # One more writer: the lane's sender drains it from now on, and
            # the hub warns that `lanes` is too small.
            self._words[layout.lane_word(shared.lane) + L_CLAIMS] += 1
        self._shared = shared
        self._lane_index = shared.lane
        self._counters_at = layout.prod_counter_word(shared.lane, 0)

    def _raise_shared(self, event: str, event_id: int, params: Any) -> bool:
        """``raise_event`` while this process has no lane of its own.

        The fast path's steps, through the helpers it inlines, with the
        record pushed into the shared lane and every count made under the
        lane's lock, since other processes write there too: two syscalls
        per raise. A holder killed mid-push has its lock dropped by the
        kernel; one killed between publishing and counting leaves a count
        the hub repairs (:mod:`mpevent.processes.reclaim`).
        """
        words = self._words
        subscribers = words[self._sub_count_at + event_id]
        if not subscribers:
            self._count_shared(event_id, P_NO_SUBSCRIBER)
            return False
        if subscribers >= HUB_GONE:
            return self._hub_down()
        try:
            body = encode_params(params)
        except (TypeError, ValueError):
            self._count_shared(event_id, P_REJECTED)
            raise
        if len(body) > self._max_params[event_id]:
            self._count_shared(event_id, P_REJECTED, P_OVERSIZE)
            self._refuse_oversize(event, event_id, len(body))
        raised_ns = _clock()
        pushed = None  # None: this process has a lane of its own now
        with self._lock:
            shared = self._shared
            if shared is not None:
                with shared.lock:
                    if self._moving_to >= 0 and words[shared.head_word] >= shared.published:
                        # The sender took all we wrote to the shared lane
                        # (and sends it before it looks at the new lane).
                        self._use_lane(self._moving_to)
                    else:
                        pushed = shared.push(event_id, body, raised_ns)
                        counters = self._counters_at + event_id * 8
                        words[counters + (P_ENQUEUED if pushed else P_DROPPED)] += 1
        if pushed is None:
            return self._raise_first(event, params)  # encodes again, once per move
        if not pushed:
            if self.on_hub_down is not None:
                self._check_hub()  # a full lane may mean nobody drains it any more
            return False
        if words[shared.sleep_word]:
            words[shared.sleep_word] = 0
            shared.doorbell.ring()
        return True

    def _count_shared(self, event_id: int, *counts: int) -> None:
        """Count in this process's counter block: under the shared lane's lock
        while it writes to one (another thread may have just moved it)."""
        with self._lock:
            shared = self._shared
            at = self._counters_at + event_id * 8
            with contextlib.nullcontext() if shared is None else shared.lock:
                for index in counts:
                    self._words[at + index] += 1

    @property
    def lane(self) -> int:
        """The lane this process writes to (-1 before its first raise); while
        it has none of its own, the shared lane's (``geometry.lanes`` or more)."""
        return self._lane_index

    @property
    def shared(self) -> bool:
        """True while this process writes to a shared lane (every lane was owned)."""
        return self._shared is not None


class _SharedLane:
    """A shared lane as one of its writers sees it (:meth:`Producer._raise_shared`)."""

    __slots__ = (
        "_words",
        "doorbell",
        "head_word",
        "lane",
        "lock",
        "published",
        "sender",
        "sleep_word",
        "tail_word",
        "writer",
    )

    def __init__(self, seg: Segment, lane: int, doorbells: list[Doorbell]):
        layout = seg.layout
        ctl = layout.lane_word(lane)
        self.lane = lane
        self.lock = seg.shared_lane_lock(lane)
        self.writer = LaneWriter(
            seg.buf, seg.words, ctl, layout.lane_data(lane), layout.geometry.lane_size
        )
        self._words = seg.words
        self.tail_word = ctl + L_TAIL
        self.head_word = ctl + L_HEAD
        self.published = 0  # where this process's last record in the lane ends
        self.sender = layout.lane_sender(lane)
        self.sleep_word = layout.sender_word(self.sender) + S_SLEEPING
        self.doorbell = doorbells[self.sender]

    def push(self, event_id: int, body: bytes, raised_ns: int) -> bool:
        """``LaneWriter.push`` after the lane's last writer, under ``lock``."""
        writer = self.writer
        writer.tail = self._words[self.tail_word]  # others wrote since: never a cached copy
        if not writer.push(event_id, body, raised_ns):
            return False
        self.published = writer.tail
        return True


_CompiledProducer: type[Producer] | None = None
if fastpath.extension is not None:

    class _CompiledProducer(fastpath.extension.FastPath, Producer):  # type: ignore[no-redef]
        """A Producer whose ``raise_event`` is the C fast path (``_fastpath.FastPath``).

        Its only other difference: ``_lane_writer``, so its own lane is a
        ``_fastpath.Lane``, the one object that pushes into it from C and from
        Python. Nothing in C refers back to the producer, so the mapping
        export its lane holds goes away with it, as the pure path's views do.
        """

        _lane_writer = fastpath.extension.Lane

    fastpath.extension.configure(Producer.raise_event, Doorbell)
