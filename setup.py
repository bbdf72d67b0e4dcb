"""What pyproject.toml cannot say: the optional C extension behind the producer's fast path.

``mpevent.processes._fastpath`` is built when a C compiler works. When it
does not, or on a free-threaded CPython (the fast path relies on the GIL),
the install still succeeds, one line says that the pure-Python path will be
used, and ``mpevent.COMPILED`` is False. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

ROOT = Path(__file__).resolve().parent
EXTENSION = "mpevent.processes._fastpath"
FALLBACK = "mpevent: {why}; the pure-Python path will be used"


def _note(why: str) -> None:
    # stderr: pip shows it with -v, `python -m build` and setup.py always.
    print(FALLBACK.format(why=why), file=sys.stderr, flush=True)


class OptionalBuildExt(build_ext):
    """build_ext that gives up on the extension with one line instead of failing."""

    def run(self) -> None:
        if sysconfig.get_config_var("Py_GIL_DISABLED"):
            _note("free-threaded CPython: the compiled fast path relies on the GIL")
            return
        super().run()

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError, OSError) as exc:
            compiler = getattr(self.compiler, "compiler_so", None) or ["the C compiler"]
            _note(f"{compiler[0]} cannot build {ext.name} ({type(exc).__name__})")
            # One left in build/ by an earlier build would go into the wheel.
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)

    def copy_extensions_to_source(self) -> None:
        """``pip install -e``: an extension that was not built leaves none in the tree
        (an earlier build's would be imported instead)."""
        for ext in self.extensions:
            filename = self.get_ext_filename(self.get_ext_fullname(ext.name))
            if not Path(self.build_lib, filename).exists():
                Path(ROOT, "src", filename).unlink(missing_ok=True)
        super().copy_extensions_to_source()  # skips what is missing: the extension is optional


setup(
    ext_modules=[
        Extension(
            EXTENSION,
            ["src/mpevent/processes/_fastpath.c"],
            extra_compile_args=["-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,  # and OptionalBuildExt says so in one line
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
