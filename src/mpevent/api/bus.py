"""``EventBus``: mpevent embedded in a forking server's master process.

Creating the bus creates an anonymous segment, the senders' doorbells and
the hub's control socket, then starts the hub in a fresh interpreter (which
starts the senders the same way): the hub inherits nothing of the
application but those descriptors, so it works the same whatever threads,
locks or sockets the application has. The master and every process it
forks afterwards, at any depth, can then raise events: they inherit the
mapping, and each claims its own lane on its first raise. Subscriptions
and event declarations go to the hub over its control socket (the MI), from
any of these processes.

Only the process that created the bus closes it; ``close()`` in a forked
child is a no-op, so a child that exits through the same code path as its
parent does not tear the bus down under its siblings.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import time
import weakref
from typing import Any

from mpevent import defaults
from mpevent.api.client import MICallError, MIClient, MIUnavailable
from mpevent.processes import launch
from mpevent.processes.hub import HubOptions
from mpevent.processes.producer import Producer
from mpevent.processes.sender.backlog import BacklogLimits
from mpevent.protocol.destination import parse_destination
from mpevent.protocol.policy import DestinationPolicy, SettingNames
from mpevent.shm import counters as stats
from mpevent.shm.doorbell import Doorbell
from mpevent.shm.layout import H_STATE, H_TABLE_GEN, S_PID, S_TABLE_GEN, STATE_RUNNING, Geometry
from mpevent.shm.segment import Segment
from mpevent.system import bind_datagram

log = logging.getLogger("mpevent")


class BusError(RuntimeError):
    """The hub refused a request or could not be reached."""


# An embedded bus's allow-list is set by its keywords, not by the daemon's
# configuration keys: its refusals say so.
POLICY_NAMES = SettingNames(
    networks="EventBus(allowed_networks=[...])",
    unix_prefixes="EventBus(unix_path_prefixes=[...])",
)


class EventBus:
    """An event bus for a forking server (see the module doc)."""

    def __init__(
        self,
        senders: int = defaults.SENDERS,
        *,
        lanes: int = defaults.LANES,
        lane_size: int = defaults.LANE_SIZE,
        overflow_lanes: int = defaults.OVERFLOW_LANES,
        relays: int = defaults.RELAYS,
        handoff_size: int = defaults.HANDOFF_SIZE,
        max_events: int = defaults.MAX_EVENTS,
        max_subs: int = defaults.MAX_SUBS,
        backlog: int = defaults.BACKLOG,
        backlog_bytes: int = defaults.BACKLOG_BYTES,
        sender_backlog_bytes: int = defaults.SENDER_BACKLOG_BYTES,
        drain_timeout: float = defaults.DRAIN_TIMEOUT,
        events: list[str] | tuple[str, ...] = (),
        allowed_networks: list[str] | None = None,
        unix_path_prefixes: list[str] | None = None,
    ) -> None:
        geometry = Geometry(
            lanes=lanes,
            lane_size=lane_size,
            overflow_lanes=overflow_lanes,
            relays=relays,
            handoff_size=handoff_size,
            senders=senders,
            max_events=max_events,
            max_subs=max_subs,
        )
        # Checked here, like the geometry, before anything is allocated.
        backlog_limits = BacklogLimits(backlog, backlog_bytes, sender_backlog_bytes)
        policy = DestinationPolicy.from_settings(allowed_networks, unix_path_prefixes, POLICY_NAMES)
        self._owner = os.getpid()
        self._seg = Segment.create(geometry)
        self._doorbells = [Doorbell.anonymous() for _ in range(senders)]
        control = parse_destination(f"unix:@mpevent-{os.getpid()}-{secrets.token_hex(6)}")
        sock = bind_datagram(control)
        options = HubOptions(
            backlog=backlog_limits,
            drain_timeout=drain_timeout,
            parent_pid=self._owner,
            stop_on_sigint=False,
            events=list(events),
            policy=policy,
        )
        try:
            self._hub = launch.start_hub(
                self._seg.fd,
                [(bell.read_fd, bell.write_fd) for bell in self._doorbells],
                sock.fileno(),
                options,
            )
        except BaseException:
            _release(self._seg, self._doorbells)
            raise
        finally:
            sock.close()  # the hub has its own copy
        self._client = MIClient(control, timeout=10.0)
        self.producer = Producer(self._seg, self._doorbells)
        # The hot call goes straight to the producer: one Python call less.
        self.raise_event = self.producer.raise_event  # type: ignore[method-assign]
        self._wait_running()
        self._finalizer = weakref.finalize(
            self, _shutdown, self._owner, self._hub, self._seg, self._doorbells
        )

    def _wait_running(self, timeout: float = 30.0) -> None:
        """Until the hub runs and every sender serves its lanes: a sender starts
        in a fresh interpreter after the hub, and an event raised before it
        serves would wait for it (tens of milliseconds)."""
        deadline = time.monotonic() + timeout
        words, layout = self._seg.words, self._seg.layout
        senders = [layout.sender_word(i) + S_PID for i in range(layout.geometry.senders)]
        while words[H_STATE] != STATE_RUNNING or not all(words[w] for w in senders):
            exited = self._hub.poll() is not None
            if exited or time.monotonic() > deadline:
                if not exited:
                    self._hub.kill()
                    self._hub.wait()
                _release(self._seg, self._doorbells)
                how = f"exited with {self._hub.returncode}" if exited else "timed out"
                raise BusError(f"the mpevent hub did not start ({how}; its log is on stderr)")
            time.sleep(0.001)

    # -- the API ------------------------------------------------------------

    def publish_event(self, name: str) -> int:
        """Declare an event (idempotent); returns its id."""
        return self._call("event_publish", [name])["id"]

    def subscribe(self, event: str, socket: str, expire: int | None = 3600) -> None:
        """Subscribe ``socket`` to ``event`` for ``expire`` seconds.

        ``expire=None`` is permanent, ``0`` unsubscribes; subscribing again
        refreshes the expire time. Returns once every sender routes with the
        new table, so every event raised afterwards goes to the new subscriber
        (an event that already had others would otherwise miss it for the
        microseconds a sender takes to reload).
        """
        if expire is not None and (isinstance(expire, bool) or not isinstance(expire, int)):
            raise TypeError(f"expire must be an int or None, not {type(expire).__name__}")
        self._call("event_subscribe", {"event": event, "socket": socket, "expire": expire})
        self._wait_routed()

    def _wait_routed(self, timeout: float = 2.0) -> None:
        """Until every sender routes with the hub's current table (bounded: a
        sender being replaced catches up when it starts; nothing waits on it)."""
        words, layout = self._seg.words, self._seg.layout
        gen = words[H_TABLE_GEN]
        seen = [layout.sender_word(i) + S_TABLE_GEN for i in range(layout.geometry.senders)]
        deadline = time.monotonic() + timeout
        while any(words[w] < gen for w in seen) and time.monotonic() < deadline:
            time.sleep(0.0005)

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
        return self._hub.pid

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


def _shutdown(
    owner: int, hub: subprocess.Popen[bytes], seg: Segment, doorbells: list[Doorbell]
) -> None:
    if os.getpid() != owner:
        return  # a forked child: the bus belongs to its creator
    if hub.poll() is None:
        hub.terminate()
        try:
            hub.wait(60.0)  # the hub bounds its own drain
        except subprocess.TimeoutExpired:
            log.warning("mpevent hub %d did not stop in time; killing it", hub.pid)
            hub.kill()
            hub.wait()
    _release(seg, doorbells)


def _release(seg: Segment, doorbells: list[Doorbell]) -> None:
    for bell in doorbells:
        bell.close()
    seg.close()
