"""A SIP-proxy-like prefork UDP server that raises mpevent events.

This module owns the proxy: the pike-like flood detector shared by the
children, the child's request loop and the master
(an arbiter in the style of OpenSIPS's and gunicorn's: signals only set
flags, one loop acts on them, dead children are respawned).

It embeds mpevent the way a real forking server would. The master attaches
to a running ``mpevent serve`` with :func:`mpevent.connect` and publishes the
events *before* it forks; the children inherit the connection and mpevent
gives each of them its own lane on its first raise, with no call from us.
Every child blocks in ``recvfrom`` on the one shared UDP socket, like
OpenSIPS's UDP workers: a blocking receive is an exclusive wait in the
kernel, so each datagram wakes one child, not all of them.

Per request a child:

* counts the source IP in the shared pike table; the request that takes a
  source over ``pike_limit`` requests in the current ``pike_window`` raises
  ``E_PIKE_BLOCKED`` ``{"ip", "t"}`` (once per window, whichever child sees
  it) and that source gets ``403 Forbidden`` until the window ends;
* answers ``400 Bad Request`` to anything that does not parse, without an
  event;
* otherwise raises ``E_SIP_REQUEST`` ``{"method", "ruri", "from", "call_id",
  "source", "worker", "t"}`` and answers ``200 OK`` with the request's Via,
  From, To, Call-ID and CSeq.

``t`` is ``time.monotonic_ns()`` at the raise: CLOCK_MONOTONIC is one clock
for the whole host, so a subscriber subtracts it from its own reading to get
the raise-to-receive latency.

Run it against a daemon::

    mpevent serve --name mpevent &
    python -m mpevent.workers.sipproxy --name mpevent --workers 4 --port 5060

or in-process (the demo and the tests)::

    with SipProxy("mpevent", workers=4, port=0) as proxy:
        host, port = proxy.address
        ...                      # call proxy.reap() now and then to respawn

Everything stays on 127.0.0.0/8: the proxy refuses to bind elsewhere.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import logging
import mmap
import os
import select
import signal
import socket
import sys
import time

import mpevent
from mpevent.api.connect import Connection
from mpevent.defaults import SEGMENT_NAME
from mpevent.system import die_with_parent, fork_call, set_rcvbuf
from mpevent.workers.sip import BadRequest, SipRequest, build_reply, parse_request

log = logging.getLogger("mpevent.workers.sipproxy")  # not __name__: "__main__" under -m

E_SIP_REQUEST = "E_SIP_REQUEST"
E_PIKE_BLOCKED = "E_PIKE_BLOCKED"
EVENTS = (E_SIP_REQUEST, E_PIKE_BLOCKED)

DEFAULT_PIKE_LIMIT = 1000
DEFAULT_PIKE_WINDOW = 1.0
RCVBUF = 4 << 20  # a burst from the flooder must not overflow the shared socket
MAX_DATAGRAM = 65535
# The signals the master handles; blocked around fork so that a child never
# runs the master's handlers (it installs its own first, then unblocks).
_MASTER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP}


# -- pike: flood detection shared by the children -----------------------------

ALLOW, BLOCK_NOW, BLOCKED = 0, 1, 2


class Pike:
    """Per-source-IP request counters per time window, shared by all children.

    A fixed table in a shared ``memfd`` mapping, created by the master before
    it forks. It follows mpevent's own rules: every counter has a single
    writer (slot x worker), so counting needs no lock and no increment is
    lost; the two rare decisions that need one writer (claiming a slot for a
    new IP, and "who reports the block") take a POSIX record lock, which the
    kernel releases if its holder dies. Windows are ``monotonic_ns // window``:
    CLOCK_MONOTONIC is the same clock in every process, so the children agree
    on the window without talking to each other.

    Slot words: ``[key, blocked_window, (window, count) per worker]`` where
    key is the IPv4 address + 1 (0 = free) and windows are stored + 1 (0 =
    never). A full table fails open: new sources are not limited.
    """

    SLOTS = 4096
    PROBES = 32

    def __init__(self, workers: int, limit: int, window: float):
        if limit < 1 or window <= 0:
            raise ValueError("pike limit must be >= 1 and window > 0")
        self.workers = workers
        self.limit = limit
        self.window_ns = int(window * 1e9)
        self._stride = 2 + 2 * workers
        size = self.SLOTS * self._stride * 8
        self._fd = os.memfd_create("sipproxy-pike", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, size)
        self._mmap = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED)
        self._words = memoryview(self._mmap).cast("Q")
        self._slots: dict[int, int] = {}  # process-local cache: a slot never changes key
        self.full = 0  # sources this process could not place (table full)

    def hit(self, worker: int, ip: str, now_ns: int) -> int:
        """Count one request from ``ip``; ALLOW, BLOCK_NOW (report it) or BLOCKED."""
        slot = self._slot(ip)
        if slot < 0:
            return ALLOW
        words = self._words
        base = slot * self._stride
        window = now_ns // self.window_ns + 1
        if words[base + 1] == window:
            return BLOCKED
        mine = base + 2 + 2 * worker
        if words[mine] == window:
            words[mine + 1] += 1
        else:
            # Count before window: a reader that sees the new window must
            # not pick up the old window's count with it.
            words[mine + 1] = 1
            words[mine] = window
        total = 0
        for at in range(base + 2, base + self._stride, 2):
            if words[at] == window:  # window first, then its count (see above)
                total += words[at + 1]
        if total <= self.limit:
            return ALLOW
        with self._locked():
            if words[base + 1] == window:
                return BLOCKED  # another child reported it first
            words[base + 1] = window
        return BLOCK_NOW

    def _slot(self, ip: str) -> int:
        slot = self._slots.get(ip)
        if slot is not None:
            return slot
        try:
            key = int.from_bytes(socket.inet_aton(ip), "big") + 1
        except OSError:
            return -1
        words = self._words
        start = (key * 2654435761) % self.SLOTS  # Knuth's multiplicative hash
        for probe in range(self.PROBES):
            slot = (start + probe) % self.SLOTS
            at = slot * self._stride
            if words[at] == 0:
                with self._locked():
                    if words[at] == 0:
                        words[at] = key
            if words[at] == key:
                self._slots[ip] = slot
                return slot
        self.full += 1
        return -1

    def _locked(self) -> _RecordLock:
        return _RecordLock(self._fd)

    def close(self) -> None:
        self._words.release()
        self._mmap.close()
        os.close(self._fd)


class _RecordLock:
    """``lockf`` on byte 0 of the pike file: exclusive across processes, dies with its holder."""

    def __init__(self, fd: int):
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, 0)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)


# -- the child ----------------------------------------------------------------


class _Stop(Exception):
    """Raised by the child's SIGTERM handler to leave a blocking recvfrom."""


class _ChildState:
    stopping = False
    in_recv = False


def _child_loop(
    sock: socket.socket, conn: Connection, pike: Pike, index: int, state: _ChildState
) -> int:
    raise_event = conn.raise_event
    clock = time.monotonic_ns
    recvfrom = sock.recvfrom
    sendto = sock.sendto
    while True:
        try:
            # The handler raises _Stop only while in_recv is set; checking the
            # flag after setting in_recv closes the gap where a SIGTERM handled
            # just before would leave us blocked in recvfrom for good.
            state.in_recv = True
            if state.stopping:
                return 0
            data, addr = recvfrom(MAX_DATAGRAM)
            state.in_recv = False
        except _Stop:
            return 0
        except OSError as exc:
            state.in_recv = False
            # An unconnected UDP socket reports no ICMP errors here, so this
            # is the socket itself failing: exit and let the master respawn.
            log.error("worker %d: recvfrom: %s", index, exc)
            return 1
        ip, port = addr[0], addr[1]
        try:
            request: SipRequest | None = parse_request(data)
        except BadRequest:
            request = None
        try:
            verdict = pike.hit(index, ip, clock())
            if verdict == BLOCK_NOW:
                raise_event(E_PIKE_BLOCKED, {"ip": ip, "t": clock()})
            if verdict != ALLOW:
                reply = build_reply(403, "Forbidden", request)
            elif request is None:
                reply = build_reply(400, "Bad Request", None)
            else:
                raise_event(
                    E_SIP_REQUEST,
                    {
                        "method": request.method,
                        "ruri": request.ruri,
                        "from": request.from_,
                        "call_id": request.call_id,
                        "source": f"{ip}:{port}",
                        "worker": index,
                        "t": clock(),
                    },
                )
                if request.method == "ACK":
                    continue  # ACK is never answered
                reply = build_reply(200, "OK", request)
        except Exception:
            # One bad request must not take the worker down with it.
            log.exception("worker %d: handling a request from %s:%d", index, ip, port)
            reply = build_reply(500, "Server Internal Error", request)
        try:
            sendto(reply, addr)
        except OSError as exc:
            log.debug("worker %d: reply to %s:%d: %s", index, ip, port, exc)


def _child_main(sock: socket.socket, conn: Connection, pike: Pike, index: int, master: int) -> int:
    """A forked child's whole life; its return value is the exit code."""
    try:
        return _child_run(sock, conn, pike, index, master)
    except Exception:
        log.exception("worker %d crashed", index)
        return 1


def _child_run(sock: socket.socket, conn: Connection, pike: Pike, index: int, master: int) -> int:
    state = _ChildState()

    def on_term(signum: int, frame: object) -> None:
        state.stopping = True
        if state.in_recv:
            raise _Stop

    try:
        signal.set_wakeup_fd(-1)  # the master's wake-up pipe is not ours
    except ValueError:
        pass  # forked from a thread other than the main one
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the master, which stops us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _MASTER_SIGNALS)
    # A master killed with SIGKILL cannot stop us: have the kernel do it.
    die_with_parent(signal.SIGTERM)
    if os.getppid() != master:
        return 0  # it died before we asked
    return _child_loop(sock, conn, pike, index, state)


# -- the master ---------------------------------------------------------------


def _check_loopback(host: str) -> None:
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"host {host!r} must be an IPv4 address in 127.0.0.0/8") from None
    if not ip.is_loopback:
        raise ValueError(f"host {host} is not in 127.0.0.0/8: this proxy stays on loopback")


class SipProxy:
    """The master: socket, mpevent connection, pike table and N forked children.

    ``start()`` forks the children and returns; the caller keeps running and
    calls ``reap()`` now and then so a child that died is replaced, and
    ``stop()`` at the end (also a context manager). ``run()`` is the
    stand-alone arbiter loop behind ``python -m mpevent.workers.sipproxy``.
    """

    def __init__(
        self,
        name: str = SEGMENT_NAME,
        *,
        workers: int = 4,
        port: int = 0,
        host: str = "127.0.0.1",
        pike_limit: int = DEFAULT_PIKE_LIMIT,
        pike_window: float = DEFAULT_PIKE_WINDOW,
        connection: Connection | None = None,
        connect_timeout: float = 5.0,
    ):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        _check_loopback(host)
        self.name = name
        self.workers = workers
        self.host = host
        self.port = port
        self.pike_limit = pike_limit
        self.pike_window = pike_window
        self.connect_timeout = connect_timeout
        self.respawned = 0
        self._conn = connection
        self._own_conn = connection is None
        self._sock: socket.socket | None = None
        self._pike: Pike | None = None
        self._children: dict[int, int] = {}  # pid -> worker index
        self._owner = os.getpid()
        self._stopping = False
        self._signals: list[int] = []

    # -- properties ---------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        if self._sock is None:
            raise RuntimeError("the proxy is not started")
        return self._sock.getsockname()

    @property
    def connection(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("the proxy is not started")
        return self._conn

    @property
    def pids(self) -> dict[int, int]:
        """Live children: pid -> worker index."""
        return dict(self._children)

    # -- lifetime -------------------------------------------------------------

    def start(self) -> SipProxy:
        """Attach, publish the events, bind, fork the children."""
        try:
            if self._conn is None:
                self._conn = mpevent.connect(self.name, timeout=self.connect_timeout)
            for event in EVENTS:
                self._conn.publish_event(event)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock = sock
            set_rcvbuf(sock, RCVBUF)
            sock.bind((self.host, self.port))
            self._pike = Pike(self.workers, self.pike_limit, self.pike_window)
            for index in range(self.workers):
                self._spawn(index)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, index: int) -> int:
        assert self._sock is not None and self._conn is not None and self._pike is not None
        master = os.getpid()
        # The child starts with the master's signals blocked and unblocks them
        # once its own handlers are in place; fork_call ends it with os._exit,
        # so it never returns into the caller's code (a test runner, the demo).
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _MASTER_SIGNALS)
        try:
            pid = fork_call(_child_main, self._sock, self._conn, self._pike, index, master)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self._children[pid] = index
        return pid

    def reap(self) -> int:
        """Collect children that exited; respawn them unless stopping. Returns respawns."""
        respawned = 0
        for pid, index in list(self._children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0  # reaped by someone else
            if not done:
                continue
            del self._children[pid]
            if self._stopping or os.getpid() != self._owner:
                continue
            log.warning("worker %d (pid %d) died (%s); respawning", index, pid, _status(status))
            self._spawn(index)
            respawned += 1
        self.respawned += respawned
        return respawned

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the children, wait for them (SIGKILL after ``timeout``), release all."""
        if os.getpid() != self._owner:
            return  # a forked child must not tear down its parent's proxy
        self._stopping = True
        for pid in self._children:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._children:
            self.reap()
            if not self._children:
                break
            if time.monotonic() > deadline:
                for pid in self._children:
                    log.warning("worker pid %d did not stop in time; killing it", pid)
                    _kill(pid, signal.SIGKILL)
                for pid in list(self._children):
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:
                        pass
                self._children.clear()
                break
            time.sleep(0.005)
        if self._sock is not None:
            self._sock.close()
        if self._pike is not None:
            self._pike.close()
            self._pike = None
        if self._conn is not None and self._own_conn:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> SipProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- stand-alone arbiter --------------------------------------------------

    def run(self) -> int:
        """Start, then supervise until SIGTERM/SIGINT; returns the exit code.

        Signal handlers only record the signal and write to a pipe
        (``set_wakeup_fd``); the loop wakes on it and does the work, so no
        work happens inside a handler.
        """
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_fd = signal.set_wakeup_fd(wake_w)
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in _MASTER_SIGNALS}
        try:
            self.start()
            log.info(
                "sipproxy on udp:%s:%d, %d workers, segment %s",
                *self.address,
                self.workers,
                self.name,
            )
            while True:
                select.select([wake_r], [], [], 1.0)
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                signals, self._signals = self._signals, []
                if signal.SIGTERM in signals or signal.SIGINT in signals:
                    log.info("stopping")
                    return 0
                if signal.SIGHUP in signals:
                    log.info("SIGHUP: nothing to reload")
                self.reap()  # on SIGCHLD, and once a second in case one was missed
        finally:
            self.stop()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_fd)
            os.close(wake_r)
            os.close(wake_w)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpevent.workers.sipproxy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--name", default=SEGMENT_NAME, help="segment of the mpevent serve to use")
    parser.add_argument("--workers", type=int, default=4, help="children (default 4)")
    parser.add_argument("--host", default="127.0.0.1", help="an address in 127.0.0.0/8")
    parser.add_argument("--port", type=int, default=5060, help="UDP port, 0 = ephemeral")
    parser.add_argument(
        "--pike-limit", type=int, default=DEFAULT_PIKE_LIMIT, help="requests per window"
    )
    parser.add_argument(
        "--pike-window", type=float, default=DEFAULT_PIKE_WINDOW, help="seconds (default 1)"
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    try:
        proxy = SipProxy(
            args.name,
            workers=args.workers,
            port=args.port,
            host=args.host,
            pike_limit=args.pike_limit,
            pike_window=args.pike_window,
        )
        return proxy.run()
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    except mpevent.NotServing as exc:
        log.error("%s", exc)
        return 3
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
