"""Where event traffic may go: the destination allow-list (pure).

Whoever can reach the MI can subscribe a socket, and every event then goes
there. Without a limit, MI access would be a way to aim traffic at any host.
So every destination with a host -- UDP, TCP (event_stream) and RabbitMQ
brokers alike -- must lie in an allowed network (default: loopback only),
and UNIX destinations, optionally, under an allowed path prefix (default:
any path; the file system's permissions already guard UNIX sockets). A
virtual destination is allowed only if every one of its members is. A
refused subscription gets an error naming the destination (as ``str``
prints it: a broker password masked), the member at fault, and the setting
that would allow it, by the name it has where the policy was built
(:class:`SettingNames`): the daemon's configuration keys by default,
``EventBus``'s keywords for an embedded bus. Subscriptions from the
configuration file follow the same rule.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from mpevent.protocol.destination import Destination

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
NETWORKS_SETTING = "security.allowed_networks"
PREFIXES_SETTING = "security.unix_path_prefixes"
# The kinds whose host is an IP address, checked against the allowed networks.
HOST_KINDS = frozenset({"udp", "tcp", "rabbitmq"})


class DestinationRefused(ValueError):
    """A destination the policy does not allow; the message names the setting."""


@dataclass(frozen=True)
class SettingNames:
    """What the policy's settings are called where they are set, for messages:
    whoever builds the policy decides (a configuration key, a keyword)."""

    networks: str = NETWORKS_SETTING
    unix_prefixes: str = PREFIXES_SETTING


CONFIG_NAMES = SettingNames()  # the daemon's configuration file


@dataclass(frozen=True)
class DestinationPolicy:
    networks: tuple[Network, ...] = LOOPBACK
    unix_prefixes: tuple[str, ...] = field(default_factory=tuple)  # empty: any path
    names: SettingNames = CONFIG_NAMES

    @classmethod
    def from_settings(
        cls,
        networks: Iterable[str] | None = None,
        unix_prefixes: Iterable[str] | None = None,
        names: SettingNames = CONFIG_NAMES,
    ) -> DestinationPolicy:
        nets = LOOPBACK
        if networks is not None:
            try:
                nets = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
            except ValueError as exc:
                raise ValueError(f"{names.networks}: {exc}") from None
        prefixes = tuple(unix_prefixes or ())
        for prefix in prefixes:
            if not prefix.startswith("/"):
                raise ValueError(f"{names.unix_prefixes}: {prefix!r} is not an absolute path")
        return cls(nets, prefixes, names)

    def check(self, dest: Destination) -> None:
        """Raise :class:`DestinationRefused` unless ``dest`` (every member of
        a virtual one) is allowed."""
        if not dest.members():
            raise DestinationRefused(f"destination {dest} has no members to check")
        for member in dest.members():
            problem = self._refusal(member)
            if problem is not None:
                where = f"destination {dest}"
                if member is not dest:
                    where = f"member {member} of destination {dest}"
                raise DestinationRefused(f"{where} {problem}")

    def _refusal(self, dest: Destination) -> str | None:
        """Why ``dest`` (never virtual) is refused, or None when it is allowed."""
        if dest.kind in HOST_KINDS:
            ip = ipaddress.ip_address(dest.host)
            if not any(ip in net for net in self.networks):
                allowed = ", ".join(str(n) for n in self.networks) or "none"
                return (
                    f"is outside the allowed networks ({allowed}); "
                    f"add its network to {self.names.networks} to allow it"
                )
            return None
        if dest.kind != "unix":
            # Fail closed: a kind this policy does not know is never let through.
            return f"is of a kind ({dest.kind!r}) the allow-list cannot check"
        if self.unix_prefixes and not dest.host.startswith("\0"):
            path = PurePosixPath(os.path.normpath(dest.host))  # no escaping by ".."
            if not any(path.is_relative_to(prefix) for prefix in self.unix_prefixes):
                return (
                    f"is not under an allowed path "
                    f"({', '.join(self.unix_prefixes)}); add a prefix to {self.names.unix_prefixes}"
                )
        return None
