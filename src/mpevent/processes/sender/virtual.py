"""A virtual destination (OpenSIPS event_virtual): members under one subscription.

``virtual:POLICY member1 member2 ...`` groups destinations of any other
kind under one subscription and one expire. The :class:`VirtualEndpoint`
holds one endpoint per member (its own, not shared with plain subscriptions
to the same address) and hands each event to them by the policy:

* ``PARALLEL``: every member gets every event;
* ``ROUND-ROBIN``: each event goes to the next member in turn;
* ``FAILOVER``: each event goes to the first member in the current order;
  a member that fails it (refused, path gone, not connected, broker down,
  a reliable-mode error or timeout) goes to the back of the order, and the
  event goes on to the next member, until one takes it or each has failed
  it once. Members are opened with ``hold_while_down=False`` so that one
  that is down fails at once instead of keeping the event for later.

Each member counts in its own counter block (member ``i`` of the
subscription's slot): routed, then sent, failed, dropped or pending, as
any destination. The whole is their sum (:mod:`mpevent.shm.counters`), so
an event that failed over is routed once in each member it tried.

The loop watches and ticks the members themselves (:meth:`parts`): each
has its own descriptor and timers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mpevent.processes.sender.accounts import Ledger, PerMessage, SubscriptionStats
from mpevent.processes.sender.batch import LaneBatch, Message
from mpevent.processes.sender.endpoints import Endpoint, Failed
from mpevent.protocol.destination import Destination, VirtualDestination

#: Opens a member's endpoint: (destination, hold_while_down, on_failed).
OpenMember = Callable[[Destination, bool, Failed | None], Endpoint]


class VirtualEndpoint(Endpoint):
    """One virtual destination: its members' endpoints and the policy's state."""

    __slots__ = ("destination", "members", "next_member", "order")

    def __init__(self, destination: VirtualDestination, open_member: OpenMember):
        self.destination = destination
        failover = destination.policy == "FAILOVER"
        self.members: list[Endpoint] = [
            open_member(m, not failover, self._failed_over if failover else None)
            for m in destination.group
        ]
        self.order = list(range(len(self.members)))  # FAILOVER: who is tried first
        self.next_member = 0  # ROUND-ROBIN: who gets the next event

    def send(self, batch: LaneBatch, messages: Sequence[int], ledger: Ledger) -> None:
        policy = self.destination.policy
        if policy == "PARALLEL":
            for i, ep in enumerate(self.members):
                ep.send(batch, messages, ledger.member(i))
        elif policy == "FAILOVER":
            first = self.order[0]
            self.members[first].send(batch, messages, ledger.member(first))
        else:
            self._round_robin(batch, messages, ledger)

    def _round_robin(self, batch: LaneBatch, messages: Sequence[int], ledger: Ledger) -> None:
        n = len(self.members)
        turns: list[list[int]] = [[] for _ in range(n)]  # positions k in messages, per member
        for k in range(len(messages)):
            turns[(self.next_member + k) % n].append(k)
        self.next_member = (self.next_member + len(messages)) % n
        for i, ks in enumerate(turns):
            if not ks:
                continue
            mine = [messages[k] for k in ks]
            batch.pack(mine)
            member_ledger = ledger.member(i)
            self.members[i].send(batch, mine, PerMessage([member_ledger.owner(k) for k in ks]))
        batch.pack(messages)  # as the loop packed it, for the destinations after this one

    def _failed_over(self, message: Message, owner: SubscriptionStats, code: int) -> None:
        """Member ``owner.index`` failed ``message`` (counted): it goes to the
        back, and the message to the next member, unless each has tried it."""
        failed = owner.index
        if self.order[0] == failed:
            self.order.append(self.order.pop(0))
        tries = message.tries + 1
        if tries >= len(self.members) or owner.group is None:
            return  # every member failed it: counted failed in each
        following = self.order[0] if self.order[0] != failed else self.order[1]
        self.members[following].send_message(
            message._replace(tries=tries), owner.group.members[following]
        )

    def parts(self) -> tuple[Endpoint, ...]:
        return tuple(p for ep in self.members for p in ep.parts())

    def idle(self) -> bool:
        return all(ep.idle() for ep in self.members)

    def wants(self) -> tuple[int, int] | None:
        return None  # the loop watches the members (parts)

    def due_ns(self) -> int:
        """The earliest of the members' (the loop then watches them all)."""
        return min((d for ep in self.members if (d := ep.due_ns())), default=0)

    def ready(self, revents: int) -> None:
        pass

    def close(self) -> None:
        for ep in self.members:
            ep.close()
