"""The management interface: the pure method table, then the three real transports.

Part 1 drives :func:`mpevent.protocol.mi.handle` with a fake hub (a real Registry, a
fake clock): every method OpenSIPS's tools call and mpevent's ``event_publish``,
params as an array and as an object, the exact result shapes and every JSON-RPC error path,
every OpenSIPS 4.x name against its alias (the same replies and effects), plus a
property: no input makes it raise or answer something that is not a
JSON-RPC 2.0 response.

Part 2 talks to a real ``mpevent serve`` over UDP, UNIX and HTTP; part 3
checks subscription expiry and refresh against real sockets.
"""

from __future__ import annotations

import os
import socket
import stat
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import OPENSIPS_MI_METHODS, UdpSink, wait_for

from mpevent.protocol import mi
from mpevent.protocol.destination import parse_destination
from mpevent.protocol.payload import PayloadError
from mpevent.protocol.policy import DestinationPolicy
from mpevent.protocol.registry import NS, Registry

# The version the MI reports is the package's, as pyproject.toml says it.
VERSION = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
    "version"
]

# -- part 1: the pure method table ---------------------------------------------


STATS = {
    "mpevent:raised": 7,
    "mpevent:sent": 5,
    "event:E_A.raised": 4,
    "event:E_A.sent": 3,
    "destination:E_A@udp:127.0.0.1:9000.sent": 3,
}


class FakeHub:
    """HubState with a real Registry, a clock the test moves and recorded effects."""

    def __init__(self) -> None:
        self.registry = Registry(8, 16)
        self.policy = DestinationPolicy()
        self.started = time.time() - 42
        self.clock = 1_000 * NS
        self.stores = 0
        self.fail_stores = 0  # the next N stores raise ValueError (table too large)
        self.raised: list[tuple[str, Any]] = []
        self.reset: list[list[str]] = []

    def now_ns(self) -> int:
        return self.clock

    def store_table(self) -> None:
        self.stores += 1
        if self.fail_stores:
            self.fail_stores -= 1
            raise ValueError("subscription table needs 9999 bytes")

    def raise_event(self, event: str, params: Any) -> bool:
        if isinstance(params, dict) and "reject" in params:
            raise PayloadError("params rejected")
        self.raised.append((event, params))
        return any(True for _ in self.registry.subscriptions(self.registry.event_id(event)))

    def statistics(self) -> dict[str, int]:
        return dict(STATS)

    def reset_statistics(self, names: list[str]) -> None:
        self.reset.append(names)

    def processes(self) -> list[dict[str, Any]]:
        return [{"ID": 0, "PID": 1234, "Type": "hub", "CPU": 0.5, "RSS": 1 << 20}]


@pytest.fixture
def hub() -> FakeHub:
    h = FakeHub()
    h.registry.declare("E_A")
    h.registry.declare("E_B")
    return h


_ABSENT = object()


def request(method: str, params: Any = _ABSENT, req_id: Any = 1) -> bytes:
    req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": req_id}
    if params is not _ABSENT:
        req["params"] = params
    return orjson.dumps(req)


def reply(hub: FakeHub, method: str, params: Any = _ABSENT, req_id: Any = 1) -> dict:
    raw = mi.handle(hub, request(method, params, req_id))
    assert raw is not None
    out = orjson.loads(raw)
    assert out["jsonrpc"] == "2.0" and out["id"] == req_id, out
    return out


def ok(hub: FakeHub, method: str, params: Any = _ABSENT) -> Any:
    out = reply(hub, method, params)
    assert set(out) == {"jsonrpc", "result", "id"}, out
    return out["result"]


def err(hub: FakeHub, method: str, params: Any = _ABSENT) -> tuple[int, str]:
    out = reply(hub, method, params)
    assert set(out) == {"jsonrpc", "error", "id"}, out
    return out["error"]["code"], out["error"]["message"]


def raw_error(hub: FakeHub, raw: bytes) -> tuple[int, Any]:
    out = orjson.loads(mi.handle(hub, raw))
    assert set(out) == {"jsonrpc", "error", "id"} and out["jsonrpc"] == "2.0", out
    return out["error"]["code"], out["id"]


def args(form: str, **named: Any) -> Any:
    """The same params as an array (in order) or as an object."""
    return list(named.values()) if form == "array" else named


FORMS = pytest.mark.parametrize("form", ["array", "object"])


# OpenSIPS 4.x names and the older names 4.x keeps as aliases (mi/mi_core.c and
# statistics.c on OpenSIPS master), and mpevent's own method, namespaced the same way.
NAMES_4X = [
    ("evi:subscribe", "event_subscribe"),
    ("evi:list", "events_list"),
    ("evi:subscribers", "subscribers_list"),
    ("evi:raise", "raise_event"),
    ("statistics:get", "get_statistics"),
    ("statistics:list", "list_statistics"),
    ("statistics:reset", "reset_statistics"),
    ("statistics:reset_all", "reset_all_statistics"),
    ("core:uptime", "uptime"),
    ("core:version", "version"),
    ("core:which", "which"),
    ("core:ps", "ps"),
    ("evi:publish", "event_publish"),
]


def test_which_lists_every_opensips_method(hub):
    names = ok(hub, "which")
    assert names == sorted(mi.METHODS)
    assert set(names) >= OPENSIPS_MI_METHODS
    # Both names of every method, each once: opensips-cli runs only what which lists.
    assert set(names) == {name for pair in NAMES_4X for name in pair}
    assert len(names) == 2 * len(NAMES_4X)
    assert ok(hub, "which", []) == ok(hub, "which", {}) == ok(hub, "core:which") == names


@pytest.mark.parametrize(("name", "alias"), NAMES_4X)
def test_an_alias_is_the_same_method(name, alias):
    """One entry of the table under two keys: nothing to keep in step."""
    assert mi.METHODS[alias] is mi.METHODS[name]
    assert (mi.METHODS[name].name, mi.METHODS[name].aliases) == (name, (alias,))


def test_which_command_gives_params_and_groups(hub):
    recipes = [["event", "socket"], ["event", "socket", "expire"]]
    assert ok(hub, "which", ["evi:subscribe"]) == recipes
    assert ok(hub, "core:which", {"command": "event_subscribe"}) == recipes
    assert ok(hub, "which", ["subscribers_list"]) == [[], ["event"], ["event", "socket"]]
    assert ok(hub, "which", ["core:version"]) == [[]]
    assert ok(hub, "which", ["statistics:reset"]) == [["statistics"]]
    # OpenSIPS 4: which command=GROUP: lists the group's commands, by their 4.x names.
    assert ok(hub, "which", ["evi:"]) == [
        "evi:list",
        "evi:publish",
        "evi:raise",
        "evi:subscribe",
        "evi:subscribers",
    ]
    assert ok(hub, "which", {"command": "statistics:"}) == [
        "statistics:get",
        "statistics:list",
        "statistics:reset",
        "statistics:reset_all",
    ]
    assert ok(hub, "which", ["core:"]) == ["core:ps", "core:uptime", "core:version", "core:which"]
    assert err(hub, "which", ["no_such_command"]) == (404, "unknown MI command")
    assert err(hub, "which", ["nope:"]) == (404, "unknown MI command group")
    assert err(hub, "which", [5])[0] == mi.INVALID_PARAMS


SOCK = "udp:127.0.0.1:9000"
# What each method is called with, in order, on one hub: results, errors and
# effects (a subscription of E_A to SOCK is there before the first call).
CALLS: dict[str, list[Any]] = {
    "evi:publish": [["E_NEW"], {"event": "E_NEW"}, ["E_A"], ["bad name!"], [], [5]],
    "evi:subscribe": [
        ["E_B", SOCK],
        {"event": "E_A", "socket": "udp:127.0.0.1:09000", "expire": "60"},
        ["E_NOPE", SOCK],
        ["E_A", SOCK, -1],
        ["E_A", "udp:127.0.0.1"],
        ["E_B", SOCK, 0],
        ["E_B", SOCK, 0],  # nothing left to remove: "OK", as OpenSIPS answers
    ],
    "evi:list": [_ABSENT, [], {}, ["x"]],
    "evi:subscribers": [
        _ABSENT,
        ["E_A"],
        {"event": "E_A", "socket": SOCK},
        ["E_B", SOCK],
        ["E_NOPE"],
        {"socket": SOCK},
    ],
    "evi:raise": [["E_A", '{"a": 1}'], {"event": "E_A", "params": ["x"]}, ["E_B"], ["E_NOPE"]],
    "statistics:get": [_ABSENT, [["mpevent:"]], {"statistics": "raised"}, [[1]]],
    "statistics:list": [_ABSENT, [["event:"]], [5]],
    "statistics:reset": [[["mpevent:sent"]], {"statistics": "event:"}, []],
    "statistics:reset_all": [_ABSENT, [], {}, ["x"]],
    "core:uptime": [_ABSENT, [], ["x"]],
    "core:version": [_ABSENT, {}],
    "core:which": [_ABSENT, ["evi:"], ["event_subscribe"], ["nope"]],
    "core:ps": [_ABSENT, []],
}


def _effects(hub: FakeHub) -> Any:
    subs = [(s.event_id, str(s.destination), s.expire) for s in hub.registry.subscriptions()]
    return hub.registry.events, subs, hub.raised, hub.reset, hub.stores


@pytest.mark.parametrize(("name", "alias"), NAMES_4X)
def test_the_4x_name_and_its_alias_answer_the_same(name, alias):
    assert set(CALLS) == {n for n, _ in NAMES_4X}  # every pair has its calls
    runs = []
    for called in (name, alias):
        hub = FakeHub()
        hub.started = 1_700_000_000.0
        hub.registry.declare("E_A")
        hub.registry.declare("E_B")
        hub.registry.subscribe("E_A", parse_destination(SOCK), 60, hub.clock)
        replies = []
        with mock.patch("time.time", return_value=1_700_000_100.0):
            for params in CALLS[name]:
                replies.append(reply(hub, called, params))
        runs.append((replies, _effects(hub)))
    assert runs[0] == runs[1]
    replies = runs[0][0]
    assert any("result" in r for r in replies), replies  # the calls did something


@FORMS
def test_event_publish_is_idempotent(hub, form):
    assert ok(hub, "event_publish", args(form, event="E_NEW")) == {"name": "E_NEW", "id": 2}
    assert ok(hub, "event_publish", args(form, event="E_NEW")) == {"name": "E_NEW", "id": 2}
    assert ok(hub, "event_publish", args(form, event="E_A")) == {"name": "E_A", "id": 0}
    code, msg = err(hub, "event_publish", args(form, event="bad name!"))
    assert code == 400 and "Bad parameter value" in msg


@FORMS
def test_events_list_shape(hub, form):
    params = [] if form == "array" else {}
    expected = {"Events": [{"name": "E_A", "id": 0}, {"name": "E_B", "id": 1}]}
    assert ok(hub, "events_list", params) == expected
    assert ok(hub, "events_list") == expected


@FORMS
def test_event_subscribe_default_expire_and_listing_shapes(hub, form):
    sock = "udp:127.0.0.1:9000"
    assert ok(hub, "event_subscribe", args(form, event="E_A", socket=sock)) == "OK"
    hub.clock += int(10.5 * NS)
    sub = {"socket": sock, "expire": 3600, "ttl": 3590}  # ttl rounds up
    assert ok(hub, "subscribers_list") == {
        "Events": [
            {"name": "E_A", "id": 0, "Subscribers": [sub]},
            {"name": "E_B", "id": 1, "Subscribers": []},
        ]
    }
    assert ok(hub, "subscribers_list", [] if form == "array" else {}) == ok(hub, "subscribers_list")
    assert ok(hub, "subscribers_list", args(form, event="E_A")) == {
        "Event": {"name": "E_A", "id": 0, "Subscribers": [sub]}
    }
    assert ok(hub, "subscribers_list", args(form, event="E_A", socket=sock)) == {
        "Event": {"name": "E_A", "id": 0, "Subscriber": sub}
    }
    # Another spelling of the same destination finds the same subscription.
    assert ok(hub, "subscribers_list", args(form, event="E_A", socket="udp:127.0.0.1:09000"))
    code, _ = err(hub, "subscribers_list", args(form, event="E_B", socket=sock))
    assert code == 404
    code, msg = err(hub, "subscribers_list", args(form, event="E_NOPE"))
    assert code == 400 and "Bad parameter value" in msg
    code, _ = err(hub, "subscribers_list", args(form, event="E_A", socket="udp:nope"))
    assert code == 400
    code, _ = err(hub, "subscribers_list", {"socket": sock})
    assert code == mi.INVALID_PARAMS


def test_permanent_subscription_lists_never(hub):
    hub.registry.subscribe("E_B", parse_destination("unix:/tmp/p.sock"), None, hub.clock)
    listed = ok(hub, "subscribers_list", ["E_B"])
    assert listed == {
        "Event": {
            "name": "E_B",
            "id": 1,
            "Subscribers": [{"socket": "unix:/tmp/p.sock", "expire": "never", "ttl": "never"}],
        }
    }


@FORMS
def test_event_subscribe_expire_rules(hub, form):
    sock = "/tmp/sub.sock"  # a bare path is a UNIX destination
    assert ok(hub, "event_subscribe", args(form, event="E_A", socket=sock, expire=60)) == "OK"
    [sub] = hub.registry.subscriptions()
    assert (sub.expire, str(sub.destination)) == (60, "unix:/tmp/sub.sock")
    # Subscribing again refreshes: same subscription, new expire and start.
    hub.clock += 30 * NS
    assert ok(hub, "event_subscribe", args(form, event="E_A", socket=sock, expire="120")) == "OK"
    [again] = hub.registry.subscriptions()
    assert again.slot == sub.slot and again.expire == 120 and again.start_ns == hub.clock
    # Negative, fractional, boolean or silly expires are invalid params.
    for bad in (-1, "-5", 1.5, True, "soon", 2**31, [1]):
        code, _ = err(hub, "event_subscribe", args(form, event="E_A", socket=sock, expire=bad))
        assert code == mi.INVALID_PARAMS, bad
    assert ok(hub, "subscribers_list", ["E_A", sock])["Event"]["Subscriber"]["expire"] == 120
    # 0 unsubscribes (and is fine when there is nothing to remove).
    assert ok(hub, "event_subscribe", args(form, event="E_A", socket=sock, expire=0)) == "OK"
    assert list(hub.registry.subscriptions()) == []
    assert ok(hub, "event_subscribe", args(form, event="E_A", socket=sock, expire=0)) == "OK"


@FORMS
def test_event_subscribe_bad_socket_or_event(hub, form):
    for sock in ("udp:127.0.0.1", "udp:127.0.0.1:0", "udp:127.0.0.1:70000", "tcp:1.2.3.4:5", ""):
        code, msg = err(hub, "event_subscribe", args(form, event="E_A", socket=sock))
        assert code == 400 and "Bad parameter value" in msg, sock
    code, msg = err(hub, "event_subscribe", args(form, event="E_NOPE", socket="udp:127.0.0.1:9"))
    assert code == 400 and "E_NOPE" in msg
    assert list(hub.registry.subscriptions()) == []


def test_event_subscribe_takes_every_transport_and_masks_passwords(hub):
    hub.registry = Registry(8, 16, max_relays=1)
    hub.registry.declare("E_A")
    broker = "rabbitmq:bob:s3cret@127.0.0.1/exchange=ev;persistent?key"
    for sock in (
        "tcp:127.0.0.1:9000/method;reliable;timeout=500",
        broker,
        f"virtual:FAILOVER tcp:127.0.0.1:9001\t{broker}  udp:127.0.0.1:9002",
    ):
        assert ok(hub, "event_subscribe", ["E_A", sock]) == "OK", sock
    listed = ok(hub, "subscribers_list", ["E_A"])["Event"]["Subscribers"]
    sockets = [s["socket"] for s in listed]
    assert sockets == [
        "tcp:127.0.0.1:9000/method;reliable;timeout=500",
        "rabbitmq:bob:***@127.0.0.1:5672/exchange=ev;persistent?key",
        "virtual:FAILOVER tcp:127.0.0.1:9001 rabbitmq:bob:***@127.0.0.1:5672/exchange=ev;"
        "persistent?key udp:127.0.0.1:9002",
    ]
    assert "s3cret" not in str(ok(hub, "subscribers_list", []))
    # The one relay serves that broker destination, for both subscriptions; another is refused.
    code, msg = err(hub, "event_subscribe", ["E_A", "rabbitmq:127.0.0.1/other"])
    assert code == 400 and "segment.relays" in msg
    # Unsubscribing by the full socket (password included) finds it.
    assert ok(hub, "event_subscribe", ["E_A", broker, 0]) == "OK"
    assert len(list(hub.registry.subscriptions())) == 2
    # Bad sockets of the new kinds name their problem, and never echo a password.
    for sock, problem in (
        ("tcp:127.0.0.1:9000;fast", "fast"),
        ("rabbitmq:bob:s3cret@127.0.0.1", "routing"),
        ("virtual:parallel udp:127.0.0.1:9", "uppercase"),
        ("tcp:10.1.2.3:9000", "allowed networks"),
    ):
        code, msg = err(hub, "event_subscribe", ["E_A", sock])
        assert code == 400 and problem in msg and "s3cret" not in msg, (sock, msg)


def test_event_subscribe_undone_when_the_table_does_not_fit(hub):
    sock = "udp:127.0.0.1:9000"
    hub.fail_stores = 1
    code, msg = err(hub, "event_subscribe", ["E_A", sock, 60])
    assert code == 400 and "Cannot subscribe" in msg
    assert list(hub.registry.subscriptions()) == []
    # A refresh whose table cannot be stored leaves the subscription as it was.
    assert ok(hub, "event_subscribe", ["E_A", sock, 60]) == "OK"
    hub.clock += 5 * NS
    hub.fail_stores = 1
    assert err(hub, "event_subscribe", ["E_A", sock, 999])[0] == 400
    [sub] = hub.registry.subscriptions()
    assert sub.expire == 60 and sub.deadline_ns == hub.clock - 5 * NS + 60 * NS


@FORMS
def test_raise_event_params_forms(hub, form):
    ok(hub, "event_subscribe", ["E_A", "udp:127.0.0.1:9000"])
    cases = [
        ({"ip": "10.0.0.1", "n": 3}, {"ip": "10.0.0.1", "n": 3}),
        ('{"ip": "10.0.0.1", "n": 3}', {"ip": "10.0.0.1", "n": 3}),  # the OpenSIPS form
        (["a", "b"], ["a", "b"]),
    ]
    for given_params, seen in cases:
        hub.raised.clear()
        assert ok(hub, "raise_event", args(form, event="E_A", params=given_params)) == "OK"
        assert hub.raised == [("E_A", seen)]
    hub.raised.clear()
    assert ok(hub, "raise_event", args(form, event="E_A")) == "OK"
    assert hub.raised == [("E_A", None)]


@FORMS
def test_raise_event_errors(hub, form):
    ok(hub, "event_subscribe", ["E_A", "udp:127.0.0.1:9000"])
    assert err(hub, "raise_event", args(form, event="E_NOPE")) == (404, "Event not registered")
    assert err(hub, "raise_event", args(form, event="E_B")) == (480, "Temporarily Unavailable")
    for bad in ("not json", "[1, 2]", '"str"', "[" * 30000, 5, True):
        code, msg = err(hub, "raise_event", args(form, event="E_A", params=bad))
        assert code == 400 and "Bad parameter value" in msg, bad
    code, _ = err(hub, "raise_event", args(form, event="E_A", params={"reject": 1}))
    assert code == 400
    assert err(hub, "raise_event", args(form, event=5))[0] == mi.INVALID_PARAMS


@FORMS
def test_statistics(hub, form):
    assert ok(hub, "get_statistics") == STATS
    assert ok(hub, "get_statistics", args(form, statistics=["all"])) == STATS
    assert ok(hub, "get_statistics", args(form, statistics=["mpevent:"])) == {
        "mpevent:raised": 7,
        "mpevent:sent": 5,
    }
    assert ok(hub, "get_statistics", args(form, statistics="mpevent:raised")) == {
        "mpevent:raised": 7
    }
    assert ok(hub, "get_statistics", args(form, statistics=["raised"])) == {"mpevent:raised": 7}
    assert ok(hub, "list_statistics", args(form, statistics=["event:"])) == {
        "event:E_A.raised": "non-incremental",
        "event:E_A.sent": "non-incremental",
    }
    assert ok(hub, "reset_statistics", args(form, statistics=["mpevent:sent"])) == "OK"
    assert hub.reset == [["mpevent:sent"]]
    assert err(hub, "reset_statistics")[0] == mi.INVALID_PARAMS
    assert err(hub, "get_statistics", args(form, statistics=[1]))[0] == mi.INVALID_PARAMS
    assert err(hub, "get_statistics", args(form, statistics=5))[0] == mi.INVALID_PARAMS


def test_reset_all_resets_every_statistic(hub):
    assert ok(hub, "statistics:reset_all") == "OK"
    assert hub.reset == [list(STATS)]
    assert ok(hub, "reset_all_statistics", []) == "OK"
    assert hub.reset == [list(STATS)] * 2
    assert err(hub, "statistics:reset_all", ["mpevent:sent"])[0] == mi.INVALID_PARAMS
    assert err(hub, "statistics:reset_all", {"statistics": ["all"]})[0] == mi.INVALID_PARAMS
    assert hub.reset == [list(STATS)] * 2


@FORMS
def test_process_facts(hub, form):
    empty = [] if form == "array" else {}
    assert ok(hub, "ps", empty) == {"Processes": hub.processes()}
    up = ok(hub, "uptime", empty)
    assert set(up) == {"Now", "Up since", "Up time"}
    assert 42 <= int(up["Up time"].split()[0]) < 100
    assert ok(hub, "version", empty) == {"Server": f"mpevent {VERSION}"}


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"{", b'{"jsonrpc":"2.0",', b"\xff\xfe", b"", b"[1,]", b'"\\ud800"', b"1e400"],
)
def test_parse_error(hub, raw):
    assert raw_error(hub, raw) == (mi.PARSE_ERROR, None)


@pytest.mark.parametrize(
    "req, req_id",
    [
        (1, None),
        ("which", None),
        (None, None),
        ({}, None),
        ({"method": "which", "id": 3}, 3),  # no jsonrpc
        ({"jsonrpc": "1.0", "method": "which", "id": 3}, 3),
        ({"jsonrpc": 2.0, "method": "which", "id": "x"}, "x"),
        ({"jsonrpc": "2.0", "id": 3}, 3),  # no method
        ({"jsonrpc": "2.0", "method": 5, "id": 3}, 3),
        ({"jsonrpc": "2.0", "method": "which", "id": [1]}, None),  # bad id types
        ({"jsonrpc": "2.0", "method": "which", "id": {"a": 1}}, None),
        ({"jsonrpc": "2.0", "method": "which", "id": True}, None),
    ],
)
def test_invalid_request(hub, req, req_id):
    assert raw_error(hub, orjson.dumps(req)) == (mi.INVALID_REQUEST, req_id)


def test_empty_batch_is_invalid(hub):
    assert raw_error(hub, b"[]") == (mi.INVALID_REQUEST, None)


def test_method_not_found_keeps_the_id(hub):
    out = reply(hub, "no_such_method", req_id="abc")
    assert out["error"]["code"] == mi.METHOD_NOT_FOUND
    assert reply(hub, "no_such_method", req_id=None)["error"]["code"] == mi.METHOD_NOT_FOUND


@pytest.mark.parametrize(
    "method, params",
    [
        # wrong types
        ("event_publish", [5]),
        ("event_subscribe", [1, 2]),
        ("event_subscribe", {"event": "E_A", "socket": 9}),
        ("subscribers_list", [5]),
        ("raise_event", {"event": ["E_A"]}),
        ("which", "all"),
        ("which", 5),
        # too many
        ("events_list", ["x"]),
        ("which", [1]),
        ("event_subscribe", ["E_A", "udp:127.0.0.1:9", 10, "extra"]),
        ("raise_event", ["E_A", {}, "extra"]),
        # unknown name
        ("events_list", {"verbose": 1}),
        ("event_subscribe", {"event": "E_A", "sock": "udp:127.0.0.1:9"}),
        # missing required
        ("event_subscribe", ["E_A"]),
        ("event_subscribe", {"socket": "udp:127.0.0.1:9"}),
        ("event_subscribe", {"event": "E_A", "socket": None}),
        ("event_publish", []),
        ("raise_event", {}),
        ("reset_statistics", []),
    ],
)
def test_invalid_params(hub, method, params):
    code, msg = err(hub, method, params)
    assert code == mi.INVALID_PARAMS and msg


def test_notifications_get_no_reply(hub):
    note = {"jsonrpc": "2.0", "method": "event_publish", "params": ["E_NOTE"]}
    assert mi.handle(hub, orjson.dumps(note)) is None
    assert "E_NOTE" in hub.registry.events  # it was still carried out
    for method, params in [("no_such_method", []), ("event_publish", [5]), ("raise_event", ["X"])]:
        note = {"jsonrpc": "2.0", "method": method, "params": params}
        assert mi.handle(hub, orjson.dumps(note)) is None, method


def test_batch(hub):
    batch = [
        {"jsonrpc": "2.0", "method": "version", "id": 1},
        {"jsonrpc": "2.0", "method": "event_publish", "params": ["E_C"]},  # notification
        7,
        {"jsonrpc": "2.0", "method": "nope", "id": "b"},
    ]
    out = orjson.loads(mi.handle(hub, orjson.dumps(batch)))
    assert [r["id"] for r in out] == [1, None, "b"]
    assert out[0]["result"] == {"Server": f"mpevent {VERSION}"}
    assert out[1]["error"]["code"] == mi.INVALID_REQUEST
    assert out[2]["error"]["code"] == mi.METHOD_NOT_FOUND
    assert "E_C" in hub.registry.events
    notes = [{"jsonrpc": "2.0", "method": "version"}] * 3
    assert mi.handle(hub, orjson.dumps(notes)) is None


def test_oversized_request(hub):
    body = request("version")
    padded = body + b" " * (mi.MAX_REQUEST - len(body))
    assert orjson.loads(mi.handle(hub, padded))["result"]
    assert raw_error(hub, padded + b" ") == (mi.INVALID_REQUEST, None)
    assert raw_error(hub, b"x" * (1 << 20)) == (mi.INVALID_REQUEST, None)


# -- the property: any input gives nothing or a JSON-RPC 2.0 response -------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["E_A", "E_B", "udp:127.0.0.1:9000", "/tmp/x.sock", "all", "-1", "0"])
)


def _containers_of(inner: st.SearchStrategy) -> st.SearchStrategy:
    """Lists and objects of ``inner``. A named function, not a lambda:
    hypothesis reads a lambda's source to check that it uses its argument,
    and under pytest misread this one (a HypothesisDeprecationWarning)."""
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


_json = st.recursive(
    _scalars,
    _containers_of,
    max_leaves=12,
)
_ids = st.none() | st.integers(-(2**31), 2**31) | st.text(max_size=8) | _json
_requests = st.fixed_dictionaries(
    {"method": st.sampled_from([*mi.METHODS, "nope"])},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]),
        "params": _json | st.lists(_scalars, max_size=4),
        "id": _ids,
    },
)
_inputs = (
    st.binary(max_size=200)
    | _json.map(orjson.dumps)
    | _requests.map(orjson.dumps)
    | st.lists(_requests | _json, max_size=4).map(orjson.dumps)
)


def _check_response(obj: Any, request: Any) -> None:
    assert isinstance(obj, dict) and obj.get("jsonrpc") == "2.0", obj
    assert set(obj) in ({"jsonrpc", "result", "id"}, {"jsonrpc", "error", "id"}), obj
    if "error" in obj:
        assert isinstance(obj["error"]["code"], int) and isinstance(obj["error"]["message"], str)
    req_id = request.get("id") if isinstance(request, dict) else None
    assert obj["id"] is None or obj["id"] == req_id, (obj, request)


def _no_dns(*args: Any, **kwargs: Any):
    raise OSError("no DNS in tests")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_inputs)
def test_any_input_gives_a_jsonrpc_response_or_nothing(raw):
    hub = FakeHub()
    hub.registry.declare("E_A")
    hub.registry.declare("E_B")
    with mock.patch("socket.getaddrinfo", _no_dns):
        out = mi.handle(hub, raw)
    if out is None:
        return
    assert isinstance(out, bytes)
    parsed = orjson.loads(out)
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError:
        request = None
    if isinstance(parsed, list):
        assert isinstance(request, list) and 0 < len(parsed) <= len(request)
        for item in parsed:
            ids = [r.get("id") for r in request if isinstance(r, dict)]
            _check_response(item, {"id": item["id"]} if item["id"] in ids else None)
    else:
        _check_response(parsed, request)


# -- part 2: the real transports -------------------------------------------------

TRANSPORTS = ["udp", "unix", "http"]


def send(daemon, transport: str, raw: bytes, timeout: float = 2.0) -> bytes | None:
    """One raw request over a real transport; the reply bytes or None (silence)."""
    if transport == "http":
        req = urllib.request.Request(daemon.http, raw, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read() or None
        except urllib.error.HTTPError as exc:
            return exc.read() or None
    if transport == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        address: Any = ("127.0.0.1", daemon.udp_port)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("")  # autobind: an abstract address the reply can come back to
        address = str(daemon.unix_path)
    with sock:
        sock.settimeout(timeout)
        sock.sendto(raw, address)
        try:
            return sock.recv(1 << 20)
        except TimeoutError:
            return None


def call(daemon, transport: str, method: str, params: Any = _ABSENT) -> dict:
    out = send(daemon, transport, request(method, params, req_id=77))
    assert out is not None, f"no answer to {method} over {transport}"
    parsed = orjson.loads(out)
    assert parsed["jsonrpc"] == "2.0" and parsed["id"] == 77, parsed
    return parsed


def result(daemon, transport: str, method: str, params: Any = _ABSENT) -> Any:
    parsed = call(daemon, transport, method, params)
    assert "result" in parsed, parsed
    return parsed["result"]


def code(daemon, transport: str, method: str, params: Any = _ABSENT) -> int:
    parsed = call(daemon, transport, method, params)
    assert "error" in parsed, parsed
    return parsed["error"]["code"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transport_every_method_and_error(daemon, udp_sink, transport):
    assert set(result(daemon, transport, "which")) >= OPENSIPS_MI_METHODS
    assert result(daemon, transport, "event_publish", ["E_T"]) == {"name": "E_T", "id": 0}
    assert result(daemon, transport, "events_list") == {"Events": [{"name": "E_T", "id": 0}]}
    sub = {"event": "E_T", "socket": udp_sink.address, "expire": 100}
    assert result(daemon, transport, "event_subscribe", sub) == "OK"
    listed = result(daemon, transport, "subscribers_list", ["E_T", udp_sink.address])
    assert listed["Event"]["Subscriber"]["socket"] == udp_sink.address
    assert listed["Event"]["Subscriber"]["expire"] == 100
    assert result(daemon, transport, "subscribers_list")["Events"][0]["name"] == "E_T"
    assert result(daemon, transport, "raise_event", ["E_T", '{"via": "mi"}']) == "OK"
    assert udp_sink.receive(1) == [b'{"jsonrpc":"2.0","method":"E_T","params":{"via":"mi"}}']
    sent = f"destination:E_T@{udp_sink.address}.sent"
    stats = wait_for(
        lambda: (
            (s := result(daemon, transport, "get_statistics", [["destination:"]])).get(sent) and s
        )
    )
    assert stats and stats[sent] == 1, stats
    totals = result(daemon, transport, "get_statistics", [["mpevent:"]])
    assert totals["mpevent:raised"] == totals["mpevent:enqueued"] == 1, totals
    assert result(daemon, transport, "list_statistics", [["mpevent:raised"]]) == {
        "mpevent:raised": "non-incremental"
    }
    assert result(daemon, transport, "reset_statistics", [["mpevent:raised"]]) == "OK"
    assert result(daemon, transport, "get_statistics", [["mpevent:raised"]]) == {
        "mpevent:raised": 0
    }
    procs = result(daemon, transport, "ps")["Processes"]
    types = [p["Type"] for p in procs]
    assert types[:2] == ["hub", "sender 0"]
    # The hub raised through the MI above, from a lane of its own.
    assert all(t.startswith("producer lane ") for t in types[2:]), types
    assert procs[0]["PID"] == daemon.proc.pid
    assert "Up time" in result(daemon, transport, "uptime")
    assert result(daemon, transport, "version") == {"Server": f"mpevent {VERSION}"}
    assert result(daemon, transport, "event_subscribe", {**sub, "expire": 0}) == "OK"
    assert result(daemon, transport, "subscribers_list", ["E_T"])["Event"]["Subscribers"] == []

    # the error codes
    assert code(daemon, transport, "raise_event", ["E_T"]) == 480
    assert code(daemon, transport, "raise_event", ["E_NOPE"]) == 404
    assert code(daemon, transport, "event_subscribe", ["E_T", "udp:127.0.0.1:0"]) == 400
    assert code(daemon, transport, "event_subscribe", ["E_NOPE", udp_sink.address]) == 400
    assert code(daemon, transport, "event_subscribe", ["E_T", udp_sink.address, -1]) == -32602
    # An expire whose deadline overflows the stored table once broke every later store.
    assert code(daemon, transport, "event_subscribe", ["E_T", udp_sink.address, 10**12]) == -32602
    assert result(daemon, transport, "event_subscribe", ["E_T", udp_sink.address, 0]) == "OK"
    assert code(daemon, transport, "events_list", {"bogus": 1}) == -32602
    assert code(daemon, transport, "no_such_method") == -32601
    for raw, expected in [
        (b"not json", -32700),
        (b'{"jsonrpc":"1.0","method":"which","id":77}', -32600),
        (b"[]", -32600),
    ]:
        out = send(daemon, transport, raw)
        assert out is not None and orjson.loads(out)["error"]["code"] == expected, raw
    # a notification gets no reply (HTTP: 204 No Content)
    assert send(daemon, transport, b'{"jsonrpc":"2.0","method":"version"}', timeout=0.3) is None
    assert udp_sink.quiet(0.1) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transport_answers_the_4x_names(daemon, udp_sink, transport):
    """The OpenSIPS 4.x names over a real transport, each answered as its alias is."""
    assert result(daemon, transport, "evi:publish", ["E_4"]) == {"name": "E_4", "id": 0}
    assert result(daemon, transport, "evi:list") == result(daemon, transport, "events_list")
    assert result(daemon, transport, "evi:list") == {"Events": [{"name": "E_4", "id": 0}]}
    assert result(daemon, transport, "evi:subscribe", ["E_4", udp_sink.address, "100"]) == "OK"
    listed = result(daemon, transport, "evi:subscribers", ["E_4", udp_sink.address])
    assert listed["Event"]["Subscriber"]["expire"] == 100
    assert listed == result(daemon, transport, "subscribers_list", ["E_4", udp_sink.address])
    assert result(daemon, transport, "evi:raise", ["E_4", '{"n": 1}']) == "OK"
    assert udp_sink.receive(1) == [b'{"jsonrpc":"2.0","method":"E_4","params":{"n":1}}']
    sent = f"destination:E_4@{udp_sink.address}.sent"
    stats = wait_for(
        lambda: (
            (s := result(daemon, transport, "statistics:get", [["destination:"]])).get(sent) and s
        )
    )
    assert stats and stats[sent] == 1, stats
    assert result(daemon, transport, "statistics:get", [["mpevent:raised"]]) == {
        "mpevent:raised": 1
    }
    assert result(daemon, transport, "statistics:list", [["mpevent:raised"]]) == {
        "mpevent:raised": "non-incremental"
    }
    assert result(daemon, transport, "statistics:reset", [["event:E_4.raised"]]) == "OK"
    assert result(daemon, transport, "get_statistics", [["event:E_4.raised"]]) == {
        "event:E_4.raised": 0
    }
    # reset_all: every counter reads 0 from now on; a gauge (pending) is left as it is.
    assert result(daemon, transport, "statistics:reset_all") == "OK"
    after = result(daemon, transport, "statistics:get", [["all"]])
    assert after[sent] == after["mpevent:raised"] == after["mpevent:destination_sent"] == 0, after
    counts = {k: v for k, v in after.items() if not k.endswith(("pending", "_pending"))}
    assert len(counts) > 10 and set(counts.values()) == {0}, after
    # ... and counts on from there.
    assert result(daemon, transport, "raise_event", ["E_4", ["again"]]) == "OK"
    assert udp_sink.receive(1) == [b'{"jsonrpc":"2.0","method":"E_4","params":["again"]}']
    assert result(daemon, transport, "reset_all_statistics", []) == "OK"
    assert result(daemon, transport, "statistics:get", [["mpevent:raised"]]) == {
        "mpevent:raised": 0
    }
    procs = result(daemon, transport, "core:ps")["Processes"]
    assert [p["PID"] for p in procs] == [
        p["PID"] for p in result(daemon, transport, "ps")["Processes"]
    ]
    assert procs[0]["PID"] == daemon.proc.pid
    assert "Up time" in result(daemon, transport, "core:uptime")
    assert result(daemon, transport, "core:version") == {"Server": f"mpevent {VERSION}"}
    names = result(daemon, transport, "core:which")
    assert names == result(daemon, transport, "which") and set(names) >= OPENSIPS_MI_METHODS
    assert result(daemon, transport, "core:which", {"command": "evi:raise"}) == [
        ["event"],
        ["event", "params"],
    ]
    assert result(daemon, transport, "evi:subscribe", ["E_4", udp_sink.address, 0]) == "OK"
    assert result(daemon, transport, "evi:subscribers", ["E_4"])["Event"]["Subscribers"] == []
    assert code(daemon, transport, "evi:raise", ["E_4"]) == 480
    assert code(daemon, transport, "evi:raise", ["E_NOPE"]) == 404
    assert code(daemon, transport, "evi:subscribe", ["E_NOPE", udp_sink.address]) == 400
    assert code(daemon, transport, "core:nope") == -32601


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transport_survives_garbage(daemon, transport):
    daemon.mi("event_publish", ["E_G"])
    garbage = [
        b"\x00\xff" * 50,
        orjson.dumps([1, "x", None, [], {}, {"jsonrpc": "2.0"}, {"method": "which"}]),
        b"[" * 5000,
        b'{"jsonrpc":"2.0","method":"raise_event","params":["E_G","' + b"[" * 20000 + b'"],"id":1}',
        b"x" * (mi.MAX_REQUEST + 10),
        b"{" * (1 << 20),  # 1 MB: refused, or too big to send at all
    ]
    for raw in garbage:
        try:
            out = send(daemon, transport, raw, timeout=1.0)
        except OSError:  # EMSGSIZE (datagram too big) or the server refusing to read it
            continue
        if out is not None:
            parsed = orjson.loads(out)
            for item in parsed if isinstance(parsed, list) else [parsed]:
                assert item["jsonrpc"] == "2.0" and "error" in item, item
    assert result(daemon, transport, "version") == {"Server": f"mpevent {VERSION}"}
    assert daemon.proc.poll() is None
    assert "Traceback" not in daemon.log()


def _http_exchange(daemon, data: bytes) -> bytes:
    """Raw bytes to the HTTP MI on one connection; everything it sends back until it closes."""
    with socket.create_connection(("127.0.0.1", daemon.http_port), timeout=5) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_http_keep_alive_and_refused_bodies(daemon):
    body = request("version")
    post = b"POST /mi HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    # Two requests on one connection: two answers.
    out = _http_exchange(daemon, post + post)
    assert out.count(b"HTTP/1.1 200 ") == 2 and out.count(b'"Server":"mpevent') == 2, out
    # A refused request's unread body must not be parsed as the next request:
    # the server answers and closes the connection.
    wrong_path = post.replace(b"POST /mi ", b"POST /other ")
    chunked = (
        b"POST /mi HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    too_big = b"POST /mi HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000
    for first, status in [(wrong_path, b"404"), (chunked, b"411"), (too_big, b"413")]:
        out = _http_exchange(daemon, first + post)
        assert out.startswith(b"HTTP/1.1 " + status), out
        assert b"Connection: close" in out and out.count(b"HTTP/1.1") == 1, out
    assert _http_exchange(daemon, b"GET /mi HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
        b"HTTP/1.1 405"
    )


def test_unix_socket_mode_is_0660(daemon):
    assert stat.S_ISSOCK(os.stat(daemon.unix_path).st_mode)
    assert stat.S_IMODE(os.stat(daemon.unix_path).st_mode) == 0o660


def test_replies_fast_enough_for_the_opensips_client(daemon):
    """The opensips package's datagram client waits only 0.1 s for an answer."""
    for transport in ("udp", "unix"):
        start = time.perf_counter()
        for _ in range(20):
            result(daemon, transport, "version")
        assert (time.perf_counter() - start) / 20 < 0.05


# -- part 3: expiry and refresh against real sockets --------------------------------


def _listed(daemon, sink: UdpSink) -> bool:
    subs = daemon.mi("subscribers_list", ["E_EXP"])["Event"]["Subscribers"]
    return any(s["socket"] == sink.address for s in subs)


def test_subscription_expires(daemon, udp_sink):
    daemon.mi("event_publish", ["E_EXP"])
    assert daemon.mi("event_subscribe", ["E_EXP", udp_sink.address, 1]) == "OK"
    assert daemon.mi("raise_event", ["E_EXP", {"n": 1}]) == "OK"
    assert udp_sink.receive(1) == [b'{"jsonrpc":"2.0","method":"E_EXP","params":{"n":1}}']
    assert wait_for(lambda: not _listed(daemon, udp_sink), timeout=10, interval=0.05)
    parsed = call(daemon, "udp", "raise_event", ["E_EXP", {"n": 2}])
    assert parsed["error"] == {"code": 480, "message": "Temporarily Unavailable"}
    assert udp_sink.quiet(0.3) == []


def test_subscribing_again_refreshes(daemon, udp_sink):
    daemon.mi("event_publish", ["E_EXP"])
    assert daemon.mi("event_subscribe", ["E_EXP", udp_sink.address, 2]) == "OK"
    time.sleep(1)
    refreshed = time.monotonic()
    assert daemon.mi("event_subscribe", ["E_EXP", udp_sink.address, 2]) == "OK"
    time.sleep(1.5)  # past the first deadline, before the refreshed one
    assert _listed(daemon, udp_sink), "the refreshed subscription expired too early"
    assert daemon.mi("raise_event", ["E_EXP", ["still", "here"]]) == "OK"
    assert time.monotonic() - refreshed < 2, "the machine is too slow for this check"
    assert udp_sink.receive(1) == [b'{"jsonrpc":"2.0","method":"E_EXP","params":["still","here"]}']
