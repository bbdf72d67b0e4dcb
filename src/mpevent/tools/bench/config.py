"""What a benchmark run does: the workload every case shares and how much of it.

:data:`PARAMS` is the one payload of every case and pipeline (and
:data:`DATAGRAM` its notification, what the bare loop sends); a
:class:`Config` says how many rounds, calls and events each section runs,
and :data:`CONFIGS` holds the three sizes (``full``, ``--quick``, and the
test suite's ``smoke``). The pipelines' names and labels are here so the
sections, the report and the chart spell them alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

EVENT = "E_SIP_REQUEST"
PARAMS = {"method": "INVITE", "from": "sip:alice@example.com", "source": "127.0.0.1:5060", "seq": 0}
DATAGRAM = orjson.dumps({"jsonrpc": "2.0", "method": EVENT, "params": PARAMS})
EVENT_BYTES = EVENT.encode()  # how a pyzmq producer names the event in its message


@dataclass(frozen=True)
class Config:
    """How much of everything one run does."""

    mode: str
    cost_rounds: int  # rounds of the producer-cost cases
    cost_sample: int  # timed calls per case per round
    e2e_rounds: int
    e2e_events: int  # events per end-to-end run (split between the producers)
    fanout_rounds: int
    fanout_datagrams: int  # datagrams per fan-out run (events = this / subscribers)
    latency_rounds: int
    latency_seconds: float  # per load level
    capacity_events: int  # events of the capacity run before the latency runs
    idle_timeout: float  # a sink that receives nothing this long stops counting
    e2e_producers: tuple[int, ...] = (1, 2, 4)
    e2e_senders: tuple[int, ...] = (1, 2)
    cost_subscribers: tuple[int, ...] = (0, 1, 8, 64)
    fanout_subscribers: tuple[int, ...] = (1, 8, 64)
    latency_loads: tuple[float, ...] = (0.1, 0.5, 0.9)
    run_timeout: float = 300.0
    transport_rounds: int = 3  # section 6: rounds of each transport's runs
    tcp_events: int = 500_000  # events per tcp: run (mpevent and the bare loop)
    broker_events: int = 100_000  # events per rabbitmq: run (mpevent and pika's loop)


CONFIGS = {
    "full": Config(
        mode="full",
        cost_rounds=150,
        cost_sample=200,
        e2e_rounds=3,
        e2e_events=120_000,
        fanout_rounds=3,
        fanout_datagrams=240_000,
        latency_rounds=2,
        latency_seconds=3.0,
        capacity_events=120_000,
        idle_timeout=2.0,
    ),
    "quick": Config(
        mode="quick",
        cost_rounds=20,
        cost_sample=200,
        e2e_rounds=1,
        e2e_events=12_000,
        fanout_rounds=1,
        fanout_datagrams=24_000,
        latency_rounds=1,
        latency_seconds=1.0,
        capacity_events=24_000,
        idle_timeout=1.0,
        run_timeout=60.0,
        transport_rounds=1,
        tcp_events=50_000,
        broker_events=10_000,
    ),
    # A few seconds: every section and case, tiny counts (the test suite's smoke test).
    "smoke": Config(
        mode="smoke",
        cost_rounds=3,
        cost_sample=20,
        e2e_rounds=1,
        e2e_events=400,
        fanout_rounds=1,
        fanout_datagrams=640,
        latency_rounds=1,
        latency_seconds=0.15,
        capacity_events=1000,
        idle_timeout=1.0,
        run_timeout=30.0,
        transport_rounds=1,
        tcp_events=2000,
        broker_events=500,
    ),
}

SECTIONS = ("cost", "e2e", "fanout", "latency", "transports")
# "mpevent" is the default fast path (compiled when the extension is built,
# mpevent.COMPILED); "mpevent_pure" the pure-Python path beside it, run only
# when the default is the compiled one.
PURE = "_pure"  # the suffix of the pure path's cases and pipeline, beside the default's
PIPELINES = ("mpevent", f"mpevent{PURE}", "pyzmq", "thread", "mp_queue", "faster_fifo")
THREAD_SENDERS = 0  # the "senders" of the thread pipeline: none apart, one thread per producer
PIPELINE_LABELS = {
    "mpevent": "mpevent",
    "mpevent_pure": "mpevent, pure path",
    "pyzmq": "pyzmq PUSH/PULL",
    "thread": "sender thread per producer",
    "mp_queue": "multiprocessing.Queue",
    "faster_fifo": "faster_fifo.Queue",
    "bare": "bare sendto loop",
    "bare_connected": "bare send loop (connected)",
    # section 6, transports (its own labels, longer, are in transports.LABELS)
    "mpevent_tcp": "mpevent, tcp:",
    "bare_tcp": "bare sendall loop, tcp:",
    "mpevent_rabbitmq": "mpevent, rabbitmq:",
    "pika_select": "pika SelectConnection loop",
}
