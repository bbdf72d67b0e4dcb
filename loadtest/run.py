"""``make loadtest``: headless locust runs against a private ``mpevent serve``, checked by a sink.

It plays every part on loopback, in this order, and tears all of it down:

1. ``python -m mpevent serve`` with a segment name of its own
   (``mpevent-load-<pid>``), its MI on a free loopback UDP port and its MI
   socket and FIFOs in a temporary ``XDG_RUNTIME_DIR`` (as ``mpevent demo``
   does), so it never meets a real ``mpevent serve``;
2. loadtest/sink.py, subscribed with a UDP and a UNIX socket to ``E_LOAD``,
   ``E_SIP_REQUEST`` and ``E_PIKE_BLOCKED``;
3. ``python -m mpevent.workers.sipproxy``, the SIP-proxy-like prefork server whose
   forked children raise ``E_SIP_REQUEST``;
4. ``locust -f loadtest/sip_locustfile.py --headless --processes N``: SIP-like
   UDP requests to the proxy (``--sip-time``, 15 s by default);
5. ``locust -f loadtest/raise_locustfile.py --headless --processes N``:
   ``raise_event`` from locust's own forked processes (``--raise-time``,
   15 s by default);
6. the sink is stopped: it waits until every enqueued event has arrived and
   prints its summary; then the proxy and the hub are stopped (SIGTERM: the
   hub drains and removes its segment, sockets and FIFOs), the temporary
   directory is removed, and it checks that nothing is left: no process, no
   ``/dev/shm`` segment, no socket file.

Locust's own summaries (and the raise_event durations in microseconds) are
printed as each run ends, the sink's at the end. Exit status 0 when the sink
found no loss that the hub did not count itself, both locust runs completed,
the hub stopped cleanly and nothing was left behind; 1 otherwise.

Locust's master/worker traffic is bound to 127.0.0.1 on a free port; no web
UI is started. ``python loadtest/run.py --help`` for the knobs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from mpevent.shm.segment import shm_path
from mpevent.system import Supervised, free_port
from mpevent.tools.private import PrivateHub, short_tmpdir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EVENTS = "E_LOAD,E_SIP_REQUEST,E_PIKE_BLOCKED"


def say(text: str) -> None:
    print(f"loadtest: {text}", flush=True)


# -- the parts ----------------------------------------------------------------


def start_hub(tmp: Path, name: str, senders: int, lane_size: int | None) -> PrivateHub:
    extra = ["--senders", str(senders)]
    if lane_size:
        extra += ["--lane-size", str(lane_size)]
    hub = PrivateHub(tmp, name, extra)
    hub.start()
    return hub


def start_sink(tmp: Path, name: str, env: dict[str, str], drain: float) -> Supervised:
    ready = tmp / "sink.ready"
    args = [
        sys.executable, str(HERE / "sink.py"),
        "--name", name,
        "--events", EVENTS,
        "--udp", "127.0.0.1:0",
        "--unix", str(tmp / "sink.sock"),
        "--progress", "0",
        "--drain-timeout", str(drain),
        "--ready-file", str(ready),
    ]  # fmt: skip
    sink = Supervised("sink", args, env=env, cwd=ROOT)  # its summary goes straight to our stdout
    deadline = time.monotonic() + 20.0
    while not ready.exists():
        if not sink.alive() or time.monotonic() > deadline:
            sink.stop()
            raise RuntimeError(f"the sink did not start (exit {sink.returncode})")
        time.sleep(0.02)
    return sink


def probe_proxy(port: int, timeout: float) -> bool:
    """Send OPTIONS until the proxy answers 200 (its children are up)."""
    request = (
        b"OPTIONS sip:probe@127.0.0.1 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK-probe\r\n"
        b"From: <sip:loadtest@127.0.0.1>;tag=probe\r\n"
        b"To: <sip:probe@127.0.0.1>\r\n"
        b"Call-ID: probe@loadtest\r\n"
        b"CSeq: 1 OPTIONS\r\n\r\n"
    )
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                s.sendto(request, ("127.0.0.1", port))
                if s.recv(65535).startswith(b"SIP/2.0 200"):
                    return True
            except OSError:
                time.sleep(0.05)
    return False


def start_proxy(
    tmp: Path, name: str, env: dict[str, str], workers: int, pike_limit: int
) -> tuple[Supervised, int]:
    for _attempt in range(3):
        port = free_port()
        args = [
            sys.executable, "-m", "mpevent.workers.sipproxy",
            "--name", name,
            "--workers", str(workers),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--pike-limit", str(pike_limit),
            "--log-level", "warning",
        ]  # fmt: skip
        proxy = Supervised("sipproxy", args, env=env, cwd=ROOT, log=tmp / "sipproxy.log")
        if probe_proxy(port, 20.0):
            return proxy, port
        proxy.stop()
    raise RuntimeError(f"mpevent.workers.sipproxy did not start:\n{proxy.log()}")


def run_locust(
    title: str,
    locustfile: str,
    extra: list[str],
    args: argparse.Namespace,
    users: int,
    seconds: float,
    env: dict[str, str],
    csv_prefix: Path,
    running: list[Supervised],
) -> tuple[int | None, dict[str, str]]:
    port = free_port(socket.SOCK_STREAM)
    cmd = [
        sys.executable, "-m", "locust",
        "-f", str(HERE / locustfile),
        "--headless",
        "-u", str(users),
        "-r", str(users),
        "-t", f"{seconds:g}s",
        "--processes", str(args.processes),
        "--only-summary",
        "--loglevel", args.locust_loglevel,
        "--csv", str(csv_prefix),
        "--master-bind-host", "127.0.0.1",
        "--master-bind-port", str(port),
        "--master-host", "127.0.0.1",
        "--master-port", str(port),
        *extra,
    ]  # fmt: skip
    print(f"\n== locust: {title} ==", flush=True)
    print("   " + " ".join(["locust", *cmd[3:]]), flush=True)
    proc = Supervised("locust", cmd, env=env, cwd=ROOT)
    running.append(proc)  # so that an interrupted run still waits for it
    try:
        proc.proc.wait(seconds + 120)
    except subprocess.TimeoutExpired:
        say("locust did not finish in time; stopping it")
    code = proc.stop(signal.SIGINT, timeout=15.0)
    return code, aggregated(csv_prefix)


def aggregated(prefix: Path) -> dict[str, str]:
    """The Aggregated row of locust's --csv stats file."""
    with contextlib.suppress(OSError), open(f"{prefix}_stats.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Name") == "Aggregated":
                return row
    return {}


def leftovers(name: str, tmp: Path) -> list[str]:
    left = [str(p) for p in (shm_path(name), tmp) if p.exists()]
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            left.append(f"process {child.pid} ({' '.join(child.cmdline()[:4])})")
    return left


# -- main ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python loadtest/run.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sip-time", type=float, default=15.0, help="seconds (default 15, 0 off)")
    parser.add_argument("--sip-users", type=int, default=20, help="default 20")
    parser.add_argument("--sip-rate", type=float, default=25.0, help="req/s per user (default 25)")
    parser.add_argument(
        "--raise-time", type=float, default=15.0, help="seconds (default 15, 0 off)"
    )
    parser.add_argument("--raise-users", type=int, default=20, help="default 20")
    parser.add_argument(
        "--raise-rate", type=float, default=100.0, help="raise_event/s per user (default 100)"
    )
    parser.add_argument("--processes", type=int, default=2, help="locust --processes (default 2)")
    parser.add_argument("--workers", type=int, default=4, help="sipproxy children (default 4)")
    parser.add_argument(
        "--pike-limit",
        type=int,
        default=1000,
        help="sipproxy requests/s per source before 403 and E_PIKE_BLOCKED (default 1000)",
    )
    parser.add_argument("--senders", type=int, default=1, help="hub sender processes (default 1)")
    parser.add_argument(
        "--lane-size",
        type=int,
        help="hub lane size in bytes (a power of two >= 4096); small lanes show drops",
    )
    parser.add_argument("--drain-timeout", type=float, default=15.0, help="sink drain (s)")
    parser.add_argument(
        "--locust-loglevel", default="WARNING", help="locust --loglevel (default WARNING)"
    )
    args = parser.parse_args(argv)
    if args.sip_time <= 0 and args.raise_time <= 0:
        parser.error("nothing to run: --sip-time and --raise-time are both 0")
    if min(args.sip_users, args.raise_users, args.processes, args.workers, args.senders) < 1:
        parser.error("users, --processes, --workers and --senders must be at least 1")

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    name = f"mpevent-load-{os.getpid()}"
    tmp = short_tmpdir("mpevent-load-", name)
    run_dir = tmp / "run"
    env = dict(os.environ, XDG_RUNTIME_DIR=str(run_dir), MPEVENT_NAME=name)
    hub = sink = proxy = None
    locusts: list[Supervised] = []
    results: list[tuple[str, int | None, dict[str, str]]] = []
    sink_code = hub_code = None
    hub_log = ""
    problem = ""
    grace = 0.0  # after a Ctrl-C the children got SIGINT too: let them finish first
    try:
        hub = start_hub(tmp, name, args.senders, args.lane_size)
        say(f"mpevent serve on segment /dev/shm/{name}, MI udp:{hub.mi_udp}, runtime dir {run_dir}")
        sink = start_sink(tmp, name, env, args.drain_timeout)
        if args.sip_time > 0:
            proxy, port = start_proxy(tmp, name, env, args.workers, args.pike_limit)
            say(f"mpevent.workers.sipproxy on udp:127.0.0.1:{port} with {args.workers} workers")
            code, agg = run_locust(
                f"SIP-like requests to mpevent.workers.sipproxy ({args.sip_users} users x "
                f"{args.sip_rate:g} req/s, {args.sip_time:g} s, {args.processes} processes)",
                "sip_locustfile.py",
                ["--host", f"127.0.0.1:{port}", "--sip-rate", str(args.sip_rate)],
                args,
                args.sip_users,
                args.sip_time,
                env,
                tmp / "sip",
                locusts,
            )
            results.append(("SIP", code, agg))
            proxy.stop()
        if args.raise_time > 0:
            code, agg = run_locust(
                f"raise_event from locust's forked processes ({args.raise_users} users x "
                f"{args.raise_rate:g}/s, {args.raise_time:g} s, {args.processes} processes)",
                "raise_locustfile.py",
                ["--raise-rate", str(args.raise_rate)],
                args,
                args.raise_users,
                args.raise_time,
                env,
                tmp / "raise",
                locusts,
            )
            results.append(("raise", code, agg))
        print("\n== sink ==", flush=True)
        sink_code = sink.stop(signal.SIGTERM, timeout=args.drain_timeout + 30.0)
    except (KeyboardInterrupt, SystemExit) as exc:
        problem = "interrupted"
        if isinstance(exc, KeyboardInterrupt):
            grace = 15.0
        say(f"interrupted ({exc!r}); cleaning up")
    except Exception as exc:
        problem = f"failed: {exc}"
        say(f"{problem}; cleaning up")
    finally:
        # Reverse order of start; every step is idempotent and must run.
        for run in locusts:  # SIGINT: locust prints its summary and stops its workers
            run.stop(signal.SIGINT, timeout=15.0, grace=grace)
        if proxy is not None:
            proxy.stop(signal.SIGTERM, grace=min(grace, 5.0))
        if sink is not None:
            sink_grace = args.drain_timeout + 5.0 if grace else 0.0  # it drains on SIGINT
            sink_code = sink.stop(
                signal.SIGTERM, timeout=args.drain_timeout + 30.0, grace=sink_grace
            )
        if hub is not None:
            hub_code = hub.stop(timeout=30.0, grace=min(grace, 10.0))
            hub_log = hub.log()
            if proxy is not None and proxy.returncode not in (0, None):
                print(f"workers.sipproxy said:\n{proxy.log()}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)

    print("\n== loadtest ==", flush=True)
    ok = True
    for label, code, agg in results:
        requests = agg.get("Request Count", "?")
        failures = agg.get("Failure Count", "?")
        rps = agg.get("Requests/s", "?")
        with contextlib.suppress(ValueError):
            rps = f"{float(rps):,.0f}"
        completed = code in (0, 1) and requests not in ("?", "0")
        ok = ok and completed
        note = "" if code == 0 else " (locust exits 1 when any request failed)"
        say(
            f"locust {label}: {requests} requests, {failures} failures, {rps}/s; "
            f"locust exit {code}{note}"
        )
    if len(results) < (args.sip_time > 0) + (args.raise_time > 0):
        ok = False
    say(f"sink exit {sink_code} ({'no unexplained loss' if sink_code == 0 else 'see above'})")
    say(f"mpevent serve exit {hub_code}")
    if hub_code != 0:
        ok = False
        if hub_log.strip():
            print(f"mpevent serve said:\n{hub_log}", file=sys.stderr)
    left = leftovers(name, tmp)
    if left:
        ok = False
        say(f"left behind: {', '.join(left)}")
    ok = ok and sink_code == 0
    if ok:
        say("OK: no event lost that the hub did not count; nothing left behind")
        return 0
    say(f"FAILED{f' ({problem})' if problem else ''}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
