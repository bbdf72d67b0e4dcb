"""Which producer path this process runs: the compiled fast path or the pure-Python reference.

Decided once, at import, and never changed afterwards:

* ``MPEVENT_NO_EXTENSIONS`` set (to anything but ``0`` or nothing): pure Python;
* else the C extension ``mpevent.processes._fastpath`` when it was built (a C
  compiler at install time, see ``setup.py``); it is never built for a
  free-threaded CPython, whose missing GIL it relies on;
* else pure Python.

:data:`COMPILED` says which (``mpevent.COMPILED``, ``mpevent --version``);
:data:`REASON` says why, for messages. :data:`extension` is the module, or
None. An extension built from another layout than :mod:`mpevent.shm.layout`
(a stale build in a checkout) is refused with an ImportError rather than
used: it would misplace every record.
"""

from __future__ import annotations

import os
from types import ModuleType

from mpevent.shm import layout

ENV = "MPEVENT_NO_EXTENSIONS"

# What the C code hard-codes, by the names both sides give it.
_ASSUMED = {
    "RECORD_HEADER_BYTES": layout.RECORD_HEADER_BYTES,
    "FLAG_WRAP": layout.FLAG_WRAP,
    "L_TAIL": layout.L_TAIL,
    "L_HEAD": layout.L_HEAD,
    "COUNTER_WORDS": layout.COUNTER_WORDS,
    "P_ENQUEUED": layout.P_ENQUEUED,
    "P_DROPPED": layout.P_DROPPED,
    "HUB_GONE": layout.HUB_GONE,
}


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get(ENV, "") not in ("", "0"):
        return None, f"{ENV} is set"
    try:
        from mpevent.processes import _fastpath
    except ImportError as exc:
        import sysconfig  # only here: it costs a fresh process a few milliseconds

        if sysconfig.get_config_var("Py_GIL_DISABLED"):
            return None, "free-threaded CPython: the compiled path relies on the GIL"
        return None, f"the extension is not built ({exc})"
    stale = {k: v for k, v in _ASSUMED.items() if getattr(_fastpath, k, None) != v}
    if stale:
        raise ImportError(
            f"{_fastpath.__file__} was built for another segment layout ({sorted(stale)} "
            f"differ): rebuild it (pip install -e .) or set {ENV}=1"
        )
    return _fastpath, "built"


extension, REASON = _load()
#: True when ``raise_event`` runs the compiled fast path by default.
COMPILED: bool = extension is not None


def describe() -> str:
    """How ``mpevent --version`` names the path: compiled, or pure Python and why."""
    return "compiled fast path" if COMPILED else f"pure Python: {REASON}"
