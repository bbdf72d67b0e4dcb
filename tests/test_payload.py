"""Tests for mpevent.protocol.payload: the notification bytes, byte for byte as OpenSIPS sends them.

Pure functions only: no processes, no sockets, no shared memory.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpevent.protocol.payload import (
    MAX_DATAGRAM,
    MAX_EVENT_NAME,
    DatagramTooLarge,
    Notification,
    PayloadError,
    bare_notification,
    check_event_name,
    datagram_size,
    encode_notification,
    encode_params,
    params_prefix,
)

# --- strategies --------------------------------------------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
# Text that is likely to hold what needs escaping: every C0 control character,
# the quote, the backslash and DEL, mixed with any non-surrogate code point.
SPECIAL = [chr(i) for i in range(0x20)] + ['"', "\\", "/", "\x7f", "é", "中", "😀"]
CHARS = st.one_of(st.characters(codec="utf-8"), st.sampled_from(SPECIAL))  # no lone surrogates
TEXT = st.text(alphabet=CHARS, max_size=20)
KEYS = st.text(alphabet=CHARS, max_size=8)
EVENT_NAMES = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)


def json_values(*, floats: bool = True) -> st.SearchStrategy[Any]:
    """JSON-compatible values nested a few levels deep."""
    scalars = st.none() | st.booleans() | INT64 | TEXT
    if floats:
        scalars = scalars | FINITE
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4)
        ),
        max_leaves=12,
    )


def top_params(*, floats: bool = True) -> st.SearchStrategy[Any]:
    """Params as a producer passes them: a non-empty dict or list."""
    values = json_values(floats=floats)
    return st.dictionaries(KEYS, values, min_size=1, max_size=5) | st.lists(
        values, min_size=1, max_size=5
    )


def any_params() -> st.SearchStrategy[Any]:
    """Also the forms that mean "no params"."""
    return top_params() | st.sampled_from([None, {}, [], ()])


def python_json(value: Any) -> bytes:
    """An independent reference for the escaping rules (Python's json module).

    With ``ensure_ascii=False`` it escapes ``"`` ``\\`` ``\\b \\f \\n \\r \\t``
    short and the other C0 controls as lowercase ``\\u00xx``, leaves DEL and
    non-ASCII raw: exactly the wire rules. Not used for floats, whose
    shortest form differs between encoders (``1e+16`` vs ``1e16``).
    """
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


# --- exact bytes ---------------------------------------------------------------


def test_named_params_exact_bytes() -> None:
    assert (
        encode_notification("E_PIKE_BLOCKED", {"ip": "192.168.2.11"})
        == b'{"jsonrpc":"2.0","method":"E_PIKE_BLOCKED","params":{"ip":"192.168.2.11"}}'
    )


def test_named_params_keep_insertion_order() -> None:
    assert (
        encode_notification("E_X", {"b": 1, "a": 2, "c": 3})
        == b'{"jsonrpc":"2.0","method":"E_X","params":{"b":1,"a":2,"c":3}}'
    )


@pytest.mark.parametrize("params", [["192.168.2.11", 5], ("192.168.2.11", 5)])
def test_positional_params_become_an_array(params: Any) -> None:
    assert (
        encode_notification("E_PIKE_BLOCKED", params)
        == b'{"jsonrpc":"2.0","method":"E_PIKE_BLOCKED","params":["192.168.2.11",5]}'
    )


@pytest.mark.parametrize("params", [None, {}, [], ()], ids=["None", "dict", "list", "tuple"])
def test_no_params_means_no_params_key(params: Any) -> None:
    assert encode_notification("E_X", params) == b'{"jsonrpc":"2.0","method":"E_X"}'
    assert encode_params(params) == b""


def test_default_is_no_params() -> None:
    assert encode_notification("E_X") == b'{"jsonrpc":"2.0","method":"E_X"}'
    assert bare_notification("E_X") == b'{"jsonrpc":"2.0","method":"E_X"}'


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        ('"', rb"\""),
        ("\\", rb"\\"),
        ("\b", rb"\b"),
        ("\f", rb"\f"),
        ("\n", rb"\n"),
        ("\r", rb"\r"),
        ("\t", rb"\t"),
        ("\x00", rb"\u0000"),
        ("\x01", rb"\u0001"),
        ("\x0b", rb"\u000b"),
        ("\x1b", rb"\u001b"),
        ("\x1f", rb"\u001f"),
        ("\x7f", b"\x7f"),  # DEL is not a C0 control: raw
        ("/", b"/"),  # not escaped
        (" ", b" "),  # spaces inside strings stay
        ("é", "é".encode()),
        ("中", "中".encode()),
        ("😀", "😀".encode()),  # raw 4-byte UTF-8, no surrogate pair escape
        ("\u2028", "\u2028".encode()),
    ],
)
def test_string_escaping(text: str, wire: bytes) -> None:
    got = encode_notification("E_X", {"s": f"a{text}b"})
    assert got == b'{"jsonrpc":"2.0","method":"E_X","params":{"s":"a' + wire + b'b"}}'
    # Keys are escaped the same way.
    got = encode_notification("E_X", {f"k{text}": 1})
    assert got == b'{"jsonrpc":"2.0","method":"E_X","params":{"k' + wire + b'":1}}'


def test_all_c0_controls_in_one_string() -> None:
    short = {8: rb"\b", 9: rb"\t", 10: rb"\n", 12: rb"\f", 13: rb"\r"}
    text = "".join(chr(i) for i in range(0x20))
    wire = b"".join(short.get(i, b"\\u%04x" % i) for i in range(0x20))
    got = encode_notification("E_X", [text])
    assert got == b'{"jsonrpc":"2.0","method":"E_X","params":["' + wire + b'"]}'


def test_value_types() -> None:
    params = {
        "int": 5060,
        "neg": -1,
        "big": 2**63 - 1,
        "small": -(2**63),
        "none": None,
        "float": 1.5,
        "true": True,
        "false": False,
        "list": [1, "two", None, [3.25]],
        "obj": {"a": {"b": []}, "c": {}},
    }
    assert encode_notification("E_TYPES", params) == (
        b'{"jsonrpc":"2.0","method":"E_TYPES","params":{"int":5060,"neg":-1,'
        b'"big":9223372036854775807,"small":-9223372036854775808,"none":null,'
        b'"float":1.5,"true":true,"false":false,"list":[1,"two",null,[3.25]],'
        b'"obj":{"a":{"b":[]},"c":{}}}}'
    )


def test_nested_empty_containers_are_kept() -> None:
    # Only an empty *top level* means "no params".
    assert encode_notification("E_X", [[]]) == b'{"jsonrpc":"2.0","method":"E_X","params":[[]]}'
    assert encode_notification("E_X", {"a": {}}) == (
        b'{"jsonrpc":"2.0","method":"E_X","params":{"a":{}}}'
    )


def test_key_order_and_no_whitespace() -> None:
    got = encode_notification("E_X", {"a": [1, 2], "b": {"c": None}})
    assert got.index(b'"jsonrpc"') < got.index(b'"method"') < got.index(b'"params"')
    assert not any(c in got for c in (b" ", b"\n", b"\t", b"\r"))


def test_event_name_is_json_string() -> None:
    assert params_prefix("E_A.b:c-1") == b'{"jsonrpc":"2.0","method":"E_A.b:c-1","params":'


# --- the size limit --------------------------------------------------------------


def _filler_params(name: str, total: int, unit: str = "a") -> dict[str, str]:
    """Params ``{"k": ...}`` whose whole datagram is exactly ``total`` bytes.

    ``unit`` is repeated as far as it goes (its wire size may be several
    bytes: "é" is 2, "\\x01" is 6); the rest is made up with ASCII.
    """
    base = len(encode_notification(name, {"k": ""}))
    unit_wire = len(encode_params([unit])) - 4  # minus the brackets and quotes
    need = total - base
    count = need // unit_wire
    return {"k": unit * count + "a" * (need - count * unit_wire)}


@pytest.mark.parametrize("name", ["E_X", "E_PIKE_BLOCKED", "E" * MAX_EVENT_NAME])
@pytest.mark.parametrize("unit", ["a", "é", "中", "😀", "\x01", "\n"])
def test_largest_datagram_is_accepted(name: str, unit: str) -> None:
    params = _filler_params(name, MAX_DATAGRAM, unit)
    result = encode_notification(name, params)
    assert len(result) == MAX_DATAGRAM == 65457
    assert orjson.loads(result)["params"] == params


@pytest.mark.parametrize("name", ["E_X", "E_PIKE_BLOCKED", "E" * MAX_EVENT_NAME])
@pytest.mark.parametrize("unit", ["a", "é", "中", "😀", "\x01", "\n"])
def test_one_byte_more_is_refused(name: str, unit: str) -> None:
    params = _filler_params(name, MAX_DATAGRAM + 1, unit)
    with pytest.raises(DatagramTooLarge) as info:
        encode_notification(name, params)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, PayloadError)
    assert info.value.size == 65458
    assert info.value.event == name
    message = str(info.value)
    assert "65458" in message, message
    assert "65457" in message, message


def test_positional_limit() -> None:
    base = len(encode_notification("E_X", [""]))
    assert len(encode_notification("E_X", ["x" * (MAX_DATAGRAM - base)])) == MAX_DATAGRAM
    with pytest.raises(DatagramTooLarge):
        encode_notification("E_X", ["x" * (MAX_DATAGRAM - base + 1)])


def test_far_too_large_is_refused() -> None:
    with pytest.raises(DatagramTooLarge):
        encode_notification("E_X", {"k": "x" * 1_000_000})


def test_datagram_size_arithmetic() -> None:
    prefix = params_prefix("E_X")
    assert datagram_size(len(prefix), 0) == len(bare_notification("E_X"))
    assert datagram_size(len(prefix), 7) == len(prefix) + 7 + 1


@given(name=EVENT_NAMES, params=any_params())
@settings(max_examples=200)
def test_size_agrees_with_build(name: str, params: Any) -> None:
    body = encode_params(params)
    note = Notification(name)
    built = note.build(body)
    assert note.size(len(body)) == len(built)
    assert datagram_size(len(params_prefix(name)), len(body)) == len(built)
    # The sender passes a view into the ring, not bytes.
    assert note.build(memoryview(body)) == built
    if len(built) <= MAX_DATAGRAM:
        assert encode_notification(name, params) == built
    assert note.bare == b'{"jsonrpc":"2.0","method":' + orjson.dumps(name) + b"}"


# --- errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "type_name"),
    [("ip=1.2.3.4", "str"), (5, "int"), ({"a"}, "set"), (b"{}", "bytes"), (1.5, "float")],
)
def test_params_of_wrong_type(params: Any, type_name: str) -> None:
    with pytest.raises(TypeError) as info:
        encode_params(params)
    assert type_name in str(info.value)
    with pytest.raises(TypeError):
        encode_notification("E_X", params)


@pytest.mark.parametrize(
    "params",
    [{1: "a"}, {None: 1}, {("a", "b"): 1}, {"a": {2: "b"}}, [{True: 1}]],
    ids=["int", "None", "tuple", "nested", "bool-in-list"],
)
def test_non_str_keys(params: Any) -> None:
    with pytest.raises(TypeError):
        encode_params(params)


@pytest.mark.parametrize(
    "params",
    [{"a": {1, 2}}, [b"bytes"], {"a": object()}, [1 + 2j]],
    ids=["set", "bytes", "object", "complex"],
)
def test_nested_values_of_wrong_type(params: Any) -> None:
    with pytest.raises(TypeError):
        encode_params(params)


@pytest.mark.parametrize(
    "value", [2**64, -(2**63) - 1, 10**30, -(10**30)], ids=["2^64", "-2^63-1", "1e30", "-1e30"]
)
def test_int_beyond_64_bits(value: int) -> None:
    with pytest.raises(TypeError):
        encode_params({"n": value})
    with pytest.raises(TypeError):
        encode_params([[value]])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "shape",
    [
        lambda x: {"a": x},
        lambda x: [x],
        lambda x: (1, x),
        lambda x: {"a": [1, {"b": [None, x]}]},
        lambda x: [{"a": None}, [[x]]],
    ],
    ids=["dict", "list", "tuple", "nested", "deep-with-null"],
)
def test_nonfinite_floats(bad: float, shape: Any) -> None:
    with pytest.raises(PayloadError) as info:
        encode_params(shape(bad))
    assert isinstance(info.value, ValueError)
    with pytest.raises(PayloadError):
        encode_notification("E_X", shape(bad))


def test_null_is_not_mistaken_for_nan() -> None:
    assert encode_params({"a": None, "b": [None, 0.5], "c": "null"}) == (
        b'{"a":null,"b":[null,0.5],"c":"null"}'
    )


@pytest.mark.parametrize(
    "params",
    [{"s": "\ud800"}, ["a\udfffb"], {"\ud83d": 1}, {"a": ["x", "\udc00"]}],
    ids=["value", "list", "key", "nested"],
)
def test_lone_surrogate(params: Any) -> None:
    with pytest.raises(TypeError):
        encode_params(params)


def test_event_name_checks() -> None:
    assert check_event_name("E" * 64) == "E" * 64
    assert check_event_name("E_PIKE_BLOCKED") == "E_PIKE_BLOCKED"
    assert check_event_name("a.b:c-d_0") == "a.b:c-d_0"
    with pytest.raises(ValueError, match="empty"):
        check_event_name("")
    with pytest.raises(ValueError, match="64"):
        check_event_name("E" * 65)
    for bad in (None, 5, b"E_X", ["E_X"]):
        with pytest.raises(TypeError) as info:
            check_event_name(bad)
        assert type(bad).__name__ in str(info.value)
    for bad in ("E X", 'E"X', "E'X", "E\\X", "E_X\n", "\tE_X", "E/X", "É_X", "E{X}"):
        with pytest.raises(ValueError):
            check_event_name(bad)
        with pytest.raises(ValueError):
            encode_notification(bad, {"a": 1})
        with pytest.raises(ValueError):
            Notification(bad)


# --- properties --------------------------------------------------------------------


@given(params=top_params())
@settings(max_examples=300)
def test_round_trip_and_canonical_bytes(params: Any) -> None:
    got = encode_notification("E_X", params)
    expected = {"jsonrpc": "2.0", "method": "E_X", "params": params}
    assert orjson.loads(got) == expected
    # Same bytes as the canonical compact encoding: key order, no whitespace
    # outside strings, orjson's escaping.
    assert got == orjson.dumps(expected)


@given(params=top_params(floats=False))
@settings(max_examples=300)
def test_matches_independent_reference(params: Any) -> None:
    """Escaping and layout checked against Python's json module (no floats)."""
    got = encode_notification("E_X", params)
    assert got == python_json({"jsonrpc": "2.0", "method": "E_X", "params": params})


@given(text=TEXT)
def test_strings_have_no_raw_controls(text: str) -> None:
    got = encode_params([text])
    assert not any(b < 0x20 for b in got)
    assert orjson.loads(got) == [text]
