"""The ``mpevent`` subcommands: each one's I/O, given its parsed arguments.

This module owns what a subcommand does: the MI calls through the chosen
client (a socket error on the way counts as no answer from the hub), printing
tables or JSON, the look-ups that let ``subscribe`` say it refreshed an
existing subscription and ``unsubscribe`` say there was none, the hint an
unknown event's error gets, ``publish`` and ``version`` (and ``--version``),
the ``stats --watch`` loop, the ``listen`` socket (bound here,
and its UNIX socket file removed on exit only if it is still the one bound;
for ``tcp:`` a listener whose connections' streams are split into JSON texts),
and handing ``demo``, ``bench`` and ``serve`` to the programs that do them.
Each function takes the :class:`argparse.Namespace` and returns an exit code;
the text they parse and print is :mod:`mpevent.tools.cli.text`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from mpevent import defaults
from mpevent.api.client import MICallError, MIUnavailable
from mpevent.protocol.destination import Destination
from mpevent.protocol.jsonstream import JsonSplitter, JsonStreamError
from mpevent.tools.cli.text import (
    EXIT_CALL_ERROR,
    EXIT_OK,
    UsageError,
    destination,
    event_names,
    event_rows,
    format_notification,
    format_timestamp,
    listen_destination,
    make_client,
    not_subscribed_line,
    parse_json_params,
    parse_kv,
    pick_mi_address,
    process_rows,
    published_line,
    refreshed_line,
    shown_socket,
    stat_rates,
    stats_table,
    stream_reply,
    subscriber_rows,
    unknown_event_hint,
    version_lines,
)
from mpevent.tools.figures import format_table

MAX_RECV = 1 << 16


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


@contextlib.contextmanager
def _hint_unknown_event(event: str):
    """An error for an event the hub does not know says how to publish it."""
    try:
        yield
    except MICallError as exc:
        hinted = unknown_event_hint(exc.message, event)
        if hinted is None:
            raise
        raise MICallError(exc.code, hinted) from None


def _subscription(mi: _MI, event: str, socket: str) -> dict[str, Any] | None:
    """The hub's subscription of ``socket`` (any spelling of it) to ``event``, or None."""
    try:
        return mi.call("subscribers_list", [event, socket])["Event"]["Subscriber"]
    except MICallError as exc:
        if exc.code == 404:  # "Subscriber not found"
            return None
        raise


def subscribe(args: argparse.Namespace) -> int:
    destination(args.socket)
    if args.expire == 0:
        return unsubscribe(args)
    params = [args.event, args.socket] + ([] if args.expire is None else [args.expire])
    mi = _MI(args)
    with _hint_unknown_event(args.event):
        # The MI answers "OK" either way, as OpenSIPS does: ask before and
        # after, so that a refresh is not reported as a new subscription.
        before = _subscription(mi, args.event, args.socket)
        result = mi.call("event_subscribe", params)
        after = _subscription(mi, args.event, args.socket) if before is not None else None
    shown = shown_socket(args.socket)
    if before is not None:
        return _done(args, result, refreshed_line(shown, args.event, after or before))
    expire = "the default time" if args.expire is None else f"{args.expire} s"
    return _done(args, result, f"subscribed {shown} to {args.event} for {expire}")


def unsubscribe(args: argparse.Namespace) -> int:
    destination(args.socket)
    mi = _MI(args)
    with _hint_unknown_event(args.event):
        # expire 0 answers "OK" for a subscription that does not exist (as in
        # OpenSIPS); the command says there was none, and fails.
        before = _subscription(mi, args.event, args.socket)
        if before is None:
            gone = not_subscribed_line(shown_socket(args.socket), args.event)
            print(f"mpevent: {gone}", file=sys.stderr)
            return EXIT_CALL_ERROR
        result = mi.call("event_subscribe", [args.event, args.socket, 0])
    socket_ = before.get("socket", shown_socket(args.socket))
    return _done(args, result, f"unsubscribed {socket_} from {args.event}")


def publish(args: argparse.Namespace) -> int:
    names = event_names(args.events)  # all checked before any is declared
    mi = _MI(args)
    known = [e.get("name") for e in mi.call("events_list").get("Events", [])]
    for name in names:
        result = mi.call("event_publish", [name])
        if args.json:
            _print_json(result)
        else:
            print(published_line(result, known))
    return EXIT_OK


VERSION_FLAG_TIMEOUT = 0.5  # ``--version`` asks the hub, but is not made to wait for one


def version(args: argparse.Namespace, flag: bool = False) -> int:
    """``mpevent version`` (no hub answering: exit 3) and ``mpevent --version``
    (exit 0 whatever the hub does: it is first the library's version)."""
    from mpevent.processes import fastpath

    library, path = defaults.version(), fastpath.describe()
    if flag:
        args.timeout = min(args.timeout, VERSION_FLAG_TIMEOUT)
    try:
        mi = _MI(args)
    except UsageError as exc:
        if not flag:
            raise
        print("\n".join(version_lines(library, path, None, "")), flush=True)
        print(f"mpevent: cannot ask a hub: {exc}", file=sys.stderr)
        return EXIT_OK
    hub: dict[str, Any] | None = None
    problem: Exception | None = None
    try:
        hub = mi.call("version")
    except (MICallError, MIUnavailable) as exc:
        problem = exc
    if args.json:
        _print_json(
            {
                "version": library,
                "compiled": fastpath.COMPILED,
                "producer_path": path,
                "hub": hub,
                "mi": mi.address,
            }
        )
    else:
        print("\n".join(version_lines(library, path, hub, mi.address)), flush=True)
    if problem is None:
        return EXIT_OK
    if flag:
        origin = f" (the {mi.source} address)"
        if isinstance(problem, MICallError):
            said = f"answered error {problem.code}: {problem.message}"
        else:
            said = "did not answer"
        print(f"mpevent: the hub at {mi.address}{origin} {said}", file=sys.stderr)
        return EXIT_OK
    raise problem


def events(args: argparse.Namespace) -> int:
    result = _MI(args).call("events_list")
    if args.json:
        _print_json(result)
    else:
        print(format_table(("ID", "NAME"), event_rows(result)))
    return EXIT_OK


def subscribers(args: argparse.Namespace) -> int:
    params = None
    if args.event is not None:
        params = [args.event]
        if args.socket is not None:
            destination(args.socket)
            params.append(args.socket)
    with _hint_unknown_event(args.event or ""):
        result = _MI(args).call("subscribers_list", params)
    if args.json:
        _print_json(result)
    else:
        headers = ("EVENT", "SOCKET", "EXPIRE", "TTL")
        print(format_table(headers, subscriber_rows(result), align="llrr"))
    return EXIT_OK


def raise_event(args: argparse.Namespace) -> int:
    if args.json_params is not None and args.params:
        raise UsageError("give KEY=VALUE parameters or --json-params, not both")
    if args.json_params is not None:
        params: Any = parse_json_params(args.json_params)
    else:
        params = parse_kv(args.params) or None
    call = {"event": args.event} if params is None else {"event": args.event, "params": params}
    with _hint_unknown_event(args.event):
        result = _MI(args).call("raise_event", call)
    return _done(args, result, f"raised {args.event}")


def stats(args: argparse.Namespace) -> int:
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


def ps(args: argparse.Namespace) -> int:
    mi = _MI(args)
    result = mi.call("ps")
    if args.json:
        _print_json(result)
        return EXIT_OK
    # Two samples, --interval apart: what each process costs now (an idle
    # hub's processes should show 0.0%), beside its CPU time so far.
    earlier, start = result, time.monotonic()
    if args.interval > 0:
        time.sleep(args.interval)
        result = mi.call("ps")
    rows = process_rows(result, earlier, time.monotonic() - start if args.interval > 0 else 0)
    print(format_table(("PID", "TYPE", "CPU", "CPU NOW", "RSS"), rows, align="rlrrr"))
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


def _show_received(data: bytes, raw: bool) -> None:
    """One notification as ``listen`` prints it: a line, or the bytes as received."""
    out = getattr(sys.stdout, "buffer", None)
    if not raw:
        print(format_notification(data, time.time()), flush=True)
    elif out is not None:
        out.write(data + b"\n")
        out.flush()
    else:
        sys.stdout.write(data.decode("utf-8", "replace") + "\n")
        sys.stdout.flush()


class _StreamConnection:
    """One connection ``listen tcp:`` accepted: its stream's splitter, replies to write."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.splitter = JsonSplitter()
        self.replies = bytearray()

    def flush(self) -> None:
        if self.replies:
            try:
                went = self.sock.send(self.replies)
            except BlockingIOError:
                return
            except OSError:
                went = len(self.replies)  # gone: the next read sees it
            del self.replies[:went]


def _listen_stream(dest: Destination, count: int | None, raw: bool) -> int:
    """``listen tcp:HOST:PORT``: accept connections, print each JSON text that
    arrives, answer requests (see :func:`~mpevent.tools.cli.text.stream_reply`)."""
    listener = socket.socket(dest.family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(dest.sockaddr)
        listener.listen(64)
    except OSError as exc:
        listener.close()
        raise UsageError(f"cannot listen on {dest}: {exc.strerror or exc}") from None
    listener.setblocking(False)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    connections: dict[int, _StreamConnection] = {}

    def drop(conn: _StreamConnection) -> None:
        poller.unregister(conn.sock)
        del connections[conn.sock.fileno()]
        conn.sock.close()

    try:
        print(f"mpevent: listening on {dest} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        received = 0
        while count is None or received < count:
            for fd, revents in poller.poll():
                if fd == listener.fileno():
                    try:
                        sock, address = listener.accept()
                    except BlockingIOError:
                        continue
                    sock.setblocking(False)
                    peer = f"{address[0]}:{address[1]}"
                    connections[sock.fileno()] = _StreamConnection(sock, peer)
                    poller.register(sock, select.POLLIN)
                    continue
                conn = connections.get(fd)
                if conn is None:
                    continue
                conn.flush()
                if revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    try:
                        data = conn.sock.recv(MAX_RECV)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        drop(conn)
                        continue
                    try:
                        texts = conn.splitter.feed(data)
                    except JsonStreamError as exc:
                        print(f"mpevent: from {conn.peer}: {exc}; closed", file=sys.stderr)
                        drop(conn)
                        continue
                    for text in texts:
                        if count is not None and received >= count:
                            break
                        received += 1
                        _show_received(text, raw)
                        conn.replies += stream_reply(text) or b""
                    conn.flush()
                waiting = select.POLLOUT if conn.replies else 0
                poller.modify(conn.sock, select.POLLIN | waiting)
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        for conn in connections.values():
            conn.sock.close()
        listener.close()
    return EXIT_OK


def listen(args: argparse.Namespace) -> int:
    dest = listen_destination(args.socket)
    raw = args.raw or args.json
    if dest.kind == "tcp":
        return _listen_stream(dest, args.count, raw)
    sock, created = _bind_listener(dest)
    inode = created.stat().st_ino if created is not None else None
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        print(f"mpevent: listening on {dest} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        received = 0
        while args.count is None or received < args.count:
            data = sock.recv(MAX_RECV)
            received += 1
            _show_received(data, raw)
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


def demo(args: argparse.Namespace) -> int:
    from mpevent.tools.demo import main as demo_main

    return _delegate(demo_main, args.args)


def bench(args: argparse.Namespace) -> int:
    from mpevent.tools.bench import main as bench_main

    return _delegate(bench_main, args.args)


def serve(args: argparse.Namespace) -> int:
    from mpevent.api import daemon

    overrides = {
        "segment.name": args.name,
        "segment.lanes": args.lanes,
        "segment.lane_size": args.lane_size,
        "segment.senders": args.senders,
        "mi.udp": args.mi_udp,
        "mi.unix": args.mi_unix,
        "mi.http": args.mi_http,
        "mi.fifo": args.mi_fifo,
        "log.level": args.log_level,
    }
    return daemon.serve(args.config, overrides)
