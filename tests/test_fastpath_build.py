"""Building the extension, and telling which producer path runs.

* without a C compiler the install succeeds, says so in one line, and the
  installed copy runs the pure-Python path (``mpevent.COMPILED`` False);
* ``mpevent --version`` names the path; ``Producer(compiled=True)`` says why
  it cannot be had.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mpevent import defaults
from mpevent.processes import fastpath

ROOT = Path(__file__).resolve().parent.parent


def test_install_without_a_compiler_says_so_once_and_runs_pure(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv*",
            "build",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            ".hypothesis",
            "*.so",
        ),
    )
    target = tmp_path / "site"
    env = dict(os.environ, CC="/bin/false", TMPDIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-index",
         "--no-build-isolation", "--no-cache-dir", "--target", str(target), str(source)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    notes = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip().startswith("mpevent:")
    ]
    assert len(notes) == 1 and "the pure-Python path will be used" in notes[0], notes
    assert not list(target.rglob("_fastpath*.so"))
    probe = "import mpevent, mpevent.processes.fastpath as f; print(mpevent.COMPILED, f.REASON)"
    ran = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(target), fastpath.ENV: ""},
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("False the extension is not built"), ran.stdout


def test_version_says_which_path_runs(tmp_path: Path) -> None:
    probe = (
        "from mpevent.processes import fastpath\n"
        "from mpevent.processes.producer import Producer\n"
        "from mpevent.tools.cli.parser import main\n"
        "assert main(['--version']) == 0\n"
        "if not fastpath.COMPILED:\n"
        "    try:\n"
        "        Producer(None, [], compiled=True)\n"
        "    except RuntimeError as exc:\n"
        "        print(exc)\n"
    )
    lines = {}
    for value in ("", "1"):
        ran = subprocess.run(
            [sys.executable, "-c", probe],
            # No hub answers there: --version prints the library's line alone.
            env={**os.environ, fastpath.ENV: value, "MPEVENT_MI": f"unix:{tmp_path}/no-hub"},
            cwd=tmp_path, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        lines[value] = ran.stdout.splitlines()
    version = f"mpevent {defaults.version()}"
    assert lines["1"] == [
        f"{version} (pure Python: MPEVENT_NO_EXTENSIONS is set)",
        "the compiled fast path is not available: MPEVENT_NO_EXTENSIONS is set",
    ]
    # This pass may be the pure one: the child, without the variable, runs what was built.
    if importlib.util.find_spec("mpevent.processes._fastpath") is not None:
        assert lines[""] == [f"{version} (compiled fast path)"]
    else:
        assert lines[""][0].startswith(f"{version} (pure Python: the extension is not built")
