"""The MI over a FIFO, as OpenSIPS's ``mi_fifo``: what opensips-cli talks by default.

A client makes a reply FIFO in the reply directory (``/tmp/`` by default),
writes ``:REPLY_NAME:`` and a JSON-RPC request into the hub's FIFO, and
reads the reply from ``REPLY_DIR/REPLY_NAME``. No reply when the name is
empty or the request is a notification (no id); a name holding ``.``, ``/``
or ``\\`` is refused, so a reply never leaves the reply directory.

This module owns both halves:

* :class:`FifoRequestSplitter`, pure: the byte stream of the FIFO turned
  into requests. Nothing frames them but their syntax (opensips-cli writes a
  request and closes; OpenSIPS's mi_fifo finds where one ends by parsing its
  JSON and keeps the rest for the next), so the splitter follows the
  ``:NAME:`` prefix and then the JSON text's brackets and strings, as
  :mod:`mpevent.protocol.jsonstream` does, without parsing it (the MI does).
  Its buffer is bounded; an oversized, malformed or unfinished request is
  answered with an error (when its reply name is known and allowed) or
  dropped, and the splitter finds the next request in what follows.
* :class:`MIFifo`, the I/O: the FIFO is created (a stale one nobody reads
  is replaced; one that another process reads, or a path that is not a
  FIFO, is refused), read non-blocking by the hub's loop (``poll_fds``,
  ``on_ready``, ``next_due``, ``tick``: the hub's ``LoopService``), created
  again when someone deletes it, and removed at stop. Replies never block
  the loop: the reply FIFO is opened ``O_WRONLY | O_NONBLOCK | O_NOFOLLOW``
  and, while its reader is not there yet (ENXIO), tried again a few times
  within a third of a second, as mi_fifo does, but from the loop's timer
  instead of a sleep; a reply longer than the pipe holds is written as the
  reader takes it. A reply path that is not a FIFO, is a symlink or has a
  hard link elsewhere is refused (lstat, open without following links,
  fstat, same inode).

The client side is :class:`mpevent.api.client.MIFifoClient`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from mpevent.protocol import mi
from mpevent.protocol.jsonstream import CLOSED, MISMATCH, BracketScan

log = logging.getLogger("mpevent.mififo")

#: OpenSIPS's reply directory default (opensips-cli's ``fifo_reply_dir``).
DEFAULT_REPLY_DIR = "/tmp/"
DEFAULT_MODE = 0o660
MAX_REPLY_NAME = 255  # a file name; also what ends the search for the closing ':'
#: An unfinished request older than this is given up, so a writer that never
#: finishes one cannot hold back the requests written after it.
STALE_AFTER = 1.0
#: How long after a failed open (ENXIO: no reader yet) the reply FIFO is tried
#: again: mi_fifo gives a client 4 x 80 ms; these add up to about as much.
REPLY_RETRIES = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15)
REPLY_WRITE_TIMEOUT = 5.0  # a reader that stops reading a long reply is given up
MAX_PENDING_REPLIES = 64  # replies waiting for a reader, or written bit by bit
CHECK_INTERVAL = 2.0  # how often the FIFO's path is checked (deleted: created again)
READ_CHUNK = 65536

_COLON = ord(":")
_SPACE = b" \t\r\n"
_FORBIDDEN_IN_NAME = re.compile(rb"[./\\\x00\n]")
# Where a request may start, when the stream must be searched for one (after
# a malformed or abandoned request): a plausible reply name between colons,
# then the JSON text's opening bracket.
_CANDIDATE = re.compile(rb':[^:\s"{}\[\],]{0,255}:[ \t\r\n]*[{\[]')


@dataclass(frozen=True)
class FifoRequest:
    """One request read from the FIFO.

    ``reply_name``: the reply FIFO's name ("" when no reply is wanted).
    ``body``: the JSON-RPC text, for the MI; None when the request was
    refused, and then ``error`` (a JSON-RPC error code and message) says why.
    ``name_ok``: whether a reply may be written to ``reply_name`` at all.
    """

    reply_name: str
    body: bytes | None
    error: tuple[int, str] | None = None
    name_ok: bool = True

    @property
    def wants_reply(self) -> bool:
        return bool(self.reply_name) and self.name_ok


def error_reply(code: int, message: str) -> bytes:
    """A JSON-RPC error with a null id: what a refused request is answered."""
    return orjson.dumps({"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": None})


def check_reply_name(name: bytes) -> str | None:
    """The problem with a reply name, or None: mi_fifo's rule (no ``.``, ``/``,
    ``\\``: the reply stays in the reply directory), plus no NUL or newline."""
    if len(name) > MAX_REPLY_NAME:
        return f"reply name longer than {MAX_REPLY_NAME} bytes"
    found = _FORBIDDEN_IN_NAME.search(name)
    if found is not None:
        return f"reply name {name[:60]!r} holds {found.group()!r}"
    try:
        name.decode()
    except UnicodeDecodeError:
        return f"reply name {name[:60]!r} is not UTF-8"
    return None


class FifoRequestSplitter:
    """Feed it what the FIFO gives; it returns each request once it is whole.

    States: between requests (whitespace is skipped, a ``:`` starts the
    next); in the reply name (up to the second ``:``); in the JSON text (its
    brackets and strings followed until the outermost bracket closes); and,
    after a request that went wrong, *searching* for the next plausible
    start. What it holds is bounded: a request of at most ``max_request``
    bytes plus its name, or (searching, or skipping the rest of an oversized
    request) a few hundred bytes.
    """

    def __init__(self, max_request: int = mi.MAX_REQUEST, stale_after: float = STALE_AFTER):
        self.max_request = max_request
        self.stale_after = stale_after
        self._buf = bytearray()
        self._searching = False
        self._reset_request()

    def _reset_request(self) -> None:
        self._name: bytes | None = None  # None: still in the prefix (or between requests)
        self._name_problem: str | None = None
        self._started: float | None = None  # when the unfinished request's first byte came
        self._json_start = -1  # offset of the JSON text's first byte in _buf
        self._pos = 0  # where scanning resumes in _buf
        self._brackets = BracketScan()
        self._oversized = 0  # > 0: skipping the rest of a text this long so far

    @property
    def buffered(self) -> int:
        """Bytes held for a request not yet whole."""
        return len(self._buf)

    @property
    def unfinished_since(self) -> float | None:
        """When the unfinished request began (monotonic), or None between requests."""
        return self._started

    def feed(self, data: bytes, now: float) -> list[FifoRequest]:
        """The next bytes of the stream; the requests they complete, in order."""
        self._buf += data
        out: list[FifoRequest] = []
        self._scan(out, now)
        return out

    def end_of_stream(self, now: float) -> list[FifoRequest]:
        """Every writer closed the FIFO: a request still unfinished never will be.
        It is answered as malformed, and whatever whole requests were written
        after it (by other writers) are served."""
        out: list[FifoRequest] = []
        if self._started is not None:
            self._abandon(out, "Parse error: the request ended before its JSON text did")
            self._scan(out, now)
        self._buf.clear()
        self._reset_request()
        self._searching = False  # the next writer starts afresh
        return out

    def expire(self, now: float) -> list[FifoRequest]:
        """Give up an unfinished request older than ``stale_after`` (its writer
        holds the FIFO open and writes no more), and serve what follows it."""
        out: list[FifoRequest] = []
        if self._started is not None and now - self._started >= self.stale_after:
            self._abandon(
                out, f"Parse error: the request was not finished within {self.stale_after:g} s"
            )
            self._scan(out, now)
        return out

    # -- scanning ------------------------------------------------------------

    def _abandon(self, out: list[FifoRequest], message: str, resume: int | None = None) -> None:
        """The current request is wrong: answer it if it can be, then search
        for the next request from ``resume`` on.

        ``resume`` None: from the request's second byte, for a request cut
        short (other writers' whole requests may follow inside what it
        held); else from where a malformed one went wrong, so no byte is
        scanned twice for a request that cannot be one (a stream of broken
        requests costs its length, not its square).
        """
        name = self._name
        if resume is None:  # an oversized one's bytes were not kept: on from the scan
            resume = self._pos if self._oversized else 1
        if self._oversized:
            pass  # answered when it outgrew the bound
        elif name and self._name_problem is None and message:
            out.append(FifoRequest(name.decode(), None, (mi.PARSE_ERROR, message)))
        elif name is not None and self._name_problem is not None:
            log.info("MI FIFO: %s; request dropped", self._name_problem)
        del self._buf[:resume]
        self._reset_request()
        self._searching = True

    def _scan(self, out: list[FifoRequest], now: float) -> None:
        buf = self._buf
        while buf:
            if self._searching:
                found = _CANDIDATE.search(buf)
                if found is None:
                    # A start may straddle what comes next: keep a name's worth.
                    keep = MAX_REPLY_NAME + 16
                    if len(buf) > keep:
                        del buf[: len(buf) - keep]
                    return
                del buf[: found.start()]
                self._searching = False
            if self._name is None:
                if not self._prefix(out, now):
                    return
                continue
            if not self._text(out):
                return

    def _prefix(self, out: list[FifoRequest], now: float) -> bool:
        """Between requests or in the reply name; False: wait for more bytes."""
        buf = self._buf
        if self._started is None:
            skip = len(buf) - len(buf.lstrip(_SPACE))
            del buf[:skip]
            if not buf:
                return False
            if buf[0] != _COLON:
                log.debug("MI FIFO: a request must start with ':', got %r", bytes(buf[:20]))
                self._searching = True
                return True
            self._started = now
        end = buf.find(b":", 1, MAX_REPLY_NAME + 2)
        if end < 0:
            if len(buf) > MAX_REPLY_NAME + 1:
                log.info("MI FIFO: no ':' closing a reply name within %d bytes", MAX_REPLY_NAME)
                self._abandon(out, "")
                return True
            return False
        name = bytes(buf[1:end])
        self._name = name
        self._name_problem = check_reply_name(name) if name else None
        self._pos = end + 1
        return True

    def _text(self, out: list[FifoRequest]) -> bool:
        """In the JSON text; False: wait for more bytes."""
        buf = self._buf
        pos = self._pos
        end = len(buf)
        if self._json_start < 0:
            while pos < end and buf[pos] in _SPACE:
                pos += 1
            if pos < end and not self._brackets.begin(buf[pos]):
                self._abandon(
                    out, "Parse error: expected a JSON-RPC request after the reply name", pos
                )
                return True
            if pos == end:
                self._pos = pos
                if pos > MAX_REPLY_NAME + 2 + self.max_request:  # nothing but blanks
                    self._abandon(out, "Parse error: no JSON-RPC request after the reply name", pos)
                    return True
                return False
            self._json_start = pos
            pos += 1
        pos, state = self._brackets.scan(buf, pos, end)
        if state == MISMATCH:
            self._abandon(out, "Parse error: mismatched brackets", pos)
            return True
        if state == CLOSED:
            self._complete(out, pos)
            return True
        size = self._oversized + pos - self._json_start
        if size > self.max_request:
            if not self._oversized:
                self._refuse_oversized(out, size)
            # Keep following its brackets without keeping its bytes.
            self._oversized = size
            del buf[: min(pos, end)]
            pos -= min(pos, end)  # past the end only after an escape split off
            self._json_start = 0
        self._pos = pos
        return False

    def _complete(self, out: list[FifoRequest], end: int) -> None:
        buf = self._buf
        name = self._name or b""
        if self._oversized:
            pass  # answered when it outgrew the bound
        elif self._name_problem is not None:
            log.info("MI FIFO: %s; request dropped", self._name_problem)
            out.append(FifoRequest(name.decode(errors="replace"), None, None, name_ok=False))
        else:
            body = bytes(buf[self._json_start : end])
            if len(body) > self.max_request:
                self._refuse_oversized(out, len(body))
            else:
                out.append(FifoRequest(name.decode(), body))
        del buf[:end]
        self._reset_request()

    def _refuse_oversized(self, out: list[FifoRequest], size: int) -> None:
        name = self._name or b""
        message = (
            f"Request too large: {size} bytes or more, over the MI's limit of "
            f"{self.max_request} bytes"
        )
        ok = self._name_problem is None
        out.append(
            FifoRequest(name.decode(errors="replace"), None, (mi.INVALID_REQUEST, message), ok)
        )


# -- the I/O ---------------------------------------------------------------------------


class FifoInUse(OSError):
    """The FIFO's path is another process's FIFO (it reads it), or not a FIFO."""


class ReplyRefused(OSError):
    """A reply path that fails the checks (not a FIFO, a symlink, hard-linked)."""


def claim_fifo_path(path: Path) -> None:
    """Make ``path`` free for a new FIFO: remove a FIFO nobody reads any more."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISFIFO(st.st_mode):
        raise FifoInUse(f"{path} exists and is not a FIFO")
    try:
        probe = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: no reader, left by a process that is gone
            raise
        os.unlink(path)
        return
    # Opened: someone reads it (OpenSIPS, another hub). A writer that writes
    # nothing and closes is what opensips-cli's own check does; harmless.
    os.close(probe)
    raise FifoInUse(f"{path}: another process reads this FIFO")


def open_reply(path: str) -> int:
    """Open the reply FIFO ``path`` for writing without blocking, after
    mi_fifo's checks. BlockingIOError (ENXIO): no reader yet, try again;
    ReplyRefused or another OSError: give up."""
    before = os.lstat(path)  # FileNotFoundError: the client gave up already
    if stat.S_ISLNK(before.st_mode):
        raise ReplyRefused(f"reply path {path} is a symbolic link")
    if not stat.S_ISFIFO(before.st_mode):
        raise ReplyRefused(f"reply path {path} is not a FIFO")
    if before.st_nlink > 1:
        raise ReplyRefused(f"reply FIFO {path} is hard-linked {before.st_nlink} times")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise BlockingIOError(errno.ENXIO, "no reader on the reply FIFO yet") from None
        if exc.errno == errno.ELOOP:
            raise ReplyRefused(f"reply path {path} became a symbolic link") from None
        raise
    try:
        after = os.fstat(fd)
        if not stat.S_ISFIFO(after.st_mode) or after.st_nlink > 1:
            raise ReplyRefused(f"reply path {path} changed into something else than a FIFO")
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise ReplyRefused(f"reply path {path} was replaced while it was opened")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class _Reply:
    path: str
    data: bytes
    attempts: int = 0
    due: float = 0.0  # when to try opening (or, once open, when to give up)
    fd: int = -1
    written: int = 0


Handler = Callable[[bytes], "bytes | None"]


class MIFifo:
    """The hub's FIFO, served by the hub's loop (its ``LoopService``)."""

    def __init__(
        self,
        path: Path,
        mode: int = DEFAULT_MODE,
        reply_dir: str | Path = DEFAULT_REPLY_DIR,
        handle: Handler | None = None,
    ):
        self.path = Path(path)
        self.mode = mode
        self.reply_dir = str(reply_dir)
        self.handle = handle
        self.splitter = FifoRequestSplitter()
        self._fd = -1
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our FIFO
        self._replies: list[_Reply] = []
        self._next_check = 0.0
        self._warned_moved = False
        self._dropped_replies = 0

    def bind(self, handle: Handler) -> None:
        """The MI handler the requests go to (the hub's)."""
        self.handle = handle

    # -- the FIFO itself --------------------------------------------------------

    def open(self) -> None:
        """Create the FIFO (replacing a stale one) and open it for reading."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        claim_fifo_path(self.path)
        self._create()
        self._next_check = time.monotonic() + CHECK_INTERVAL

    def _create(self) -> None:
        os.mkfifo(self.path, self.mode)
        os.chmod(self.path, self.mode)  # mkfifo's mode passes through the umask
        self._reopen(self.path)

    def _reopen(self, source: str | Path) -> None:
        """A fresh read end, of the FIFO at ``source``. The new one is opened
        before the old one is closed, so the pipe always has a reader and
        nothing written meanwhile is lost; and the fresh descriptor does not
        report the hang-up of writers gone."""
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(source, flags | (os.O_NOFOLLOW if source == self.path else 0))
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode):
            os.close(fd)
            raise FifoInUse(f"{self.path} is not a FIFO any more")
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._identity = (st.st_dev, st.st_ino)

    def _check_path(self) -> None:
        """Create the FIFO again if someone deleted it (as mi_fifo does)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            log.warning("MI FIFO %s was deleted; creating it again", self.path)
            try:
                self._create()
            except OSError as exc:
                log.error("MI FIFO %s cannot be created again: %s", self.path, exc)
            return
        except OSError as exc:
            log.warning("MI FIFO %s cannot be checked: %s", self.path, exc)
            return
        if (st.st_dev, st.st_ino) != self._identity and not self._warned_moved:
            # Someone put another file there: theirs, not ours to delete.
            self._warned_moved = True
            log.warning("MI FIFO %s was replaced by another file; no longer served", self.path)

    def close(self) -> None:
        """Stop serving: close everything; remove the FIFO if it is still ours."""
        for reply in self._replies:
            if reply.fd >= 0:
                os.close(reply.fd)
        self._replies.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        identity, self._identity = self._identity, None
        if identity is None:
            return
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == identity:
            self.path.unlink(missing_ok=True)

    # -- the hub's loop ------------------------------------------------------------

    def poll_fds(self) -> dict[int, int]:
        """What to poll now: the FIFO for reading, replies being written for POLLOUT."""
        fds = {self._fd: select.POLLIN} if self._fd >= 0 else {}
        for reply in self._replies:
            if reply.fd >= 0:
                fds[reply.fd] = select.POLLOUT
        return fds

    def next_due(self) -> float | None:
        """When :meth:`tick` has something to do (monotonic seconds)."""
        if self._fd < 0:
            return None
        due = self._next_check
        started = self.splitter.unfinished_since
        if started is not None:
            due = min(due, started + self.splitter.stale_after)
        for reply in self._replies:
            due = min(due, reply.due)
        return due

    def on_ready(self, fd: int, events: int) -> None:
        """``fd`` is ready: read the FIFO or go on writing a reply (a spurious call is harmless)."""
        if fd == self._fd:
            self._read()
            return
        for reply in self._replies:
            if reply.fd == fd:
                self._write(reply, time.monotonic())
                break
        self._forget_finished()

    def tick(self, now: float) -> None:
        """Timers: reply FIFOs to try again, stalled replies, an abandoned
        request, and every few seconds whether the FIFO still exists."""
        if self._fd < 0:
            return
        self._serve(self.splitter.expire(now), now)
        for reply in list(self._replies):
            if reply.due > now:
                continue
            if reply.fd < 0:
                self._try_open(reply, now)
            else:
                log.info("MI FIFO: reply to %s not read within %g s; dropped", reply.path,
                         REPLY_WRITE_TIMEOUT)  # fmt: skip
                self._finish(reply)
        self._forget_finished()
        if now >= self._next_check:
            self._next_check = now + CHECK_INTERVAL
            self._check_path()

    # -- requests and replies --------------------------------------------------------

    def _read(self) -> None:
        now = time.monotonic()
        try:
            data = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("MI FIFO %s: read failed: %s", self.path, exc)
            return
        if data:
            self._serve(self.splitter.feed(data, now), now)
            return
        # Every writer closed it: what is unfinished now never will be. A
        # fresh read end, or poll would report the hang-up forever: of the
        # same FIFO, through our descriptor (its path may be gone or taken).
        self._serve(self.splitter.end_of_stream(now), now)
        try:
            self._reopen(f"/proc/self/fd/{self._fd}")
        except OSError as exc:  # not expected; never spin on a hung-up descriptor
            log.error("MI FIFO %s cannot be opened again: %s; no longer served", self.path, exc)
            os.close(self._fd)
            self._fd = -1

    def _serve(self, requests: list[FifoRequest], now: float) -> None:
        for request in requests:
            if request.body is not None:
                assert self.handle is not None, "MIFifo.bind() was not called"
                reply = self.handle(request.body)
            elif request.error is not None:
                reply = error_reply(*request.error)
            else:
                reply = None
            if reply is None or not request.wants_reply:
                continue
            self._reply(request.reply_name, reply, now)

    def _reply(self, name: str, data: bytes, now: float) -> None:
        if len(self._replies) >= MAX_PENDING_REPLIES:
            self._dropped_replies += 1
            if self._dropped_replies == 1 or self._dropped_replies % 1000 == 0:
                log.warning(
                    "MI FIFO: %d replies wait for their readers; %d dropped so far",
                    len(self._replies),
                    self._dropped_replies,
                )
            return
        # A newline ends it, for clients that read a line (opensips-cli does).
        reply = _Reply(os.path.join(self.reply_dir, name), data + b"\n")
        self._replies.append(reply)
        self._try_open(reply, now)
        self._forget_finished()

    def _try_open(self, reply: _Reply, now: float) -> None:
        try:
            reply.fd = open_reply(reply.path)
        except BlockingIOError:
            if reply.attempts >= len(REPLY_RETRIES):
                log.info("MI FIFO: nobody reads the reply FIFO %s; reply dropped", reply.path)
                self._finish(reply)
                return
            reply.due = now + REPLY_RETRIES[reply.attempts]
            reply.attempts += 1
            return
        except ReplyRefused as exc:
            log.warning("MI FIFO: %s; reply refused", exc)
            self._finish(reply)
            return
        except OSError as exc:
            log.info("MI FIFO: cannot open the reply FIFO %s: %s", reply.path, exc.strerror)
            self._finish(reply)
            return
        reply.due = now + REPLY_WRITE_TIMEOUT
        self._write(reply, now)

    def _write(self, reply: _Reply, now: float) -> None:
        if reply.fd < 0:
            return
        view = memoryview(reply.data)
        while reply.written < len(view):
            try:
                reply.written += os.write(reply.fd, view[reply.written :])
            except BlockingIOError:
                return  # the pipe is full: on when poll says it can take more
            except OSError as exc:  # EPIPE: the reader went away
                log.info("MI FIFO: reply to %s not delivered: %s", reply.path, exc.strerror)
                break
        self._finish(reply)

    def _finish(self, reply: _Reply) -> None:
        if reply.fd >= 0:
            os.close(reply.fd)
        reply.fd = -2  # done: removed by _forget_finished

    def _forget_finished(self) -> None:
        self._replies = [r for r in self._replies if r.fd != -2]
