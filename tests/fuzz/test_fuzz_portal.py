"""Fuzz: portal messages, from the frame text to the cores that apply them.

Seeds are the real portal messages in ``tests/fixtures/portal``. ``parse_ingress`` and the
other parsers may refuse only with a ``gateway.errors`` type; the Phoenix channel's
``handle_text_frame`` and the cores the NodeActor feeds (``Node`` methods, the peer's
``Tunnel`` set-up, ``ClientOnGateway``) must not raise at all on what parsing accepted.
"""

from __future__ import annotations

import copy
import json
import random
import uuid
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.dns_pattern import matches
from gateway.gateway import ice_credentials as _ice
from gateway.gateway import turn_servers as _turn_servers
from gateway.ice.candidate import Candidate
from gateway.peer import ClientOnGateway
from gateway.portal.login_url import LoginUrlPrototype
from gateway.portal.messages import (
    AllowAccess,
    AuthorizeFlow,
    IceCandidates,
    Init,
    InvalidateIceCandidates,
    RejectAccess,
    RelaysPresence,
    RequestConnection,
    ResourceUpdated,
    parse_ingress,
)
from gateway.portal.phoenix import Joined, OpenSocket, PhoenixChannel, SendFrame
from gateway.resources import parse_resource
from gateway.wg.tunnel import Tunnel
from tests.fuzz.seeds import connected_sim
from tests.fuzz.support import (
    HOSTILE_STRINGS,
    fixtures,
    fuzz,
    mutated_json,
    mutated_text,
    only_gateway_errors,
)

_FIXTURES = fixtures()
_CLIENT = "3abd725a-733b-4801-ac16-72f26cd98a24"  # the simulated client's id


def _ingress_seeds() -> list[dict[str, Any]]:
    frames = [f for f in _FIXTURES.values() if isinstance(f, dict) and f.get("topic") == "gateway"
              and f.get("event") not in ("phx_reply", "phx_close", "disconnect")]
    ice = copy.deepcopy(_FIXTURES["invalidate_ice_candidates"])
    ice["event"] = "ice_candidates"
    ice["payload"]["client_id"] = _CLIENT
    flow = _FIXTURES["authorize_flow"]["payload"]
    allow = {
        "client_id": _CLIENT, "resource": flow["resource"], "expires_at": None,
        "payload": {"name": "a.httpbin", "proxy_ips": ["100.96.0.1"]}, "ref": "r",
        "client_ipv4": "100.93.74.51", "client_ipv6": "fd00:2021:1111::f:853b",
    }
    reject = {"client_id": _CLIENT, "resource_id": flow["resource"]["id"]}
    extra = [
        ice,
        {"topic": "gateway", "event": "allow_access", "ref": None, "payload": allow},
        {"topic": "gateway", "event": "reject_access", "ref": None, "payload": reject},
    ]
    return frames + extra


_SEEDS = _ingress_seeds()
_EVENTS = sorted({f["event"] for f in _SEEDS})


@st.composite
def mutated_frame(draw: st.DrawFn) -> dict[str, Any]:
    frame = draw(st.sampled_from(_SEEDS))
    payload = draw(mutated_json(frame["payload"]))
    return {**frame, "payload": payload}


@fuzz(600)
@given(mutated_frame())
def test_parse_ingress_refuses_only_with_gateway_errors(frame: dict[str, Any]) -> None:
    only_gateway_errors(lambda: parse_ingress(frame["event"], frame["payload"]))


_RESOURCES = [
    *_FIXTURES["resource_descriptions"],
    _FIXTURES["request_connection_with_domain"]["payload"]["resource"],
    {"id": _CLIENT, "type": "cidr", "address": "10.0.0.0/8", "name": "n",
     "filters": [_FIXTURES[name] for name in _FIXTURES if name.startswith("filter_")]},
]


@fuzz(300)
@given(st.sampled_from(_RESOURCES).flatmap(mutated_json))
def test_parse_resource_refuses_only_with_gateway_errors(resource: Any) -> None:
    only_gateway_errors(lambda: parse_resource(resource))


_CANDIDATES = [
    "candidate:7854631899965427361 1 udp 1694498559 172.28.0.100 47717 typ srflx",
    "candidate:1 1 UDP 2130706431 fd00::1 5000 typ host generation 0 network-id 1",
    "candidate:2 1 udp 16777215 10.0.0.4 3478 typ relay raddr 1.2.3.4 rport 5",
]


@fuzz(500)
@given(st.one_of(
    st.sampled_from(_CANDIDATES).flatmap(mutated_text),
    st.text(max_size=100),
    st.sampled_from(HOSTILE_STRINGS),
))
def test_candidate_parse_refuses_only_with_gateway_errors(line: str) -> None:
    only_gateway_errors(lambda: Candidate.parse(line))


@fuzz(500)
@given(
    st.one_of(st.sampled_from(["*.httpbin", "**.a.b", "?.httpbin", "a[b-c]*.x"]).flatmap(
        mutated_text), st.sampled_from(HOSTILE_STRINGS)),
    st.one_of(st.sampled_from(["a.httpbin", "x.a.b"]).flatmap(mutated_text),
              st.sampled_from(HOSTILE_STRINGS)),
)
def test_dns_pattern_never_raises(pattern: str, domain: str) -> None:
    matches(pattern, domain)


# --- the Phoenix channel with text frames ---------------------------------------------------


def _joined_channel() -> PhoenixChannel:
    proto = LoginUrlPrototype.build("wss://portal.test", "tok", "fz-id", "gw")
    channel = PhoenixChannel(proto, random.Random(1), 0.0)
    channel.connect("fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8=", 0.0)
    assert isinstance(channel.poll_action(), OpenSocket)
    channel.handle_connected(0.0)
    join = channel.poll_action()
    assert isinstance(join, SendFrame)
    ref = json.loads(join.text)["ref"]
    channel.handle_text_frame(json.dumps(
        {"topic": "gateway", "event": "phx_reply", "ref": ref, "payload": {"status": "ok"}}
    ), 0.0)
    assert isinstance(channel.poll_event(), Joined)
    return channel


_FRAME_TEXTS = [json.dumps(f) for f in _FIXTURES.values()]


@fuzz(800)
@given(st.one_of(
    st.sampled_from(_FRAME_TEXTS).flatmap(mutated_text),
    mutated_frame().map(lambda f: json.dumps(f, allow_nan=True)),
    mutated_json(_FIXTURES["phx_reply_error_not_found"]).map(json.dumps),
))
def test_phoenix_channel_never_raises_on_a_text_frame(text: str) -> None:
    channel = _joined_channel()
    channel.handle_text_frame(text, 1.0)
    while channel.poll_action() is not None or channel.poll_event() is not None:
        pass
    assert channel.state in ("joined", "backoff", "failed")


# --- messages applied to the cores (what the NodeActor and a PeerActor do) ------------------


def _apply(message: object) -> None:
    sim = connected_sim(relayed=False)
    node, now = sim.node, sim.now
    unix = sim.clock.unix()
    if isinstance(message, Init):
        node.update_relays([], _turn_servers(message.relays), now)
    elif isinstance(message, RelaysPresence):
        removed = [str(rid) for rid in message.disconnected_ids]
        node.update_relays(removed, _turn_servers(message.connected), now)
    elif isinstance(message, IceCandidates):
        node.add_remote_candidates(message.client_id, message.candidates, now)
    elif isinstance(message, InvalidateIceCandidates):
        node.remove_remote_candidates(message.client_id, message.candidates, now)
    elif isinstance(message, AuthorizeFlow | RequestConnection | AllowAccess):
        if isinstance(message, AuthorizeFlow):
            client = message.client
            node.upsert_connection(
                client.id, client_public_key=client.public_key_bytes,
                preshared_key=client.preshared_key_bytes,
                local=_ice(message.gateway_ice_credentials),
                remote=_ice(message.client_ice_credentials), now=now,
            )
            key, psk = client.public_key_bytes, client.preshared_key_bytes
            ipv4, ipv6 = client.ipv4, client.ipv6
        elif isinstance(message, RequestConnection):
            peer = message.client.peer
            node.accept_connection(
                message.client.id, client_public_key=peer.public_key_bytes,
                preshared_key=peer.preshared_key_bytes,
                remote=_ice(message.client.ice_parameters), now=now,
            )
            key, psk = peer.public_key_bytes, peer.preshared_key_bytes
            ipv4, ipv6 = peer.ipv4, peer.ipv6
        else:
            key, psk = sim.client_static.public, bytes(32)
            ipv4, ipv6 = message.client_ipv4, message.client_ipv6
        Tunnel(static=node.static, peer_public=key, preshared_key=psk, local_index=0x100,
               rate_limiter=node.rate_limiter, rng=random.Random(1), now=now)
        peer_core = ClientOnGateway(client_id=uuid.uuid4(), ipv4=ipv4, ipv6=ipv6, now=now)
        peer_core.add_resource(message.resource, message.expires_at, now)
        peer_core.handle_timeout(now + 1.0, unix + 1.0)
        peer_core.handle_timeout(now + 1e6, unix + 1e10)
        peer_core.poll_timeout()
    elif isinstance(message, ResourceUpdated):
        peer_core = ClientOnGateway(client_id=uuid.uuid4(), ipv4=sim_ip4, ipv6=sim_ip6, now=now)
        peer_core.update_resource(message.resource)
    elif isinstance(message, RejectAccess):
        peer_core = ClientOnGateway(client_id=uuid.uuid4(), ipv4=sim_ip4, ipv6=sim_ip6, now=now)
        peer_core.remove_resource(message.resource_id)
    node.handle_timeout(now + 1.0)
    node.poll_timeout()
    while node.poll_transmit() is not None or node.poll_event() is not None:
        pass


sim_ip4 = parse_ingress("authorize_flow", _FIXTURES["authorize_flow"]["payload"]).client.ipv4  # type: ignore[union-attr]
sim_ip6 = parse_ingress("authorize_flow", _FIXTURES["authorize_flow"]["payload"]).client.ipv6  # type: ignore[union-attr]


@fuzz(400)
@given(mutated_frame())
def test_accepted_messages_never_make_the_cores_raise(frame: dict[str, Any]) -> None:
    try:
        message = parse_ingress(frame["event"], frame["payload"])
    except ValueError:  # MalformedMessage: refused, as the other test checks
        return
    _apply(message)


def test_every_seed_is_accepted_and_applied() -> None:
    """The seeds are valid: the mutations start from messages the cores really apply."""
    for frame in _SEEDS:
        _apply(parse_ingress(frame["event"], frame["payload"]))
    assert set(_EVENTS) >= {"init", "authorize_flow", "request_connection", "relays_presence",
                            "ice_candidates", "invalidate_ice_candidates", "resource_updated",
                            "allow_access", "reject_access"}
