"""The management interface: OpenSIPS MI over JSON-RPC 2.0, as pure logic.

:func:`handle` takes the bytes of one request and returns the bytes of the
reply (or ``None`` for a notification, which gets no reply). It knows
nothing of sockets: the datagram and HTTP transports (and the hub's private
control socket) all call it, so every transport behaves the same.

Method names, parameter names, result shapes and error codes are OpenSIPS's,
so OpenSIPS tools (the ``opensips`` Python package, opensips-cli) work
unchanged. Every method has its OpenSIPS 4.x name (``evi:subscribe``,
``statistics:get``, ``core:uptime``) and keeps its older name as an alias
(``event_subscribe``, ``get_statistics``, ``uptime``), as OpenSIPS 4 does:
one entry of the method table, answered under both names with the same
params and results. ``evi:publish`` (alias ``event_publish``) is mpevent's own
addition, named in OpenSIPS's words: it declares an event, which OpenSIPS
modules do in C and mpevent's producers do through the MI.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from mpevent import defaults
from mpevent.protocol.destination import DestinationError, parse_destination
from mpevent.protocol.payload import PayloadError
from mpevent.protocol.policy import DestinationPolicy, DestinationRefused
from mpevent.protocol.registry import DEFAULT_EXPIRE, Registry, RegistryError

log = logging.getLogger("mpevent.mi")

MAX_REQUEST = 65536
MAX_BATCH = 32  # a batch's replies must fit a datagram reply too
# OpenSIPS reads expire as a C int. Larger values would also overflow the
# 64-bit deadline (ns) that the hub stores in the subscription table.
MAX_EXPIRE = 2**31 - 1

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
INTERNAL_ERROR_REPLY = orjson.dumps(
    {"jsonrpc": "2.0", "error": {"code": INTERNAL_ERROR, "message": "Internal error"}, "id": None}
)


class MIError(Exception):
    """An error reply: JSON-RPC code and message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class HubState(Protocol):
    """What the MI needs from the hub (the hub implements it; tests fake it)."""

    registry: Registry
    policy: DestinationPolicy
    started: float  # wall-clock start time

    def now_ns(self) -> int: ...
    def store_table(self) -> None:
        """Store the registry in the segment, wake the senders; ValueError: it does not fit."""

    def raise_event(self, event: str, params: Any) -> bool: ...
    def statistics(self) -> dict[str, int]: ...
    def reset_statistics(self, names: list[str]) -> None: ...
    def processes(self) -> list[dict[str, Any]]: ...


Method = Callable[[HubState, dict[str, Any]], Any]


class _Spec:
    """One MI method: its handler, its params (in OpenSIPS's order) and its names."""

    __slots__ = ("aliases", "fn", "name", "optional", "required")

    def __init__(
        self,
        name: str,
        aliases: tuple[str, ...],
        fn: Method,
        required: tuple[str, ...],
        optional: tuple[str, ...],
    ):
        self.name = name  # the OpenSIPS 4.x name, GROUP:COMMAND
        self.aliases = aliases  # the names it had before 4.x
        self.fn = fn
        self.required = required
        self.optional = optional

    def recipes(self) -> list[list[str]]:
        """The param lists it takes, as OpenSIPS's ``which COMMAND`` shows them."""
        names = self.required + self.optional
        return [list(names[:n]) for n in range(len(self.required), len(names) + 1)]


# Every name the MI answers, 4.x names and aliases alike: an alias is a
# second key to the same _Spec, never a copy of it.
METHODS: dict[str, _Spec] = {}


def method(
    name: str,
    *,
    aliases: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
):
    """Register a handler under its 4.x ``name`` and its older ``aliases``."""

    def register(fn: Method) -> Method:
        spec = _Spec(name, aliases, fn, required, optional)
        for key in (name, *aliases):
            if key in METHODS:
                raise ValueError(f"MI method name {key!r} registered twice")
            METHODS[key] = spec
        return fn

    return register


def _bind(spec: _Spec, params: Any) -> dict[str, Any]:
    """Params as an array (positional, OpenSIPS order) or an object, by name."""
    names = spec.required + spec.optional
    if params is None:
        params = {}
    if isinstance(params, list):
        if len(params) > len(names):
            raise MIError(INVALID_PARAMS, f"Too many parameters (at most {len(names)})")
        params = dict(zip(names, params, strict=False))
    elif isinstance(params, dict):
        unknown = [k for k in params if k not in names]
        if unknown:
            raise MIError(INVALID_PARAMS, f"Unknown parameter {unknown[0]!r}")
    else:
        raise MIError(INVALID_PARAMS, "params must be an array or an object")
    missing = [k for k in spec.required if params.get(k) is None]
    if missing:
        raise MIError(INVALID_PARAMS, f"Missing parameter {missing[0]!r}")
    return params


def _str(params: dict[str, Any], key: str) -> str:
    value = params[key]
    if not isinstance(value, str):
        raise MIError(INVALID_PARAMS, f"Parameter {key!r} must be a string")
    return value


def dispatch(state: HubState, request: Any) -> dict[str, Any] | None:
    """One decoded request to one reply object (None for a notification)."""
    if not isinstance(request, dict):
        return _error(None, INVALID_REQUEST, "Invalid Request")
    req_id = request.get("id")
    if not isinstance(req_id, str | int | float | type(None)) or isinstance(req_id, bool):
        return _error(None, INVALID_REQUEST, "Invalid Request: bad id")
    name = request.get("method")
    if request.get("jsonrpc") != "2.0" or not isinstance(name, str):
        return _error(req_id, INVALID_REQUEST, "Invalid Request")
    spec = METHODS.get(name)
    try:
        if spec is None:
            raise MIError(METHOD_NOT_FOUND, "Method not found")
        result = spec.fn(state, _bind(spec, request.get("params")))
    except (MIError, RegistryError) as exc:
        if "id" not in request:
            return None  # JSON-RPC 2.0: never reply to a notification, not even an error
        if isinstance(exc, MIError):
            return _error(req_id, exc.code, exc.message)
        return _error(req_id, exc.code, str(exc))
    except Exception:
        # A bug of ours: the client still gets an answer with its id (a
        # reply with a null id looks like silence to most clients).
        log.exception("MI method %s failed", name)
        return _error(req_id, INTERNAL_ERROR, "Internal error")
    if "id" not in request:
        return None
    return {"jsonrpc": "2.0", "result": result, "id": req_id}


def _error(req_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": req_id}


def handle(state: HubState, raw: bytes) -> bytes | None:
    """One request datagram/body to one reply (None: send nothing back)."""
    if len(raw) > MAX_REQUEST:
        return request_too_large_reply(len(raw))
    else:
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError:
            reply = _error(None, PARSE_ERROR, "Parse error")
        else:
            if isinstance(request, list) and len(request) > MAX_BATCH:
                reply = _error(None, INVALID_REQUEST, f"Batch too large (max {MAX_BATCH})")
            elif isinstance(request, list):  # a batch
                replies = [r for r in (dispatch(state, item) for item in request) if r]
                if not request:
                    reply = _error(None, INVALID_REQUEST, "Invalid Request: empty batch")
                elif not replies:
                    return None
                else:
                    return orjson.dumps(replies)
            else:
                reply = dispatch(state, request)
                if reply is None:
                    return None
    return orjson.dumps(reply)


def request_too_large_reply(size: int) -> bytes:
    """The error for a request of ``size`` bytes, over :data:`MAX_REQUEST`. Its id is
    null: a request that large is not read. Transports that learn the size
    without reading the request (a datagram's length, Content-Length) call it."""
    message = f"Request too large: {size} bytes (max {MAX_REQUEST} bytes)"
    return orjson.dumps(_error(None, INVALID_REQUEST, message))


def too_large_reply(raw: bytes, size: int) -> bytes:
    """The error a datagram client gets when its reply would not fit a datagram."""
    try:
        request = orjson.loads(raw)
        req_id = request.get("id") if isinstance(request, dict) else None
    except orjson.JSONDecodeError:
        req_id = None
    return orjson.dumps(
        _error(req_id, INTERNAL_ERROR, f"Reply of {size} bytes does not fit a datagram; use HTTP")
    )


# -- events and subscriptions ---------------------------------------------


@method("evi:publish", aliases=("event_publish",), required=("event",))
def _declare_event(state: HubState, p: dict[str, Any]) -> dict[str, Any]:
    name = _str(p, "event")
    try:
        event_id = state.registry.declare(name)
    except (TypeError, ValueError) as exc:
        raise MIError(400, f"Bad parameter value: {exc}") from None
    state.store_table()
    return {"name": name, "id": event_id}


@method(
    "evi:subscribe",
    aliases=("event_subscribe",),
    required=("event", "socket"),
    optional=("expire",),
)
def _event_subscribe(state: HubState, p: dict[str, Any]) -> str:
    event = _str(p, "event")
    try:
        dest = parse_destination(_str(p, "socket"))
        state.policy.check(dest)
    except (DestinationError, DestinationRefused) as exc:
        raise MIError(400, f"Bad parameter value: {exc}") from None
    expire = p.get("expire", DEFAULT_EXPIRE)
    if isinstance(expire, str):  # opensips-cli sends everything as strings
        try:
            expire = int(expire)
        except ValueError:
            raise MIError(INVALID_PARAMS, f"expire must be an integer, not {expire!r}") from None
    if isinstance(expire, int) and not isinstance(expire, bool) and expire > MAX_EXPIRE:
        raise MIError(INVALID_PARAMS, f"expire must be at most {MAX_EXPIRE} seconds")
    try:
        state.registry.event_id(event)
    except RegistryError:
        raise MIError(400, f"Bad parameter value: unknown event {event!r}") from None
    registry = state.registry
    before = registry.find(event, dest)
    undo = None if before is None else (before.expire, before.start_ns, before.deadline_ns)
    registry.subscribe(event, dest, expire, state.now_ns())
    try:
        state.store_table()
    except ValueError as exc:  # the table does not fit: take the change back
        if before is None or undo is None:
            registry.unsubscribe(event, dest)
        else:  # a refresh: restore what it had (it was left changed before)
            before.expire, before.start_ns, before.deadline_ns = undo
        state.store_table()
        raise MIError(400, f"Cannot subscribe: {exc}") from None
    return "OK"


def _subscriber(state: HubState, sub) -> dict[str, Any]:
    now = state.now_ns()
    ttl = sub.ttl(now)
    return {
        "socket": str(sub.destination),
        "expire": "never" if sub.expire is None else sub.expire,
        "ttl": "never" if ttl is None else ttl,
    }


@method("evi:list", aliases=("events_list",))
def _events_list(state: HubState, p: dict[str, Any]) -> dict[str, Any]:
    return {"Events": [{"name": n, "id": i} for i, n in enumerate(state.registry.events)]}


@method("evi:subscribers", aliases=("subscribers_list",), optional=("event", "socket"))
def _subscribers_list(state: HubState, p: dict[str, Any]) -> dict[str, Any]:
    registry = state.registry
    event = p.get("event")
    if event is None:
        if p.get("socket") is not None:  # OpenSIPS has no such form either
            raise MIError(INVALID_PARAMS, "socket needs an event")
        return {
            "Events": [
                {
                    "name": name,
                    "id": i,
                    "Subscribers": [_subscriber(state, s) for s in registry.subscriptions(i)],
                }
                for i, name in enumerate(registry.events)
            ]
        }
    event = _str(p, "event")
    try:
        event_id = registry.event_id(event)
    except RegistryError:
        raise MIError(400, f"Bad parameter value: unknown event {event!r}") from None
    info: dict[str, Any] = {"name": event, "id": event_id}
    if p.get("socket") is None:
        info["Subscribers"] = [_subscriber(state, s) for s in registry.subscriptions(event_id)]
        return {"Event": info}
    try:
        dest = parse_destination(_str(p, "socket"))
    except DestinationError as exc:
        raise MIError(400, f"Bad parameter value: {exc}") from None
    sub = registry.find(event, dest)
    if sub is None:
        raise MIError(404, "Subscriber not found")
    info["Subscriber"] = _subscriber(state, sub)
    return {"Event": info}


@method("evi:raise", aliases=("raise_event",), required=("event",), optional=("params",))
def _raise_event(state: HubState, p: dict[str, Any]) -> str:
    event = _str(p, "event")
    try:
        state.registry.event_id(event)
    except RegistryError:
        raise MIError(404, "Event not registered") from None
    params = p.get("params")
    if isinstance(params, str):  # OpenSIPS takes a string holding a JSON object
        try:
            # orjson, not json: its nesting limit raises a ValueError where
            # json.loads would raise RecursionError on "[[[[..." (a crash).
            params = orjson.loads(params)
        except ValueError:
            raise MIError(400, "Bad parameter value: params is not valid JSON") from None
        if not isinstance(params, dict):
            raise MIError(400, "Bad parameter value: params must hold a JSON object")
    elif params is not None and not isinstance(params, dict | list):
        raise MIError(400, "Bad parameter value: params must be an object or an array")
    try:
        ok = state.raise_event(event, params)
    except (PayloadError, TypeError, ValueError) as exc:
        raise MIError(400, f"Bad parameter value: {exc}") from None
    if not ok:
        raise MIError(480, "Temporarily Unavailable")
    return "OK"


# -- statistics ---------------------------------------------------------------


def _stat_names(p: dict[str, Any]) -> list[str]:
    names = p.get("statistics")
    if names is None:
        return ["all"]
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise MIError(INVALID_PARAMS, "statistics must be an array of strings")
    return names


def _select(stats: dict[str, int], names: list[str]) -> dict[str, int]:
    if "all" in names:
        return stats
    out: dict[str, int] = {}
    for name in names:
        if name.endswith(":"):
            out.update({k: v for k, v in stats.items() if k.startswith(name)})
        elif name in stats:
            out[name] = stats[name]
        else:
            out.update({k: v for k, v in stats.items() if k.split(":", 1)[-1] == name})
    return out


@method("statistics:get", aliases=("get_statistics",), optional=("statistics",))
def _get_statistics(state: HubState, p: dict[str, Any]) -> dict[str, int]:
    return _select(state.statistics(), _stat_names(p))


@method("statistics:list", aliases=("list_statistics",), optional=("statistics",))
def _list_statistics(state: HubState, p: dict[str, Any]) -> dict[str, str]:
    return dict.fromkeys(_select(state.statistics(), _stat_names(p)), "non-incremental")


@method("statistics:reset", aliases=("reset_statistics",), required=("statistics",))
def _reset_statistics(state: HubState, p: dict[str, Any]) -> str:
    state.reset_statistics(list(_select(state.statistics(), _stat_names(p))))
    return "OK"


@method("statistics:reset_all", aliases=("reset_all_statistics",))
def _reset_all_statistics(state: HubState, p: dict[str, Any]) -> str:
    # Every statistic there is now; the hub skips the gauges (pending), as
    # OpenSIPS skips the statistics that cannot be reset.
    state.reset_statistics(list(state.statistics()))
    return "OK"


# -- process facts ----------------------------------------------------------


@method("core:ps", aliases=("ps",))
def _ps(state: HubState, p: dict[str, Any]) -> dict[str, Any]:
    return {"Processes": state.processes()}


@method("core:uptime", aliases=("uptime",))
def _uptime(state: HubState, p: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {
        "Now": time.ctime(now),
        "Up since": time.ctime(state.started),
        "Up time": f"{int(now - state.started)} [sec]",
    }


@method("core:version", aliases=("version",))
def _version(state: HubState, p: dict[str, Any]) -> dict[str, str]:
    return {"Server": f"mpevent {defaults.version()}"}


@method("core:which", aliases=("which",), optional=("command",))
def _which(state: HubState, p: dict[str, Any]) -> list[str] | list[list[str]]:
    if p.get("command") is None:
        # Every name answered, the 4.x names and their aliases: opensips-cli
        # runs only the commands ``which`` lists, and scripts of either era
        # use their own names.
        return sorted(METHODS)
    command = _str(p, "command")
    if command.endswith(":"):  # OpenSIPS 4: ``which command=GROUP:`` lists a group
        group = sorted({s.name for s in METHODS.values() if s.name.startswith(command)})
        if not group:
            raise MIError(404, "unknown MI command group")
        return group
    spec = METHODS.get(command)
    if spec is None:
        raise MIError(404, "unknown MI command")
    return spec.recipes()
