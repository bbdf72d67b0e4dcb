"""The ``mpevent`` command: pure helpers without processes, subcommands against a real hub."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import Daemon, UdpSink, running, wait_for

from mpevent.api.client import MIClient, MIHttpClient
from mpevent.system import free_port
from mpevent.tools import cli
from mpevent.tools.cli import commands
from mpevent.tools.cli.text import (
    UsageError,
    event_rows,
    format_notification,
    format_timestamp,
    human_bytes,
    listen_destination,
    make_client,
    parse_json_params,
    parse_kv,
    parse_scalar,
    pick_mi_address,
    process_rows,
    stat_rates,
    subscriber_rows,
)
from mpevent.tools.figures import format_table

EXPECTED = b'{"jsonrpc":"2.0","method":"E_X","params":{"ip":"1.2.3.4","n":5}}'


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- pure helpers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("5", 5),
        ("-3", -3),
        ("0", 0),
        ("null", None),
        ("true", True),
        ("false", False),
        ("007", "007"),
        ("-0", "-0"),
        ("1.5", "1.5"),
        ("1e3", "1e3"),
        (" 5", " 5"),
        ("True", "True"),
        ("None", "None"),
        ("", ""),
        ("1.2.3.4", "1.2.3.4"),
        ('"quoted"', '"quoted"'),
        ("[1,2]", "[1,2]"),
        (str(2**70), str(2**70)),
        ("héllo", "héllo"),
    ],
)
def test_parse_scalar(text, value):
    got = parse_scalar(text)
    assert got == value and type(got) is type(value)


def test_parse_kv_keeps_order_and_splits_on_the_first_equals():
    assert parse_kv(["ip=1.2.3.4", "n=5", "expr=a=b", "empty=", "x=null"]) == {
        "ip": "1.2.3.4",
        "n": 5,
        "expr": "a=b",
        "empty": "",
        "x": None,
    }
    assert list(parse_kv(["z=1", "a=2"])) == ["z", "a"]
    assert parse_kv([]) == {}


@pytest.mark.parametrize(
    ("items", "problem"),
    [(["novalue"], "expected KEY=VALUE"), (["=v"], "empty key"), (["a=1", "a=2"], "twice")],
)
def test_parse_kv_rejects(items, problem):
    with pytest.raises(UsageError, match=problem):
        parse_kv(items)


def test_parse_json_params():
    assert parse_json_params('{"ip":"1.2.3.4","n":5}') == {"ip": "1.2.3.4", "n": 5}
    assert parse_json_params('["a", 1]') == ["a", 1]
    with pytest.raises(UsageError, match="not valid JSON"):
        parse_json_params("{ip: 1}")
    with pytest.raises(UsageError, match="object or array"):
        parse_json_params('"just a string"')


def test_format_table_aligns_columns():
    table = format_table(("ID", "NAME"), [(0, "E_X"), (10, "E_LONGER_NAME")])
    assert table.splitlines() == [
        "ID  NAME",
        " 0  E_X",
        "10  E_LONGER_NAME",
    ]


def test_format_table_explicit_alignment_and_odd_cells():
    table = format_table(("A", "B", "C"), [("x", None, 1.5), ("long", "never", 3)], align="lr")
    assert table.splitlines() == [
        "A         B    C",
        "x         -  1.5",
        "long  never    3",
    ]
    assert format_table(("ID", "NAME"), []) == "ID  NAME"
    with pytest.raises(ValueError):
        format_table(("A", "B"), [("only one",)])


def test_human_bytes():
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(60 * 1024 * 1024) == "60.0 MiB"
    assert human_bytes(3 * 1024**3) == "3.0 GiB"
    assert human_bytes(5 * 1024**5) == "5120.0 TiB"


def test_pick_mi_address(tmp_path: Path):
    sock = tmp_path / "mpevent.sock"
    never = lambda path: False  # noqa: E731
    always = lambda path: True  # noqa: E731
    env = {"MPEVENT_MI": "udp:127.0.0.1:9"}
    assert pick_mi_address("unix:/x", env, sock, always) == ("unix:/x", "--mi")
    assert pick_mi_address(None, env, sock, always) == ("udp:127.0.0.1:9", "MPEVENT_MI")
    assert pick_mi_address(None, {"MPEVENT_MI": ""}, sock, always) == (f"unix:{sock}", "default")
    assert pick_mi_address(None, {}, sock, never) == ("udp:127.0.0.1:8080", "default")
    # The real check: only an existing socket counts.
    assert pick_mi_address(None, {}, sock)[0] == "udp:127.0.0.1:8080"


def test_make_client_picks_the_transport():
    assert isinstance(make_client("udp:127.0.0.1:8080", 1), MIClient)
    assert isinstance(make_client("unix:/run/x.sock", 1), MIClient)
    assert isinstance(make_client("/run/x.sock", 1), MIClient)
    http = make_client("http://127.0.0.1:8888/mi", 1)
    assert isinstance(http, MIHttpClient) and http.timeout == 1
    for bad in ("udp:127.0.0.1", "bogus", "ftp://host/mi", "http://:80/mi", "http://h:x/mi"):
        with pytest.raises(UsageError):
            make_client(bad, 1)


def test_result_rows():
    assert event_rows({"Events": [{"name": "E_B", "id": 1}, {"name": "E_A", "id": 0}]}) == [
        (0, "E_A"),
        (1, "E_B"),
    ]
    sub = {"socket": "udp:127.0.0.1:9", "expire": 60, "ttl": 59}
    never = {"socket": "unix:/x", "expire": "never", "ttl": "never"}
    everything = {
        "Events": [
            {"name": "E_A", "id": 0, "Subscribers": [sub, never]},
            {"name": "E_B", "id": 1, "Subscribers": []},
        ]
    }
    assert subscriber_rows(everything) == [
        ("E_A", "udp:127.0.0.1:9", 60, 59),
        ("E_A", "unix:/x", "never", "never"),
    ]
    one_event = {"Event": {"name": "E_A", "id": 0, "Subscribers": [sub]}}
    assert subscriber_rows(one_event) == [("E_A", "udp:127.0.0.1:9", 60, 59)]
    one_sub = {"Event": {"name": "E_A", "id": 0, "Subscriber": never}}
    assert subscriber_rows(one_sub) == [("E_A", "unix:/x", "never", "never")]
    ps = {"Processes": [{"ID": 0, "PID": 42, "Type": "hub", "CPU": 1.234, "RSS": 2 << 20}]}
    assert process_rows(ps) == [(42, "hub", "1.23s", "", "2.0 MiB")]
    earlier = {"Processes": [{"PID": 42, "CPU": 1.034}, {"PID": 7, "CPU": 9.0}]}
    assert process_rows(ps, earlier, 2.0) == [(42, "hub", "1.23s", "10.0%", "2.0 MiB")]


def test_stat_rates():
    before = {"a": 10, "b": 5, "gone": 1}
    after = {"a": 30, "b": 5, "new": 7}
    assert stat_rates(before, after, 2.0) == {"a": 10.0, "b": 0.0}
    assert stat_rates(before, after, 0) == {}


def test_format_notification():
    when = 1_700_000_000.25
    stamp = format_timestamp(when)
    assert stamp.endswith(".250")
    line = format_notification(EXPECTED, when)
    assert line == f"{stamp} E_X ip=1.2.3.4 n=5"
    # Values read back the same through KEY=VALUE: a string "5" is quoted.
    odd = b'{"jsonrpc":"2.0","method":"E_Y","params":{"s":"5","t":"a b","u":null,"v":[1]}}'
    assert format_notification(odd, when) == f'{stamp} E_Y s="5" t="a b" u=null v=[1]'
    positional = b'{"jsonrpc":"2.0","method":"E_Z","params":["a",2]}'
    assert format_notification(positional, when) == f"{stamp} E_Z a 2"
    assert format_notification(b'{"jsonrpc":"2.0","method":"E_Z"}', when) == f"{stamp} E_Z"
    assert "not a JSON-RPC notification" in format_notification(b"\xffgarbage", when)


def test_listen_destination(tmp_path: Path):
    assert str(listen_destination("udp:127.0.0.1:9000")) == "udp:127.0.0.1:9000"
    assert str(listen_destination("/tmp/x.sock")) == "unix:/tmp/x.sock"
    assert str(listen_destination("x.sock", cwd=str(tmp_path))) == f"unix:{tmp_path}/x.sock"
    with pytest.raises(UsageError, match="port"):
        listen_destination("udp:127.0.0.1:0")


# -- usage errors and no hub: no daemon needed ------------------------------------


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["subscribe", "E_X", "udp:1.2.3.4"], "missing port"),
        (["subscribe", "E_X", "sctp:1.2.3.4:5"], "unknown scheme"),
        (["unsubscribe", "E_X", "relative.sock"], "unknown scheme"),
        (["subscribers", "E_X", "udp:1.2.3.4:99999"], "out of range"),
        (["listen", "udp:127.0.0.1:0"], "out of range"),
        (["--mi", "bogus", "events"], "MI address"),
        (["events", "--mi", "ftp://host/mi"], "unsupported scheme"),
        (["raise", "E_X", "novalue"], "KEY=VALUE"),
        (["raise", "E_X", "a=1", "--json-params", "{}"], "not both"),
        (["raise", "E_X", "--json-params", "{nope"], "not valid JSON"),
        (["subscribe", "E_X", "udp:127.0.0.1:9", "soon"], "invalid int"),
        (["stats", "--watch", "0"], "positive"),
        (["--timeout", "-1", "events"], "positive"),
        (["nosuchcommand"], "invalid choice"),
        ([], "required"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, problem):
    # An unused UDP port: were the command to get as far as the MI, it
    # would time out and exit 3, not 2.
    code, out, err = run(capsys, "--mi", f"udp:127.0.0.1:{free_port()}", *argv)
    assert code == 2, err
    assert problem in err
    assert out == ""


def test_help_on_every_subcommand(capsys):
    for command in ("serve", "subscribe", "unsubscribe", "events", "subscribers", "raise"):
        assert run(capsys, command, "--help")[0] == 0
    for command in ("stats", "ps", "listen"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and out.startswith(f"usage: mpevent {command}")
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "Exit codes" in out


def test_demo_gets_the_remaining_arguments(monkeypatch):
    import mpevent.tools.demo

    seen = []
    monkeypatch.setattr(mpevent.tools.demo, "main", lambda argv: seen.append(argv) or 7)
    assert cli.main(["demo", "--workers", "2", "--help"]) == 7
    assert seen == [["--workers", "2", "--help"]]


def test_no_hub_exits_3_fast(capsys, tmp_path: Path):
    port = free_port(socket.SOCK_STREAM)
    for address in (
        f"udp:127.0.0.1:{free_port()}",
        f"unix:{tmp_path / 'nobody.sock'}",
        f"http://127.0.0.1:{port}/mi",
    ):
        t0 = time.monotonic()
        code, out, err = run(capsys, "--mi", address, "--timeout", "0.2", "events")
        assert time.monotonic() - t0 < 2
        assert code == 3, err
        assert address in err and "--mi" in err and "MPEVENT_MI" in err
        assert out == ""


def test_no_hub_at_the_env_address(capsys, monkeypatch):
    address = f"udp:127.0.0.1:{free_port()}"
    monkeypatch.setenv("MPEVENT_MI", address)
    code, _, err = run(capsys, "ps", "--timeout", "0.2")
    assert code == 3
    assert f"no MI answer from {address}" in err and "MPEVENT_MI address" in err


# -- against a real hub -----------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "unix", "http"])
def test_subscribe_subscribers_unsubscribe(capsys, daemon: Daemon, transport: str):
    mi = getattr(daemon, transport)
    daemon.mi("event_publish", ["E_X"])
    code, out, err = run(capsys, "--mi", mi, "subscribe", "E_X", "udp:127.0.0.1:9999", "60")
    assert (code, err) == (0, "")
    assert "subscribed udp:127.0.0.1:9999 to E_X" in out
    assert run(capsys, "subscribe", "E_X", "unix:/tmp/x.sock", "--mi", mi)[0] == 0

    code, out, _ = run(capsys, "--mi", mi, "subscribers")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["EVENT", "SOCKET", "EXPIRE", "TTL"]
    assert lines[1].split()[:3] == ["E_X", "udp:127.0.0.1:9999", "60"]
    assert lines[2].split()[:3] == ["E_X", "unix:/tmp/x.sock", "3600"]

    code, out, _ = run(capsys, "--mi", mi, "--json", "subscribers", "E_X", "udp:127.0.0.1:9999")
    assert code == 0
    sub = json.loads(out)["Event"]["Subscriber"]
    assert sub["socket"] == "udp:127.0.0.1:9999" and sub["expire"] == 60

    for socket_ in ("udp:127.0.0.1:9999", "unix:/tmp/x.sock"):
        code, out, _ = run(capsys, "--mi", mi, "unsubscribe", "E_X", socket_)
        assert code == 0 and "unsubscribed" in out
    code, out, _ = run(capsys, "--mi", mi, "subscribers", "E_X", "--json")
    assert json.loads(out) == {"Event": {"name": "E_X", "id": 0, "Subscribers": []}}

    code, _, err = run(capsys, "--mi", mi, "subscribers", "E_X", "udp:127.0.0.1:9999")
    assert code == 1 and err == "error 404: Subscriber not found\n"
    code, _, err = run(capsys, "--mi", mi, "subscribe", "E_X", "udp:127.0.0.1:9999", "-5")
    assert code == 1 and err.startswith("error -32602: ")


def test_events_through_the_environment(capsys, monkeypatch, daemon: Daemon):
    monkeypatch.setenv("MPEVENT_MI", daemon.unix)
    assert run(capsys, "events")[1].splitlines() == ["ID  NAME"]
    for name in ("E_A", "E_B"):
        daemon.mi("event_publish", [name])
    code, out, _ = run(capsys, "events")
    assert code == 0 and out.splitlines() == ["ID  NAME", " 0  E_A", " 1  E_B"]
    code, out, _ = run(capsys, "events", "--json")
    assert json.loads(out) == {"Events": [{"name": "E_A", "id": 0}, {"name": "E_B", "id": 1}]}


def test_default_address_is_the_default_hubs_unix_socket(capsys, monkeypatch, tmp_path: Path):
    run_dir = tmp_path / "run"
    default = run_dir / "mpevent" / "mpevent.sock"
    hub = Daemon(tmp_path, extra_args=("--mi-unix", str(default)))
    try:
        hub.mi("event_publish", ["E_DEFAULT"])
        monkeypatch.delenv("MPEVENT_MI", raising=False)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(run_dir))
        code, out, err = run(capsys, "events")
        assert (code, err) == (0, "")
        assert "E_DEFAULT" in out
    finally:
        assert hub.stop() == 0, hub.log()


def test_raise_delivers_exact_bytes(capsys, daemon: Daemon, udp_sink: UdpSink):
    daemon.mi("event_publish", ["E_X"])
    daemon.mi("event_subscribe", ["E_X", udp_sink.address, 60])
    mi = daemon.udp

    code, out, err = run(capsys, "--mi", mi, "raise", "E_X", "ip=1.2.3.4", "n=5")
    assert (code, out, err) == (0, "raised E_X\n", "")
    assert udp_sink.receive(1) == [EXPECTED]

    params = '{"ip":"1.2.3.4","n":5}'
    assert run(capsys, "--mi", mi, "raise", "E_X", "--json-params", params)[0] == 0
    assert udp_sink.receive(1) == [EXPECTED]

    assert run(capsys, "--mi", mi, "raise", "E_X", "--json-params", '["a", 007]')[0] == 2
    assert run(capsys, "--mi", mi, "raise", "E_X", "--json-params", '["a", 7]')[0] == 0
    assert udp_sink.receive(1) == [b'{"jsonrpc":"2.0","method":"E_X","params":["a",7]}']

    code, out, _ = run(capsys, "--mi", mi, "--json", "raise", "E_X", "s=007", "t=true", "u=")
    assert (code, json.loads(out)) == (0, "OK")
    assert udp_sink.receive(1) == [
        b'{"jsonrpc":"2.0","method":"E_X","params":{"s":"007","t":true,"u":""}}'
    ]
    assert run(capsys, "--mi", mi, "raise", "E_X")[0] == 0
    assert udp_sink.receive(1) == [b'{"jsonrpc":"2.0","method":"E_X"}']


def test_raise_errors(capsys, daemon: Daemon):
    daemon.mi("event_publish", ["E_QUIET"])
    code, out, err = run(capsys, "--mi", daemon.udp, "raise", "E_QUIET", "a=1")
    assert (code, out, err) == (1, "", "error 480: Temporarily Unavailable\n")
    code, out, err = run(capsys, "--mi", daemon.http, "raise", "E_NOBODY_KNOWS")
    hint = "publish it first: mpevent publish E_NOBODY_KNOWS"
    assert (code, out, err) == (1, "", f"error 404: Event not registered; {hint}\n")


def test_stats_and_ps(capsys, monkeypatch, daemon: Daemon, udp_sink: UdpSink):
    daemon.mi("event_publish", ["E_X"])
    daemon.mi("event_subscribe", ["E_X", udp_sink.address, 60])
    mi = daemon.udp
    for _ in range(3):
        daemon.mi("raise_event", ["E_X", {"n": 1}])
    assert len(udp_sink.receive(3)) == 3

    code, out, _ = run(capsys, "--mi", mi, "stats")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["NAME", "VALUE"]
    assert "event:E_X.raised 3" in [" ".join(line.split()) for line in lines]

    code, out, _ = run(capsys, "--mi", mi, "stats", "--json", "event:", "mpevent:raised")
    stats = json.loads(out)
    assert code == 0 and stats["event:E_X.raised"] == 3 and stats["mpevent:raised"] == 3
    assert not any(name.startswith("destination:") for name in stats)

    code, out, _ = run(capsys, "--mi", mi, "ps", "--interval", "0.5")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["PID", "TYPE", "CPU", "CPU", "NOW", "RSS"]
    assert lines[1].split()[:2] == [str(daemon.proc.pid), "hub"]
    assert any(line.split()[1:3] == ["sender", "0"] for line in lines[2:])
    assert lines[1].endswith("iB") and "%" in lines[1]

    code, out, _ = run(capsys, "--mi", mi, "ps", "--json")
    processes = json.loads(out)["Processes"]
    assert code == 0 and processes[0]["PID"] == daemon.proc.pid

    # --watch: samples until Ctrl-C (here: the third sleep), with rates after the first.
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 1:
            daemon.mi("raise_event", ["E_X", {"n": 2}])
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(commands.time, "sleep", sleep)
    code, out, _ = run(capsys, "--mi", mi, "stats", "event:E_X.raised", "--watch", "0.05")
    assert code == 0 and len(sleeps) == 3
    screens = out.strip().split("\n\n")
    assert len(screens) == 3
    assert screens[0].splitlines()[1].split() == ["NAME", "VALUE", "RATE/S"]
    assert screens[0].splitlines()[2].split() == ["event:E_X.raised", "3", "-"]
    assert screens[1].splitlines()[2].split()[:2] == ["event:E_X.raised", "4"]
    assert float(screens[1].splitlines()[2].split()[2]) > 0

    sleeps.clear()
    code, out, _ = run(capsys, "--mi", mi, "--json", "stats", "--watch", "event:")
    samples = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(samples) == 3
    assert samples[0]["rates"] == {} and samples[2]["statistics"]["event:E_X.raised"] == 5
    assert samples[1]["rates"]["event:E_X.raised"] > 0
    assert all(name.startswith("event:") for name in samples[0]["statistics"])
    assert 0.5 < sleeps[0] <= 1.0  # "event:" was a name, not the interval


# -- listen -------------------------------------------------------------------------


def test_listen_entry_point_raw_udp():
    """``python -m mpevent listen``: exactly the bytes received, one line each."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpevent", "listen", f"udp:127.0.0.1:{port}", "--count=2", "--raw"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with running(proc):
        assert b"listening on udp:127.0.0.1:" in proc.stderr.readline()
        odd = b'{"jsonrpc":"2.0","method":"E_\xc3\xa9","params":["\\n"]}'
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(EXPECTED, ("127.0.0.1", port))
            s.sendto(odd, ("127.0.0.1", port))
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out == EXPECTED + b"\n" + odd + b"\n"


def test_listen_sigint_exits_0_and_removes_its_socket(tmp_path: Path):
    path = tmp_path / "listen.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpevent", "listen", path.name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    with running(proc):
        assert f"listening on unix:{path}".encode() in proc.stderr.readline()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(EXPECTED, str(path))
        line = proc.stdout.readline().decode()
        assert line.rstrip("\n").endswith(" E_X ip=1.2.3.4 n=5")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out == b""  # nothing more than the one line
    assert b"Traceback" not in err
    assert not path.exists()


def test_listen_receives_from_the_hub(capsys, daemon: Daemon, tmp_path: Path):
    """In a thread, subscribed through the CLI, fed by ``mpevent raise``."""
    path = tmp_path / "events.sock"
    daemon.mi("event_publish", ["E_X"])
    codes = []
    thread = threading.Thread(
        target=lambda: codes.append(cli.main(["listen", str(path), "--count", "1"]))
    )
    thread.start()
    try:
        assert wait_for(path.is_socket)
        assert cli.main(["--mi", daemon.udp, "subscribe", "E_X", str(path), "60"]) == 0
        assert cli.main(["--mi", daemon.udp, "raise", "E_X", "ip=1.2.3.4", "n=5"]) == 0
        thread.join(10)
    finally:
        if thread.is_alive():  # unblock it: one datagram ends --count 1
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(b"{}", str(path))
            thread.join(10)
    assert codes == [0]
    # The listener thread may print before `raise` does: no order between them.
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    assert out[0] == f"subscribed {path} to E_X for 60 s"
    assert "raised E_X" in out[1:]
    assert [line for line in out[1:] if line.endswith(" E_X ip=1.2.3.4 n=5")]
    assert not path.exists()


def test_listen_refuses_a_path_in_use(capsys, tmp_path: Path):
    path = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as busy:
        busy.bind(str(path))
        code, _, err = run(capsys, "listen", str(path), "--count", "1")
        assert code == 2 and "another process is bound to it" in err
    assert path.exists()  # not ours to remove
    os.unlink(path)
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "listen", str(tmp_path / "file"))
    assert code == 2 and "not a socket" in err
