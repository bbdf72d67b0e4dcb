"""``EventBus``: mpevent embedded in a forking server's master process.

Creating the bus creates an anonymous segment, the senders' doorbells and
the hub's control socket, then forks the hub (which forks the senders). The
master and every process it forks afterwards, at any depth, can then raise
events: they inherit the mapping, and each claims its own lane on its first
raise. Subscriptions and event declarations go to the hub over its control
socket (the MI), from any of these processes.

Only the process that created the bus closes it; ``close()`` in a forked
child is a no-op, so a child that exits through the same code path as its
parent does not tear the bus down under its siblings.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
import weakref
from typing import Any

from mpevent.api.client import MICallError, MIClient, MIUnavailable
from mpevent.processes.hub import Hub, HubOptions, bind_datagram, keep_only_fds
from mpevent.processes.producer import Producer
from mpevent.processes.sender.loop import DEFAULT_BACKLOG
from mpevent.protocol.destination import parse_destination
from mpevent.protocol.policy import DestinationPolicy
from mpevent.shm import counters as stats
from mpevent.shm.doorbell import Doorbell
from mpevent.shm.layout import H_STATE, STATE_RUNNING, Geometry
from mpevent.shm.segment import Segment

log = logging.getLogger("mpevent")


class BusError(RuntimeError):
    """The hub refused a request or could not be reached."""


class EventBus:
    """An event bus for a forking server (see the module doc)."""

    def __init__(
        self,
        senders: int = 1,
        *,
        lanes: int = 32,
        lane_size: int = 1 << 20,
        max_events: int = 256,
        max_subs: int = 1024,
        backlog: int = DEFAULT_BACKLOG,
        drain_timeout: float = 5.0,
        events: list[str] | tuple[str, ...] = (),
        allowed_networks: list[str] | None = None,
        unix_path_prefixes: list[str] | None = None,
    ) -> None:
        geometry = Geometry(
            lanes=lanes,
            lane_size=lane_size,
            senders=senders,
            max_events=max_events,
            max_subs=max_subs,
        )
        self._owner = os.getpid()
        self._seg = Segment.create(geometry)
        self._doorbells = [Doorbell.anonymous() for _ in range(senders)]
        control = parse_destination(f"unix:@mpevent-{os.getpid()}-{secrets.token_hex(6)}")
        sock = bind_datagram(control)
        options = HubOptions(
            backlog=backlog,
            drain_timeout=drain_timeout,
            parent_pid=self._owner,
            stop_on_sigint=False,
            events=list(events),
            policy=DestinationPolicy.from_settings(allowed_networks, unix_path_prefixes),
        )
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                keep_only_fds(
                    {self._seg.fd, sock.fileno()}
                    | {fd for bell in self._doorbells for fd in (bell.read_fd, bell.write_fd)}
                )
                code = Hub(self._seg, self._doorbells, [sock], options).run()
            except BaseException:
                log.exception("hub crashed")
            finally:
                os._exit(code)
        sock.close()
        self._hub_pid = pid
        self._client = MIClient(control, timeout=10.0)
        self.producer = Producer(self._seg, self._doorbells)
        # The hot call goes straight to the producer: one Python call less.
        self.raise_event = self.producer.raise_event  # type: ignore[method-assign]
        self._wait_running()
        self._finalizer = weakref.finalize(
            self, _shutdown, self._owner, pid, self._seg, self._doorbells
        )

    def _wait_running(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self._seg.words[H_STATE] != STATE_RUNNING:
            pid, _ = os.waitpid(self._hub_pid, os.WNOHANG)
            if pid or time.monotonic() > deadline:
                if not pid:
                    os.kill(self._hub_pid, signal.SIGKILL)
                    os.waitpid(self._hub_pid, 0)
                _release(self._seg, self._doorbells)
                raise BusError("the mpevent hub did not start")
            time.sleep(0.001)

    # -- the API ------------------------------------------------------------

    def publish_event(self, name: str) -> int:
        """Declare an event (idempotent); returns its id."""
        return self._call("event_publish", [name])["id"]

    def subscribe(self, event: str, socket: str, expire: int | None = 3600) -> None:
        """Subscribe ``socket`` to ``event`` for ``expire`` seconds.

        ``expire=None`` is permanent, ``0`` unsubscribes; subscribing again
        refreshes the expire time.
        """
        if expire is not None and (isinstance(expire, bool) or not isinstance(expire, int)):
            raise TypeError(f"expire must be an int or None, not {type(expire).__name__}")
        self._call("event_subscribe", {"event": event, "socket": socket, "expire": expire})

    def unsubscribe(self, event: str, socket: str) -> None:
        self.subscribe(event, socket, expire=0)

    def subscribers(self, event: str | None = None) -> Any:
        return self._call("subscribers_list", [event] if event else None)

    def raise_event(self, event: str, params: Any = None) -> bool:
        """Queue ``event`` for every subscriber; see :meth:`Producer.raise_event`."""
        return self.producer.raise_event(event, params)

    def stats(self) -> dict[str, Any]:
        """Counters per event and per destination, as plain data."""
        return stats.collect(self._seg)

    def mi(self, method: str, params: Any = None) -> Any:
        """Call any MI method on this bus's hub."""
        return self._call(method, params)

    @property
    def hub_pid(self) -> int:
        return self._hub_pid

    @property
    def segment(self) -> Segment:
        return self._seg

    def _call(self, method: str, params: Any) -> Any:
        if not self._finalizer.alive and os.getpid() == self._owner:
            raise BusError(f"{method} on a closed EventBus")
        try:
            return self._client.call(method, params)
        except MIUnavailable as exc:
            raise BusError(str(exc)) from None
        except MICallError as exc:
            if exc.code in (400, -32602):
                raise ValueError(exc.message) from None
            raise BusError(str(exc)) from None

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Drain (bounded), stop the hub and senders, release the segment.

        Also runs when the bus is garbage collected or the interpreter exits.
        """
        if self._finalizer.alive and os.getpid() == self._owner:
            self.raise_event = self._raise_after_close  # type: ignore[method-assign]
        self._finalizer()

    @staticmethod
    def _raise_after_close(event: str, params: Any = None) -> bool:
        raise BusError(f"raise_event({event!r}) on a closed EventBus")

    def __enter__(self) -> EventBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shutdown(owner: int, hub_pid: int, seg: Segment, doorbells: list[Doorbell]) -> None:
    if os.getpid() != owner:
        return  # a forked child: the bus belongs to its creator
    try:
        os.kill(hub_pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 60.0  # the hub bounds its own drain
    while True:
        try:
            pid, _ = os.waitpid(hub_pid, os.WNOHANG)
        except ChildProcessError:
            break  # reaped by someone else (a server's own SIGCHLD handler)
        if pid:
            break
        if time.monotonic() > deadline:
            log.warning("mpevent hub %d did not stop in time; killing it", hub_pid)
            os.kill(hub_pid, signal.SIGKILL)
            os.waitpid(hub_pid, 0)
            break
        time.sleep(0.002)
    _release(seg, doorbells)


def _release(seg: Segment, doorbells: list[Doorbell]) -> None:
    for bell in doorbells:
        bell.close()
    seg.close()
