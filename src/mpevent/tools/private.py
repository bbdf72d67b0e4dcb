"""A private ``mpevent serve`` in a subprocess, for the demo and the load test.

It must never meet an operator's real daemon and must leave nothing behind:
a unique segment name, its own runtime directory (``XDG_RUNTIME_DIR``, so
its MI socket and FIFOs live there), MI on a free loopback UDP port, SIGTERM
to stop it (it drains first), and the kernel sends it SIGTERM if the process
that started it dies.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from mpevent.api.connect import NotServing, connect
from mpevent.shm.segment import shm_path
from mpevent.system import Supervised, free_port


def short_tmpdir(prefix: str, name: str) -> Path:
    """A private temporary directory short enough for the hub's socket path."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    # sun_path holds 107 bytes; a deep $TMPDIR (a test runner's) would not
    # fit the hub's MI socket, so fall back to /tmp then.
    if len(os.fsencode(tmp / "run" / "mpevent" / f"{name}.sock")) > 100:
        tmp.rmdir()
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    return tmp


class PrivateHub:
    """``python -m mpevent serve`` isolated in ``tmp``; stopped with SIGTERM."""

    def __init__(self, tmp: Path, name: str, extra_args: Sequence[str] = ()):
        self.name = name
        self.run_dir = tmp / "run"
        self.log_path = tmp / "serve.log"
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(self.run_dir))
        self.extra_args = list(extra_args)
        self.mi_udp = ""
        self.child: Supervised | None = None
        self.returncode: int | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start it and wait until producers can attach."""
        self.run_dir.mkdir(mode=0o700, exist_ok=True)
        for _attempt in range(3):  # the free port may be taken before the hub binds it
            self.mi_udp = f"127.0.0.1:{free_port()}"
            args = [
                sys.executable, "-m", "mpevent", "serve",
                "--name", self.name,
                "--mi-udp", self.mi_udp,
                "--mi-http", "",
                "--log-level", "warning",
                *self.extra_args,
            ]  # fmt: skip
            self.child = Supervised("mpevent serve", args, env=self.env, log=self.log_path)
            deadline = time.monotonic() + timeout
            while self.child.alive() and time.monotonic() < deadline:
                try:
                    connect(self.name, timeout=0.1).close()
                    return
                except NotServing:
                    continue
            self.stop()
        raise RuntimeError(f"mpevent serve did not start:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0, grace: float = 0.0) -> int | None:
        """Wait ``grace`` s, SIGTERM, wait (it drains), SIGKILL after ``timeout``; idempotent."""
        child, self.child = self.child, None
        if child is not None:
            self.returncode = child.stop(timeout=timeout, grace=grace)
        # Only a killed hub leaves its segment; the name is ours alone.
        shm_path(self.name).unlink(missing_ok=True)
        return self.returncode
