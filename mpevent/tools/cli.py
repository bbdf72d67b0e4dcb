"""The ``mpevent`` command: one entry point, a subcommand per job.

This module owns the command line: argument parsing, choosing the MI
address, turning MI results into tables or JSON, and exit codes. It holds no
MI logic of its own (that is :mod:`mpevent.protocol.mi`, reached through
:mod:`mpevent.api.client`) and no daemon logic (``serve`` is :mod:`mpevent.api.daemon`).

``serve`` runs the daemon. ``listen`` binds a datagram socket and prints the
notifications that arrive. ``demo`` runs :mod:`mpevent.tools.demo`. Every other
subcommand is one MI call:

==============================================  ==========================
``subscribe EVENT SOCKET [EXPIRE]``             ``event_subscribe``
``unsubscribe EVENT SOCKET``                    ``event_subscribe`` expire 0
``events``                                      ``events_list``
``subscribers [EVENT [SOCKET]]``                ``subscribers_list``
``raise EVENT [KEY=VALUE ...]``                 ``raise_event``
``stats [NAME ...] [--watch [SECONDS]]``        ``get_statistics``
``ps``                                          ``ps``
==============================================  ==========================

The MI address comes from ``--mi``, else ``$MPEVENT_MI``, else the default
hub's UNIX socket (``$XDG_RUNTIME_DIR/mpevent/mpevent.sock``) if it exists,
else ``udp:127.0.0.1:8080``. ``--json`` prints the hub's MI result unchanged
(the OpenSIPS shapes) instead of a table.

Exit codes scripts can rely on: 0 success, 1 the hub answered with an error
(``error CODE: MESSAGE`` on stderr), 2 usage or configuration error (bad
arguments, a bad destination or MI address, a socket ``listen`` cannot bind),
3 no hub answered. ``serve`` keeps its own codes (see :mod:`mpevent.api.daemon`).

The pure helpers (picking the address, ``KEY=VALUE`` parsing, tables,
formatting) are kept apart from the I/O so they can be tested without
processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from mpevent import defaults
from mpevent.api.client import MICallError, MIClient, MIHttpClient, MIUnavailable
from mpevent.protocol.destination import Destination, DestinationError, parse_destination
from mpevent.tools.report import format_table
from mpevent.tools.report import is_number as _is_number

EXIT_OK, EXIT_CALL_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
DEFAULT_MI_UDP = f"udp:{defaults.MI_UDP}"
DEFAULT_TIMEOUT = 2.0
MAX_RECV = 1 << 16
_HINT = (
    "is `mpevent serve` running there? Give its MI address with --mi ADDR or "
    "MPEVENT_MI (udp:HOST:PORT, unix:/path or http://HOST:PORT/mi)"
)


class UsageError(Exception):
    """Bad input on the command line: exit code 2."""


# -- pure helpers -------------------------------------------------------------


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


def make_client(address: str, timeout: float) -> MIClient | MIHttpClient:
    """A client for ``udp:HOST:PORT``, ``unix:/path`` (or a bare path) or an http:// URL."""
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


def process_rows(result: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """``ps`` result to (pid, type, cpu, rss) rows, CPU in seconds, RSS human-readable."""
    rows = []
    for proc in result.get("Processes", []):
        cpu, rss = proc.get("CPU"), proc.get("RSS")
        rows.append(
            (
                proc.get("PID"),
                proc.get("Type"),
                f"{cpu:.2f}s" if _is_number(cpu) else cpu,
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
    relative one is taken from the working directory: this process binds it)."""
    if text and ":" not in text and not text.startswith(("/", "@")):
        text = os.path.join(cwd or os.getcwd(), text)
    return destination(text, "listen socket")


# -- I/O ------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    print(orjson.dumps(value).decode(), flush=True)


class _MI:
    """The chosen client; a socket error on the way (EACCES on a UNIX socket,
    no route) is no answer from the hub, like a timeout."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.address, self.source = pick_mi_address(
            args.mi, os.environ, _default_socket(), socket_exists=_is_socket
        )
        args.mi_address, args.mi_source = self.address, self.source
        self.client = make_client(self.address, args.timeout)

    def call(self, method: str, params: Any = None) -> Any:
        try:
            return self.client.call(method, params)
        except OSError as exc:
            if isinstance(exc, MIUnavailable):
                raise
            raise MIUnavailable(f"no MI answer from {self.address}: {exc}") from None


def _default_socket() -> Path:
    from mpevent.protocol.config import runtime_dir

    return runtime_dir() / "mpevent.sock"


def _is_socket(path: Path) -> bool:
    try:
        return path.is_socket()
    except OSError:
        return False


def _done(args: argparse.Namespace, result: Any, message: str) -> int:
    if args.json:
        _print_json(result)
    else:
        print(message)
    return EXIT_OK


def _subscribe(args: argparse.Namespace) -> int:
    destination(args.socket)
    params = [args.event, args.socket] + ([] if args.expire is None else [args.expire])
    result = _MI(args).call("event_subscribe", params)
    expire = "the default time" if args.expire is None else f"{args.expire} s"
    if args.expire == 0:
        return _done(args, result, f"unsubscribed {args.socket} from {args.event}")
    return _done(args, result, f"subscribed {args.socket} to {args.event} for {expire}")


def _unsubscribe(args: argparse.Namespace) -> int:
    destination(args.socket)
    result = _MI(args).call("event_subscribe", [args.event, args.socket, 0])
    return _done(args, result, f"unsubscribed {args.socket} from {args.event}")


def _events(args: argparse.Namespace) -> int:
    result = _MI(args).call("events_list")
    if args.json:
        _print_json(result)
    else:
        print(format_table(("ID", "NAME"), event_rows(result)))
    return EXIT_OK


def _subscribers(args: argparse.Namespace) -> int:
    params = None
    if args.event is not None:
        params = [args.event]
        if args.socket is not None:
            destination(args.socket)
            params.append(args.socket)
    result = _MI(args).call("subscribers_list", params)
    if args.json:
        _print_json(result)
    else:
        headers = ("EVENT", "SOCKET", "EXPIRE", "TTL")
        print(format_table(headers, subscriber_rows(result), align="llrr"))
    return EXIT_OK


def _raise(args: argparse.Namespace) -> int:
    if args.json_params is not None and args.params:
        raise UsageError("give KEY=VALUE parameters or --json-params, not both")
    if args.json_params is not None:
        params: Any = parse_json_params(args.json_params)
    else:
        params = parse_kv(args.params) or None
    call = {"event": args.event} if params is None else {"event": args.event, "params": params}
    result = _MI(args).call("raise_event", call)
    return _done(args, result, f"raised {args.event}")


def _stats(args: argparse.Namespace) -> int:
    client = _MI(args)
    names = args.names + getattr(args, "watch_names", [])
    params = {"statistics": names} if names else None
    if args.watch is None:
        result = client.call("get_statistics", params)
        if args.json:
            _print_json(result)
        else:
            print(stats_table(result))
        return EXIT_OK
    redraw = not args.json and sys.stdout.isatty()
    before: Mapping[str, Any] | None = None
    taken = 0.0
    next_at = time.monotonic()
    try:
        while True:
            values = client.call("get_statistics", params)
            now = time.monotonic()
            rates = stat_rates(before, values, now - taken) if before is not None else {}
            if args.json:
                _print_json({"time": time.time(), "statistics": values, "rates": rates})
            else:
                head = f"{format_timestamp(time.time())}  every {args.watch:g} s, Ctrl-C to stop"
                screen = f"{head}\n{stats_table(values, rates)}\n"
                sys.stdout.write(("\x1b[H\x1b[2J" + screen) if redraw else screen + "\n")
                sys.stdout.flush()
            before, taken = values, now
            next_at = max(next_at + args.watch, time.monotonic())
            time.sleep(next_at - time.monotonic())
    except KeyboardInterrupt:
        return EXIT_OK


def _ps(args: argparse.Namespace) -> int:
    result = _MI(args).call("ps")
    if args.json:
        _print_json(result)
    else:
        print(format_table(("PID", "TYPE", "CPU", "RSS"), process_rows(result), align="rlrr"))
    return EXIT_OK


class _Stop(Exception):
    """SIGTERM while listening: leave like on Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Stop


def _bind_listener(dest: Destination) -> tuple[socket.socket, Path | None]:
    """Bind ``dest``; returns the socket and the UNIX socket file it created."""
    created = None
    if dest.family == socket.AF_UNIX and not dest.host.startswith("\0"):
        from mpevent.system import SocketInUse, claim_socket_path

        created = Path(dest.host)
        try:
            claim_socket_path(created)
        except SocketInUse as exc:
            raise UsageError(f"cannot listen on {dest}: {exc}") from None
    sock = socket.socket(dest.family, socket.SOCK_DGRAM)
    try:
        if dest.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(dest.sockaddr)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {dest}: {exc.strerror or exc}") from None
    return sock, created


def _listen(args: argparse.Namespace) -> int:
    dest = listen_destination(args.socket)
    raw = args.raw or args.json
    sock, created = _bind_listener(dest)
    inode = created.stat().st_ino if created is not None else None
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    out = getattr(sys.stdout, "buffer", None)
    try:
        print(f"mpevent: listening on {dest} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        received = 0
        while args.count is None or received < args.count:
            data = sock.recv(MAX_RECV)
            received += 1
            if not raw:
                print(format_notification(data, time.time()), flush=True)
            elif out is not None:
                out.write(data + b"\n")
                out.flush()
            else:
                sys.stdout.write(data.decode("utf-8", "replace") + "\n")
                sys.stdout.flush()
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
        # Remove the file only if it is still the one we bound.
        if created is not None:
            try:
                if created.stat().st_ino == inode:
                    created.unlink()
            except FileNotFoundError:
                pass
    return EXIT_OK


def _delegate(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a program that parses its own options (the demo, the benchmark)."""
    try:
        return main(argv)
    except SystemExit as exc:  # its argparse (--help, a usage error) or sys.exit()
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or EXIT_OK
        print(exc.code, file=sys.stderr)
        return EXIT_CALL_ERROR


def _demo(args: argparse.Namespace) -> int:
    from mpevent.tools.demo import main as demo_main

    return _delegate(demo_main, args.args)


def _bench(args: argparse.Namespace) -> int:
    from mpevent.tools.bench import main as bench_main

    return _delegate(bench_main, args.args)


def _serve(args: argparse.Namespace) -> int:
    from mpevent.api.daemon import serve

    overrides = {
        "segment.name": args.name,
        "segment.lanes": args.lanes,
        "segment.lane_size": args.lane_size,
        "segment.senders": args.senders,
        "mi.udp": args.mi_udp,
        "mi.unix": args.mi_unix,
        "mi.http": args.mi_http,
        "log.level": args.log_level,
    }
    return serve(args.config, overrides)


# -- the parser -----------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text!r}")
    return value


class _WatchAction(argparse.Action):
    """``--watch [SECONDS]``: a value that is not a number is a statistic name
    (``stats --watch event:``), not an error."""

    def __call__(self, parser, namespace, value, option_string=None):
        seconds = 1.0
        if value is not None:
            try:
                seconds = float(value)
            except ValueError:
                namespace.watch_names = [*getattr(namespace, "watch_names", []), value]
            else:
                if not 0 < seconds < float("inf"):
                    raise argparse.ArgumentError(self, f"must be a positive number, not {value!r}")
        namespace.watch = seconds


def _mi_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--mi",
        metavar="ADDR",
        default=default,
        help="the hub's MI: udp:HOST:PORT, unix:/path or http://HOST:PORT/mi (env "
        "MPEVENT_MI; default: the default hub's UNIX socket if it exists, else "
        f"{DEFAULT_MI_UDP})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        default=default if default is argparse.SUPPRESS else DEFAULT_TIMEOUT,
        help=f"how long to wait for the hub's answer (default {DEFAULT_TIMEOUT:g})",
    )
    _json_option(parser, default)


def _json_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="print machine-readable JSON (the MI result as is) instead of a table",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpevent",
        description="The mpevent command: run the hub, manage it over its MI, listen for events.",
        epilog="Exit codes: 0 success, 1 the hub answered with an error, 2 usage or "
        "configuration error, 3 no hub answered.",
    )
    _mi_options(parser, None)
    # The same options after the subcommand; SUPPRESS keeps them from
    # overwriting what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    _mi_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], text: str, **kw: Any):
        p = sub.add_parser(name, help=text, description=text, **kw)
        p.set_defaults(func=func, parser=p)
        return p

    p = command("serve", _serve, "run the hub as a foreground daemon")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--name", help=f"segment name (/dev/shm/NAME), default {defaults.SEGMENT_NAME}")
    p.add_argument("--lanes", type=int, help=f"producer lanes (default {defaults.LANES})")
    p.add_argument("--lane-size", type=int, help="bytes per lane, a power of two")
    p.add_argument("--senders", type=int, help=f"sender processes (default {defaults.SENDERS})")
    p.add_argument(
        "--mi-udp", metavar="HOST:PORT", help=f'MI on UDP (default {defaults.MI_UDP}, "" off)'
    )
    p.add_argument("--mi-unix", metavar="PATH", help='MI on a UNIX socket ("" off)')
    p.add_argument("--mi-http", metavar="HOST:PORT", help="MI over HTTP POST /mi (default off)")
    p.add_argument("--log-level", choices=defaults.LOG_LEVELS)

    p = command(
        "subscribe",
        _subscribe,
        "subscribe a socket to an event (event_subscribe)",
        parents=[common],
    )
    p.add_argument("event", metavar="EVENT")
    p.add_argument("socket", metavar="SOCKET", help="udp:HOST:PORT, unix:/path or /path")
    p.add_argument(
        "expire",
        metavar="EXPIRE",
        type=int,
        nargs="?",
        help="seconds (default: the hub's, 3600); 0 unsubscribes",
    )

    p = command(
        "unsubscribe",
        _unsubscribe,
        "remove a subscription (event_subscribe with expire 0)",
        parents=[common],
    )
    p.add_argument("event", metavar="EVENT")
    p.add_argument("socket", metavar="SOCKET")

    command("events", _events, "list the published events (events_list)", parents=[common])

    p = command(
        "subscribers",
        _subscribers,
        "list subscriptions (subscribers_list)",
        parents=[common],
    )
    p.add_argument("event", metavar="EVENT", nargs="?", help="only this event")
    p.add_argument("socket", metavar="SOCKET", nargs="?", help="only this subscriber")

    p = command(
        "raise",
        _raise,
        "raise an event through the hub (raise_event)",
        parents=[common],
        epilog="KEY=VALUE values that are exactly an integer, null, true or false are "
        "sent as such; anything else as a string. --json-params takes a JSON object "
        "(named params) or array (positional).",
    )
    p.add_argument("event", metavar="EVENT")
    p.add_argument("params", metavar="KEY=VALUE", nargs="*", help="named parameters")
    p.add_argument("--json-params", metavar="JSON", help="params as a JSON object or array")

    p = command(
        "stats",
        _stats,
        "show counters (get_statistics)",
        parents=[common],
        epilog="NAME is a statistic, a group ending in ':' (mpevent:, event:, "
        "destination:) or 'all' (the default).",
    )
    p.add_argument("names", metavar="NAME", nargs="*")
    p.add_argument(
        "--watch",
        metavar="SECONDS",
        action=_WatchAction,
        nargs="?",
        help="redraw every SECONDS (default 1) with per-second rates, until Ctrl-C",
    )

    command("ps", _ps, "list the hub's processes (ps)", parents=[common])

    p = command(
        "listen",
        _listen,
        "bind a datagram socket and print the notifications that arrive",
        epilog="Subscribe it from another shell: mpevent subscribe EVENT SOCKET.",
    )
    p.add_argument(
        "socket",
        metavar="SOCKET",
        help="udp:HOST:PORT, unix:/path or a path (the UNIX socket file is removed on exit)",
    )
    p.add_argument("--count", type=_positive_int, metavar="N", help="stop after N notifications")
    p.add_argument(
        "--raw", action="store_true", help="print each datagram as received, one per line"
    )
    _json_option(p, argparse.SUPPRESS)

    # The demo parses its own options (including --help): hand them all over.
    p = command(
        "demo",
        _demo,
        "run the demo: hub, SIP-like workers, traffic, subscribers (demo --help)",
        add_help=False,
        prefix_chars="\0",
    )
    p.add_argument("args", metavar="ARGS", nargs="*", help=argparse.SUPPRESS)
    p = command(
        "bench",
        _bench,
        "benchmark against the alternatives (mpevent bench --help for its options)",
        add_help=False,
        prefix_chars="\0",
    )
    p.add_argument("args", metavar="ARGS", nargs="*", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except UsageError as exc:
        args.parser.print_usage(sys.stderr)
        print(f"{args.parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MICallError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_CALL_ERROR
    except MIUnavailable as exc:
        source = getattr(args, "mi_source", "")
        origin = f" (the {source} address)" if source else ""
        print(f"mpevent: {exc}{origin}\nmpevent: {_HINT}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except BrokenPipeError:
        # The reader went away (mpevent listen | head): stop quietly, and keep
        # the interpreter from complaining when it flushes stdout at exit.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
