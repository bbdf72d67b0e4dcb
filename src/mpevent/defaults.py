"""Every default and limit that more than one module needs, defined once.

The segment's geometry, the senders' backlogs, the drain timeout, the
daemon's names and addresses, log levels and the version: ``EventBus``, the
daemon's configuration, the hub, the senders, the CLI and the docs all take
them from here, so a default cannot differ between two ways of running
mpevent.
"""

from __future__ import annotations

# -- the segment (see mpevent.shm.layout) ----------------------------------
LANES = 32  # producer processes that can own a lane at once
# Shared lanes for the processes beyond LANES: written under a record lock
# (a syscall per raise), each costs LANE_SIZE bytes of shared memory.
OVERFLOW_LANES = 4
LANE_SIZE = 1 << 20  # bytes per lane, a power of two
SENDERS = 1  # sender worker processes
MAX_EVENTS = 256  # events that can be declared
MAX_SUBS = 1024  # subscriptions at once, all events together
TABLE_BYTES = 256 * 1024  # the hub's published subscription table
# Broker (rabbitmq:) destinations served at once: one relay process each,
# fed by a hand-off lane of HANDOFF_SIZE bytes from every sender.
RELAYS = 4
HANDOFF_SIZE = 1 << 20

# -- senders ---------------------------------------------------------------
BACKLOG = 16384  # datagrams one destination may have waiting (UNIX EAGAIN)
BACKLOG_BYTES = 4 << 20  # bytes one destination's backlog may hold
# Bytes all of one sender's backlogs may hold together: what keeps a
# sender's memory bounded (well under 256 MiB) whatever its subscribers do.
SENDER_BACKLOG_BYTES = 64 << 20

# -- stopping --------------------------------------------------------------
DRAIN_TIMEOUT = 5.0  # seconds the senders may take to empty the ring on stop

# -- the daemon ------------------------------------------------------------
SEGMENT_NAME = "mpevent"  # /dev/shm/mpevent
MI_UDP = "127.0.0.1:8080"
MI_UNIX_MODE = 0o660
MAX_SUBS_PER_EVENT = 256  # the daemon's security.max_subs_per_event
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_LEVEL = "info"


def version() -> str:
    """mpevent's version, from the installed package's metadata."""
    from importlib import metadata  # not at import: it costs a fresh process ~10 ms

    try:
        return metadata.version("mpevent")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"
