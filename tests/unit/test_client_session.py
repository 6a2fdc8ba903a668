"""gateway/session.py: one client's data path, driven with a ManualClock and a real
WireGuard client tunnel (no threads, sockets or actors)."""

from __future__ import annotations

import ipaddress
import random
import uuid
from dataclasses import dataclass

import pytest

from gateway.idle import IDLE_AFTER
from gateway.node import DirectPath, RelayedPath
from gateway.packet.ip import build_udp
from gateway.resources import CidrResource, PortRangeFilter
from gateway.session import (
    EXPIRED_REASON,
    PENDING_DATAGRAMS,
    ClientSession,
    IdleChanged,
    SessionFailed,
    Transmit,
    TunRegister,
    TunUnregister,
)
from gateway.turn.channel_data import decode_channel_data
from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter
from gateway.wg.tunnel import Tunnel, WriteToNetwork, WriteToTunnel
from tests.support.clock import ManualClock

CLIENT_ID = uuid.UUID("3abd725a-733b-4801-ac16-72f26cd98a24")
CLIENT_V4, CLIENT_V6 = "100.64.0.7", "fd00:2021:1111::7"
CLIENT_ADDR = ("10.203.0.2", 50000)
BASE = ("10.203.0.3", 40000)
RELAY = ("10.203.0.4", 3478)
RESOURCE = CidrResource(
    uuid.UUID("c7793628-8579-465b-83e3-1a5d4af4db3b"),
    ipaddress.ip_network("10.204.0.0/24"),
    "lan",
    (PortRangeFilter("udp", 5000, 5000),),
)
PSK = bytes(range(32))
DIRECT = DirectPath(BASE, CLIENT_ADDR)
RELAYED = RelayedPath("relay-1", RELAY, 0x4001, CLIENT_ADDR)


def up(payload: bytes = b"up", src: str = CLIENT_V4, dport: int = 5000) -> bytes:
    return build_udp(src, "10.204.0.2", 4000, dport, payload)


def down(payload: bytes = b"down") -> bytes:
    return build_udp("10.204.0.2", CLIENT_V4, 5000, 4000, payload)


@dataclass
class World:
    clock: ManualClock
    session: ClientSession
    client: Tunnel

    @property
    def now(self) -> float:
        return self.clock.monotonic()

    def encrypt(self, packet: bytes) -> bytes:
        result = self.client.encapsulate(packet, self.now, self.clock.unix())
        assert isinstance(result, WriteToNetwork)
        return result.datagram

    def to_gateway(self, *datagrams: bytes) -> list[bytes]:
        return self.session.from_network_batch(
            [(d, CLIENT_ADDR) for d in datagrams], self.now, self.clock.unix()
        )

    def sent(self) -> list[Transmit]:
        return self.session.take_transmits()

    def run_until(self, until: float) -> None:
        """Fire the session's deadlines up to ``until``, each exactly when it is due."""
        while (deadline := self.session.poll_timeout()) is not None and deadline <= until:
            self.clock.skip_to(deadline)
            self.session.handle_timeout(self.now, self.clock.unix())
            after = self.session.poll_timeout()
            assert after is None or after > self.now, "busy loop"
        self.clock.skip_to(until)


def make_world(clock: ManualClock, *, authorize: bool = True) -> World:
    rng = random.Random(5)
    gateway = StaticKeyPair.generate(rng)
    client = StaticKeyPair.generate(rng)
    session = ClientSession(CLIENT_ID, rng=rng)
    session.new_wireguard_session(
        local_index=0x1234500, peer_public=client.public, preshared_key=PSK, static=gateway,
        rate_limiter=HandshakeRateLimiter(gateway.public, rng, 1000), now=clock.monotonic(),
    )
    if authorize:
        session.authorize(RESOURCE, None, CLIENT_V4, CLIENT_V6, clock.monotonic())
    client_tunnel = Tunnel(
        static=client, peer_public=gateway.public, preshared_key=PSK, local_index=0x777700,
        rate_limiter=HandshakeRateLimiter(client.public, rng), rng=rng, now=clock.monotonic(),
    )
    return World(clock, session, client_tunnel)


def connect(world: World, path: DirectPath | RelayedPath) -> None:
    """Handshake (the response waits for a path), nominate ``path``, first packet in."""
    initiation = world.client.encapsulate(up(b"first"), world.now, world.clock.unix())
    assert isinstance(initiation, WriteToNetwork)
    assert world.to_gateway(initiation.datagram) == []
    assert world.sent() == [] and len(world.session.pending) == 1
    world.session.set_path(path, world.now)
    (response,) = world.sent()
    datagram = unwrap(response, path)
    result = world.client.decapsulate(datagram, BASE, world.now, world.clock.unix())
    assert isinstance(result, WriteToNetwork)  # the client's queued first packet
    assert world.to_gateway(result.datagram) == [up(b"first")]
    assert world.session.handshakes == 1


def unwrap(transmit: Transmit, path: DirectPath | RelayedPath) -> bytes:
    (payload,) = transmit.payloads
    if isinstance(path, DirectPath):
        assert (transmit.dst, transmit.src) == (CLIENT_ADDR, BASE)
        return payload
    assert (transmit.dst, transmit.src) == (RELAY, None)
    decoded = decode_channel_data(payload)
    assert decoded is not None and decoded[0] == RELAYED.channel
    return decoded[1]


@pytest.mark.parametrize("path", [DIRECT, RELAYED], ids=["direct", "relayed"])
def test_data_flows_both_ways_through_the_nominated_path(
    clock: ManualClock, path: DirectPath | RelayedPath
) -> None:
    world = make_world(clock)
    assert world.session.take_events() == [TunRegister(CLIENT_V4, CLIENT_V6)]
    connect(world, path)
    # client -> resource: a batch in, the allowed packets out for the TUN, in order
    assert world.to_gateway(world.encrypt(up(b"a")), world.encrypt(up(b"b"))) == [
        up(b"a"), up(b"b")]
    # resource -> client: one batch, one Transmit (one GSO run), framed for the path
    world.session.from_tun_batch([down(b"1"), down(b"2"), down(b"3")], world.now,
                                 world.clock.unix())
    (transmit,) = world.sent()
    assert len(transmit.payloads) == 3
    for payload, expected in zip(transmit.payloads, (b"1", b"2", b"3"), strict=True):
        datagram = payload
        if isinstance(path, RelayedPath):
            assert transmit.dst == RELAY and transmit.src is None
            decoded = decode_channel_data(payload)
            assert decoded is not None and decoded[0] == RELAYED.channel
            datagram = decoded[1]
        else:
            assert (transmit.dst, transmit.src) == (CLIENT_ADDR, BASE)
        result = world.client.decapsulate(datagram, BASE, world.now, world.clock.unix())
        assert isinstance(result, WriteToTunnel) and result.packet == down(expected)
    status = world.session.status()
    assert status["path"] == path.describe() and status["rx_bytes"] > 0


def test_datagrams_wait_for_a_path_and_only_the_newest_are_kept(clock: ManualClock) -> None:
    """Before ICE nominates a path the gateway's answers wait (at most PENDING_DATAGRAMS,
    the oldest go first); the nomination sends them, in order, framed for the path."""
    world = make_world(clock)
    session = world.session
    for _ in range(PENDING_DATAGRAMS + 3):  # the client retries its handshake
        clock.tick(1.0)  # a newer timestamp each time, or the gateway ignores it as a replay
        initiation = world.client.initiate(world.now, world.clock.unix())
        assert isinstance(initiation, WriteToNetwork)
        assert world.to_gateway(initiation.datagram) == []
    assert world.sent() == [] and session.counters["pending_full"] == 3
    session.set_path(RELAYED, world.now)
    first = session.poll_transmit()
    sent = [first, *world.sent()] if first is not None else []
    assert len(sent) == PENDING_DATAGRAMS and not session.pending
    assert session.poll_transmit() is None
    # the newest response is the one that answers the client's current handshake
    result = world.client.decapsulate(unwrap(sent[-1], RELAYED), RELAY, world.now,
                                      world.clock.unix())
    assert not isinstance(result, WriteToTunnel)
    datagram = world.encrypt(up(b"after"))
    assert world.to_gateway(datagram) == [up(b"after")]
    assert session.handshakes == 1


def test_idle_is_reported_on_changes_only_and_counts_from_the_nomination(
    clock: ManualClock,
) -> None:
    world = make_world(clock)
    session = world.session
    assert session.idle.poll_timeout() is None, "no idle countdown before a path"
    connect(world, DIRECT)
    session.take_events()
    nominated = world.now
    world.run_until(nominated + IDLE_AFTER - 0.5)
    assert session.take_events() == []
    world.run_until(nominated + IDLE_AFTER)
    assert session.take_events() == [IdleChanged(True)]
    world.run_until(nominated + 3 * IDLE_AFTER)
    assert session.take_events() == [], "idle is reported once"
    # a filtered packet is still data: active again, reported once per change
    world.to_gateway(world.encrypt(up(dport=5999)), world.encrypt(up(dport=5999)))
    assert session.take_events() == [IdleChanged(False)]
    assert session.status()["drops"]["not_allowed"] == 2
    # a TUN packet dropped before encryption is not data
    world.run_until(world.now + IDLE_AFTER)
    assert session.take_events() == [IdleChanged(True)]
    session.from_tun_batch([b"\x45" + bytes(10)], world.now, world.clock.unix())
    assert session.take_events() == [] and session.idle.idle
    session.from_tun_batch([down()], world.now, world.clock.unix())
    assert session.take_events() == [IdleChanged(False)]


def test_an_expired_wireguard_session_is_reported_as_failed(clock: ManualClock) -> None:
    world = make_world(clock)
    connect(world, DIRECT)
    session = world.session
    session.take_events()
    world.run_until(world.now + 600.0)  # the client never rekeys: keys are erased at 540 s
    events = session.take_events()
    assert SessionFailed(EXPIRED_REASON) in events
    assert session.tunnel is None and session.status()["rx_bytes"] == 0
    figures = session.read_figures()
    assert figures is not None and figures.rx_bytes > 0, "the old tunnel's bytes are kept"
    assert world.to_gateway(b"\x04" + bytes(40)) == []
    assert session.counters["no_session"] == 1


def test_spoofed_source_addresses_are_dropped_and_counted(clock: ManualClock) -> None:
    world = make_world(clock)
    connect(world, DIRECT)
    spoofed = up(b"spoof", src="100.64.0.99")
    assert world.to_gateway(world.encrypt(spoofed), world.encrypt(up(b"ok"))) == [up(b"ok")]
    assert world.session.status()["drops"]["spoofed_source"] == 1
    figures = world.session.read_figures()
    assert figures is not None and figures.drops["spoofed_source"] == 1


def test_the_deadline_is_the_earliest_of_idle_tunnel_and_client_state(
    clock: ManualClock,
) -> None:
    world = make_world(clock, authorize=False)
    session = world.session
    session.authorize(RESOURCE, clock.unix() + 5.5, CLIENT_V4, CLIENT_V6, world.now)
    connect(world, DIRECT)
    session.take_events()
    assert session.tunnel is not None and session.client is not None
    # the client state's expiry check comes first, before idle (10 s) and the tunnel
    assert session.poll_timeout() == session.client.poll_timeout() == world.now + 1.0
    world.run_until(world.now + 6.0)  # the authorization expired: nothing left
    assert session.take_events() == [TunUnregister()] and session.client is None
    assert session.poll_timeout() == world.now - 6.0 + IDLE_AFTER  # idle counts from nomination
    world.run_until(world.now + 4.0)
    assert session.take_events() == [IdleChanged(True)]
    assert session.idle.poll_timeout() is None, "idle: no idle deadline until data"
    assert session.poll_timeout() == session.tunnel.poll_timeout() is not None
    session.close()
    assert session.poll_timeout() is None, "a closed session wants no timer"


def test_removing_the_last_resource_drops_the_client_state(clock: ManualClock) -> None:
    world = make_world(clock)
    session = world.session
    session.take_events()
    session.remove_resource(RESOURCE.id)
    assert session.take_events() == [TunUnregister()] and session.client is None
    session.from_tun_batch([down()], world.now, world.clock.unix())
    assert session.counters["tun_no_session"] == 1


def test_data_after_close_is_counted_and_goes_nowhere(clock: ManualClock) -> None:
    world = make_world(clock)
    connect(world, DIRECT)
    session = world.session
    session.take_events()
    session.close()
    assert session.poll_event() == TunUnregister() and session.poll_event() is None
    assert world.to_gateway(world.encrypt(up())) == []
    session.from_tun_batch([down()], world.now, world.clock.unix())
    assert session.counters["closed"] == 2 and world.sent() == []


def test_packets_queued_for_an_unconfirmed_session_go_out_when_it_is_confirmed(
    clock: ManualClock,
) -> None:
    """The responder may not send on a session the initiator has not confirmed yet, so a
    resource's packet waits in the tunnel; the initiator's confirming keepalive (which
    yields no packet) must send it at once, not at the session's next timer."""
    world = make_world(clock)
    world.session.set_path(DIRECT, world.now)
    initiation = world.client.encapsulate(b"", world.now, world.clock.unix())
    assert isinstance(initiation, WriteToNetwork)
    assert world.to_gateway(initiation.datagram) == []
    (response,) = world.sent()
    world.session.from_tun_batch([down(b"early")], world.now, world.clock.unix())
    assert world.sent() == []  # queued: the session is not confirmed yet
    confirm = world.client.decapsulate(unwrap(response, DIRECT), BASE, world.now,
                                       world.clock.unix())
    assert isinstance(confirm, WriteToNetwork)  # the keepalive that confirms the session
    assert world.to_gateway(confirm.datagram) == []
    (flushed,) = world.sent()
    result = world.client.decapsulate(unwrap(flushed, DIRECT), BASE, world.now,
                                      world.clock.unix())
    assert isinstance(result, WriteToTunnel) and result.packet == down(b"early")
