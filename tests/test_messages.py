"""Messages that blame the right thing, and what the hub logs for an operator.

Issue 12, item 4: a request over the MI's size limit says so (its size and
the limit) on every transport, client side and hub side; ``connect()`` to a
segment whose hub was killed says no hub serves it and how to start one; a
listener address in use names the address and the setting that chose it; an
embedded bus's allow-list errors name ``EventBus``'s keywords. Then the log
lines of ``--log-level debug``: subscriptions added, refreshed, expired and
removed; senders started and started again; producers' lanes claimed and
reclaimed; reloads with what changed. Every check runs against a real
``mpevent serve`` or ``EventBus`` over real sockets.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from support import Daemon, Kids, UdpSink, wait_for

import mpevent
from mpevent.api import client as mi_client
from mpevent.api.client import MICallError, MIClient, MIHttpClient, RequestTooLarge
from mpevent.api.connect import NotServing
from mpevent.api.daemon import EXIT_FAILED, setting_origin
from mpevent.protocol import mi
from mpevent.shm.segment import shm_path
from mpevent.system import Supervised, free_port
from mpevent.tools import cli

BIG = "x" * 70_000  # a param that makes any request larger than mi.MAX_REQUEST


def _client(daemon: Daemon, transport: str) -> MIClient | MIHttpClient:
    address = getattr(daemon, transport)
    return (MIHttpClient if transport == "http" else MIClient)(address, timeout=5.0)


def _log_has(daemon: Daemon, text: str, timeout: float = 10.0) -> bool:
    return bool(wait_for(lambda: text in daemon.log(), timeout=timeout))


# -- 1. a request too large -------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "unix", "http"])
def test_a_request_too_large_says_so_with_its_size_and_the_limit(daemon: Daemon, transport):
    address = getattr(daemon, transport)
    call = _client(daemon, transport)
    started = time.monotonic()
    with pytest.raises(RequestTooLarge) as err:
        call.call("evi:raise", {"event": "E_X", "params": {"text": BIG}})
    assert time.monotonic() - started < 2.0  # refused at once, not after the timeout
    size = len(orjson.dumps({"text": BIG}))
    limit = 65507 if transport == "udp" else mi.MAX_REQUEST
    assert err.value.size > size and err.value.limit == limit
    assert err.value.code == mi.INVALID_REQUEST
    message = err.value.message
    assert f"request too large: {err.value.size} bytes" in message
    assert f"at most {limit} bytes" in message and address in message
    assert _client(daemon, transport).call("version")  # the hub was never bothered


def test_a_request_too_large_is_not_sent(tmp_path: Path):
    """Refused before anything goes out: the receiving sockets get nothing."""
    path = tmp_path / "fake-mi.sock"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
    ):
        unix.bind(str(path))
        udp.bind(("127.0.0.1", 0))
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        clients = [
            MIClient(f"unix:{path}", timeout=0.5),
            MIClient(f"udp:127.0.0.1:{udp.getsockname()[1]}", timeout=0.5),
            MIHttpClient(f"http://127.0.0.1:{tcp.getsockname()[1]}/mi", timeout=0.5),
        ]
        for mi_call in clients:
            with pytest.raises(RequestTooLarge):
                mi_call.call("evi:publish", [BIG])
        for sock in (unix, udp, tcp):
            sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            unix.recv(1)
        with pytest.raises(BlockingIOError):
            udp.recv(1)
        with pytest.raises(BlockingIOError):
            tcp.accept()
        # Just under the limit still goes out (over UNIX; the fake MI never answers).
        small = MIClient(f"unix:{path}", timeout=0.2)
        with pytest.raises(mi_client.MIUnavailable):
            small.call("evi:publish", ["x" * (mi.MAX_REQUEST - 100)])
        assert len(unix.recv(mi.MAX_REQUEST + 1)) <= mi.MAX_REQUEST
    path.unlink()


@pytest.mark.parametrize("transport", ["unix", "http"])
def test_the_hub_answers_a_request_too_large_with_its_size(monkeypatch, daemon, transport):
    """A client that does not check (another tool) gets the hub's answer, with
    the size, as an MI error: not a timeout (UNIX) nor a bare HTTP 413."""
    monkeypatch.setattr(mi_client, "MAX_REQUEST", 1 << 20)  # this client does not check
    call = _client(daemon, transport)
    request_size = len(orjson.dumps(mi_client._request("evi:publish", [BIG])))
    with pytest.raises(MICallError) as err:
        call.call("evi:publish", [BIG])
    assert not isinstance(err.value, RequestTooLarge)  # the hub said it
    assert err.value.code == mi.INVALID_REQUEST
    # Within a few bytes of ours: the request id's digits differ.
    size = int(err.value.message.split(": ")[1].split(" ")[0])
    assert abs(size - request_size) < 20
    assert err.value.message == f"Request too large: {size} bytes (max {mi.MAX_REQUEST} bytes)"
    assert _client(daemon, transport).call("version")


def test_the_hub_names_the_size_of_a_raw_oversized_datagram(daemon: Daemon):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("")
        sock.settimeout(5.0)
        sock.sendto(b"{" * 100_000, str(daemon.unix_path))
        reply = orjson.loads(sock.recv(65536))
    assert reply["id"] is None and reply["error"]["code"] == mi.INVALID_REQUEST
    assert reply["error"]["message"] == "Request too large: 100000 bytes (max 65536 bytes)"


def test_the_cli_says_the_request_is_too_large(capsys, daemon: Daemon):
    daemon.mi("evi:publish", ["E_X"])
    for address, limit in ((daemon.udp, 65507), (daemon.unix, 65536), (daemon.http, 65536)):
        params = orjson.dumps({"text": BIG}).decode()
        code = cli.main(["--mi", address, "raise", "E_X", "--json-params", params])
        _, err = capsys.readouterr()
        assert code == 1, err
        assert err.startswith("error -32600: request too large: ")
        assert f"at most {limit} bytes" in err
        assert "running there" not in err and "no MI answer" not in err


# -- 2. connect() to a segment whose hub was killed -------------------------------------


def test_connect_after_the_hub_was_killed_says_no_hub_serves_it(tmp_path: Path):
    daemon = Daemon(tmp_path)  # not the fixture: that one must stop cleanly
    name = daemon.name
    daemon.mi("evi:publish", ["E_X"])
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    try:
        assert shm_path(name).exists()  # a killed hub leaves its segment behind
        with pytest.raises(NotServing) as err:
            mpevent.connect(name, timeout=0.3)
        message = str(err.value)
        assert message.startswith(f"no hub serves segment {shm_path(name)}: its hub (pid ")
        assert "is gone" in message and f"`mpevent serve --name {name}`" in message
        assert "doorbell" not in message and "Errno" not in message
    finally:
        shm_path(name).unlink(missing_ok=True)
        daemon.unix_path.unlink(missing_ok=True)


def test_connect_to_no_segment_says_how_to_start_one():
    name = f"mpevent-test-{os.getpid()}-none"
    with pytest.raises(NotServing) as err:
        mpevent.connect(name, timeout=0.1)
    assert str(err.value) == (
        f"no hub serves segment {shm_path(name)}: there is no such segment; "
        f"start one with `mpevent serve --name {name}`"
    )


def test_connect_logs_attaching_and_once_that_the_hub_is_gone(
    caplog, daemon: Daemon, udp_sink: UdpSink
):
    daemon.mi("evi:publish", ["E_X"])
    daemon.mi("evi:subscribe", ["E_X", udp_sink.address])
    with (
        caplog.at_level(logging.DEBUG, logger="mpevent.connect"),
        mpevent.connect(daemon.name) as conn,
    ):
        assert conn.raise_event("E_X", {"n": 1})
        assert daemon.stop() == 0
        assert not any(conn.raise_event("E_X", {"n": 2}) for _ in range(50))
    attached = [r for r in caplog.records if r.getMessage().startswith("attached to segment")]
    assert len(attached) == 1 and attached[0].levelno == logging.DEBUG
    assert f"hub pid {daemon.proc.pid}" in attached[0].getMessage()
    gone = [r for r in caplog.records if r.getMessage().startswith("no hub serves segment")]
    assert len(gone) == 1 and gone[0].levelno == logging.WARNING, caplog.text
    assert f"mpevent serve --name {daemon.name}" in gone[0].getMessage()


# -- 3. a listener address in use -------------------------------------------------------


def _serve_once(tmp_path: Path, *args: str) -> tuple[int, str]:
    """``mpevent serve`` that is expected to fail at start: its exit code and log."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    name = f"mpevent-test-{os.getpid()}-inuse"
    done = subprocess.run(
        [sys.executable, "-m", "mpevent", "serve", "--name", name, *args],
        env=dict(os.environ, XDG_RUNTIME_DIR=str(run_dir)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stderr


def test_an_address_in_use_names_it_and_the_flag_or_key_that_chose_it(tmp_path: Path):
    unix = ("--mi-unix", str(tmp_path / "run" / "mi.sock"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        code, log = _serve_once(tmp_path, "--mi-udp", f"127.0.0.1:{port}", *unix)
        assert code == EXIT_FAILED, log
        assert (
            f"cannot listen for the MI on udp:127.0.0.1:{port} (set by --mi-udp): "
            "Address already in use"
        ) in log
        config = tmp_path / "mpevent.toml"
        config.write_text(f'[mi]\nudp = "127.0.0.1:{port}"\n')
        code, log = _serve_once(tmp_path, "--config", str(config), *unix)
        assert code == EXIT_FAILED, log
        assert f"udp:127.0.0.1:{port} (set by [mi] udp in {config})" in log
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        udp = ("--mi-udp", f"127.0.0.1:{free_port()}")
        code, log = _serve_once(tmp_path, "--mi-http", f"127.0.0.1:{port}", *udp, *unix)
        assert code == EXIT_FAILED, log
        assert f"http://127.0.0.1:{port}/mi (set by --mi-http): Address already in use" in log
    assert "Traceback" not in log


def test_setting_origin_names_flag_file_key_or_default(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text('[mi]\nudp = "127.0.0.1:9"\n')
    assert setting_origin("mi.udp", config, {"mi.udp": "127.0.0.1:1"}) == "set by --mi-udp"
    assert setting_origin("mi.udp", config, {"mi.udp": None}) == f"set by [mi] udp in {config}"
    assert setting_origin("mi.http", config, {}) == (
        "the default; choose another with [mi] http or --mi-http"
    )
    assert setting_origin("mi.unix", None, None).startswith("the default")


# -- 4. an embedded bus's allow-list names its keywords ---------------------------------


def test_embedded_allow_list_errors_name_the_eventbus_keywords(tmp_path: Path):
    with pytest.raises(ValueError, match=r"^EventBus\(allowed_networks=\[\.\.\.\]\): '300"):
        mpevent.EventBus(allowed_networks=["300.0.0.0/8"])
    with pytest.raises(ValueError, match=r"^EventBus\(unix_path_prefixes=\[\.\.\.\]\): 'rel"):
        mpevent.EventBus(unix_path_prefixes=["relative"])
    with mpevent.EventBus(unix_path_prefixes=[str(tmp_path / "ok")]) as bus:
        bus.publish_event("E_X")
        with pytest.raises(ValueError) as err:
            bus.subscribe("E_X", "udp:192.0.2.1:9000")
        assert "add its network to EventBus(allowed_networks=[...])" in str(err.value)
        with pytest.raises(ValueError) as err:
            bus.subscribe("E_X", f"unix:{tmp_path / 'elsewhere.sock'}")
        assert "add a prefix to EventBus(unix_path_prefixes=[...])" in str(err.value)
        for refused in ("udp:192.0.2.1:9000", f"unix:{tmp_path / 'elsewhere.sock'}"):
            with pytest.raises(ValueError) as err:
                bus.subscribe("E_X", refused)
            assert "security." not in str(err.value)


def test_the_daemon_still_names_its_configuration_keys(daemon: Daemon):
    daemon.mi("evi:publish", ["E_X"])
    with pytest.raises(MICallError) as err:
        daemon.mi("evi:subscribe", ["E_X", "udp:192.0.2.1:9000"])
    assert "add its network to security.allowed_networks" in err.value.message


# -- 5. what --log-level debug shows ----------------------------------------------------


def test_subscriptions_added_refreshed_expired_and_removed_are_logged(daemon: Daemon):
    daemon.mi("evi:publish", ["E_LOG"])
    assert _log_has(daemon, "INFO mpevent.hub")
    assert "event E_LOG published (id 0)" in daemon.log()
    port = free_port()
    sock = f"udp:127.0.0.1:{port}"
    daemon.mi("evi:subscribe", ["E_LOG", sock, 60])
    assert _log_has(daemon, f"INFO mpevent.hub[{daemon.proc.pid}]: subscribed {sock} to E_LOG")
    assert f"subscribed {sock} to E_LOG (expire 60 s)" in daemon.log()
    daemon.mi("evi:subscribe", ["E_LOG", f"udp:localhost:{port}", 1])  # the same socket
    assert _log_has(daemon, f"DEBUG mpevent.hub[{daemon.proc.pid}]: subscription refreshed: {sock}")
    assert _log_has(daemon, f"subscription expired: {sock} to E_LOG (expire 1 s)")
    daemon.mi("evi:subscribe", ["E_LOG", sock, 60])
    daemon.mi("evi:subscribe", ["E_LOG", sock, 0])
    assert _log_has(daemon, f"unsubscribed {sock} from E_LOG")
    assert daemon.log().count(f"subscribed {sock} to E_LOG") == 2  # each new one once


def test_sender_starts_and_respawns_are_logged(daemon: Daemon):
    [row] = [p for p in daemon.mi("core:ps")["Processes"] if p["Type"] == "sender 0"]
    assert _log_has(daemon, f"DEBUG mpevent.hub[{daemon.proc.pid}]: sender 0 started (pid ")
    os.kill(row["PID"], signal.SIGKILL)
    assert _log_has(daemon, "INFO mpevent.hub")
    assert _log_has(daemon, f"INFO mpevent.hub[{daemon.proc.pid}]: sender 0 started again (pid ")


def test_producer_lanes_claimed_and_reclaimed_are_logged(
    daemon: Daemon, kids: Kids, udp_sink: UdpSink
):
    daemon.mi("evi:publish", ["E_LANE"])
    daemon.mi("evi:subscribe", ["E_LANE", udp_sink.address])

    def producer() -> int:
        with mpevent.connect(daemon.name) as conn:
            ok = conn.raise_event("E_LANE", {"n": 1})
            time.sleep(1.0)  # the hub looks at lanes every 0.2 s
        return 0 if ok else 1

    pid = kids.fork(producer)
    assert kids.wait(pid) == 0
    assert udp_sink.receive(1)
    assert _log_has(daemon, f"claimed by producer {pid}")
    assert _log_has(daemon, f"of producer {pid}, now gone, reclaimed (0 uncounted)")
    assert f"producer {pid} of lane" in daemon.log()  # held until its sender drained it


def _start_serving(tmp_path: Path, config: Path) -> tuple[Supervised, Path, str]:
    """``mpevent serve --config`` alone: its log level from the file, unlike Daemon's."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    log = tmp_path / "serve.log"
    udp = f"udp:127.0.0.1:{free_port()}"
    args = [
        sys.executable, "-m", "mpevent", "serve", "--config", str(config),
        "--name", f"mpevent-test-{os.getpid()}-reload",
        "--mi-udp", udp.removeprefix("udp:"), "--mi-unix", str(run_dir / "mi.sock"),
    ]  # fmt: skip
    env = dict(os.environ, XDG_RUNTIME_DIR=str(run_dir))
    proc = Supervised("mpevent serve", args, env=env, log=log)

    def answers() -> bool:
        try:
            return bool(MIClient(udp, timeout=0.2).call("version"))
        except mi_client.MIUnavailable:
            return False

    assert wait_for(answers, timeout=20), log.read_text()
    return proc, log, udp


def test_a_reload_logs_what_changed(tmp_path: Path):
    port_a, port_b = free_port(), free_port()
    config = tmp_path / "mpevent.toml"
    config.write_text(
        'events = ["E_A", "E_OLD"]\n[log]\nlevel = "info"\n'
        f'[[subscribe]]\nevent = "E_A"\nsocket = "udp:127.0.0.1:{port_a}"\n'
    )
    proc, log, udp = _start_serving(tmp_path, config)
    try:
        assert "event E_A published (id 0)" in log.read_text()
        assert f"subscribed udp:127.0.0.1:{port_a} to E_A (permanent)" in log.read_text()
        config.write_text(
            'events = ["E_A", "E_NEW"]\n[log]\nlevel = "debug"\n'
            f'[[subscribe]]\nevent = "E_NEW"\nsocket = "udp:127.0.0.1:{port_b}"\n'
        )
        os.kill(proc.pid, signal.SIGHUP)
        reloaded = "SIGHUP: configuration reloaded"
        assert wait_for(lambda: reloaded in log.read_text()), log.read_text()
        text = log.read_text()
        [line] = [x for x in text.splitlines() if "SIGHUP: configuration reloaded" in x]
        assert "events published E_NEW" in line
        assert "events no longer configured (still published) E_OLD" in line
        assert f"permanent subscriptions added: E_NEW udp:127.0.0.1:{port_b}" in line
        assert f"permanent subscriptions removed: E_A udp:127.0.0.1:{port_a}" in line
        assert "SIGHUP: log level info -> debug" in text
        assert f"unsubscribed udp:127.0.0.1:{port_a} from E_A" in text
        # Debug lines now show: a refresh.
        MIClient(udp).call("evi:subscribe", ["E_A", f"udp:127.0.0.1:{port_a}", 60])
        MIClient(udp).call("evi:subscribe", ["E_A", f"udp:127.0.0.1:{port_a}", 60])
        assert wait_for(lambda: "DEBUG mpevent.hub" in log.read_text()), log.read_text()
        # Nothing changed: said so.
        os.kill(proc.pid, signal.SIGHUP)
        assert wait_for(lambda: "reloaded: nothing changed" in log.read_text()), log.read_text()
    finally:
        assert proc.stop(signal.SIGTERM, 30) == 0, log.read_text()
