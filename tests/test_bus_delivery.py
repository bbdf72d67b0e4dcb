"""What is sent and what is refused: batches that mix events and destinations
arrive in order (with sendmmsg and without), a raise with no subscriber
returns at the probe, bad params and datagrams over the limit are refused
and counted.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
from support import (
    backlogs_empty,
    check_accounting,
    check_stream,
    destination_stats,
    drained,
    raise_retrying,
    sender_processes,
    wait_for,
)

from mpevent import (
    MAX_DATAGRAM,
    DatagramTooLarge,
    EventBus,
    PayloadError,
    UnknownEvent,
    encode_notification,
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("batched", [True, False], ids=["sendmmsg", "one-send-per-datagram"])
def test_mixed_events_to_mixed_destinations_arrive_in_order(
    batched: bool, monkeypatch, udp_sink, unix_sink
) -> None:
    """Batches whose messages go to different destinations (one packing per
    destination), events without params, a UNIX receiver whose tiny queue
    sends part of each batch through the backlog; with sendmmsg and with the
    one-by-one fallback of C libraries without it (the senders start in
    fresh interpreters: the switch reaches them through the environment)."""
    if batched:
        monkeypatch.delenv("MPEVENT_NO_SENDMMSG", raising=False)
    else:
        monkeypatch.setenv("MPEVENT_NO_SENDMMSG", "1")
    n = 3000
    unix_got: list[bytes] = []
    done = threading.Event()

    def read_unix() -> None:
        unix_sink.sock.settimeout(0.2)
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                unix_got.append(unix_sink.sock.recv(70000))

    reader = threading.Thread(target=read_unix)
    reader.start()
    try:
        with EventBus(lanes=2, backlog=100_000) as bus:
            for name in ("E_A", "E_B", "E_C"):
                bus.publish_event(name)
            bus.subscribe("E_A", udp_sink.address)
            bus.subscribe("E_A", unix_sink.address)
            bus.subscribe("E_B", udp_sink.address)
            bus.subscribe("E_C", unix_sink.address)
            bus.subscribe("E_C", udp_sink.address)
            (sender,) = sender_processes(bus, 1)
            switch = sender.environ().get("MPEVENT_NO_SENDMMSG")
            assert switch == (None if batched else "1"), "the switch did not reach the sender"
            expected: dict[str, list[bytes]] = {"E_A": [], "E_B": []}
            for i in range(n):
                name = ("E_A", "E_B", "E_C")[i % 3]
                params = None if name == "E_C" else {"seq": i}
                raise_retrying(bus.raise_event, name, params)
                if params:
                    expected[name].append(encode_notification(name, params))
            # E_C's datagrams are all alike (no params): count them.
            bare = encode_notification("E_C")
            udp_got = udp_sink.receive(n, timeout=20) + udp_sink.quiet(0.3)
            assert udp_got.count(bare) == n // 3
            check_stream([d for d in udp_got if d != bare], expected, "UDP", udp_sink)
            wait_for(lambda: len(unix_got) >= 2 * n // 3, timeout=30)
            time.sleep(0.3)
            assert unix_got.count(bare) == n // 3
            unix_rest = [d for d in unix_got if d != bare]
            check_stream(unix_rest, {"E_A": expected["E_A"]}, "UNIX")
            assert wait_for(lambda: drained(bus) and backlogs_empty(bus)), bus.stats()
            stats = bus.stats()
            check_accounting(stats)
            unix_row = destination_stats(bus, "E_A", unix_sink.address)
            assert unix_row["sent"] == n // 3 and unix_row["dropped"] == 0, unix_row
    finally:
        done.set()
        reader.join()


# --- no subscriber, bad input, the datagram limit -------------------------------------------------


@pytest.mark.timeout(60)
def test_no_subscriber_and_bad_input(udp_sink) -> None:
    with EventBus() as bus:
        bus.publish_event("E_NOBODY")
        bus.publish_event("E_BAD")
        for _ in range(3):
            assert bus.raise_event("E_NOBODY", {"a": 1}) is False
        with pytest.raises(UnknownEvent):
            bus.raise_event("E_NEVER_PUBLISHED", {"a": 1})
        assert issubclass(UnknownEvent, ValueError)

        bus.subscribe("E_BAD", udp_sink.address)
        for bad in (42, "a string", {"x": object()}, {1: "non-str key"}):
            with pytest.raises(TypeError):
                bus.raise_event("E_BAD", bad)
        with pytest.raises(PayloadError):  # JSON has no NaN
            bus.raise_event("E_BAD", {"x": float("nan")})
        with pytest.raises(DatagramTooLarge) as info:
            bus.raise_event("E_BAD", {"x": "y" * 70_000})
        assert isinstance(info.value, ValueError)

        # Exactly at the limit goes out whole; one byte more is refused.
        room = MAX_DATAGRAM - len(encode_notification("E_BAD", {"x": ""}))
        fits = {"x": "y" * room}
        assert len(encode_notification("E_BAD", fits)) == MAX_DATAGRAM
        assert bus.raise_event("E_BAD", fits)
        with pytest.raises(DatagramTooLarge):
            bus.raise_event("E_BAD", {"x": "y" * (room + 1)})
        assert bus.raise_event("E_BAD", {"ok": 1})  # a fence: everything before it was sent

        got = udp_sink.receive(2) + udp_sink.quiet()
        assert got == [encode_notification("E_BAD", fits), encode_notification("E_BAD", {"ok": 1})]
        assert wait_for(lambda: drained(bus) and backlogs_empty(bus)), bus.stats()
        stats = bus.stats()
        check_accounting(stats)
        nobody = stats["events"]["E_NOBODY"]
        assert nobody["no_subscriber"] == 3, nobody
        assert nobody["raised"] == nobody["enqueued"] == nobody["dispatched"] == 0, nobody
        bad = stats["events"]["E_BAD"]
        assert bad["rejected"] == 7 and bad["oversize"] == 2, bad
        assert bad["enqueued"] == bad["dispatched"] == 2, bad
        assert bad["raised"] == 9 and bad["dropped"] == 0, bad  # the 9 calls above
        assert bad["send_oversize"] == 0, bad
        row = destination_stats(bus, "E_BAD", udp_sink.address)
        assert row["routed"] == row["sent"] == 2, row
        assert row["bytes"] == sum(len(d) for d in got), row
