"""Portal messages: every fixture parses, egress round-trips, bad payloads name the field."""

from __future__ import annotations

import copy
import ipaddress
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.portal.derive import (
    coturn_rest_credentials,
    derive_ice_credentials,
    firezone_relay_credentials,
    generate_preshared_key,
)
from gateway.portal.keys import parse_key
from gateway.portal.messages import (
    AllowAccess,
    AuthorizeFlow,
    BroadcastIceCandidates,
    BroadcastInvalidatedIceCandidates,
    ConnectionReady,
    FlowAuthorized,
    IceCandidates,
    Init,
    InvalidateIceCandidates,
    PortalIceCredentials,
    RejectAccess,
    RelaysPresence,
    RequestConnection,
    ResourceUpdated,
    StunRelayEntry,
    TurnRelayEntry,
    encode_egress,
    merge_relays,
    parse_egress,
    parse_ingress,
    parse_relay,
    parse_socket_address,
    relay_to_json,
)
from gateway.resources import (
    CidrResource,
    DnsResource,
    IcmpFilter,
    InternetResource,
    parse_resource,
)

CLIENT = uuid.UUID("3abd725a-733b-4801-ac16-72f26cd98a24")
KEY = "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8="


def _frame(fixtures: Path, name: str) -> dict[str, Any]:
    data = json.loads((fixtures / name).read_text())
    assert isinstance(data, dict)
    return data


def test_every_fixture_is_valid_json(portal_fixtures: Path) -> None:
    files = sorted(portal_fixtures.glob("*.json"))
    assert len(files) >= 21
    for path in files:
        json.loads(path.read_text())


def test_init_without_relays(portal_fixtures: Path) -> None:
    frame = _frame(portal_fixtures, "init.json")
    msg = parse_ingress(frame["event"], frame["payload"])
    assert isinstance(msg, Init)
    assert msg.interface.ipv4 == ipaddress.IPv4Address("100.115.164.78")
    assert msg.interface.ipv6 == ipaddress.IPv6Address("fd00:2021:1111::2c:f6ab")
    assert msg.config.ipv4_masquerade_enabled and msg.relays == ()


def test_authorize_flow_fixture(portal_fixtures: Path) -> None:
    frame = _frame(portal_fixtures, "authorize_flow.json")
    msg = parse_ingress("authorize_flow", frame["payload"])
    assert isinstance(msg, AuthorizeFlow)
    assert msg.ref == frame["payload"]["ref"]
    assert msg.client.id == CLIENT and msg.client.public_key == KEY
    assert len(msg.client.preshared_key_bytes) == 32
    assert msg.client.ipv4 == ipaddress.IPv4Address("100.93.74.51")
    assert msg.client_ice_credentials == PortalIceCredentials("hgwh", "j2fqufatn7xlrrvv6fsvea")
    assert msg.gateway_ice_credentials.username == "ejqt"
    assert msg.expires_at == 1729813989
    assert isinstance(msg.resource, CidrResource)
    assert msg.resource.address == ipaddress.ip_network("172.20.0.0/16")
    # secrets stay out of repr
    assert "BzPiNE9q" not in repr(msg) and "j2fqufatn7" not in repr(msg)


def test_request_connection_fixtures(portal_fixtures: Path) -> None:
    plain = parse_ingress(
        "request_connection", _frame(portal_fixtures, "request_connection.json")["payload"]
    )
    assert isinstance(plain, RequestConnection)
    assert plain.client.domain is None and plain.client.peer.persistent_keepalive == 25
    assert plain.client.ice_parameters.username == "PvCPFevCOgkvVCtH"
    frame = _frame(portal_fixtures, "request_connection_with_domain.json")
    withdomain = parse_ingress("request_connection", frame["payload"])
    assert isinstance(withdomain, RequestConnection)
    assert withdomain.client.domain is not None
    assert withdomain.client.domain.name == "download.httpbin"
    assert len(withdomain.client.domain.proxy_ips) == 8
    assert isinstance(withdomain.resource, DnsResource)
    assert IcmpFilter() in withdomain.resource.filters


def test_relays_presence_invalidate_and_resource_updated(portal_fixtures: Path) -> None:
    presence = parse_ingress(
        "relays_presence", _frame(portal_fixtures, "relays_presence.json")["payload"]
    )
    assert isinstance(presence, RelaysPresence)
    assert len(presence.disconnected_ids) == 2
    (relay,) = presence.connected
    assert isinstance(relay, TurnRelayEntry) and relay.addr == ("172.28.0.101", 3478)
    assert relay.expires_at == 1719367575 and "ZWYiBeFH" not in repr(relay)
    inval = parse_ingress(
        "invalidate_ice_candidates",
        _frame(portal_fixtures, "invalidate_ice_candidates.json")["payload"],
    )
    assert isinstance(inval, InvalidateIceCandidates) and len(inval.candidates) == 1
    updated = parse_ingress(
        "resource_updated", _frame(portal_fixtures, "resource_updated.json")["payload"]
    )
    assert isinstance(updated, ResourceUpdated) and isinstance(updated.resource, DnsResource)


def test_resource_descriptions_fixture_parses(portal_fixtures: Path) -> None:
    data = json.loads((portal_fixtures / "resource_descriptions.json").read_text())
    kinds = [type(parse_resource(item)) for item in data]
    assert kinds == [CidrResource, DnsResource, InternetResource]


def test_spec_examples_for_remaining_ingress_events() -> None:
    allow = parse_ingress(
        "allow_access",
        {
            "ref": "r",
            "client_id": str(CLIENT),
            "flow_id": str(uuid.uuid4()),
            "resource": {
                "id": str(uuid.uuid4()),
                "type": "dns",
                "address": "*.httpbin",
                "name": "*.httpbin",
                "filters": [{"protocol": "icmp"}],
            },
            "expires_at": None,
            "payload": {
                "name": "download.httpbin",
                "proxy_ips": ["100.96.0.1", "fd00:2021:1111:8000::"],
            },
            "client_ipv4": "100.87.247.184",
            "client_ipv6": "fd00:2021:1111::4:4616",
        },
    )
    assert isinstance(allow, AllowAccess) and allow.expires_at is None
    assert allow.payload is not None and allow.payload.name == "download.httpbin"
    reject = parse_ingress(
        "reject_access", {"client_id": str(CLIENT), "resource_id": str(CLIENT), "x": 1}
    )
    assert reject == RejectAccess(CLIENT, CLIENT)
    cands = parse_ingress("ice_candidates", {"client_id": str(CLIENT), "candidates": ["a", "b"]})
    assert cands == IceCandidates(CLIENT, ("a", "b"))


def _authorize_payload(portal_fixtures: Path) -> dict[str, Any]:
    return _frame(portal_fixtures, "authorize_flow.json")["payload"]


@pytest.mark.parametrize(
    ("mutate", "field_name"),
    [
        (lambda p: p.pop("ref"), "'ref'"),
        (lambda p: p.pop("expires_at"), "'expires_at'"),
        (lambda p: p["client"].__setitem__("id", "nope"), "authorize_flow.client.id"),
        (lambda p: p["client"].__setitem__("public_key", KEY.rstrip("=")), "client.public_key"),
        (lambda p: p["client"].__setitem__("preshared_key", "x" * 44), "client.preshared_key"),
        (lambda p: p["client"].__setitem__("ipv4", "fd00::1"), "client.ipv4"),
        (lambda p: p["client"].__setitem__("ipv6", "1.2.3.4"), "client.ipv6"),
        (lambda p: p["resource"].__setitem__("address", "10.0.0.1/8"), "resource.address"),
        (lambda p: p["resource"].__setitem__("filters", [{"protocol": "sctp"}]), "protocol"),
        (lambda p: p.pop("gateway_ice_credentials"), "gateway_ice_credentials"),
        (lambda p: p["client_ice_credentials"].pop("password"), "client_ice_credentials"),
        (lambda p: p.__setitem__("expires_at", "soon"), "expires_at"),
    ],
)
def test_malformed_payload_gives_clear_error(
    portal_fixtures: Path, mutate: Any, field_name: str
) -> None:
    payload = copy.deepcopy(_authorize_payload(portal_fixtures))
    mutate(payload)
    with pytest.raises(ValueError, match=field_name.replace(".", r"\.")) as info:
        parse_ingress("authorize_flow", payload)
    assert "BzPiNE9q" not in str(info.value)  # never echo a PSK


def test_unknown_event_and_non_object_payload() -> None:
    with pytest.raises(ValueError, match="unknown event 'shout'"):
        parse_ingress("shout", {})
    with pytest.raises(ValueError, match="init payload: expected an object"):
        parse_ingress("init", [])
    with pytest.raises(ValueError, match="config"):
        parse_ingress("init", {"interface": {"ipv4": "100.64.0.1", "ipv6": "fd00:2021:1111::1"}})


def test_init_with_dual_stack_relays_merges_consecutive_entries() -> None:
    rid, other = uuid.uuid4(), uuid.uuid4()
    entries = [
        {
            "id": str(rid),
            "type": "turn",
            "addr": "34.80.2.41:3478",
            "username": "u1",
            "password": "p1",
            "expires_at": 1731321600,
        },
        {
            "id": str(rid),
            "type": "turn",
            "addr": "[2600:1900:4030:a1f::]:3478",
            "username": "u2",
            "password": "p2",
            "expires_at": 1731321600,
        },
        {"id": str(uuid.uuid4()), "type": "stun", "addr": "1.2.3.4:3478"},
        {
            "id": str(other),
            "type": "turn",
            "addr": "10.0.0.1:3478",
            "username": "u3",
            "password": "p3",
            "expires_at": 5,
        },
        {
            "id": str(rid),
            "type": "turn",
            "addr": "9.9.9.9:3478",
            "username": "u4",
            "password": "p4",
            "expires_at": 6,
        },
    ]
    init = parse_ingress(
        "init",
        {
            "interface": {"ipv4": "100.64.0.1", "ipv6": "fd00:2021:1111::1"},
            "config": {"ipv4_masquerade_enabled": False, "ipv6_masquerade_enabled": True},
            "relays": entries,
        },
    )
    assert isinstance(init, Init) and isinstance(init.relays[2], StunRelayEntry)
    merged = merge_relays(init.relays)
    assert [r.id for r in merged] == [rid, other, rid]  # non-consecutive duplicate not merged
    first = merged[0]
    assert first.addr_v4 == ("34.80.2.41", 3478)
    assert first.addr_v6 == ("2600:1900:4030:a1f::", 3478)
    assert (first.username, first.password) == ("u2", "p2")  # last entry wins
    assert merged[1].addr_v6 is None and merged[2].addr_v4 == ("9.9.9.9", 3478)
    for entry in init.relays:
        assert parse_relay(relay_to_json(entry), "r") == entry


@pytest.mark.parametrize("bad", ["1.2.3.4", "1.2.3.4:0", "[::1]", "::1:80", "[1.2.3.4]:80", "h:80"])
def test_bad_socket_addresses(bad: str) -> None:
    with pytest.raises(ValueError, match="addr"):
        parse_socket_address(bad, "addr")


@pytest.mark.parametrize(
    "message",
    [
        FlowAuthorized("SFMyNTY.g2gDbQAAAkxn"),
        ConnectionReady("ref-1", PortalIceCredentials("Kd8f", "3GqvYw7TnZ0pLc2sXe9RbA")),
        BroadcastIceCandidates(
            (CLIENT,), ("candidate:1 1 udp 2130706175 10.0.0.5 42881 typ host",)
        ),
        BroadcastInvalidatedIceCandidates((CLIENT, uuid.uuid4()), ("c1", "c2")),
    ],
)
def test_egress_round_trips(message: Any) -> None:
    event, payload = encode_egress(message)
    assert parse_egress(event, json.loads(json.dumps(payload))) == message


def test_egress_shapes_match_the_spec() -> None:
    assert encode_egress(FlowAuthorized("R")) == ("flow_authorized", {"ref": "R"})
    assert encode_egress(ConnectionReady("R", PortalIceCredentials("u", "p"))) == (
        "connection_ready",
        {
            "ref": "R",
            "gateway_payload": {
                "ConnectionAccepted": {"ice_parameters": {"username": "u", "password": "p"}}
            },
        },
    )
    event, payload = encode_egress(BroadcastIceCandidates((CLIENT,), ("c",)))
    assert event == "broadcast_ice_candidates"
    assert payload == {"client_ids": [str(CLIENT)], "candidates": ["c"]}
    with pytest.raises(TypeError):
        encode_egress(object())  # type: ignore[arg-type]


def test_ice_credential_derivation_matches_the_portal_recipe() -> None:
    gw = uuid.UUID("0a133356-7a9e-4b9a-b413-0d95a5720fd8")
    creds = derive_ice_credentials(CLIENT, KEY, gw, KEY)
    import base64
    import hashlib

    text = base64.b32encode(hashlib.sha256(f"{CLIENT}:{KEY}:{gw}:{KEY}".encode()).digest())
    text_s = text.decode().rstrip("=").lower()
    assert len(text_s) == 52
    assert (creds.client.username, creds.client.password) == (text_s[:4], text_s[4:26])
    assert (creds.gateway.username, creds.gateway.password) == (text_s[26:30], text_s[30:])
    assert set(text_s) <= set("abcdefghijklmnopqrstuvwxyz234567")
    other_key = derive_ice_credentials(CLIENT, KEY, gw, "A" * 43 + "=")
    assert other_key != creds  # a gateway key change changes the credentials


def test_psk_and_turn_credentials() -> None:
    import base64
    import hashlib
    import hmac
    import random

    rng = random.Random(4)
    psk = generate_preshared_key(rng)
    assert parse_key(psk, "psk") == psk and generate_preshared_key(rng) != psk
    creds = coturn_rest_credentials("s3cret", 1_700_000_000.5, rng)
    assert creds.expires_at == 1_700_000_000 + 14 * 86400
    expiry, salt = creds.username.split(":")
    assert int(expiry) == creds.expires_at and len(salt) == 22
    expected = base64.b64encode(hmac.new(b"s3cret", creds.username.encode(), hashlib.sha1).digest())
    assert creds.password == expected.decode()
    fz = firezone_relay_credentials("stamp", 100.0, rng)
    assert len(fz.password) == 43 and fz.username.startswith(f"{100 + 14 * 86400}:")
