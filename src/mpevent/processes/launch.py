"""Starting the hub and the senders in fresh interpreters, both sides of it.

``EventBus`` starts its hub, and every hub starts its senders, as ``python
-m mpevent.processes ROLE SPEC``: a new interpreter that inherits
nothing of the process that started it (no threads, locks, objects or
descriptors of the application) except the descriptors named in the spec
(the segment, the doorbells, the hub's control socket). So no process of
mpevent is ever forked from an application, and none needs to close what
it inherited or to keep the garbage collector away from foreign objects.

This module owns the contract between the two sides: :func:`start_hub`,
:func:`start_sender` and :func:`start_relay` write the spec (JSON on the command line),
:func:`main` reads it in the child and runs the role. Keeping both in one
place means a field cannot be written on one side and forgotten on the
other.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import orjson

from mpevent.system import spawn_python

if TYPE_CHECKING:
    from mpevent.processes.hub import HubOptions
    from mpevent.processes.sender.backlog import BacklogLimits

MODULE = "mpevent.processes"  # its __main__ calls main() below
HUB, SENDER, RELAY = "hub", "sender", "relay"

log = logging.getLogger("mpevent.launch")


def _spawn(role: str, spec: dict[str, Any], fds: list[int]) -> subprocess.Popen[bytes]:
    spec["log_level"] = logging.getLogger("mpevent").getEffectiveLevel()
    return spawn_python(MODULE, [role, orjson.dumps(spec).decode()], pass_fds=fds)


def start_hub(
    segment_fd: int,
    doorbells: list[tuple[int, int]],
    control_fd: int,
    options: HubOptions,
) -> subprocess.Popen[bytes]:
    """The hub of an ``EventBus``, given the segment, the senders' doorbells
    (read, write descriptor pairs) and the bound control socket.

    ``options`` is a :class:`~mpevent.processes.hub.HubOptions`; its
    ``policy`` travels as its settings, and it may hold no ``reload``
    (only the daemon reloads, and it runs its hub in its own process).
    """
    settings = asdict(options)
    if settings.pop("reload") is not None:
        raise ValueError("a hub in a fresh interpreter cannot call back a reload function")
    policy = settings.pop("policy")
    settings["allowed_networks"] = [str(n) for n in policy["networks"]]
    settings["unix_path_prefixes"] = list(policy["unix_prefixes"])
    settings["policy_names"] = policy["names"]  # what its messages call those settings
    spec = {
        "segment_fd": segment_fd,
        "doorbells": [list(pair) for pair in doorbells],
        "control_fd": control_fd,
        "options": settings,
    }
    fds = [segment_fd, control_fd, *(fd for pair in doorbells for fd in pair)]
    return _spawn(HUB, spec, fds)


def start_sender(
    segment_fd: int, index: int, doorbell_fd: int, backlog: BacklogLimits, hub_pid: int
) -> subprocess.Popen[bytes]:
    """Sender ``index``, draining its lanes of the segment; it stops when
    ``hub_pid`` is no longer its parent. ``backlog`` is its
    :class:`~mpevent.processes.sender.backlog.BacklogLimits`."""
    spec = {
        "segment_fd": segment_fd,
        "index": index,
        "doorbell_fd": doorbell_fd,
        "backlog": asdict(backlog),
        "hub_pid": hub_pid,
    }
    return _spawn(SENDER, spec, [segment_fd, doorbell_fd])


def start_relay(
    segment_fd: int, index: int, backlog: BacklogLimits, hub_pid: int
) -> subprocess.Popen[bytes]:
    """The broker relay of slot ``index`` (:mod:`mpevent.processes.relay`),
    publishing what the senders hand it; it stops when ``hub_pid`` is no
    longer its parent. ``backlog`` bounds what it holds."""
    spec = {
        "segment_fd": segment_fd,
        "index": index,
        "backlog": asdict(backlog),
        "hub_pid": hub_pid,
    }
    return _spawn(RELAY, spec, [segment_fd])


# -- the child's side ---------------------------------------------------------
# Each role imports what it runs, and only that: a sender starts (and a
# killed one is replaced) without paying for the hub's imports.


def _run_hub(spec: dict[str, Any]) -> int:
    from mpevent.processes.sender.backlog import BacklogLimits
    from mpevent.shm.segment import Segment

    seg = Segment.adopt(spec["segment_fd"])
    settings = spec["options"]
    backlog = BacklogLimits(**settings.pop("backlog"))
    # The senders first: each is a fresh interpreter too, and its start
    # overlaps the hub's own imports below. They wait for the hub to run.
    senders = {
        index: start_sender(seg.fd, index, read_fd, backlog, os.getpid())
        for index, (read_fd, _) in enumerate(spec["doorbells"])
    }

    import socket

    from mpevent.processes.hub import Hub, HubOptions
    from mpevent.protocol.policy import DestinationPolicy, SettingNames
    from mpevent.shm.doorbell import Doorbell

    policy = DestinationPolicy.from_settings(
        settings.pop("allowed_networks"),
        settings.pop("unix_path_prefixes"),
        SettingNames(**settings.pop("policy_names")),
    )
    options = HubOptions(**settings, backlog=backlog, policy=policy)
    doorbells = [Doorbell(r, w) for r, w in spec["doorbells"]]
    control = socket.socket(fileno=spec["control_fd"])
    return Hub(seg, doorbells, [control], options, senders).run()


def _run_sender(spec: dict[str, Any]) -> int:
    from mpevent.processes.sender.backlog import BacklogLimits
    from mpevent.processes.sender.loop import Sender
    from mpevent.shm.doorbell import Doorbell
    from mpevent.shm.segment import Segment

    # The hub decides when senders stop; a terminal's Ctrl-C reaches the
    # whole process group and must not kill a sender mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seg = Segment.adopt(spec["segment_fd"])
    doorbell = Doorbell(spec["doorbell_fd"], -1)
    limits = BacklogLimits(**spec["backlog"])
    return Sender(seg, spec["index"], doorbell, limits, parent_pid=spec["hub_pid"]).run()


def _run_relay(spec: dict[str, Any]) -> int:
    from mpevent.processes.relay import Relay
    from mpevent.processes.sender.backlog import BacklogLimits
    from mpevent.shm.segment import Segment

    # Like a sender: the hub decides when a relay stops (SIGTERM, or the
    # segment's state), never a terminal's Ctrl-C to the process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seg = Segment.adopt(spec["segment_fd"])
    limits = BacklogLimits(**spec["backlog"])
    return Relay(seg, spec["index"], limits, parent_pid=spec["hub_pid"]).run()


def main(argv: list[str]) -> int:
    role, raw = argv
    spec = orjson.loads(raw)
    # The starter may have had signals blocked (a prefork master blocks them
    # around fork); a blocked mask survives exec, and the hub lives on them.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    logging.basicConfig(
        stream=sys.stderr,
        level=spec.get("log_level", logging.WARNING),
        format="%(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    run = {HUB: _run_hub, SENDER: _run_sender, RELAY: _run_relay}[role]
    try:
        return run(spec)
    except Exception:
        log.exception("mpevent %s crashed", role)
        return 1
