"""Regressions for hostile input that used to escape as a non-``gateway.errors`` exception.

Each test names the finding it pins (issue 14): a low-order client key, an AssignedIps whose
DomainStatus reply could not be encoded, lone surrogates in portal strings, unbounded JSON
(nesting, huge integers, NaN/Infinity), and non-finite timestamps.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import RemoteProtocolError
from gateway.packet import ip
from gateway.packet.p2p_control import (
    MAX_DOMAIN_BYTES,
    AssignedIps,
    decode,
    encode_domain_status,
)
from gateway.peer import ClientOnGateway, Drop, Reply
from gateway.portal.login_url import LoginUrlPrototype
from gateway.portal.messages import parse_ingress
from gateway.portal.phoenix import (
    MAX_DEPTH,
    MAX_FRAME_CHARS,
    Ingress,
    Joined,
    OpenSocket,
    PhoenixChannel,
    SendFrame,
)
from gateway.stun.message import (
    Attr,
    Method,
    long_term_key,
    new_request,
    short_term_key,
)
from gateway.stun.message import encode as stun_encode
from gateway.turn.allocation import Allocation
from gateway.wg.keys import StaticKeyPair, is_low_order
from gateway.wg.noise import HandshakeContext

KEY_A = "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8="
ZERO_KEY = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
#: Low-order points of Curve25519 (0, 1 and a point of order 8), as 32 little-endian bytes.
LOW_ORDER = [
    bytes(32),
    bytes([1]) + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]
RID = uuid.UUID("619fbe83-bc95-4635-9a08-68da9a944c88")


def _fixture(portal_fixtures: Path, name: str) -> dict[str, Any]:
    frame = json.loads((portal_fixtures / name).read_text())
    assert isinstance(frame, dict)
    return frame


class Channel:
    """A joined PhoenixChannel and what comes out of it."""

    def __init__(self) -> None:
        proto = LoginUrlPrototype.build("wss://portal.test", "tok", "fz-id", "gw")
        self.channel = PhoenixChannel(proto, random.Random(1), 100.0)
        self.channel.connect(KEY_A, 100.0)
        assert isinstance(self.channel.poll_action(), OpenSocket)
        self.channel.handle_connected(100.0)
        join = self.channel.poll_action()
        assert isinstance(join, SendFrame)
        ref = json.loads(join.text)["ref"]
        self.text(json.dumps({"topic": "gateway", "event": "phx_reply", "ref": ref,
                              "payload": {"status": "ok", "response": {}}}))
        assert isinstance(self.channel.poll_event(), Joined)

    def text(self, text: str) -> None:
        self.channel.handle_text_frame(text, 100.0)

    def events(self) -> list[Any]:
        out = []
        while (event := self.channel.poll_event()) is not None:
            out.append(event)
        return out


def assert_dropped_once(chan: Channel, caplog: pytest.LogCaptureFixture) -> None:
    """The frame was refused: counted, one error logged, the channel still joined."""
    assert chan.events() == []
    assert chan.channel.malformed_frames == 1
    assert chan.channel.state == "joined"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "Dropping portal frame" in errors[0].getMessage()


# --- (a) a low-order client public key ------------------------------------------------------


def test_low_order_points_are_recognised() -> None:
    for point in LOW_ORDER:
        assert is_low_order(point)
    assert not is_low_order(StaticKeyPair.from_private(bytes(range(32))).public)


def test_handshake_context_refuses_a_low_order_key_as_a_gateway_error() -> None:
    static = StaticKeyPair.from_private(bytes(range(32)))
    for point in LOW_ORDER:
        with pytest.raises(RemoteProtocolError):
            HandshakeContext(static, point, None)


def test_authorize_flow_with_a_low_order_key_is_refused(
    portal_fixtures: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frame = _fixture(portal_fixtures, "authorize_flow.json")
    frame["payload"]["client"]["public_key"] = ZERO_KEY
    with pytest.raises(RemoteProtocolError, match="low-order"):
        parse_ingress("authorize_flow", frame["payload"])
    legacy = _fixture(portal_fixtures, "request_connection.json")
    legacy["payload"]["client"]["peer"]["public_key"] = ZERO_KEY
    with pytest.raises(RemoteProtocolError, match="low-order"):
        parse_ingress("request_connection", legacy["payload"])
    chan = Channel()
    chan.text(json.dumps(frame))
    assert_dropped_once(chan, caplog)


# --- (b) AssignedIps whose DomainStatus reply would not fit ----------------------------------


def _assigned_ips(domain: str) -> bytes:
    body = json.dumps(
        {"resource": str(RID), "domain": domain, "proxy_ips": ["100.96.0.1"]},
        ensure_ascii=False,
    ).encode("utf-8", "surrogatepass")
    payload = bytes(8) + body
    return ip.ipv6_header(bytes(16), bytes(16), 255, len(payload), hop_limit=0) + payload


@pytest.mark.parametrize(
    "domain", ["\U0001f600" * 80, "é" * 200, "a" * 254, "a\ud800.com", "\x01" * 100]
)
def test_assigned_ips_beyond_the_bounds_is_ignored(domain: str) -> None:
    packet = _assigned_ips(domain)
    assert len(packet) <= 1280
    assert decode(packet) is None
    peer = ClientOnGateway(
        client_id=uuid.uuid4(),
        ipv4=ipaddress.IPv4Address("100.64.0.1"),
        ipv6=ipaddress.IPv6Address("fd00:2021:1111::1"),
        now=0.0,
    )
    assert peer.handle_inbound(packet, 0.0) == Drop("p2p_ignored")


@pytest.mark.parametrize("char", ["a", "é", "\u4e2d", "\U0001f600", '"', "\\"])
def test_every_accepted_domain_has_an_encodable_reply(char: str) -> None:
    domain = char * (MAX_DOMAIN_BYTES // len(char.encode()))
    event = decode(_assigned_ips(domain))
    assert isinstance(event, AssignedIps) and event.domain == domain
    for active in (True, False):
        assert decode(encode_domain_status(event.resource_id, event.domain, active))
    peer = ClientOnGateway(
        client_id=uuid.uuid4(),
        ipv4=ipaddress.IPv4Address("100.64.0.1"),
        ipv6=ipaddress.IPv6Address("fd00:2021:1111::1"),
        now=0.0,
    )
    assert isinstance(peer.handle_inbound(_assigned_ips(domain), 0.0), Reply)


# --- (c) lone surrogates in portal strings ---------------------------------------------------


def test_lone_surrogate_in_a_turn_username_refuses_init_and_relays_presence(
    portal_fixtures: Path,
) -> None:
    presence = _fixture(portal_fixtures, "relays_presence.json")
    presence["payload"]["connected"][0]["username"] = "1719367575:\ud800"
    with pytest.raises(RemoteProtocolError, match="surrogate"):
        parse_ingress("relays_presence", presence["payload"])
    init = _fixture(portal_fixtures, "init.json")
    init["payload"]["relays"] = presence["payload"]["connected"]
    with pytest.raises(RemoteProtocolError, match="surrogate"):
        parse_ingress("init", init["payload"])


def test_lone_surrogate_in_an_ice_password_refuses_authorize_flow(
    portal_fixtures: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frame = _fixture(portal_fixtures, "authorize_flow.json")
    frame["payload"]["client_ice_credentials"]["password"] = "j2fq\udfff"
    with pytest.raises(RemoteProtocolError, match="surrogate"):
        parse_ingress("authorize_flow", frame["payload"])
    chan = Channel()
    chan.text(json.dumps(frame))  # json.dumps writes the surrogate as the escape "\udfff"
    assert "\\udfff" in json.dumps(frame)
    assert_dropped_once(chan, caplog)


def test_stun_keys_and_attributes_never_raise_on_a_lone_surrogate() -> None:
    assert len(long_term_key("user\ud800", "realm", "pass")) == 16
    assert short_term_key("\udc00") != short_term_key("x")
    msg = new_request(Method.BINDING, random.Random(1)).add_str(Attr.USERNAME, "a\ud800:b")
    assert stun_encode(msg, integrity_key=short_term_key("\ud800"), fingerprint=True)
    allocation = Allocation(
        relay_id="r", servers=[("192.0.2.1", 3478)], username="\ud800", password="\udbff",
        software="test", rng=random.Random(1), now=0.0,
    )
    assert allocation.poll_transmit() is not None


# --- (d) unbounded JSON frames ---------------------------------------------------------------


def _init_with(portal_fixtures: Path, field: str) -> str:
    """The real ``init`` frame with one more (ignored) payload field, as raw JSON text."""
    text = json.dumps(_fixture(portal_fixtures, "init.json"))
    head, sep, tail = text.partition('"payload": {')
    assert sep
    return f'{head}{sep}"x": {field}, {tail}'


def test_the_init_frame_with_a_benign_extra_field_is_delivered(portal_fixtures: Path) -> None:
    chan = Channel()
    chan.text(_init_with(portal_fixtures, '[[{"a": [1, -2.5e3, "\\ud83d\\ude00"]}]]'))
    (event,) = chan.events()
    assert isinstance(event, Ingress) and chan.channel.malformed_frames == 0


@pytest.mark.parametrize(
    "field",
    [
        "[" * 1000 + "]" * 1000,
        "{" + '"a":{' * 999 + "}" * 1000,
        "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),
        "1" * 4400,
        "-" + "9" * 4400,
        "NaN",
        "Infinity",
        "-Infinity",
        "1e999",
        '"\\ud800"',
        '{"\\udc00": 1}',
        '"' + "a" * MAX_FRAME_CHARS + '"',
    ],
)
def test_unbounded_frames_are_dropped_and_the_channel_stays_up(
    portal_fixtures: Path, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    chan = Channel()
    chan.text(_init_with(portal_fixtures, field))
    assert_dropped_once(chan, caplog)
    chan.text(_init_with(portal_fixtures, "1"))
    assert isinstance(chan.events()[0], Ingress)


def test_nan_expires_at_in_a_frame_is_dropped(
    portal_fixtures: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chan = Channel()
    text = json.dumps(_fixture(portal_fixtures, "authorize_flow.json"))
    chan.text(text.replace('"expires_at": 1729813989', '"expires_at": NaN'))
    assert_dropped_once(chan, caplog)


def test_deep_brackets_inside_strings_do_not_count(portal_fixtures: Path) -> None:
    chan = Channel()
    frame = _fixture(portal_fixtures, "init.json")
    frame["payload"]["ignored"] = "[{" * 500 + '\\"'
    chan.text(json.dumps(frame))
    (event,) = chan.events()
    assert isinstance(event, Ingress) and chan.channel.malformed_frames == 0


# --- (e) non-finite or absurd timestamps -----------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, 1e300, 10**400])
def test_non_finite_or_out_of_range_expires_at_is_refused(
    portal_fixtures: Path, value: float
) -> None:
    frame = _fixture(portal_fixtures, "authorize_flow.json")
    frame["payload"]["expires_at"] = value
    with pytest.raises(RemoteProtocolError, match="expires_at"):
        parse_ingress("authorize_flow", frame["payload"])
    presence = _fixture(portal_fixtures, "relays_presence.json")
    presence["payload"]["connected"][0]["expires_at"] = value
    with pytest.raises(RemoteProtocolError, match="expires_at"):
        parse_ingress("relays_presence", presence["payload"])


@pytest.mark.parametrize("body", ['"' + '\\"' * 100_000, '["a' * 100_000, "[{" * 100_000])
def test_frame_bounds_are_checked_in_linear_time(
    body: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An earlier depth check blanked strings with a regex that went quadratic on escaped
    quotes (minutes for this frame); the generous bound only catches that, not noise."""
    chan = Channel()
    started = time.perf_counter()
    chan.text('{"topic":"gateway","event":"init","ref":null,"payload":' + body + "}")
    assert time.perf_counter() - started < 5.0
    assert not any(isinstance(e, Ingress) for e in chan.events())
    assert chan.channel.state in ("joined", "backoff")  # a cut string reads as a cut frame


def test_a_cut_frame_stays_a_cut_frame_however_deep() -> None:
    """The depth bound sees only complete containers, so a frame cut short inside deep
    nesting is still the transient IO error it was (gateway/portal/phoenix.py), not a drop."""
    chan = Channel()
    chan.text('{"topic":"gateway","event":"init","ref":null,"payload":' + "[" * 100)
    assert chan.channel.state == "backoff" and chan.channel.malformed_frames == 0
