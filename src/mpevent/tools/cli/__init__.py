"""The ``mpevent`` command: one entry point, a subcommand per job.

This package owns the command line: argument parsing, choosing the MI
address, turning MI results into tables or JSON, and exit codes. It holds no
MI logic of its own (that is :mod:`mpevent.protocol.mi`, reached through
:mod:`mpevent.api.client`) and no daemon logic (``serve`` is :mod:`mpevent.api.daemon`).

``serve`` runs the daemon. ``listen`` binds a datagram socket and prints the
notifications that arrive. ``demo`` runs :mod:`mpevent.tools.demo`. Every other
subcommand is one MI call:

==============================================  ==========================
``publish EVENT...``                            ``event_publish``
``subscribe EVENT SOCKET [EXPIRE]``             ``event_subscribe``
``unsubscribe EVENT SOCKET``                    ``event_subscribe`` expire 0
``events``                                      ``events_list``
``subscribers [EVENT [SOCKET]]``                ``subscribers_list``
``raise EVENT [KEY=VALUE ...]``                 ``raise_event``
``stats [NAME ...] [--watch [SECONDS]]``        ``get_statistics``
``ps``                                          ``ps``
``version`` (and ``--version``)                 ``version``
==============================================  ==========================

(The calls use the names OpenSIPS 3 and 4 both answer; ``subscribe`` and
``unsubscribe`` also ask ``subscribers_list``, to say whether a subscription
was refreshed, or was not there to remove.)

The MI address comes from ``--mi``, else ``$MPEVENT_MI``, else the default
hub's UNIX socket (``$XDG_RUNTIME_DIR/mpevent/mpevent.sock``) if it exists,
else ``udp:127.0.0.1:8080``. ``--json`` prints the hub's MI result unchanged
(the OpenSIPS shapes) instead of a table.

Exit codes scripts can rely on: 0 success, 1 the hub answered with an error
(``error CODE: MESSAGE`` on stderr), 2 usage or configuration error (bad
arguments, a bad destination or MI address, a socket ``listen`` cannot bind),
3 no hub answered. ``serve`` keeps its own codes (see :mod:`mpevent.api.daemon`).

The package is in three parts: :mod:`~mpevent.tools.cli.text` (pure: picking
the address, ``KEY=VALUE`` parsing, tables, formatting; tested without
processes), :mod:`~mpevent.tools.cli.commands` (each subcommand's I/O) and
:mod:`~mpevent.tools.cli.parser` (the options, ``main`` and its exit codes).
"""

from mpevent.tools.cli.parser import main

__all__ = ["main"]
