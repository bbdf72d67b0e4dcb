"""Declared events and their subscriptions: the hub's state, as pure logic.

This is the model OpenSIPS's Event Interface keeps: a list of declared
events (ids given in order of declaration, never reused) and, per event, the
subscribers, each a destination with an expire time. (Users declare an event
with ``publish_event``, the MI's ``event_publish``: those names are
OpenSIPS's and the public API's.) No I/O: time comes in as
an argument (monotonic nanoseconds), so expiry is tested without sleeping.

Rules, as OpenSIPS:

* subscribing an existing (event, destination) pair refreshes it: new expire,
  new start time; the subscription keeps its slot and its counters;
* ``expire`` is seconds; ``None`` means permanent; ``0`` unsubscribes;
  negative is an error;
* an expired subscription is removed and never sent to.

Each subscription has a slot (index of its counters in shared memory) and an
id unique for the life of the registry, so a sender can tell a reused slot
from the subscription that had it before.

Broker destinations (``rabbitmq:``, alone or as members of a virtual one)
are published by relay processes, one per destination: the registry gives
each distinct broker destination a relay slot (``0 .. max_relays - 1``) when
its first subscription comes, and frees it when its last one goes. A
subscription that would need a relay when none is free is refused.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from mpevent.protocol.destination import Destination, from_spec
from mpevent.protocol.payload import check_event_name

DEFAULT_EXPIRE = 3600
NS = 1_000_000_000


class RegistryError(ValueError):
    """A request the registry refuses; ``code`` is the OpenSIPS MI error code."""

    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.code = code


class Route(msgspec.Struct, array_like=True, frozen=True):
    """What a sender needs of one subscription (stored in the segment's table)."""

    slot: int
    sub_id: int
    event_id: int
    socket: str  # the destination's spec(): canonical, secrets included
    deadline_ns: int  # 0: never expires

    @property
    def destination(self) -> Destination:
        return from_spec(self.socket)


class Snapshot(msgspec.Struct, array_like=True):
    """The whole subscription table as the hub stores it in the segment.

    It carries no version of its own: the table's sequence word in the
    segment (:mod:`mpevent.shm.table`) is what changes with every store.
    """

    routes: list[Route]
    # By relay slot: the spec() of the broker destination it publishes to; "": free.
    relays: list[str] = msgspec.field(default_factory=list)


class Subscription(msgspec.Struct):
    slot: int
    sub_id: int
    event_id: int
    destination: Destination
    expire: int | None  # seconds as asked; None: permanent
    start_ns: int
    deadline_ns: int  # 0: never

    def ttl(self, now_ns: int) -> int | None:
        if not self.deadline_ns:
            return None
        return max(0, (self.deadline_ns - now_ns + NS - 1) // NS)

    def route(self) -> Route:
        return Route(
            self.slot, self.sub_id, self.event_id, self.destination.spec(), self.deadline_ns
        )


class Registry:
    """Events and subscriptions, with limits fixed by the segment's geometry."""

    def __init__(
        self,
        max_events: int,
        max_subs: int,
        max_subs_per_event: int | None = None,
        max_relays: int = 0,
    ):
        self.max_events = max_events
        self.max_subs = max_subs
        self.max_subs_per_event = max_subs_per_event or max_subs
        # By relay slot: the broker destination it serves, or None.
        self.relays: list[Destination | None] = [None] * max_relays
        self.events: list[str] = []
        self._event_ids: dict[str, int] = {}
        self._subs: dict[tuple[int, Destination], Subscription] = {}
        self._free_slots = list(range(max_subs - 1, -1, -1))
        self._next_sub_id = 1

    # -- events -----------------------------------------------------------

    def declare(self, name: str) -> int:
        """Declare an event (idempotent) and return its id."""
        event_id = self._event_ids.get(name)
        if event_id is not None:
            return event_id
        check_event_name(name)
        if len(self.events) >= self.max_events:
            raise RegistryError(
                f"cannot publish {name!r}: all {self.max_events} event ids in use "
                "(segment.max_events)"
            )
        event_id = len(self.events)
        self.events.append(name)
        self._event_ids[name] = event_id
        return event_id

    def event_id(self, name: str) -> int:
        try:
            return self._event_ids[name]
        except (KeyError, TypeError):
            raise RegistryError(f"event {name!r} is not published", code=404) from None

    # -- subscriptions ----------------------------------------------------

    def subscribe(
        self, event: str, destination: Destination, expire: int | None, now_ns: int
    ) -> Subscription | None:
        """Add or refresh; ``expire == 0`` removes. Returns the subscription."""
        event_id = self.event_id(event)
        if expire is not None:
            if isinstance(expire, bool) or not isinstance(expire, int):
                raise RegistryError(f"expire must be an integer, not {expire!r}", code=-32602)
            if expire < 0:
                raise RegistryError(f"expire must not be negative, got {expire}", code=-32602)
            if expire == 0:
                self.unsubscribe(event, destination)
                return None
        key = (event_id, destination)
        deadline = 0 if expire is None else now_ns + expire * NS
        sub = self._subs.get(key)
        if sub is not None:
            sub.expire, sub.start_ns, sub.deadline_ns = expire, now_ns, deadline
        else:
            if sum(1 for k in self._subs if k[0] == event_id) >= self.max_subs_per_event:
                raise RegistryError(
                    f"event {event!r} already has {self.max_subs_per_event} subscribers "
                    "(security.max_subs_per_event)"
                )
            if not self._free_slots:
                raise RegistryError(
                    f"all {self.max_subs} subscription slots in use (segment.max_subs)"
                )
            self._assign_relays(destination)
            sub = Subscription(
                self._free_slots.pop(),
                self._next_sub_id,
                event_id,
                destination,
                expire,
                now_ns,
                deadline,
            )
            self._next_sub_id += 1
            self._subs[key] = sub
        return sub

    def unsubscribe(self, event: str, destination: Destination) -> bool:
        sub = self._subs.pop((self.event_id(event), destination), None)
        if sub is None:
            return False
        self._free_slots.append(sub.slot)
        self._release_relays()
        return True

    def expire(self, now_ns: int) -> list[Subscription]:
        """Remove and return the subscriptions whose time is up."""
        gone = [s for s in self._subs.values() if s.deadline_ns and s.deadline_ns <= now_ns]
        for sub in gone:
            del self._subs[(sub.event_id, sub.destination)]
            self._free_slots.append(sub.slot)
        if gone:
            self._release_relays()
        return gone

    # -- broker relays ------------------------------------------------------

    def relay_of(self, destination: Destination) -> int | None:
        """The relay slot publishing to broker destination ``destination``."""
        try:
            return self.relays.index(destination)
        except ValueError:
            return None

    def _assign_relays(self, destination: Destination) -> None:
        """Give each broker destination of ``destination`` a relay, or refuse
        the subscription (before anything changed) when there are too few."""
        needed = [m for m in destination.members() if m.relayed and self.relay_of(m) is None]
        free = [slot for slot, d in enumerate(self.relays) if d is None]
        if len(needed) > len(free):
            in_use = len(self.relays) - len(free)
            raise RegistryError(
                f"cannot subscribe {destination}: it needs {len(needed)} more broker relay(s), "
                f"and {in_use} of the {len(self.relays)} (segment.relays) serve other "
                "broker destinations"
            )
        for slot, member in zip(free, needed, strict=False):
            self.relays[slot] = member

    def _release_relays(self) -> None:
        """Free the relays no subscription's destination uses any more."""
        used = {m for sub in self._subs.values() for m in sub.destination.members() if m.relayed}
        for slot, d in enumerate(self.relays):
            if d is not None and d not in used:
                self.relays[slot] = None

    def next_deadline(self) -> int | None:
        deadlines = [s.deadline_ns for s in self._subs.values() if s.deadline_ns]
        return min(deadlines, default=None)

    def subscriptions(self, event_id: int | None = None) -> Iterator[Subscription]:
        for sub in self._subs.values():
            if event_id is None or sub.event_id == event_id:
                yield sub

    def find(self, event: str, destination: Destination) -> Subscription | None:
        return self._subs.get((self.event_id(event), destination))

    def counts(self) -> list[int]:
        """Live subscribers per event id (the producers' probe)."""
        counts = [0] * len(self.events)
        for event_id, _ in self._subs:
            counts[event_id] += 1
        return counts

    def snapshot(self) -> Snapshot:
        return Snapshot(
            [s.route() for s in self._subs.values()],
            ["" if d is None else d.spec() for d in self.relays],
        )
