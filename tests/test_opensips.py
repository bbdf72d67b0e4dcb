"""The ``opensips`` package from PyPI, unchanged, against a real ``mpevent serve``.

Existing OpenSIPS tools must work against mpevent as they are: its MI
clients (datagram over UDP and UNIX, HTTP), its event handler (which
subscribes a UDP or UNIX datagram socket through the MI and dispatches the
notifications to callbacks) and its two commands, ``opensips-mi`` and
``opensips-event``. Every socket the package opens here is on 127.0.0.1
(its event handler binds 0.0.0.0 unless told otherwise, and then subscribes
a non-loopback address).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support import OPENSIPS_MI_METHODS, running, wait_for

import mpevent

opensips_mi = pytest.importorskip("opensips.mi")
opensips_event = pytest.importorskip("opensips.event")
OpenSIPSMI = opensips_mi.OpenSIPSMI
OpenSIPSMIException = opensips_mi.OpenSIPSMIException
OpenSIPSEventHandler = opensips_event.OpenSIPSEventHandler

BIN = Path(sys.executable).parent


def make_mi(daemon, kind: str):
    """An OpenSIPSMI for one of the daemon's MI listeners (default 0.1 s datagram timeout)."""
    if kind == "udp":
        return OpenSIPSMI(conn="datagram", datagram_ip="127.0.0.1", datagram_port=daemon.udp_port)
    if kind == "unix":
        return OpenSIPSMI(conn="datagram", datagram_unix_socket=str(daemon.unix_path))
    return OpenSIPSMI(conn="http", url=daemon.http)


def subscribers(daemon, event: str = "E_TEST") -> list[dict[str, Any]]:
    return daemon.mi("subscribers_list", [event])["Event"]["Subscribers"]


# -- OpenSIPSMI -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["udp", "unix", "http"])
def test_mi_client(daemon, udp_sink, kind):
    mi = make_mi(daemon, kind)
    assert set(mi.execute("which", [])) >= OPENSIPS_MI_METHODS
    assert mi.execute("events_list", []) == {"Events": []}
    daemon.mi("event_publish", ["E_TEST"])
    assert mi.execute("events_list") == {"Events": [{"name": "E_TEST", "id": 0}]}
    # Its default timeout is 0.1 s: the hub must answer every time well within it.
    for _ in range(20):
        assert mi.execute("version", [])["Server"].startswith("mpevent ")
    assert mi.execute("event_subscribe", ["E_TEST", udp_sink.address, 30]) == "OK"
    listed = mi.execute("subscribers_list", {"event": "E_TEST", "socket": udp_sink.address})
    assert listed["Event"]["Subscriber"]["expire"] == 30
    assert (
        mi.execute("raise_event", {"event": "E_TEST", "params": json.dumps({"kind": kind})}) == "OK"
    )
    expected = b'{"jsonrpc":"2.0","method":"E_TEST","params":{"kind":"%s"}}' % kind.encode()
    assert udp_sink.receive(1) == [expected]
    assert "mpevent:raised" in mi.execute("get_statistics", {"statistics": ["mpevent:"]})
    assert mi.execute("event_subscribe", ["E_TEST", udp_sink.address, 0]) == "OK"
    with pytest.raises(OpenSIPSMIException, match="-32601"):
        mi.execute("no_such_command", [])
    with pytest.raises(OpenSIPSMIException, match="480"):
        mi.execute("raise_event", ["E_TEST"])
    with pytest.raises(OpenSIPSMIException, match="404"):
        mi.execute("raise_event", ["E_NOPE"])


@pytest.mark.parametrize("kind", ["udp", "unix", "http"])
def test_mi_client_with_the_opensips_4_names(daemon, udp_sink, kind):
    """OpenSIPS 4 namespaces its MI commands (evi:, statistics:, core:) and keeps
    the old names as aliases: a client of either era gets the same answers."""
    mi = make_mi(daemon, kind)
    which = mi.execute("core:which", [])
    assert which == mi.execute("which", []) and set(which) >= OPENSIPS_MI_METHODS
    assert mi.execute("evi:publish", ["E_TEST"]) == {"name": "E_TEST", "id": 0}
    assert mi.execute("evi:list", []) == {"Events": [{"name": "E_TEST", "id": 0}]}
    assert mi.execute("evi:subscribe", ["E_TEST", udp_sink.address, 30]) == "OK"
    listed = mi.execute("evi:subscribers", {"event": "E_TEST", "socket": udp_sink.address})
    assert listed["Event"]["Subscriber"]["expire"] == 30
    assert listed == mi.execute("subscribers_list", ["E_TEST", udp_sink.address])
    params = json.dumps({"kind": kind})
    assert mi.execute("evi:raise", {"event": "E_TEST", "params": params}) == "OK"
    expected = b'{"jsonrpc":"2.0","method":"E_TEST","params":{"kind":"%s"}}' % kind.encode()
    assert udp_sink.receive(1) == [expected]
    sent = f"destination:E_TEST@{udp_sink.address}.sent"
    assert wait_for(lambda: mi.execute("statistics:get", [[sent]]).get(sent) == 1)
    assert mi.execute("statistics:list", [["mpevent:raised"]]) == {
        "mpevent:raised": "non-incremental"
    }
    assert mi.execute("statistics:reset", [["mpevent:raised"]]) == "OK"
    assert mi.execute("get_statistics", [["mpevent:raised"]]) == {"mpevent:raised": 0}
    assert mi.execute("statistics:reset_all", []) == "OK"
    assert mi.execute("statistics:get", [[sent]]) == {sent: 0}
    assert mi.execute("core:version", [])["Server"].startswith("mpevent ")
    assert "Up time" in mi.execute("core:uptime", [])
    assert mi.execute("core:ps", [])["Processes"][0]["PID"] == daemon.proc.pid
    assert mi.execute("evi:subscribe", ["E_TEST", udp_sink.address, 0]) == "OK"
    with pytest.raises(OpenSIPSMIException, match="480"):
        mi.execute("evi:raise", ["E_TEST"])
    with pytest.raises(OpenSIPSMIException, match="404"):
        mi.execute("evi:raise", ["E_NOPE"])


# -- OpenSIPSEventHandler -----------------------------------------------------------


def _collect(q: queue.Queue, count: int, timeout: float = 10.0) -> list[Any]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        try:
            got.append(q.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            break
    return got


def test_event_handler_udp(daemon):
    """UDP subscriber on 127.0.0.1, MI over UDP; two events share the handler's socket."""
    daemon.mi("event_publish", ["E_TEST"])
    daemon.mi("event_publish", ["E_OTHER"])
    handler = OpenSIPSEventHandler(make_mi(daemon, "udp"), "datagram", ip="127.0.0.1")
    test_q: queue.Queue = queue.Queue()
    other_q: queue.Queue = queue.Queue()
    ev = handler.subscribe("E_TEST", test_q.put)
    other = handler.subscribe("E_OTHER", other_q.put, expire=120)
    sock_name = ev.socket.sock_name
    assert sock_name.startswith("udp:127.0.0.1:")
    assert subscribers(daemon) == [{"socket": sock_name, "expire": 3600, "ttl": 3600}]
    assert [s["expire"] for s in subscribers(daemon, "E_OTHER")] == [120]

    assert daemon.mi("raise_event", ["E_TEST", '{"from": "mi", "n": 1}']) == "OK"
    assert daemon.mi("raise_event", {"event": "E_OTHER", "params": ["a", "b"]}) == "OK"
    with mpevent.connect(daemon.name) as producer:
        assert producer.raise_event("E_TEST", {"from": "producer", "n": 2}) is True
        assert producer.raise_event("E_TEST") is True
    got = _collect(test_q, 3)
    assert got == [
        {"jsonrpc": "2.0", "method": "E_TEST", "params": {"from": "mi", "n": 1}},
        {"jsonrpc": "2.0", "method": "E_TEST", "params": {"from": "producer", "n": 2}},
        {"jsonrpc": "2.0", "method": "E_TEST"},
    ]
    assert _collect(other_q, 1) == [{"jsonrpc": "2.0", "method": "E_OTHER", "params": ["a", "b"]}]

    handler.unsubscribe("E_TEST")
    assert subscribers(daemon) == []
    assert len(subscribers(daemon, "E_OTHER")) == 1
    other.unsubscribe()
    assert subscribers(daemon, "E_OTHER") == []
    assert ev.thread is None  # its reading thread is gone with the last event
    assert test_q.empty() and other_q.empty()


def test_event_handler_unix(daemon, tmp_path):
    """UNIX datagram subscriber; the handler's MI is the HTTP one this time."""
    daemon.mi("event_publish", ["E_TEST"])
    path = tmp_path / "events.sock"
    handler = OpenSIPSEventHandler(make_mi(daemon, "http"), "datagram", unix_path=str(path))
    got_q: queue.Queue = queue.Queue()
    try:
        ev = handler.subscribe("E_TEST", got_q.put, expire=60)
        assert ev.socket.sock_name == str(path)  # a bare path: mpevent reads it as unix:
        assert subscribers(daemon) == [{"socket": f"unix:{path}", "expire": 60, "ttl": 60}]
        assert daemon.mi("raise_event", ["E_TEST", '{"via": "mi"}']) == "OK"
        with mpevent.connect(daemon.name) as producer:
            assert producer.raise_event("E_TEST", {"via": "producer", "text": 'é\n"x"'})
        assert _collect(got_q, 2) == [
            {"jsonrpc": "2.0", "method": "E_TEST", "params": {"via": "mi"}},
            {"jsonrpc": "2.0", "method": "E_TEST", "params": {"via": "producer", "text": 'é\n"x"'}},
        ]
        ev.unsubscribe()
        assert subscribers(daemon) == []
    finally:
        path.unlink(missing_ok=True)  # the package closes its socket but leaves the file


# -- the commands ---------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSIPS_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_all(cmds: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run the commands at once (each starts a Python); return their results in order."""
    procs = [
        subprocess.Popen(
            cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd in cmds
    ]
    out = []
    for cmd, proc in zip(cmds, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=30)
        out.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    return out


def test_opensips_mi_command(daemon, tmp_path, udp_sink):
    daemon.mi("event_publish", ["E_TEST"])
    mi_cmd = str(BIN / "opensips-mi")
    targets = {
        "udp": ["-t", "datagram", "-i", "127.0.0.1", "-p", str(daemon.udp_port)],
        "unix": ["-t", "datagram", "-ds", str(daemon.unix_path)],
        "http": ["-t", "http", "-i", "127.0.0.1", "-p", str(daemon.http_port)],
    }
    cmds = []
    for target in targets.values():
        cmds += [[mi_cmd, *target, "which"], [mi_cmd, *target, "events_list"]]
    for res in _run_all(cmds, tmp_path):
        assert res.returncode == 0, (res.args, res.stdout, res.stderr)
        printed = json.loads(res.stdout)
        if res.args[-1] == "which":
            assert set(printed) >= OPENSIPS_MI_METHODS
        else:
            assert printed == {"Events": [{"name": "E_TEST", "id": 0}]}

    # Positional parameters arrive as strings, as from opensips-cli: "30" is an expire.
    udp = targets["udp"]
    [sub] = _run_all(
        [[mi_cmd, *udp, "event_subscribe", "E_TEST", udp_sink.address, "30"]], tmp_path
    )
    assert (sub.returncode, json.loads(sub.stdout)) == (0, "OK"), sub
    assert subscribers(daemon) == [{"socket": udp_sink.address, "expire": 30, "ttl": 30}]
    raised, stats, listed, bad = _run_all(
        [
            [mi_cmd, *targets["http"], "raise_event", "E_TEST", '{"cli": true}'],
            [mi_cmd, *udp, "-s", "mpevent:raised"],
            [mi_cmd, *targets["unix"], "-j", '{"event": "E_TEST"}', "subscribers_list"],
            [mi_cmd, *udp, "raise_event", "E_NOPE"],
        ],
        tmp_path,
    )
    assert (raised.returncode, json.loads(raised.stdout)) == (0, "OK"), raised
    assert udp_sink.receive(1) == [b'{"jsonrpc":"2.0","method":"E_TEST","params":{"cli":true}}']
    assert stats.returncode == 0 and "mpevent:raised" in json.loads(stats.stdout), stats
    assert json.loads(listed.stdout)["Event"]["Subscribers"][0]["socket"] == udp_sink.address
    assert bad.returncode == 1 and "404" in bad.stdout and "Event not registered" in bad.stdout


class _Output:
    """Reads a process's stdout in a thread; yields the JSON objects it printed."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self._lock:
                self.text += line

    def objects(self) -> list[Any]:
        with self._lock:
            text = self.text
        decoder, out, at = json.JSONDecoder(), [], 0
        while True:
            while at < len(text) and text[at].isspace():
                at += 1
            if at >= len(text):
                return out
            try:
                obj, at = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                return out  # an object still being printed
            out.append(obj)

    def join(self) -> None:
        self._thread.join(10)


@pytest.mark.parametrize(
    "target, sig",
    [("datagram", signal.SIGINT), ("http", signal.SIGTERM)],
)
def test_opensips_event_command(daemon, tmp_path, target, sig):
    daemon.mi("event_publish", ["E_TEST"])
    port = daemon.udp_port if target == "datagram" else daemon.http_port
    cmd = [str(BIN / "opensips-event"), "-t", target, "-i", "127.0.0.1", "-p", str(port)]
    cmd += ["-li", "127.0.0.1"]  # never the default 0.0.0.0
    if target == "http":
        cmd += ["-e", "30"]
    cmd.append("E_TEST")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    output = _Output(proc)
    with running(proc):
        listed = wait_for(lambda: subscribers(daemon), timeout=15, interval=0.05)
        assert listed, (
            f"opensips-event did not subscribe: {proc.stderr.read() if proc.poll() else ''}"
        )
        [sub] = listed
        assert sub["socket"].startswith("udp:127.0.0.1:")
        assert sub["expire"] == (30 if target == "http" else 3600)
        time.sleep(0.1)  # let it finish the subscribe call before it gets events
        for n in range(3):
            assert daemon.mi("raise_event", ["E_TEST", json.dumps({"n": n})]) == "OK"
        with mpevent.connect(daemon.name) as producer:
            assert producer.raise_event("E_TEST", ["from", "producer"]) is True
        printed = wait_for(lambda: len(output.objects()) >= 4 and output.objects(), timeout=10)
        assert printed == [
            {"jsonrpc": "2.0", "method": "E_TEST", "params": {"n": 0}},
            {"jsonrpc": "2.0", "method": "E_TEST", "params": {"n": 1}},
            {"jsonrpc": "2.0", "method": "E_TEST", "params": {"n": 2}},
            {"jsonrpc": "2.0", "method": "E_TEST", "params": ["from", "producer"]},
        ], output.text
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0, proc.stderr.read()
        output.join()
        assert subscribers(daemon) == []  # it unsubscribed on its way out
    assert daemon.proc.poll() is None
    assert daemon.mi("version")["Server"].startswith("mpevent ")
