"""An installed, non-editable copy of mpevent: what it holds, and ``mpevent demo`` from it.

The checkout is copied (without virtual environments, caches or build
output) to a temporary directory and installed from there with ``pip install
--no-deps --target``: pip builds the wheel and unpacks it, as it would into
site-packages. Then the copy's own ``mpevent`` console script runs the demo
from a working directory outside the checkout.

The children run with ``python -S`` and ``PYTHONPATH`` set to the installed
copy, then the test environment's site-packages (for orjson, msgspec and
psutil). Without ``site`` the ``.pth`` hook of the editable install ``make``
puts in that environment is never loaded, so nothing can be imported from
the checkout: a module missing from the wheel fails here instead of being
found next to the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mpevent.shm.segment import SHM_DIR

ROOT = Path(__file__).resolve().parent.parent
# What a clean clone would not have: never part of what gets installed.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory an installed copy of mpevent lives in (its site-packages)."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    target = base / "site"
    pip_tmp = base / "pip-tmp"
    pip_tmp.mkdir()
    # No index, no build isolation: nothing is downloaded; the test extra has setuptools.
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    done = subprocess.run(
        [*pip, "--no-build-isolation", "--no-cache-dir", "--target", str(target), str(source)],
        env=dict(os.environ, TMPDIR=str(pip_tmp)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    assert not list(pip_tmp.iterdir())  # pip left nothing behind
    return target


def installed_env(site: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``python -S`` child that sees the installed copy first."""
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *deps]), **extra)
    env.pop("PYTHONSTARTUP", None)
    return env


def test_installs_mpevent_only_with_every_module_of_the_checkout(installed: Path) -> None:
    top_level = sorted(p.name for p in installed.iterdir() if not p.name.endswith(".dist-info"))
    assert top_level == ["bin", "mpevent"]  # no top-level "workers" package
    package = installed / "mpevent"

    def modules(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*.py")}

    missing = modules(ROOT / "src" / "mpevent") - modules(package)
    assert not missing, f"not in the wheel: {sorted(missing)}"


def test_installed_copy_imports_nothing_from_the_checkout(installed: Path, tmp_path: Path) -> None:
    probe = (
        "import importlib.util, mpevent, mpevent.workers.sipproxy as proxy\n"
        "from mpevent.defaults import version\n"
        "print(mpevent.__file__, proxy.__file__, version(), importlib.util.find_spec('workers'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        cwd=tmp_path,
        env=installed_env(installed),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    package_file, proxy_file, version, workers_spec = done.stdout.split()
    assert Path(package_file) == installed / "mpevent" / "__init__.py"
    assert Path(proxy_file) == installed / "mpevent" / "workers" / "sipproxy.py"
    assert version[0].isdigit() and version != "0+unknown"  # from the installed metadata
    assert workers_spec == "None"


def test_mpevent_demo_runs_from_the_installed_copy(installed: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "cwd"  # a working directory outside the checkout
    elsewhere.mkdir()
    demo_tmp = tmp_path / "tmp"  # too deep for a socket path: the demo falls back to /tmp
    demo_tmp.mkdir()
    before = set(Path("/tmp").glob("mpevent-demo-*"))
    env = installed_env(installed, TMPDIR=str(demo_tmp))
    env.pop("XDG_RUNTIME_DIR", None)  # the demo sets its own for the hub
    script = installed / "bin" / "mpevent"  # the console script pip wrote
    done = subprocess.run(
        [sys.executable, "-S", str(script), "demo", "--seconds", "1"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, f"demo exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "mpevent demo: OK: all" in done.stdout
    assert not list(SHM_DIR.glob("mpevent-demo-*"))
    assert not list(demo_tmp.iterdir())
    assert set(Path("/tmp").glob("mpevent-demo-*")) <= before
    assert not list(elsewhere.iterdir())
