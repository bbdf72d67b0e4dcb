"""The ``mpevent`` command: one entry point, a subcommand per job.

``serve`` runs the daemon; the others talk to it over the MI (address from
``--mi`` or ``MPEVENT_MI``). Exit codes scripts can rely on: 0 success,
1 the hub answered with an error, 2 usage or configuration error, 3 no hub
answered.
"""

from __future__ import annotations

import argparse
import sys

from .daemon import serve


def _serve(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpevent", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the hub as a foreground daemon")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--name", help="segment name (/dev/shm/NAME), default mpevent")
    p.add_argument("--lanes", type=int, help="producer lanes (default 32)")
    p.add_argument("--lane-size", type=int, help="bytes per lane, a power of two")
    p.add_argument("--senders", type=int, help="sender processes (default 1)")
    p.add_argument(
        "--mi-udp", metavar="HOST:PORT", help='MI on UDP (default 127.0.0.1:8080, "" off)'
    )
    p.add_argument("--mi-unix", metavar="PATH", help='MI on a UNIX socket ("" off)')
    p.add_argument("--mi-http", metavar="HOST:PORT", help="MI over HTTP POST /mi (default off)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
