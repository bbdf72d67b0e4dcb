"""The registry's rules, without processes: time is an argument."""

from __future__ import annotations

import pytest

from mpevent.protocol.destination import parse_destination
from mpevent.protocol.registry import NS, Registry, RegistryError

A = parse_destination("udp:127.0.0.1:8081")
B = parse_destination("unix:/tmp/b.sock")


def make() -> Registry:
    reg = Registry(max_events=4, max_subs=3, max_subs_per_event=2)
    reg.declare("E_A")
    reg.declare("E_B")
    return reg


def test_declare_is_idempotent_and_ids_follow_order():
    reg = make()
    assert reg.declare("E_A") == 0
    assert reg.declare("E_C") == 2
    assert reg.events == ["E_A", "E_B", "E_C"]


def test_declare_limits_and_names():
    reg = make()
    reg.declare("E_C")
    reg.declare("E_D")
    with pytest.raises(RegistryError, match="all 4 event ids"):
        reg.declare("E_E")
    with pytest.raises(ValueError, match="characters"):
        make().declare("bad name")


def test_subscribe_refresh_keeps_slot_and_sets_new_expire():
    reg = make()
    first = reg.subscribe("E_A", A, 10, now_ns=0)
    again = reg.subscribe("E_A", A, 20, now_ns=5 * NS)
    assert again is first
    assert again.slot == first.slot
    assert again.deadline_ns == 25 * NS
    assert again.start_ns == 5 * NS
    assert again.ttl(6 * NS) == 19
    assert reg.counts() == [1, 0]


def test_expire_removes_exactly_on_time():
    reg = make()
    reg.subscribe("E_A", A, 10, now_ns=0)
    reg.subscribe("E_A", B, None, now_ns=0)
    assert reg.expire(10 * NS - 1) == []
    gone = reg.expire(10 * NS)
    assert [s.destination for s in gone] == [A]
    assert [s.destination for s in reg.subscriptions()] == [B]
    assert reg.next_deadline() is None  # B is permanent


def test_expire_zero_unsubscribes_and_negative_is_an_error():
    reg = make()
    reg.subscribe("E_A", A, 10, now_ns=0)
    assert reg.subscribe("E_A", A, 0, now_ns=0) is None
    assert reg.counts() == [0, 0]
    with pytest.raises(RegistryError) as err:
        reg.subscribe("E_A", A, -1, now_ns=0)
    assert err.value.code == -32602


def test_unknown_event_is_404():
    with pytest.raises(RegistryError) as err:
        make().subscribe("E_NOPE", A, 10, now_ns=0)
    assert err.value.code == 404


def test_limits_per_event_and_in_total_and_slot_reuse():
    reg = make()
    reg.subscribe("E_A", A, 10, now_ns=0)
    reg.subscribe("E_A", B, 10, now_ns=0)
    with pytest.raises(RegistryError, match="max_subs_per_event"):
        reg.subscribe("E_A", parse_destination("udp:127.0.0.1:9"), 10, now_ns=0)
    third = reg.subscribe("E_B", A, 10, now_ns=0)
    with pytest.raises(RegistryError, match="max_subs"):
        reg.subscribe("E_B", B, 10, now_ns=0)
    reg.unsubscribe("E_B", A)
    fourth = reg.subscribe("E_B", B, 10, now_ns=0)
    assert fourth.slot == third.slot  # the slot is reused...
    assert fourth.sub_id != third.sub_id  # ...by a different subscription


def test_snapshot_carries_what_senders_need():
    reg = make()
    reg.subscribe("E_B", B, 10, now_ns=NS)
    (route,) = reg.snapshot().routes
    assert route.event_id == 1
    assert route.destination == B
    assert route.deadline_ns == 11 * NS
    assert route.destination.sockaddr == "/tmp/b.sock"
