"""Supervision (README, "Supervision"): what a failure of each actor or IO thread costs.

A PeerActor, or a client's data path on a shared reader or Timer thread, takes only its
client down; a PortalActor is restarted (within a budget); a NodeActor or TunActor stops
the process with exit 1; ``/readyz`` is ready only while joined and those actors live.
Failures are injected (a handler made to raise): the root causes of today's triggers are
fixed in the cores, and supervision must hold for the next unknown one.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pykka
import pytest

from actors import app
from actors.backpressure import InFlight
from actors.clock import SystemClock
from actors.io.udp import PeerRoute, UdpReader, UdpSockets
from actors.messages import GetPortalStatus, PortalIngress, SendToPortal
from actors.node import INDEX_SHIFT, AttachPortal, GetNodeStatus, NodeActor, Reset
from actors.peer import (
    Authorize,
    GetPeerStatus,
    NewSession,
    PeerActor,
    PeerFailed,
    PeerHandle,
    start_peer,
)
from actors.peer_session import PeerSession
from actors.resolver import Resolver
from actors.timer import Timer
from gateway.config import GatewayConfig
from gateway.node import Node
from gateway.portal.login_url import LoginUrlPrototype
from gateway.portal.messages import FlowAuthorized, parse_ingress
from gateway.portal.phoenix import PhoenixChannel
from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter
from tests.actors.test_node_actor import (
    CLIENT_ID,
    FakeRelay,
    Lookups,
    Recorder,
    _ingress,
    _sent,
    _status,
    _wait_for,
    _with_relay,
)
from tests.support.clock import ManualClock
from tests.support.fake_tun import FakeTun
from tests.support.portal import FakeWebSocket, FakeWebSocketFactory

# ----------------------------------------------------------------------------- peers


class FailingPeer(PeerActor):
    """The real PeerActor, except that its handler raises while ``fail`` is set."""

    fail = threading.Event()

    def _control(self, message: Any, now: float) -> Any:
        if self.fail.is_set() and isinstance(message, NewSession):
            raise RuntimeError("injected PeerActor failure")
        return super()._control(message, now)


@pytest.fixture
def relay() -> Iterator[FakeRelay]:
    fake = FakeRelay()
    yield fake
    fake.close()


@pytest.fixture
def node_world(clock: ManualClock) -> Iterator[dict[str, Any]]:
    """A NodeActor whose PeerActors are real (``FailingPeer``) or recorders."""
    portal, tun = mock.Mock(), mock.Mock()
    started: list[pykka.ActorRef[Any]] = []
    kind = {"peer": "failing"}
    inboxes: list[list[object]] = []
    FailingPeer.fail.clear()

    def peer_factory(*, client_id: uuid.UUID, node: pykka.ActorRef[Any], **kw: Any) -> PeerHandle:
        if kind["peer"] == "recorder":
            inbox: list[object] = []
            inboxes.append(inbox)
            ref = Recorder.start(inbox)
            started.append(ref)
            return PeerHandle(ref, lambda batch: None)
        session = PeerSession(
            client_id=client_id, tun=kw["tun"], tun_writer=kw["tun_writer"],
            sockets=kw["sockets"], clock=kw["clock"], rng=kw["rng"], timer=kw["timer"],
            notify_node=node.tell,
        )
        ref = FailingPeer.start(session=session, clock=kw["clock"], resolver=kw["resolver"],
                                net_inflight=kw["net_inflight"])
        started.append(ref)
        return PeerHandle(ref, session.from_network)

    resolver = Resolver(Lookups().resolve)
    ref = NodeActor.start(
        clock=clock, rng=random.Random(1), timer=mock.Mock(), tun=tun,
        tun_writer=mock.Mock(), sockets_factory=lambda: UdpSockets(mark=False, ipv6=False),
        resolver=resolver, peer_factory=peer_factory,
    )
    ref.tell(AttachPortal(portal))
    yield {"ref": ref, "portal": portal, "started": started, "kind": kind, "inboxes": inboxes}
    FailingPeer.fail.clear()
    ref.stop()
    resolver.shutdown()


def test_a_failing_peer_actor_ends_its_client_only_and_the_next_flow_starts_afresh(
    node_world: dict[str, Any], portal_fixtures: Path, relay: FakeRelay
) -> None:
    node = node_world["ref"]
    _with_relay(node_world, portal_fixtures, relay)
    FailingPeer.fail.set()
    node.tell(_ingress(portal_fixtures, "authorize_flow.json"))
    _wait_for(lambda: node_world["started"] and not node_world["started"][0].is_alive())
    # The NodeActor lives and has forgotten the connection and the dead actor.
    _wait_for(lambda: _status(node)["connections"] == {} and _status(node)["peers"] == {})
    FailingPeer.fail.clear()
    replies = len(_sent(node_world["portal"], FlowAuthorized))
    node.tell(_ingress(portal_fixtures, "authorize_flow.json"))  # the same flow again
    status = _status(node)
    assert str(CLIENT_ID) in status["connections"]
    (fresh,) = status["peers"].values()
    assert fresh is node_world["started"][1] and fresh.is_alive()
    assert len(_sent(node_world["portal"], FlowAuthorized)) == replies + 1
    # It has a WireGuard session: the new PeerActor handled NewSession.
    assert fresh.ask(GetPeerStatus(), timeout=5)["client_id"] == str(CLIENT_ID)


@pytest.mark.parametrize("trigger", ["resource_updated", "reject_access", "authorize_flow"])
def test_a_dead_peer_found_on_tell_is_a_failed_peer_not_a_node_crash(
    node_world: dict[str, Any], portal_fixtures: Path, relay: FakeRelay, trigger: str
) -> None:
    """The peer died and its report is not in yet: whatever the node tells it next must
    not raise in the NodeActor (before: ActorDeadError, a fatal NodeActor failure)."""
    node = node_world["ref"]
    node_world["kind"]["peer"] = "recorder"
    _with_relay(node_world, portal_fixtures, relay)
    node.tell(_ingress(portal_fixtures, "authorize_flow.json"))
    _status(node)
    (dead,) = node_world["started"]
    dead.stop(timeout=5)  # gone without a word, as after a failure whose report is late
    if trigger == "resource_updated":
        node.tell(_ingress(portal_fixtures, "resource_updated.json"))
    elif trigger == "reject_access":
        node.tell(PortalIngress(parse_ingress("reject_access", {
            "client_id": str(CLIENT_ID), "resource_id": str(uuid.uuid4()),
            "flow_id": str(uuid.uuid4())})))
    else:
        node.tell(_ingress(portal_fixtures, "authorize_flow.json"))
    status = _status(node)  # the node answers: alive
    if trigger == "authorize_flow":  # a fresh connection and PeerActor for the same flow
        assert list(status["peers"].values()) == [node_world["started"][1]]
        assert len(_sent(node_world["portal"], FlowAuthorized)) == 2
        fresh = node_world["inboxes"][1]
        _wait_for(lambda: len(fresh) >= 2)
        assert [type(m) for m in fresh] == [NewSession, Authorize]
    else:
        assert status["connections"] == {} and status["peers"] == {}


def test_a_late_failure_report_of_a_replaced_peer_is_ignored(
    node_world: dict[str, Any], portal_fixtures: Path, relay: FakeRelay
) -> None:
    node = node_world["ref"]
    node_world["kind"]["peer"] = "recorder"
    _with_relay(node_world, portal_fixtures, relay)
    node.tell(_ingress(portal_fixtures, "authorize_flow.json"))
    _status(node)
    old = node_world["started"][0]
    old.stop(timeout=5)
    node.tell(_ingress(portal_fixtures, "authorize_flow.json"))  # replaces the dead one
    _status(node)
    node.tell(PeerFailed(CLIENT_ID, "its PeerActor crashed", old.actor_urn))
    status = _status(node)
    assert str(CLIENT_ID) in status["connections"]
    assert list(status["peers"].values()) == [node_world["started"][1]]


# ----------------------------------------------------------------------------- data path


def _session(clock: ManualClock, timer: Timer, told: list[object]) -> PeerSession:
    session = PeerSession(
        client_id=CLIENT_ID, tun=mock.Mock(), tun_writer=mock.Mock(), sockets=mock.Mock(),
        clock=clock, rng=random.Random(2), timer=timer, notify_node=told.append,
    )
    session.owner = "urn:uuid:owner"
    return session


def _break(session: PeerSession) -> None:
    """Every entry of the session's data path raises (a bug, or input nothing checked)."""
    boom = mock.Mock(side_effect=RuntimeError("injected data-path failure"))
    session.core.from_network_batch = boom  # type: ignore[method-assign]
    session.core.from_tun_batch = boom  # type: ignore[method-assign]
    session.core.handle_timeout = boom  # type: ignore[method-assign]


@pytest.mark.parametrize("entry", ["from_network", "from_tun", "on_timer"])
def test_a_raising_data_path_closes_that_session_and_reports_it_once(
    clock: ManualClock, entry: str
) -> None:
    told: list[object] = []
    session = _session(clock, Timer(clock), told)
    _break(session)
    call = {
        "from_network": lambda: session.from_network([(b"x" * 32, ("10.0.0.1", 5))]),
        "from_tun": lambda: session.from_tun([b"packet"]),
        "on_timer": session.on_timer,
    }[entry]
    call()  # contained: the calling (shared) thread sees no exception
    call()
    assert told == [PeerFailed(CLIENT_ID, told[0].reason, "urn:uuid:owner")]  # type: ignore[attr-defined]
    session.from_network([(b"y" * 32, ("10.0.0.1", 5))])
    assert session.counters["closed"] >= 1


def _transport(index: int, payload: bytes = b"") -> bytes:
    """A WireGuard transport message header for ``index`` (enough for the reader's demux)."""
    return struct.pack("<II", 4, index) + bytes(8) + payload.ljust(16, b"\0")


def test_the_udp_reader_survives_a_raising_session_and_keeps_serving_others(
    clock: ManualClock,
) -> None:
    told: list[object] = []
    broken = _session(clock, Timer(clock), told)
    _break(broken)
    others: list[list[tuple[bytes, Any]]] = []
    got_other = threading.Event()

    def other(batch: list[tuple[bytes, Any]]) -> None:
        others.append(batch)
        got_other.set()

    sockets = UdpSockets(mark=False, ipv6=False)
    routes = {1: PeerRoute(broken.from_network), 2: PeerRoute(other)}
    reader = UdpReader(sockets, to_node=lambda _b: None, peer_routes=routes,
                       index_shift=INDEX_SHIFT)
    reader.start()
    port = sockets.ports()["ipv4"]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(_transport(1 << INDEX_SHIFT), ("127.0.0.1", port))
            _wait_for(lambda: told)
            client.sendto(_transport(2 << INDEX_SHIFT, b"other"), ("127.0.0.1", port))
            assert got_other.wait(5)
            client.sendto(_transport(1 << INDEX_SHIFT), ("127.0.0.1", port))
            _wait_for(lambda: broken.counters["closed"] == 1)
        assert reader.is_alive()
        assert [type(m) for m in told] == [PeerFailed]  # reported once, then closed
        assert others[0][0][0].endswith(b"other".ljust(16, b"\0"))
    finally:
        reader.stop()
        reader.join(5)
        sockets.close()


def test_the_timer_thread_survives_a_raising_session_and_keeps_firing(
    clock: ManualClock,
) -> None:
    timer = Timer(clock)
    timer.start()
    try:
        told: list[object] = []
        broken = _session(clock, timer, told)
        _break(broken)
        with broken.lock:
            broken._wake.arm(clock.monotonic())  # due now: the Timer thread calls it
        _wait_for(lambda: told)
        fired = threading.Event()
        timer.schedule_call(clock.monotonic(), fired.set)
        assert fired.wait(5), "the Timer thread died with the session"
        assert [type(m) for m in told] == [PeerFailed]
    finally:
        timer.stop()


def test_a_failing_peer_actor_closes_its_session_and_names_itself(clock: ManualClock) -> None:
    node = mock.Mock()
    rng = random.Random(3)
    gateway = StaticKeyPair.generate(rng)
    handle = start_peer(
        client_id=CLIENT_ID, node=node, tun=mock.Mock(), tun_writer=mock.Mock(),
        sockets=mock.Mock(), clock=clock, rng=rng, timer=Timer(clock),
        resolver=mock.Mock(), net_inflight=InFlight(8),
    )
    session: PeerSession = handle.deliver.__self__  # type: ignore[attr-defined]
    session.new_session_locked = mock.Mock(  # type: ignore[method-assign]
        side_effect=RuntimeError("injected"))
    handle.ref.tell(NewSession(0x1234500, bytes(32), bytes(32), gateway,
                               HandshakeRateLimiter(gateway.public, rng)))
    _wait_for(lambda: not handle.ref.is_alive() and node.tell.call_count)
    (failed,) = [c.args[0] for c in node.tell.call_args_list]
    assert failed == PeerFailed(CLIENT_ID, "its PeerActor crashed", handle.ref.actor_urn)
    session.from_network([(b"z" * 32, ("10.0.0.1", 5))])
    assert session.counters["closed"] == 1


# ----------------------------------------------------------------------------- runtime

TOKEN = "supervision-test-token"


class Gateway:
    """``app._start_actors`` on a fake TUN and an in-memory portal websocket."""

    def __init__(self) -> None:
        self.tun = FakeTun()
        self.factory = FakeWebSocketFactory()
        self.timer = Timer(SystemClock())
        self.timer.start()
        config = GatewayConfig(token=TOKEN, api_url="wss://portal.test", name="gw")
        prototype = LoginUrlPrototype.build(config.api_url, TOKEN, "fz-id", "gw")
        self.runtime = app._start_actors(
            config, prototype, SystemClock(), random.Random(5), self.timer,
            lambda _name: self.tun, lambda *_a, **_k: None, "test/1.0",
            websocket_factory=self.factory,
        )

    def public_key(self) -> str:
        return str(self.runtime.node.ask(GetNodeStatus(), timeout=5)["public_key"])

    def join(self, count: int) -> FakeWebSocket:
        """The ``count``-th socket opens and joins; returns it once the gateway is ready."""
        assert self.factory.wait_for_sockets(count, timeout=5)
        sock = self.factory.sockets[count - 1]
        sock.listener.on_open()
        _wait_for(lambda: [f for f in _frames(sock) if f["event"] == "phx_join"])
        join = next(f for f in _frames(sock) if f["event"] == "phx_join")
        sock.reply_ok(join["ref"])
        _wait_for(self.runtime.is_ready)
        return sock

    def close(self) -> None:
        app.stop(self.runtime)
        self.timer.stop()


def _frames(sock: FakeWebSocket) -> list[dict[str, Any]]:
    return [json.loads(text) for text in list(sock.sent)]


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    gw = Gateway()
    yield gw
    gw.close()


@pytest.fixture
def raising_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame "boom" makes the Phoenix channel raise (any bug in the portal's path)."""
    original = PhoenixChannel.handle_text_frame

    def handle_text_frame(self: PhoenixChannel, text: str, now: float) -> None:
        if text == "boom":
            raise RuntimeError("injected portal failure")
        original(self, text, now)

    monkeypatch.setattr(PhoenixChannel, "handle_text_frame", handle_text_frame)


def test_a_failed_portal_actor_is_restarted_with_the_current_key_and_not_ready_meanwhile(
    gateway: Gateway, raising_channel: None
) -> None:
    runtime = gateway.runtime
    gateway.join(1)
    runtime.reset()  # the key rotates: the restart must use the new one, not the first
    rotated = gateway.join(2)
    key = gateway.public_key()
    assert rotated.public_key == key
    old_portal = runtime.portal
    rotated.listener.on_text("boom")
    assert gateway.factory.wait_for_sockets(3, timeout=5)
    _wait_for(lambda: not old_portal.is_alive())
    assert rotated.closed_gracefully  # the old socket's end was told to the portal
    third = gateway.factory.sockets[2]
    assert third.public_key == key
    assert runtime.portal is not old_portal and runtime.portal.is_alive()
    assert not runtime.is_ready()  # reconnecting: not joined yet
    assert runtime.node.is_alive() and not runtime.stopping.is_set()
    gateway.join(3)
    # The replacement works: what the node sends reaches the new socket.
    runtime.portal.tell(SendToPortal(FlowAuthorized("after-restart")))
    _wait_for(lambda: any(f["event"] == "flow_authorized" for f in _frames(third)))
    assert runtime.portal.ask(GetPortalStatus(), timeout=5).state == "joined"


def test_a_portal_actor_that_keeps_failing_ends_the_process_with_exit_1(
    gateway: Gateway, raising_channel: None
) -> None:
    runtime = gateway.runtime
    for attempt in range(1, app.PORTAL_RESTARTS + 2):
        sock = gateway.join(attempt)
        sock.listener.on_text("boom")
    assert runtime.stopping.wait(5)
    assert runtime.exit_code == 1 and not runtime.is_ready()
    assert len(gateway.factory.sockets) == app.PORTAL_RESTARTS + 1  # no restart past it


def test_the_restart_budget_is_per_window() -> None:
    clock = ManualClock()
    fatal: list[tuple[str, int]] = []
    attached: list[object] = []
    node = mock.Mock()
    node.tell.side_effect = attached.append
    supervisor = app.PortalSupervisor(
        start=lambda _on_crash: mock.Mock(), node=node, clock=clock,
        on_fatal=lambda reason, code: fatal.append((reason, code)),
        stopping=threading.Event(), restarts=2, window=60.0,
    )
    supervisor.start()
    supervisor.crashed("x")
    supervisor.crashed("x")
    clock.tick(61)  # the earlier restarts are out of the window
    supervisor.crashed("x")
    supervisor.crashed("x")
    assert fatal == [] and len(attached) == 4
    supervisor.crashed("x")  # a third within the window
    assert [code for _reason, code in fatal] == [1] and len(attached) == 4


def test_readyz_is_not_ready_while_joined_if_the_portal_actor_is_dead(
    gateway: Gateway,
) -> None:
    gateway.join(1)
    gateway.runtime.portal.stop(timeout=5)  # dead, though the last news was "joined"
    assert gateway.runtime.portal_state == "joined"
    assert not gateway.runtime.is_ready()


def test_a_failed_tun_actor_ends_the_process_with_exit_1(gateway: Gateway) -> None:
    runtime = gateway.runtime
    gateway.join(1)
    gateway.tun.inject_eof()  # the device went away under the reader
    assert runtime.stopping.wait(5)
    assert runtime.exit_code == 1 and not runtime.is_ready()
    assert gateway.tun.wait_closed()


def test_a_failed_node_actor_ends_the_process_with_exit_1_and_leaves_nothing_running(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = gateway.runtime
    gateway.join(1)
    monkeypatch.setattr(Node, "reset", mock.Mock(side_effect=RuntimeError("injected")))
    runtime.node.tell(Reset("test"))
    assert runtime.stopping.wait(5)
    assert runtime.exit_code == 1 and not runtime.is_ready()
    app.stop(runtime)  # what ``run`` does next
    assert pykka.ActorRegistry.get_all() == []
    _wait_for(lambda: not [t for t in threading.enumerate()
                           if t.name in ("UdpReader", "TunReader") and t.is_alive()])


def test_a_node_actor_that_cannot_start_is_escalated(clock: ManualClock) -> None:
    fatal: list[tuple[str, int]] = []

    def no_sockets() -> UdpSockets:
        raise OSError("no available UDP sockets")

    NodeActor.start(
        clock=clock, rng=random.Random(1), timer=mock.Mock(), tun=mock.Mock(),
        tun_writer=mock.Mock(), sockets_factory=no_sockets, resolver=mock.Mock(),
        on_fatal=lambda reason, code: fatal.append((reason, code)),
    )
    _wait_for(lambda: fatal)
    assert fatal[0][1] == 1
