"""Process and socket helpers, each written once for the library, its tools and tests.

* starting processes: :func:`spawn_python` (a fresh interpreter running one
  of mpevent's modules, given only the descriptors it names: how the hub and
  the senders start), :func:`fork_call` (a forked child that always ends in
  ``os._exit``) with :func:`reap`, and :class:`Supervised` (a child process
  started with ``subprocess``, stopped with a signal, then SIGKILL);
* dying with the parent: :func:`die_with_parent`;
* sockets: :func:`set_rcvbuf`, :func:`free_port`, :func:`bind_datagram` and
  :func:`claim_socket_path` (a listener's UNIX path, reclaimed from a
  listener that is gone).

Nothing here knows about segments or events.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from mpevent.protocol.destination import Destination

# Linux values the socket module and ctypes do not export.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
PR_SET_PDEATHSIG = 1
# fork_call's exit codes when the function did not return one.
EXIT_RAISED = 71
EXIT_NOT_RUN = 70


# -- starting processes ---------------------------------------------------


def package_root() -> str:
    """The directory that holds the ``mpevent`` package (for a child's sys.path)."""
    return str(Path(__file__).resolve().parent.parent)


def spawn_python(
    module: str,
    args: Sequence[str],
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Run ``python -m module args...`` in a fresh interpreter.

    The child inherits none of this process's state: no threads, locks or
    objects, and no descriptor but stdio and ``pass_fds`` (``close_fds``).
    It finds this very copy of mpevent first on its path, whatever the
    application's working directory, and its stdio are ours (logs reach the
    same place).
    """
    environ = dict(os.environ if env is None else env)
    path = environ.get("PYTHONPATH")
    environ["PYTHONPATH"] = package_root() + (os.pathsep + path if path else "")
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        pass_fds=tuple(pass_fds),
        close_fds=True,
        stdin=subprocess.DEVNULL,
        env=environ,
    )


def fork_call(fn: Callable[..., int | None], *args: Any) -> int:
    """Run ``fn(*args)`` in a forked child whose exit code is its return value.

    The child ends with ``os._exit`` whatever happens (:data:`EXIT_RAISED`
    after printing the traceback), so none of the caller's code (a test
    runner's fixtures, ``atexit``, a server's ``finally``) ever runs in it.
    Returns the child's pid.
    """
    # What we printed and did not flush yet would otherwise come out twice.
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = EXIT_NOT_RUN
        try:
            result = fn(*args)
            code = 0 if result is None else int(result)
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
            code = EXIT_RAISED
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    return pid


def reap(pid: int, timeout: float) -> int:
    """The exit code of child ``pid`` (-N: killed by signal N).

    A child still running after ``timeout`` seconds is killed and reaped,
    and :class:`TimeoutError` says so.
    """
    deadline = time.monotonic() + timeout
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"child {pid} still running after {timeout} s; killed")
        time.sleep(0.002)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies.

    Usable as a ``preexec_fn``. Elsewhere than on Linux it does nothing.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


class Supervised:
    """A child process started with ``subprocess``; :meth:`stop` never leaves it running.

    Its output goes to ``log`` (a path, appended to) or is inherited. With
    ``die_with_parent`` the kernel signals it when we die, so a killed
    caller leaves no orphan behind.
    """

    def __init__(
        self,
        label: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.label = label
        self.log_path = log
        out: IO[bytes] | None = open(log, "ab") if log is not None else None  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                list(args),
                cwd=cwd,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                preexec_fn=_die_with_parent_sigterm if die_with_parent else None,
            )
        finally:
            if out is not None:
                out.close()
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(
        self, sig: int = signal.SIGTERM, timeout: float = 30.0, grace: float = 0.0
    ) -> int | None:
        """Wait ``grace`` s for it to end by itself, send ``sig``, wait ``timeout``
        s, then SIGKILL; returns its exit code. Idempotent."""
        if self.returncode is None:
            if grace > 0:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(grace)
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    print(
                        f"{self.label} did not stop within {timeout:g} s; killing it",
                        file=sys.stderr,
                    )
                    self.proc.kill()
                    self.proc.wait()
            self.returncode = self.proc.returncode
        return self.returncode

    def log(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _die_with_parent_sigterm() -> None:
    die_with_parent(signal.SIGTERM)


# -- sockets ------------------------------------------------------------------


def set_rcvbuf(sock: socket.socket, size: int) -> None:
    """Ask for a ``size``-byte receive buffer, past ``rmem_max`` when we may (root)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A loopback port free right now for both UDP and TCP.

    It may be taken before the caller binds it: callers retry.
    """
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        other = socket.SOCK_STREAM if kind == socket.SOCK_DGRAM else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, other) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port


class SocketInUse(OSError):
    """A UNIX socket path another process listens on, or that is not a socket."""


def claim_socket_path(path: Path) -> None:
    """Make ``path`` free to bind: remove a socket file nobody listens on any more."""
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_socket():
        raise SocketInUse(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left by a listener that is gone
            return
    raise SocketInUse(f"{path}: another process is bound to it")


def bind_datagram(dest: Destination, mode: int | None = None) -> socket.socket:
    """A non-blocking datagram socket bound to ``dest`` (an MI listener)."""
    sock = socket.socket(dest.family, socket.SOCK_DGRAM)
    try:
        if dest.family == socket.AF_UNIX:
            path = dest.sockaddr
            on_disk = isinstance(path, str) and path.startswith("/")  # not abstract
            if on_disk:
                claim_socket_path(Path(path))
            sock.bind(path)
            if on_disk and mode is not None:
                os.chmod(path, mode)
        else:
            sock.bind(dest.sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
