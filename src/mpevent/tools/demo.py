"""The demo: a SIP-like proxy raising events through a real ``mpevent serve``.

``python -m mpevent.tools.demo`` (what ``make demo`` runs; ``mpevent demo`` too)
needs no configuration. It plays every part of a deployment on loopback:

* the **hub**: ``python -m mpevent serve`` with a segment name of its own
  (``mpevent-demo-<pid>``), its MI on a free loopback UDP port, its MI UNIX
  socket and FIFOs in a temporary ``XDG_RUNTIME_DIR``, so it never clashes
  with a real ``mpevent serve``;
* **two subscribers**, a UDP and a UNIX datagram socket, each in its own
  process, subscribed to ``E_SIP_REQUEST`` and ``E_PIKE_BLOCKED`` through the
  MI; each measures raise-to-receive latency from the event's ``t``;
* the **workers**: :class:`mpevent.workers.sipproxy.SipProxy`, a prefork UDP server
  whose children raise the events;
* the **traffic**: :func:`mpevent.workers.traffic.run` in its own process, several
  well-behaved sources plus one flooder that pike blocks.

It prints a line per second while the traffic runs, then a summary, and
exits 0 only when every enqueued event reached both subscribers. It leaves
nothing behind: every process it started is stopped and reaped, the hub is
stopped with SIGTERM (it drains, then removes its segment and sockets) and
the temporary directory is removed, on success, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import select
import shutil
import signal
import socket
import sys
import textwrap
import time
import traceback
from array import array
from collections.abc import Callable
from typing import Any

import orjson

from mpevent.shm.segment import shm_path
from mpevent.system import die_with_parent, fork_call, reap, set_rcvbuf
from mpevent.tools.figures import fmt_ms, fmt_num, format_table, per_second, summarize
from mpevent.tools.private import PrivateHub, short_tmpdir
from mpevent.workers import traffic
from mpevent.workers.sipproxy import SipProxy

EVENTS = ("E_SIP_REQUEST", "E_PIKE_BLOCKED")
# Shared counter words per child (single writer each): subscriber i at
# SLOT*i, the traffic generator after them.
SLOT = 8
SUB_RECEIVED, SUB_PIKE = 0, 1
GEN_SENT, GEN_OK, GEN_FORBIDDEN, GEN_BAD = 0, 1, 2, 3


# -- forked helpers -----------------------------------------------------------


Body = Callable[[int], dict[str, Any]]  # gets the stop pipe, returns the result


class Child:
    """A forked helper process with a result pipe and a stop pipe.

    Forked with :func:`~mpevent.system.fork_call`, so none of the demo's own
    cleanup ever runs in it; it dies with the demo.
    """

    def __init__(self, label: str):
        self.label = label
        self.pid = 0
        self._result_r = -1
        self._stop_w = -1
        self.result: dict[str, Any] | None = None

    def fork(self, body: Body) -> None:
        """Run ``body(stop_fd) -> dict`` in a child; its result comes back as JSON."""
        result_r, result_w = os.pipe()
        stop_r, stop_w = os.pipe()
        theirs = (result_r, stop_w)  # the ends the child must not hold
        pid = fork_call(_child_main, self.label, body, os.getpid(), result_w, stop_r, theirs)
        os.close(result_w)
        os.close(stop_r)
        self.pid, self._result_r, self._stop_w = pid, result_r, stop_w

    def running(self) -> bool:
        if not self.pid:
            return False
        done, _ = os.waitpid(self.pid, os.WNOHANG)
        if done:
            self._collect(reaped=True)
        return not done

    def stop(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """Ask it to finish, read its result, reap it; idempotent."""
        if self._stop_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")
        self._collect(reaped=False, timeout=timeout)
        return self.result

    def _collect(self, reaped: bool, timeout: float = 10.0) -> None:
        if self._result_r >= 0:
            # The child is the only writer left, so EOF means it is done.
            chunks = []
            ready, _, _ = select.select([self._result_r], [], [], timeout)
            if ready:
                while chunk := os.read(self._result_r, 1 << 16):
                    chunks.append(chunk)
            if chunks:
                with contextlib.suppress(orjson.JSONDecodeError):
                    self.result = orjson.loads(b"".join(chunks))
            os.close(self._result_r)
            self._result_r = -1
        if self._stop_w >= 0:
            os.close(self._stop_w)
            self._stop_w = -1
        if self.pid and not reaped:
            with contextlib.suppress(TimeoutError):  # it was killed, and reaped
                reap(self.pid, timeout)
        self.pid = 0


def _child_main(
    label: str, body: Body, parent: int, result_w: int, stop_r: int, theirs: tuple[int, ...]
) -> int:
    """In the child: run ``body``, write its result; the exit code says whether it did."""
    for fd in theirs:
        os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the demo stops us
    die_with_parent()
    if os.getppid() != parent:
        return 1  # the demo died before we could ask to die with it
    try:
        result = body(stop_r)
    except Exception as exc:
        print(f"demo: {label} failed: {exc!r}", file=sys.stderr)
        return 1
    with os.fdopen(result_w, "wb") as out:
        out.write(orjson.dumps(result))
    return 0


def _subscriber_body(sock: socket.socket, counters: memoryview, at: int):
    """Receive notifications until told to stop; count them and their latency."""

    def body(stop_fd: int) -> dict[str, Any]:
        sock.setblocking(False)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        parent = os.getppid()
        latencies = array("q")
        received = pike = malformed = 0
        samples: dict[str, str] = {}
        recv, loads, clock = sock.recv, orjson.loads, time.monotonic_ns
        stopping = False
        while not stopping:
            for fd, _ in poller.poll(500):
                if fd == stop_fd:
                    stopping = True  # drain what is queued, then stop
            if os.getppid() != parent:
                break
            while True:
                try:
                    data = recv(65536)
                except BlockingIOError:
                    break
                now = clock()
                received += 1
                try:
                    msg = loads(data)
                    method, params = msg["method"], msg["params"]
                    latencies.append(now - params["t"])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    malformed += 1
                    method = "?"
                if method == "E_PIKE_BLOCKED":
                    pike += 1
                    counters[at + SUB_PIKE] = pike
                if method not in samples:
                    samples[method] = data.decode(errors="replace")
                counters[at + SUB_RECEIVED] = received
        figures = summarize(latencies)  # NaN when nothing arrived: null in the JSON
        return {
            "received": received,
            "pike": pike,
            "malformed": malformed,
            "p50_ns": figures["median"],
            "p99_ns": figures["p99"],
            "max_ns": figures["max"],
            "samples": samples,
        }

    return body


def _traffic_body(target: tuple[str, int], args: argparse.Namespace, counters: memoryview, at: int):
    def progress(report: traffic.TrafficReport) -> None:
        counters[at + GEN_SENT] = report.sent
        counters[at + GEN_OK] = report.ok
        counters[at + GEN_FORBIDDEN] = report.forbidden
        counters[at + GEN_BAD] = report.bad

    def body(stop_fd: int) -> dict[str, Any]:
        report = traffic.run(
            target,
            rate=args.rate,
            seconds=args.seconds,
            sources=args.sources,
            flood_rate=args.flood_rate,
            progress=progress,
        )
        return report.as_dict()

    return body


# -- the demo -----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpevent demo", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="traffic duration (default 5)")
    parser.add_argument("--workers", type=int, default=4, help="proxy children (default 4)")
    parser.add_argument("--rate", type=float, default=2000.0, help="requests/s, good sources")
    parser.add_argument("--sources", type=int, default=4, help="well-behaved sources")
    parser.add_argument("--flood-rate", type=float, default=3000.0, help="the flooder's rate")
    parser.add_argument("--pike-limit", type=int, default=1000, help="requests/s per source")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.workers < 1 or args.rate <= 0 or args.sources < 1:
        parser.error("--seconds, --workers, --rate and --sources must be positive")
    if args.rate / args.sources >= args.pike_limit:
        parser.error("each good source must stay under --pike-limit")

    name = f"mpevent-demo-{os.getpid()}"
    tmp = short_tmpdir("mpevent-demo-", name)
    hub = PrivateHub(tmp, name)
    shared = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: survives fork
    counters = memoryview(shared).cast("Q")
    subscribers: list[tuple[Child, str]] = []
    generator = Child("traffic")
    proxy: SipProxy | None = None
    outcome: dict[str, Any] = {}
    try:
        print(f"mpevent demo: starting mpevent serve (segment /dev/shm/{name})", flush=True)
        hub.start()

        # Subscriber sockets are bound here, before forking, so their
        # addresses are known and nothing can arrive before anyone listens.
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        set_rcvbuf(udp, 8 << 20)  # a descheduled receiver must not lose datagrams
        udp.bind(("127.0.0.1", 0))
        unix_path = tmp / "subscriber.sock"
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        unix.bind(str(unix_path))
        for i, (label, sock, address) in enumerate(
            [
                ("udp", udp, f"udp:127.0.0.1:{udp.getsockname()[1]}"),
                ("unix", unix, f"unix:{unix_path}"),
            ]
        ):
            child = Child(f"{label} subscriber")
            child.fork(_subscriber_body(sock, counters, SLOT * i))
            sock.close()  # the subscriber process owns it now
            subscribers.append((child, address))

        proxy = SipProxy(
            name, workers=args.workers, port=0, pike_limit=args.pike_limit, pike_window=1.0
        )
        proxy.start()
        conn = proxy.connection
        for _, address in subscribers:
            for event in EVENTS:
                conn.subscribe(event, address)
        host, port = proxy.address
        print(
            f"mpevent demo: sipproxy on udp:{host}:{port} with {args.workers} workers; "
            f"subscribers {subscribers[0][1]} and {subscribers[1][1]}\n"
            f"mpevent demo: {args.sources} sources x {args.rate / args.sources:.0f} req/s "
            f"+ flooder 127.0.0.66 at {args.flood_rate:.0f} req/s for {args.seconds:g} s "
            f"(pike: > {args.pike_limit} req/s per source)",
            flush=True,
        )

        gen_at = SLOT * len(subscribers)
        started = time.monotonic()
        generator.fork(_traffic_body((host, port), args, counters, gen_at))
        last_raised, last_t, tick = 0, started, 1
        while generator.running():
            wake = started + tick
            while generator.running() and time.monotonic() < wake:
                time.sleep(0.02)
            proxy.reap()
            now = time.monotonic()
            if now < wake:
                break  # the traffic ended between two ticks: the summary follows
            raised = conn.stats()["totals"]["raised"]
            rate = per_second(raised - last_raised, now - last_t)
            last_raised, last_t, tick = raised, now, tick + 1
            delivered = "  ".join(
                f"{child.label.split()[0]} {fmt_num(counters[SLOT * i + SUB_RECEIVED]):>8}"
                for i, (child, _) in enumerate(subscribers)
            )
            print(
                f"  {now - started:5.1f}s  requests {fmt_num(counters[gen_at + GEN_SENT]):>8}  "
                f"events raised {fmt_num(raised):>8} ({fmt_num(rate):>6}/s)  delivered: {delivered}"
                f"  pike {counters[SUB_PIKE]}",
                flush=True,
            )
        traffic_report = generator.stop() or {}

        # Let the senders finish: every enqueued event at both subscribers,
        # or a deadline (what is missing then is reported, and fails the run).
        deadline = time.monotonic() + 10.0
        while True:
            stats = conn.stats()
            enqueued = stats["totals"]["enqueued"]
            done = all(
                counters[SLOT * i + SUB_RECEIVED] >= enqueued for i in range(len(subscribers))
            )
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        proxy.stop()
        results = [child.stop() or {} for child, _ in subscribers]
        outcome = {
            "stats": stats,
            "traffic": traffic_report,
            "results": results,
            "elapsed": elapsed,
        }
    except KeyboardInterrupt:
        print("\nmpevent demo: interrupted; cleaning up", file=sys.stderr)
    except Exception:
        print("mpevent demo: failed:", file=sys.stderr)
        traceback.print_exc()
    finally:
        # Reverse order of start; each step is idempotent and must run.
        with contextlib.suppress(Exception):
            if generator.pid:
                os.kill(generator.pid, signal.SIGTERM)
            generator.stop(timeout=2.0)
        if proxy is not None:
            proxy.stop()
        for child, _ in subscribers:
            child.stop(timeout=2.0)
        hub_code = hub.stop()
        hub_log = hub.log()
        counters.release()
        shared.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if not outcome:
        if hub_log.strip():
            print(f"mpevent serve said:\n{hub_log}", file=sys.stderr)
        return 1
    leftovers = [str(p) for p in (shm_path(name), tmp) if p.exists()]
    return _summary(outcome, subscribers, hub_code, hub_log, leftovers)


def _summary(
    outcome: dict[str, Any],
    subscribers: list[tuple[Child, str]],
    hub_code: int | None,
    hub_log: str,
    leftovers: list[str],
) -> int:
    stats, traffic, results = outcome["stats"], outcome["traffic"], outcome["results"]
    totals = stats["totals"]
    events = stats["events"]
    seconds = traffic.get("elapsed") or outcome["elapsed"]
    enqueued = totals["enqueued"]
    by_dest: dict[str, dict[str, int]] = {}
    for row in stats["destinations"]:
        sums = by_dest.setdefault(row["socket"], dict.fromkeys(("failed", "dropped"), 0))
        sums["failed"] += row["failed"]
        sums["dropped"] += row["dropped"]
    delivered_total = sum(r.get("received", 0) for r in results)
    pike = events.get("E_PIKE_BLOCKED", {}).get("raised", 0)
    flood = traffic.get("sources", {}).get("127.0.0.66", {})

    print(f"\nmpevent demo: summary ({seconds:.1f} s of traffic)")
    print(
        f"  requests    sent {fmt_num(traffic.get('sent', 0))}: "
        f"200 {fmt_num(traffic.get('ok', 0))}, "
        f"403 {fmt_num(traffic.get('forbidden', 0))}, 400 {fmt_num(traffic.get('bad', 0))}, "
        f"timeouts {fmt_num(traffic.get('timeouts', 0))}"
    )
    per_event = ", ".join(f"{name} {fmt_num(e['raised'])}" for name, e in events.items())
    print(f"  raised      {fmt_num(totals['raised'])} ({per_event})")
    print(
        f"  enqueued    {fmt_num(enqueued)}   dropped {fmt_num(totals['dropped'])} (ring full)   "
        f"rejected {fmt_num(totals['rejected'])}"
    )
    print(
        f"  events/s    {fmt_num(per_second(totals['raised'], seconds))} raised, "
        f"{fmt_num(per_second(delivered_total, seconds))} notifications/s delivered"
    )
    print(
        f"  pike blocks {pike} (127.0.0.66: {fmt_num(flood.get('forbidden', 0))} requests got 403)"
    )
    ok = True
    rows = []
    for (_child, address), result in zip(subscribers, results, strict=True):
        got = result.get("received", 0)
        missing = enqueued - got
        ok = ok and missing == 0 and not result.get("malformed")
        dest = by_dest.get(address, {})
        lost = dest.get("dropped", 0) + dest.get("failed", 0)
        rows.append(
            [address, *map(fmt_num, (got, missing, lost))]
            + [fmt_ms(result.get(key)) for key in ("p50_ns", "p99_ns", "max_ns")]
        )
    headers = ["subscriber", "delivered", "missing", "dropped", "p50", "p99", "max"]
    print("\n" + textwrap.indent(format_table(headers, rows, align="lrrrrrr"), "  "))
    print("  (latency: raise_event in a proxy worker to recv in the subscriber)")
    samples = results[0].get("samples", {}) if results else {}
    if samples:
        print("\n  what a subscriber receives:")
        for text in samples.values():
            print(f"    {text}")
    print()
    if not traffic or not enqueued:
        ok = False
        print("mpevent demo: the traffic generator reported nothing, or no event was enqueued")
    if hub_code != 0:
        ok = False
        print(f"mpevent demo: mpevent serve exited {hub_code}:\n{hub_log}")
    if leftovers:
        ok = False
        print(f"mpevent demo: left behind: {', '.join(leftovers)}")
    if ok:
        print(
            f"mpevent demo: OK: all {fmt_num(enqueued)} enqueued events reached both subscribers; "
            "hub stopped cleanly, nothing left behind"
        )
        return 0
    print("mpevent demo: FAILED: not every enqueued event reached both subscribers")
    return 1


if __name__ == "__main__":
    sys.exit(main())
