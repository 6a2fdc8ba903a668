"""PortalActor <-> development portal over loopback: real websocket-client and websockets."""

from __future__ import annotations

import json
import queue
import random
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pykka
import pytest
import websocket

from actors.clock import SystemClock
from actors.messages import (
    Connect,
    GetPortalStatus,
    KeyRotated,
    PortalDisconnected,
    PortalFatal,
    PortalIngress,
    PortalJoined,
    SendToPortal,
)
from actors.portal import PortalActor
from actors.timer import Timer
from actors.useragent import user_agent
from devportal import DevPortal, parse_config
from gateway.exit_codes import ExitCode
from gateway.portal.derive import derive_ice_credentials
from gateway.portal.login_url import LoginUrlPrototype
from gateway.portal.messages import AuthorizeFlow, FlowAuthorized, Init, merge_relays
from tests.support.portal import Recorder, next_of

KEY_A = "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8="
KEY_B = "OR2dYCLwMEtwqtjOxSm4SU7BbHJDfM8ZCqK7HKXXxDw="
CLIENT_KEY = "zHtdIFPDm8QQkqjbmAc1r8O1WegviA6UeUTP6rpminA="
RESOURCE = "0b3c6d7e-1f2a-4b5c-8d9e-0f1a2b3c4d5e"
RELAY = "3e6f9a0b-4c5d-4e6f-b021-3c4d5e6f7a81"
CONFIG = {
    "gateway_tokens": ["gw-token"],
    "clients": [{"name": "alice", "token": "alice-token"}],
    "resources": [
        {"id": RESOURCE, "type": "cidr", "address": "172.20.0.0/16", "filters": {"tcp": [80]}}
    ],
    "policies": [{"client": "alice", "resources": [RESOURCE], "expires_in": 600}],
    "relays": [{"id": RELAY, "addrs": ["127.0.0.1:3478", "[::1]:3478"], "secret": "turn-secret"}],
}


def _listen(port: int = 0) -> socket.socket:
    return socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR: restart on the same port


@dataclass
class Rig:
    portal: DevPortal
    timer: Timer
    inbox: queue.Queue[Any]

    def start_gateway(self, token: str = "gw-token") -> pykka.ActorRef:
        prototype = LoginUrlPrototype.build(self.portal.url, token, "fz-id-1", "gw-test")
        return PortalActor.start(
            prototype=prototype,
            listener=Recorder.start(self.inbox),
            clock=SystemClock(),
            rng=random.Random(11),
            timer=self.timer,
            user_agent=user_agent(),
        )


@pytest.fixture
def rig() -> Iterator[Rig]:
    portal = DevPortal(parse_config(CONFIG), rng=random.Random(5)).start(sock=_listen())
    timer = Timer(SystemClock())
    timer.start()
    try:
        yield Rig(portal, timer, queue.Queue())
    finally:
        pykka.ActorRegistry.stop_all(timeout=5)
        timer.stop()
        portal.stop()


def test_join_and_init(rig: Rig) -> None:
    gateway = rig.start_gateway()
    gateway.tell(Connect(KEY_A))
    next_of(rig.inbox, PortalJoined, timeout=5)
    init = next_of(rig.inbox, PortalIngress, timeout=5).message
    assert isinstance(init, Init)
    assert init.interface.ipv4 in parse_config(CONFIG).ipv4_pool
    (relay,) = merge_relays(init.relays)
    assert str(relay.id) == RELAY and relay.addr_v4 == ("127.0.0.1", 3478)
    assert relay.addr_v6 == ("::1", 3478)
    (info,) = rig.portal.gateways()
    assert info.public_key == KEY_A and info.open_sockets == 1
    status = gateway.ask(GetPortalStatus(), timeout=2)
    assert status.state == "joined" and "gw-token" not in status.url


def test_portal_restart_reconnects_with_backoff(rig: Rig) -> None:
    gateway = rig.start_gateway()
    gateway.tell(Connect(KEY_A))
    next_of(rig.inbox, PortalJoined, timeout=5)
    next_of(rig.inbox, PortalIngress, timeout=5)
    _, port = rig.portal.address
    rig.portal.stop()
    next_of(rig.inbox, PortalDisconnected, timeout=5)
    # a refused reconnect is transient too
    assert "connection failed" in next_of(rig.inbox, PortalDisconnected, timeout=5).reason
    rig.portal.start(sock=_listen(port))
    next_of(rig.inbox, PortalJoined, timeout=10)
    assert isinstance(next_of(rig.inbox, PortalIngress, timeout=5).message, Init)
    status = gateway.ask(GetPortalStatus(), timeout=2)
    assert status.state == "joined"
    # one real reconnect; the refused attempt before it counts as an attempt only
    assert status.reconnects == 1 and status.connection_attempts >= 3


def _turn_usernames(init: Any) -> set[str]:
    assert isinstance(init, Init)
    return {relay.username for relay in init.relays}


def test_every_init_brings_fresh_turn_credentials(rig: Rig) -> None:
    """As the real portal: a dropped socket, and a restart even with the same seed, give
    the gateway new TURN credentials for the same relay (what it must survive)."""
    gateway = rig.start_gateway()
    gateway.tell(Connect(KEY_A))
    next_of(rig.inbox, PortalJoined, timeout=5)
    first = _turn_usernames(next_of(rig.inbox, PortalIngress, timeout=5).message)
    assert rig.portal.drop_gateway() == 1
    next_of(rig.inbox, PortalDisconnected, timeout=5)
    next_of(rig.inbox, PortalJoined, timeout=10)
    second = _turn_usernames(next_of(rig.inbox, PortalIngress, timeout=5).message)
    _, port = rig.portal.address
    rig.portal.stop()
    restarted = DevPortal(parse_config(CONFIG), rng=random.Random(5)).start(sock=_listen(port))
    try:
        next_of(rig.inbox, PortalJoined, timeout=10)
        third = _turn_usernames(next_of(rig.inbox, PortalIngress, timeout=5).message)
    finally:
        restarted.stop()
    assert len(first) == len(second) == len(third) == 2  # one per address of the relay
    assert first.isdisjoint(second) and first.isdisjoint(third) and second.isdisjoint(third)


def test_rejected_token_is_fatal_without_retry_storm(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    gateway = rig.start_gateway(token="wrong-token")
    gateway.tell(Connect(KEY_A))
    fatal = next_of(rig.inbox, PortalFatal, timeout=5)
    assert fatal.exit_code == ExitCode.AUTH_REJECTED
    assert fatal.reason == "portal refused the connection: HTTP 401 Invalid token"
    # no further attempt within a window that would hold several backoff steps
    assert not rig.portal.wait_for(lambda p: p.connection_attempts > 1, timeout=1.5)
    assert rig.portal.connection_attempts == 1
    assert gateway.ask(GetPortalStatus(), timeout=2).state == "failed"
    assert "wrong-token" not in caplog.text


def test_key_rotation_replaces_the_socket(rig: Rig) -> None:
    gateway = rig.start_gateway()
    gateway.tell(Connect(KEY_A))
    next_of(rig.inbox, PortalJoined, timeout=5)
    next_of(rig.inbox, PortalIngress, timeout=5)
    gateway.tell(KeyRotated(KEY_B))
    next_of(rig.inbox, PortalJoined, timeout=5)
    assert isinstance(next_of(rig.inbox, PortalIngress, timeout=5).message, Init)

    def rotated(p: DevPortal) -> bool:
        infos = p.gateways()
        return len(infos) == 1 and infos[0].public_key == KEY_B and infos[0].open_sockets == 1

    assert rig.portal.wait_for(rotated, timeout=5)
    assert rig.portal.gateways()[0].connections == 2


def _client_frame(ws: websocket.WebSocket, event: str, timeout: float = 5.0) -> dict[str, Any]:
    ws.settimeout(timeout)
    while True:
        frame = json.loads(ws.recv())
        if frame["event"] == event:
            return frame


def test_flow_between_dev_client_and_gateway(rig: Rig) -> None:
    gateway = rig.start_gateway()
    gateway.tell(Connect(KEY_A))
    next_of(rig.inbox, PortalJoined, timeout=5)
    next_of(rig.inbox, PortalIngress, timeout=5)
    client = websocket.create_connection(
        f"{rig.portal.url}/client/websocket?token=alice-token&external_id=c1&name=alice"
        f"&public_key={CLIENT_KEY.replace('+', '%2B').replace('/', '%2F').replace('=', '%3D')}",
        timeout=5,
    )
    try:
        client.send(json.dumps({"topic": "client", "event": "phx_join", "payload": {}, "ref": 0}))
        init = _client_frame(client, "init")["payload"]
        assert [r["id"] for r in init["resources"]] == [RESOURCE]
        client.send(
            json.dumps(
                {
                    "topic": "client",
                    "event": "create_flow",
                    "payload": {"resource_id": RESOURCE},
                    "ref": 1,
                }
            )
        )
        authorize = next_of(rig.inbox, PortalIngress, timeout=5).message
        assert isinstance(authorize, AuthorizeFlow)
        client_id = DevPortal.client_id("alice")
        gateway_id = DevPortal.gateway_id(
            LoginUrlPrototype.build("ws://x", "t", "fz-id-1", "n").external_id
        )
        expected = derive_ice_credentials(client_id, CLIENT_KEY, gateway_id, KEY_A)
        assert authorize.client.id == client_id and authorize.client.public_key == CLIENT_KEY
        assert authorize.gateway_ice_credentials == expected.gateway
        assert authorize.client_ice_credentials == expected.client
        assert authorize.expires_at is not None
        gateway.tell(SendToPortal(FlowAuthorized(authorize.ref)))
        created = _client_frame(client, "flow_created")["payload"]
        assert created["gateway_public_key"] == KEY_A
        assert created["preshared_key"] == authorize.client.preshared_key
        assert created["gateway_ice_credentials"]["username"] == expected.gateway.username
        # candidates travel both ways
        client.send(
            json.dumps(
                {
                    "topic": "client",
                    "event": "broadcast_ice_candidates",
                    "payload": {"gateway_ids": [str(gateway_id)], "candidates": ["cand-c"]},
                    "ref": 2,
                }
            )
        )
        forwarded = next_of(rig.inbox, PortalIngress, timeout=5).message
        assert forwarded.client_id == client_id and forwarded.candidates == ("cand-c",)
        # a resource the client has no policy for is refused
        other = str(uuid.uuid4())
        client.send(
            json.dumps(
                {
                    "topic": "client",
                    "event": "create_flow",
                    "payload": {"resource_id": other},
                    "ref": 3,
                }
            )
        )
        assert _client_frame(client, "flow_creation_failed")["payload"]["reason"] == "forbidden"
        assert rig.portal.reject_access("alice", uuid.UUID(RESOURCE)) == 1
        rejected = next_of(rig.inbox, PortalIngress, timeout=5).message
        assert rejected.client_id == client_id
        assert rig.portal.reject_access("alice", uuid.UUID(RESOURCE)) == 0  # already revoked
        relays = {"disconnected_ids": [RELAY], "connected": []}
        assert rig.portal.push_to_gateway("relays_presence", relays) == 1
        presence = next_of(rig.inbox, PortalIngress, timeout=5).message
        assert presence.disconnected_ids == (uuid.UUID(RELAY),)
        assert rig.portal.wait_for_event("in", "flow_authorized") is not None
    finally:
        client.close()
