"""The SIP-like prefork proxy against a real ``mpevent serve``, and the demo end to end.

The proxy runs in-process (``SipProxy`` forks its children from the test
process) against the ``daemon`` fixture; requests come from loopback
sockets, events are caught by the conftest sinks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from support import wait_for

from mpevent.shm.segment import SHM_DIR, Segment
from mpevent.workers.sip import parse_request
from mpevent.workers.sipproxy import SipProxy

ROOT = Path(__file__).resolve().parent.parent


def sip_request(n: int = 1, method: str = "INVITE", ip: str = "127.0.0.1", port: int = 5062):
    return (
        f"{method} sip:bob@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK-{n}\r\n"
        f"From: <sip:alice@{ip}>;tag={n}\r\n"
        "To: <sip:bob@127.0.0.1>\r\n"
        f"Call-ID: call-{n}@{ip}\r\n"
        f"CSeq: {n} {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class Client:
    """A UDP socket on one loopback address that talks to the proxy."""

    def __init__(self, target: tuple[str, int], ip: str = "127.0.0.1"):
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.sock.settimeout(5.0)
        self.ip, self.port = self.sock.getsockname()

    def ask(self, data: bytes) -> str:
        self.sock.sendto(data, self.target)
        return self.sock.recv(65535).decode()

    def request(self, n: int = 1, method: str = "INVITE") -> str:
        return self.ask(sip_request(n, method, self.ip, self.port))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def proxy(daemon) -> Iterator[SipProxy]:
    with SipProxy(daemon.name, workers=3, port=0, pike_limit=10, pike_window=3600.0) as p:
        yield p


@pytest.fixture
def client(proxy: SipProxy) -> Iterator[Client]:
    c = Client(proxy.address)
    yield c
    c.close()


def test_replies_200_with_the_request_headers_and_400_to_garbage(client: Client) -> None:
    reply = client.request(7, "OPTIONS")
    lines = reply.split("\r\n")
    assert lines[0] == "SIP/2.0 200 OK"
    assert f"Via: SIP/2.0/UDP 127.0.0.1:{client.port};branch=z9hG4bK-7" in lines
    assert "Call-ID: call-7@127.0.0.1" in lines
    assert "CSeq: 7 OPTIONS" in lines
    assert client.ask(b"hello there\r\n\r\n").startswith("SIP/2.0 400 Bad Request\r\n")
    # A request line that is fine but a missing Call-ID: still a 400.
    broken = sip_request(8).replace(b"Call-ID: call-8@127.0.0.1\r\n", b"")
    assert client.ask(broken).startswith("SIP/2.0 400 ")
    assert client.request(9).startswith("SIP/2.0 200 OK")  # the worker survived


def test_parse_request_names_the_problem() -> None:
    req = parse_request(sip_request(3, "REGISTER"))
    assert (req.method, req.ruri, req.call_id, req.cseq) == (
        "REGISTER",
        "sip:bob@127.0.0.1",
        "call-3@127.0.0.1",
        "3 REGISTER",
    )
    with pytest.raises(ValueError, match="request URI"):
        parse_request(b"INVITE bob SIP/2.0\r\n\r\n")


def test_request_raises_e_sip_request(proxy: SipProxy, client: Client, udp_sink) -> None:
    proxy.connection.subscribe("E_SIP_REQUEST", udp_sink.address)
    before = time.monotonic_ns()
    assert client.request(42, "INVITE").startswith("SIP/2.0 200 OK")
    assert client.ask(b"garbage").startswith("SIP/2.0 400")  # no event for this one
    got = udp_sink.receive(1)
    assert len(got) == 1
    msg = orjson.loads(got[0])
    assert list(msg) == ["jsonrpc", "method", "params"]
    assert msg["method"] == "E_SIP_REQUEST"
    params = msg["params"]
    assert params["method"] == "INVITE"
    assert params["ruri"] == "sip:bob@127.0.0.1"
    assert params["from"] == "<sip:alice@127.0.0.1>;tag=42"
    assert params["call_id"] == "call-42@127.0.0.1"
    assert params["source"] == f"127.0.0.1:{client.port}"
    assert params["worker"] in range(proxy.workers)
    assert before <= params["t"] <= time.monotonic_ns()
    assert udp_sink.quiet() == []


def test_flooding_source_is_blocked_once_and_gets_403(proxy: SipProxy, udp_sink) -> None:
    proxy.connection.subscribe("E_PIKE_BLOCKED", udp_sink.address)
    flooder = Client(proxy.address, ip="127.0.0.66")
    calm = Client(proxy.address, ip="127.0.0.2")
    try:
        # One request at a time, so the shared count is exact: the limit is
        # 10 per window, the 11th and every later one are refused.
        codes = [flooder.request(n)[8:11] for n in range(30)]
        assert codes == ["200"] * 10 + ["403"] * 20
        assert calm.request(1).startswith("SIP/2.0 200 OK")  # pike is per source IP
    finally:
        flooder.close()
        calm.close()
    got = udp_sink.receive(1)
    assert len(got) == 1
    msg = orjson.loads(got[0])
    assert msg["method"] == "E_PIKE_BLOCKED"
    assert msg["params"]["ip"] == "127.0.0.66"
    assert isinstance(msg["params"]["t"], int)
    assert udp_sink.quiet() == []  # once, whichever children saw the rest


def test_each_forked_child_claims_its_own_lane(daemon) -> None:
    with SipProxy(daemon.name, workers=3, port=0) as proxy:
        children = set(proxy.pids)
        client = Client(proxy.address)
        seg = Segment.attach(daemon.name)
        try:

            def owners() -> dict[int, int]:
                found = {}
                for lane in range(seg.layout.geometry.lanes):
                    pid = seg.lane_owner(lane)
                    if pid is not None:
                        found[pid] = lane
                return found

            def all_children_raised() -> bool:
                # The kernel picks the child that gets a datagram; keep asking
                # until every child has raised once (and so claimed a lane).
                for n in range(10):
                    assert client.request(n).startswith("SIP/2.0 200 OK")
                return children <= set(owners())

            assert wait_for(all_children_raised, timeout=15, interval=0)
            found = owners()
            lanes = {found[pid] for pid in children}
            assert len(lanes) == len(children)  # one lane per child
            assert os.getpid() not in found  # the master never raised
            stats = proxy.connection.stats()
            assert stats["events"]["E_SIP_REQUEST"]["no_subscriber"] >= len(children)
        finally:
            seg.close()
            client.close()


def test_dead_child_is_respawned(proxy: SipProxy, client: Client) -> None:
    victim = next(iter(proxy.pids))
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: proxy.reap() or victim not in proxy.pids)
    assert len(proxy.pids) == proxy.workers and victim not in proxy.pids
    assert proxy.respawned == 1
    for n in range(6):  # the new child answers along with the others
        assert client.request(n).startswith("SIP/2.0 200 OK")


def test_demo_runs_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # tmp_path is too deep for a socket path: the demo falls back to /tmp.
    before = set(Path("/tmp").glob("mpevent-demo-*"))
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("XDG_RUNTIME_DIR", None)  # the demo sets its own for the hub
    done = subprocess.run(
        [sys.executable, "-m", "mpevent.tools.demo", "--seconds", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = done.stdout
    assert done.returncode == 0, f"demo exited {done.returncode}\n{out}\n{done.stderr}"
    assert "summary" in out
    for needle in ("raised", "enqueued", "delivered", "events/s", "p50", "p99", "pike blocks"):
        assert needle in out
    assert "OK: all" in out
    assert not list(SHM_DIR.glob("mpevent-demo-*"))
    assert not list(tmp_path.iterdir())  # its temporary directories are gone
    assert set(Path("/tmp").glob("mpevent-demo-*")) <= before
