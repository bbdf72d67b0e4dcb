"""``mpevent listen tcp:HOST:PORT``: a stream consumer, as an event_stream peer.

It accepts connections, splits each stream into JSON texts, prints them as
``listen`` prints datagrams, and answers requests ``"OK"``, so that a
reliable ``tcp:`` destination counts what it delivered as sent.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import orjson
import pytest
from support import running
from test_stream_endpoint import adds_up, batch_of, bodies, drive, endpoint, stats_for, tcp

from mpevent.processes.sender.mmsg import Outbox
from mpevent.shm.layout import Geometry
from mpevent.shm.segment import Segment
from mpevent.system import free_port
from mpevent.tools import cli
from mpevent.tools.cli.text import UsageError, listen_destination, stream_reply

NOTE_A = b'{"jsonrpc":"2.0","method":"E_A","params":{"ip":"1.2.3.4"}}'
NOTE_B = b'{"jsonrpc":"2.0","method":"E_B","params":["}\\"{"]}'
REQUEST = b'{"jsonrpc":"2.0","method":"E_C","params":{"n":5},"id":7}'


@pytest.fixture
def seg() -> Iterator[Segment]:
    segment = Segment.create(Geometry(lanes=1, lane_size=4096, max_events=4, max_subs=8, relays=0))
    yield segment
    segment.close()


def start_listen(*argv: str) -> tuple[subprocess.Popen, int]:
    port = free_port(socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpevent", "listen", f"tcp:127.0.0.1:{port}", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return proc, port


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)
    return sock


def test_listen_tcp_prints_each_text_and_answers_requests() -> None:
    proc, port = start_listen("--count=3", "--raw")
    with running(proc):
        assert f"listening on tcp:127.0.0.1:{port}".encode() in proc.stderr.readline()
        with connect(port) as sock:
            sock.sendall(NOTE_A + NOTE_B + b"\n " + REQUEST[:20])  # coalesced, then split
            time.sleep(0.1)
            sock.sendall(REQUEST[20:])
            reply = sock.recv(1000)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out == NOTE_A + b"\n" + NOTE_B + b"\n" + REQUEST + b"\n"
    assert orjson.loads(reply) == {"jsonrpc": "2.0", "result": "OK", "id": 7}


def test_listen_tcp_serves_several_connections_and_survives_a_bad_one() -> None:
    proc, port = start_listen()
    with running(proc):
        assert b"listening on" in proc.stderr.readline()
        with connect(port) as bad, connect(port) as good:
            bad.sendall(b"not json\n")
            assert b"closed" in proc.stderr.readline()  # that connection only
            assert bad.recv(100) == b""
            good.sendall(NOTE_A)
            line = proc.stdout.readline().decode()
            assert line.rstrip("\n").endswith(" E_A ip=1.2.3.4")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and b"Traceback" not in err
    assert out == b""


def test_a_reliable_destination_counts_what_listen_received_as_sent(seg, capsys) -> None:
    port = free_port(socket.SOCK_STREAM)
    codes = []
    thread = threading.Thread(
        target=lambda: codes.append(cli.main(["listen", f"tcp:127.0.0.1:{port}", "--count=25"]))
    )
    thread.start()
    ep = endpoint(tcp(port, reliable=True))  # refused until listen binds: it retries
    st = stats_for(seg)
    try:
        batch, _ = batch_of(Outbox(), bodies(25))
        ep.send(batch, range(25), st)
        drive(ep, lambda: st.sent == 25)
        thread.join(10)
    finally:
        ep.close()
        if thread.is_alive():  # unblock it: 25 texts end --count 25
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"{}" * 25)
            thread.join(10)
    assert codes == [0]
    assert (st.sent, st.failed, st.pending) == (25, 0, 0) and adds_up(st)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 25 and all(" E_TEST n=0000" in line for line in lines)
    assert [line.split(" n=")[1].split()[0] for line in lines] == [f"{i:06d}" for i in range(25)]


def test_stream_reply_answers_requests_only() -> None:
    assert stream_reply(REQUEST) == b'{"jsonrpc":"2.0","result":"OK","id":7}'
    assert (
        stream_reply(b'{"method":"E","id":"abc"}') == b'{"jsonrpc":"2.0","result":"OK","id":"abc"}'
    )
    assert stream_reply(NOTE_A) is None
    assert stream_reply(b'{"result":"OK","id":7}') is None  # a reply is not answered
    assert stream_reply(b"[1]") is None and stream_reply(b"{bad") is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("tcp:127.0.0.1:9000/METHOD", "without METHOD or options"),
        ("tcp:127.0.0.1:9000;reliable", "without METHOD or options"),
        ("rabbitmq:127.0.0.1/key", "only on udp:, unix: or tcp:"),
        ("tcp:127.0.0.1:0", "out of range"),
    ],
)
def test_listen_refuses_what_it_cannot_listen_on(capsys, text: str, problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        listen_destination(text)
    assert cli.main(["listen", text]) == 2
    assert problem in capsys.readouterr().err


def test_listen_tcp_refuses_a_port_in_use(capsys) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["listen", f"tcp:127.0.0.1:{port}", "--count=1"]) == 2
    assert f"cannot listen on tcp:127.0.0.1:{port}" in capsys.readouterr().err
