"""Attaching to a running ``mpevent serve`` by name, from any process.

:func:`connect` maps the daemon's named segment and returns a
:class:`Connection` with the same ``publish_event`` and ``raise_event`` as
:class:`~mpevent.EventBus`. The fast path is the same code (a
:class:`~mpevent.processes.producer.Producer`), so raising costs the same.

When the daemon stops or dies, raising never raises into the caller and
never blocks: a stopped hub has cleared every subscriber count, so calls
return ``False`` at the probe; a killed hub leaves lanes that fill up, and
calls return ``False`` as "dropped". Only on those slow paths, at most twice
a second, the connection looks for a new segment of the same name and, when
a new hub runs, reattaches to it by itself. What could not be delivered in
between is counted in :attr:`Connection.undelivered`.

When no hub serves the name (no segment, a hub that stopped, or one killed
without cleaning up: its pid gone, its senders with it), :func:`connect`
waits up to its timeout and then raises :class:`NotServing`, saying so and
how to start one. It logs attaching (debug), reattaching (info), and once per
outage that the hub is gone (warning), on the ``mpevent.connect`` logger.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

import psutil

from mpevent.api.client import MICallError, MIClient, MIUnavailable
from mpevent.defaults import SEGMENT_NAME
from mpevent.processes.producer import Producer
from mpevent.shm import counters as stats
from mpevent.shm.doorbell import Doorbell
from mpevent.shm.layout import H_HUB_PID, H_STATE, STATE_RUNNING
from mpevent.shm.segment import Segment, SegmentError, shm_path
from mpevent.shm.table import read_info

log = logging.getLogger("mpevent.connect")


class NotServing(ConnectionError):
    """No running hub serves that segment name."""


def _how_to_start(name: str) -> str:
    command = "mpevent serve" if name == SEGMENT_NAME else f"mpevent serve --name {name}"
    return f"start one with `{command}`"


def _hub_alive(pid: int) -> bool:
    """Whether the hub ``pid`` still runs (a zombie does not: it was killed)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # someone else's process: alive, as far as we can tell


def _attach(name: str, timeout: float) -> tuple[Segment, list[Doorbell], dict]:
    """Map the segment a live hub serves; :class:`NotServing` once ``timeout``
    is up, saying why none does and how to start one."""
    deadline = time.monotonic() + timeout
    while True:
        attached = _try_attach(name)
        if not isinstance(attached, str):
            return attached
        if time.monotonic() > deadline:
            raise NotServing(f"no hub serves segment {shm_path(name)}: {attached}")
        time.sleep(0.01)


def _try_attach(name: str) -> tuple[Segment, list[Doorbell], dict] | str:
    """The segment, its doorbells and info block; or why no hub serves it."""
    path = shm_path(name)
    try:
        seg = Segment.attach(name)
    except SegmentError as exc:
        if not path.exists():
            return f"there is no such segment; {_how_to_start(name)}"
        return f"{exc}; {_how_to_start(name)}"
    pid = seg.words[H_HUB_PID]
    if seg.words[H_STATE] != STATE_RUNNING:
        seg.close()
        return f"its hub stopped (or has not started yet); {_how_to_start(name)}"
    if not _hub_alive(pid):
        seg.close()
        # A killed hub cannot mark its segment stopped: it looks running.
        return (
            f"its hub (pid {pid}) is gone, killed without cleaning up; "
            f"{_how_to_start(name)}, which replaces the stale segment"
        )
    try:
        info = read_info(seg)
        doorbells = [Doorbell.open_fifo(path) for path in info.get("doorbells", [])]
    except (OSError, ValueError) as exc:
        seg.close()
        # ENXIO: a FIFO nobody reads, a sender gone (its hub was just killed).
        return f"its senders' doorbells cannot be opened ({exc}); {_how_to_start(name)}"
    return seg, doorbells, info


_connections: weakref.WeakSet[Connection] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A thread of the parent may have been reattaching: the child's copy of
    # that lock would stay held forever.
    for conn in list(_connections):
        conn._reattaching = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Connection:
    """A producer handle on a daemon's segment; survives daemon restarts."""

    def __init__(self, name: str = SEGMENT_NAME, timeout: float = 5.0):
        self.name = name
        seg, doorbells, info = _attach(name, timeout)
        self._seg = seg
        self._doorbells = doorbells
        self._inode = os.fstat(seg.fd).st_ino
        self._mi = MIClient(info["mi"]) if info.get("mi") else None
        self.producer = Producer(seg, doorbells, on_hub_down=self._reattach)
        # The hot call goes straight to the producer, as in EventBus.
        self.raise_event = self.producer.raise_event
        self.reattached = 0
        self._reattaching = threading.Lock()
        self._told_gone = False  # the hub-gone warning, once per outage
        _connections.add(self)
        log.debug(
            "attached to segment %s (hub pid %d, MI %s)",
            shm_path(name),
            seg.words[H_HUB_PID],
            info.get("mi") or "none",
        )

    @property
    def undelivered(self) -> int:
        """raise_event calls refused because the hub was stopped or gone."""
        return self.producer.undelivered

    def publish_event(self, name: str) -> int:
        return self.mi("event_publish", [name])["id"]

    def subscribe(self, event: str, socket: str, expire: int | None = 3600) -> None:
        self.mi("event_subscribe", {"event": event, "socket": socket, "expire": expire})

    def unsubscribe(self, event: str, socket: str) -> None:
        self.subscribe(event, socket, expire=0)

    def stats(self) -> dict[str, Any]:
        data = stats.collect(self._seg)
        data["undelivered"] = self.undelivered
        return data

    def mi(self, method: str, params: Any = None) -> Any:
        if self._mi is None:
            raise NotServing("the daemon has no MI listener this process can use")
        try:
            return self._mi.call(method, params)
        except MICallError as exc:
            if exc.code in (400, -32602):
                raise ValueError(exc.message) from None
            raise
        except MIUnavailable as exc:
            raise NotServing(str(exc)) from None

    def _reattach(self) -> None:
        """Called by the producer's slow paths: is there a new hub to attach to?"""
        if not self._reattaching.acquire(blocking=False):
            return  # another thread of this process is at it
        try:
            self._reattach_locked()
        finally:
            self._reattaching.release()

    def _reattach_locked(self) -> None:
        try:
            inode = os.stat(shm_path(self.name)).st_ino
        except OSError:
            return self._hub_gone()  # no segment: the daemon is down; keep counting
        if inode == self._inode and self._seg.words[H_STATE] == STATE_RUNNING:
            return self._hub_gone()  # killed: its segment still says running
        try:
            seg, doorbells, info = _attach(self.name, timeout=0)
        except NotServing:
            return self._hub_gone()
        self._told_gone = False
        old_seg, old_bells = self._seg, self._doorbells
        self._seg, self._doorbells = seg, doorbells
        self._inode = os.fstat(seg.fd).st_ino
        self._mi = MIClient(info["mi"]) if info.get("mi") else None
        self.producer.bind(seg, doorbells)
        self.reattached += 1
        log.info("reattached to a new hub on segment %s", shm_path(self.name))
        for bell in old_bells:
            bell.close()
        old_seg.close()

    def _hub_gone(self) -> None:
        if not self._told_gone:
            self._told_gone = True
            log.warning(
                "no hub serves segment %s: events are not delivered (counted in "
                "undelivered) until one does (%s); this process reattaches by itself",
                shm_path(self.name),
                _how_to_start(self.name),
            )

    def close(self) -> None:
        for bell in self._doorbells:
            bell.close()
        self._seg.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(name: str = SEGMENT_NAME, timeout: float = 5.0) -> Connection:
    """Attach to the segment of ``mpevent serve --name NAME`` (waits up to ``timeout``)."""
    return Connection(name, timeout)
