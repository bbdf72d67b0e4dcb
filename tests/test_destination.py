"""Tests for mpevent.protocol.destination: parsing, errors, printing, equality."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpevent.protocol.destination import (
    SUN_PATH_MAX,
    Destination,
    DestinationError,
    parse_destination,
)

# --- helpers -----------------------------------------------------------------


def fake_resolver(*addresses: str) -> Any:
    """A resolver returning getaddrinfo-shaped results for ``addresses``.

    Records each (host, port) it is asked about in ``.calls``.
    """
    calls: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> Iterable[tuple[Any, ...]]:
        calls.append((host, port))
        out = []
        for address in addresses:
            if ipaddress.ip_address(address).version == 4:
                out.append((socket.AF_INET, socket.SOCK_DGRAM, 17, "", (address, port)))
            else:
                out.append((socket.AF_INET6, socket.SOCK_DGRAM, 17, "", (address, port, 0, 0)))
        return out

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


def failing_resolver(host: str, port: int) -> Iterable[tuple[Any, ...]]:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def udp_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"udp:{ip}:{port}" if ip.version == 4 else f"udp:[{ip}]:{port}"


def assert_error(text: str, *fragments: str, **kwargs: Any) -> None:
    with pytest.raises(DestinationError) as info:
        parse_destination(text, **kwargs)
    message = str(info.value)
    assert message.startswith(f"invalid destination {text!r}: "), message
    for fragment in fragments:
        assert fragment in message, message


# --- valid forms ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "family", "host", "port", "printed", "sockaddr"),
    [
        (
            "udp:127.0.0.1:8081",
            socket.AF_INET,
            "127.0.0.1",
            8081,
            "udp:127.0.0.1:8081",
            ("127.0.0.1", 8081),
        ),
        ("udp:10.1.2.3:1", socket.AF_INET, "10.1.2.3", 1, "udp:10.1.2.3:1", ("10.1.2.3", 1)),
        ("udp:[::1]:8081", socket.AF_INET6, "::1", 8081, "udp:[::1]:8081", ("::1", 8081, 0, 0)),
        ("udp:[0:0::1]:9", socket.AF_INET6, "::1", 9, "udp:[::1]:9", ("::1", 9, 0, 0)),
        (
            "udp:[2001:DB8:0:0:0:0:0:1]:65535",
            socket.AF_INET6,
            "2001:db8::1",
            65535,
            "udp:[2001:db8::1]:65535",
            ("2001:db8::1", 65535, 0, 0),
        ),
        ("UDP:127.0.0.1:80", socket.AF_INET, "127.0.0.1", 80, "udp:127.0.0.1:80", None),
        ("Udp:127.0.0.1:080", socket.AF_INET, "127.0.0.1", 80, "udp:127.0.0.1:80", None),
    ],
)
def test_udp_literals(text, family, host, port, printed, sockaddr):
    dest = parse_destination(text, resolve=failing_resolver)  # literals never resolve
    assert dest == Destination("udp", family, host, port)
    assert dest.kind == "udp"
    assert str(dest) == printed
    if sockaddr is not None:
        assert dest.sockaddr == sockaddr
    assert parse_destination(str(dest)) == dest


@pytest.mark.parametrize(
    ("text", "host", "printed"),
    [
        ("unix:/tmp/x.sock", "/tmp/x.sock", "unix:/tmp/x.sock"),
        ("/tmp/x.sock", "/tmp/x.sock", "unix:/tmp/x.sock"),
        ("UNIX:/run/Events.sock", "/run/Events.sock", "unix:/run/Events.sock"),
        ("unix:/tmp/with:colon", "/tmp/with:colon", "unix:/tmp/with:colon"),
        ("/tmp/é.sock", "/tmp/é.sock", "unix:/tmp/é.sock"),
        ("unix:@name", "\0name", "unix:@name"),
        ("unix:@/looks/like/a/path", "\0/looks/like/a/path", "unix:@/looks/like/a/path"),
    ],
)
def test_unix_forms(text, host, printed):
    dest = parse_destination(text)
    assert dest == Destination("unix", socket.AF_UNIX, host, 0)
    assert dest.sockaddr == host
    assert str(dest) == printed
    assert parse_destination(str(dest)) == dest


def test_localhost_resolves_without_network():
    dest = parse_destination("udp:localhost:8081")
    assert dest.kind == "udp"
    assert dest.port == 8081
    assert ipaddress.ip_address(dest.host).is_loopback
    expected_family = socket.AF_INET if "." in dest.host else socket.AF_INET6
    assert dest.family == expected_family
    # The resolved address is what gets printed, so the round trip holds.
    assert parse_destination(str(dest)) == dest


def test_injected_resolver_is_used_with_host_and_port():
    resolve = fake_resolver("192.0.2.7")
    dest = parse_destination("udp:events.example.test:5060", resolve=resolve)
    assert resolve.calls == [("events.example.test", 5060)]
    assert dest == parse_destination("udp:192.0.2.7:5060")
    assert str(dest) == "udp:192.0.2.7:5060"


@pytest.mark.parametrize(
    "addresses",
    [("2001:db8::5", "192.0.2.5"), ("192.0.2.5", "2001:db8::5"), ("2001:db8::9", "192.0.2.5")],
)
def test_resolver_prefers_ipv4(addresses):
    dest = parse_destination("udp:dual.example.test:9", resolve=fake_resolver(*addresses))
    assert dest.family == socket.AF_INET
    assert dest.host == "192.0.2.5"


def test_resolver_ipv6_only():
    dest = parse_destination(
        "udp:v6.example.test:9", resolve=fake_resolver("2001:0db8::0001", "2001:db8::2")
    )
    assert dest.family == socket.AF_INET6
    assert dest.host == "2001:db8::1"  # first result, canonicalised
    assert dest.sockaddr == ("2001:db8::1", 9, 0, 0)
    assert str(dest) == "udp:[2001:db8::1]:9"


def test_resolution_happens_after_port_check():
    resolve = fake_resolver("192.0.2.1")
    assert_error("udp:example.test:0", "port 0 out of range", resolve=resolve)
    assert resolve.calls == []


def test_sockaddr_is_accepted_by_connect(tmp_path):
    udp = parse_destination("udp:127.0.0.1:9")
    with socket.socket(udp.family, socket.SOCK_DGRAM) as sock:
        sock.connect(udp.sockaddr)  # UDP connect sends nothing

    path = tmp_path / "sink.sock"
    unix = parse_destination(f"unix:{path}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        with socket.socket(unix.family, socket.SOCK_DGRAM) as client:
            client.connect(unix.sockaddr)
            client.send(b"ping")
        assert server.recv(16) == b"ping"
    path.unlink()


def test_ipv6_sockaddr_is_accepted_by_connect():
    dest = parse_destination("udp:[::1]:9")
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        pytest.skip("no IPv6 support")
    with sock:
        try:
            sock.connect(dest.sockaddr)
        except OSError as exc:  # e.g. ::1 not configured in a container
            pytest.skip(f"IPv6 loopback unavailable: {exc}")


# --- errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("udp:127.0.0.1", "missing port"),
        ("udp:127.0.0.1:", "missing port"),
        ("udp:[::1]", "missing port"),
        ("udp:[::1]:", "missing port"),
        ("udp:localhost", "missing port"),
        ("udp:", "missing host and port"),
        ("udp:127.0.0.1:0", "port 0 out of range 1-65535"),
        ("udp:127.0.0.1:65536", "port 65536 out of range 1-65535"),
        ("udp:127.0.0.1:" + "9" * 5000, "out of range 1-65535"),
        ("udp:127.0.0.1:abc", "port 'abc' is not a number"),
        ("udp:127.0.0.1:-1", "port '-1' is not a number"),
        ("udp:127.0.0.1:+80", "port '+80' is not a number"),
        ("udp:127.0.0.1:٨٠", "is not a number"),  # Arabic-Indic digits
        ("udp::8081", "empty host"),
        ("udp:[]:8081", "empty host"),
        ("udp:[::1:8081", "unbalanced '[' in IPv6 address"),
        ("udp:::1]:8081", "unbalanced ']' in IPv6 address"),
        ("udp:x[::1]:8081", "'[' must come right after 'udp:'"),
        ("udp:[::1]8081", "unexpected '8081' after ']'"),
        ("udp:::1:8081", "must be in brackets"),
        ("udp:[zz::1]:8081", "invalid IPv6 address"),
        ("udp:[127.0.0.1]:8081", "invalid IPv6 address"),
        ("udp:[::1::2]:8081", "invalid IPv6 address"),
        ("udp:[fe80::1%eth0]:8081", "zone id"),
        ("udp:256.0.0.1:8081", "invalid IPv4 address '256.0.0.1'"),
        ("udp:127.1:8081", "invalid IPv4 address"),
        ("udp:1234:8081", "invalid IPv4 address"),
        ("udp:127.000.0.1:8081", "invalid IPv4 address"),
        ("unix:", "empty path"),
        ("unix:@", "empty abstract socket name"),
        ("unix:tmp/x.sock", "not absolute"),
        ("unix:./x.sock", "not absolute"),
        ("sctp:127.0.0.1:8081", "unknown scheme 'sctp' (expected udp:, unix:, tcp:, rabbitmq: or"),
        ("http://example.com/", "unknown scheme 'http'"),
        (":8081", "unknown scheme ''"),
        ("localhost:8081", "unknown scheme 'localhost'"),
        ("tmp/x.sock", "unknown scheme"),
        ("x.sock", "unknown scheme"),
        ("", "empty string"),
        (" udp:127.0.0.1:8081", "whitespace"),
        ("udp:127.0.0.1:8081\n", "whitespace"),
        ("udp:127.0.0.1 :8081", "whitespace"),
        ("/tmp/a b.sock", "whitespace"),
        ("/tmp/x\0.sock", "control character"),
        ("udp:127.0.0.1:80\x7f", "control character"),
        ("/tmp/\u200b.sock", "control character"),  # zero-width space
    ],
)
def test_errors(text, fragment):
    assert_error(text, fragment, resolve=failing_resolver)


def test_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_destination("sctp:x:1")


@pytest.mark.parametrize("value", [None, b"udp:127.0.0.1:8081", 8081, ["/tmp/x"]])
def test_non_str_is_type_error(value):
    with pytest.raises(TypeError, match="must be str"):
        parse_destination(value)


def test_unresolvable_host():
    assert_error(
        "udp:nosuch.invalid:8081",
        "cannot resolve host 'nosuch.invalid'",
        "Name or service not known",
        resolve=failing_resolver,
    )


def test_resolver_with_no_usable_address():
    assert_error(
        "udp:empty.example.test:1",
        "cannot resolve host 'empty.example.test'",
        resolve=fake_resolver(),
    )


def test_path_length_limit_counts_bytes():
    # 107 bytes fit; 108 do not (sun_path is 108 including the NUL).
    fits = "/" + "a" * (SUN_PATH_MAX - 1)
    assert parse_destination(fits).host == fits
    assert_error(fits + "a", f"path too long for sun_path (108 bytes, max {SUN_PATH_MAX})")
    # Non-ASCII characters count by their encoded size, not as one each.
    assert len(os.fsencode("é")) == 2
    assert parse_destination("/" + "é" * 53).host == "/" + "é" * 53  # 107 bytes
    assert_error("unix:/" + "é" * 54, "path too long for sun_path (109 bytes, max 107)")


def test_abstract_name_length_limit():
    name = "n" * SUN_PATH_MAX
    assert parse_destination(f"unix:@{name}").sockaddr == "\0" + name
    assert_error(f"unix:@{name}n", "too long for sun_path (108 bytes, max 107)")


# --- equality and hashing --------------------------------------------------------


def test_same_address_is_same_subscription():
    spellings = ["udp:[::1]:9", "udp:[0:0::1]:9", "UDP:[0000:0000::0001]:9"]
    parsed = [parse_destination(s) for s in spellings]
    assert len(set(parsed)) == 1
    assert all(hash(p) == hash(parsed[0]) for p in parsed)

    assert parse_destination("/tmp/x.sock") == parse_destination("unix:/tmp/x.sock")
    assert parse_destination("udp:127.0.0.1:80") == parse_destination("udp:127.0.0.1:0080")
    resolved = parse_destination("udp:h.example.test:80", resolve=fake_resolver("127.0.0.1"))
    assert resolved == parse_destination("udp:127.0.0.1:80")
    assert len({resolved, parse_destination("udp:127.0.0.1:80")}) == 1


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("udp:127.0.0.1:8081", "udp:127.0.0.1:8082"),  # different port
        ("udp:127.0.0.1:8081", "udp:127.0.0.2:8081"),
        ("udp:127.0.0.1:8081", "udp:[::1]:8081"),
        ("udp:127.0.0.1:8081", "udp:[::ffff:127.0.0.1]:8081"),  # different family
        ("unix:/tmp/x.sock", "unix:/tmp/X.sock"),  # paths are case-sensitive
        ("unix:/tmp/x", "unix:@/tmp/x"),  # filesystem vs abstract
    ],
)
def test_different_addresses_differ(a, b):
    assert parse_destination(a) != parse_destination(b)
    assert len({parse_destination(a), parse_destination(b)}) == 2


def test_destination_is_frozen_and_slotted():
    dest = parse_destination("udp:127.0.0.1:8081")
    with pytest.raises(AttributeError):
        dest.port = 1  # type: ignore[misc]
    assert not hasattr(dest, "__dict__")


# --- property-based round trips ----------------------------------------------------

ports = st.integers(min_value=1, max_value=65535)

# Printable, non-whitespace characters: everything but the control (Cc),
# format (Cf), surrogate (Cs), private-use (Co), unassigned (Cn) and
# separator (Z*) categories -- exactly what str.isprintable()/isspace() allow.
path_chars = st.characters(
    codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp")
)
# 26 characters of at most 4 UTF-8 bytes each, plus "/", stay within 107 bytes.
unix_paths = st.text(path_chars, min_size=1, max_size=26).map(lambda s: "/" + s)
abstract_names = st.text(path_chars, min_size=1, max_size=26)


@given(ip=st.ip_addresses(), port=ports)
def test_udp_round_trip(ip, port):
    text = udp_text(ip, port)
    dest = parse_destination(text, resolve=failing_resolver)
    assert str(dest) == text  # str(ipaddress) is already canonical
    assert dest.host == str(ip)
    assert dest.port == port
    assert dest.family == (socket.AF_INET if ip.version == 4 else socket.AF_INET6)
    assert parse_destination(str(dest)) == dest


@given(ip=st.ip_addresses(v=6), port=ports)
def test_ipv6_spellings_are_equal(ip, port):
    exploded = parse_destination(f"udp:[{ip.exploded}]:{port}")
    upper = parse_destination(f"udp:[{ip.exploded.upper()}]:{port}")
    assert exploded == upper == parse_destination(udp_text(ip, port))
    assert hash(exploded) == hash(upper)


@given(a=st.ip_addresses(), b=st.ip_addresses(), pa=ports, pb=ports)
def test_equality_matches_address_and_port(a, b, pa, pb):
    da = parse_destination(udp_text(a, pa))
    db = parse_destination(udp_text(b, pb))
    assert (da == db) == (a == b and pa == pb)


@given(path=unix_paths)
def test_unix_path_round_trip(path):
    dest = parse_destination(path)
    assert dest.host == path == dest.sockaddr
    assert str(dest) == f"unix:{path}"
    assert parse_destination(str(dest)) == dest


@given(name=abstract_names)
def test_abstract_round_trip(name):
    dest = parse_destination(f"unix:@{name}")
    assert dest.sockaddr == "\0" + name
    assert str(dest) == f"unix:@{name}"
    assert parse_destination(str(dest)) == dest
