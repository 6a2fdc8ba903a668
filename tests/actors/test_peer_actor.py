"""PeerActor and its PeerSession with mocked collaborators; the client is a real Tunnel.

Control goes through the actor's mailbox; data goes through the session's direct entries
(``deliver`` for the UDP reader, the ``RegisterClient.deliver`` the TUN reader calls), as
in the running gateway.
"""

from __future__ import annotations

import ipaddress
import random
import threading
import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest

from actors.backpressure import InFlight
from actors.io.udp import FromNetwork
from actors.peer import (
    Authorize,
    ForgetClient,
    GetPeerStatus,
    NewSession,
    PeerFailed,
    PeerIdle,
    RemoveResource,
    SetPath,
    SetupDnsResource,
    start_peer,
)
from actors.resolver import Resolver
from actors.timer import Timer, Wake
from actors.tun import RegisterClient, UnregisterClient
from gateway.node import DirectPath, RelayedPath
from gateway.packet.ip import build_udp
from gateway.resources import CidrResource, DnsResource, PortRangeFilter
from gateway.turn.channel_data import decode_channel_data
from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter
from gateway.wg.tunnel import Tunnel, WriteToNetwork, WriteToTunnel
from tests.support.clock import ManualClock

CLIENT_ID = uuid.UUID("3abd725a-733b-4801-ac16-72f26cd98a24")
CLIENT_V4, CLIENT_V6 = "100.64.0.7", "fd00:2021:1111::7"
CLIENT_ADDR = ("10.203.0.2", 50000)
RESOURCE = CidrResource(
    uuid.UUID("c7793628-8579-465b-83e3-1a5d4af4db3b"),
    ipaddress.ip_network("10.204.0.0/24"),
    "lan",
    (PortRangeFilter("udp", 5000, 5000),),
)
PSK = bytes(range(32))


@pytest.fixture
def world(clock: ManualClock) -> Iterator[dict[str, Any]]:
    rng = random.Random(3)
    gateway = StaticKeyPair.generate(rng)
    client = StaticKeyPair.generate(rng)
    sockets, tun, node, writer = mock.Mock(), mock.Mock(), mock.Mock(), mock.Mock()
    resolver = Resolver()
    inflight = InFlight(8)
    timer = Timer(clock)  # never started: tests fire the session's timer themselves
    handle = start_peer(
        client_id=CLIENT_ID, node=node, tun=tun, tun_writer=writer, sockets=sockets,
        clock=clock, rng=rng, timer=timer, resolver=resolver, net_inflight=inflight,
    )
    ref = handle.ref
    ref.tell(NewSession(0x1234500, client.public, PSK, gateway,
                        HandshakeRateLimiter(gateway.public, rng)))
    client_tunnel = Tunnel(
        static=client, peer_public=gateway.public, preshared_key=PSK, local_index=0x777700,
        rate_limiter=HandshakeRateLimiter(client.public, rng), rng=rng, now=clock.monotonic(),
    )
    yield {"ref": ref, "sockets": sockets, "tun": tun, "node": node, "writer": writer,
           "client": client_tunnel, "clock": clock, "inflight": inflight,
           "deliver": handle.deliver, "timer": timer}
    ref.stop()
    resolver.shutdown()


def _tell_datagrams(world: dict[str, Any], datagrams: list[bytes]) -> None:
    assert world["inflight"].try_acquire()
    world["ref"].tell(FromNetwork([(d, CLIENT_ADDR) for d in datagrams]))


def _sync(world: dict[str, Any]) -> dict[str, Any]:
    return world["ref"].ask(GetPeerStatus(), timeout=5)  # type: ignore[no-any-return]


def _sent_datagrams(sockets: mock.Mock) -> list[tuple[tuple[str, int], bytes]]:
    """Every datagram sent, in order, whether one at a time or as a batch."""
    sent = []
    for name, args, _kwargs in sockets.method_calls:
        if name == "send":
            sent.append((args[0], args[1]))
        elif name == "send_many":
            sent.extend((args[0], payload) for payload in args[1])
    return sent


def _deliver(world: dict[str, Any], datagrams: list[bytes]) -> None:
    """What the UDP reader does for a known receiver index: call the session directly."""
    world["deliver"]([(d, CLIENT_ADDR) for d in datagrams])


def _tun_deliver(world: dict[str, Any]) -> Any:
    """The callable the PeerSession registered with the TUN (the TUN reader calls it)."""
    registers = [c.args[0] for c in world["tun"].tell.call_args_list
                 if isinstance(c.args[0], RegisterClient)]
    assert registers, "the client was never registered with the TUN"
    return registers[-1].deliver


def _handshake(world: dict[str, Any]) -> None:
    clock, client = world["clock"], world["client"]
    packet = build_udp(CLIENT_V4, "10.204.0.2", 4000, 5000, b"first")
    initiation = client.encapsulate(packet, clock.monotonic(), clock.unix())
    assert isinstance(initiation, WriteToNetwork)
    _tell_datagrams(world, [initiation.datagram])
    _sync(world)
    assert not _sent_datagrams(world["sockets"]), "no path yet: the response must be buffered"
    world["ref"].tell(SetPath(DirectPath(("10.203.0.3", 40000), CLIENT_ADDR)))
    _sync(world)
    ((dst, response),) = _sent_datagrams(world["sockets"])
    assert dst == CLIENT_ADDR
    # From the path's base, not the kernel's choice (rust/connlib/snownet/src/node.rs, IP_PKTINFO).
    assert all(call.args[2] == ("10.203.0.3", 40000)
               for call in world["sockets"].method_calls if call[0] in ("send", "send_many"))
    result = client.decapsulate(response, ("10.203.0.3", 40000), clock.monotonic(), clock.unix())
    assert isinstance(result, WriteToNetwork)  # the queued first packet
    world["first_transport"] = result.datagram


def test_authorize_registers_the_client_with_the_tun(world: dict[str, Any]) -> None:
    world["ref"].tell(Authorize(RESOURCE, None, CLIENT_V4, CLIENT_V6))
    status = _sync(world)
    (register,) = [c.args[0] for c in world["tun"].tell.call_args_list]
    assert isinstance(register, RegisterClient)
    assert (register.ipv4, register.ipv6) == (CLIENT_V4, CLIENT_V6)
    assert [r["id"] for r in status["resources"]] == [str(RESOURCE.id)]


def test_handshake_then_allowed_packets_reach_the_tun_and_others_are_dropped(
    world: dict[str, Any],
) -> None:
    world["ref"].tell(Authorize(RESOURCE, None, CLIENT_V4, CLIENT_V6))
    _handshake(world)
    clock, client = world["clock"], world["client"]
    spoofed = build_udp("100.64.0.99", "10.204.0.2", 4000, 5000, b"spoof")
    wrong_port = build_udp(CLIENT_V4, "10.204.0.2", 4000, 5001, b"port")
    allowed = build_udp(CLIENT_V4, "10.204.0.2", 4000, 5000, b"ok")
    datagrams = [world["first_transport"]]
    for packet in (spoofed, wrong_port, allowed):
        out = client.encapsulate(packet, clock.monotonic(), clock.unix())
        assert isinstance(out, WriteToNetwork)
        datagrams.append(out.datagram)
    _deliver(world, datagrams)
    status = _sync(world)
    written = [p for c in world["writer"].write_batch.call_args_list for p in c.args[0]]
    assert written == [build_udp(CLIENT_V4, "10.204.0.2", 4000, 5000, b"first"), allowed]
    assert world["writer"].write_batch.call_count == 1, "one TUN write per network batch"
    assert status["drops"].get("spoofed_source", 0) >= 1
    assert world["inflight"].in_flight == 0, "every batch releases its slot"


def test_tun_packets_are_encrypted_to_the_nominated_path(world: dict[str, Any]) -> None:
    world["ref"].tell(Authorize(RESOURCE, None, CLIENT_V4, CLIENT_V6))
    _handshake(world)
    clock, client = world["clock"], world["client"]
    # The responder's session becomes usable after the initiator's first transport message.
    _tell_datagrams(world, [world["first_transport"]])
    _sync(world)
    reply = build_udp("10.204.0.2", CLIENT_V4, 5000, 4000, b"reply")
    world["ref"].tell(SetPath(RelayedPath("relay-1", ("10.203.0.4", 3478), 0x4001, CLIENT_ADDR)))
    status_before = _sync(world)
    assert status_before["path"] == "relay:relay-1"
    world["sockets"].reset_mock()
    _tun_deliver(world)([reply])
    ((dst, wrapped),) = _sent_datagrams(world["sockets"])
    assert dst == ("10.203.0.4", 3478)
    decoded = decode_channel_data(wrapped)
    assert decoded is not None and decoded[0] == 0x4001
    result = client.decapsulate(decoded[1], dst, clock.monotonic(), clock.unix())
    assert isinstance(result, WriteToTunnel) and result.packet == reply


def test_removing_the_last_resource_unregisters_the_client(world: dict[str, Any]) -> None:
    world["ref"].tell(Authorize(RESOURCE, None, CLIENT_V4, CLIENT_V6))
    world["ref"].tell(RemoveResource(RESOURCE.id))
    status = _sync(world)
    told = [c.args[0] for c in world["tun"].tell.call_args_list]
    assert isinstance(told[-1], UnregisterClient) and told[-1].client_id == CLIENT_ID
    assert status["resources"] == []


def test_a_legacy_dns_setup_translates_to_the_addresses_looked_up_before(
    world: dict[str, Any],
) -> None:
    """request_connection/allow_access: the NodeActor resolved the domain before it
    accepted; the peer installs the translation at once (no lookup of its own)."""
    dns = DnsResource(uuid.uuid4(), "*.httpbin", "httpbin", ())
    proxy, real = ipaddress.ip_address("100.96.0.1"), ipaddress.ip_address("10.204.0.9")
    world["ref"].tell(Authorize(dns, None, CLIENT_V4, CLIENT_V6))
    world["ref"].tell(SetupDnsResource(dns.id, "a.httpbin", (proxy,), (real,)))
    _handshake(world)
    clock, client = world["clock"], world["client"]
    out = client.encapsulate(build_udp(CLIENT_V4, str(proxy), 4000, 53, b"query"),
                             clock.monotonic(), clock.unix())
    assert isinstance(out, WriteToNetwork)
    _deliver(world, [out.datagram])
    _sync(world)
    written = [p for c in world["writer"].write_batch.call_args_list for p in c.args[0]]
    assert [ipaddress.ip_address(p[16:20]) for p in written] == [real]


def test_forget_client_drops_every_authorization(world: dict[str, Any]) -> None:
    world["ref"].tell(Authorize(RESOURCE, None, CLIENT_V4, CLIENT_V6))
    world["ref"].tell(ForgetClient())
    status = _sync(world)
    told = [c.args[0] for c in world["tun"].tell.call_args_list]
    assert isinstance(told[-1], UnregisterClient) and told[-1].client_id == CLIENT_ID
    assert status["resources"] == []


def test_expiry_takes_effect_on_the_next_tick(world: dict[str, Any]) -> None:
    clock = world["clock"]
    world["ref"].tell(Authorize(RESOURCE, clock.unix() + 5, CLIENT_V4, CLIENT_V6))
    _sync(world)
    clock.tick(6)
    world["ref"].tell(Wake())
    status = _sync(world)
    assert status["resources"] == []
    assert isinstance(world["tun"].tell.call_args_list[-1].args[0], UnregisterClient)


def test_session_expiry_reports_the_peer_failed(world: dict[str, Any]) -> None:
    world["ref"].tell(Authorize(RESOURCE, None, CLIENT_V4, CLIENT_V6))
    _handshake(world)
    _tell_datagrams(world, [world["first_transport"]])
    _sync(world)
    world["clock"].tick(541)
    world["ref"].tell(Wake())
    _sync(world)
    told = [c.args[0] for c in world["node"].tell.call_args_list]
    failures = [m for m in told if isinstance(m, PeerFailed)]
    assert failures
    assert failures[0].client_id == CLIENT_ID


def test_a_crash_in_a_batch_does_not_leak_inflight(world: dict[str, Any]) -> None:
    """Garbage datagrams are dropped and counted; the slot is released."""
    _tell_datagrams(world, [b"\x04\x00\x00\x00" + bytes(40), b"\x01"])
    status = _sync(world)
    assert world["inflight"].in_flight == 0
    assert world["ref"].is_alive()
    assert sum(status["drops"].values()) >= 1


def _connected(world: dict[str, Any]) -> None:
    """Authorized, handshake done, the client's first data packet through."""
    world["ref"].tell(Authorize(RESOURCE, None, CLIENT_V4, CLIENT_V6))
    _handshake(world)
    _tell_datagrams(world, [world["first_transport"]])
    _sync(world)


def test_idle_after_ten_seconds_without_data_and_active_again_on_data(
    world: dict[str, Any],
) -> None:
    _connected(world)
    clock = world["clock"]
    clock.tick(9.5)
    world["ref"].tell(Wake())
    assert not _sync(world)["idle"]
    clock.tick(1.0)
    world["ref"].tell(Wake())
    assert _sync(world)["idle"]
    data = world["client"].encapsulate(build_udp(CLIENT_V4, "10.204.0.2", 4000, 5000, b"x"),
                                       clock.monotonic(), clock.unix())
    _tell_datagrams(world, [data.datagram])
    assert not _sync(world)["idle"]
    told = [c.args[0] for c in world["node"].tell.call_args_list if isinstance(c.args[0], PeerIdle)]
    assert told == [PeerIdle(CLIENT_ID, True), PeerIdle(CLIENT_ID, False)]


def test_only_ip_packets_that_cross_the_tunnel_count_as_data(world: dict[str, Any]) -> None:
    """rust/connlib/snownet/src/node.rs: data = an IP packet encapsulated or decapsulated. A TUN
    packet dropped before encryption keeps an idle connection idle; a decrypted packet the filter
    then drops does not."""
    _connected(world)
    clock = world["clock"]
    clock.tick(10.5)
    world["ref"].tell(Wake())
    assert _sync(world)["idle"]
    _tun_deliver(world)([b"\x45" + bytes(10)])  # malformed: dropped before encryption
    assert _sync(world)["idle"]
    denied = world["client"].encapsulate(build_udp(CLIENT_V4, "10.204.0.2", 4000, 5999, b"x"),
                                         clock.monotonic(), clock.unix())
    _tell_datagrams(world, [denied.datagram])  # port 5999 is not allowed: filtered
    status = _sync(world)
    assert not status["idle"]
    assert status["drops"]["not_allowed"] == 1


def test_every_authorization_registers_its_addresses_with_the_tun(
    world: dict[str, Any],
) -> None:
    world["ref"].tell(Authorize(RESOURCE, None, CLIENT_V4, CLIENT_V6))
    world["ref"].tell(Authorize(RESOURCE, None, "100.64.0.8", "fd00:2021:1111::8"))
    _sync(world)
    registered = [(m.ipv4, m.ipv6) for c in world["tun"].tell.call_args_list
                  if isinstance(m := c.args[0], RegisterClient)]
    assert registered == [(CLIENT_V4, CLIENT_V6), ("100.64.0.8", "fd00:2021:1111::8")]


def _established(world: dict[str, Any]) -> None:
    world["ref"].tell(Authorize(RESOURCE, None, CLIENT_V4, CLIENT_V6))
    _handshake(world)
    _deliver(world, [world["first_transport"]])


def _allowed(world: dict[str, Any], payload: bytes) -> bytes:
    clock = world["clock"]
    packet = build_udp(CLIENT_V4, "10.204.0.2", 4000, 5000, payload)
    out = world["client"].encapsulate(packet, clock.monotonic(), clock.unix())
    assert isinstance(out, WriteToNetwork)
    return out.datagram


def test_data_moves_the_session_timer_earlier_never_later(world: dict[str, Any]) -> None:
    """After a data batch the Timer holds a call no later than WireGuard's keepalive (10 s)."""
    _established(world)
    status = _sync(world)
    assert status["handshakes"] == 1
    clock, timer = world["clock"], world["timer"]
    clock.tick(3)
    _deliver(world, [_allowed(world, b"data")])
    session = world["ref"].proxy().session.get(timeout=5)
    deadline = session._wake.deadline
    assert deadline is not None
    assert deadline <= clock.monotonic() + 10.0
    assert timer.pending(session._wake._handle)


def test_the_timer_thread_drives_the_session_without_the_mailbox(world: dict[str, Any]) -> None:
    """Expiry fires from the Timer thread calling the session (no Wake message told)."""
    clock = world["clock"]
    world["ref"].tell(Authorize(RESOURCE, clock.unix() + 5, CLIENT_V4, CLIENT_V6))
    _sync(world)
    clock.tick(6)
    unregistered = threading.Event()
    world["tun"].tell.side_effect = (
        lambda message: unregistered.set() if isinstance(message, UnregisterClient) else None
    )
    timer = world["timer"]
    timer.start()  # the session's 1 s tick is due on the manual clock: it fires at once
    try:
        assert unregistered.wait(5), "the Timer thread never ran the session's timeout"
    finally:
        timer.stop()
    assert _sync(world)["resources"] == []


def test_data_after_the_actor_stopped_is_dropped_quietly(world: dict[str, Any]) -> None:
    _established(world)
    session = world["ref"].proxy().session.get(timeout=5)
    world["ref"].stop()
    world["writer"].reset_mock()
    _deliver(world, [_allowed(world, b"late")])
    _tun_deliver(world)([build_udp("10.204.0.2", CLIENT_V4, 5000, 4000, b"late")])
    assert session.counters["closed"] == 2
    assert world["writer"].write_batch.call_count == 0
    assert session._wake.deadline is None, "a stopped session keeps no timer"


def test_readers_and_control_messages_race_safely(world: dict[str, Any]) -> None:
    """Four reader threads deliver while the actor applies control messages and timeouts."""
    _established(world)
    _sync(world)
    threads_n, per_thread = 4, 150
    batches = [[_allowed(world, f"{t}-{i}".encode()) for i in range(per_thread)]
               for t in range(threads_n)]
    errors: list[BaseException] = []

    def reader(datagrams: list[bytes]) -> None:
        try:
            for start in range(0, len(datagrams), 10):
                _deliver(world, datagrams[start:start + 10])
        except BaseException as exc:  # pragma: no cover - the assertion reports it
            errors.append(exc)

    workers = [threading.Thread(target=reader, args=(b,)) for b in batches]
    for worker in workers:
        worker.start()
    for _ in range(50):
        world["ref"].tell(Wake())
        world["ref"].tell(Authorize(RESOURCE, None, CLIENT_V4, CLIENT_V6))
    for worker in workers:
        worker.join(10)
    status = _sync(world)
    assert errors == []
    written = [p for c in world["writer"].write_batch.call_args_list for p in c.args[0]]
    # The first transport message (the queued packet) plus every packet, none lost or doubled.
    assert len(written) == 1 + threads_n * per_thread
    assert len(set(written)) == len(written)
    assert status["drops"].get("replay", 0) == 0
