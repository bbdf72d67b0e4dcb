"""Subscriber destinations: parsing, validation and canonical printing.

This module owns the destination strings that event subscribers give, in the
forms OpenSIPS's event transport modules accept:

* ``udp:HOST:PORT`` (event_datagram) -- HOST is an IPv4 literal, a bracketed
  IPv6 literal or a host name (resolved once, at parse time);
* ``unix:/path/to.sock`` or a bare ``/path/to.sock`` -- a Unix datagram socket;
* ``unix:@name`` -- a Linux abstract socket (address ``"\\0name"``);
* ``tcp:HOST:PORT[/METHOD][;reliable][;timeout=MS]`` (event_stream) -- JSON-RPC
  over one TCP connection, a `StreamDestination`; METHOD replaces the event
  name as the JSON-RPC method; ``;reliable`` is OpenSIPS's ``reliable_mode``,
  here given per destination;
* ``rabbitmq:[user[:password]@]host[:port]/[params?]routing_key``
  (event_rabbitmq) -- an AMQP 0-9-1 publish, a `BrokerDestination`; params are
  ``;``-separated: ``exchange=NAME``, ``vhost=NAME``, ``persistent``,
  ``max_age=MS``, ``heartbeat=S``, ``connect_timeout=MS``;
* ``virtual:POLICY member1 member2 ...`` (event_virtual) -- up to
  `MAX_VIRTUAL_MEMBERS` destinations of the other kinds under one
  subscription, a `VirtualDestination`.

It turns such a string into a `Destination`: a small immutable value that is
canonical (two spellings of the same address compare and hash equal), prints
back in canonical form, and knows the address to hand to ``socket.connect``.
It does no socket I/O apart from host name resolution.

Secrets: a broker password is part of the destination (two passwords are two
subscriptions), but ``str(dest)`` and ``repr(dest)`` mask it, and so do the
errors, which quote their input. ``str`` is what every printer uses (the MI's
``subscribers_list``, the CLI, logs, policy refusals), so masking there means
no caller can forget to. The one place the password must survive is the
segment's table, through which the hub hands a subscription to the senders:
it stores `Destination.spec`, which `from_spec` parses back.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, Literal

__all__ = [
    "BROKER_PARAMS",
    "DEFAULT_RABBITMQ_PORT",
    "MAX_VIRTUAL_MEMBERS",
    "SCHEMES",
    "STREAM_OPTIONS",
    "SUN_PATH_MAX",
    "VIRTUAL_POLICIES",
    "BrokerDestination",
    "Destination",
    "DestinationError",
    "Resolver",
    "StreamDestination",
    "VirtualDestination",
    "from_spec",
    "parse_destination",
]

# sun_path is 108 bytes on Linux; a filesystem path needs one of them for the
# terminating NUL, and an abstract name needs one for its leading NUL.
SUN_PATH_MAX = 107

SCHEMES = ("udp:", "unix:", "tcp:", "rabbitmq:", "virtual:")
STREAM_OPTIONS = ("reliable", "timeout=MS")
BROKER_PARAMS = (
    "exchange=NAME",
    "vhost=NAME",
    "persistent",
    "max_age=MS",
    "heartbeat=S",
    "connect_timeout=MS",
)
VIRTUAL_POLICIES = ("PARALLEL", "FAILOVER", "ROUND-ROBIN")
MAX_VIRTUAL_MEMBERS = 8
DEFAULT_RABBITMQ_PORT = 5672
DEFAULT_REPLY_TIMEOUT_MS = 1000  # OpenSIPS event_stream's `timeout`
MAX_REPLY_TIMEOUT_MS = 600_000
# AMQP 0-9-1 short strings (exchange, vhost, routing key) hold at most 255
# bytes; the stream METHOD gets the same bound.
MAX_NAME_BYTES = 255
MAX_AGE_LIMIT_MS = 86_400_000
MAX_HEARTBEAT_S = 600
MAX_CONNECT_TIMEOUT_MS = 60_000
# AMQP's own rule for exchange names (RabbitMQ refuses anything else).
_EXCHANGE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,255}")
_GUEST = "guest"  # RabbitMQ's (and event_rabbitmq's) default user and password
_MASK = "***"

# A resolver has the shape of socket.getaddrinfo(host, port): it returns
# (family, type, proto, canonname, sockaddr) tuples and raises OSError on failure.
Resolver = Callable[[str, int], Iterable[tuple[Any, ...]]]

# Sockaddr shapes accepted by socket.connect for the families we produce.
SockAddr = tuple[str, int] | tuple[str, int, int, int] | str

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Dots and digits only: never a valid host name (no top-level domain is all
# digits), so it must be an IPv4 literal. Without this, "udp:1234:80" or
# "udp:127.1:80" would go to getaddrinfo, which accepts inet_aton shorthands.
_DOTTED_DIGITS = re.compile(r"[0-9.]+")
_BLANKS = re.compile(r"[ \t]+")


class DestinationError(ValueError):
    """A destination string that cannot be used; the message quotes it (any
    broker password in it masked). ``problem`` is the message without the
    quoted input."""

    problem: str = ""


ErrorFactory = Callable[[str], DestinationError]


def _datagram_resolver(host: str, port: int) -> Iterable[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)


def _stream_resolver(host: str, port: int) -> Iterable[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def _host_text(family: int, host: str) -> str:
    return f"[{host}]" if family == socket.AF_INET6 else host


@dataclass(frozen=True, slots=True)
class Destination:
    """A parsed, canonical destination. Build it with `parse_destination`.

    Equality and hashing cover every field: (kind, family, host, port) here,
    plus the options of the subclasses, so two subscriptions are the same
    exactly when they deliver the same way to the same address.
    """

    kind: Literal["udp", "unix", "tcp", "rabbitmq", "virtual"]
    family: int  # socket.AF_INET, AF_INET6 or AF_UNIX; 0 for virtual
    host: str  # numeric IP (udp, tcp, rabbitmq), filesystem path or "\0name" (unix)
    port: int  # 0 for unix and virtual

    @property
    def relayed(self) -> bool:
        """Served by a broker relay process, not by the senders themselves."""
        return False

    def members(self) -> tuple[Destination, ...]:
        """The destinations events really go to: itself, or a virtual one's members."""
        return (self,)

    def spec(self) -> str:
        """The canonical text with every secret in it: what the hub stores in
        the segment's table and a sender parses back (``str`` masks secrets)."""
        return str(self)

    @property
    def sockaddr(self) -> SockAddr:
        """The address to pass to ``socket.connect`` / ``sendto``."""
        if self.family == socket.AF_INET6:
            return (self.host, self.port, 0, 0)  # flowinfo, scope_id
        if self.family == socket.AF_INET:
            return (self.host, self.port)
        return self.host

    def __str__(self) -> str:
        if self.kind == "unix":
            if self.host.startswith("\0"):
                return f"unix:@{self.host[1:]}"
            return f"unix:{self.host}"
        return f"udp:{_host_text(self.family, self.host)}:{self.port}"


@dataclass(frozen=True, slots=True)
class StreamDestination(Destination):
    """``tcp:HOST:PORT[/METHOD][;reliable][;timeout=MS]``, as OpenSIPS event_stream.

    ``method`` replaces the event name as the JSON-RPC method when not
    empty. ``reliable`` (OpenSIPS's ``reliable_mode``, here per
    destination): every event is a request with an id, and a reply with an
    ``error`` member, or none within ``timeout_ms``, counts as failed.
    """

    method: str = ""
    reliable: bool = False
    timeout_ms: int = DEFAULT_REPLY_TIMEOUT_MS

    def __str__(self) -> str:
        text = f"tcp:{_host_text(self.family, self.host)}:{self.port}"
        if self.method:
            text += f"/{self.method}"
        if self.reliable:
            text += ";reliable"
            if self.timeout_ms != DEFAULT_REPLY_TIMEOUT_MS:
                text += f";timeout={self.timeout_ms}"
        return text


@dataclass(frozen=True, slots=True, repr=False)
class BrokerDestination(Destination):
    """``rabbitmq:[user[:password]@]host[:port]/[params?]routing_key``, as
    OpenSIPS event_rabbitmq; params (``;``-separated): ``exchange=NAME``,
    ``persistent``, ``vhost=NAME``, ``max_age=MS``, ``heartbeat=S``,
    ``connect_timeout=MS``.

    ``str()`` and ``repr()`` mask the password; `spec` keeps it."""

    user: str = _GUEST
    password: str = _GUEST
    vhost: str = "/"
    exchange: str = ""
    routing_key: str = ""
    persistent: bool = False  # delivery_mode 2
    max_age_ms: int = 0  # 0: no limit; older events are dropped, never published late
    heartbeat_s: int = 10  # 0: off
    connect_timeout_ms: int = 2000

    @property
    def relayed(self) -> bool:
        return True

    def spec(self) -> str:
        return self._text(reveal=True)

    def __str__(self) -> str:
        return self._text(reveal=False)

    def __repr__(self) -> str:
        # The generated repr would show the password (in tracebacks, logs,
        # assertion messages); this one masks it like str() does.
        shown = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "password" and value:
                shown.append(f"password={_MASK!r}")
            else:
                shown.append(f"{field.name}={value!r}")
        return f"BrokerDestination({', '.join(shown)})"

    def _credentials(self, reveal: bool) -> str:
        if self.user == _GUEST and self.password == _GUEST:
            return ""
        if self.password == _GUEST:
            # "user@" with no ":" means password guest, as in OpenSIPS.
            return f"{self.user}@"
        if not self.password:
            return f"{self.user}:@"  # nothing to hide, and it must parse back as ""
        return f"{self.user}:{self.password if reveal else _MASK}@"

    def _params(self) -> list[str]:
        defaults = _BROKER_DEFAULTS
        params = []
        if self.exchange:
            params.append(f"exchange={self.exchange}")
        if self.vhost != defaults.vhost:
            params.append(f"vhost={self.vhost}")
        if self.persistent:
            params.append("persistent")
        if self.max_age_ms != defaults.max_age_ms:
            params.append(f"max_age={self.max_age_ms}")
        if self.heartbeat_s != defaults.heartbeat_s:
            params.append(f"heartbeat={self.heartbeat_s}")
        if self.connect_timeout_ms != defaults.connect_timeout_ms:
            params.append(f"connect_timeout={self.connect_timeout_ms}")
        return params

    def _text(self, reveal: bool) -> str:
        address = f"{_host_text(self.family, self.host)}:{self.port}"
        params = self._params()
        if params:
            path = f"{';'.join(params)}?{self.routing_key}"
        elif "?" in self.routing_key:
            path = f"?{self.routing_key}"  # an empty params part keeps the "?" in the key
        else:
            path = self.routing_key
        return f"rabbitmq:{self._credentials(reveal)}{address}/{path}"


# What an unspecified param is: the dataclass's own defaults, written once.
_BROKER_DEFAULTS = BrokerDestination("rabbitmq", socket.AF_INET, "127.0.0.1", 0)


@dataclass(frozen=True, slots=True)
class VirtualDestination(Destination):
    """``virtual:POLICY member1 member2 ...``, as OpenSIPS event_virtual:
    members of any other kind under one subscription and one expire.

    PARALLEL members are kept sorted (by their text): OpenSIPS matches two
    PARALLEL sockets with the same members in any order, so they are one
    subscription here too. FAILOVER and ROUND-ROBIN keep the order given."""

    policy: Literal["PARALLEL", "FAILOVER", "ROUND-ROBIN"] = "PARALLEL"
    group: tuple[Destination, ...] = ()

    def members(self) -> tuple[Destination, ...]:
        return self.group

    def spec(self) -> str:
        return " ".join([f"virtual:{self.policy}", *(m.spec() for m in self.group)])

    def __str__(self) -> str:
        return " ".join([f"virtual:{self.policy}", *(str(m) for m in self.group)])


# --- parsing -------------------------------------------------------------------


def parse_destination(text: str, *, resolve: Resolver | None = None) -> Destination:
    """Parse a subscriber destination string.

    ``resolve`` replaces ``socket.getaddrinfo`` for host names (tests inject
    fakes); it is never called for IP literals or Unix sockets. By default
    udp hosts are resolved for SOCK_DGRAM, tcp and rabbitmq ones for
    SOCK_STREAM.

    Raises `DestinationError` (a ValueError) for an unusable string and
    TypeError when ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"destination must be str, not {type(text).__name__}")
    error = _error_factory(text)
    if not text:
        raise error("empty string")
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    # Only a virtual destination's members are separated by blanks.
    _check_characters(text, error, blanks_allowed=bool(colon) and scheme == "virtual")

    if text.startswith("/"):
        return _parse_unix(text, error)
    if not colon:
        raise error(f"unknown scheme: none given (expected {_schemes('an absolute path')})")
    match scheme:
        case "udp":
            return _parse_udp(rest, error, resolve or _datagram_resolver)
        case "unix":
            return _parse_unix(rest, error)
        case "tcp":
            return _parse_tcp(rest, error, resolve or _stream_resolver)
        case "rabbitmq":
            return _parse_rabbitmq(rest, error, resolve or _stream_resolver)
        case "virtual":
            return _parse_virtual(rest, error, resolve)
        case _:
            raise error(f"unknown scheme {text.partition(':')[0]!r} (expected {_schemes()})")


@functools.lru_cache(maxsize=4096)
def from_spec(text: str) -> Destination:
    """`parse_destination` for the texts of `Destination.spec`, cached.

    Senders turn the table's stored specs back into destinations with it on
    every table reload; the text is canonical (numeric addresses), so no
    name is resolved, and the cache spares the parsing."""
    return parse_destination(text)


def _schemes(last: str = "") -> str:
    """The schemes as a list in words, with ``last`` as one more alternative."""
    names = [*SCHEMES, last] if last else list(SCHEMES)
    return ", ".join(names[:-1]) + " or " + names[-1]


def _error_factory(text: str) -> ErrorFactory:
    def error(problem: str) -> DestinationError:
        # repr() quotes the input and makes any odd characters visible.
        exc = DestinationError(f"invalid destination {_masked(text)!r}: {problem}")
        exc.problem = problem
        return exc

    return error


def _masked(text: str) -> str:
    """``text`` with any rabbitmq password replaced by ``***`` (in every
    member of a virtual destination): errors quote their input."""
    if text[:8].lower() == "virtual:":
        return re.sub(r"[^ \t]+", lambda word: _masked_word(word.group()), text)
    return _masked_word(text)


def _masked_word(text: str) -> str:
    if text[:9].lower() != "rabbitmq:":
        return text
    authority, slash, path = text[9:].partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    if not colon:
        return text
    return f"{text[:9]}{user}:{_MASK}{at}{hostport}{slash}{path}"


def _check_characters(text: str, error: ErrorFactory, *, blanks_allowed: bool) -> None:
    for index, char in enumerate(text):
        if blanks_allowed and char in " \t":
            continue
        # Whitespace and control characters are almost always a copy/paste or
        # config-quoting mistake; accepting them would make two destinations
        # that print alike compare different.
        if char.isspace() or not char.isprintable():
            raise error(f"whitespace or control character {char!r} at index {index}")


def _parse_unix(path: str, error: ErrorFactory) -> Destination:
    if not path:
        raise error("empty path")
    if path.startswith("@"):
        name = path[1:]
        if not name:
            raise error("empty abstract socket name")
        size = _fs_size(name, error)
        if size > SUN_PATH_MAX:
            raise error(f"abstract name too long for sun_path ({size} bytes, max {SUN_PATH_MAX})")
        return Destination("unix", socket.AF_UNIX, "\0" + name, 0)
    if not path.startswith("/"):
        # A relative path would depend on the working directory of whichever
        # process happens to send the event.
        raise error(f"unix path {path!r} is not absolute")
    size = _fs_size(path, error)
    if size > SUN_PATH_MAX:
        raise error(f"path too long for sun_path ({size} bytes, max {SUN_PATH_MAX})")
    # The path is kept verbatim: normalising "a/../b" is not safe with
    # symlinks, and the kernel resolves the path anyway.
    return Destination("unix", socket.AF_UNIX, path, 0)


def _fs_size(path: str, error: ErrorFactory) -> int:
    """Length in bytes of ``path`` as the kernel will see it."""
    try:
        return len(os.fsencode(path))
    except UnicodeEncodeError as exc:
        raise error(f"path cannot be encoded for the filesystem: {exc.reason}") from None


def _parse_udp(rest: str, error: ErrorFactory, resolve: Resolver) -> Destination:
    where = _HostSyntax("udp")
    host, port, ip = _split_host_port(rest, error, where)
    family, address = _address(host, port, ip, error, resolve)
    return Destination("udp", family, address, port)


def _parse_tcp(rest: str, error: ErrorFactory, resolve: Resolver) -> StreamDestination:
    # METHOD holds no ";" or "/", and neither does an address, so the first
    # ";" starts the options and the first "/" the method.
    address_method, semicolon, options_text = rest.partition(";")
    host_port, slash, method = address_method.partition("/")
    host, port, ip = _split_host_port(host_port, error, _HostSyntax("tcp"))
    if slash:
        if not method:
            raise error("empty method after '/'")
        if "/" in method:
            raise error(f"method {method!r} may not contain '/'")
        size = len(method.encode())
        if size > MAX_NAME_BYTES:
            raise error(f"method too long ({size} bytes UTF-8, max {MAX_NAME_BYTES})")
    reliable, timeout_ms = _parse_stream_options(options_text if semicolon else None, error)
    # Everything else is checked first, so a typo costs no DNS lookup.
    family, address = _address(host, port, ip, error, resolve)
    return StreamDestination("tcp", family, address, port, method, reliable, timeout_ms)


def _parse_stream_options(text: str | None, error: ErrorFactory) -> tuple[bool, int]:
    if text is None:
        return False, DEFAULT_REPLY_TIMEOUT_MS
    seen: set[str] = set()
    reliable, timeout_ms = False, DEFAULT_REPLY_TIMEOUT_MS
    for option in text.split(";"):
        if not option:
            raise error("empty option (';' twice in a row, or a trailing ';')")
        name, equals, value = option.partition("=")
        if name not in ("reliable", "timeout"):
            raise error(f"unknown option {option!r} (known: {', '.join(STREAM_OPTIONS)})")
        if name in seen:
            raise error(f"option {name!r} given twice")
        seen.add(name)
        if name == "reliable":
            if equals:
                raise error("option 'reliable' takes no value")
            reliable = True
        else:
            if not value:
                raise error("option 'timeout' needs a value in milliseconds (timeout=MS)")
            timeout_ms = _parse_int(value, "timeout", 1, MAX_REPLY_TIMEOUT_MS, error)
    if "timeout" in seen and not reliable:
        raise error("option 'timeout' needs ';reliable' (only reliable mode awaits replies)")
    return reliable, timeout_ms


def _parse_rabbitmq(rest: str, error: ErrorFactory, resolve: Resolver) -> BrokerDestination:
    # The userinfo ends at the last "@" before the first "/": a password may
    # hold ":" and "@", never "/". It is never quoted in an error.
    authority, slash, path = rest.partition("/")
    if not slash:
        raise error("missing /routing_key")
    userinfo, at, host_port = authority.rpartition("@")
    user = password = _GUEST
    if at:
        user, colon, secret = userinfo.partition(":")
        if not user:
            raise error("empty user name before '@'")
        # As in OpenSIPS: "user@" keeps the default password, "user:@" is "".
        password = secret if colon else _GUEST
    if not host_port:
        raise error("empty host after '@'" if at else "missing host")
    host, port, ip = _split_host_port(host_port, error, _HostSyntax("rabbitmq"))

    params_text, question, routing_key = path.partition("?")
    if not question:
        params_text, routing_key = "", path
    params = _parse_broker_params(params_text, error)
    size = len(routing_key.encode())
    if size > MAX_NAME_BYTES:
        raise error(f"routing key too long ({size} bytes UTF-8, max {MAX_NAME_BYTES})")
    if not routing_key and not params.get("exchange"):
        raise error("empty routing key (allowed only with exchange=NAME)")
    family, address = _address(host, port, ip, error, resolve)
    return BrokerDestination(
        "rabbitmq",
        family,
        address,
        port,
        user=user,
        password=password,
        routing_key=routing_key,
        **params,
    )


def _parse_broker_params(text: str, error: ErrorFactory) -> dict[str, Any]:
    """The ``params`` before the routing key's "?", as BrokerDestination fields."""
    params: dict[str, Any] = {}
    seen: set[str] = set()
    for param in text.split(";") if text else ():
        if not param:
            raise error("empty param (';' twice in a row, or a trailing ';')")
        name, equals, value = param.partition("=")
        if name in seen:
            raise error(f"param {name!r} given twice")
        seen.add(name)
        if name == "persistent":
            if equals:
                raise error("param 'persistent' takes no value")
            params["persistent"] = True
            continue
        if name == "tls_domain":
            raise error("param 'tls_domain' is not supported: mpevent has no TLS to brokers")
        if name not in ("exchange", "vhost", "max_age", "heartbeat", "connect_timeout"):
            hint = "" if equals else "; an exchange is given as exchange=NAME"
            raise error(f"unknown param {param!r} (known: {', '.join(BROKER_PARAMS)}){hint}")
        if not equals:
            raise error(f"param {name!r} needs a value ({name}=...)")
        match name:
            case "exchange":
                if not value:
                    raise error("empty exchange name (leave exchange= out for the default one)")
                if not _EXCHANGE_NAME.fullmatch(value):
                    raise error(
                        f"exchange name {value!r} is not valid (letters, digits, '-', '_', '.', "
                        f"':', at most {MAX_NAME_BYTES})"
                    )
                params["exchange"] = value
            case "vhost":
                size = len(value.encode())
                if not 1 <= size <= MAX_NAME_BYTES:
                    raise error(f"vhost must be 1-{MAX_NAME_BYTES} bytes UTF-8, not {size}")
                params["vhost"] = value
            case "max_age":
                params["max_age_ms"] = _parse_int(value, "max_age", 0, MAX_AGE_LIMIT_MS, error)
            case "heartbeat":
                params["heartbeat_s"] = _parse_int(value, "heartbeat", 0, MAX_HEARTBEAT_S, error)
            case _:
                params["connect_timeout_ms"] = _parse_int(
                    value, "connect_timeout", 1, MAX_CONNECT_TIMEOUT_MS, error
                )
    return params


def _parse_virtual(rest: str, error: ErrorFactory, resolve: Resolver | None) -> Destination:
    words = [word for word in _BLANKS.split(rest) if word]
    if not words:
        raise error(f"missing policy ({', '.join(VIRTUAL_POLICIES)}) and members")
    policy, *members = words
    if policy not in VIRTUAL_POLICIES:
        if policy.upper() in VIRTUAL_POLICIES:
            raise error(f"policy {policy!r} must be uppercase ({policy.upper()})")
        raise error(f"unknown policy {policy!r} (expected {', '.join(VIRTUAL_POLICIES)})")
    if not members:
        raise error(f"no members after {policy}")
    if len(members) > MAX_VIRTUAL_MEMBERS:
        raise error(f"too many members ({len(members)}, max {MAX_VIRTUAL_MEMBERS})")
    group: list[Destination] = []
    for number, member in enumerate(members, 1):
        shown = _masked_word(member)
        if member.partition(":")[0].lower() == "virtual":
            raise error(f"member {number} {shown!r} is virtual; members may not be")
        try:
            dest = parse_destination(member, resolve=resolve)
        except DestinationError as exc:
            raise error(f"member {number} {shown!r}: {exc.problem or exc}") from None
        if dest in group:
            raise error(f"member {number} {shown!r} is the same as member {group.index(dest) + 1}")
        group.append(dest)
    if policy == "PARALLEL":
        # By the printed text first, so that the masked text orders alike and
        # the order tells nothing about passwords; spec() breaks the ties.
        group.sort(key=lambda member: (str(member), member.spec()))
    return VirtualDestination("virtual", 0, "", 0, policy=policy, group=tuple(group))


@dataclass(frozen=True, slots=True)
class _HostSyntax:
    """How the host of one scheme is written: what error messages show."""

    scheme: str

    @property
    def default_port(self) -> int | None:
        return DEFAULT_RABBITMQ_PORT if self.scheme == "rabbitmq" else None

    @property
    def example(self) -> str:
        if self.scheme == "rabbitmq":
            return "rabbitmq:[::1]:5672/KEY"
        return f"{self.scheme}:[::1]:PORT"

    @property
    def start(self) -> str:
        return "'rabbitmq:' or '@'" if self.scheme == "rabbitmq" else f"'{self.scheme}:'"


def _split_host_port(
    rest: str, error: ErrorFactory, syntax: _HostSyntax
) -> tuple[str, int, IPAddress | None]:
    """HOST and PORT of ``HOST:PORT``, ``[V6]:PORT`` (or without ``:PORT`` when
    the scheme has a default port), with the IP when HOST is a literal.
    Resolves nothing."""
    default_port = syntax.default_port
    if not rest:
        raise error("missing host and port" if default_port is None else "missing host")
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise error("unbalanced '[' in IPv6 address")
        host, after = rest[1:close], rest[close + 1 :]
        if not host:
            raise error("empty host")
        if not after and default_port is not None:
            return host, default_port, _ipv6_literal(host, error)
        if not after:
            raise error("missing port")
        if not after.startswith(":"):
            raise error(f"unexpected {after!r} after ']' (expected :PORT)")
        port = _parse_port(after[1:], error)
        return host, port, _ipv6_literal(host, error)

    if "[" in rest:
        raise error(f"'[' must come right after {syntax.start} (e.g. {syntax.example})")
    if "]" in rest:
        raise error("unbalanced ']' in IPv6 address")
    host, colon, port_text = rest.rpartition(":")
    if not colon and default_port is not None:
        host, port_text = rest, ""
    elif not colon:
        raise error("missing port")
    if not host:
        raise error("empty host")
    if ":" in host:
        # Without brackets we cannot tell where the address ends and
        # the port begins ("::1:8081").
        raise error(f"IPv6 address {host!r} must be in brackets, e.g. {syntax.example}")
    port = _parse_port(port_text, error) if colon else default_port
    assert port is not None
    if _DOTTED_DIGITS.fullmatch(host):
        try:
            return host, port, ipaddress.IPv4Address(host)
        except ValueError:
            raise error(f"invalid IPv4 address {host!r}") from None
    return host, port, None


def _address(
    host: str, port: int, ip: IPAddress | None, error: ErrorFactory, resolve: Resolver
) -> tuple[int, str]:
    """(family, canonical numeric host): the literal, or the name resolved."""
    if ip is None:
        ip = _resolve(host, port, error, resolve)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    # str(ip) is the canonical form: "0:0::1" and "::1" become the same host.
    return family, str(ip)


def _parse_port(port_text: str, error: ErrorFactory) -> int:
    if not port_text:
        raise error("missing port")
    # isascii() keeps out Unicode digits such as "٨" that int() would accept.
    if not (port_text.isascii() and port_text.isdigit()):
        raise error(f"port {port_text!r} is not a number")
    # Only call int() on short strings: a huge digit string is out of range
    # anyway and int() would refuse it past sys.get_int_max_str_digits().
    port = int(port_text) if len(port_text.lstrip("0")) <= 5 else -1
    if not 1 <= port <= 65535:
        raise error(f"port {port_text} out of range 1-65535")
    return port


def _parse_int(text: str, name: str, low: int, high: int, error: ErrorFactory) -> int:
    """A decimal option value in ``low..high`` (ASCII digits only, as ports)."""
    if not (text.isascii() and text.isdigit()):
        raise error(f"{name} {text!r} is not a number")
    value = int(text) if len(text.lstrip("0")) <= len(str(high)) else high + 1
    if not low <= value <= high:
        raise error(f"{name} {text} out of range {low}-{high}")
    return value


def _ipv6_literal(host: str, error: ErrorFactory) -> ipaddress.IPv6Address:
    try:
        ip = ipaddress.IPv6Address(host)
    except ValueError:
        raise error(f"invalid IPv6 address {host!r}") from None
    if ip.scope_id is not None:
        # sockaddr carries scope_id 0, and socket.connect overrides a "%zone"
        # in the string with it, so a zone would be silently dropped.
        raise error(f"IPv6 zone id in {host!r} is not supported")
    return ip


def _resolve(host: str, port: int, error: ErrorFactory, resolve: Resolver) -> IPAddress:
    try:
        results = list(resolve(host, port))
    except (OSError, UnicodeError) as exc:
        # UnicodeError: the idna codec rejects names such as "a..b".
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise error(f"cannot resolve host {host!r}: {reason}") from exc
    addresses = [r[4][0] for r in results if r[0] in (socket.AF_INET, socket.AF_INET6)]
    if not addresses:
        raise error(f"cannot resolve host {host!r}: no IPv4 or IPv6 address")
    # Prefer IPv4 when both exist: it is what event_datagram peers listen on
    # in practice, and a dual-stack "localhost" should not depend on the
    # resolver's ordering.
    try:
        parsed = [ipaddress.ip_address(a) for a in addresses]
    except ValueError as exc:
        raise error(f"cannot resolve host {host!r}: resolver returned {exc}") from None
    ip = next((a for a in parsed if a.version == 4), parsed[0])
    if ip.version == 6:
        return _ipv6_literal(str(ip), error)
    return ip
