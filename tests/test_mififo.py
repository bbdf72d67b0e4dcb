"""The MI over a FIFO (OpenSIPS mi_fifo): the splitter without I/O, then a real hub.

The splitter tests feed bytes as a FIFO would deliver them (whole, in
pieces, several requests at once, broken). The hub tests drive a real
``mpevent serve`` with real clients: the ``opensips`` package's FIFO client,
opensips-cli, ``mpevent --mi fifo:PATH`` and :class:`MIFifoClient`, plus raw
writes for what no polite client sends (hostile names, reply paths that are
symlinks, hard links or regular files, oversized and unfinished requests, a
writer that never finishes, a reply FIFO nobody reads).
"""

from __future__ import annotations

import os
import select
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import Daemon, wait_for

from mpevent.api import mififo
from mpevent.api.client import MICallError, MIFifoClient, MIHttpClient, MIUnavailable
from mpevent.api.mififo import FifoRequest, FifoRequestSplitter, check_reply_name
from mpevent.protocol import mi

BIN = Path(sys.executable).parent


def request(method: str, params=None, req_id=1) -> bytes:
    body = {"jsonrpc": "2.0", "method": method, "id": req_id}
    if params is not None:
        body["params"] = params
    return orjson.dumps(body)


# -- the splitter, pure ----------------------------------------------------------------


def test_one_request_whole_and_byte_by_byte():
    body = request("which")
    s = FifoRequestSplitter()
    assert s.feed(b":reply_1:" + body, 0) == [FifoRequest("reply_1", body)]
    got = []
    for byte in b":reply_1:" + body:
        got += s.feed(bytes([byte]), 0)
    assert got == [FifoRequest("reply_1", body)]
    assert s.buffered == 0 and s.unfinished_since is None


def test_several_requests_in_one_write_with_or_without_blanks():
    a, b, c = request("which", req_id=1), request("uptime", req_id=2), request("ps", req_id=3)
    s = FifoRequestSplitter()
    got = s.feed(b":a:" + a + b"\n:b:  \n" + b + b":c:" + c + b"\n", 0)
    assert got == [FifoRequest("a", a), FifoRequest("b", b), FifoRequest("c", c)]


def test_brackets_and_quotes_inside_strings_do_not_end_a_request():
    body = orjson.dumps(
        {"jsonrpc": "2.0", "method": "evi:raise", "params": ['{"x": "}]\\"["}'], "id": 9}
    )
    s = FifoRequestSplitter()
    assert s.feed(b":r:" + body[:20], 0) == []
    assert s.feed(body[20:], 0) == [FifoRequest("r", body)]


def test_a_batch_is_one_request():
    body = b"[" + request("which") + b"," + request("uptime", req_id=2) + b"]"
    assert FifoRequestSplitter().feed(b":r:" + body, 0) == [FifoRequest("r", body)]


def test_empty_reply_name_means_no_reply():
    body = request("which")
    [got] = FifoRequestSplitter().feed(b"::" + body, 0)
    assert got == FifoRequest("", body)
    assert not got.wants_reply


@pytest.mark.parametrize("name", [b"x.y", b"..", b"a/b", b"a\\b", b"a\x00b"])
def test_reply_names_that_could_leave_the_reply_directory_are_refused(name: bytes):
    assert check_reply_name(name) is not None
    body = request("evi:publish", ["E_X"])
    s = FifoRequestSplitter()
    [got] = s.feed(b":" + name + b":" + body + b":ok:" + body, 0)[:1]
    assert got.body is None and not got.wants_reply  # neither run nor answered
    # ... and the stream stays in step: the next request is read as usual.
    assert s.feed(b":ok:" + body, 0) == [FifoRequest("ok", body)]


def test_plain_names_are_allowed():
    assert check_reply_name(b"opensips_fifo_reply_123_1700000000_5") is None
    assert check_reply_name(b"x" * mififo.MAX_REPLY_NAME) is None
    assert check_reply_name(b"x" * (mififo.MAX_REPLY_NAME + 1)) is not None


def test_junk_before_a_request_is_skipped():
    body = request("which")
    assert FifoRequestSplitter().feed(b"hello there" + b":r:" + body, 0) == [FifoRequest("r", body)]


def test_mismatched_brackets_get_an_error_and_the_next_request_is_served():
    body = request("which")
    got = FifoRequestSplitter().feed(b':bad:{"a":[}' + b":good:" + body, 0)
    assert got[0].reply_name == "bad" and got[0].body is None
    assert got[0].error[0] == mi.PARSE_ERROR
    assert got[1:] == [FifoRequest("good", body)]


def test_no_json_after_the_name_gets_an_error():
    [got] = FifoRequestSplitter().feed(b":r:hello", 0)
    assert got.reply_name == "r" and got.error[0] == mi.PARSE_ERROR


def test_an_oversized_request_is_refused_and_never_held_whole():
    s = FifoRequestSplitter(max_request=1000)
    got = s.feed(b':big:{"x":"' + b"a" * 5000, 0)
    assert len(got) == 1 and got[0].reply_name == "big" and got[0].body is None
    code, message = got[0].error
    assert code == mi.INVALID_REQUEST and "1000" in message and "too large" in message
    assert s.buffered < 1000
    for _ in range(100):  # the rest of it, as it comes: followed, never kept
        assert s.feed(b"b" * 5000, 0) == []
        assert s.buffered < 1000
    body = request("which")
    assert s.feed(b'"}:next:' + body, 0) == [FifoRequest("next", body)]


def test_a_whole_but_oversized_request_is_refused():
    s = FifoRequestSplitter(max_request=100)
    [got] = s.feed(b":r:" + request("x" * 200), 0)
    assert got.body is None and got.error[0] == mi.INVALID_REQUEST


def test_an_unfinished_request_expires_and_what_followed_it_is_served():
    # One writer stopped half-way and holds the FIFO open; another wrote a
    # whole request after it (a write of up to PIPE_BUF bytes is never split).
    s = FifoRequestSplitter(stale_after=1.0)
    body = request("which")
    assert s.feed(b':stuck:{"jsonrpc":"2.0","method":', 10.0) == []
    assert s.feed(b":other:" + body, 10.2) == []
    assert s.unfinished_since == 10.0
    assert s.expire(10.9) == []
    got = s.expire(11.0)
    assert got[0].reply_name == "stuck" and got[0].error[0] == mi.PARSE_ERROR
    assert got[1:] == [FifoRequest("other", body)]
    assert s.buffered == 0


def test_end_of_stream_cuts_an_unfinished_request():
    s = FifoRequestSplitter()
    body = request("which")
    s.feed(b':cut:{"jsonrpc":', 0)
    s.feed(b":whole:" + body, 0)
    got = s.end_of_stream(0)
    assert got[0].reply_name == "cut" and got[0].error[0] == mi.PARSE_ERROR
    assert got[1:] == [FifoRequest("whole", body)]
    assert s.buffered == 0
    assert s.feed(b":again:" + body, 0) == [FifoRequest("again", body)]


def test_a_stream_of_broken_requests_costs_its_length_not_its_square():
    # Every '{' could start a text and every ':a:' a request; each byte must
    # be scanned a bounded number of times, or a writer could stall the hub.
    s = FifoRequestSplitter()
    junk = b":a:{" * 16000 + b"]"
    t0 = time.process_time()
    s.feed(junk, 0)
    s.end_of_stream(0)
    assert time.process_time() - t0 < 5.0  # quadratic would take minutes


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", max_size=30)
params = st.lists(st.text(max_size=20), max_size=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(names, params), min_size=1, max_size=6), st.data())
def test_any_cut_of_a_stream_of_requests_gives_the_requests(reqs, data):
    stream = b""
    expected = []
    for i, (name, ps) in enumerate(reqs):
        body = request("evi:raise", ps, req_id=i)
        stream += f":{name}:".encode() + body + data.draw(st.sampled_from([b"", b"\n", b" \r\n"]))
        expected.append(FifoRequest(name, body))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    s = FifoRequestSplitter()
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += s.feed(stream[start:end], 0)
    assert got == expected
    assert s.buffered == 0


# -- a real hub ------------------------------------------------------------------------


def fifo_daemon(tmp_path: Path, extra: str = "") -> tuple[Daemon, Path, Path]:
    """A hub whose FIFO replies go to a directory of the test's own."""
    replies = tmp_path / "replies"
    replies.mkdir(exist_ok=True)
    config = f'[mi]\nfifo_reply_dir = "{replies}/"\n{extra}'
    d = Daemon(tmp_path, config=config)
    return d, d.run_dir / "mpevent" / f"{d.name}_fifo", replies


@pytest.fixture
def hub(tmp_path: Path):
    d, fifo, replies = fifo_daemon(tmp_path)
    yield d, fifo, replies
    assert d.stop() == 0, d.log()
    assert not fifo.exists() and not fifo.is_symlink(), "the FIFO was left behind"
    assert not list(replies.iterdir()), "a client left its reply FIFO behind"


def raw_request(fifo: Path, data: bytes) -> None:
    """Write ``data`` into the hub's FIFO and close it, as opensips-cli does."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class ReplyReader:
    """A reply FIFO in the reply directory, open for reading."""

    def __init__(self, path: Path, open_it: bool = True):
        self.path = path
        os.mkfifo(path, 0o600)
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK) if open_it else -1

    def read(self, timeout: float = 5.0) -> bytes | None:
        """The whole reply, or None when none came within ``timeout``."""
        chunks = []
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return b"".join(chunks) if chunks else None
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.path.unlink(missing_ok=True)


def events(d: Daemon) -> list[str]:
    return [e["name"] for e in d.mi("events_list")["Events"]]


def test_the_fifo_is_created_with_its_mode_next_to_the_unix_socket(hub):
    d, fifo, _ = hub
    st_ = os.lstat(fifo)
    assert stat.S_ISFIFO(st_.st_mode)
    assert stat.S_IMODE(st_.st_mode) == 0o660
    assert fifo.parent == d.run_dir / "mpevent"  # the runtime directory


def test_mpevent_fifo_client(hub):
    d, fifo, replies = hub
    client = MIFifoClient(fifo, replies)
    assert client.call("version") == d.mi("version")
    client.call("evi:publish", ["E_FIFO"])
    assert events(d) == ["E_FIFO"]
    assert client.call("events_list") == {"Events": [{"name": "E_FIFO", "id": 0}]}
    with pytest.raises(MICallError) as err:
        client.call("no_such_method")
    assert err.value.code == mi.METHOD_NOT_FOUND


def test_opensips_package_over_the_fifo(hub):
    opensips_mi = pytest.importorskip("opensips.mi")
    _, fifo, replies = hub
    conn = opensips_mi.OpenSIPSMI(
        "fifo", fifo_file=str(fifo), fifo_file_fallback=str(fifo), fifo_reply_dir=str(replies)
    )
    which = conn.execute("which", [])
    assert "events_list" in which
    conn.execute("event_publish", ["E_PKG"])
    assert conn.execute("events_list", []) == {"Events": [{"name": "E_PKG", "id": 0}]}
    if "evi:list" in which:  # the OpenSIPS 4.x names
        assert conn.execute("evi:list", {}) == {"Events": [{"name": "E_PKG", "id": 0}]}
    with pytest.raises(opensips_mi.OpenSIPSMIException):
        conn.execute("event_subscribe", ["E_NONE", "udp:127.0.0.1:9"])


def test_opensips_cli_over_the_fifo(hub, tmp_path: Path):
    cli = BIN / "opensips-cli"
    if not cli.exists():
        if os.environ.get("CI"):  # the test extra installs it: CI must run this
            pytest.fail("opensips-cli is not installed (the test extra has opensipscli)")
        pytest.skip("opensips-cli is not installed (pip install opensipscli)")
    d, fifo, replies = hub
    d.mi("event_publish", ["E_CLI"])
    # The one-line config README shows (plus the reply directory of this test).
    cfg = tmp_path / "opensips-cli.cfg"
    cfg.write_text(f"[default]\nfifo_file: {fifo}\nfifo_reply_dir: {replies}\n")
    env = dict(os.environ, HOME=str(tmp_path))  # no ~/.opensips-cli.cfg of the user's
    which = run_cli(cli, cfg, env, "which")
    method = "evi:list" if "evi:list" in which else "events_list"
    assert orjson.loads(run_cli(cli, cfg, env, method)) == {"Events": [{"name": "E_CLI", "id": 0}]}


def run_cli(cli: Path, cfg: Path, env: dict[str, str], method: str) -> str:
    done = subprocess.run(
        [str(cli), "-f", str(cfg), "-x", "mi", method],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_mpevent_cli_with_a_fifo_address(tmp_path: Path):
    # The mpevent command's FIFO client uses /tmp for its replies: the
    # hub's default reply directory.
    d = Daemon(tmp_path)
    try:
        fifo = d.run_dir / "mpevent" / f"{d.name}_fifo"
        d.mi("event_publish", ["E_CMD"])
        done = subprocess.run(
            [sys.executable, "-m", "mpevent", "--mi", f"fifo:{fifo}", "--json", "events"],
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert orjson.loads(done.stdout) == {"Events": [{"name": "E_CMD", "id": 0}]}
    finally:
        assert d.stop() == 0


def test_notification_and_empty_name_get_no_reply_but_run(hub):
    d, fifo, replies = hub
    reader = ReplyReader(replies / "r1")
    try:
        notification = orjson.dumps(
            {"jsonrpc": "2.0", "method": "evi:publish", "params": ["E_NOTE"]}
        )
        raw_request(fifo, b":r1:" + notification)
        raw_request(fifo, b"::" + request("evi:publish", ["E_NONAME"]))
        assert wait_for(lambda: set(events(d)) == {"E_NOTE", "E_NONAME"})
        assert reader.read(timeout=0.5) is None
    finally:
        reader.close()


@pytest.mark.parametrize("name", ["a.b", "x/y", "x\\y", ".."])
def test_a_forbidden_reply_name_is_neither_run_nor_answered(hub, name: str):
    d, fifo, replies = hub
    (replies / "x").mkdir()
    target = replies / name
    reader = ReplyReader(target) if name != ".." else None
    try:
        raw_request(fifo, f":{name}:".encode() + request("evi:publish", ["E_BAD"]))
        assert MIFifoClient(fifo, replies).call("which")  # still serving, in order
        assert events(d) == []
        if reader is not None:
            assert reader.read(timeout=0.3) is None
    finally:
        if reader is not None:
            reader.close()
        (replies / "x").rmdir()


def test_a_symlinked_reply_path_is_refused(hub, tmp_path: Path):
    d, fifo, replies = hub
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = ReplyReader(elsewhere / "target")
    (replies / "link").symlink_to(target.path)
    try:
        raw_request(fifo, b":link:" + request("evi:publish", ["E_LINK"]))
        assert wait_for(lambda: events(d) == ["E_LINK"])  # run, but not answered there
        assert target.read(timeout=0.5) is None
    finally:
        (replies / "link").unlink()
        target.close()
    assert "symbolic link" in d.log()


def test_a_hard_linked_reply_fifo_is_refused(hub, tmp_path: Path):
    d, fifo, replies = hub
    reader = ReplyReader(replies / "hard")
    os.link(reader.path, tmp_path / "second-name")
    try:
        raw_request(fifo, b":hard:" + request("which"))
        assert reader.read(timeout=0.5) is None
        assert wait_for(lambda: "hard-linked" in d.log())
    finally:
        (tmp_path / "second-name").unlink()
        reader.close()


def test_a_reply_path_that_is_not_a_fifo_is_left_alone(hub):
    d, fifo, replies = hub
    regular = replies / "plain"
    regular.write_bytes(b"precious")
    try:
        raw_request(fifo, b":plain:" + request("which"))
        assert wait_for(lambda: "not a FIFO" in d.log())
        assert regular.read_bytes() == b"precious"
    finally:
        regular.unlink()


def test_a_reply_fifo_nobody_opens_is_given_up(hub):
    d, fifo, replies = hub
    absent = ReplyReader(replies / "nobody", open_it=False)
    try:
        raw_request(fifo, b":nobody:" + request("which"))
        raw_request(fifo, b":missing:" + request("which"))  # no reply FIFO at all
        assert MIFifoClient(fifo, replies).call("which")
        assert wait_for(lambda: "nobody reads the reply FIFO" in d.log(), timeout=10)
    finally:
        absent.close()


def test_the_reply_waits_for_a_reader_that_comes_a_little_late(hub):
    # opensips-cli opens its reply FIFO only after writing the request.
    d, fifo, replies = hub
    late = ReplyReader(replies / "late", open_it=False)
    try:
        raw_request(fifo, b":late:" + request("which"))
        time.sleep(0.05)
        late.fd = os.open(late.path, os.O_RDONLY | os.O_NONBLOCK)
        reply = late.read()
        assert reply is not None and reply.endswith(b"\n")
        assert orjson.loads(reply)["result"] == d.mi("which")
    finally:
        late.close()


def test_oversized_and_malformed_requests_get_errors_and_the_fifo_keeps_serving(hub):
    _, fifo, replies = hub
    client = MIFifoClient(fifo, replies)
    reader = ReplyReader(replies / "big")
    try:
        # Over the bound: written in pieces, as the pipe takes them.
        data = b':big:{"jsonrpc":"2.0","method":"which","params":["' + b"x" * 200_000 + b'"]}'
        fd = os.open(fifo, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        reply = orjson.loads(reader.read())
        assert reply["error"]["code"] == mi.INVALID_REQUEST
        assert str(mi.MAX_REQUEST) in reply["error"]["message"]
    finally:
        reader.close()
    assert client.call("which")
    for junk in (b":bad:{]", b":bad:not json", b":bad:{no json at all}", b"\x00\xff:::::"):
        reader = ReplyReader(replies / "bad")
        try:
            raw_request(fifo, junk)
            reply = reader.read(timeout=2.0)
            if reply is not None:
                assert "error" in orjson.loads(reply)
        finally:
            reader.close()
        assert client.call("which"), junk


def test_a_writer_that_never_finishes_does_not_wedge_the_loop(hub):
    d, fifo, replies = hub
    stuck = ReplyReader(replies / "stuck")
    fd = os.open(fifo, os.O_WRONLY)
    try:
        os.write(fd, b':stuck:{"jsonrpc":"2.0","method":')  # and holds the FIFO open
        # The other transports answer at once, and so does the FIFO, for the
        # request written after the unfinished one (once that one is given up).
        assert d.mi("which", timeout=5.0)
        assert MIFifoClient(fifo, replies, timeout=10.0).call("which")
        reply = orjson.loads(stuck.read())
        assert reply["error"]["code"] == mi.PARSE_ERROR
    finally:
        os.close(fd)
        stuck.close()
    assert MIFifoClient(fifo, replies).call("which")


def test_a_large_reply_is_written_as_the_reader_takes_it(tmp_path: Path):
    d, fifo, replies = fifo_daemon(tmp_path, "[security]\nmax_subs_per_event = 1000\n")
    try:
        d.mi("event_publish", ["E_MANY"])
        long = "/tmp/" + "s" * 90
        batch = []
        for i in range(700):
            batch.append(request("event_subscribe", ["E_MANY", f"unix:{long}{i}", 600], i))
            if len(batch) == mi.MAX_BATCH:
                send_batch(d, batch)
                batch = []
        send_batch(d, batch)
        expected = MIHttpClient(d.http).call("subscribers_list", ["E_MANY"])
        assert len(expected["Event"]["Subscribers"]) == 700
        assert len(orjson.dumps(expected)) > 65536  # more than a pipe holds
        got = MIFifoClient(fifo, replies).call("subscribers_list", ["E_MANY"])
        sockets = [s["socket"] for s in expected["Event"]["Subscribers"]]
        assert [s["socket"] for s in got["Event"]["Subscribers"]] == sockets
    finally:
        assert d.stop() == 0


def send_batch(d: Daemon, batch: list[bytes]) -> None:
    if not batch:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"[" + b",".join(batch) + b"]", ("127.0.0.1", d.udp_port))
        replies = orjson.loads(sock.recv(1 << 20))
    assert all(r.get("result") == "OK" for r in replies), replies


def test_a_deleted_fifo_is_created_again(hub):
    d, fifo, replies = hub
    fifo.unlink()
    assert wait_for(fifo.exists, timeout=3 * mififo.CHECK_INTERVAL + 5)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert MIFifoClient(fifo, replies).call("which")
    assert "creating it again" in d.log()


def test_a_stale_fifo_is_replaced_and_a_served_one_refused(tmp_path: Path):
    fifo = tmp_path / "mi_fifo"
    os.mkfifo(fifo)  # left by a hub that is gone: nobody reads it
    d = Daemon(tmp_path, extra_args=("--mi-fifo", str(fifo)))
    try:
        assert MIFifoClient(fifo).call("which")
        # Another hub on the same FIFO: refused (exit 3), the FIFO untouched.
        other = tmp_path / "other"
        other.mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "mpevent", "serve", "--name", f"{d.name}-2",
             "--mi-udp", "", "--mi-unix", "", "--mi-fifo", str(fifo)],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, XDG_RUNTIME_DIR=str(other)),
        )  # fmt: skip
        assert done.returncode == 3, done.stderr
        assert "another process reads this FIFO" in done.stderr
        assert "--mi-fifo" in done.stderr
        assert MIFifoClient(fifo).call("which")
    finally:
        assert d.stop() == 0
    assert not fifo.exists()


def test_a_path_that_is_not_a_fifo_is_refused(tmp_path: Path):
    path = tmp_path / "not_a_fifo"
    path.write_text("mine")
    done = subprocess.run(
        [sys.executable, "-m", "mpevent", "serve", "--name", f"mpevent-test-{os.getpid()}-nf",
         "--mi-udp", "", "--mi-unix", "", "--mi-fifo", str(path)],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path)),
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "is not a FIFO" in done.stderr
    assert path.read_text() == "mine"


def test_fifo_off_and_mode_from_the_config(tmp_path: Path):
    d = Daemon(tmp_path, config='[mi]\nfifo = ""\n')
    try:
        assert not (d.run_dir / "mpevent" / f"{d.name}_fifo").exists()
    finally:
        assert d.stop() == 0
    fifo = tmp_path / "custom_fifo"
    d = Daemon(tmp_path, config=f'[mi]\nfifo = "{fifo}"\nfifo_mode = "0600"\n')
    try:
        assert stat.S_IMODE(os.lstat(fifo).st_mode) == 0o600
    finally:
        assert d.stop() == 0


def test_the_client_says_when_nobody_serves_the_fifo(tmp_path: Path):
    with pytest.raises(MIUnavailable, match=r"does not exist|No such file"):
        MIFifoClient(tmp_path / "absent", tmp_path).call("which")
    os.mkfifo(tmp_path / "unread")
    try:
        with pytest.raises(MIUnavailable, match="nobody reads it"):
            MIFifoClient(tmp_path / "unread", tmp_path).call("which")
    finally:
        (tmp_path / "unread").unlink()
    assert [p for p in tmp_path.iterdir() if p.name.startswith("mpevent_reply")] == []


def test_config_keys_are_validated(tmp_path: Path):
    from mpevent.protocol.config import ConfigError, load

    for text, key in (
        ('[mi]\nfifo = "relative"\n', "mi.fifo"),
        ('[mi]\nfifo_mode = "999"\n', "mi.fifo_mode"),
        ('[mi]\nfifo_reply_dir = "tmp"\n', "mi.fifo_reply_dir"),
    ):
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=key):
            load(path)
    config = load(None, {"mi.fifo": "/tmp/opensips_fifo"})
    assert config.mi_fifo == Path("/tmp/opensips_fifo")
    assert config.mi_fifo_mode == 0o660 and config.mi_fifo_reply_dir == Path("/tmp")
