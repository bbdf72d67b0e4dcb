"""The ``mpevent`` command's text, both ways, as pure functions.

This module owns what the command reads and what it prints, with no sockets,
no MI calls and no printing of its own: picking the MI address, parsing
destinations, event names and ``KEY=VALUE`` values, turning each MI result
into table rows and a notification datagram into a line, and the sentences
that say what a call really did (a refresh, an unsubscribe of nothing, an
unknown event and how to publish it, the versions). It also owns the exit
codes and :class:`UsageError`, which these parsers raise. The commands that
do the I/O are :mod:`mpevent.tools.cli.commands`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from mpevent import defaults
from mpevent.api.client import MIClient, MIFifoClient, MIHttpClient
from mpevent.protocol.destination import (
    Destination,
    DestinationError,
    StreamDestination,
    parse_destination,
)
from mpevent.protocol.payload import check_event_name
from mpevent.tools.figures import format_table
from mpevent.tools.figures import is_number as _is_number

EXIT_OK, EXIT_CALL_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
DEFAULT_MI_UDP = f"udp:{defaults.MI_UDP}"


class UsageError(Exception):
    """Bad input on the command line: exit code 2."""


def pick_mi_address(
    flag: str | None,
    environ: Mapping[str, str],
    default_socket: Path,
    socket_exists: Callable[[Path], bool] = Path.is_socket,
) -> tuple[str, str]:
    """The MI address to use and where it came from ("--mi", "MPEVENT_MI", "default")."""
    if flag:
        return flag, "--mi"
    if environ.get("MPEVENT_MI"):
        return environ["MPEVENT_MI"], "MPEVENT_MI"
    if socket_exists(default_socket):
        return f"unix:{default_socket}", "default"
    return DEFAULT_MI_UDP, "default"


def make_client(address: str, timeout: float) -> MIClient | MIHttpClient | MIFifoClient:
    """A client for ``udp:HOST:PORT``, ``unix:/path`` (or a bare path), an http://
    URL or ``fifo:/path`` (the hub's FIFO, replies through ``/tmp``)."""
    if address.startswith("fifo:"):
        path = address.removeprefix("fifo:")
        if not path.startswith("/"):
            raise UsageError(f"MI address {address!r}: expected fifo:/absolute/path")
        return MIFifoClient(path, timeout=timeout)
    scheme = address.partition("://")[0].lower() if "://" in address else ""
    if scheme == "http":
        try:
            return MIHttpClient(address, timeout)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if scheme:
        raise UsageError(f"MI address {address!r}: unsupported scheme {scheme!r}")
    return MIClient(destination(address, "MI address"), timeout)


def destination(text: str, what: str = "") -> Destination:
    """Parse a destination string; a bad one is a usage error naming the problem."""
    try:
        return parse_destination(text)
    except DestinationError as exc:
        raise UsageError(f"{what}: {exc}" if what else str(exc)) from None


def shown_socket(text: str) -> str:
    """A SOCKET argument as the command prints it: as typed, unless it holds a
    password (``rabbitmq:bob:s3cret@...``), which is masked as the hub masks it."""
    dest = destination(text)
    return text if dest.spec() == str(dest) else str(dest)


def event_names(names: Iterable[str]) -> list[str]:
    """``publish``'s EVENT arguments, each checked before anything is declared."""
    names = list(dict.fromkeys(names))
    for name in names:
        try:
            check_event_name(name)
        except (TypeError, ValueError) as exc:
            raise UsageError(str(exc)) from None  # it names the event
    return names


def unknown_event_hint(message: str, event: str) -> str | None:
    """The hub's error for an event nobody published, with the command that fixes
    it; None for any other error. A hub started with no configuration knows no
    events: the first ``subscribe`` meets this."""
    if "unknown event" in message or message == "Event not registered":
        return f"{message}; publish it first: mpevent publish {event}"
    return None


def published_line(result: Mapping[str, Any], known: Iterable[str]) -> str:
    """One ``evi:publish`` result; ``known``: the events the hub had before."""
    name, event_id = result.get("name"), result.get("id")
    if name in set(known):
        return f"{name} was already published (id {event_id})"
    return f"published {name} (id {event_id})"


def _expires(ttl: Any) -> str:
    return "never expires" if ttl == "never" else f"expires in {ttl} s"


def refreshed_line(given: str, event: str, stored: Mapping[str, Any]) -> str:
    """What ``subscribe`` did when the socket was subscribed already: the
    existing subscription (named as the hub stores it, which may be another
    spelling of ``given``) got the new expire; nothing was added."""
    socket = stored.get("socket", given)
    same = "" if socket == given else f" ({given} is the same socket)"
    expires = _expires(stored.get("ttl"))
    return f"refreshed the subscription of {socket} to {event}{same}, now {expires}"


def not_subscribed_line(socket: str, event: str) -> str:
    return f"{socket} is not subscribed to {event}: there was nothing to unsubscribe"


def version_lines(
    library: str, path: str, hub: Mapping[str, Any] | None, address: str
) -> list[str]:
    """``mpevent version``: the library, the producer path that runs here, and
    the hub's own answer to ``core:version`` (None: no hub answered)."""
    lines = [f"mpevent {library} ({path})"]
    if hub is not None:
        lines.append(f"hub at {address}: {hub.get('Server', hub)}")
    return lines


def parse_scalar(text: str) -> Any:
    """``KEY=VALUE`` values: an integer, ``null``, ``true`` or ``false`` when the
    text is exactly that JSON; anything else (``007``, ``1.5``, ``" 5"``) stays a
    string. Integers JSON cannot carry as one (beyond 64 bits) stay strings."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    if value is None or isinstance(value, bool | int):
        try:
            if orjson.dumps(value).decode() == text:
                return value
        except orjson.JSONEncodeError:  # an integer over 64 bits
            pass
    return text


def parse_kv(items: Iterable[str]) -> dict[str, Any]:
    """``["ip=1.2.3.4", "n=5"]`` to ``{"ip": "1.2.3.4", "n": 5}``, in order."""
    params: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"expected KEY=VALUE, got {item!r}")
        if not key:
            raise UsageError(f"empty key in {item!r}")
        if key in params:
            raise UsageError(f"parameter {key!r} given twice")
        params[key] = parse_scalar(value)
    return params


def parse_json_params(text: str) -> dict[str, Any] | list[Any]:
    """``--json-params``: the text of a JSON object (named) or array (positional)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"--json-params is not valid JSON: {exc}") from None
    if not isinstance(value, dict | list):
        raise UsageError("--json-params must be a JSON object or array")
    return value


def human_bytes(size: int | float) -> str:
    """``1536`` to ``1.5 KiB``."""
    if size < 1024:
        return f"{int(size)} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def event_rows(result: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """``events_list`` result to (id, name) rows."""
    return sorted((e.get("id"), e.get("name")) for e in result.get("Events", []))


def subscriber_rows(result: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """Any of ``subscribers_list``'s three shapes to (event, socket, expire, ttl) rows."""
    events = result["Events"] if "Events" in result else [result.get("Event", {})]
    rows = []
    for event in events:
        subs = event.get("Subscribers", [])
        if "Subscriber" in event:
            subs = [event["Subscriber"]]
        for sub in subs:
            rows.append((event.get("name"), sub.get("socket"), sub.get("expire"), sub.get("ttl")))
    return rows


def process_rows(
    result: Mapping[str, Any],
    earlier: Mapping[str, Any] | None = None,
    seconds: float = 0.0,
) -> list[tuple[Any, ...]]:
    """``ps`` result to (pid, type, cpu, cpu %, rss) rows: CPU in seconds, RSS
    human-readable, and the share of a core each process used between
    ``earlier`` (a ``ps`` result ``seconds`` before) and this one ("" where
    there is no earlier sample of that pid)."""
    before = {p.get("PID"): p.get("CPU") for p in (earlier or {}).get("Processes", [])}
    rows = []
    for proc in result.get("Processes", []):
        pid, cpu, rss = proc.get("PID"), proc.get("CPU"), proc.get("RSS")
        was = before.get(pid)
        share = ""
        if seconds > 0 and _is_number(cpu) and _is_number(was):
            share = f"{100 * max(0.0, cpu - was) / seconds:.1f}%"
        rows.append(
            (
                pid,
                proc.get("Type"),
                f"{cpu:.2f}s" if _is_number(cpu) else cpu,
                share,
                human_bytes(rss) if _is_number(rss) else rss,
            )
        )
    return rows


def stat_rates(
    before: Mapping[str, Any], after: Mapping[str, Any], seconds: float
) -> dict[str, float]:
    """Per-second change of every counter present, as a number, in both samples."""
    if seconds <= 0:
        return {}
    return {
        name: (value - before[name]) / seconds
        for name, value in after.items()
        if _is_number(value) and _is_number(before.get(name))
    }


def stats_table(values: Mapping[str, Any], rates: Mapping[str, float] | None = None) -> str:
    if rates is None:
        return format_table(("NAME", "VALUE"), values.items(), align="lr")
    rows = [
        (name, value, f"{rates[name]:.1f}" if name in rates else "-")
        for name, value in values.items()
    ]
    return format_table(("NAME", "VALUE", "RATE/S"), rows, align="lrr")


def _show(value: Any) -> str:
    """A param value as ``listen`` prints it: plain strings bare, the rest as JSON,
    so that ``KEY=VALUE`` read back by ``mpevent raise`` gives the same value."""
    if (
        isinstance(value, str)
        and value
        and not any(c.isspace() or c in '"\\=' or not c.isprintable() for c in value)
        and isinstance(parse_scalar(value), str)
    ):
        return value
    return orjson.dumps(value).decode()


def format_timestamp(when: float) -> str:
    millis = int(when * 1000) % 1000
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) + f".{millis:03d}"


def format_notification(data: bytes, when: float) -> str:
    """One received datagram as a line: timestamp, method, params."""
    stamp = format_timestamp(when)
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        message = None
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        shown = data[:200]
        more = "..." if len(data) > 200 else ""
        return f"{stamp} (not a JSON-RPC notification, {len(data)} bytes) {shown!r}{more}"
    parts = [stamp, message["method"]]
    params = message.get("params")
    if isinstance(params, dict):
        parts += [f"{key}={_show(value)}" for key, value in params.items()]
    elif isinstance(params, list):
        parts += [_show(value) for value in params]
    elif params is not None:
        parts.append(_show(params))
    return " ".join(parts)


def listen_destination(text: str, cwd: str | None = None) -> Destination:
    """``listen``'s SOCKET: ``udp:HOST:PORT``, ``unix:/path``, or a path (a
    relative one is taken from the working directory: this process binds it),
    or ``tcp:HOST:PORT`` (a stream consumer)."""
    if text and ":" not in text and not text.startswith(("/", "@")):
        text = os.path.join(cwd or os.getcwd(), text)
    dest = destination(text, "listen socket")
    if dest.kind not in ("udp", "unix", "tcp"):
        raise UsageError(f"listen socket: cannot listen on {dest}: only on udp:, unix: or tcp:")
    if isinstance(dest, StreamDestination) and (dest.method or dest.reliable):
        # They are the sender's choices; a listener answers requests either way.
        raise UsageError(f"listen socket: {dest}: give tcp:HOST:PORT, without METHOD or options")
    return dest


def stream_reply(text: bytes) -> bytes | None:
    """What ``listen tcp:`` answers a JSON text with: a request (a method and an
    id) gets ``"OK"``, so that a reliable destination counts it sent; a
    notification (or anything else) gets nothing."""
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or "method" not in message or "id" not in message:
        return None
    return b'{"jsonrpc":"2.0","result":"OK","id":' + orjson.dumps(message["id"]) + b"}"
