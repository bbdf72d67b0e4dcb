"""Subscriber destinations: parsing, validation and canonical printing.

This module owns the destination strings that event subscribers give, in the
form OpenSIPS's event_datagram module accepts:

* ``udp:HOST:PORT`` -- HOST is an IPv4 literal, a bracketed IPv6 literal or a
  host name (resolved once, at parse time);
* ``unix:/path/to.sock`` or a bare ``/path/to.sock`` -- a Unix datagram socket;
* ``unix:@name`` -- a Linux abstract socket (address ``"\\0name"``).

It turns such a string into a `Destination`: a small immutable value that is
canonical (two spellings of the same address compare and hash equal), prints
back in canonical form, and knows the address to hand to ``socket.connect``.
It does no socket I/O apart from host name resolution.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "SUN_PATH_MAX",
    "Destination",
    "DestinationError",
    "Resolver",
    "parse_destination",
]

# sun_path is 108 bytes on Linux; a filesystem path needs one of them for the
# terminating NUL, and an abstract name needs one for its leading NUL.
SUN_PATH_MAX = 107

# A resolver has the shape of socket.getaddrinfo(host, port): it returns
# (family, type, proto, canonname, sockaddr) tuples and raises OSError on failure.
Resolver = Callable[[str, int], Iterable[tuple[Any, ...]]]

# Sockaddr shapes accepted by socket.connect for the families we produce.
SockAddr = tuple[str, int] | tuple[str, int, int, int] | str

# Dots and digits only: never a valid host name (no top-level domain is all
# digits), so it must be an IPv4 literal. Without this, "udp:1234:80" or
# "udp:127.1:80" would go to getaddrinfo, which accepts inet_aton shorthands.
_DOTTED_DIGITS = re.compile(r"[0-9.]+")


class DestinationError(ValueError):
    """A destination string that cannot be used; the message quotes it."""


def _default_resolver(host: str, port: int) -> Iterable[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)


@dataclass(frozen=True, slots=True)
class Destination:
    """A parsed, canonical destination. Build it with `parse_destination`.

    Equality and hashing cover (kind, family, host, port), so two
    subscriptions are the same exactly when they target the same address.
    """

    kind: Literal["udp", "unix"]
    family: int  # socket.AF_INET, AF_INET6 or AF_UNIX
    host: str  # numeric IP (udp), filesystem path or "\0name" (unix)
    port: int  # 0 for unix

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
        if self.family == socket.AF_INET6:
            return f"udp:[{self.host}]:{self.port}"
        return f"udp:{self.host}:{self.port}"


def parse_destination(text: str, *, resolve: Resolver | None = None) -> Destination:
    """Parse a subscriber destination string.

    ``resolve`` replaces ``socket.getaddrinfo`` for host names (tests inject
    fakes); it is never called for IP literals or Unix sockets.

    Raises `DestinationError` (a ValueError) for an unusable string and
    TypeError when ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"destination must be str, not {type(text).__name__}")

    def error(problem: str) -> DestinationError:
        # repr() quotes the input and makes any odd characters visible.
        return DestinationError(f"invalid destination {text!r}: {problem}")

    if not text:
        raise error("empty string")
    for index, char in enumerate(text):
        # Whitespace and control characters are almost always a copy/paste or
        # config-quoting mistake; accepting them would make two destinations
        # that print alike compare different.
        if char.isspace() or not char.isprintable():
            raise error(f"whitespace or control character {char!r} at index {index}")

    if text.startswith("/"):
        return _parse_unix(text, error)
    scheme, colon, rest = text.partition(":")
    if not colon:
        raise error("unknown scheme: none given (expected udp:, unix: or an absolute path)")
    match scheme.lower():
        case "udp":
            return _parse_udp(rest, error, resolve or _default_resolver)
        case "unix":
            return _parse_unix(rest, error)
        case _:
            raise error(f"unknown scheme {scheme!r} (expected udp: or unix:)")


def _parse_unix(path: str, error: Callable[[str], DestinationError]) -> Destination:
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


def _fs_size(path: str, error: Callable[[str], DestinationError]) -> int:
    """Length in bytes of ``path`` as the kernel will see it."""
    try:
        return len(os.fsencode(path))
    except UnicodeEncodeError as exc:
        raise error(f"path cannot be encoded for the filesystem: {exc.reason}") from None


def _parse_udp(
    rest: str, error: Callable[[str], DestinationError], resolve: Resolver
) -> Destination:
    if not rest:
        raise error("missing host and port")
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise error("unbalanced '[' in IPv6 address")
        host, after = rest[1:close], rest[close + 1 :]
        if not host:
            raise error("empty host")
        if not after:
            raise error("missing port")
        if not after.startswith(":"):
            raise error(f"unexpected {after!r} after ']' (expected :PORT)")
        port = _parse_port(after[1:], error)
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = _ipv6_literal(host, error)
    else:
        if "[" in rest:
            raise error("'[' must come right after 'udp:' (e.g. udp:[::1]:PORT)")
        if "]" in rest:
            raise error("unbalanced ']' in IPv6 address")
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise error("missing port")
        if not host:
            raise error("empty host")
        if ":" in host:
            # Without brackets we cannot tell where the address ends and
            # the port begins ("::1:8081").
            raise error(f"IPv6 address {host!r} must be in brackets, e.g. udp:[::1]:PORT")
        # Check the port before resolving, so a typo costs no DNS lookup.
        port = _parse_port(port_text, error)
        if _DOTTED_DIGITS.fullmatch(host):
            try:
                ip = ipaddress.IPv4Address(host)
            except ValueError:
                raise error(f"invalid IPv4 address {host!r}") from None
        else:
            ip = _resolve(host, port, error, resolve)

    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    # str(ip) is the canonical form: "0:0::1" and "::1" become the same host.
    return Destination("udp", family, str(ip), port)


def _parse_port(port_text: str, error: Callable[[str], DestinationError]) -> int:
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


def _ipv6_literal(host: str, error: Callable[[str], DestinationError]) -> ipaddress.IPv6Address:
    try:
        ip = ipaddress.IPv6Address(host)
    except ValueError:
        raise error(f"invalid IPv6 address {host!r}") from None
    if ip.scope_id is not None:
        # sockaddr carries scope_id 0, and socket.connect overrides a "%zone"
        # in the string with it, so a zone would be silently dropped.
        raise error(f"IPv6 zone id in {host!r} is not supported")
    return ip


def _resolve(
    host: str, port: int, error: Callable[[str], DestinationError], resolve: Resolver
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
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
