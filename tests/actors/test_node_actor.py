"""NodeActor with mocked collaborators: portal, TUN, timer and PeerActors are recorders."""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pykka
import pytest

from actors.io.udp import UdpSockets
from actors.messages import Connect, KeyRotated, PortalIngress, SendToPortal
from actors.node import AttachPortal, GetNodeStatus, NodeActor, Reset
from actors.peer import (
    Authorize,
    ForgetClient,
    NewSession,
    PeerFailed,
    PeerHandle,
    RemoveResource,
    SetupDnsResource,
    UpdateResource,
)
from actors.resolver import Resolver
from actors.tun import ConfigureInterface
from gateway.portal.messages import (
    BroadcastIceCandidates,
    BroadcastInvalidatedIceCandidates,
    ConnectionReady,
    FlowAuthorized,
    parse_ingress,
)
from gateway.stun.message import (
    Attr,
    MessageClass,
    Method,
    encode,
    new_request,
    new_response,
    parse,
    short_term_key,
)
from tests.support.clock import ManualClock

CLIENT_ID = uuid.UUID("3abd725a-733b-4801-ac16-72f26cd98a24")


class Recorder(pykka.ThreadingActor):
    """A PeerActor stand-in that records every message it is told."""

    def __init__(self, seen: list[object], **_kwargs: object) -> None:
        super().__init__()
        self.seen = seen

    def on_receive(self, message: Any) -> None:
        self.seen.append(message)


class FakeRelay:
    """A UDP socket on 127.0.0.1 that answers STUN Binding so the node learns candidates."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.address = self.sock.getsockname()

    def answer_binding(self) -> None:
        data, src = self.sock.recvfrom(2048)
        request = parse(data)
        reply = new_response(request, MessageClass.SUCCESS)
        reply.add_xor_address(Attr.XOR_MAPPED_ADDRESS, src)
        self.sock.sendto(encode(reply), src)

    def close(self) -> None:
        self.sock.close()


class Lookups:
    """The resolver's lookups: recorded, held while ``gate`` is clear, answered with
    ``addresses`` (no real DNS: this machine has none)."""

    def __init__(self) -> None:
        self.domains: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.asked = threading.Event()
        self.addresses = [ipaddress.ip_address("93.184.216.34"),
                          ipaddress.ip_address("2606:2800:220:1::1")]

    def resolve(self, domain: str) -> list[Any]:
        self.domains.append(domain)
        self.asked.set()
        assert self.gate.wait(5)
        return list(self.addresses)


@pytest.fixture
def relay() -> Iterator[FakeRelay]:
    fake = FakeRelay()
    yield fake
    fake.close()


@pytest.fixture
def harness(clock: ManualClock) -> Iterator[dict[str, Any]]:
    portal, tun, timer = mock.Mock(), mock.Mock(), mock.Mock()
    peers: dict[uuid.UUID, list[object]] = {}

    def peer_factory(*, client_id: uuid.UUID, **kwargs: object) -> PeerHandle:
        inbox: list[object] = []
        peers[client_id] = inbox
        # The data path records its batches in the same inbox as the actor's messages.
        return PeerHandle(Recorder.start(inbox), lambda batch: inbox.append(("data", batch)))

    lookups = Lookups()
    resolver = Resolver(lookups.resolve)
    ref = NodeActor.start(
        clock=clock, rng=__import__("random").Random(1), timer=timer, tun=tun,
        tun_writer=mock.Mock(), sockets_factory=lambda: UdpSockets(mark=False, ipv6=False),
        resolver=resolver, peer_factory=peer_factory,
    )
    ref.tell(AttachPortal(portal))
    yield {"ref": ref, "portal": portal, "tun": tun, "peers": peers, "lookups": lookups,
           "timer": timer}
    lookups.gate.set()
    ref.stop()
    resolver.shutdown()


def _ingress(fixtures: Path, name: str, **changes: Any) -> PortalIngress:
    frame = json.loads((fixtures / name).read_text())
    frame["payload"].update(changes)
    return PortalIngress(parse_ingress(frame["event"], frame["payload"]))


def _sent(portal: mock.Mock, kind: type) -> list[Any]:
    return [
        c.args[0].message for c in portal.tell.call_args_list
        if isinstance(c.args[0], SendToPortal) and isinstance(c.args[0].message, kind)
    ]


def _status(ref: pykka.ActorRef[Any]) -> dict[str, Any]:
    return ref.ask(GetNodeStatus(), timeout=5)  # type: ignore[no-any-return]


def test_stopping_ends_the_actor_thread_and_the_udp_reader(clock: ManualClock) -> None:
    before = set(threading.enumerate())
    resolver = Resolver()
    ref = NodeActor.start(
        clock=clock, rng=__import__("random").Random(1), timer=mock.Mock(), tun=mock.Mock(),
        tun_writer=mock.Mock(), sockets_factory=lambda: UdpSockets(mark=False, ipv6=False),
        resolver=resolver,
    )
    _status(ref)  # on_start (which starts the reader) has run
    started = set(threading.enumerate()) - before
    assert {t.name.split("-")[0] for t in started} >= {"NodeActor", "UdpReader"}
    ref.stop(timeout=5)
    resolver.shutdown()
    for thread in started:
        thread.join(5)
        assert not thread.is_alive(), thread.name


def test_attach_portal_connects_with_the_node_public_key(harness: dict[str, Any]) -> None:
    status = _status(harness["ref"])
    harness["portal"].tell.assert_any_call(Connect(status["public_key"]))


def test_init_configures_the_tun_and_allocates_on_relays(
    harness: dict[str, Any], portal_fixtures: Path, relay: FakeRelay
) -> None:
    relays = [{"id": "0a133356-7a9e-4b9a-b413-0d95a5720fd8", "type": "turn",
               "addr": f"{relay.address[0]}:{relay.address[1]}", "username": "1:u",
               "password": "p", "expires_at": 1}]
    harness["ref"].tell(_ingress(portal_fixtures, "init.json", relays=relays))
    _status(harness["ref"])
    expected = ConfigureInterface("100.115.164.78", "fd00:2021:1111::2c:f6ab")
    harness["tun"].tell.assert_any_call(expected)
    relay.answer_binding()  # the allocation starts with a STUN Binding to the relay
    status = _status(harness["ref"])
    assert [r["id"] for r in status["relays"]] == ["0a133356-7a9e-4b9a-b413-0d95a5720fd8"]


def test_authorize_flow_without_relays_refetches_init_and_does_not_reply(
    harness: dict[str, Any], portal_fixtures: Path
) -> None:
    harness["ref"].tell(_ingress(portal_fixtures, "authorize_flow.json"))
    status = _status(harness["ref"])
    connects = harness["portal"].tell.call_args_list.count(mock.call(Connect(status["public_key"])))
    assert connects == 2, "the login plus one reconnect for a fresh init"
    assert _sent(harness["portal"], FlowAuthorized) == []
    assert harness["peers"] == {}


def _with_relay(harness: dict[str, Any], portal_fixtures: Path, relay: FakeRelay) -> None:
    relays = [{"id": "0a133356-7a9e-4b9a-b413-0d95a5720fd8", "type": "turn",
               "addr": f"{relay.address[0]}:{relay.address[1]}", "username": "1:u",
               "password": "p", "expires_at": 1}]
    harness["ref"].tell(_ingress(portal_fixtures, "init.json", relays=relays))
    relay.answer_binding()
    _wait_for(lambda: _status(harness["ref"])["host_candidates"])


def test_authorize_flow_starts_a_peer_and_replies(
    harness: dict[str, Any], portal_fixtures: Path, relay: FakeRelay
) -> None:
    _with_relay(harness, portal_fixtures, relay)
    harness["ref"].tell(_ingress(portal_fixtures, "authorize_flow.json"))
    _status(harness["ref"])
    assert [m.ref for m in _sent(harness["portal"], FlowAuthorized)] == [
        json.loads((portal_fixtures / "authorize_flow.json").read_text())["payload"]["ref"]
    ]
    seen = harness["peers"][CLIENT_ID]
    _wait_for(lambda: len(seen) >= 2)
    assert isinstance(seen[0], NewSession) and isinstance(seen[1], Authorize)
    assert seen[1].ipv4 == "100.93.74.51"
    # The host candidate learned from the relay's answer is signalled to the client.
    broadcast = _sent(harness["portal"], BroadcastIceCandidates)
    assert broadcast and broadcast[0].client_ids == (CLIENT_ID,)
    assert any(" typ host" in c for c in broadcast[0].candidates)
    # The same flow again (same ICE credentials) reuses the connection: no new session.
    harness["ref"].tell(_ingress(portal_fixtures, "authorize_flow.json"))
    _status(harness["ref"])
    _wait_for(lambda: len(seen) >= 3)
    assert [type(m) for m in seen] == [NewSession, Authorize, Authorize]


def test_reject_access_and_resource_updated_reach_the_peer(
    harness: dict[str, Any], portal_fixtures: Path, relay: FakeRelay
) -> None:
    _with_relay(harness, portal_fixtures, relay)
    harness["ref"].tell(_ingress(portal_fixtures, "authorize_flow.json"))
    resource_id = "c7793628-8579-465b-83e3-1a5d4af4db3b"
    harness["ref"].tell(PortalIngress(parse_ingress("reject_access", {
        "client_id": str(CLIENT_ID), "resource_id": resource_id, "flow_id": str(uuid.uuid4())})))
    harness["ref"].tell(_ingress(portal_fixtures, "resource_updated.json"))
    _status(harness["ref"])
    seen = harness["peers"][CLIENT_ID]
    _wait_for(lambda: len(seen) >= 4)
    assert isinstance(seen[2], RemoveResource) and str(seen[2].resource_id) == resource_id
    assert isinstance(seen[3], UpdateResource)


def test_reset_rotates_the_key_stops_peers_and_rebinds(
    harness: dict[str, Any], portal_fixtures: Path, relay: FakeRelay
) -> None:
    _with_relay(harness, portal_fixtures, relay)
    harness["ref"].tell(_ingress(portal_fixtures, "authorize_flow.json"))
    before = _status(harness["ref"])
    peer_ref = before["peers"][str(CLIENT_ID)]
    harness["ref"].tell(Reset("test"))
    after = _status(harness["ref"])
    assert after["public_key"] != before["public_key"]
    assert after["ports"] != before["ports"]
    assert after["socket_buffers"] == before["socket_buffers"] != {}  # rebound, same buffers
    assert after["relays"] == [] and after["connections"] == {} and after["peers"] == {}
    harness["portal"].tell.assert_any_call(KeyRotated(after["public_key"]))
    _wait_for(lambda: not peer_ref.is_alive())


def test_peer_failure_stops_the_peer_and_forgets_the_connection(
    harness: dict[str, Any], portal_fixtures: Path, relay: FakeRelay
) -> None:
    _with_relay(harness, portal_fixtures, relay)
    harness["ref"].tell(_ingress(portal_fixtures, "authorize_flow.json"))
    peer_ref = _status(harness["ref"])["peers"][str(CLIENT_ID)]
    harness["ref"].tell(PeerFailed(CLIENT_ID, "WireGuard connection expired"))
    status = _status(harness["ref"])
    assert status["connections"] == {} and status["peers"] == {}
    _wait_for(lambda: not peer_ref.is_alive())


def _wait_for(condition: Any, timeout: float = 5.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("condition not met")


LEGACY_CLIENT = uuid.UUID("2e5c0210-3ac0-49cd-bfc9-8005046291de")


def _legacy_request(fixtures: Path, address: str) -> PortalIngress:
    """request_connection_with_domain.json (domain download.httpbin) for a resource with
    the given address pattern."""
    frame = json.loads((fixtures / "request_connection_with_domain.json").read_text())
    frame["payload"]["resource"]["address"] = address
    return PortalIngress(parse_ingress(frame["event"], frame["payload"]))


def test_legacy_request_connection_answers_after_the_lookup_with_the_nat_in_place(
    harness: dict[str, Any], portal_fixtures: Path, relay: FakeRelay
) -> None:
    """1.4 resolves the domain first, then accepts, allows and sets up the NAT, then
    answers connection_ready (rust/gateway/src/eventloop.rs)."""
    _with_relay(harness, portal_fixtures, relay)
    lookups = harness["lookups"]
    lookups.gate.clear()
    harness["ref"].tell(_legacy_request(portal_fixtures, "*.httpbin"))
    assert lookups.asked.wait(5)
    assert lookups.domains == ["download.httpbin"]
    status = _status(harness["ref"])
    assert str(LEGACY_CLIENT) not in status["connections"]  # nothing before the answer
    assert _sent(harness["portal"], ConnectionReady) == []
    lookups.gate.set()
    _wait_for(lambda: _sent(harness["portal"], ConnectionReady) != [])
    (ready,) = _sent(harness["portal"], ConnectionReady)
    frame = json.loads((portal_fixtures / "request_connection_with_domain.json").read_text())
    assert ready.ref == frame["payload"]["ref"]
    # Random local credentials of the right shape (ufrag 4, password 22), never the client's.
    assert len(ready.ice_credentials.username) == 4 and len(ready.ice_credentials.password) == 22
    seen = harness["peers"][LEGACY_CLIENT]
    _wait_for(lambda: len(seen) >= 3)
    assert [type(m) for m in seen[:3]] == [NewSession, Authorize, SetupDnsResource]
    setup = seen[2]
    assert setup.domain == "download.httpbin" and len(setup.proxy_ips) == 8
    assert list(setup.addresses) == lookups.addresses


def test_legacy_request_connection_for_a_name_outside_the_resource_gets_no_reply(
    harness: dict[str, Any], portal_fixtures: Path, relay: FakeRelay
) -> None:
    """The fixture as the portal sent it: download.httpbin is not a name of ?.httpbin, so
    the NAT set-up fails; 1.4 removes the client's state and sends nothing (the connection
    it accepted stays, and fails later without candidates)."""
    _with_relay(harness, portal_fixtures, relay)
    harness["ref"].tell(_ingress(portal_fixtures, "request_connection_with_domain.json"))
    _wait_for(lambda: harness["peers"].get(LEGACY_CLIENT) is not None)
    seen = harness["peers"][LEGACY_CLIENT]
    _wait_for(lambda: len(seen) >= 2)
    assert [type(m) for m in seen] == [NewSession, ForgetClient]
    assert str(LEGACY_CLIENT) in _status(harness["ref"])["connections"]
    assert _sent(harness["portal"], ConnectionReady) == []


def test_a_reset_during_the_lookup_drops_the_legacy_request(
    harness: dict[str, Any], portal_fixtures: Path, relay: FakeRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The portal asked on behalf of the old key: after a reset the request is void."""
    _with_relay(harness, portal_fixtures, relay)
    lookups = harness["lookups"]
    lookups.gate.clear()
    harness["ref"].tell(_legacy_request(portal_fixtures, "*.httpbin"))
    assert lookups.asked.wait(5)
    harness["ref"].tell(Reset("test"))
    _status(harness["ref"])
    lookups.gate.set()
    _wait_for(lambda: "reset while its domain was looked up" in caplog.text)
    assert _sent(harness["portal"], ConnectionReady) == []
    assert LEGACY_CLIENT not in harness["peers"]


def test_legacy_allow_access_adds_a_resource_without_a_reply(
    harness: dict[str, Any], portal_fixtures: Path, relay: FakeRelay
) -> None:
    _with_relay(harness, portal_fixtures, relay)
    harness["ref"].tell(_ingress(portal_fixtures, "authorize_flow.json"))
    _status(harness["ref"])
    replies_before = len(harness["portal"].tell.call_args_list)
    harness["ref"].tell(PortalIngress(parse_ingress("allow_access", {
        "ref": "opaque", "client_id": str(CLIENT_ID), "flow_id": str(uuid.uuid4()),
        "resource": {"id": "619fbe83-bc95-4635-9a08-68da9a944c88", "type": "dns",
                     "address": "*.httpbin", "name": "*.httpbin", "filters": []},
        "expires_at": None, "payload": {"name": "a.httpbin", "proxy_ips": ["100.96.0.1"]},
        "client_ipv4": "100.93.74.51", "client_ipv6": "fd00:2021:1111::f:853b",
    })))
    seen = harness["peers"][CLIENT_ID]
    _wait_for(lambda: len(seen) >= 4)
    assert [type(m) for m in seen[2:4]] == [Authorize, SetupDnsResource]
    assert harness["lookups"].domains == ["a.httpbin"]  # looked up first, then applied
    assert list(seen[3].addresses) == harness["lookups"].addresses
    sent_after = [c.args[0] for c in harness["portal"].tell.call_args_list[replies_before:]]
    assert not any(isinstance(m, SendToPortal) and not isinstance(
        m.message, BroadcastIceCandidates) for m in sent_after), "allow_access gets no reply"


def test_candidates_and_relays_presence_reach_the_node(
    harness: dict[str, Any], portal_fixtures: Path, relay: FakeRelay
) -> None:
    _with_relay(harness, portal_fixtures, relay)
    harness["ref"].tell(_ingress(portal_fixtures, "authorize_flow.json"))
    harness["ref"].tell(PortalIngress(parse_ingress("ice_candidates", {
        "client_id": str(CLIENT_ID),
        "candidates": ["candidate:1 1 udp 2130706175 127.0.0.1 9 typ host", "garbage"],
    })))
    status = _status(harness["ref"])
    assert status["counters"].get("bad_remote_candidate") == 1  # the bad one alone is skipped
    harness["ref"].tell(_ingress(portal_fixtures, "invalidate_ice_candidates.json",
                                 client_id=str(CLIENT_ID)))
    # relays_presence: the relay we use disconnects, no replacement -> relay gone.
    harness["ref"].tell(PortalIngress(parse_ingress("relays_presence", {
        "disconnected_ids": ["0a133356-7a9e-4b9a-b413-0d95a5720fd8"], "connected": []})))
    status = _status(harness["ref"])
    assert status["relays"] == []
    invalidated = _sent(harness["portal"], BroadcastInvalidatedIceCandidates)
    assert all(m.client_ids == (CLIENT_ID,) for m in invalidated)


def test_a_peer_whose_thread_cannot_start_refuses_that_flow_only(
    clock: ManualClock, portal_fixtures: Path, relay: FakeRelay
) -> None:
    """One thread per client: past RLIMIT_NPROC (or memory) starting a PeerActor fails.
    That one flow gets no reply and no connection; the node keeps serving the others."""
    portal = mock.Mock()
    started: list[uuid.UUID] = []

    def peer_factory(*, client_id: uuid.UUID, **_kwargs: object) -> PeerHandle:
        if client_id == CLIENT_ID:
            raise RuntimeError("can't start new thread")
        started.append(client_id)
        inbox: list[object] = []
        return PeerHandle(Recorder.start(inbox), lambda batch: None)

    resolver = Resolver(Lookups().resolve)
    ref = NodeActor.start(
        clock=clock, rng=__import__("random").Random(1), timer=mock.Mock(), tun=mock.Mock(),
        tun_writer=mock.Mock(), sockets_factory=lambda: UdpSockets(mark=False, ipv6=False),
        resolver=resolver, peer_factory=peer_factory,
    )
    try:
        ref.tell(AttachPortal(portal))
        harness = {"ref": ref, "portal": portal}
        _with_relay(harness, portal_fixtures, relay)
        ref.tell(_ingress(portal_fixtures, "authorize_flow.json"))
        assert str(CLIENT_ID) not in _status(ref)["connections"]
        assert _sent(portal, FlowAuthorized) == []
        other = json.loads((portal_fixtures / "authorize_flow.json").read_text())["payload"]
        other["client"]["id"] = str(uuid.uuid4())
        ref.tell(PortalIngress(parse_ingress("authorize_flow", other)))
        assert other["client"]["id"] in _status(ref)["connections"]  # the node lives on
        assert len(_sent(portal, FlowAuthorized)) == 1
        assert started == [uuid.UUID(other["client"]["id"])]
    finally:
        ref.stop()
        resolver.shutdown()


def test_ice_answers_leave_from_the_local_address_the_check_was_sent_to(
    harness: dict[str, Any], portal_fixtures: Path, relay: FakeRelay
) -> None:
    """rust/connlib/snownet/src/node.rs: sends leave from the local base (IP_PKTINFO). Every 127/8
    address is local: a check sent to 127.0.0.2 must be answered from 127.0.0.2, not from the
    kernel's choice for the client's 127.0.0.1 (an ICE peer drops answers from elsewhere)."""
    _with_relay(harness, portal_fixtures, relay)
    port = _status(harness["ref"])["ports"]["ipv4"]
    harness["ref"].tell(_ingress(portal_fixtures, "authorize_flow.json"))
    _status(harness["ref"])  # the flow is set up before the check arrives (else a race)
    flow = json.loads((portal_fixtures / "authorize_flow.json").read_text())["payload"]
    gateway, client_creds = flow["gateway_ice_credentials"], flow["client_ice_credentials"]
    check = new_request(Method.BINDING, random.Random(5))
    check.add_str(Attr.USERNAME, f"{gateway['username']}:{client_creds['username']}")
    check.add_u32(Attr.PRIORITY, 2130706431).add_u64(Attr.ICE_CONTROLLING, 1)
    raw = encode(check, integrity_key=short_term_key(gateway["password"]), fingerprint=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        client.settimeout(5)
        for local in ("127.0.0.2", "127.0.0.1"):
            client.sendto(raw, (local, port))
            answer, source = client.recvfrom(2048)
            assert parse(answer).cls == MessageClass.SUCCESS
            assert source == (local, port)


def test_a_node_timer_step_that_raises_is_retried_later(
    harness: dict[str, Any], clock: ManualClock
) -> None:
    """A failing timer step must not leave the node without timers (an idle gateway has
    nothing else to re-arm them), nor re-arm it at a deadline that keeps failing."""
    ref = harness["ref"]
    _status(ref)  # on_start has armed the node's wake
    timer = harness["timer"]
    actor = ref._actor_weakref()
    node = actor.node  # type: ignore[union-attr]
    calls: list[float] = []

    def failing(now: float) -> None:
        calls.append(now)
        raise RuntimeError("planted bug")

    node.handle_timeout = failing
    timer.schedule_call.reset_mock()
    actor._on_timer()  # type: ignore[union-attr]  # as the Timer thread would
    _status(ref)
    assert calls == [clock.monotonic()]
    deadline = timer.schedule_call.call_args.args[0]
    assert deadline == pytest.approx(clock.monotonic() + 1.0)
    assert _status(ref)["counters"]["timer_step_failed"] == 1


class _ReaderAddsMidFold(set[tuple[Any, int]]):
    """Channel activity where the UDP reader adds a note while the NodeActor folds the set:
    right after the actor's first look at it (an iteration, or a pop)."""

    def __init__(self, notes: set[tuple[Any, int]], late: tuple[Any, int]) -> None:
        super().__init__(notes)
        self.late: tuple[Any, int] | None = late

    def _reader_adds(self) -> None:
        if self.late is not None:
            set.add(self, self.late)
            self.late = None

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        snapshot = list(set.__iter__(self))
        self._reader_adds()
        return iter(snapshot)

    def pop(self) -> tuple[Any, int]:
        note = set.pop(self)
        self._reader_adds()
        return note


def test_a_channel_note_the_reader_adds_during_the_fold_is_not_lost(
    harness: dict[str, Any], clock: ManualClock
) -> None:
    """The relay's channel-refresh rule needs every note: a copy-then-clear of the set
    lost one the reader added in between (the reader never takes the actor's lock)."""
    ref = harness["ref"]
    _status(ref)
    actor = ref._actor_weakref()
    relay = ("192.0.2.1", 3478)
    activity = _ReaderAddsMidFold({(relay, 0x4001)}, (relay, 0x4002))
    actor._channel_activity = activity  # type: ignore[union-attr]
    noted: list[tuple[Any, int]] = []
    actor.node.note_channel_data = (  # type: ignore[union-attr]
        lambda server, number, now: noted.append((server, number)))
    for _ in range(2):  # the late note is folded now or by the next timer step
        actor._steps.call(  # type: ignore[union-attr]
            lambda: actor._fold_channel_activity(clock.monotonic()))  # type: ignore[union-attr]
    assert sorted(noted) == [(relay, 0x4001), (relay, 0x4002)]
    assert not activity
