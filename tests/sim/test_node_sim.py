"""Deterministic simulation of the gateway's Node core against a client built from the same
cores (controlling ICE agent + WireGuard initiator) and an in-memory TURN relay.

Covers the upsert rule, candidate signalling, direct and relayed paths, WireGuard through
the chosen path, connection failure on missing candidates, and key rotation on reset.
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from collections.abc import Callable

import pytest

from gateway.ice.agent import IceAgent, Nominated
from gateway.ice.candidate import Candidate, IceCredentials
from gateway.node import (
    CANDIDATE_TIMEOUT,
    CandidatesAdded,
    CandidatesInvalidated,
    ConnectionCreated,
    ConnectionFailed,
    ConnectionReused,
    DirectPath,
    Node,
    NoTurnServers,
    PathChanged,
    RelayedPath,
    TurnServer,
)
from gateway.packet.ip import build_udp
from gateway.slack import fire_at
from gateway.turn.channel_data import encode_channel_data
from gateway.types import Address
from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter
from gateway.wg.tunnel import Tunnel, WriteToNetwork, WriteToTunnel
from tests.support.clock import ManualClock
from tests.support.sim_turn import SimTurnServer

GATEWAY: Address = ("10.0.0.3", 40000)
CLIENT: Address = ("10.0.0.2", 50000)
RELAY: Address = ("10.0.0.4", 3478)
CLIENT_ID = uuid.UUID("3abd725a-733b-4801-ac16-72f26cd98a24")
GW_CREDS = IceCredentials("ejqt", "zfjrrjdkbci42t2axyd45a")
CLIENT_CREDS = IceCredentials("hgwh", "j2fqufatn7xlrrvv6fsvea")


class Sim:
    """Gateway Node + gateway-side Tunnel (what the PeerActor does) + client + relay."""

    def __init__(self, *, block_direct: bool = False) -> None:
        self.clock = ManualClock()
        self.rng = random.Random(7)
        self.block_direct = block_direct
        self.wire: deque[tuple[Address, Address, bytes]] = deque()
        self.relay = SimTurnServer(RELAY, "1700000000:user", "secret-password", self._send)
        self.more_relays: list[SimTurnServer] = []
        self.node = Node(rng=self.rng, now=self.now)
        self.gw_tunnel: Tunnel | None = None
        self.gw_path: DirectPath | RelayedPath | None = None
        self.gw_received: list[bytes] = []
        self.events: list[object] = []
        self.client_static = StaticKeyPair.generate(self.rng)
        self.client_agent: IceAgent | None = None
        self.client_tunnel: Tunnel | None = None
        self.client_received: list[bytes] = []
        self.client_nominated: tuple[Candidate, Address] | None = None

    @property
    def now(self) -> float:
        return self.clock.monotonic()

    def _send(self, src: Address, dst: Address, payload: bytes) -> None:
        self.wire.append((src, dst, payload))

    # -------------------------------------------------------------- wiring

    def add_relay(self) -> None:
        server = TurnServer("relay-1", (RELAY,), "1700000000:user", "secret-password")
        self.node.update_relays([], [server], self.now)
        self.pump()

    def authorize(self, gw_creds: IceCredentials = GW_CREDS, *, signal: bool = True) -> object:
        """``authorize_flow``; ``signal=False``: the client's candidates never arrive."""
        psk = bytes(range(32))
        result = self.node.upsert_connection(
            CLIENT_ID,
            client_public_key=self.client_static.public,
            preshared_key=psk,
            local=gw_creds,
            remote=CLIENT_CREDS,
            now=self.now,
        )
        if isinstance(result, ConnectionCreated):
            self.gw_tunnel = Tunnel(
                static=self.node.static, peer_public=result.peer_public, preshared_key=psk,
                local_index=result.local_index, rate_limiter=self.node.rate_limiter,
                rng=self.rng, now=self.now,
            )
            self.gw_path = None
            self.client_agent = IceAgent(
                controlling=True, local=CLIENT_CREDS, remote=gw_creds, rng=self.rng, now=self.now
            )
            self.client_agent.add_local_candidate(Candidate.host(CLIENT))
            limiter = HandshakeRateLimiter(self.client_static.public, self.rng)
            self.client_tunnel = Tunnel(
                static=self.client_static, peer_public=self.node.public_key, preshared_key=psk,
                local_index=0x1234500, rate_limiter=limiter, rng=self.rng, now=self.now,
            )
            if signal:
                self.node.add_remote_candidates(
                    CLIENT_ID, [Candidate.host(CLIENT).to_sdp()], self.now
                )
        self.pump()
        return result

    # -------------------------------------------------------------- the loop

    def pump(self) -> None:
        """Deliver everything queued until the network is quiet."""
        for _ in range(10_000):
            self._drain_node()
            self._drain_client()
            if not self.wire:
                return
            src, dst, payload = self.wire.popleft()
            self._deliver(src, dst, payload)
        raise AssertionError("simulation did not settle")

    def run_until(self, condition: Callable[[], bool], limit: float = 30.0) -> None:
        end = self.now + limit
        while not condition():
            assert self.now < end, "condition not reached in simulated time"
            self.clock.tick(0.05)
            self.node.handle_timeout(self.now)
            if self.client_agent is not None:
                self.client_agent.handle_timeout(self.now)
            for tunnel in (self.gw_tunnel, self.client_tunnel):
                if tunnel is not None:
                    tunnel.handle_timeout(self.now, self.clock.unix())
            self.pump()

    def _blocked(self, src: Address, dst: Address) -> bool:
        ips = {src[0], dst[0]}
        return self.block_direct and ips == {GATEWAY[0], CLIENT[0]}

    def _deliver(self, src: Address, dst: Address, payload: bytes) -> None:
        if self._blocked(src, dst):
            return
        relay = next((r for r in (self.relay, *self.more_relays)
                      if dst == r.address or dst in r.relayed_addresses()), None)
        if relay is not None:
            relay.receive(src, dst, payload)
        elif dst == GATEWAY:
            wg = self.node.handle_datagram(GATEWAY, src, payload, self.now)
            if wg is not None and self.gw_tunnel is not None:
                self._gateway_wireguard(wg.datagram, wg.src)
        elif dst == CLIENT:
            self._client_receive(src, payload)

    def _gateway_wireguard(self, datagram: bytes, src: Address) -> None:
        assert self.gw_tunnel is not None
        result = self.gw_tunnel.decapsulate(datagram, src, self.now, self.clock.unix())
        if isinstance(result, WriteToTunnel):
            self.gw_received.append(result.packet)
        elif isinstance(result, WriteToNetwork):
            self.gateway_send(result.datagram)
            while (extra := self.gw_tunnel.poll_transmit()) is not None:
                self.gateway_send(extra)

    def gateway_send(self, datagram: bytes) -> None:
        path = self.gw_path
        assert path is not None, "gateway has no path to the client yet"
        if isinstance(path, DirectPath):
            self._send(GATEWAY, path.remote, datagram)
        else:
            self._send(GATEWAY, path.server, encode_channel_data(path.channel, datagram))

    def _client_receive(self, src: Address, payload: bytes) -> None:
        assert self.client_agent is not None and self.client_tunnel is not None
        from gateway.demux import DatagramKind, classify
        from gateway.stun.message import parse

        if classify(payload, src, ()) is DatagramKind.STUN:
            msg = parse(payload)
            if self.client_agent.accepts(msg, payload):
                self.client_agent.handle_stun(msg, payload, src, CLIENT, self.now)
            return
        result = self.client_tunnel.decapsulate(payload, src, self.now, self.clock.unix())
        if isinstance(result, WriteToTunnel):
            self.client_received.append(result.packet)
        elif isinstance(result, WriteToNetwork):
            self.client_send(result.datagram)
        while (extra := self.client_tunnel.poll_transmit()) is not None:
            self.client_send(extra)

    def client_send(self, datagram: bytes) -> None:
        assert self.client_nominated is not None
        self._send(CLIENT, self.client_nominated[1], datagram)

    def _drain_node(self) -> None:
        while (tx := self.node.poll_transmit()) is not None:
            self._send(tx.src or GATEWAY, tx.dst, tx.payload)
        while (event := self.node.poll_event()) is not None:
            self.events.append(event)
            if isinstance(event, CandidatesAdded) and self.client_agent is not None:
                for line in event.candidates:
                    self.client_agent.add_remote_candidate(Candidate.parse(line))
            elif isinstance(event, PathChanged):
                self.gw_path = event.path

    def _drain_client(self) -> None:
        agent = self.client_agent
        if agent is None:
            return
        while (tx := agent.poll_transmit()) is not None:
            self._send(tx.src or CLIENT, tx.dst, tx.payload)
        while (event := agent.poll_event()) is not None:
            if isinstance(event, Nominated):
                self.client_nominated = (event.local, event.remote)


def _packet(payload: bytes, *, reverse: bool = False) -> bytes:
    src, dst = "100.64.0.2", "10.1.0.5"
    if reverse:
        src, dst = dst, src
    return build_udp(src, dst, 5000, 6000, payload)


def _exchange(sim: Sim) -> None:
    """WireGuard handshake and one packet each way over whatever path ICE chose."""
    assert sim.client_tunnel is not None and sim.gw_tunnel is not None
    first = sim.client_tunnel.encapsulate(_packet(b"hello"), sim.now, sim.clock.unix())
    assert isinstance(first, WriteToNetwork)
    sim.client_send(first.datagram)
    sim.pump()
    assert sim.gw_received == [_packet(b"hello")]
    reply = sim.gw_tunnel.encapsulate(_packet(b"world", reverse=True), sim.now, sim.clock.unix())
    assert isinstance(reply, WriteToNetwork)
    sim.gateway_send(reply.datagram)
    sim.pump()
    assert sim.client_received == [_packet(b"world", reverse=True)]


def test_no_relay_means_no_connection() -> None:
    sim = Sim()
    assert isinstance(sim.authorize(), NoTurnServers)
    assert sim.node.connections() == []


def test_direct_path_carries_wireguard() -> None:
    sim = Sim()
    sim.add_relay()
    assert isinstance(sim.authorize(), ConnectionCreated)
    sim.run_until(lambda: sim.gw_path is not None and sim.client_nominated is not None)
    assert isinstance(sim.gw_path, DirectPath)
    assert sim.gw_path.remote == CLIENT
    signalled = [e for e in sim.events if isinstance(e, CandidatesAdded)]
    lines = [line for event in signalled for line in event.candidates]
    assert any(" typ host" in line for line in lines), lines
    assert any(" typ relay" in line for line in lines), lines
    assert any(" typ srflx" in line for line in lines), lines
    _exchange(sim)


def test_relayed_path_when_direct_is_blocked() -> None:
    sim = Sim(block_direct=True)
    sim.add_relay()
    sim.authorize()
    sim.run_until(lambda: sim.gw_path is not None and sim.client_nominated is not None)
    assert isinstance(sim.gw_path, RelayedPath)
    assert sim.gw_path.server == RELAY and sim.gw_path.remote == CLIENT
    _exchange(sim)


def test_upsert_reuses_on_equal_credentials_and_replaces_otherwise() -> None:
    sim = Sim()
    sim.add_relay()
    created = sim.authorize()
    assert isinstance(created, ConnectionCreated) and not created.replaced
    again = sim.node.upsert_connection(
        CLIENT_ID, client_public_key=bytes(32), preshared_key=bytes(32), local=GW_CREDS,
        remote=CLIENT_CREDS, now=sim.now,
    )
    assert isinstance(again, ConnectionReused)
    replaced = sim.node.upsert_connection(
        CLIENT_ID, client_public_key=sim.client_static.public, preshared_key=bytes(32),
        local=IceCredentials("zzzz", "zfjrrjdkbci42t2axyd45b"), remote=CLIENT_CREDS, now=sim.now,
    )
    assert isinstance(replaced, ConnectionCreated) and replaced.replaced
    assert replaced.local_index != created.local_index
    assert sim.node.client_for_index(created.local_index) is None
    assert sim.node.client_for_index(replaced.local_index) == CLIENT_ID


def test_connection_fails_without_remote_candidates() -> None:
    sim = Sim()
    sim.add_relay()
    sim.node.upsert_connection(
        CLIENT_ID, client_public_key=sim.client_static.public, preshared_key=bytes(32),
        local=GW_CREDS, remote=CLIENT_CREDS, now=sim.now,
    )
    sim.clock.tick(9.9)
    sim.node.handle_timeout(sim.now)
    assert not any(isinstance(e, ConnectionFailed) for e in _drain(sim.node))
    sim.clock.tick(0.2)
    sim.node.handle_timeout(sim.now)
    failed = [e for e in _drain(sim.node) if isinstance(e, ConnectionFailed)]
    assert failed and failed[0].client_id == CLIENT_ID
    assert sim.node.connections() == []


def test_a_connection_that_works_before_its_candidates_arrive_does_not_time_out() -> None:
    # The client checks our host candidate before its own candidates crossed the portal:
    # the gateway learns it as peer-reflexive, nominates, and must keep the connection.
    sim = Sim()
    sim.add_relay()
    sim.authorize(signal=False)
    sim.run_until(lambda: sim.gw_path is not None and sim.client_nominated is not None)
    until = sim.now + 15.0  # past CANDIDATE_TIMEOUT
    sim.run_until(lambda: sim.now >= until, limit=20.0)
    assert not any(isinstance(e, ConnectionFailed) for e in sim.events)
    assert [c.client_id for c in sim.node.connections()] == [CLIENT_ID]
    _exchange(sim)


def test_reset_rotates_key_and_forgets_everything() -> None:
    sim = Sim()
    sim.add_relay()
    sim.authorize()
    old_key = sim.node.public_key
    old_software = sim.node.software
    closed = sim.node.reset(sim.now)
    assert closed == [CLIENT_ID]
    assert sim.node.public_key != old_key and sim.node.software != old_software
    assert sim.node.connections() == [] and sim.node.relays() == []
    assert sim.node.rate_limiter.public_key == sim.node.public_key
    # Without the fresh init there is no relay: a new flow cannot be served yet.
    assert isinstance(sim.authorize(), NoTurnServers)
    sim.add_relay()
    assert isinstance(sim.authorize(), ConnectionCreated)


def test_oversized_and_garbage_datagrams_are_counted_not_raised() -> None:
    sim = Sim()
    sim.add_relay()
    assert sim.node.handle_datagram(GATEWAY, CLIENT, b"\xff" * 1400, sim.now) is None
    assert sim.node.handle_datagram(GATEWAY, CLIENT, b"\x17garbage", sim.now) is None
    assert sim.node.handle_datagram(GATEWAY, RELAY, b"\x00\x01\x00", sim.now) is None
    assert sim.node.counters["oversized_datagram"] == 1
    assert sim.node.counters["garbage_datagram"] >= 1


def test_host_candidates_are_learned_from_any_local_address_but_the_invalid_ones() -> None:
    """As rust/connlib/snownet/src/node.rs: unspecified, multicast, IPv4 broadcast and IPv4
    link-local local addresses make no host candidate (the datagram is dropped); IPv6 link-local
    does."""
    node = Node(rng=random.Random(1), now=0.0)
    for local in (("fe80::1", 40000), ("10.0.0.3", 40000)):
        node.handle_datagram(local, CLIENT, b"\x17garbage", 0.0)
    for local in (("169.254.1.1", 40000), ("0.0.0.0", 40000), ("224.0.0.1", 40000),
                  ("255.255.255.255", 40000), ("ff02::1", 40000), ("::", 40000)):
        node.handle_datagram(local, CLIENT, b"\x17garbage", 0.0)
    assert node.host_candidates() == ["10.0.0.3:40000", "[fe80::1]:40000"]
    assert node.counters["invalid_host_candidate"] == 6


def _drain(node: Node) -> list[object]:
    out = []
    while (event := node.poll_event()) is not None:
        out.append(event)
    return out


def test_reuse_resignals_candidates_and_accepts_new_ones_for_a_while() -> None:
    """A roaming client (same key, so same credentials) gets our candidates again."""
    sim = Sim()
    sim.add_relay()
    sim.authorize()
    sim.run_until(lambda: sim.gw_path is not None)
    before = len([e for e in sim.events if isinstance(e, CandidatesAdded)])
    again = sim.node.upsert_connection(
        CLIENT_ID, client_public_key=sim.client_static.public, preshared_key=bytes(32),
        local=GW_CREDS, remote=CLIENT_CREDS, now=sim.now,
    )
    assert isinstance(again, ConnectionReused)
    sim.pump()
    resignalled = [e for e in sim.events if isinstance(e, CandidatesAdded)][before:]
    assert resignalled and any(" typ host" in c for c in resignalled[0].candidates)
    roamed = Candidate.host((CLIENT[0], CLIENT[1] + 1)).to_sdp()
    sim.node.add_remote_candidates(CLIENT_ID, [roamed], sim.now)
    assert sim.node.counters["candidates_after_nomination"] == 0
    sim.clock.tick(11)
    sim.node.add_remote_candidates(CLIENT_ID, [roamed], sim.now)
    assert sim.node.counters["candidates_after_nomination"] == 1


FIRST = TurnServer("relay-1", (RELAY,), "1700000000:user", "secret-password")
ROTATED = TurnServer("relay-1", (RELAY,), "1700000001:user", "other-password")
#: A second server address for the relay that nothing answers (an address change).
RELAY6: Address = ("fd00::4", 3478)


def _rotating_sim(*, block_direct: bool = False) -> Sim:
    """A relay that knows both credential sets, bound to usernames like coturn."""
    sim = Sim(block_direct=block_direct)
    sim.relay = SimTurnServer(RELAY, FIRST.username, FIRST.password, sim._send,
                              accounts={ROTATED.username: ROTATED.password})
    return sim


def _relay_answers(sim: Sim) -> list[tuple[int, str | None, int | None, int]]:
    return [entry for entry in sim.relay.log if entry[3] != 401]  # 401 = the nonce round


def _run_for(sim: Sim, seconds: float) -> None:
    end = sim.now + seconds
    sim.run_until(lambda: sim.now >= end, limit=seconds + 1)


def _rotation_keeps_the_connection(sim: Sim) -> None:
    """An established connection, then init after init with rotated TURN credentials for
    its relay (the portal draws fresh ones for every init): nothing about the connection
    changes and WireGuard keeps flowing both ways over the same path."""
    from gateway.stun.message import Method

    sim.add_relay()
    sim.authorize()
    sim.run_until(lambda: sim.gw_path is not None and sim.client_nominated is not None)
    _exchange(sim)
    path, nominated = sim.gw_path, sim.client_nominated
    relayed = sim.node.relays()[0]["relay_addresses"]
    sim.events.clear()
    for rotated in (ROTATED, FIRST, ROTATED):
        sim.node.update_relays([], [rotated], sim.now)
        sim.pump()
        _run_for(sim, 3.0)  # past the retries and re-allocation of a replaced allocation
        sim.gw_received.clear()
        sim.client_received.clear()
        _exchange(sim)
    changes = [e for e in sim.events
               if isinstance(e, (CandidatesInvalidated, ConnectionFailed, PathChanged))]
    assert changes == []
    assert sim.gw_path == path and sim.client_nominated == nominated
    (conn,) = sim.node.connections()
    assert conn.path == path and conn.failed is None
    assert sim.node.relays()[0]["relay_addresses"] == relayed
    # The allocation was refreshed, not deleted, and is still the one the first
    # credentials made; nothing was refused.
    answers = _relay_answers(sim)
    assert not [a for a in answers if a[0] == Method.REFRESH and a[2] == 0], answers
    assert all(code == 0 for *_, code in answers), answers
    assert sim.relay.owners == {GATEWAY: FIRST.username}


def test_rotated_credentials_keep_a_direct_connection() -> None:
    sim = _rotating_sim()
    _rotation_keeps_the_connection(sim)
    assert isinstance(sim.gw_path, DirectPath)


def test_rotated_credentials_keep_a_connection_relayed_through_the_allocation() -> None:
    """The client reaches our relayed address from its host socket (to the client that is
    a "direct" path): replacing the allocation would cut it."""
    sim = _rotating_sim(block_direct=True)
    _rotation_keeps_the_connection(sim)
    assert isinstance(sim.gw_path, RelayedPath) and sim.gw_path.server == RELAY
    assert sim.client_nominated is not None and sim.client_nominated[1][0] == RELAY[0]


def test_new_credentials_during_the_first_allocate_keep_what_it_makes() -> None:
    """The second init can come while the first ALLOCATE is at the relay: what it makes
    is kept (bound to the first username); nothing is refused or deleted."""
    from gateway.stun.message import MessageClass, Method, parse

    sim = _rotating_sim()
    sim.node.update_relays([], [FIRST], sim.now)
    held = None
    for _ in range(100):  # deliver until the relay's answer to the real ALLOCATE
        sim._drain_node()
        src, dst, payload = sim.wire.popleft()
        if src == RELAY and dst == GATEWAY:
            msg = parse(payload)
            if msg.method == Method.ALLOCATE and msg.cls == MessageClass.SUCCESS:
                held = (src, dst, payload)
                break
        sim._deliver(src, dst, payload)
    assert held is not None
    sim.node.update_relays([], [ROTATED], sim.now)  # the success is still on its way
    sim.wire.appendleft(held)
    sim.pump()
    sim.run_until(lambda: bool(sim.node.relays()[0]["relay_addresses"]), limit=15)
    answers = _relay_answers(sim)
    assert all(code == 0 for *_, code in answers), answers  # no 437, no 441
    assert sim.relay.owners == {GATEWAY: FIRST.username}
    assert len(sim.relay.allocations) == 1


def test_new_credentials_before_the_relay_answered_anything_start_at_once() -> None:
    from gateway.stun.message import Method

    sim = _rotating_sim()
    sim.node.update_relays([], [FIRST], sim.now)  # only a BINDING is out
    sim.node.update_relays([], [ROTATED], sim.now)
    sim.pump()
    assert [e for e in _relay_answers(sim) if e[0] == Method.ALLOCATE] == [
        (Method.ALLOCATE, ROTATED.username, None, 0)]
    assert sim.relay.owners == {GATEWAY: ROTATED.username}


def test_other_server_addresses_replace_the_allocation_after_deleting_the_old_one() -> None:
    """A relay whose addresses changed is replaced: the old allocation is deleted (REFRESH
    lifetime 0, with its own credentials) before the new one is made."""
    from gateway.stun.message import Method

    sim = _rotating_sim()
    sim.add_relay()
    moved = TurnServer("relay-1", (RELAY, RELAY6), ROTATED.username, ROTATED.password)
    sim.node.update_relays([], [moved], sim.now)
    sim.pump()
    assert _relay_answers(sim)[-2:] == [
        (Method.REFRESH, FIRST.username, 0, 0), (Method.ALLOCATE, ROTATED.username, None, 0)]
    assert sim.relay.owners == {GATEWAY: ROTATED.username}
    assert [r["state"] for r in sim.node.relays()] == ["allocated"]


def test_a_relay_being_replaced_is_still_chosen_and_its_connection_gets_relayed() -> None:
    """While the old allocation's delete is in flight the relay is still a known relay
    (rust/connlib/snownet/src/node.rs): authorize_flow gets its connection, not NoTurnServers, and
    the connection's relay candidates come once the new allocation is made."""
    sim = _rotating_sim(block_direct=True)
    sim.add_relay()
    moved = TurnServer("relay-1", (RELAY, RELAY6), ROTATED.username, ROTATED.password)
    sim.node.update_relays([], [moved], sim.now)  # the delete is on its way, not done
    assert isinstance(sim.authorize(), ConnectionCreated)  # authorize pumps the network
    assert sim.relay.owners == {GATEWAY: ROTATED.username}
    sim.run_until(lambda: sim.gw_path is not None and sim.client_nominated is not None)
    assert isinstance(sim.gw_path, RelayedPath) and sim.gw_path.server == RELAY
    _exchange(sim)


def test_a_removed_relay_is_invalidated_only_where_its_candidates_were_given() -> None:
    """A connection gets only its chosen relay's candidates (rust/connlib/snownet/src/node.rs), so
    removing another relay tells its client nothing
    (rust/connlib/tunnel/src/messages/gateway.rs)."""
    sim = Sim()
    other_address: Address = ("10.0.0.5", 3478)
    sim.more_relays.append(SimTurnServer(other_address, "1700000000:u2", "pw2", sim._send))
    sim.add_relay()
    sim.node.update_relays([], [TurnServer("relay-2", (other_address,), "1700000000:u2",
                                           "pw2")], sim.now)
    sim.pump()
    assert all(r["relay_addresses"] for r in sim.node.relays())
    sim.authorize()
    (conn,) = sim.node.connections()
    chosen = conn.relay_id
    other = "relay-2" if chosen == "relay-1" else "relay-1"
    sim.events.clear()
    sim.node.update_relays([other], [], sim.now)
    sim.pump()
    assert [e for e in sim.events if isinstance(e, CandidatesInvalidated)] == []
    sim.node.update_relays([chosen], [], sim.now)
    sim.pump()
    (invalidated,) = [e for e in sim.events if isinstance(e, CandidatesInvalidated)]
    assert invalidated.client_id == CLIENT_ID
    assert [line.split()[-1] for line in invalidated.candidates] == ["relay"]


def test_idle_connections_use_the_idle_check_timings() -> None:
    sim = Sim()
    sim.add_relay()
    sim.authorize()
    sim.run_until(lambda: sim.gw_path is not None)
    conn = sim.node.connection(CLIENT_ID)
    assert conn is not None and conn.state == "connected"
    busy_deadline = conn.agent.poll_timeout()
    assert busy_deadline is not None and busy_deadline - sim.now <= 1.5
    sim.node.set_idle(CLIENT_ID, True, sim.now)
    assert conn.state == "idle"
    idle_deadline = conn.agent.poll_timeout()
    assert idle_deadline is not None and idle_deadline - sim.now > 30
    sim.node.set_idle(CLIENT_ID, False, sim.now)
    assert conn.state == "connected"


def test_an_idle_connection_keeps_its_slot_on_the_slack_grid() -> None:
    """The 60 s idle check fires on the 100 ms grid (shared with other connections), and
    the client's own checks, which make the node look at the deadline again with less
    lead, do not move it off that grid."""
    sim = Sim()
    sim.add_relay()
    sim.authorize()
    sim.run_until(lambda: sim.gw_path is not None)
    sim.node.set_idle(CLIENT_ID, True, sim.now)
    slot = sim.node.poll_timeout()
    assert slot is not None and slot - sim.now > 30
    assert abs(slot * 10 - round(slot * 10)) < 1e-6, "on the 100 ms grid"
    assert sim.client_agent is not None
    while sim.now < slot - 0.02:  # the client keeps checking (busy timings: every 1.5 s)
        sim.clock.tick(min(0.25, slot - 0.02 - sim.now))
        sim.client_agent.handle_timeout(sim.now)
        sim.pump()
        assert sim.node.poll_timeout() == slot
    assert sim.client_agent.selected_pair() is not None  # the node kept answering


def test_timers_only_touch_due_connections() -> None:
    """Deadlines live in a heap: a wake-up visits the due connections, not all of them."""
    import pytest

    sim = Sim()
    sim.add_relay()
    created: list[float] = []
    for i in range(50):
        client_id = uuid.UUID(int=i + 1)
        sim.node.upsert_connection(
            client_id, client_public_key=sim.client_static.public, preshared_key=bytes(32),
            local=IceCredentials(f"g{i:03d}", "zfjrrjdkbci42t2axyd45a"), remote=CLIENT_CREDS,
            now=sim.now,
        )
        created.append(sim.now)
        sim.clock.tick(0.1)  # staggered creation: staggered candidate timeouts
    # Each candidate timeout may fire within its slack (gateway.slack), on the grid.
    expiries = [fire_at(at + CANDIDATE_TIMEOUT, at) for at in created]
    assert expiries == sorted(expiries) and len(set(expiries)) == len(expiries)
    visited: list[object] = []
    original = IceAgent.handle_timeout
    patch = pytest.MonkeyPatch()
    patch.setattr(IceAgent, "handle_timeout",
                  lambda self, now: (visited.append(self), original(self, now))[1])
    try:
        first_deadline = sim.node.poll_timeout()
        assert first_deadline is not None
        sim.node.handle_timeout(first_deadline - 0.001)
        assert visited == [], "nothing is due yet"
        # Only the first three connections' candidate timeouts have passed: exactly those
        # fail, no other agent is visited.
        sim.clock.skip_to(expiries[2])
        sim.node.handle_timeout(sim.now)
        assert sim.node.counters["connections_failed"] == 3
        assert len(sim.node.connections()) == 47
        assert len(visited) == 0
        assert sim.node.poll_timeout() == expiries[3]
    finally:
        patch.undo()


def test_stun_and_handshakes_are_demultiplexed_by_index_not_by_scanning() -> None:
    """With many connections, a datagram asks only the connection(s) it names."""
    import pytest

    sim = Sim()
    sim.add_relay()
    for i in range(40):
        sim.node.upsert_connection(
            uuid.UUID(int=i + 1), client_public_key=sim.client_static.public,
            preshared_key=bytes(32), local=IceCredentials(f"x{i:03d}", "zfjrrjdkbci42t2axyd45a"),
            remote=CLIENT_CREDS, now=sim.now,
        )
    sim.authorize()  # the real client, with GW_CREDS
    asked: list[object] = []
    original = IceAgent.accepts
    patch = pytest.MonkeyPatch()
    patch.setattr(IceAgent, "accepts",
                  lambda self, msg, raw: (asked.append(self), original(self, msg, raw))[1])
    try:
        sim.run_until(lambda: sim.gw_path is not None)
    finally:
        patch.undo()
    own = sim.node.connection(CLIENT_ID)
    gateway_side = [agent for agent in asked if agent is not sim.client_agent]
    assert own is not None and gateway_side
    assert all(agent is own.agent for agent in gateway_side)
    _exchange(sim)  # handshakes still find their connection


def test_a_relayed_nomination_waits_for_its_channel_without_scanning_or_recursing() -> None:
    """Nominated on the relay while the channel is unbound: the path follows the binding.

    Connections waiting for a channel are indexed by relay, so a TURN message costs
    O(waiting) instead of a scan of every connection (and no recursion on the way).
    """
    sim = Sim(block_direct=True)
    sim.add_relay()
    sim.authorize()
    sim.run_until(lambda: sim.gw_path is not None and sim.client_nominated is not None)
    conn = sim.node.connection(CLIENT_ID)
    assert conn is not None and isinstance(conn.path, RelayedPath)
    allocation = sim.node._allocations["relay-1"]
    channel = allocation._channels[conn.path.channel]
    # The channel lapses and the agent re-nominates the same relayed pair.
    channel.bound = False
    conn.path = None
    sim.node._update_path(conn, sim.now)
    assert conn.path is None
    assert list(sim.node._awaiting_channel["relay-1"]) == [CLIENT_ID]
    # The relay confirms the binding: the next TURN message sets the path.
    channel.bound = True
    sim.node._drain_allocation(allocation, sim.now)
    assert isinstance(conn.path, RelayedPath)
    assert "relay-1" not in sim.node._awaiting_channel
    assert any(isinstance(e, PathChanged) for e in iter(sim.node.poll_event, None))


# -------------------------------------------------------------- hostile signalling (issue 14)

INTRUDER_ID = uuid.UUID("00000000-0000-4000-8000-0000000000bb")


def _intruder(sim: Sim, ufrag: str = "intr") -> uuid.UUID:
    """Another client's connection (its ICE never runs: nobody answers for it)."""
    result = sim.node.upsert_connection(
        INTRUDER_ID, client_public_key=StaticKeyPair.generate(sim.rng).public,
        preshared_key=bytes(32), local=IceCredentials(ufrag, "zfjrrjdkbci42t2axyd45a"),
        remote=IceCredentials("bbbb", "j2fqufatn7xlrrvv6fsvea"), now=sim.now,
    )
    assert isinstance(result, ConnectionCreated)
    return INTRUDER_ID


def _initiation(sim: Sim) -> bytes:
    """A handshake initiation with a valid mac1 for the gateway (from a throwaway tunnel
    with the client's key, so the simulated client's own tunnel is left alone)."""
    tunnel = Tunnel(
        static=sim.client_static, peer_public=sim.node.public_key,
        preshared_key=bytes(range(32)), local_index=0x5550000, rng=sim.rng, now=sim.now,
        rate_limiter=HandshakeRateLimiter(sim.client_static.public, sim.rng),
    )
    result = tunnel.initiate(sim.now, sim.clock.unix())
    assert isinstance(result, WriteToNetwork) and result.datagram[0] == 1
    return result.datagram


def test_a_signalled_candidate_does_not_capture_another_clients_handshakes() -> None:
    """Client B signals client A's address: A's initiations never reach B's connection.

    Handshake initiations carry no receiver index; they are routed by their source only
    when the connection's ICE agent verified traffic from it (rust/connlib/snownet/src/node.rs).
    """
    sim = Sim()
    sim.add_relay()
    intruder = _intruder(sim)
    sim.node.add_remote_candidates(
        intruder,
        [Candidate.host(CLIENT).to_sdp(), Candidate.srflx(CLIENT, CLIENT).to_sdp()],
        sim.now,
    )
    sim.pump()
    sim.authorize(signal=False)
    # Nothing verified from A's address yet: dropped, not handed to B.
    assert sim.node.handle_datagram(GATEWAY, CLIENT, _initiation(sim), sim.now) is None
    sim.node.add_remote_candidates(CLIENT_ID, [Candidate.host(CLIENT).to_sdp()], sim.now)
    sim.run_until(lambda: sim.gw_path is not None and sim.client_nominated is not None)
    routed = sim.node.handle_datagram(GATEWAY, CLIENT, _initiation(sim), sim.now)
    assert routed is not None and routed.client_id == CLIENT_ID
    conn = sim.node.connection(intruder)
    assert conn is not None and not conn.seen  # B's checks to A's address went unanswered
    _exchange(sim)


def test_a_client_signalling_thousands_of_relayed_candidates_binds_a_bounded_few() -> None:
    """1.4 binds a channel per non-host candidate; a relay has 4,096 for every client."""
    sim = Sim()
    sim.add_relay()
    intruder = _intruder(sim)
    lines = [
        Candidate.relay((f"10.{9 + i // 60000}.{(i // 250) % 240}.{i % 250 + 1}", 40000 + i % 7),
                        "x").to_sdp()
        for i in range(5000)
    ]
    sim.node.add_remote_candidates(intruder, lines, sim.now)
    sim.pump()
    (allocation,) = sim.relay.allocations.values()
    assert len(allocation.channels) == 16  # MAX_CHANNELS_PER_CONNECTION
    # The agent keeps 100 remote candidates; the rest is counted without being parsed.
    assert sim.node.counters["remote_candidates_over_limit"] == 5000 - 100
    assert sim.node.counters["channel_refused_connection_budget"] == 100 - 16
    # Its checks from our relayed candidate do not bind any more on demand either.
    for _ in range(20):
        sim.clock.tick(0.25)
        sim.node.handle_timeout(sim.now)
        sim.pump()
    assert len(allocation.channels) == 16


def test_channels_asked_of_one_relay_are_bounded_across_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gateway.node as node_module

    monkeypatch.setattr(node_module, "MAX_CANDIDATE_CHANNELS_PER_RELAY", 20, raising=False)
    sim = Sim()
    sim.add_relay()
    for n in range(3):
        client = uuid.UUID(int=n + 1)
        sim.node.upsert_connection(
            client, client_public_key=sim.client_static.public, preshared_key=bytes(32),
            local=IceCredentials(f"c{n:03d}", "zfjrrjdkbci42t2axyd45a"), remote=CLIENT_CREDS,
            now=sim.now,
        )
        sim.node.add_remote_candidates(
            client,
            [Candidate.srflx((f"10.5.{n}.{i + 1}", 4000), CLIENT).to_sdp() for i in range(10)],
            sim.now,
        )
    sim.pump()
    (allocation,) = sim.relay.allocations.values()
    assert len(allocation.channels) == 20
    assert sim.node.counters["channel_refused_relay_budget"] == 10
    # A connection that goes away returns its share.
    sim.node.remove_connection(uuid.UUID(int=1), "test")
    sim.node.add_remote_candidates(
        uuid.UUID(int=3), [Candidate.srflx(("10.5.9.9", 4000), CLIENT).to_sdp()], sim.now
    )
    sim.pump()
    assert len(allocation.channels) == 21


def test_a_spoofed_initiation_flood_under_load_sends_no_cookie_replies() -> None:
    """Initiations claiming client A's address, over the node's handshake limit: nothing
    goes to A (1.4 drops under load; cookie replies would be reflected onto A)."""
    sim = Sim()
    sim.add_relay()
    sim.authorize()
    sim.run_until(lambda: sim.gw_path is not None and sim.client_nominated is not None)
    _exchange(sim)
    forged = _initiation(sim)  # valid mac1, replayed, from A's address
    sim.wire.clear()
    for _ in range(1000):
        wg = sim.node.handle_datagram(GATEWAY, CLIENT, forged, sim.now)
        assert wg is not None and wg.client_id == CLIENT_ID
        sim._gateway_wireguard(wg.datagram, wg.src)
    to_client = [payload[0] for _, dst, payload in sim.wire if dst == CLIENT]
    assert to_client.count(3) == 0 and len(to_client) <= 1  # at most the one response
    assert sim.gw_tunnel is not None and sim.gw_tunnel.counters["under_load"] >= 900


def test_signalling_invalidating_and_checking_from_many_ports_keeps_the_indexes_bounded() -> None:
    """A client cycling candidates, or checking from port after port, grows no table."""
    sim = Sim()
    sim.add_relay()
    intruder = _intruder(sim)
    conn = sim.node.connection(intruder)
    assert conn is not None
    for round_ in range(3):
        lines = [Candidate.host((f"10.7.{round_}.{i + 1}", 5000)).to_sdp() for i in range(100)]
        sim.node.add_remote_candidates(intruder, lines, sim.now)
        sim.node.remove_remote_candidates(intruder, lines, sim.now)
    assert len(conn.remote_addresses) == 0
    assert not any(conn in entries for entries in sim.node._by_remote.values())
    # One invalidation message of 50,000 lines: looked at up to a bound, the rest counted.
    flood = [Candidate.host((f"10.8.{i // 250 % 250}.{i % 250}", 1)).to_sdp()
             for i in range(50_000)]
    sim.node.remove_remote_candidates(intruder, flood, sim.now)
    assert sim.node.counters["invalidations_over_limit"] == 50_000 - 200
    # Authenticated checks from 300 source ports: answered, indexed at most 100 times.
    from gateway.stun.message import Attr, Method, encode, new_request, short_term_key

    for port in range(300):
        check = new_request(Method.BINDING, sim.rng)
        check.add_str(Attr.USERNAME, "intr:bbbb").add_u32(Attr.PRIORITY, 1853824767)
        check.add_u64(Attr.ICE_CONTROLLING, 1)
        raw = encode(check, integrity_key=short_term_key("zfjrrjdkbci42t2axyd45a"),
                     fingerprint=True)
        sim.node.handle_datagram(GATEWAY, ("10.9.9.9", 20000 + port), raw, sim.now)
    assert len(conn.remote_addresses) <= 100 and len(conn.seen) <= 65


def test_a_client_asking_again_with_the_same_credentials_gets_a_fresh_channel_budget() -> None:
    """A roaming client keeps its connection (same credentials): its new candidates need
    channels, so the budget is refilled, and the old grants leave the relay's account."""
    sim = Sim()
    sim.add_relay()
    intruder = _intruder(sim)
    srflx = [Candidate.srflx((f"10.6.0.{i + 1}", 4000), CLIENT).to_sdp() for i in range(20)]
    sim.node.add_remote_candidates(intruder, srflx, sim.now)
    sim.pump()
    (allocation,) = sim.relay.allocations.values()
    assert len(allocation.channels) == 16
    assert sim.node._relay_channels["relay-1"] == 16
    again = sim.node.upsert_connection(
        INTRUDER_ID, client_public_key=bytes(32), preshared_key=bytes(32),
        local=IceCredentials("intr", "zfjrrjdkbci42t2axyd45a"),
        remote=IceCredentials("bbbb", "j2fqufatn7xlrrvv6fsvea"), now=sim.now,
    )
    assert isinstance(again, ConnectionReused)
    roamed = [Candidate.srflx((f"10.6.1.{i + 1}", 4000), CLIENT).to_sdp() for i in range(4)]
    sim.node.add_remote_candidates(intruder, roamed, sim.now)
    sim.pump()
    assert len(allocation.channels) == 20
    assert sim.node._relay_channels["relay-1"] == 4
    sim.node.remove_connection(intruder, "test")
    assert "relay-1" not in sim.node._relay_channels
