"""Fuzz: every parser of bytes from the network or the tunnel, and the Node's datagram
handler, seeded with real datagrams (tests/fuzz/seeds.py) and mutated.

Parsers may refuse only with a ``gateway.errors`` type; handlers (``Node.handle_datagram``,
``Tunnel.decapsulate``, ``ClientOnGateway.handle_inbound``) must not raise at all.
"""

from __future__ import annotations

import ipaddress
import uuid

from hypothesis import given
from hypothesis import strategies as st

from gateway.demux import classify
from gateway.node import MAX_DATAGRAM_PAYLOAD
from gateway.packet import ip
from gateway.packet.icmp import build_prohibited, quoted_flow
from gateway.packet.nat46 import ipv4_to_ipv6, ipv6_to_ipv4
from gateway.packet.p2p_control import (
    AssignedIps,
    DomainStatus,
    decode,
    encode_assigned_ips,
    encode_domain_status,
)
from gateway.peer import ClientOnGateway
from gateway.resources import DnsResource, PortRangeFilter
from gateway.stun.message import Attr, StunMessage, parse
from gateway.turn.channel_data import decode_channel_data
from gateway.wg.tunnel import message_type, receiver_index
from tests.fuzz.seeds import connected_sim, datagrams, to_gateway
from tests.fuzz.support import fuzz, mutated_bytes, only_gateway_errors
from tests.sim.test_node_sim import GATEWAY

_ALL = [payload for _, _, payload in datagrams()]
_STUN = [p for p in _ALL if len(p) >= 20 and p[0] < 4 and p[4:8] == b"\x21\x12\xa4\x42"]


def _read_everything(msg: StunMessage) -> None:
    msg.username(), msg.realm(), msg.nonce(), msg.error_code(), msg.unknown_attributes()
    msg.lifetime(), msg.priority(), msg.channel_number(), msg.ice_controlling()
    msg.ice_controlled(), msg.use_candidate()
    for attr in (Attr.XOR_MAPPED_ADDRESS, Attr.XOR_RELAYED_ADDRESS, Attr.XOR_PEER_ADDRESS):
        msg.xor_address(attr), msg.xor_addresses(attr)
    msg.address(Attr.MAPPED_ADDRESS), msg.address(Attr.ALTERNATE_SERVER)


@fuzz(1000)
@given(st.sampled_from(_STUN).flatmap(mutated_bytes))
def test_stun_parse_and_readers(data: bytes) -> None:
    def run() -> None:
        _read_everything(parse(data))

    only_gateway_errors(run)


@fuzz(1000)
@given(st.one_of(st.binary(max_size=64), st.sampled_from(_ALL).flatmap(mutated_bytes)))
def test_demux_channel_data_and_wireguard_headers_never_raise(data: bytes) -> None:
    classify(data, ("10.0.0.4", 3478), {("10.0.0.4", 3478)})
    classify(data, ("10.0.0.2", 50000), ())
    decode_channel_data(data)
    message_type(data)
    receiver_index(data)


@fuzz(300)
@given(st.data())
def test_node_handle_datagram_never_raises(data: st.DataObject) -> None:
    """A connected gateway (direct or relayed) fed mutated copies of what it received."""
    sim = connected_sim(relayed=data.draw(st.booleans()))
    src, _, seed = data.draw(st.sampled_from(to_gateway()))
    payload = data.draw(st.one_of(mutated_bytes(seed), st.binary(max_size=MAX_DATAGRAM_PAYLOAD)))
    wg = sim.node.handle_datagram(GATEWAY, src, payload, sim.now)
    if wg is not None and sim.gw_tunnel is not None:
        only_gateway_errors(
            lambda: sim.gw_tunnel.decapsulate(wg.datagram, wg.src, sim.now, sim.clock.unix())  # type: ignore[union-attr]
        )
    sim.node.handle_timeout(sim.now + 1.0)
    while sim.node.poll_transmit() is not None or sim.node.poll_event() is not None:
        pass


# --- IP packets (the data path's views; preconditions: is_valid_ip_packet) ----------------

_RESOURCE = DnsResource(uuid.uuid4(), "*.example.com", "r", (PortRangeFilter("tcp", 0, 65535),))
_CLIENT4 = ipaddress.IPv4Address("100.64.0.1")
_CLIENT6 = ipaddress.IPv6Address("fd00:2021:1111::1")
_PACKETS = [
    ip.build_udp(str(_CLIENT4), "10.1.0.5", 5000, 53, b"q" * 20),
    ip.build_tcp_syn(str(_CLIENT6), "2001:db8::5", 5000, 443),
    ip.build_icmp_echo(str(_CLIENT4), "10.1.0.5", 7, 1, b"ping"),
    ip.build_icmp_echo(str(_CLIENT6), "2001:db8::5", 7, 1, b"ping"),
    encode_assigned_ips(_RESOURCE.id, "a.example.com", ["100.96.0.1", "fd00:2021:1111:8000::1"]),
    encode_domain_status(_RESOURCE.id, "a.example.com", True),
]


@fuzz(1000)
@given(st.sampled_from(_PACKETS).flatmap(mutated_bytes))
def test_ip_views_icmp_and_nat46_on_valid_packets(packet: bytes) -> None:
    ip.ip_version(packet)
    if not ip.is_valid_ip_packet(packet):
        return
    ip.packet_length(packet), ip.source(packet), ip.destination(packet)
    _protocol, l4, end = ip.transport(packet)
    build_prohibited(packet)
    if l4 >= 0:
        quoted_flow(packet, l4, end)
    if packet[0] >> 4 == 4:
        ipv4_to_ipv6(packet, bytes(16), bytes(15) + b"\x01")
    else:
        ipv6_to_ipv4(packet, bytes(4), b"\x0a\x00\x00\x01")


@fuzz(1000)
@given(st.sampled_from(_PACKETS).flatmap(mutated_bytes))
def test_client_on_gateway_inbound_never_raises(packet: bytes) -> None:
    peer = ClientOnGateway(client_id=uuid.uuid4(), ipv4=_CLIENT4, ipv6=_CLIENT6, now=0.0)
    peer.add_resource(_RESOURCE, None, 0.0)
    peer.handle_inbound(packet, 0.0)
    event = decode(packet)
    if isinstance(event, AssignedIps):  # the reply to whatever decoding accepted
        encode_domain_status(event.resource_id, event.domain, False)
        peer.handle_resolved(event.resource_id, event.domain, event.proxy_ips,
                             [ipaddress.ip_address("10.1.0.5")], 0.0, reply=True)
    else:
        assert event is None or isinstance(event, DomainStatus)
    peer.handle_outbound(packet, 0.0)


_WIREGUARD = [p for p in _ALL if p and p[0] in (1, 2, 3, 4) and p[1:4] == b"\x00\x00\x00"]


@fuzz(300)
@given(st.data())
def test_tunnel_decapsulate_never_raises(data: st.DataObject) -> None:
    """The gateway's tunnel, after a handshake, fed mutated WireGuard messages."""
    sim = connected_sim(relayed=False)
    tunnel = sim.gw_tunnel
    assert tunnel is not None
    src = ("10.0.0.2", 50000)
    batch = data.draw(st.lists(st.sampled_from(_WIREGUARD).flatmap(mutated_bytes),
                               min_size=1, max_size=4))
    if data.draw(st.booleans()):  # the PeerSession's batched path
        tunnel.decapsulate_many([(d, src) for d in batch], sim.now, sim.clock.unix(), [])
    else:
        for datagram in batch:
            tunnel.decapsulate(datagram, src, sim.now, sim.clock.unix())
    tunnel.handle_timeout(sim.now + 1.0, sim.clock.unix() + 1.0)
    while tunnel.poll_transmit() is not None or tunnel.poll_event() is not None:
        pass
