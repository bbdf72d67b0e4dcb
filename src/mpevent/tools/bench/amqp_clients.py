"""``python -m mpevent.tools.bench.amqp_clients``: which AMQP client the rabbitmq: transport uses.

The raw publish loop of each candidate, with publisher confirms, against a
:class:`~mpevent.tools.broker.PrivateBroker`, side by side in one run: the
same 100-byte body (a JSON-RPC notification), the same transient messages to
one queue, N messages per client and round, rounds interleaved so that a slow
phase of the machine hits every client alike. Each loop runs in a fresh
interpreter and counts from the first publish to the last confirm:

* ``pika-select``: pika's SelectConnection, a window of unconfirmed messages;
* ``pika-blocking``: pika's BlockingConnection, each publish waits for its confirm;
* ``py-amqp``: ``confirm_select`` and a window, acks read by ``drain_events``;
* ``aiormq``: publisher confirms, publishes pipelined up to a window.

Reported per client: messages per second and CPU microseconds per message
(the publishing process's CPU time, all threads), medians over the rounds,
with ratios to the best. A client that is not installed is reported as
skipped (``pip install -e '.[amqp-bench]'``, or ``make bench-amqp``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from mpevent.tools.figures import fmt_num, fmt_ratio, format_table, ratio

if TYPE_CHECKING:
    from mpevent.tools.broker import PrivateBroker

MODULE = "mpevent.tools.bench.amqp_clients"  # run as a child: -m needs the name

QUEUE = "mpevent-bench-amqp"
WINDOW = 1000
BODY_SIZE = 100


def notification_body(size: int = BODY_SIZE) -> bytes:
    """A JSON-RPC 2.0 notification of exactly ``size`` bytes (padded in its params)."""
    head = b'{"jsonrpc":"2.0","method":"E_BENCH","params":{"seq":12345,"pad":"'
    tail = b'"}}'
    pad = size - len(head) - len(tail)
    if pad < 0:
        raise ValueError(f"a notification needs at least {len(head) + len(tail)} bytes")
    body = head + b"x" * pad + tail
    json.loads(body)  # a real notification, not just bytes
    return body


@dataclass(frozen=True)
class Client:
    name: str
    package: str  # the distribution whose absence makes it skipped
    how: str


CLIENTS = (
    Client("pika-select", "pika", f"SelectConnection, window {WINDOW}"),
    Client("pika-blocking", "pika", "BlockingConnection, wait for each confirm"),
    Client("py-amqp", "amqp", f"confirm_select, window {WINDOW}"),
    Client("aiormq", "aiormq", f"publisher_confirms, pipelined, window {WINDOW}"),
)


@dataclass
class Outcome:
    """One client's figures (medians over the rounds), or why it was skipped."""

    client: str
    how: str
    version: str | None
    messages: int
    rounds: list[dict[str, float]]
    rate: float | None = None  # confirmed messages per second
    cpu_us: float | None = None  # publishing process CPU per message
    skipped: str | None = None


# -- the loops (each in a child interpreter) --------------------------------


class Confirms:
    """Publisher confirms on one channel: delivery tags count from 1 in publish
    order; an ack or nack settles one tag, or with ``multiple`` all up to it."""

    def __init__(self) -> None:
        self.outstanding: deque[int] = deque()
        self.next_tag = 1
        self.confirmed = 0
        self.nacked = 0

    def published(self) -> None:
        self.outstanding.append(self.next_tag)
        self.next_tag += 1

    def settle(self, tag: int, multiple: bool, nack: bool = False) -> None:
        settled = 0
        if multiple:
            while self.outstanding and self.outstanding[0] <= tag:
                self.outstanding.popleft()
                settled += 1
        elif self.outstanding and self.outstanding[0] == tag:
            self.outstanding.popleft()
            settled = 1
        elif tag in self.outstanding:
            self.outstanding.remove(tag)
            settled = 1
        self.confirmed += settled
        if nack:
            self.nacked += settled


def _pika_select(port: int, n: int, body: bytes, window: int) -> int:
    import pika

    confirms = Confirms()
    failure: list[object] = []
    guest = pika.PlainCredentials("guest", "guest")
    params = pika.ConnectionParameters("127.0.0.1", port, credentials=guest)
    props = pika.BasicProperties(content_type="application/json", delivery_mode=1)
    channels: list = []

    def fill() -> None:
        channel = channels[0]
        while confirms.next_tag <= n and len(confirms.outstanding) < window:
            channel.basic_publish("", QUEUE, body, props)
            confirms.published()

    def on_confirm(frame) -> None:
        method = frame.method
        confirms.settle(method.delivery_tag, method.multiple, method.NAME == "Basic.Nack")
        if confirms.confirmed >= n:
            connection.close()
        else:
            fill()

    def on_channel(channel) -> None:
        channels.append(channel)
        channel.confirm_delivery(on_confirm, callback=lambda _frame: fill())

    def on_open_error(_connection, error) -> None:
        failure.append(error)
        connection.ioloop.stop()

    connection = pika.SelectConnection(
        params,
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_open_error_callback=on_open_error,
        on_close_callback=lambda _c, _reason: connection.ioloop.stop(),
    )
    connection.ioloop.start()
    if failure or confirms.confirmed != n:
        raise RuntimeError(f"pika-select: {confirms.confirmed} of {n} confirmed {failure}")
    return confirms.nacked


def _pika_blocking(port: int, n: int, body: bytes, window: int) -> int:
    import pika

    guest = pika.PlainCredentials("guest", "guest")
    connection = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", port, credentials=guest)
    )
    channel = connection.channel()
    channel.confirm_delivery()
    props = pika.BasicProperties(content_type="application/json", delivery_mode=1)
    nacked = 0
    for _ in range(n):
        try:
            channel.basic_publish("", QUEUE, body, props)  # returns once confirmed
        except pika.exceptions.NackError:
            nacked += 1
    connection.close()
    return nacked


def _py_amqp(port: int, n: int, body: bytes, window: int) -> int:
    import amqp

    connection = amqp.Connection(f"127.0.0.1:{port}", userid="guest", password="guest")
    connection.connect()
    channel = connection.channel()
    channel.confirm_select()
    confirms = Confirms()
    channel.events["basic_ack"].add(confirms.settle)
    channel.events["basic_nack"].add(lambda tag, multiple: confirms.settle(tag, multiple, True))
    while confirms.confirmed < n:
        while confirms.next_tag <= n and len(confirms.outstanding) < window:
            message = amqp.Message(body, content_type="application/json", delivery_mode=1)
            channel.basic_publish(message, exchange="", routing_key=QUEUE)
            confirms.published()
        connection.drain_events(timeout=30)  # the acks, through the callbacks above
    connection.close()
    return confirms.nacked


def _aiormq(port: int, n: int, body: bytes, window: int) -> int:
    import aiormq
    from pamqp.commands import Basic

    async def publish_all() -> int:
        connection = await aiormq.connect(f"amqp://guest:guest@127.0.0.1:{port}/")
        channel = await connection.channel(publisher_confirms=True)
        props = aiormq.spec.Basic.Properties(content_type="application/json", delivery_mode=1)
        # A semaphore, not asyncio.wait over the pending set: that would cost
        # O(window) per publish and measure this loop instead of aiormq.
        slots = asyncio.Semaphore(window)

        async def publish() -> object:
            try:
                return await channel.basic_publish(body, routing_key=QUEUE, properties=props)
            finally:
                slots.release()

        tasks = []
        for _ in range(n):
            await slots.acquire()
            tasks.append(asyncio.ensure_future(publish()))
        confirms = await asyncio.gather(*tasks)
        await connection.close()
        return sum(not isinstance(c, Basic.Ack) for c in confirms)

    return asyncio.run(publish_all())


LOOPS: dict[str, Callable[[int, int, bytes, int], int]] = {
    "pika-select": _pika_select,
    "pika-blocking": _pika_blocking,
    "py-amqp": _py_amqp,
    "aiormq": _aiormq,
}


def _child(client: str, port: int, n: int, window: int) -> None:
    """One round of one client: prints its figures as one JSON line."""
    body = notification_body()
    loop = LOOPS[client]
    # The client's import is not part of its loop.
    __import__(next(c.package for c in CLIENTS if c.name == client))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    nacked = loop(port, n, body, window)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(json.dumps({"seconds": wall, "cpu": cpu, "nacked": nacked}))


# -- the run ----------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _purge(broker: PrivateBroker) -> None:
    connection = broker.connect()
    channel = connection.channel()
    channel.queue_declare(QUEUE)
    channel.queue_purge(QUEUE)
    connection.close()


def run(
    messages: int,
    rounds: int,
    window: int,
    only: list[str] | None = None,
    broker: PrivateBroker | None = None,
) -> dict:
    """Every client's rounds against ``broker`` (else a private one started here);
    the figures as plain data."""
    from mpevent.tools.broker import PrivateBroker, available

    outcomes = {}
    for client in CLIENTS:
        if only and client.name not in only:
            continue
        version = _version(client.package)
        outcome = Outcome(client.name, client.how, version, messages, [])
        if version is None:
            outcome.skipped = f"{client.package} is not installed (pip install -e '.[amqp-bench]')"
        outcomes[client.name] = outcome
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        if broker is None:
            ok, reason = available()
            if not ok:
                raise SystemExit(f"amqp_clients: no private broker: {reason}")
            broker = stack.enter_context(PrivateBroker())
        for _ in range(rounds):
            for outcome in outcomes.values():
                if not outcome.skipped:
                    outcome.rounds.append(_round(broker, outcome.client, messages, window))
        connection = broker.connect()
        server = connection._impl.server_properties  # the broker's version, for the record
        connection.channel().queue_delete(QUEUE)
        connection.close()
    for outcome in outcomes.values():
        if outcome.rounds:
            outcome.rate = statistics.median(messages / r["seconds"] for r in outcome.rounds)
            outcome.cpu_us = statistics.median(r["cpu"] / messages * 1e6 for r in outcome.rounds)
    return {
        "messages": messages,
        "rounds": rounds,
        "window": window,
        "body_bytes": len(notification_body()),
        "broker": f"RabbitMQ {_text(server.get('version', '?'))}",
        "python": sys.version.split()[0],
        # Other work on the machine moves every figure: say how busy it was.
        "load_average": [load_before, os.getloadavg()[0]],
        "cpus": os.cpu_count(),
        "clients": [asdict(o) for o in outcomes.values()],
    }


def _round(broker: PrivateBroker, client: str, messages: int, window: int) -> dict:
    """One loop of ``client`` in a fresh interpreter, on an empty queue."""
    _purge(broker)
    child = subprocess.run(
        [sys.executable, "-m", MODULE, "--child", client, "--port", str(broker.port),
         "--messages", str(messages), "--window", str(window)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if child.returncode != 0:
        raise RuntimeError(f"{client} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def report(result: dict) -> str:
    """The figures side by side, with ratios to the best (fastest; least CPU)."""
    measured = [c for c in result["clients"] if c["rate"] is not None]
    best_rate = max((c["rate"] for c in measured), default=None)
    best_cpu = min((c["cpu_us"] for c in measured), default=None)
    rows = []
    for c in result["clients"]:
        if c["skipped"]:
            rows.append([c["client"], c["version"] or "-", "skipped", "", "", "", c["skipped"]])
            continue
        rates = [result["messages"] / r["seconds"] for r in c["rounds"]]
        rows.append([
            c["client"], c["version"], fmt_num(c["rate"]),
            fmt_ratio(ratio(c["rate"], best_rate)), f"{c['cpu_us']:.1f}",
            fmt_ratio(ratio(c["cpu_us"], best_cpu)),
            f"{c['how']}; rounds {fmt_num(min(rates))}-{fmt_num(max(rates))} msg/s"
            + "".join(f"; {r['nacked']:g} nacked" for r in c["rounds"] if r["nacked"]),
        ])  # fmt: skip
    title = (
        f"AMQP publish with confirms: {result['messages']:,} messages of "
        f"{result['body_bytes']} bytes, median of {result['rounds']} rounds, "
        f"{result['broker']}, Python {result['python']}, load average "
        f"{result['load_average'][0]:.1f} to {result['load_average'][1]:.1f} on "
        f"{result['cpus']} CPUs"
    )
    return format_table(
        ["client", "version", "msg/s", "x best", "CPU us/msg", "x best", "loop"],
        rows, "llrrrrl", title=title, rule=True,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpevent.tools.bench.amqp_clients",
        description="AMQP clients' publish loops with confirms, side by side.",
    )
    parser.add_argument("--messages", type=int, default=20000, help="per client and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--window", type=int, default=WINDOW, help="unconfirmed messages")
    parser.add_argument("--client", action="append", choices=list(LOOPS), help="only these")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", choices=list(LOOPS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.messages < 1 or args.rounds < 1 or args.window < 1:
        parser.error("--messages, --rounds and --window must be at least 1")
    if args.child:
        _child(args.child, args.port, args.messages, args.window)
        return 0
    result = run(args.messages, args.rounds, args.window, args.client)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
