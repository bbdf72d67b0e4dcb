"""Routing: the subscription table the hub stored, turned into per-event routes.

Pure: no sockets, no segment, no clock. The sender's loop hands
:func:`route` the table's routes, the time, the routing it had and two
factories (one opens the endpoint of a new destination, one makes the
counters of a new subscription); it gets back the new :class:`Routing`
and what nothing uses any more: endpoints to close, counters to store a
last time. The tests drive it with fake factories.

Rules:

* an expired subscription (its deadline has passed) is never routed to,
  even before the hub removes it; the earliest deadline still ahead is when
  the loop must route again;
* subscriptions to one destination share one endpoint (one socket, one
  backlog, so the destination gets its datagrams in order), each with its
  own counters;
* a subscription keeps its counters while its slot keeps its id (a
  refreshed subscription counts on); a slot taken by a new subscription id
  gets new counters, and the old ones are not stored again (the slot's
  counter block is the new subscription's now);
* an endpoint lives as long as some live subscription uses its destination.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, Protocol, TypeVar

from mpevent.protocol.destination import Destination
from mpevent.protocol.registry import Route


class Counters(Protocol):
    sub_id: int  # the subscription they count for


E = TypeVar("E")  # an endpoint
S = TypeVar("S", bound=Counters)


@dataclass
class Routing(Generic[E, S]):
    """Where each event's datagrams go, and what the sender holds for that."""

    #: By event id: (endpoint, counters) of each live subscription.
    by_event: list[list[tuple[E, S]]] = field(default_factory=list)
    endpoints: dict[Destination, E] = field(default_factory=dict)
    counters: dict[int, S] = field(default_factory=dict)  # by subscription slot
    next_deadline_ns: int = 0  # when the next subscription expires; 0: none will


class Rerouted(NamedTuple, Generic[E, S]):
    routing: Routing[E, S]
    closed: list[E]  # endpoints no live subscription uses: close them
    retired: list[S]  # counters of subscriptions gone: store them a last time


def route(
    table: list[Route],
    events: int,
    now_ns: int,
    previous: Routing[E, S],
    open_endpoint: Callable[[Destination], E],
    open_counters: Callable[[Route], S],
) -> Rerouted[E, S]:
    """Route ``table`` at ``now_ns`` for events ``0..events-1`` (the ones the
    sender has names for; a route of a later event gets its endpoint and
    counters, and is routed once the sender knows the event)."""
    by_event: list[list[tuple[E, S]]] = [[] for _ in range(events)]
    endpoints: dict[Destination, E] = {}
    counters: dict[int, S] = {}
    next_deadline = 0
    for r in table:
        if r.deadline_ns:
            if r.deadline_ns <= now_ns:
                continue  # expired
            if not next_deadline or r.deadline_ns < next_deadline:
                next_deadline = r.deadline_ns
        stats = previous.counters.get(r.slot)
        if stats is None or stats.sub_id != r.sub_id:
            stats = open_counters(r)
        counters[r.slot] = stats
        dest = r.destination
        ep = endpoints.get(dest)
        if ep is None:
            ep = previous.endpoints.get(dest)
            if ep is None:
                ep = open_endpoint(dest)
            endpoints[dest] = ep
        if r.event_id < events:
            by_event[r.event_id].append((ep, stats))
    closed = [ep for dest, ep in previous.endpoints.items() if dest not in endpoints]
    retired = [stats for slot, stats in previous.counters.items() if slot not in counters]
    return Rerouted(Routing(by_event, endpoints, counters, next_deadline), closed, retired)
