"""Tests for the tcp:, rabbitmq: and virtual: destinations of
mpevent.protocol.destination (parsing, errors, canonical printing, password
masking, round trips, from_spec) and the allow-list's rules for them."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpevent.protocol import destination as destination_module
from mpevent.protocol.destination import (
    MAX_VIRTUAL_MEMBERS,
    BrokerDestination,
    Destination,
    DestinationError,
    StreamDestination,
    VirtualDestination,
    from_spec,
    parse_destination,
)
from mpevent.protocol.policy import DestinationPolicy, DestinationRefused

V4 = socket.AF_INET
V6 = socket.AF_INET6

# --- helpers -----------------------------------------------------------------


def fake_resolver(*addresses: str) -> Any:
    """A getaddrinfo-shaped resolver for ``addresses``; ``.calls`` records
    each (host, port) it was asked about."""
    calls: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> Iterable[tuple[Any, ...]]:
        calls.append((host, port))
        out = []
        for address in addresses:
            if ipaddress.ip_address(address).version == 4:
                out.append((V4, socket.SOCK_STREAM, 6, "", (address, port)))
            else:
                out.append((V6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
        return out

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


def failing_resolver(host: str, port: int) -> Iterable[tuple[Any, ...]]:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def error_of(text: str, **kwargs: Any) -> str:
    with pytest.raises(DestinationError) as info:
        parse_destination(text, **kwargs)
    return str(info.value)


def assert_error(text: str, *fragments: str, shown: str | None = None, **kwargs: Any) -> None:
    """``text`` is refused with a message quoting it (as ``shown``, when it
    holds a password) and containing every fragment."""
    message = error_of(text, **kwargs)
    assert message.startswith(f"invalid destination {shown or text!r}: "), message
    for fragment in fragments:
        assert fragment in message, message


def round_trips(dest: Destination) -> None:
    assert parse_destination(dest.spec(), resolve=failing_resolver) == dest
    assert from_spec(dest.spec()) == dest


# --- tcp: ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "printed"),
    [
        (
            "tcp:127.0.0.1:9000",
            StreamDestination("tcp", V4, "127.0.0.1", 9000),
            "tcp:127.0.0.1:9000",
        ),
        (
            "TCP:127.0.0.1:09000",
            StreamDestination("tcp", V4, "127.0.0.1", 9000),
            "tcp:127.0.0.1:9000",
        ),
        (
            "tcp:[0:0::1]:9000/METHOD;reliable;timeout=500",
            StreamDestination("tcp", V6, "::1", 9000, "METHOD", True, 500),
            "tcp:[::1]:9000/METHOD;reliable;timeout=500",
        ),
        (
            "tcp:127.0.0.1:1;timeout=600000;reliable",  # order of options is free
            StreamDestination("tcp", V4, "127.0.0.1", 1, "", True, 600000),
            "tcp:127.0.0.1:1;reliable;timeout=600000",
        ),
        (
            "tcp:127.0.0.1:9;reliable;timeout=1000",  # the default is not printed
            StreamDestination("tcp", V4, "127.0.0.1", 9, "", True, 1000),
            "tcp:127.0.0.1:9;reliable",
        ),
        (
            "tcp:127.0.0.1:9;reliable;timeout=1",
            StreamDestination("tcp", V4, "127.0.0.1", 9, "", True, 1),
            "tcp:127.0.0.1:9;reliable;timeout=1",
        ),
        (
            'tcp:127.0.0.1:9/ev.é:"x"{}',  # any printable character but ";" and "/"
            StreamDestination("tcp", V4, "127.0.0.1", 9, 'ev.é:"x"{}'),
            'tcp:127.0.0.1:9/ev.é:"x"{}',
        ),
    ],
)
def test_tcp_forms(text, expected, printed):
    dest = parse_destination(text, resolve=failing_resolver)  # literals never resolve
    assert dest == expected
    assert type(dest) is StreamDestination
    assert str(dest) == printed == dest.spec()
    assert not dest.relayed
    assert dest.members() == (dest,)
    assert parse_destination(str(dest)) == dest
    round_trips(dest)


def test_tcp_method_limit_counts_utf8_bytes():
    fits = "é" * 127 + "x"  # 255 bytes
    assert parse_destination(f"tcp:127.0.0.1:9/{fits}").method == fits
    assert_error(f"tcp:127.0.0.1:9/{fits}x", "method too long (256 bytes UTF-8, max 255)")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("tcp:", "missing host and port"),
        ("tcp:127.0.0.1", "missing port"),
        ("tcp:127.0.0.1:", "missing port"),
        ("tcp:127.0.0.1:0", "port 0 out of range 1-65535"),
        ("tcp:127.0.0.1:x/M", "port 'x' is not a number"),
        ("tcp:::1:9", "must be in brackets, e.g. tcp:[::1]:PORT"),
        ("tcp:x[::1]:9", "'[' must come right after 'tcp:'"),
        ("tcp:[::1:9", "unbalanced '['"),
        ("tcp:[::1]", "missing port"),
        ("tcp:[fe80::1%eth0]:9", "zone id"),
        ("tcp:127.1:9", "invalid IPv4 address"),
        ("tcp:127.0.0.1:9/", "empty method after '/'"),
        ("tcp:127.0.0.1:9/a/b", "method 'a/b' may not contain '/'"),
        ("tcp:127.0.0.1:9/M;", "empty option"),
        ("tcp:127.0.0.1:9;;reliable", "empty option"),
        ("tcp:127.0.0.1:9;RELIABLE", "unknown option 'RELIABLE' (known: reliable, timeout=MS)"),
        ("tcp:127.0.0.1:9;retries=3", "unknown option 'retries=3' (known: reliable, timeout=MS)"),
        ("tcp:127.0.0.1:9;reliable;reliable", "option 'reliable' given twice"),
        ("tcp:127.0.0.1:9;reliable=1", "option 'reliable' takes no value"),
        ("tcp:127.0.0.1:9;timeout=500", "option 'timeout' needs ';reliable'"),
        ("tcp:127.0.0.1:9;reliable;timeout", "needs a value in milliseconds"),
        ("tcp:127.0.0.1:9;reliable;timeout=", "needs a value in milliseconds"),
        ("tcp:127.0.0.1:9;reliable;timeout=0", "timeout 0 out of range 1-600000"),
        ("tcp:127.0.0.1:9;reliable;timeout=600001", "timeout 600001 out of range 1-600000"),
        ("tcp:127.0.0.1:9;reliable;timeout=" + "9" * 5000, "out of range 1-600000"),
        ("tcp:127.0.0.1:9;reliable;timeout=-5", "timeout '-5' is not a number"),
        ("tcp:127.0.0.1:9;reliable;timeout=1.5", "timeout '1.5' is not a number"),
        ("tcp:127.0.0.1:9;reliable;timeout=\u0665", "is not a number"),  # Arabic-Indic five
        ("tcp:127.0.0.1:9;reliable;timeout=5;timeout=6", "option 'timeout' given twice"),
        ("tcp:127.0.0.1:9 /M", "whitespace"),
        ("tcp:127.0.0.1:9/M\t", "whitespace"),
    ],
)
def test_tcp_errors(text, fragment):
    assert_error(text, fragment, resolve=failing_resolver)


def test_tcp_host_name_resolves_once_for_streams(monkeypatch):
    """By default a tcp host is looked up for SOCK_STREAM (udp: SOCK_DGRAM)."""
    asked: list[tuple[str, int, Any]] = []

    def getaddrinfo(host, port, *args, type=0, **kwargs):
        asked.append((host, port, type))
        return [(V4, type, 6, "", ("192.0.2.9", port))]

    monkeypatch.setattr(destination_module.socket, "getaddrinfo", getaddrinfo)
    dest = parse_destination("tcp:events.example.test:9000/M")
    assert asked == [("events.example.test", 9000, socket.SOCK_STREAM)]
    assert str(dest) == "tcp:192.0.2.9:9000/M"
    parse_destination("udp:events.example.test:9000")
    assert asked[-1] == ("events.example.test", 9000, socket.SOCK_DGRAM)
    # The canonical text holds the number: parsing it back asks nobody.
    assert parse_destination(str(dest)) == dest
    assert len(asked) == 2


def test_tcp_injected_resolver_and_ipv4_preference():
    resolve = fake_resolver("2001:db8::5", "192.0.2.5")
    dest = parse_destination("tcp:dual.example.test:77;reliable", resolve=resolve)
    assert resolve.calls == [("dual.example.test", 77)]
    assert dest == StreamDestination("tcp", V4, "192.0.2.5", 77, "", True)
    v6 = parse_destination("tcp:v6.example.test:77", resolve=fake_resolver("2001:0db8::1"))
    assert str(v6) == "tcp:[2001:db8::1]:77"


def test_tcp_checks_everything_before_resolving():
    resolve = fake_resolver("192.0.2.1")
    assert_error("tcp:example.test:9;bogus", "unknown option 'bogus'", resolve=resolve)
    assert_error("tcp:example.test:9/", "empty method", resolve=resolve)
    assert_error("tcp:example.test:0", "out of range", resolve=resolve)
    assert resolve.calls == []
    assert parse_destination("tcp:example.test:9", resolve=resolve).host == "192.0.2.1"
    assert resolve.calls == [("example.test", 9)]
    assert_error("tcp:empty.test:9", "cannot resolve host 'empty.test'", resolve=fake_resolver())
    assert_error("tcp:nosuch.invalid:9", "Name or service not known", resolve=failing_resolver)


def test_tcp_localhost_resolves_without_network():
    dest = parse_destination("tcp:localhost:9000")
    assert ipaddress.ip_address(dest.host).is_loopback
    assert parse_destination(str(dest)) == dest


def test_tcp_sockaddr_connects_to_a_real_listener():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        dest = parse_destination(f"tcp:127.0.0.1:{port}/M;reliable")
        with socket.socket(dest.family, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(dest.sockaddr)
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                assert peer.recv(16) == b"ping"


def test_tcp_ipv6_sockaddr_connects_to_a_real_listener():
    try:
        server = socket.create_server(("::1", 0), family=V6)
    except OSError as exc:  # e.g. ::1 not configured in a container
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    with server:
        dest = parse_destination(f"tcp:[::1]:{server.getsockname()[1]}")
        with socket.socket(dest.family, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(dest.sockaddr)
            server.accept()[0].close()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("tcp:127.0.0.1:9", "udp:127.0.0.1:9"),  # another transport
        ("tcp:127.0.0.1:9", "tcp:127.0.0.1:9/M"),
        ("tcp:127.0.0.1:9/M", "tcp:127.0.0.1:9/m"),  # methods are case-sensitive
        ("tcp:127.0.0.1:9", "tcp:127.0.0.1:9;reliable"),
        ("tcp:127.0.0.1:9;reliable", "tcp:127.0.0.1:9;reliable;timeout=999"),
    ],
)
def test_tcp_different_destinations_differ(a, b):
    assert parse_destination(a) != parse_destination(b)
    assert len({parse_destination(a), parse_destination(b)}) == 2


def test_tcp_spellings_of_one_destination_are_equal():
    spellings = [
        "tcp:[::1]:9/M;reliable",
        "TCP:[0:0::1]:09/M;reliable;timeout=1000",
        "tcp:[0000::0001]:9/M;timeout=1000;reliable",
    ]
    assert len({parse_destination(s) for s in spellings}) == 1


# --- rabbitmq: -----------------------------------------------------------------


def broker(**fields: Any) -> BrokerDestination:
    base: dict[str, Any] = {"kind": "rabbitmq", "family": V4, "host": "127.0.0.1", "port": 5672}
    return BrokerDestination(**(base | fields))


@pytest.mark.parametrize(
    ("text", "expected", "printed"),
    [
        ("rabbitmq:127.0.0.1/pike", broker(routing_key="pike"), "rabbitmq:127.0.0.1:5672/pike"),
        (
            "rabbitmq:guest:guest@127.0.0.1:5672/pike",  # OpenSIPS's own example, same socket
            broker(routing_key="pike"),
            "rabbitmq:127.0.0.1:5672/pike",
        ),
        (
            "RabbitMQ:127.0.0.1:05673/pike",
            broker(port=5673, routing_key="pike"),
            "rabbitmq:127.0.0.1:5673/pike",
        ),
        (
            "rabbitmq:[0::1]/k",
            broker(family=V6, host="::1", routing_key="k"),
            "rabbitmq:[::1]:5672/k",
        ),
        (
            "rabbitmq:[::1]:1/k",
            broker(family=V6, host="::1", port=1, routing_key="k"),
            "rabbitmq:[::1]:1/k",
        ),
        # "user@" keeps the default password, as in OpenSIPS; "user:@" is an empty one.
        ("rabbitmq:bob@127.0.0.1/k", broker(user="bob", routing_key="k"), None),
        ("rabbitmq:bob:@127.0.0.1/k", broker(user="bob", password="", routing_key="k"), None),
        (
            "rabbitmq:guest:@127.0.0.1/k",
            broker(password="", routing_key="k"),
            "rabbitmq:guest:@127.0.0.1:5672/k",
        ),
        (
            "rabbitmq:bob:guest@127.0.0.1/k",
            broker(user="bob", routing_key="k"),
            "rabbitmq:bob@127.0.0.1:5672/k",
        ),
        (
            "rabbitmq:bob:s3cr:t@x@127.0.0.1/exchange=ev;persistent?key",
            broker(
                user="bob", password="s3cr:t@x", exchange="ev", persistent=True, routing_key="key"
            ),
            "rabbitmq:bob:***@127.0.0.1:5672/exchange=ev;persistent?key",
        ),
        (
            "rabbitmq:a@b@127.0.0.1/k",  # the last "@" ends the userinfo
            broker(user="a@b", routing_key="k"),
            "rabbitmq:a@b@127.0.0.1:5672/k",
        ),
        (
            "rabbitmq:127.0.0.1/connect_timeout=60000;heartbeat=0;max_age=86400000;"
            "persistent;vhost=/prod;exchange=a-b_c.d:e?r.k",  # printed in the fixed order
            broker(
                exchange="a-b_c.d:e",
                vhost="/prod",
                persistent=True,
                max_age_ms=86400000,
                heartbeat_s=0,
                connect_timeout_ms=60000,
                routing_key="r.k",
            ),
            "rabbitmq:127.0.0.1:5672/exchange=a-b_c.d:e;vhost=/prod;persistent;"
            "max_age=86400000;heartbeat=0;connect_timeout=60000?r.k",
        ),
        (
            "rabbitmq:127.0.0.1/vhost=/;heartbeat=10;connect_timeout=2000;max_age=0?k",  # defaults
            broker(routing_key="k"),
            "rabbitmq:127.0.0.1:5672/k",
        ),
        (
            "rabbitmq:127.0.0.1/max_age=1;heartbeat=600;connect_timeout=1?k",
            broker(max_age_ms=1, heartbeat_s=600, connect_timeout_ms=1, routing_key="k"),
            "rabbitmq:127.0.0.1:5672/max_age=1;heartbeat=600;connect_timeout=1?k",
        ),
        (
            "rabbitmq:127.0.0.1/exchange=ev?",  # an empty key with an exchange (fanout)
            broker(exchange="ev"),
            "rabbitmq:127.0.0.1:5672/exchange=ev?",
        ),
        (
            "rabbitmq:127.0.0.1/?a?b;c=d",  # empty params: the key may hold "?", ";", "="
            broker(routing_key="a?b;c=d"),
            "rabbitmq:127.0.0.1:5672/?a?b;c=d",
        ),
        (
            "rabbitmq:127.0.0.1/exchange=e?a?b",
            broker(exchange="e", routing_key="a?b"),
            "rabbitmq:127.0.0.1:5672/exchange=e?a?b",
        ),
        (
            "rabbitmq:127.0.0.1/a/b:c=d@e",  # no "?": the whole path is the key
            broker(routing_key="a/b:c=d@e"),
            "rabbitmq:127.0.0.1:5672/a/b:c=d@e",
        ),
        (
            "rabbitmq:127.0.0.1/vhost=é/x=y?k",  # a vhost is any 1-255 bytes
            broker(vhost="é/x=y", routing_key="k"),
            "rabbitmq:127.0.0.1:5672/vhost=é/x=y?k",
        ),
    ],
)
def test_rabbitmq_forms(text, expected, printed):
    dest = parse_destination(text, resolve=failing_resolver)
    assert dest == expected
    assert type(dest) is BrokerDestination
    assert dest.relayed
    assert dest.members() == (dest,)
    if printed is not None:
        assert str(dest) == printed
    round_trips(dest)
    if dest.password in ("guest", ""):  # nothing secret: the printed text is the spec
        assert str(dest) == dest.spec()
        assert parse_destination(str(dest)) == dest


def test_rabbitmq_credentials_are_printed_only_when_not_the_defaults():
    cases = {
        "rabbitmq:127.0.0.1/k": "rabbitmq:127.0.0.1:5672/k",
        "rabbitmq:bob@127.0.0.1/k": "rabbitmq:bob@127.0.0.1:5672/k",
        "rabbitmq:bob:@127.0.0.1/k": "rabbitmq:bob:@127.0.0.1:5672/k",
        "rabbitmq:bob:pw@127.0.0.1/k": "rabbitmq:bob:***@127.0.0.1:5672/k",
        "rabbitmq:guest:pw@127.0.0.1/k": "rabbitmq:guest:***@127.0.0.1:5672/k",
    }
    for text, printed in cases.items():
        assert str(parse_destination(text)) == printed


def test_rabbitmq_password_is_masked_in_str_repr_and_errors_but_kept_in_spec():
    secret = "Zq7:x@Yv"
    dest = parse_destination(f"rabbitmq:bob:{secret}@127.0.0.1/k")
    assert dest.password == secret
    assert secret not in str(dest)
    assert secret not in repr(dest)
    assert "password='***'" in repr(dest)
    assert repr(dest).startswith("BrokerDestination(kind='rabbitmq', family=")
    assert secret not in f"{dest}" + "%s" % (dest,)  # noqa: UP031 (both ways of formatting)
    assert secret not in repr([dest, {"d": dest}])
    assert dest.spec() == f"rabbitmq:bob:{secret}@127.0.0.1:5672/k"
    # An error quotes the input with the password masked, whatever the problem.
    for bad in (
        f"rabbitmq:bob:{secret}@127.0.0.1",
        f"rabbitmq:bob:{secret}@127.0.0.1:0/k",
        f"rabbitmq:bob:{secret}@nosuch.invalid/k",
        f"rabbitmq:bob:{secret}@127.0.0.1/bogus?k",
        f"virtual:FAILOVER udp:127.0.0.1:9 rabbitmq:bob:{secret}@127.0.0.1:0/k",
        f"virtual:failover rabbitmq:bob:{secret}@127.0.0.1/k",
    ):
        message = error_of(bad, resolve=failing_resolver)
        assert secret not in message, message
        assert "bob:***@" in message, message


def test_rabbitmq_empty_password_shows_in_repr_as_empty():
    assert "password=''" in repr(parse_destination("rabbitmq:bob:@127.0.0.1/k"))


def test_rabbitmq_routing_key_limit_counts_utf8_bytes():
    fits = "é" * 127 + "k"  # 255 bytes
    assert parse_destination(f"rabbitmq:127.0.0.1/{fits}").routing_key == fits
    assert_error(f"rabbitmq:127.0.0.1/{fits}k", "routing key too long (256 bytes UTF-8, max 255)")


def test_rabbitmq_name_limits():
    exchange = "e" * 255
    assert parse_destination(f"rabbitmq:127.0.0.1/exchange={exchange}?k").exchange == exchange
    assert_error(f"rabbitmq:127.0.0.1/exchange={exchange}e?k", "exchange name", "not valid")
    vhost = "é" * 127 + "v"  # 255 bytes
    assert parse_destination(f"rabbitmq:127.0.0.1/vhost={vhost}?k").vhost == vhost
    assert_error(f"rabbitmq:127.0.0.1/vhost={vhost}v?k", "vhost must be 1-255 bytes UTF-8, not 256")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("rabbitmq:", "missing /routing_key"),
        ("rabbitmq:127.0.0.1", "missing /routing_key"),
        ("rabbitmq:bob:pw@127.0.0.1:5672", "missing /routing_key"),
        ("rabbitmq:/k", "missing host"),
        ("rabbitmq:bob@/k", "empty host after '@'"),
        ("rabbitmq:@127.0.0.1/k", "empty user name before '@'"),
        ("rabbitmq::pw@127.0.0.1/k", "empty user name before '@'"),
        ("rabbitmq:127.0.0.1:/k", "missing port"),
        ("rabbitmq:127.0.0.1:0/k", "port 0 out of range 1-65535"),
        ("rabbitmq:127.0.0.1:amqp/k", "port 'amqp' is not a number"),
        ("rabbitmq:::1/k", "must be in brackets, e.g. rabbitmq:[::1]:5672/KEY"),
        ("rabbitmq:x[::1]/k", "'[' must come right after 'rabbitmq:' or '@'"),
        ("rabbitmq:[::1/k", "unbalanced '['"),
        ("rabbitmq:[::1]5672/k", "unexpected '5672' after ']'"),
        ("rabbitmq:[zz::1]/k", "invalid IPv6 address"),
        ("rabbitmq:127.1/k", "invalid IPv4 address"),
        ("rabbitmq:127.0.0.1/", "empty routing key (allowed only with exchange=NAME)"),
        ("rabbitmq:127.0.0.1/?", "empty routing key"),
        ("rabbitmq:127.0.0.1/persistent?", "empty routing key"),
        ("rabbitmq:127.0.0.1/ev?k", "unknown param 'ev' (known: exchange=NAME, vhost=NAME"),
        ("rabbitmq:127.0.0.1/ev;persistent?k", "; an exchange is given as exchange=NAME"),
        ("rabbitmq:127.0.0.1/queue=q?k", "unknown param 'queue=q' (known: exchange=NAME, vhost"),
        ("rabbitmq:127.0.0.1/Exchange=e?k", "unknown param 'Exchange=e'"),
        ("rabbitmq:127.0.0.1/tls_domain=rmq?k", "'tls_domain' is not supported"),
        ("rabbitmq:127.0.0.1/exchange=a;exchange=b?k", "param 'exchange' given twice"),
        ("rabbitmq:127.0.0.1/persistent;persistent?k", "param 'persistent' given twice"),
        ("rabbitmq:127.0.0.1/persistent=1?k", "param 'persistent' takes no value"),
        ("rabbitmq:127.0.0.1/exchange?k", "param 'exchange' needs a value (exchange=...)"),
        ("rabbitmq:127.0.0.1/heartbeat?k", "param 'heartbeat' needs a value"),
        ("rabbitmq:127.0.0.1/exchange=?k", "empty exchange name"),
        ("rabbitmq:127.0.0.1/exchange=a/b?k", "exchange name 'a/b' is not valid"),
        ("rabbitmq:127.0.0.1/exchange=é?k", "exchange name 'é' is not valid"),
        ("rabbitmq:127.0.0.1/vhost=?k", "vhost must be 1-255 bytes UTF-8, not 0"),
        ("rabbitmq:127.0.0.1/exchange=e;?k", "empty param"),
        ("rabbitmq:127.0.0.1/;exchange=e?k", "empty param"),
        ("rabbitmq:127.0.0.1/max_age=86400001?k", "max_age 86400001 out of range 0-86400000"),
        ("rabbitmq:127.0.0.1/max_age=1s?k", "max_age '1s' is not a number"),
        ("rabbitmq:127.0.0.1/heartbeat=601?k", "heartbeat 601 out of range 0-600"),
        ("rabbitmq:127.0.0.1/heartbeat=-1?k", "heartbeat '-1' is not a number"),
        ("rabbitmq:127.0.0.1/connect_timeout=0?k", "connect_timeout 0 out of range 1-60000"),
        ("rabbitmq:127.0.0.1/connect_timeout=60001?k", "connect_timeout 60001 out of range"),
        ("rabbitmq:127.0.0.1/k ey", "whitespace"),
        ("rabbitmq:127.0.0.1/k\x00", "control character"),
    ],
)
def test_rabbitmq_errors(text, fragment):
    shown = text.replace(":pw@", ":***@")  # the quoted input never shows the password
    assert_error(text, fragment, shown=shown, resolve=failing_resolver)


def test_rabbitmq_unknown_param_message_lists_every_known_one():
    message = error_of("rabbitmq:127.0.0.1/retries=3?k")
    for known in (
        "exchange=NAME",
        "vhost=NAME",
        "persistent",
        "max_age=MS",
        "heartbeat=S",
        "connect_timeout=MS",
    ):
        assert known in message, message
    assert "an exchange is given as" not in message  # only for a bare word


def test_rabbitmq_host_name_resolves_for_streams(monkeypatch):
    asked: list[tuple[str, int, Any]] = []

    def getaddrinfo(host, port, *args, type=0, **kwargs):
        asked.append((host, port, type))
        return [(V6, type, 6, "", ("2001:db8::7", port, 0, 0))]

    monkeypatch.setattr(destination_module.socket, "getaddrinfo", getaddrinfo)
    dest = parse_destination("rabbitmq:bob:pw@broker.example.test/k")
    assert asked == [("broker.example.test", 5672, socket.SOCK_STREAM)]
    assert dest.spec() == "rabbitmq:bob:pw@[2001:db8::7]:5672/k"


def test_rabbitmq_checks_everything_before_resolving():
    resolve = fake_resolver("192.0.2.1")
    assert_error("rabbitmq:broker.test/bogus?k", "unknown param", resolve=resolve)
    assert_error("rabbitmq:broker.test/", "empty routing key", resolve=resolve)
    assert_error("rabbitmq:broker.test:0/k", "out of range", resolve=resolve)
    assert resolve.calls == []
    assert parse_destination("rabbitmq:broker.test:99/k", resolve=resolve).host == "192.0.2.1"
    assert resolve.calls == [("broker.test", 99)]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("rabbitmq:127.0.0.1/k", "rabbitmq:127.0.0.1/K"),
        ("rabbitmq:127.0.0.1/k", "rabbitmq:127.0.0.1:5673/k"),
        ("rabbitmq:bob:a@127.0.0.1/k", "rabbitmq:bob:b@127.0.0.1/k"),
        ("rabbitmq:bob@127.0.0.1/k", "rabbitmq:bob:@127.0.0.1/k"),  # guest vs empty
        ("rabbitmq:127.0.0.1/k", "rabbitmq:127.0.0.1/persistent?k"),
        ("rabbitmq:127.0.0.1/k", "rabbitmq:127.0.0.1/exchange=e?k"),
        ("rabbitmq:127.0.0.1/k", "rabbitmq:127.0.0.1/vhost=v?k"),
        ("rabbitmq:127.0.0.1/k", "tcp:127.0.0.1:5672/k"),
    ],
)
def test_rabbitmq_different_destinations_differ(a, b):
    assert parse_destination(a) != parse_destination(b)
    assert len({parse_destination(a), parse_destination(b)}) == 2


def test_rabbitmq_spellings_of_one_destination_are_equal():
    spellings = [
        "rabbitmq:127.0.0.1/exchange=e;persistent?k",
        "rabbitmq:guest:guest@127.0.0.1:5672/persistent;exchange=e?k",
        "RABBITMQ:guest@127.0.0.1:05672/heartbeat=10;persistent;exchange=e;vhost=/?k",
        "rabbitmq:h.example.test/exchange=e;persistent?k",
    ]
    parsed = {parse_destination(s, resolve=fake_resolver("127.0.0.1")) for s in spellings}
    assert len(parsed) == 1


# --- virtual: ------------------------------------------------------------------

UDP9 = "udp:127.0.0.1:9"
TCP9000 = "tcp:127.0.0.1:9000"


@pytest.mark.parametrize("policy", ["PARALLEL", "FAILOVER", "ROUND-ROBIN"])
def test_virtual_policies(policy):
    dest = parse_destination(f"virtual:{policy} {UDP9} {TCP9000}")
    assert type(dest) is VirtualDestination
    assert (dest.kind, dest.family, dest.host, dest.port) == ("virtual", 0, "", 0)
    assert dest.policy == policy
    assert set(dest.members()) == {parse_destination(UDP9), parse_destination(TCP9000)}
    assert not dest.relayed
    round_trips(dest)
    assert parse_destination(str(dest)) == dest


def test_virtual_printing_and_blanks():
    dest = parse_destination(f"virtual: \tFAILOVER\t\t{UDP9}    tcp:[0::1]:09000;reliable \t")
    assert str(dest) == "virtual:FAILOVER udp:127.0.0.1:9 tcp:[::1]:9000;reliable"
    assert dest.group == (
        Destination("udp", V4, "127.0.0.1", 9),
        StreamDestination("tcp", V6, "::1", 9000, "", True),
    )


def test_virtual_members_of_every_other_kind():
    text = (
        "virtual:FAILOVER udp:[::1]:9 /tmp/a.sock unix:@abstract tcp:127.0.0.1:9/M;reliable "
        "rabbitmq:bob:pw@127.0.0.1/exchange=e?k"
    )
    dest = parse_destination(text)
    assert [m.kind for m in dest.members()] == ["udp", "unix", "unix", "tcp", "rabbitmq"]
    assert str(dest) == (
        "virtual:FAILOVER udp:[::1]:9 unix:/tmp/a.sock unix:@abstract tcp:127.0.0.1:9/M;reliable "
        "rabbitmq:bob:***@127.0.0.1:5672/exchange=e?k"
    )
    assert dest.spec() == str(dest).replace("***", "pw")
    assert "pw" not in repr(dest)
    round_trips(dest)


def test_virtual_member_order_matters_except_for_parallel():
    """OpenSIPS matches PARALLEL sockets with the same members in any order;
    FAILOVER and ROUND-ROBIN order the members."""
    for policy in ("FAILOVER", "ROUND-ROBIN"):
        ab = parse_destination(f"virtual:{policy} {UDP9} {TCP9000}")
        ba = parse_destination(f"virtual:{policy} {TCP9000} {UDP9}")
        assert ab != ba
        assert [str(m) for m in ab.members()] == [UDP9, TCP9000]
    ab = parse_destination(f"virtual:PARALLEL {UDP9} {TCP9000}")
    ba = parse_destination(f"virtual:PARALLEL {TCP9000} {UDP9}")
    assert ab == ba
    assert hash(ab) == hash(ba)
    assert str(ab) == str(ba)
    assert parse_destination(f"virtual:FAILOVER {UDP9} {TCP9000}") != ab  # another policy


def test_virtual_members_use_the_injected_resolver():
    resolve = fake_resolver("127.0.0.5")
    dest = parse_destination(
        "virtual:ROUND-ROBIN udp:a.test:1 tcp:b.test:2 rabbitmq:c.test/k", resolve=resolve
    )
    assert resolve.calls == [("a.test", 1), ("b.test", 2), ("c.test", 5672)]
    assert str(dest) == (
        "virtual:ROUND-ROBIN udp:127.0.0.5:1 tcp:127.0.0.5:2 rabbitmq:127.0.0.5:5672/k"
    )


def test_virtual_member_limit():
    members = [f"udp:127.0.0.1:{port}" for port in range(1, MAX_VIRTUAL_MEMBERS + 2)]
    assert MAX_VIRTUAL_MEMBERS == 8
    fits = parse_destination("virtual:FAILOVER " + " ".join(members[:-1]))
    assert len(fits.members()) == MAX_VIRTUAL_MEMBERS
    assert_error("virtual:FAILOVER " + " ".join(members), "too many members (9, max 8)")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("virtual:", "missing policy (PARALLEL, FAILOVER, ROUND-ROBIN) and members"),
        ("virtual: \t", "missing policy"),
        ("virtual:FAILOVER", "no members after FAILOVER"),
        ("virtual:PARALLEL  ", "no members after PARALLEL"),
        (f"virtual:failover {UDP9}", "policy 'failover' must be uppercase (FAILOVER)"),
        (f"virtual:Parallel {UDP9}", "policy 'Parallel' must be uppercase (PARALLEL)"),
        (f"virtual:round-robin {UDP9}", "must be uppercase (ROUND-ROBIN)"),
        (
            f"virtual:BROADCAST {UDP9}",
            "unknown policy 'BROADCAST' (expected PARALLEL, FAILOVER, ROUND-ROBIN)",
        ),
        (f"virtual:ROUND_ROBIN {UDP9}", "unknown policy 'ROUND_ROBIN'"),
        (f"virtual:{UDP9}", "unknown policy 'udp:127.0.0.1:9'"),
        (f"virtual:PARALLEL {UDP9} virtual:FAILOVER", "member 2 'virtual:FAILOVER' is virtual"),
        (f"virtual:PARALLEL VIRTUAL:PARALLEL {UDP9}", "member 1 'VIRTUAL:PARALLEL' is virtual"),
        (
            f"virtual:FAILOVER {UDP9} udp:127.0.0.1:09",
            "member 2 'udp:127.0.0.1:09' is the same as member 1",
        ),
        (
            "virtual:PARALLEL /tmp/x.sock unix:/tmp/x.sock",
            "member 2 'unix:/tmp/x.sock' is the same as member 1",
        ),
        (
            f"virtual:FAILOVER {UDP9} udp:127.0.0.1:0",
            "member 2 'udp:127.0.0.1:0': port 0 out of range 1-65535",
        ),
        (
            f"virtual:FAILOVER {UDP9} sctp:127.0.0.1:9",
            "member 2 'sctp:127.0.0.1:9': unknown scheme 'sctp'",
        ),
        (
            "virtual:FAILOVER tcp:127.0.0.1:9;reliable;bogus",
            "member 1 'tcp:127.0.0.1:9;reliable;bogus': unknown option 'bogus'",
        ),
        (
            "virtual:FAILOVER rabbitmq:127.0.0.1",
            "member 1 'rabbitmq:127.0.0.1': missing /routing_key",
        ),
        (f"virtual:FAILOVER {UDP9}\n{TCP9000}", "whitespace or control character '\\n'"),
        (f"virtual:FAILOVER {UDP9}\r", "whitespace or control character '\\r'"),
        (f"virtual:FAILOVER {UDP9}\xa0{TCP9000}", "whitespace or control character '\\xa0'"),
        (f"virtual:FAILOVER {UDP9}\u2003{TCP9000}", "whitespace or control character"),
        (f"virtual:FAILOVER {UDP9}\x0b", "whitespace or control character"),
        (f"virtual:FAILOVER {UDP9}\x00", "control character"),
        (f" virtual:FAILOVER {UDP9}", "whitespace or control character ' ' at index 0"),
        (f"virtual :FAILOVER {UDP9}", "whitespace or control character ' ' at index 7"),
    ],
)
def test_virtual_errors(text, fragment):
    assert_error(text, fragment, resolve=failing_resolver)


@pytest.mark.parametrize(
    "text", ["udp:127.0.0.1: 9", "udp:127.0.0.1:9\t", "tcp:127.0.0.1:9 ", "rabbitmq:127.0.0.1/a b"]
)
def test_blanks_stay_errors_outside_virtual(text):
    assert_error(text, "whitespace or control character")


def test_virtual_member_errors_name_the_member_and_mask_it():
    message = error_of("virtual:FAILOVER udp:127.0.0.1:9 rabbitmq:bob:hunter2@127.0.0.1:x/k")
    assert "member 2 'rabbitmq:bob:***@127.0.0.1:x/k': port 'x' is not a number" in message
    assert "hunter2" not in message


# --- every scheme, from_spec ---------------------------------------------------


@pytest.mark.parametrize("text", ["sctp:127.0.0.1:9", "amqp://127.0.0.1/", "kafka:127.0.0.1:9092"])
def test_unknown_scheme_lists_every_scheme(text):
    assert_error(text, "(expected udp:, unix:, tcp:, rabbitmq: or virtual:)")


def test_no_scheme_lists_every_scheme_and_paths():
    assert_error("x.sock", "(expected udp:, unix:, tcp:, rabbitmq:, virtual: or an absolute path)")


def test_from_spec_parses_canonical_text_without_dns_and_caches(monkeypatch):
    dest = parse_destination(
        "virtual:FAILOVER tcp:h.test:9;reliable rabbitmq:bob:pw@h.test/persistent?k",
        resolve=fake_resolver("192.0.2.3"),
    )

    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"from_spec resolved a name: {args}")

    monkeypatch.setattr(destination_module.socket, "getaddrinfo", no_dns)
    spec = dest.spec()
    assert from_spec(spec) == dest
    hits = from_spec.cache_info().hits
    assert from_spec(spec) is from_spec(spec)
    assert from_spec.cache_info().hits == hits + 2
    assert from_spec.cache_info().maxsize == 4096
    with pytest.raises(DestinationError, match="missing /routing_key"):
        from_spec("rabbitmq:127.0.0.1")


def test_destination_error_carries_the_bare_problem():
    with pytest.raises(DestinationError) as info:
        parse_destination("tcp:127.0.0.1:0")
    assert info.value.problem == "port 0 out of range 1-65535"


def test_new_destinations_are_frozen_and_slotted():
    for text in ("tcp:127.0.0.1:9", "rabbitmq:127.0.0.1/k", f"virtual:PARALLEL {UDP9}"):
        dest = parse_destination(text)
        with pytest.raises(AttributeError):
            dest.port = 1  # type: ignore[misc]
        assert not hasattr(dest, "__dict__")


# --- property-based round trips ----------------------------------------------------

ports = st.integers(min_value=1, max_value=65535)
# What str.isprintable() and not str.isspace() allow (see tests/test_destination.py).
printable = st.characters(
    codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp")
)


def host_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, spelling: int) -> str:
    if ip.version == 4:
        return str(ip)
    return f"[{(str(ip), ip.exploded, ip.exploded.upper())[spelling]}]"


@st.composite
def tcp_inputs(draw: st.DrawFn) -> tuple[str, StreamDestination]:
    ip = draw(st.ip_addresses())
    port = draw(ports)
    method_chars = printable.filter(lambda c: c not in ";/")
    method = draw(st.none() | st.text(method_chars, min_size=1, max_size=40))
    reliable = draw(st.booleans())
    timeout = draw(st.none() | st.integers(1, 600_000)) if reliable else None
    options = (["reliable"] if reliable else []) + ([f"timeout={timeout}"] if timeout else [])
    options = draw(st.permutations(options))
    scheme = draw(st.sampled_from(["tcp", "TCP", "Tcp"]))
    zeros = draw(st.sampled_from(["", "0", "00"]))
    text = f"{scheme}:{host_text(ip, draw(st.integers(0, 2)))}:{zeros}{port}"
    text += (f"/{method}" if method else "") + "".join(f";{o}" for o in options)
    family = V4 if ip.version == 4 else V6
    expected = StreamDestination(
        "tcp", family, str(ip), port, method or "", reliable, timeout or 1000
    )
    return text, expected


@given(case=tcp_inputs())
def test_tcp_round_trip(case):
    text, expected = case
    dest = parse_destination(text, resolve=failing_resolver)
    assert dest == expected
    assert parse_destination(str(dest), resolve=failing_resolver) == dest
    assert parse_destination(dest.spec(), resolve=failing_resolver) == dest
    assert str(parse_destination(str(dest))) == str(dest)  # canonical: a fixed point


_PARAM_VALUES = {
    "exchange": st.from_regex(r"[A-Za-z0-9_.:-]{1,30}", fullmatch=True),
    "vhost": st.text(printable.filter(lambda c: c not in ";?"), min_size=1, max_size=30),
    "persistent": st.just(True),
    "max_age_ms": st.integers(0, 86_400_000),
    "heartbeat_s": st.integers(0, 600),
    "connect_timeout_ms": st.integers(1, 60_000),
}
_PARAM_NAMES = {"max_age_ms": "max_age", "heartbeat_s": "heartbeat"}
_PARAM_NAMES["connect_timeout_ms"] = "connect_timeout"


@st.composite
def rabbitmq_inputs(draw: st.DrawFn) -> tuple[str, BrokerDestination]:
    ip = draw(st.ip_addresses())
    port = draw(st.none() | ports)
    user = draw(st.none() | st.text(printable.filter(lambda c: c not in ":/"), min_size=1))
    password = None
    if user is not None:
        password = draw(st.none() | st.text(printable.filter(lambda c: c != "/")))
    chosen = draw(st.lists(st.sampled_from(sorted(_PARAM_VALUES)), unique=True))
    params = {name: draw(_PARAM_VALUES[name]) for name in chosen}
    with_question = bool(params) or draw(st.booleans())
    key = draw(st.text(printable, max_size=40))
    if not with_question:
        key = key.replace("?", "")
    if not key and "exchange" not in params:
        key = "k"

    written = [
        name if name == "persistent" else f"{_PARAM_NAMES.get(name, name)}={value}"
        for name, value in params.items()
    ]
    text = "rabbitmq:"
    if user is not None:
        text += user + (f":{password}" if password is not None else "") + "@"
    text += host_text(ip, draw(st.integers(0, 2))) + (f":{port}" if port else "") + "/"
    text += (";".join(written) + "?" if with_question else "") + key
    expected = BrokerDestination(
        "rabbitmq",
        V4 if ip.version == 4 else V6,
        str(ip),
        port or 5672,
        user=user if user is not None else "guest",
        password=password if password is not None else "guest",
        routing_key=key,
        **params,
    )
    return text, expected


@given(case=rabbitmq_inputs())
def test_rabbitmq_round_trip(case):
    text, expected = case
    dest = parse_destination(text, resolve=failing_resolver)
    assert dest == expected
    assert parse_destination(dest.spec(), resolve=failing_resolver) == dest
    assert str(parse_destination(str(dest))) == str(dest)  # canonical: a fixed point
    if dest.password in ("guest", ""):
        assert parse_destination(str(dest), resolve=failing_resolver) == dest
    else:
        assert ":***@" in str(dest)
        assert "password='***'" in repr(dest)
        masked = parse_destination(str(dest))
        assert masked.password == "***"


@given(
    policy=st.sampled_from(["PARALLEL", "FAILOVER", "ROUND-ROBIN"]),
    members=st.lists(tcp_inputs() | rabbitmq_inputs(), min_size=1, max_size=8),
    blanks=st.lists(st.text(" \t", min_size=1, max_size=3), min_size=9, max_size=9),
)
def test_virtual_round_trip(policy, members, blanks):
    unique: dict[Destination, str] = {}
    for text, expected in members:
        unique.setdefault(expected, text)
    text = f"virtual:{policy}" + "".join(
        b + t for b, t in zip(blanks, unique.values(), strict=False)
    )
    dest = parse_destination(text, resolve=failing_resolver)
    assert set(dest.members()) == set(unique)
    assert parse_destination(dest.spec(), resolve=failing_resolver) == dest
    if all(getattr(m, "password", "") in ("guest", "") for m in dest.members()):
        assert parse_destination(str(dest), resolve=failing_resolver) == dest
    elif len({str(m) for m in dest.members()}) == len(dest.members()):
        assert str(parse_destination(str(dest))) == str(dest)  # masked, in the same order


# --- the allow-list ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "tcp:127.0.0.1:9",
        "tcp:[::1]:9/M;reliable",
        "rabbitmq:127.0.0.1/k",
        "rabbitmq:bob:pw@[::1]:5673/exchange=e?k",
        "virtual:FAILOVER udp:127.0.0.1:9 tcp:127.9.0.1:9 rabbitmq:127.0.0.1/k unix:/tmp/a.sock",
    ],
)
def test_default_policy_allows_loopback_for_every_kind(text):
    DestinationPolicy().check(parse_destination(text))


@pytest.mark.parametrize(
    "text",
    ["tcp:192.0.2.1:9", "tcp:[2001:db8::1]:9;reliable", "rabbitmq:192.0.2.1/k", "tcp:0.0.0.0:9"],
)
def test_default_policy_refuses_other_hosts_and_names_the_setting(text):
    dest = parse_destination(text)
    with pytest.raises(DestinationRefused) as info:
        DestinationPolicy().check(dest)
    message = str(info.value)
    assert message.startswith(f"destination {dest} is outside the allowed networks"), message
    assert "security.allowed_networks" in message


def test_refusal_masks_the_broker_password():
    dest = parse_destination("rabbitmq:bob:hunter2@192.0.2.1/k")
    with pytest.raises(DestinationRefused) as info:
        DestinationPolicy().check(dest)
    assert "rabbitmq:bob:***@192.0.2.1:5672/k" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_configured_networks_cover_tcp_and_brokers():
    policy = DestinationPolicy.from_settings(["192.0.2.0/24"])
    policy.check(parse_destination("tcp:192.0.2.7:9"))
    policy.check(parse_destination("rabbitmq:192.0.2.8/k"))
    for text in ("tcp:127.0.0.1:9", "rabbitmq:127.0.0.1/k", "rabbitmq:198.51.100.1/k"):
        with pytest.raises(DestinationRefused, match=r"security\.allowed_networks"):
            policy.check(parse_destination(text))


def test_virtual_is_allowed_only_if_every_member_is():
    policy = DestinationPolicy.from_settings(None, ["/run/subscribers"])
    policy.check(parse_destination("virtual:PARALLEL udp:127.0.0.1:9 unix:/run/subscribers/a"))
    remote = parse_destination(
        "virtual:FAILOVER udp:127.0.0.1:9 rabbitmq:bob:hunter2@192.0.2.1/k tcp:127.0.0.1:9"
    )
    with pytest.raises(DestinationRefused) as info:
        policy.check(remote)
    message = str(info.value)
    assert message.startswith(
        f"member rabbitmq:bob:***@192.0.2.1:5672/k of destination {remote} is outside"
    ), message
    assert "security.allowed_networks" in message
    assert "hunter2" not in message
    stray = parse_destination("virtual:ROUND-ROBIN udp:127.0.0.1:9 unix:/tmp/x.sock")
    with pytest.raises(DestinationRefused, match=r"member unix:/tmp/x\.sock of .*unix_path_prefix"):
        policy.check(stray)


def test_policy_fails_closed_on_what_it_cannot_check():
    with pytest.raises(DestinationRefused, match="no members"):
        DestinationPolicy().check(VirtualDestination("virtual", 0, "", 0))
    nested = VirtualDestination(
        "virtual", 0, "", 0, group=(VirtualDestination("virtual", 0, "", 0),)
    )
    with pytest.raises(DestinationRefused, match="cannot check"):
        DestinationPolicy().check(nested)
