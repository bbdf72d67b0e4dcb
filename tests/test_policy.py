"""The destination allow-list: MI access must not aim event traffic anywhere."""

from __future__ import annotations

import pytest
from support import Daemon

from mpevent.api.client import MICallError
from mpevent.protocol.config import ConfigError, load
from mpevent.protocol.destination import parse_destination
from mpevent.protocol.policy import DestinationPolicy, DestinationRefused


@pytest.mark.parametrize(
    "socket", ["udp:127.0.0.1:9", "udp:127.9.9.9:9", "udp:[::1]:9", "unix:/tmp/x.sock", "unix:@x"]
)
def test_default_allows_loopback_and_any_unix_path(socket):
    DestinationPolicy().check(parse_destination(socket))


@pytest.mark.parametrize("socket", ["udp:192.0.2.1:9", "udp:[2001:db8::1]:9", "udp:0.0.0.0:9"])
def test_default_refuses_other_hosts_and_names_the_setting(socket):
    with pytest.raises(DestinationRefused, match=r"security\.allowed_networks"):
        DestinationPolicy().check(parse_destination(socket))


def test_configured_networks_and_unix_prefixes():
    policy = DestinationPolicy.from_settings(["192.0.2.0/24"], ["/run/subscribers"])
    policy.check(parse_destination("udp:192.0.2.7:9"))
    with pytest.raises(DestinationRefused):
        policy.check(parse_destination("udp:127.0.0.1:9"))  # loopback not listed now
    policy.check(parse_destination("unix:/run/subscribers/a.sock"))
    for path in ("/tmp/a.sock", "/run/subscribers/../x.sock", "/run/subscribersX/a.sock"):
        with pytest.raises(DestinationRefused, match=r"security\.unix_path_prefixes"):
            policy.check(parse_destination(f"unix:{path}"))


def test_bad_settings_are_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[security]\nallowed_networks = ["not-a-net"]\n')
    with pytest.raises(ConfigError, match=r"security\.allowed_networks"):
        load(bad)
    bad.write_text('[[subscribe]]\nevent = "E_X"\nsocket = "udp:192.0.2.1:9"\n')
    with pytest.raises(ConfigError, match=r"subscribe\[0\].socket.*security.allowed_networks"):
        load(bad)


def test_configured_subscriptions_come_parsed_and_allowed(tmp_path):
    """The hub takes them as they are: destinations, checked once, when the file is read."""
    good = tmp_path / "good.toml"
    good.write_text(
        'events = ["E_Y", "E_X", "E_Z"]\n'
        '[security]\nallowed_networks = ["192.0.2.0/24"]\n'
        '[[subscribe]]\nevent = "E_X"\nsocket = "udp:192.0.2.7:09000"\n'
        '[[subscribe]]\nevent = "E_Y"\nsocket = "/tmp/y.sock"\n'
    )
    config = load(good)
    assert config.subscriptions == (
        ("E_X", parse_destination("udp:192.0.2.7:9000")),
        ("E_Y", parse_destination("unix:/tmp/y.sock")),
    )
    assert config.events == ("E_Y", "E_X", "E_Z")  # as listed: subscribing declares nothing


def test_a_subscription_to_an_event_not_in_events_is_refused(tmp_path):
    """OpenSIPS refuses to subscribe to an unknown event; a typo in [[subscribe]]
    must not publish a second event that nobody raises."""
    bad = tmp_path / "typo.toml"
    bad.write_text(
        'events = ["E_PIKE_BLOCKED"]\n'
        '[[subscribe]]\nevent = "E_PIKE_BLOCKED"\nsocket = "udp:127.0.0.1:9000"\n'
        '[[subscribe]]\nevent = "E_PIKE_BLOKED"\nsocket = "udp:127.0.0.1:9001"\n'
    )
    with pytest.raises(ConfigError) as err:
        load(bad)
    message = str(err.value)
    assert message.startswith(f"{bad}: key subscribe[1].event: "), message
    assert "'E_PIKE_BLOKED'" in message and "add it to `events`" in message
    # With no events at all, the first subscription is the one named.
    bad.write_text('[[subscribe]]\nevent = "E_X"\nsocket = "udp:127.0.0.1:9"\n')
    with pytest.raises(ConfigError, match=r"key subscribe\[0\]\.event: 'E_X'"):
        load(bad)


def test_configured_subscriptions_of_every_transport(tmp_path):
    """tcp:, rabbitmq: and virtual: sockets in [[subscribe]] parse and pass the
    allow-list like datagrams; a refused or bad one names the key, never a password."""
    good = tmp_path / "good.toml"
    broker = "rabbitmq:bob:s3cret@127.0.0.1/exchange=sip;persistent?pike"
    good.write_text(
        'events = ["E_T", "E_R", "E_V"]\n'
        '[[subscribe]]\nevent = "E_T"\nsocket = "tcp:127.0.0.1:9000;reliable"\n'
        f'[[subscribe]]\nevent = "E_R"\nsocket = "{broker}"\n'
        f'[[subscribe]]\nevent = "E_V"\nsocket = "virtual:FAILOVER {broker} udp:127.0.0.1:9"\n'
    )
    config = load(good)
    assert [(e, d.kind) for e, d in config.subscriptions] == [
        ("E_T", "tcp"),
        ("E_R", "rabbitmq"),
        ("E_V", "virtual"),
    ]
    assert config.subscriptions[1][1] == parse_destination(broker)
    for socket_text, problem in (
        ("rabbitmq:bob:s3cret@192.0.2.9/q", "security.allowed_networks"),
        ("tcp:127.0.0.1:9000;fast", "fast"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(f'[[subscribe]]\nevent = "E_X"\nsocket = "{socket_text}"\n')
        with pytest.raises(ConfigError) as err:
            load(bad)
        assert problem in str(err.value) and "s3cret" not in str(err.value)
        assert "subscribe" in str(err.value)


def test_mi_refuses_a_remote_subscriber_with_a_clear_error(daemon: Daemon):
    daemon.mi("event_publish", ["E_SEC"])
    with pytest.raises(MICallError) as err:
        daemon.mi("event_subscribe", ["E_SEC", "udp:192.0.2.1:9000", 60])
    assert err.value.code == 400
    assert "security.allowed_networks" in err.value.message
    assert daemon.mi("subscribers_list", ["E_SEC"])["Event"]["Subscribers"] == []
