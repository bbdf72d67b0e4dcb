"""Routing: the subscription table into per-event routes, without sockets.

:func:`mpevent.processes.sender.routing.route` is pure: these tests give it
tables of routes, a clock they choose and fake factories that record what
the sender's loop would have opened, the way ``tests/test_mi.py`` drives the
MI with a fake hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mpevent.processes.sender.routing import Rerouted, Routing, route
from mpevent.protocol.destination import Destination, parse_destination
from mpevent.protocol.registry import NS, Route

UDP_A = parse_destination("udp:127.0.0.1:9001")
UDP_B = parse_destination("udp:127.0.0.1:9002")
UNIX_C = parse_destination("unix:/tmp/mpevent-routing-test.sock")


@dataclass(eq=False)
class FakeEndpoint:
    destination: Destination


@dataclass(eq=False)
class FakeCounters:
    slot: int
    sub_id: int


@dataclass
class Factories:
    """The loop's two factories, recording every call."""

    opened: list[Destination] = field(default_factory=list)
    counted: list[tuple[int, int]] = field(default_factory=list)  # (slot, sub id)

    def endpoint(self, dest: Destination) -> FakeEndpoint:
        self.opened.append(dest)
        return FakeEndpoint(dest)

    def counters(self, r: Route) -> FakeCounters:
        self.counted.append((r.slot, r.sub_id))
        return FakeCounters(r.slot, r.sub_id)


def sub(slot: int, sub_id: int, event_id: int, dest: Destination, deadline_ns: int = 0) -> Route:
    return Route(slot, sub_id, event_id, dest.spec(), deadline_ns)


def reroute(
    table: list[Route], previous: Routing | None = None, *, events: int = 3, now: int = 10 * NS
) -> tuple[Rerouted, Factories]:
    made = Factories()
    got = route(table, events, now, previous or Routing(), made.endpoint, made.counters)
    return got, made


def destinations(routing: Routing, event_id: int) -> list[Destination]:
    return [ep.destination for ep, _ in routing.by_event[event_id]]


def test_each_event_gets_its_subscriptions_and_nothing_else() -> None:
    (routing, closed, retired), made = reroute(
        [sub(0, 1, 0, UDP_A), sub(1, 2, 2, UDP_B), sub(2, 3, 2, UNIX_C)]
    )
    assert destinations(routing, 0) == [UDP_A]
    assert destinations(routing, 1) == []
    assert destinations(routing, 2) == [UDP_B, UNIX_C]
    assert made.opened == [UDP_A, UDP_B, UNIX_C]
    assert made.counted == [(0, 1), (1, 2), (2, 3)]
    assert closed == [] and retired == []
    assert routing.next_deadline_ns == 0  # all permanent


def test_subscriptions_to_one_destination_share_its_endpoint_not_their_counters() -> None:
    (routing, _, _), made = reroute([sub(0, 1, 0, UDP_A), sub(1, 2, 1, UDP_A)])
    assert made.opened == [UDP_A]  # one socket, one backlog: its order is kept
    (ep0, stats0), (ep1, stats1) = routing.by_event[0][0], routing.by_event[1][0]
    assert ep0 is ep1
    assert stats0 is not stats1 and (stats0.slot, stats1.slot) == (0, 1)


def test_an_endpoint_lives_while_any_subscription_uses_its_destination() -> None:
    (first, _, _), _ = reroute([sub(0, 1, 0, UDP_A), sub(1, 2, 1, UDP_A)])
    endpoint = first.endpoints[UDP_A]
    # One of the two goes: the endpoint stays, the other's counters are stored a last time.
    (second, closed, retired), made = reroute([sub(1, 2, 1, UDP_A)], first)
    assert made.opened == [] and closed == []
    assert second.endpoints[UDP_A] is endpoint
    assert retired == [first.counters[0]]
    assert destinations(second, 0) == []
    # The last one goes: now the endpoint is closed.
    (third, closed, retired), _ = reroute([], second)
    assert closed == [endpoint] and retired == [second.counters[1]]
    assert third.endpoints == {} and third.counters == {}


def test_expired_subscriptions_are_never_routed_and_the_next_deadline_is_the_earliest() -> None:
    now = 100 * NS
    table = [
        sub(0, 1, 0, UDP_A, deadline_ns=now - 1),  # expired, the hub has not removed it yet
        sub(1, 2, 0, UDP_B, deadline_ns=now),  # expires exactly now: gone too
        sub(2, 3, 0, UNIX_C, deadline_ns=now + 7 * NS),
        sub(3, 4, 1, UNIX_C, deadline_ns=now + 3 * NS),
        sub(4, 5, 1, UDP_A),  # permanent
    ]
    (routing, _, _), made = reroute(table, now=now)
    assert destinations(routing, 0) == [UNIX_C]
    assert destinations(routing, 1) == [UNIX_C, UDP_A]
    assert made.counted == [(2, 3), (3, 4), (4, 5)]  # no counters for the expired
    assert routing.next_deadline_ns == now + 3 * NS
    # At that deadline the loop routes the same table again: one more is gone.
    (later, closed, retired), _ = reroute(table, routing, now=routing.next_deadline_ns)
    assert destinations(later, 1) == [UDP_A]
    assert [s.sub_id for s in retired] == [4]
    assert closed == []  # UNIX_C still serves event 0
    assert later.next_deadline_ns == now + 7 * NS
    (last, closed, _), _ = reroute(table, later, now=later.next_deadline_ns)
    assert closed == [routing.endpoints[UNIX_C]]
    assert last.next_deadline_ns == 0
    assert destinations(last, 0) == [] and destinations(last, 1) == [UDP_A]


def test_a_refreshed_subscription_keeps_its_counters() -> None:
    (first, _, _), _ = reroute([sub(0, 1, 0, UDP_A, deadline_ns=20 * NS)])
    (second, _, retired), made = reroute([sub(0, 1, 0, UDP_A, deadline_ns=80 * NS)], first)
    assert made.counted == [] and retired == []
    assert second.counters[0] is first.counters[0]
    assert second.next_deadline_ns == 80 * NS


def test_a_slot_taken_by_a_new_subscription_gets_new_counters_and_the_old_are_not_stored() -> None:
    (first, _, _), _ = reroute([sub(5, 1, 0, UDP_A)])
    old = first.counters[5]
    # The hub freed slot 5 and gave it to another subscription (another id).
    (second, closed, retired), made = reroute([sub(5, 9, 1, UDP_B)], first)
    assert made.counted == [(5, 9)]
    new = second.counters[5]
    assert new is not old and new.sub_id == 9
    # Storing the old counters now would write over the new subscription's block.
    assert retired == []
    assert closed == [first.endpoints[UDP_A]]
    assert destinations(second, 0) == [] and destinations(second, 1) == [UDP_B]


def test_a_route_of_an_event_the_sender_has_no_name_for_yet_waits_for_it() -> None:
    table = [sub(0, 1, 4, UDP_A)]
    (routing, _, _), made = reroute(table, events=2)
    assert len(routing.by_event) == 2 and made.opened == [UDP_A]
    (routing, _, _), made = reroute(table, routing, events=5)
    assert destinations(routing, 4) == [UDP_A]
    assert made.opened == [] and made.counted == []


def test_destinations_are_compared_by_address_not_by_spelling() -> None:
    same = parse_destination("udp:127.0.0.1:9001")
    assert same == UDP_A and same is not UDP_A
    (routing, _, _), made = reroute([sub(0, 1, 0, UDP_A), sub(1, 2, 1, same)])
    assert made.opened == [UDP_A]
    assert routing.by_event[0][0][0] is routing.by_event[1][0][0]
