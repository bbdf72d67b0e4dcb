"""Hostile input: arbitrary params and destination strings never crash anything.

``raise_event`` either enqueues (and then the subscriber gets valid JSON that
decodes back to the params) or refuses with ``TypeError``/``ValueError``;
``parse_destination`` either parses (and round-trips) or raises
``DestinationError``. Nothing else, whatever the input. (The MI's own fuzz
tests are in test_mi.py.)
"""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import UdpSink

from mpevent import EventBus
from mpevent.protocol.destination import DestinationError, parse_destination

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.binary(max_size=8)
    | st.sets(st.integers(), max_size=3)
)
keys = st.text(max_size=8) | st.integers() | st.none()
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(keys, inner, max_size=4)
    ),
    max_leaves=12,
)
params = (
    st.none() | st.dictionaries(keys, values, max_size=5) | st.lists(values, max_size=5) | values
)


def _expected_json(value):
    """What the subscriber must decode, or None when the value is not JSON-able."""
    try:
        encoded = orjson.dumps(value)
    except TypeError:
        return None
    return orjson.loads(encoded)


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def _must_refuse(value) -> bool:
    """Not None, a dict or a list; or not JSON; or NaN/infinity somewhere."""
    if value is None:
        return False
    if not isinstance(value, dict | list | tuple):
        return True
    return _expected_json(value) is None or not _finite(value)


@pytest.fixture(scope="module")
def bus_and_sink():
    sink = UdpSink()
    with EventBus() as bus:
        bus.publish_event("E_FUZZ")
        bus.subscribe("E_FUZZ", sink.address, expire=None)
        yield bus, sink
    sink.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=params)
def test_raise_event_with_any_params(bus_and_sink, value):
    bus, sink = bus_and_sink
    try:
        ok = bus.raise_event("E_FUZZ", value)
    except (TypeError, ValueError):
        assert _must_refuse(value), f"refused valid params {value!r}"
        return
    assert not _must_refuse(value), f"accepted invalid params {value!r}"
    assert ok is True
    (datagram,) = sink.receive(1, timeout=10)
    note = orjson.loads(datagram)
    assert note["jsonrpc"] == "2.0" and note["method"] == "E_FUZZ"
    if value:
        assert note["params"] == _expected_json(value)
    else:
        assert "params" not in note


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=120) | st.from_regex(r"(udp|unix|UDP|tcp)?:?\S{0,60}", fullmatch=True))
def test_parse_destination_with_any_text(text):
    try:
        dest = parse_destination(text, resolve=lambda host, port: [])
    except DestinationError:
        return
    assert parse_destination(str(dest), resolve=lambda host, port: []) == dest


def test_mi_subscribe_with_hostile_sockets(daemon):
    from mpevent.api.client import MICallError

    daemon.mi("event_publish", ["E_FUZZ"])
    for sock in ["", "\0", "udp:", "udp:[::1", "unix:" + "x" * 5000, "udp:127.0.0.1:99999", "💥"]:
        with pytest.raises(MICallError) as err:
            daemon.mi("event_subscribe", ["E_FUZZ", sock, 10])
        assert err.value.code == 400
    assert daemon.mi("version")


# -- every MI method with random params -----------------------------------------


def _containers_of(inner: st.SearchStrategy) -> st.SearchStrategy:
    """Lists and objects of ``inner``. A named function, not a lambda:
    hypothesis reads a lambda's source to check that it uses its argument,
    and under pytest misread this one (a HypothesisDeprecationWarning)."""
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(["E_A", "udp:127.0.0.1:9", "unix:/tmp/x", "all", "-1", "0", "[[[", "{}"]),
    _containers_of,
    max_leaves=10,
)
FUZZ_PER_METHOD = 150


@pytest.mark.parametrize(
    "method", sorted(__import__("mpevent.protocol.mi", fromlist=["METHODS"]).METHODS)
)
def test_every_mi_method_with_random_params(method):
    """Arbitrary params: always a JSON-RPC result or error with the request's id."""
    from test_mi import FakeHub

    from mpevent.protocol import mi

    hub = FakeHub()
    hub.registry.declare("E_A")
    seen = []

    @settings(max_examples=FUZZ_PER_METHOD, deadline=None)
    @given(
        params=json_values
        | st.lists(json_values, max_size=4)
        | st.dictionaries(
            st.sampled_from(["event", "socket", "expire", "params", "statistics", "x"]), json_values
        )
    )
    def check(params):
        request = orjson.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 7})
        reply = orjson.loads(mi.handle(hub, request))
        seen.append(1)
        assert reply["id"] == 7
        assert ("result" in reply) != ("error" in reply)
        if "error" in reply:
            assert isinstance(reply["error"]["code"], int)
            assert reply["error"]["message"]
            assert reply["error"]["code"] != mi.INTERNAL_ERROR, reply  # never a bug of ours

    check()
    assert len(seen) >= FUZZ_PER_METHOD // 2
