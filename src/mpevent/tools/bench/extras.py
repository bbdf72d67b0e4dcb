"""What a run can compare: the optional pipelines this machine has, and the
fast paths this mpevent build has.

faster_fifo and pyzmq are optional (``pip install 'mpevent[bench]'``): a
pipeline whose package is missing is skipped with a note. mpevent's fast
path is compiled when its extension is built and not turned off
(``mpevent.COMPILED``); then the pure-Python path runs beside it wherever
the bench compares producers (the producer-cost and end-to-end sections),
through a second :class:`~mpevent.processes.producer.Producer` made with
``compiled=False``. A build that does not know the choice (no
``mpevent.COMPILED``, or a ``Producer`` without ``compiled``) runs its one
path and says so. Every skip is a note in the report.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mpevent.api.bus import EventBus
from mpevent.processes.producer import Producer
from mpevent.tools.bench.config import PURE


def optional_module(name: str) -> Any:
    """The module, or None when it is not installed (tests replace this)."""
    try:
        return __import__(name)
    except ImportError:
        return None


def compiled_flag() -> bool | None:
    """``mpevent.COMPILED``; None when this build has no compiled path at all."""
    import mpevent

    try:
        return bool(mpevent.COMPILED)
    except (AttributeError, ImportError):
        pass
    try:
        from mpevent.processes import fastpath
    except ImportError:
        return None
    return bool(fastpath.COMPILED)


def _producer_chooses_path() -> bool:
    return "compiled" in inspect.signature(Producer).parameters


@dataclass(frozen=True)
class Extras:
    """The optional modules and mpevent paths one run uses."""

    ff: Any = None  # the faster_fifo module
    zmq: Any = None  # the pyzmq module
    compiled: bool | None = None  # mpevent.COMPILED (None: no compiled path in this build)
    pure_beside: bool = False  # the pure path runs beside the (compiled) default

    @property
    def paths(self) -> dict[str, bool | None]:
        """Suffix of each mpevent case -> the ``compiled`` argument (None: the default path)."""
        return {"": None, PURE: False} if self.pure_beside else {"": None}

    @property
    def mpevent_kinds(self) -> list[str]:
        return [f"mpevent{suffix}" for suffix in self.paths]


def detect(use_faster_fifo: bool = True) -> tuple[Extras, list[str]]:
    """What this run has, and a note for each thing it lacks."""
    notes = []
    ff = optional_module("faster_fifo") if use_faster_fifo else None
    if ff is None:
        notes.append(
            "faster_fifo not installed (pip install 'mpevent[bench]'): its cases are skipped"
            if use_faster_fifo
            else "faster_fifo skipped (--no-faster-fifo)"
        )
    zmq = optional_module("zmq")
    if zmq is None:
        notes.append("pyzmq not installed (pip install 'mpevent[bench]'): its cases are skipped")
    compiled = compiled_flag()
    pure_beside = bool(compiled) and _producer_chooses_path()
    if compiled is None:
        notes.append(
            "this mpevent has no compiled fast path (no mpevent.COMPILED): the mpevent "
            "figures are the pure path's, the compiled targets are n/a"
        )
    elif not compiled:
        notes.append(
            "mpevent.COMPILED is False (extension not built, or MPEVENT_NO_EXTENSIONS=1): the "
            "mpevent figures are the pure path's, the compiled targets are n/a"
        )
    elif not pure_beside:
        notes.append(
            "Producer takes no compiled= argument: the pure path cannot run beside the "
            "compiled one, its cases are skipped"
        )
    return Extras(ff, zmq, compiled, pure_beside), notes


def raiser(bus: EventBus, compiled: bool | None) -> Callable[..., bool]:
    """``raise_event`` on ``bus`` through the path ``compiled`` names (None: the bus's own).

    Another path needs a producer of its own beside the bus's (it claims a
    lane of its own on its first raise); EventBus has no public way to make
    one, hence its segment and doorbells.
    """
    if compiled is None:
        return bus.raise_event
    return Producer(bus._seg, bus._doorbells, compiled=compiled).raise_event
