"""Benchmark: mpevent side by side with the other ways to get events out of workers.

Run with ``python -m mpevent.tools.bench`` or ``mpevent bench`` (``--quick``
for a CI smoke run under a minute, ``--json [FILE]`` for the figures as
JSON, ``--plot FILE.png`` for a chart). Everything is measured in the same
run, with the same payload, and reported as ratios too: the machine is
shared and noisy, so cases are interleaved in rounds (in a shuffled order
per round) and drift hits them all alike. All traffic stays on 127.0.0.1.
The CPU time the rest of the machine used meanwhile is printed per section
(and kept per run in the JSON): on a shared 2-core machine it explains most
of the spread between runs.

One module per section, each with the processes it runs:

* :mod:`.cost` 1. producer cost per call, against inline ``sendto``,
  ``orjson.dumps`` alone, a pyzmq PUSH ``send``, a put for a sender thread
  and queue puts; ``raise_event`` on each fast path and with every lane owned;
* :mod:`.e2e` 2. end to end: delivered events/s, against queue, pyzmq and
  sender-thread pipelines and a bare ``sendto`` loop, and the CPU per
  delivered event;
* :mod:`.fanout` 3. fan-out to 1, 8 and 64 subscribers;
* :mod:`.latency` 4. raise-to-receive latency at 10, 50 and 90 % of capacity;
* :mod:`.memory` 5. peak RSS and USS per process and role, the segment's size.
* :mod:`.transports` 6. tcp: and rabbitmq: delivered/s and CPU per event against each
  one's raw loop (a bare send loop; pika's publish loop with confirms), and the producer's
  cost per subscriber kind.

and around them: :mod:`.config` (the payload and how much a run does),
:mod:`.extras` (the optional pipelines and mpevent's fast paths a run
has), :mod:`.bodies` (what the child processes run), :mod:`.plumbing`
(spawning and always reaping children, starting them together, sink
sockets, pyzmq sockets), :mod:`.cpu` (CPU accounting of the machine and
the processes), :mod:`.report` (targets, printed tables, JSON),
:mod:`.plot` (the chart) and :mod:`.runner` (options and entry points).
The statistics and table helpers are :mod:`mpevent.tools.figures`'s.

The optional pipelines and the chart need ``pip install 'mpevent[bench]'``
(faster-fifo, pyzmq, matplotlib); without them those parts are skipped
with a note. The compiled and the pure-Python fast paths run side by side
when the extension is built (``mpevent.COMPILED``, printed in the header).
"""

from mpevent.tools.bench.runner import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
