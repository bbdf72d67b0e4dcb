"""Splitting an unframed stream of JSON texts (mpevent.protocol.jsonstream), pure."""

from __future__ import annotations

from itertools import pairwise

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpevent.protocol.jsonstream import JsonSplitter, JsonStreamError


def feed_bytewise(splitter: JsonSplitter, data: bytes) -> list[bytes]:
    texts = []
    for i in range(len(data)):
        texts += splitter.feed(data[i : i + 1])
    return texts


def test_texts_back_to_back_and_with_whitespace_between() -> None:
    s = JsonSplitter()
    got = s.feed(b'{"a":1}{"b":[2,3]}\n  \t[4,{"c":{}}]\r\n{"d":"e"}')
    assert got == [b'{"a":1}', b'{"b":[2,3]}', b'[4,{"c":{}}]', b'{"d":"e"}']
    assert s.buffered == 0


def test_brackets_and_escaped_quotes_inside_strings_do_not_count() -> None:
    texts = [
        b'{"a":"}"}',
        b'{"a":"{[","b":"]"}',
        b'{"q":"say \\"}\\" now"}',
        b'{"bs":"\\\\"}',  # an escaped backslash, then the closing quote
        b'{"bs":"\\\\\\""}',  # backslash, quote: the string goes on past it
        b'{"u":"\\u007d\\u0022"}',
        b'{"k}":"v{"}',
    ]
    stream = b"".join(texts)
    assert JsonSplitter().feed(stream) == texts
    assert feed_bytewise(JsonSplitter(), stream) == texts
    for text in texts:
        orjson.loads(text)  # the cases are valid JSON


def test_a_text_split_anywhere_comes_back_once_whole() -> None:
    text = b'{"jsonrpc":"2.0","result":"a \\"quoted\\" } brace","id":7}'
    stream = text + b" " + text
    for cut in range(len(stream) + 1):
        s = JsonSplitter()
        got = s.feed(stream[:cut])
        got += s.feed(stream[cut:])
        assert got == [text, text], cut
        assert s.buffered == 0


def test_an_escape_split_from_the_byte_it_escapes() -> None:
    s = JsonSplitter()
    assert s.feed(b'{"a":"x\\') == []
    assert s.feed(b'"') == []  # escaped: the string is still open
    assert s.feed(b'}"}') == [b'{"a":"x\\"}"}']


def test_only_the_unfinished_text_is_kept() -> None:
    s = JsonSplitter()
    assert s.feed(b'{"a":1}  {"b":') == [b'{"a":1}']
    assert s.buffered == len(b'{"b":')
    assert s.feed(b"2}") == [b'{"b":2}'] and s.buffered == 0


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"12", "expected a JSON object or array between texts, got b'12'"),
        (b'{"a":1} "x"', "got b'\"x\"'"),
        (b"{}]", "got b']'"),
        (b'{"a":[1}', "'}' closes a '[' at byte 7 of a text"),
        (b"[1,{]", "']' closes a '{' at byte 4"),
        (b"\x00{}", "got b'\\x00{}'"),
    ],
)
def test_what_is_not_a_stream_of_texts_is_an_error(data: bytes, problem: str) -> None:
    with pytest.raises(JsonStreamError) as info:
        JsonSplitter().feed(data)
    assert problem in str(info.value)


def test_a_text_over_the_bound_is_an_error_whole_or_unfinished() -> None:
    assert JsonSplitter(max_text=10).feed(b'{"a":"12"}') == [b'{"a":"12"}']  # 10: at the bound
    with pytest.raises(JsonStreamError, match="a JSON text of 11 bytes or more, over the 10-byte"):
        JsonSplitter(max_text=10).feed(b'{"a":"123"}')
    s = JsonSplitter(max_text=10)
    s.feed(b'{"a":"')
    with pytest.raises(JsonStreamError, match="over the 10-byte bound"):
        s.feed(b"x" * 20)  # never closed: the buffer may not grow past the bound
    s.reset()
    assert s.feed(b"{}") == [b"{}"]  # a new stream after reset


def test_reset_forgets_a_half_text() -> None:
    s = JsonSplitter()
    s.feed(b'{"a":"}')
    s.reset()
    assert s.buffered == 0
    assert s.feed(b'{"b":1}') == [b'{"b":1}']


def test_the_bound_must_allow_a_text() -> None:
    with pytest.raises(ValueError, match="max_text must be at least 2"):
        JsonSplitter(max_text=1)


# Strings that stress the scanner: quotes, backslashes, brackets, control
# characters (escaped by orjson), non-ASCII.
_TRICKY = st.text(alphabet=st.sampled_from('ab"\\{}[]\n\t\x01é😀 :,'), max_size=12)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TRICKY
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TRICKY, inner, max_size=4),
    max_leaves=12,
)
_TOP = st.lists(_VALUES, max_size=4) | st.dictionaries(_TRICKY, _VALUES, max_size=4)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(_TOP, min_size=1, max_size=8),
    gaps=st.lists(st.sampled_from([b"", b"", b" ", b"\n", b"\r\n\t "]), min_size=8, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
)
def test_property_random_texts_cut_anywhere_come_back_whole_and_in_order(
    values: list, gaps: list[bytes], cuts: list[int]
) -> None:
    texts = [orjson.dumps(v) for v in values]
    stream = b"".join(gap + text for gap, text in zip(gaps, texts, strict=False))
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    s = JsonSplitter()
    got: list[bytes] = []
    for a, b in pairwise(points):
        got += s.feed(stream[a:b])
    assert got == texts
    assert [orjson.loads(t) for t in got] == [orjson.loads(t) for t in texts]
    assert s.buffered == 0
