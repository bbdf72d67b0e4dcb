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
* the **workers**: :class:`workers.sipproxy.SipProxy`, a prefork UDP server
  whose children raise the events;
* the **traffic**: :func:`workers.traffic.run` in its own process, several
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
import time
import traceback
from array import array
from typing import Any

import orjson

from mpevent.shm.segment import shm_path
from mpevent.tools.private import PrivateHub, die_with_parent, short_tmpdir

EVENTS = ("E_SIP_REQUEST", "E_PIKE_BLOCKED")
# Shared counter words per child (single writer each): subscriber i at
# SLOT*i, the traffic generator after them.
SLOT = 8
SUB_RECEIVED, SUB_PIKE = 0, 1
GEN_SENT, GEN_OK, GEN_FORBIDDEN, GEN_BAD = 0, 1, 2, 3


# -- forked helpers -----------------------------------------------------------


class Child:
    """A forked helper process with a result pipe and a stop pipe."""

    def __init__(self, label: str):
        self.label = label
        self.pid = 0
        self._result_r = -1
        self._stop_w = -1
        self.result: dict[str, Any] | None = None

    def fork(self, body) -> None:
        """Run ``body(stop_fd) -> dict`` in a child; its result comes back as JSON."""
        result_r, result_w = os.pipe()
        stop_r, stop_w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(result_r)
                os.close(stop_w)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the demo stops us
                die_with_parent()
                if os.getppid() == parent:
                    result = body(stop_r)
                    with os.fdopen(result_w, "wb") as out:
                        out.write(orjson.dumps(result))
                    code = 0
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    print(f"demo: {self.label} failed: {exc!r}", file=sys.stderr)
            finally:
                os._exit(code)
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
            deadline = time.monotonic() + timeout
            while not os.waitpid(self.pid, os.WNOHANG)[0]:
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.005)
        self.pid = 0


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
        ordered = sorted(latencies)

        def pct(q: float) -> int | None:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

        return {
            "received": received,
            "pike": pike,
            "malformed": malformed,
            "p50_ns": pct(0.50),
            "p99_ns": pct(0.99),
            "max_ns": ordered[-1] if ordered else None,
            "samples": samples,
        }

    return body


def _traffic_body(target: tuple[str, int], args: argparse.Namespace, counters: memoryview, at: int):
    from workers import traffic

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


def _ms(ns: int | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:.2f} ms"


def _n(value: int) -> str:
    return f"{value:,}"


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

    # The workers live next to this package in the source tree.
    from workers.sipproxy import SipProxy, set_rcvbuf

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
            rate = (raised - last_raised) / max(now - last_t, 1e-9)
            last_raised, last_t, tick = raised, now, tick + 1
            delivered = "  ".join(
                f"{child.label.split()[0]} {_n(counters[SLOT * i + SUB_RECEIVED]):>8}"
                for i, (child, _) in enumerate(subscribers)
            )
            print(
                f"  {now - started:5.1f}s  requests {_n(counters[gen_at + GEN_SENT]):>8}  "
                f"events raised {_n(raised):>8} ({_n(round(rate)):>6}/s)  delivered: {delivered}"
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
        f"  requests    sent {_n(traffic.get('sent', 0))}: 200 {_n(traffic.get('ok', 0))}, "
        f"403 {_n(traffic.get('forbidden', 0))}, 400 {_n(traffic.get('bad', 0))}, "
        f"timeouts {_n(traffic.get('timeouts', 0))}"
    )
    per_event = ", ".join(f"{name} {_n(e['raised'])}" for name, e in events.items())
    print(f"  raised      {_n(totals['raised'])} ({per_event})")
    print(
        f"  enqueued    {_n(enqueued)}   dropped {_n(totals['dropped'])} (ring full)   "
        f"rejected {_n(totals['rejected'])}"
    )
    print(
        f"  events/s    {_n(round(totals['raised'] / seconds))} raised, "
        f"{_n(round(delivered_total / seconds))} notifications/s delivered"
    )
    print(f"  pike blocks {pike} (127.0.0.66: {_n(flood.get('forbidden', 0))} requests got 403)")
    width = max(len(address) for _, address in subscribers)
    print(
        f"\n  {'subscriber':<{width}}  {'delivered':>10}  {'missing':>7}  {'dropped':>7}  "
        f"{'p50':>9}  {'p99':>9}  {'max':>9}"
    )
    ok = True
    for (_child, address), result in zip(subscribers, results, strict=True):
        got = result.get("received", 0)
        missing = enqueued - got
        ok = ok and missing == 0 and not result.get("malformed")
        dest = by_dest.get(address, {})
        lost = dest.get("dropped", 0) + dest.get("failed", 0)
        print(
            f"  {address:<{width}}  {_n(got):>10}  {_n(missing):>7}  {_n(lost):>7}  "
            f"{_ms(result.get('p50_ns')):>9}  {_ms(result.get('p99_ns')):>9}  "
            f"{_ms(result.get('max_ns')):>9}"
        )
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
            f"mpevent demo: OK: all {_n(enqueued)} enqueued events reached both subscribers; "
            "hub stopped cleanly, nothing left behind"
        )
        return 0
    print("mpevent demo: FAILED: not every enqueued event reached both subscribers")
    return 1


if __name__ == "__main__":
    sys.exit(main())
