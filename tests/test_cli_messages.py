"""What the ``mpevent`` command says it did: publish, refresh, unsubscribe of nothing, versions.

The MI answers "OK" to a subscribe that only refreshed and to an unsubscribe
that removed nothing, as OpenSIPS does; the command must not repeat that as
"subscribed" or "unsubscribed". The pure sentences first, then each against
a real ``mpevent serve`` started with no configuration (no events), the way
a new user meets it.
"""

from __future__ import annotations

import json
import time

import pytest
from support import Daemon

import mpevent
from mpevent import defaults
from mpevent.processes import fastpath
from mpevent.system import free_port
from mpevent.tools import cli
from mpevent.tools.cli.text import (
    UsageError,
    event_names,
    not_subscribed_line,
    published_line,
    refreshed_line,
    shown_socket,
    unknown_event_hint,
    version_lines,
)

LIBRARY = f"mpevent {defaults.version()} ({fastpath.describe()})"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- the sentences, pure ------------------------------------------------------------


def test_unknown_event_hint():
    hinted = unknown_event_hint("Bad parameter value: unknown event 'E_X'", "E_X")
    assert (
        hinted == "Bad parameter value: unknown event 'E_X'; publish it first: mpevent publish E_X"
    )
    assert unknown_event_hint("Event not registered", "E_Y") == (
        "Event not registered; publish it first: mpevent publish E_Y"
    )
    assert unknown_event_hint("Temporarily Unavailable", "E_X") is None
    assert unknown_event_hint("Bad parameter value: missing port", "E_X") is None


def test_refreshed_line_names_the_stored_socket():
    stored = {"socket": "udp:127.0.0.1:9000", "expire": 120, "ttl": 120}
    assert refreshed_line("udp:localhost:9000", "E_X", stored) == (
        "refreshed the subscription of udp:127.0.0.1:9000 to E_X "
        "(udp:localhost:9000 is the same socket), now expires in 120 s"
    )
    assert refreshed_line("udp:127.0.0.1:9000", "E_X", stored) == (
        "refreshed the subscription of udp:127.0.0.1:9000 to E_X, now expires in 120 s"
    )
    permanent = {"socket": "unix:/tmp/p.sock", "expire": "never", "ttl": "never"}
    assert refreshed_line("/tmp/p.sock", "E_X", permanent).endswith(", now never expires")


def test_a_socket_is_printed_as_typed_but_never_with_its_password():
    assert shown_socket("udp:localhost:9000") == "udp:localhost:9000"
    assert shown_socket("/tmp/x.sock") == "/tmp/x.sock"
    assert shown_socket("rabbitmq:bob:s3cret@127.0.0.1/q") == "rabbitmq:bob:***@127.0.0.1:5672/q"
    with pytest.raises(UsageError, match="missing port"):
        shown_socket("udp:127.0.0.1")


def test_published_and_not_subscribed_lines():
    assert published_line({"name": "E_A", "id": 3}, ["E_B"]) == "published E_A (id 3)"
    assert published_line({"name": "E_A", "id": 0}, ["E_A"]) == "E_A was already published (id 0)"
    assert not_subscribed_line("udp:127.0.0.1:9", "E_A") == (
        "udp:127.0.0.1:9 is not subscribed to E_A: there was nothing to unsubscribe"
    )


def test_event_names_are_checked_before_anything_is_declared():
    assert event_names(["E_A", "E_B", "E_A"]) == ["E_A", "E_B"]
    with pytest.raises(UsageError, match="bad name"):
        event_names(["E_A", "bad name"])
    with pytest.raises(UsageError):
        event_names(["E" * 65])


def test_version_lines():
    assert version_lines("1.2", "compiled fast path", None, "udp:127.0.0.1:1") == [
        "mpevent 1.2 (compiled fast path)"
    ]
    assert version_lines("1.2", "pure", {"Server": "mpevent 1.2"}, "unix:/x.sock") == [
        "mpevent 1.2 (pure)",
        "hub at unix:/x.sock: mpevent 1.2",
    ]


# -- against a real hub ------------------------------------------------------------------


def _events(daemon: Daemon) -> list[str]:
    return [e["name"] for e in daemon.mi("events_list")["Events"]]


def test_publish_fixes_the_first_subscribe_of_a_new_user(capsys, daemon: Daemon):
    """A hub started with no configuration knows no events: the error says what to
    run, and ``mpevent publish`` is that command."""
    sock = f"udp:127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "--mi", daemon.unix, "subscribe", "E_NEW", sock)
    assert (code, out) == (1, "")
    assert err == (
        "error 400: Bad parameter value: unknown event 'E_NEW'; "
        "publish it first: mpevent publish E_NEW\n"
    )
    code, out, err = run(capsys, "--mi", daemon.unix, "publish", "E_NEW", "E_TWO")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["published E_NEW (id 0)", "published E_TWO (id 1)"]
    assert _events(daemon) == ["E_NEW", "E_TWO"]
    code, out, _ = run(capsys, "--mi", daemon.udp, "publish", "E_NEW", "E_3")
    assert code == 0
    assert out.splitlines() == ["E_NEW was already published (id 0)", "published E_3 (id 2)"]
    code, out, _ = run(capsys, "--mi", daemon.http, "--json", "publish", "E_4")
    assert (code, json.loads(out)) == (0, {"name": "E_4", "id": 3})
    code, out, err = run(capsys, "--mi", daemon.unix, "subscribe", "E_NEW", sock)
    assert (code, err) == (0, "") and f"subscribed {sock} to E_NEW" in out

    # A bad name is a usage error, and nothing of that command is declared.
    code, out, err = run(capsys, "--mi", daemon.unix, "publish", "E_5", "no spaces")
    assert (code, out) == (2, "") and "no spaces" in err
    assert _events(daemon) == ["E_NEW", "E_TWO", "E_3", "E_4"]
    # The other commands that name an unknown event give the same hint.
    for argv in (["raise", "E_NOPE"], ["subscribers", "E_NOPE"], ["unsubscribe", "E_NOPE", sock]):
        code, _, err = run(capsys, "--mi", daemon.unix, *argv)
        assert code == 1 and err.endswith("; publish it first: mpevent publish E_NOPE\n"), argv


def test_subscribing_again_says_it_refreshed(capsys, daemon: Daemon):
    daemon.mi("event_publish", ["E_X"])
    port = free_port()
    code, out, _ = run(
        capsys, "--mi", daemon.unix, "subscribe", "E_X", f"udp:127.0.0.1:{port}", "60"
    )
    assert (code, out) == (0, f"subscribed udp:127.0.0.1:{port} to E_X for 60 s\n")
    time.sleep(1.1)  # the refreshed ttl counts from the refresh, not from the first subscribe
    code, out, err = run(
        capsys, "--mi", daemon.udp, "subscribe", "E_X", f"udp:localhost:{port}", "120"
    )
    assert (code, err) == (0, "")
    assert out == (
        f"refreshed the subscription of udp:127.0.0.1:{port} to E_X "
        f"(udp:localhost:{port} is the same socket), now expires in 120 s\n"
    )
    [sub] = daemon.mi("subscribers_list", ["E_X"])["Event"]["Subscribers"]
    assert (sub["socket"], sub["expire"]) == (f"udp:127.0.0.1:{port}", 120)
    # The default expire, same spelling; --json still prints the MI's own answer.
    code, out, _ = run(capsys, "--mi", daemon.http, "subscribe", "E_X", f"udp:127.0.0.1:{port}")
    assert out == (
        f"refreshed the subscription of udp:127.0.0.1:{port} to E_X, now expires in 3600 s\n"
    )
    code, out, _ = run(
        capsys, "--mi", daemon.unix, "--json", "subscribe", "E_X", f"udp:localhost:{port}"
    )
    assert (code, json.loads(out)) == (0, "OK")
    assert len(daemon.mi("subscribers_list", ["E_X"])["Event"]["Subscribers"]) == 1


def test_unsubscribe_of_nothing_says_so_and_fails(capsys, daemon: Daemon):
    daemon.mi("event_publish", ["E_X"])
    sock = f"udp:127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "--mi", daemon.unix, "unsubscribe", "E_X", sock)
    assert (code, out) == (1, "")
    assert err == f"mpevent: {sock} is not subscribed to E_X: there was nothing to unsubscribe\n"
    # expire 0 is the same request, and gets the same answer.
    assert run(capsys, "--mi", daemon.unix, "subscribe", "E_X", sock, "0")[:2] == (1, "")
    # The MI's own answer stays OpenSIPS's: "OK", there being nothing to remove or not.
    assert daemon.mi("event_subscribe", ["E_X", sock, 0]) == "OK"

    daemon.mi("event_subscribe", ["E_X", sock, 60])
    spelled = sock.replace("127.0.0.1", "localhost")
    code, out, err = run(capsys, "--mi", daemon.udp, "unsubscribe", "E_X", spelled)
    assert (code, out, err) == (0, f"unsubscribed {sock} from E_X\n", "")
    assert daemon.mi("subscribers_list", ["E_X"])["Event"]["Subscribers"] == []
    assert run(capsys, "--mi", daemon.udp, "unsubscribe", "E_X", spelled)[0] == 1
    # A broker socket's password is not printed back.
    broker = "rabbitmq:bob:s3cret@127.0.0.1/q"
    code, out, err = run(capsys, "--mi", daemon.unix, "unsubscribe", "E_X", broker)
    assert (code, out) == (1, "") and "s3cret" not in err
    assert "rabbitmq:bob:***@127.0.0.1:5672/q is not subscribed to E_X" in err


@pytest.mark.parametrize("transport", ["udp", "unix", "http"])
def test_version_names_the_library_the_path_and_the_hub(capsys, daemon: Daemon, transport):
    mi = getattr(daemon, transport)
    hub_line = f"hub at {mi}: mpevent {defaults.version()}"
    for argv in (["version"], ["--version"], ["--version", "ps"]):
        code, out, err = run(capsys, "--mi", mi, *argv)
        assert (code, out.splitlines(), err) == (0, [LIBRARY, hub_line], ""), argv
    code, out, _ = run(capsys, "--json", "--mi", mi, "version")
    assert code == 0
    assert json.loads(out) == {
        "version": defaults.version(),
        "compiled": mpevent.COMPILED,
        "producer_path": fastpath.describe(),
        "hub": {"Server": f"mpevent {defaults.version()}"},
        "mi": mi,
    }


def test_version_without_a_hub(capsys):
    address = f"udp:127.0.0.1:{free_port()}"
    # --version: the library's version first; no hub is no failure, and it waits little.
    t0 = time.monotonic()
    code, out, err = run(capsys, "--mi", address, "--version")
    assert time.monotonic() - t0 < 1.5
    assert (code, out) == (0, f"{LIBRARY}\n")
    assert err == f"mpevent: the hub at {address} (the --mi address) did not answer\n"
    # The version subcommand is an MI command like the others: no answer, exit 3.
    code, out, err = run(capsys, "--mi", address, "--timeout", "0.2", "version")
    assert (code, out) == (3, f"{LIBRARY}\n")
    assert f"no MI answer from {address}" in err and "--mi ADDR" in err
    code, out, _ = run(capsys, "--mi", address, "--timeout", "0.2", "--json", "version")
    assert code == 3 and json.loads(out)["hub"] is None
    # A bad address: --version still says the library's version.
    code, out, err = run(capsys, "--mi", "bogus", "--version")
    assert (code, out) == (0, f"{LIBRARY}\n") and "cannot ask a hub" in err
