"""The gateway core (``gateway/gateway.py``) alone: portal messages and session reports in,
commands out, on a manual clock with no actor, socket or thread."""

from __future__ import annotations

import ipaddress
import json
import random
import uuid
from pathlib import Path
from typing import Any

from gateway.gateway import (
    AuthorizeResource,
    Command,
    ConfigureInterface,
    ConnectPortal,
    DeliverHandshakes,
    ForgetClient,
    Gateway,
    PortalKeyRotated,
    ProtectKey,
    Rebind,
    RelayRouteAdded,
    RelayRouteRemoved,
    RemoveResource,
    Resolve,
    RouteAdded,
    RouteRemoved,
    SendToPortal,
    SetPath,
    SetupDns,
    StartSession,
    StopSession,
    UpdateResource,
)
from gateway.node import PathChanged, RelayedPath
from gateway.portal.messages import (
    BroadcastIceCandidates,
    ConnectionReady,
    FlowAuthorized,
    parse_ingress,
)
from tests.support.clock import ManualClock

CLIENT_ID = uuid.UUID("3abd725a-733b-4801-ac16-72f26cd98a24")
LEGACY_CLIENT = uuid.UUID("2e5c0210-3ac0-49cd-bfc9-8005046291de")
RELAY = {"id": "0a133356-7a9e-4b9a-b413-0d95a5720fd8", "type": "turn",
         "addr": "192.0.2.1:3478", "username": "1:u", "password": "p", "expires_at": 1}
ADDRESSES = (ipaddress.ip_address("93.184.216.34"),)


def _message(fixtures: Path, name: str, **changes: Any) -> Any:
    frame = json.loads((fixtures / name).read_text())
    frame["payload"].update(changes)
    return parse_ingress(frame["event"], frame["payload"])


def _commands(core: Gateway) -> list[Command]:
    out = []
    while (command := core.poll_command()) is not None:
        out.append(command)
    return out


def _no_broadcasts(commands: list[Command]) -> list[Command]:
    """What is left once the candidate signalling (the node's business) is left out."""
    return [c for c in commands
            if not (isinstance(c, SendToPortal) and isinstance(c.message, BroadcastIceCandidates))]


def _core(clock: ManualClock, fixtures: Path | None = None) -> Gateway:
    core = Gateway(rng=random.Random(1), now=clock.monotonic())
    if fixtures is not None:
        core.handle_portal(_message(fixtures, "init.json", relays=[RELAY]), clock.monotonic())
        _commands(core)
    return core


def _legacy(fixtures: Path, address: str | None = None) -> Any:
    frame = json.loads((fixtures / "request_connection_with_domain.json").read_text())
    if address is not None:
        frame["payload"]["resource"]["address"] = address
    return parse_ingress(frame["event"], frame["payload"])


def test_init_configures_the_interface_and_the_relays(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock)
    core.handle_portal(_message(portal_fixtures, "init.json", relays=[RELAY]), clock.monotonic())
    assert _commands(core) == [ConfigureInterface("100.115.164.78", "fd00:2021:1111::2c:f6ab")]
    assert [r["id"] for r in core.node.relays()] == [RELAY["id"]]
    # The allocation starts at once: a datagram to the relay and a deadline.
    tx = core.poll_transmit()
    assert tx is not None and tx.dst == ("192.0.2.1", 3478)
    assert core.poll_timeout() is not None


def test_attaching_the_portal_logs_in_with_the_public_key(clock: ManualClock) -> None:
    core = _core(clock)
    core.portal_attached()
    assert _commands(core) == [ConnectPortal(core.public_key)]


def test_authorize_flow_without_relays_refetches_init_and_does_not_reply(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock)
    core.handle_portal(_message(portal_fixtures, "authorize_flow.json"), clock.monotonic())
    assert _commands(core) == [ConnectPortal(core.public_key)]
    assert core.sessions() == []


def test_authorize_flow_for_a_new_client_starts_its_session_then_replies(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock, portal_fixtures)
    flow = _message(portal_fixtures, "authorize_flow.json")
    core.handle_portal(flow, clock.monotonic())
    commands = _no_broadcasts(_commands(core))
    start, route, authorize, reply = commands
    assert isinstance(start, StartSession) and start.client_id == CLIENT_ID
    assert start.static is core.node.static and start.rate_limiter is core.node.rate_limiter
    assert route == RouteAdded(start.local_index >> 8, CLIENT_ID)
    assert isinstance(authorize, AuthorizeResource) and authorize.ipv4 == "100.93.74.51"
    assert reply == SendToPortal(FlowAuthorized(flow.ref), CLIENT_ID)
    assert core.sessions() == [CLIENT_ID]


def test_authorize_flow_for_an_existing_client_only_authorizes(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock, portal_fixtures)
    flow = _message(portal_fixtures, "authorize_flow.json")
    core.handle_portal(flow, clock.monotonic())
    _commands(core)
    core.handle_portal(flow, clock.monotonic())  # same ICE credentials: the connection stays
    commands = _no_broadcasts(_commands(core))
    assert [type(c) for c in commands] == [AuthorizeResource, SendToPortal]


def test_authorize_flow_with_new_credentials_replaces_the_session_and_its_route(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock, portal_fixtures)
    core.handle_portal(_message(portal_fixtures, "authorize_flow.json"), clock.monotonic())
    (first,) = [c for c in _commands(core) if isinstance(c, StartSession)]
    again = _message(portal_fixtures, "authorize_flow.json",
                     gateway_ice_credentials={"username": "abcd", "password": "x" * 22})
    core.handle_portal(again, clock.monotonic())
    commands = _no_broadcasts(_commands(core))
    assert commands[0] == RouteRemoved(first.local_index >> 8)
    assert isinstance(commands[1], StartSession) and commands[1].local_index != first.local_index
    assert [type(c) for c in commands[2:]] == [RouteAdded, AuthorizeResource, SendToPortal]


def test_a_session_lost_before_the_reply_drops_the_reply_and_the_connection(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    """The shell could not start (or tell) the client's session: no access, no reply."""
    core = _core(clock, portal_fixtures)
    core.handle_portal(_message(portal_fixtures, "authorize_flow.json"), clock.monotonic())
    start = core.poll_command()
    while isinstance(start, SendToPortal):  # candidate signalling comes first or later
        start = core.poll_command()
    assert isinstance(start, StartSession)
    core.session_lost(CLIENT_ID, "no thread for its PeerActor")
    rest = _no_broadcasts(_commands(core))
    assert rest == [RouteRemoved(start.local_index >> 8), StopSession(CLIENT_ID)]
    assert core.node.connection(CLIENT_ID) is None
    assert core.sessions() == []


def test_legacy_request_without_a_domain_accepts_at_once(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock, portal_fixtures)
    request = _message(portal_fixtures, "request_connection.json")
    core.handle_portal(request, clock.monotonic())
    commands = _no_broadcasts(_commands(core))
    assert [type(c) for c in commands] == [StartSession, RouteAdded, AuthorizeResource,
                                           SendToPortal]
    reply = commands[-1]
    assert isinstance(reply, SendToPortal) and isinstance(reply.message, ConnectionReady)
    assert reply.message.ref == request.ref
    assert len(reply.message.ice_credentials.username) == 4


def test_legacy_request_with_a_domain_resolves_first_then_sets_up_the_nat(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock, portal_fixtures)
    request = _legacy(portal_fixtures, "*.httpbin")
    core.handle_portal(request, clock.monotonic())
    assert _commands(core) == [Resolve("download.httpbin", request, 0)]
    assert core.node.connection(LEGACY_CLIENT) is None  # nothing before the answer
    core.handle_resolved(request, ADDRESSES, 0, clock.monotonic())
    commands = _no_broadcasts(_commands(core))
    assert [type(c) for c in commands] == [StartSession, RouteAdded, AuthorizeResource,
                                           SetupDns, SendToPortal]
    setup = commands[3]
    assert isinstance(setup, SetupDns) and setup.addresses == ADDRESSES
    assert setup.domain == "download.httpbin" and len(setup.proxy_ips) == 8


def test_legacy_request_for_a_name_outside_the_resource_forgets_the_client_silently(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock, portal_fixtures)
    request = _legacy(portal_fixtures)  # download.httpbin is not a name of ?.httpbin
    core.handle_portal(request, clock.monotonic())
    _commands(core)
    core.handle_resolved(request, ADDRESSES, 0, clock.monotonic())
    commands = _no_broadcasts(_commands(core))
    assert [type(c) for c in commands] == [StartSession, RouteAdded, ForgetClient]
    assert core.node.connection(LEGACY_CLIENT) is not None  # it stays, and fails later


def test_a_reset_during_the_lookup_drops_the_legacy_request(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock, portal_fixtures)
    request = _legacy(portal_fixtures, "*.httpbin")
    core.handle_portal(request, clock.monotonic())
    (resolve,) = _commands(core)
    assert isinstance(resolve, Resolve)
    core.reset("test", clock.monotonic())
    _commands(core)
    core.handle_resolved(request, ADDRESSES, resolve.generation, clock.monotonic())
    assert _commands(core) == []
    assert core.node.connection(LEGACY_CLIENT) is None


def test_allow_access_authorizes_an_existing_session_after_the_lookup(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock, portal_fixtures)
    allow = parse_ingress("allow_access", {
        "ref": "opaque", "client_id": str(CLIENT_ID), "flow_id": str(uuid.uuid4()),
        "resource": {"id": "619fbe83-bc95-4635-9a08-68da9a944c88", "type": "dns",
                     "address": "*.httpbin", "name": "*.httpbin", "filters": []},
        "expires_at": None, "payload": {"name": "a.httpbin", "proxy_ips": ["100.96.0.1"]},
        "client_ipv4": "100.93.74.51", "client_ipv6": "fd00:2021:1111::f:853b",
    })
    core.handle_portal(allow, clock.monotonic())
    assert _commands(core) == [Resolve("a.httpbin", allow, 0)]
    core.handle_resolved(allow, ADDRESSES, 0, clock.monotonic())
    assert _commands(core) == []  # no connection: ignored, and no reply ever
    core.handle_portal(_message(portal_fixtures, "authorize_flow.json"), clock.monotonic())
    _commands(core)
    core.handle_resolved(allow, ADDRESSES, 0, clock.monotonic())
    assert [type(c) for c in _commands(core)] == [AuthorizeResource, SetupDns]


def test_reject_access_and_resource_updated_go_to_sessions_only(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock, portal_fixtures)
    reject = parse_ingress("reject_access", {
        "client_id": str(CLIENT_ID), "resource_id": "c7793628-8579-465b-83e3-1a5d4af4db3b",
        "flow_id": str(uuid.uuid4())})
    core.handle_portal(reject, clock.monotonic())
    core.handle_portal(_message(portal_fixtures, "resource_updated.json"), clock.monotonic())
    assert _commands(core) == []
    core.handle_portal(_message(portal_fixtures, "authorize_flow.json"), clock.monotonic())
    _commands(core)
    core.handle_portal(reject, clock.monotonic())
    core.handle_portal(_message(portal_fixtures, "resource_updated.json"), clock.monotonic())
    assert [type(c) for c in _commands(core)] == [RemoveResource, UpdateResource]


def test_a_failed_session_forgets_the_connection_and_stops(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock, portal_fixtures)
    core.handle_portal(_message(portal_fixtures, "authorize_flow.json"), clock.monotonic())
    (start,) = [c for c in _commands(core) if isinstance(c, StartSession)]
    core.session_failed(CLIENT_ID, "crashed")
    assert _commands(core) == [RouteRemoved(start.local_index >> 8), StopSession(CLIENT_ID)]
    assert core.node.connection(CLIENT_ID) is None
    core.session_failed(CLIENT_ID, "again")  # nothing left to stop
    assert _commands(core) == []


def test_a_relayed_path_publishes_its_channel_route_and_a_new_path_replaces_it(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock, portal_fixtures)
    core.handle_portal(_message(portal_fixtures, "authorize_flow.json"), clock.monotonic())
    _commands(core)
    relayed = RelayedPath(RELAY["id"], ("192.0.2.1", 3478), 0x4001, ("198.51.100.7", 5000))
    core.node._events.append(PathChanged(CLIENT_ID, relayed))  # as ICE nominating would
    core.handle_timeout(clock.monotonic())
    assert _commands(core) == [
        SetPath(CLIENT_ID, relayed),
        RelayRouteAdded(("192.0.2.1", 3478), 0x4001, CLIENT_ID, ("198.51.100.7", 5000)),
    ]
    moved = RelayedPath(RELAY["id"], ("192.0.2.1", 3478), 0x4002, ("198.51.100.7", 5001))
    core.node._events.append(PathChanged(CLIENT_ID, moved))
    core.handle_timeout(clock.monotonic())
    assert _commands(core) == [
        SetPath(CLIENT_ID, moved),
        RelayRouteRemoved(("192.0.2.1", 3478), 0x4001),
        RelayRouteAdded(("192.0.2.1", 3478), 0x4002, CLIENT_ID, ("198.51.100.7", 5001)),
    ]


def test_reset_rotates_the_key_ends_every_session_rebinds_then_tells_the_portal(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock, portal_fixtures)
    core.handle_portal(_message(portal_fixtures, "authorize_flow.json"), clock.monotonic())
    (start,) = [c for c in _commands(core) if isinstance(c, StartSession)]
    old_key = core.public_key
    core.reset("test", clock.monotonic())
    commands = _commands(core)
    assert commands == [
        ProtectKey(core.node.static.private),
        RouteRemoved(start.local_index >> 8),
        StopSession(CLIENT_ID),
        Rebind(),
        PortalKeyRotated(core.public_key),
    ]
    assert core.public_key != old_key and core.resets == 1
    assert core.sessions() == [] and core.node.connections() == []


def test_handshakes_go_to_sessions_and_are_counted_without_one(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    core = _core(clock, portal_fixtures)
    core.handle_portal(_message(portal_fixtures, "authorize_flow.json"), clock.monotonic())
    (start,) = [c for c in _commands(core) if isinstance(c, StartSession)]
    # A handshake response (type 2) to our receiver index routes by that index.
    response = (b"\x02\x00\x00\x00" + bytes(4) + (start.local_index | 1).to_bytes(4, "little")
                + bytes(80))
    local, src = ("10.0.0.1", 51820), ("198.51.100.7", 5000)
    core.handle_datagrams([(local, src, response)], clock.monotonic())
    handshakes = [c for c in _commands(core) if isinstance(c, DeliverHandshakes)]
    assert handshakes == [DeliverHandshakes(CLIENT_ID, [(response, src)])]
    core.session_failed(CLIENT_ID, "gone")
    _commands(core)
    core.handle_datagrams([(local, src, response)], clock.monotonic())
    assert not any(isinstance(c, DeliverHandshakes) for c in _commands(core))


def test_the_session_a_message_uses_is_named_for_the_shell_to_check(
    clock: ManualClock, portal_fixtures: Path
) -> None:
    """The shell checks that session is alive first: when the message is handled, not
    while its domain is looked up, and not for an answer a reset made void."""
    core = _core(clock)
    assert core.session_to_check(_message(portal_fixtures, "authorize_flow.json")) == CLIENT_ID
    legacy = _legacy(portal_fixtures)
    assert core.session_to_check(legacy) is None  # resolved first
    assert core.session_to_check(legacy, 0) == LEGACY_CLIENT
    plain = _message(portal_fixtures, "request_connection.json")  # no domain: at once
    assert core.session_to_check(plain) == plain.client.id
    core.reset("test", clock.monotonic())
    assert core.session_to_check(legacy, 0) is None
    assert core.session_to_check(_message(portal_fixtures, "init.json")) is None
