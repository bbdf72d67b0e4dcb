"""The ``mpevent`` command line: its parser, and ``main``, which runs a subcommand.

This module owns the options and help texts of every subcommand, the checks
argparse does on them, and turning what a subcommand raises into the exit
codes and the messages on stderr: a usage error (2), an error answer from the
hub (1), no answer from the hub (3, with a hint about ``--mi``), and a reader
that went away (0, quietly). The subcommands themselves are
:mod:`mpevent.tools.cli.commands`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from mpevent import defaults
from mpevent.api.client import MICallError, MIUnavailable
from mpevent.tools.cli import commands
from mpevent.tools.cli.text import (
    DEFAULT_MI_UDP,
    EXIT_CALL_ERROR,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    UsageError,
)

DEFAULT_TIMEOUT = 2.0
_HINT = (
    "is `mpevent serve` running there? Give its MI address with --mi ADDR or "
    "MPEVENT_MI (udp:HOST:PORT, unix:/path, http://HOST:PORT/mi or fifo:/path)"
)


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
        help="the hub's MI: udp:HOST:PORT, unix:/path, http://HOST:PORT/mi or fifo:/path (env "
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
    parser.add_argument(
        "--version",
        action="store_true",
        help="print the version, whether the compiled fast path runs and the hub's "
        "version if one answers (within 0.5 s), then exit 0",
    )
    _mi_options(parser, None)
    # The same options after the subcommand; SUPPRESS keeps them from
    # overwriting what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    _mi_options(common, argparse.SUPPRESS)
    # Not required by argparse: --version runs without one (main checks).
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], text: str, **kw: Any):
        p = sub.add_parser(name, help=text, description=text, **kw)
        p.set_defaults(func=func, parser=p)
        return p

    p = command("serve", commands.serve, "run the hub as a foreground daemon")
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
    p.add_argument(
        "--mi-fifo",
        metavar="PATH",
        help='MI on a FIFO, as OpenSIPS mi_fifo (default: NAME_fifo in the runtime dir; "" off)',
    )
    p.add_argument("--log-level", choices=defaults.LOG_LEVELS)

    p = command(
        "subscribe",
        commands.subscribe,
        "subscribe a socket to an event (event_subscribe)",
        parents=[common],
        epilog="A socket already subscribed (in any spelling: udp:localhost:9000 is "
        "udp:127.0.0.1:9000) is not added again: its subscription is refreshed, the new "
        "EXPIRE counting from now, and the command says so.",
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
        commands.unsubscribe,
        "remove a subscription (event_subscribe with expire 0)",
        parents=[common],
        epilog="Exits 1, saying so, when SOCKET was not subscribed to EVENT.",
    )
    p.add_argument("event", metavar="EVENT")
    p.add_argument("socket", metavar="SOCKET")

    p = command(
        "publish",
        commands.publish,
        "declare events, so that they can be subscribed to and raised (evi:publish)",
        parents=[common],
        epilog="Publishing an event again is harmless: it keeps its id.",
    )
    p.add_argument("events", metavar="EVENT", nargs="+")

    command("events", commands.events, "list the published events (events_list)", parents=[common])

    p = command(
        "subscribers",
        commands.subscribers,
        "list subscriptions (subscribers_list)",
        parents=[common],
    )
    p.add_argument("event", metavar="EVENT", nargs="?", help="only this event")
    p.add_argument("socket", metavar="SOCKET", nargs="?", help="only this subscriber")

    p = command(
        "raise",
        commands.raise_event,
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
        commands.stats,
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

    p = command("ps", commands.ps, "list the hub's processes (ps)", parents=[common])
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="sample twice, this far apart, for each process's share of a core now "
        "(CPU NOW; 0: one sample, no CPU NOW; default 1)",
    )

    command(
        "version",
        commands.version,
        "the library's version, the producer path that runs, and the hub's version",
        parents=[common],
        epilog="Exits 3 when no hub answered (mpevent --version exits 0).",
    )

    p = command(
        "listen",
        commands.listen,
        "bind a datagram socket, or accept tcp: streams, and print the notifications that arrive",
        epilog="Subscribe it from another shell: mpevent subscribe EVENT SOCKET.",
    )
    p.add_argument(
        "socket",
        metavar="SOCKET",
        help="udp:HOST:PORT, unix:/path or a path (the UNIX socket file is removed on exit), "
        'or tcp:HOST:PORT (JSON-RPC texts as event_stream sends them; requests are answered "OK")',
    )
    p.add_argument("--count", type=_positive_int, metavar="N", help="stop after N notifications")
    p.add_argument(
        "--raw", action="store_true", help="print each notification as received, one per line"
    )
    _json_option(p, argparse.SUPPRESS)

    # The demo parses its own options (including --help): hand them all over.
    p = command(
        "demo",
        commands.demo,
        "run the demo: hub, SIP-like workers, traffic, subscribers (demo --help)",
        add_help=False,
        prefix_chars="\0",
    )
    p.add_argument("args", metavar="ARGS", nargs="*", help=argparse.SUPPRESS)
    p = command(
        "bench",
        commands.bench,
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
        if not args.version and args.command is None:
            parser.error("the following arguments are required: COMMAND")
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.version:  # whatever else was given
        args.parser = parser
        args.func = functools.partial(commands.version, flag=True)
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
