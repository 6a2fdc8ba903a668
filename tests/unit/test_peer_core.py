"""ClientOnGateway: per-client authorizations, filters, DNS NAT and timers
(rust/connlib/tunnel/src/peer.rs)."""

from __future__ import annotations

import ipaddress
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.packet import ip
from gateway.packet.p2p_control import (
    DomainStatus,
    decode,
    encode_assigned_ips,
    encode_domain_status,
)
from gateway.peer import (
    EXPIRY_RECHECK,
    ClientOnGateway,
    Drop,
    NeedsResolution,
    Reply,
    ResourceExpired,
)
from gateway.resources import (
    CidrResource,
    DnsResource,
    IcmpFilter,
    InternetResource,
    PortRangeFilter,
)
from tests.support.clock import ManualClock
from tests.unit.test_packet_ip import assert_checksums_valid

CLIENT4 = ipaddress.IPv4Address("100.64.0.7")
CLIENT6 = ipaddress.IPv6Address("fd00:2021:1111::7")
PROXY4 = [ipaddress.ip_address(f"100.96.0.{i}") for i in range(1, 5)]
PROXY6 = [ipaddress.ip_address(f"fd00:2021:1111:8000::{i}") for i in range(4)]
PROXIES = PROXY4 + PROXY6
REAL4 = ipaddress.ip_address("93.184.216.34")
REAL6 = ipaddress.ip_address("2606:2800:220:1::1")
TCP80 = PortRangeFilter("tcp", 80, 80)


def make(clock: ManualClock, *, icmp_prohibited: bool = False) -> ClientOnGateway:
    return ClientOnGateway(
        client_id=uuid.uuid4(), ipv4=CLIENT4, ipv6=CLIENT6, now=clock.monotonic(),
        icmp_prohibited=icmp_prohibited,
    )


def cidr(net: str, *filters: object) -> CidrResource:
    return CidrResource(uuid.uuid4(), ipaddress.ip_network(net), net, tuple(filters))  # type: ignore[arg-type]


def dns(pattern: str, *filters: object) -> DnsResource:
    return DnsResource(uuid.uuid4(), pattern, pattern, tuple(filters))  # type: ignore[arg-type]


def forwarded(result: object) -> bytes:
    assert isinstance(result, bytes), result
    return result


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


# --- anti-spoofing and destination checks -------------------------------------------------


def test_source_must_be_the_client_tunnel_ip(clock: ManualClock) -> None:
    peer = make(clock)
    peer.add_resource(cidr("10.0.0.0/8"), None, clock.monotonic())
    peer.add_resource(cidr("2001:db8::/32"), None, clock.monotonic())
    now = clock.monotonic()
    good4 = ip.build_udp(CLIENT4, "10.0.0.1", 1, 2)
    assert peer.handle_inbound(good4, now) == good4
    good6 = ip.build_udp(CLIENT6, "2001:db8::1", 1, 2)
    assert peer.handle_inbound(good6, now) == good6
    assert peer.handle_inbound(ip.build_udp("100.64.0.8", "10.0.0.1", 1, 2), now) == Drop(
        "spoofed_source"
    )
    assert peer.handle_inbound(ip.build_udp("fd00:2021:1111::8", "2001:db8::1", 1, 2), now) == (
        Drop("spoofed_source")
    )
    assert peer.counters["spoofed_source"] == 2


def test_padding_after_the_ip_packet_is_trimmed(clock: ManualClock) -> None:
    peer = make(clock)
    peer.add_resource(cidr("10.0.0.0/8"), None, clock.monotonic())
    packet = ip.build_udp(CLIENT4, "10.0.0.1", 1, 2, b"abc")
    assert peer.handle_inbound(packet + bytes(13), clock.monotonic()) == packet


def test_no_matching_resource_is_dropped(clock: ManualClock) -> None:
    peer = make(clock)
    peer.add_resource(cidr("10.0.0.0/8"), None, clock.monotonic())
    assert peer.handle_inbound(ip.build_udp(CLIENT4, "11.0.0.1", 1, 2), 0.0) == Drop(
        "not_allowed"
    )
    assert peer.counters["not_allowed"] == 1


@pytest.mark.parametrize(("dst", "src"), [("10.0.0.1", CLIENT4), ("2001:db8::1", CLIENT6)])
def test_filter_decisions(clock: ManualClock, dst: str, src: ipaddress._BaseAddress) -> None:
    peer = make(clock)
    filters = (PortRangeFilter("tcp", 80, 90), PortRangeFilter("udp", 53, 53), IcmpFilter())
    peer.add_resource(cidr("10.0.0.0/8", *filters), None, 0.0)
    peer.add_resource(cidr("2001:db8::/32", *filters), None, 0.0)
    allowed = [
        ip.build_tcp_syn(src, dst, 1, 80), ip.build_tcp_syn(src, dst, 1, 90),
        ip.build_udp(src, dst, 1, 53), ip.build_icmp_echo(src, dst, 1, 1),
    ]
    denied = [
        ip.build_tcp_syn(src, dst, 1, 79), ip.build_tcp_syn(src, dst, 1, 91),
        ip.build_udp(src, dst, 1, 80), ip.build_udp(src, dst, 53, 54),
        ip.build_ip(src, dst, 47, b"\x00" * 20),  # GRE
        ip.build_ip(src, dst, 6, b"\x00\x01\x00\x50"),  # truncated TCP header
        ip.build_ip(src, dst, 17, b"\x00\x01\x00"),  # truncated UDP header
    ]
    for packet in allowed:
        assert peer.handle_inbound(packet, 0.0) == packet
    for packet in denied:
        assert peer.handle_inbound(packet, 0.0) == Drop("not_allowed")


def test_ipv4_later_fragments_are_denied_by_port_filters(clock: ManualClock) -> None:
    peer = make(clock)
    peer.add_resource(cidr("10.0.0.0/8", PortRangeFilter("udp", 0, 65535)), None, 0.0)
    fragment = bytearray(ip.build_udp(CLIENT4, "10.0.0.1", 1, 53, b"x" * 16))
    fragment[6:8] = b"\x00\x02"
    fragment[10:12] = b"\x00\x00"
    fragment[10:12] = ip.internet_checksum(bytes(fragment[:20])).to_bytes(2, "big")
    assert peer.handle_inbound(bytes(fragment), 0.0) == Drop("not_allowed")


def test_internet_resource_allows_everything_but_proxy_ranges(clock: ManualClock) -> None:
    peer = make(clock)
    peer.add_resource(InternetResource(uuid.uuid4()), None, 0.0)
    for packet in (
        ip.build_ip(CLIENT4, "8.8.8.8", 47, b"gre"),
        ip.build_tcp_syn(CLIENT6, "2001:4860::1", 1, 22),
    ):
        assert peer.handle_inbound(packet, 0.0) == packet
    for dst, src in (("100.96.0.1", CLIENT4), ("fd00:2021:1111:8000::1", CLIENT6)):
        assert peer.handle_inbound(ip.build_udp(src, dst, 1, 2), 0.0) == Drop("not_allowed")


def test_cidr_superset_filters_combine_in_the_peer(clock: ManualClock) -> None:
    peer = make(clock)
    peer.add_resource(cidr("10.0.0.0/8", TCP80), None, 0.0)
    peer.add_resource(cidr("10.1.0.0/16", PortRangeFilter("udp", 53, 53)), None, 0.0)
    assert isinstance(peer.handle_inbound(ip.build_tcp_syn(CLIENT4, "10.1.0.1", 1, 80), 0.0), bytes)
    assert isinstance(peer.handle_inbound(ip.build_udp(CLIENT4, "10.1.0.1", 1, 53), 0.0), bytes)
    assert peer.handle_inbound(ip.build_udp(CLIENT4, "10.2.0.1", 1, 53), 0.0) == Drop(
        "not_allowed"
    )


def test_malformed_packets_are_counted(clock: ManualClock) -> None:
    peer = make(clock)
    assert peer.handle_inbound(b"", 0.0) == Drop("malformed")
    assert peer.handle_inbound(b"\x45" + bytes(30), 0.0) == Drop("malformed")
    assert peer.handle_inbound(b"\x75" + bytes(40), 0.0) == Drop("malformed")
    assert peer.counters["malformed"] == 3
    assert peer.handle_outbound(b"\x60" + bytes(10), 0.0) is None


# --- ICMP administratively prohibited ---------------------------------------------------


@pytest.mark.parametrize(("dst", "src"), [("10.0.0.1", CLIENT4), ("2001:db8::1", CLIENT6)])
def test_icmp_prohibited_when_enabled(clock: ManualClock, dst: str, src: object) -> None:
    original = ip.build_tcp_syn(src, dst, 40000, 22)  # type: ignore[arg-type]
    silent = make(clock)
    silent.add_resource(cidr("10.0.0.0/8", TCP80), None, 0.0)
    silent.add_resource(cidr("2001:db8::/32", TCP80), None, 0.0)
    assert silent.handle_inbound(original, 0.0) == Drop("not_allowed")
    loud = make(clock, icmp_prohibited=True)
    loud.add_resource(cidr("10.0.0.0/8", TCP80), None, 0.0)
    loud.add_resource(cidr("2001:db8::/32", TCP80), None, 0.0)
    result = loud.handle_inbound(original, 0.0)
    assert isinstance(result, Reply)
    assert_checksums_valid(result.packet)
    assert ip.source(result.packet) == ip.address_bytes(dst)
    assert ip.destination(result.packet) == ip.address_bytes(src)  # type: ignore[arg-type]
    offset = 28 if ip.ip_version(original) == 4 else 48
    assert result.packet[offset:] == original
    code = (3, 13) if ip.ip_version(original) == 4 else (1, 1)
    quoted_at = offset - 8
    assert (result.packet[quoted_at], result.packet[quoted_at + 1]) == code
    assert loud.counters["not_allowed"] == 1
    # spoofed packets never get a reply
    assert loud.handle_inbound(ip.build_tcp_syn("100.64.0.9", "10.0.0.1", 1, 22), 0.0) == Drop(
        "spoofed_source"
    )


# --- authorizations: expiry, re-authorization, updates ----------------------------------


def test_expiry_by_wall_clock_empties_the_client(clock: ManualClock) -> None:
    peer = make(clock)
    short, long_ = cidr("10.0.0.0/8"), cidr("192.168.0.0/16")
    peer.add_resource(short, clock.unix() + 5, clock.monotonic())
    peer.add_resource(long_, clock.unix() + 10, clock.monotonic())
    packet = ip.build_udp(CLIENT4, "10.0.0.1", 1, 2)
    deadline = peer.poll_timeout()
    assert deadline == clock.monotonic() + 1.0
    for _ in range(4):
        clock.tick(1.0)
        peer.handle_timeout(clock.monotonic(), clock.unix())
        assert peer.poll_event() is None
    clock.tick(1.0)
    peer.handle_timeout(clock.monotonic(), clock.unix())
    assert peer.poll_event() == ResourceExpired(short.id)
    assert peer.handle_inbound(packet, clock.monotonic()) == Drop("not_allowed")
    assert not peer.is_empty()
    clock.tick(5.0)
    peer.handle_timeout(clock.monotonic(), clock.unix())
    assert peer.poll_event() == ResourceExpired(long_.id)
    assert peer.is_empty()
    assert peer.poll_timeout() is None


def test_expiry_uses_wall_clock_not_monotonic(clock: ManualClock) -> None:
    peer = make(clock)
    resource = cidr("10.0.0.0/8")
    peer.add_resource(resource, clock.unix() + 3600, clock.monotonic())
    clock.tick(1.0)
    peer.handle_timeout(clock.monotonic(), clock.unix() + 3600)  # wall clock jumped
    assert peer.poll_event() == ResourceExpired(resource.id)


def test_timeout_never_busy_loops(clock: ManualClock) -> None:
    peer = make(clock)
    peer.add_resource(cidr("10.0.0.0/8"), clock.unix() + 100, clock.monotonic())
    for _ in range(5):
        deadline = peer.poll_timeout()
        assert deadline is not None
        clock.skip_to(deadline)
        peer.handle_timeout(clock.monotonic(), clock.unix())
        next_deadline = peer.poll_timeout()
        assert next_deadline is not None and next_deadline > clock.monotonic()
    # an early call changes nothing
    before = peer.poll_timeout()
    peer.handle_timeout(clock.monotonic(), clock.unix())
    assert peer.poll_timeout() == before


def test_with_only_expiries_the_tick_sleeps_until_the_next_one(clock: ManualClock) -> None:
    """No NAT, no translations: wake at the next expires_at, capped at EXPIRY_RECHECK."""
    peer = make(clock)
    far, near = cidr("10.0.0.0/8"), cidr("192.168.0.0/16")
    peer.add_resource(far, clock.unix() + 100, clock.monotonic())
    clock.skip_to(peer.poll_timeout())
    peer.handle_timeout(clock.monotonic(), clock.unix())
    assert peer.poll_timeout() == clock.monotonic() + EXPIRY_RECHECK
    # A new, earlier expiry pulls the tick forward and is honoured on time.
    peer.add_resource(near, clock.unix() + 2.5, clock.monotonic())
    expires_at = clock.unix() + 2.5
    assert peer.poll_timeout() == clock.monotonic() + 1.0
    events = []
    while not events:
        clock.skip_to(peer.poll_timeout())
        peer.handle_timeout(clock.monotonic(), clock.unix())
        events = [e for e in iter(peer.poll_event, None)]
    assert events == [ResourceExpired(near.id)]
    assert clock.unix() == pytest.approx(expires_at)


def test_no_timer_without_anything_to_expire(clock: ManualClock) -> None:
    peer = make(clock)
    peer.add_resource(cidr("10.0.0.0/8"), None, clock.monotonic())
    assert peer.poll_timeout() is None


def test_reauthorization_keeps_expiry_but_updates_filters(clock: ManualClock) -> None:
    peer = make(clock)
    first = cidr("10.0.0.0/8", TCP80)
    peer.add_resource(first, clock.unix() + 5, clock.monotonic())
    again = CidrResource(first.id, first.address, first.name, (PortRangeFilter("udp", 53, 53),))
    peer.add_resource(again, clock.unix() + 1000, clock.monotonic())
    assert peer.resources() == [(again, clock.unix() + 5)]
    assert peer.handle_inbound(ip.build_tcp_syn(CLIENT4, "10.0.0.1", 1, 80), 0.0) == Drop(
        "not_allowed"
    )
    assert isinstance(peer.handle_inbound(ip.build_udp(CLIENT4, "10.0.0.1", 1, 53), 0.0), bytes)
    clock.tick(5.0)
    peer.handle_timeout(clock.monotonic(), clock.unix())
    assert peer.poll_event() == ResourceExpired(first.id)
    # after expiry a new authorization brings the new expiry
    peer.add_resource(again, clock.unix() + 1000, clock.monotonic())
    assert peer.resources() == [(again, clock.unix() + 1000)]


def test_resource_updated_replaces_filters_only(clock: ManualClock) -> None:
    peer = make(clock)
    resource = cidr("10.0.0.0/8", TCP80)
    peer.add_resource(resource, None, 0.0)
    moved = CidrResource(resource.id, ipaddress.ip_network("172.16.0.0/12"), "x", (IcmpFilter(),))
    peer.update_resource(moved)
    (stored, _), = peer.resources()
    assert stored.address == resource.address and stored.filters == (IcmpFilter(),)
    assert isinstance(peer.handle_inbound(ip.build_icmp_echo(CLIENT4, "10.0.0.1", 1, 1), 0.0),
                      bytes)
    assert peer.handle_inbound(ip.build_tcp_syn(CLIENT4, "10.0.0.1", 1, 80), 0.0) == Drop(
        "not_allowed"
    )
    peer.update_resource(DnsResource(resource.id, "a.b", "a.b", ()))  # type change refused
    assert peer.resources()[0][0] == stored
    assert peer.counters["resource_type_change_refused"] == 1
    peer.update_resource(cidr("10.0.0.0/8"))  # unknown id: no-op
    assert len(peer.resources()) == 1


def test_remove_resource(clock: ManualClock) -> None:
    peer = make(clock)
    resource = cidr("10.0.0.0/8")
    peer.add_resource(resource, None, 0.0)
    peer.remove_resource(uuid.uuid4())
    assert not peer.is_empty()
    peer.remove_resource(resource.id)
    assert peer.is_empty()
    assert peer.handle_inbound(ip.build_udp(CLIENT4, "10.0.0.1", 1, 2), 0.0) == Drop(
        "not_allowed"
    )


# --- p2p control and DNS setup ----------------------------------------------------------


def test_assigned_ips_for_unauthorized_resource_is_inactive(clock: ManualClock) -> None:
    peer = make(clock)
    rid = uuid.uuid4()
    result = peer.handle_inbound(encode_assigned_ips(rid, "a.httpbin", PROXIES), 0.0)
    assert isinstance(result, Reply)
    assert decode(result.packet) == DomainStatus(rid, "a.httpbin", False)


def test_assigned_ips_with_non_matching_domain_is_inactive(clock: ManualClock) -> None:
    peer = make(clock)
    resource = dns("*.httpbin")
    peer.add_resource(resource, None, 0.0)
    result = peer.handle_inbound(encode_assigned_ips(resource.id, "evil.com", PROXIES), 0.0)
    assert isinstance(result, Reply)
    assert decode(result.packet) == DomainStatus(resource.id, "evil.com", False)
    # the legacy path refuses too
    assert not peer.setup_dns_translation(resource.id, "evil.com", PROXIES, [REAL4], 0.0)
    cidr_res = cidr("10.0.0.0/8")
    peer.add_resource(cidr_res, None, 0.0)
    assert not peer.setup_dns_translation(cidr_res.id, "a.httpbin", PROXIES, [REAL4], 0.0)
    assert peer.handle_resolved(cidr_res.id, "a.httpbin", PROXIES, [REAL4], 0.0,
                                reply=True) == encode_domain_status(cidr_res.id, "a.httpbin",
                                                                    False)


def test_unknown_control_events_are_ignored(clock: ManualClock) -> None:
    peer = make(clock)
    status = encode_domain_status(uuid.uuid4(), "a", True)
    assert peer.handle_inbound(status, 0.0) == Drop("p2p_ignored")
    unknown = bytearray(status)
    unknown[40] = 7
    assert peer.handle_inbound(bytes(unknown), 0.0) == Drop("p2p_ignored")
    assert peer.counters["p2p_ignored"] == 2


def setup_dns(
    peer: ClientOnGateway, resolved: list, filters: tuple = (), now: float = 0.0  # type: ignore[type-arg]
) -> DnsResource:
    resource = DnsResource(uuid.uuid4(), "**.example.com", "example", filters)
    peer.add_resource(resource, None, now)
    result = peer.handle_inbound(encode_assigned_ips(resource.id, "www.example.com", PROXIES), now)
    assert result == NeedsResolution(resource.id, "www.example.com", tuple(PROXIES))
    status = peer.handle_resolved(resource.id, "www.example.com", PROXIES, resolved, now,
                                  reply=True)
    assert status is not None
    assert decode(status) == DomainStatus(resource.id, "www.example.com", True)
    return resource


def test_round_robin_mapping_and_nat46_64_choice(clock: ManualClock) -> None:
    peer = make(clock)
    other4 = ipaddress.ip_address("93.184.216.35")
    setup_dns(peer, [REAL6, REAL4, other4])
    mapping = peer.translations()
    assert [mapping[p] for p in PROXY4] == [REAL4, other4, REAL4, other4]
    assert all(mapping[p] == REAL6 for p in PROXY6)
    only6 = make(clock)
    setup_dns(only6, [REAL6])
    assert all(only6.translations()[p] == REAL6 for p in PROXY4)  # NAT46


def test_empty_resolution_is_active_but_installs_nothing(clock: ManualClock) -> None:
    peer = make(clock)
    setup_dns(peer, [])
    assert peer.translations() == {}
    assert peer.handle_inbound(ip.build_udp(CLIENT4, PROXY4[0], 1, 53), 0.0) == Drop(
        "not_allowed"
    )


def test_dns_filters_apply_to_proxy_ips(clock: ManualClock) -> None:
    peer = make(clock)
    setup_dns(peer, [REAL4], filters=(TCP80,))
    assert isinstance(peer.handle_inbound(ip.build_tcp_syn(CLIENT4, PROXY4[0], 1, 80), 0.0), bytes)
    assert peer.handle_inbound(ip.build_tcp_syn(CLIENT4, PROXY4[0], 1, 443), 0.0) == Drop(
        "not_allowed"
    )


# --- NAT ---------------------------------------------------------------------------------


def _reply_to(forwarded_packet: bytes, *, kind: str) -> bytes:
    """What the resource answers to a forwarded packet."""
    src, dst = ip.source(forwarded_packet), ip.destination(forwarded_packet)
    l4 = 20 if len(src) == 4 else 40
    if kind == "icmp":
        ident, seq = struct.unpack("!HH", forwarded_packet[l4 + 4 : l4 + 8])
        return ip.build_icmp_echo(dst, src, ident, seq, b"pong", reply=True)
    sport, dport = struct.unpack("!HH", forwarded_packet[l4 : l4 + 4])
    if kind == "tcp":
        return ip.build_tcp(dst, src, dport, sport, flags=0x12, payload=b"synack")
    return ip.build_udp(dst, src, dport, sport, b"answer")


def _request(kind: str, src: object, dst: object, port: int = 40000) -> bytes:
    if kind == "tcp":
        return ip.build_tcp_syn(src, dst, port, 80)  # type: ignore[arg-type]
    if kind == "udp":
        return ip.build_udp(src, dst, port, 53, b"query")  # type: ignore[arg-type]
    return ip.build_icmp_echo(src, dst, port, 7, b"ping")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["tcp", "udp", "icmp"])
@pytest.mark.parametrize(
    ("client", "proxy", "real"),
    [
        (CLIENT4, PROXY4[0], REAL4),  # plain NAT
        (CLIENT6, PROXY6[0], REAL6),
        (CLIENT4, PROXY4[0], REAL6),  # NAT46
        (CLIENT6, PROXY6[0], REAL4),  # NAT64
    ],
)
def test_nat_round_trip(clock: ManualClock, kind: str, client: object, proxy: object,
                        real: object) -> None:
    peer = make(clock)
    setup_dns(peer, [real])
    request = _request(kind, client, proxy)
    out = forwarded(peer.handle_inbound(request, clock.monotonic()))
    assert_checksums_valid(out)
    assert ip.destination(out) == ip.address_bytes(real)  # type: ignore[arg-type]
    own = CLIENT4 if ip.ip_version(out) == 4 else CLIENT6
    assert ip.source(out) == own.packed
    back = peer.handle_outbound(_reply_to(out, kind=kind), clock.monotonic())
    assert back is not None
    assert_checksums_valid(back)
    assert ip.ip_version(back) == ip.ip_version(request)
    assert ip.source(back) == ip.address_bytes(proxy)  # type: ignore[arg-type]
    assert ip.destination(back) == ip.address_bytes(client)  # type: ignore[arg-type]
    l4 = 20 if ip.ip_version(back) == 4 else 40
    if kind == "icmp":
        assert back[l4] == (0 if l4 == 20 else 129)
        assert struct.unpack("!H", back[l4 + 4 : l4 + 6])[0] == 40000
        assert back[l4 + 8 :] == b"pong"
    else:
        assert struct.unpack("!HH", back[l4 : l4 + 4]) == (80 if kind == "tcp" else 53, 40000)


def test_port_collision_between_proxy_ips(clock: ManualClock) -> None:
    peer = make(clock)
    setup_dns(peer, [REAL4])
    a = forwarded(peer.handle_inbound(_request("udp", CLIENT4, PROXY4[0]), 0.0))
    b = forwarded(peer.handle_inbound(_request("udp", CLIENT4, PROXY4[1]), 0.0))
    assert struct.unpack("!H", a[20:22])[0] == 40000
    assert struct.unpack("!H", b[20:22])[0] == 40001
    assert_checksums_valid(b)
    back = peer.handle_outbound(_reply_to(b, kind="udp"), 0.0)
    assert back is not None
    assert ip.source(back) == PROXY4[1].packed
    assert struct.unpack("!H", back[22:24])[0] == 40000


def test_nat_session_expires_60s_after_last_outgoing(clock: ManualClock) -> None:
    peer = make(clock)
    setup_dns(peer, [REAL4])
    out = forwarded(peer.handle_inbound(_request("udp", CLIENT4, PROXY4[0]), clock.monotonic()))
    reply = _reply_to(out, kind="udp")
    for _ in range(59):
        clock.tick(1.0)
        peer.handle_timeout(clock.monotonic(), clock.unix())
        back = peer.handle_outbound(reply, clock.monotonic())  # replies do not refresh
        assert back is not None and ip.source(back) == PROXY4[0].packed
    clock.tick(1.0)
    peer.handle_timeout(clock.monotonic(), clock.unix())
    assert peer.handle_outbound(reply, clock.monotonic()) == reply  # unchanged: no session


def test_untranslatable_packets_to_proxy_ips_are_dropped(clock: ManualClock) -> None:
    peer = make(clock)
    setup_dns(peer, [REAL6])
    gre = ip.build_ip(CLIENT4, PROXY4[0], 47, b"\x00" * 8)
    assert peer.handle_inbound(gre, 0.0) == Drop("unknown_protocol")
    unreachable = ip.build_ip(CLIENT4, PROXY4[0], 1, b"\x03\x03\x00\x00" + bytes(32))
    assert peer.handle_inbound(unreachable, 0.0) == Drop("unknown_protocol")
    # IPv6 -> IPv4 impossible: traffic class does not fit the DSCP bits
    peer64 = make(clock)
    setup_dns(peer64, [REAL4])
    high = bytearray(ip.build_udp(CLIENT6, PROXY6[0], 1, 53, b"x"))
    high[0], high[1] = 0x6F, 0xF0
    assert peer64.handle_inbound(bytes(high), 0.0) == Drop("nat_failed")


def test_outbound_without_session_passes_unchanged(clock: ManualClock) -> None:
    peer = make(clock)
    peer.add_resource(cidr("10.0.0.0/8"), None, 0.0)
    icmp_error = ip.build_ip("10.0.0.1", CLIENT4, 1, b"\x03\x03\x00\x00" + bytes(32))
    assert peer.handle_outbound(icmp_error, 0.0) == icmp_error
    gre = ip.build_ip("10.0.0.1", CLIENT4, 47, b"\x00" * 8)
    assert peer.handle_outbound(gre, 0.0) == gre
    setup_dns(peer, [REAL4])
    forwarded(peer.handle_inbound(_request("tcp", CLIENT4, PROXY4[0]), 0.0))
    assert peer.handle_outbound(icmp_error, 0.0) == icmp_error


# --- translation health / re-resolution -------------------------------------------------


def test_quiet_translation_triggers_re_resolution(clock: ManualClock) -> None:
    peer = make(clock)
    start = clock.monotonic()
    resource = setup_dns(peer, [REAL4], now=start)
    new_real = ipaddress.ip_address("93.184.216.99")
    events = []
    for _ in range(140):
        clock.tick(1.0)
        peer.handle_inbound(_request("udp", CLIENT4, PROXY4[0]), clock.monotonic())
        peer.handle_timeout(clock.monotonic(), clock.unix())
        while (event := peer.poll_event()) is not None:
            events.append((clock.monotonic(), event))
        if events:
            break
    assert len(events) == 1, events
    at, event = events[0]
    assert isinstance(event, NeedsResolution)
    assert event.resource_id == resource.id and event.domain == "www.example.com"
    assert set(event.proxy_ips) == set(PROXIES)
    assert 120.0 <= at - start <= 122.0
    for _ in range(5):  # deduplicated while the resolution is outstanding
        clock.tick(1.0)
        peer.handle_timeout(clock.monotonic(), clock.unix())
        assert peer.poll_event() is None
    # same IPs: nothing changes
    assert peer.handle_resolved(resource.id, event.domain, event.proxy_ips, [REAL4],
                                clock.monotonic(), reply=False) is None
    assert peer.translations()[PROXY4[0]] == REAL4
    # the condition still holds, so the next tick asks again; new IPs re-map
    clock.tick(1.0)
    peer.handle_timeout(clock.monotonic(), clock.unix())
    again = peer.poll_event()
    assert isinstance(again, NeedsResolution)
    peer.handle_resolved(resource.id, again.domain, again.proxy_ips, [new_real],
                         clock.monotonic(), reply=False)
    assert peer.translations()[PROXY4[0]] == new_real
    out = forwarded(peer.handle_inbound(_request("udp", CLIENT4, PROXY4[0]), clock.monotonic()))
    assert ip.destination(out) == new_real.packed


def test_replies_keep_translation_healthy(clock: ManualClock) -> None:
    peer = make(clock)
    setup_dns(peer, [REAL4], now=clock.monotonic())
    for _ in range(200):
        clock.tick(1.0)
        out = forwarded(peer.handle_inbound(_request("udp", CLIENT4, PROXY4[0]),
                                            clock.monotonic()))
        assert peer.handle_outbound(_reply_to(out, kind="udp"), clock.monotonic()) is not None
        peer.handle_timeout(clock.monotonic(), clock.unix())
    # other proxy IPs are quiet, but the domain is alive through PROXY4[0]
    assert peer.poll_event() is None


# --- robustness --------------------------------------------------------------------------


def _busy_peer() -> ClientOnGateway:
    peer = ClientOnGateway(client_id=uuid.uuid4(), ipv4=CLIENT4, ipv6=CLIENT6, now=0.0,
                           icmp_prohibited=True)
    peer.add_resource(cidr("10.0.0.0/8", TCP80, IcmpFilter()), 1.0, 0.0)
    peer.add_resource(InternetResource(uuid.uuid4()), None, 0.0)
    resource = DnsResource(uuid.uuid4(), "**", "any", ())
    peer.add_resource(resource, None, 0.0)
    peer.setup_dns_translation(resource.id, "a.b", PROXIES, [REAL4, REAL6], 0.0)
    return peer


_BUSY = _busy_peer()
_SEEDS = [
    _request("tcp", CLIENT4, PROXY4[0]), _request("udp", CLIENT6, PROXY6[1]),
    _request("icmp", CLIENT4, PROXY4[2]), ip.build_tcp_syn(CLIENT4, "10.0.0.1", 1, 22),
    encode_assigned_ips(uuid.uuid4(), "a.b", PROXIES),
    ip.build_udp(REAL4, CLIENT4, 53, 40000, b"x"), ip.build_tcp(REAL6, CLIENT6, 80, 40000),
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_never_raise(data: bytes) -> None:
    for packet in (data, b"\x45" + data, b"\x60" + data):
        result = _BUSY.handle_inbound(packet, 5.0)
        assert isinstance(result, bytes | Drop | Reply | NeedsResolution)
        out = _BUSY.handle_outbound(packet, 5.0)
        assert out is None or isinstance(out, bytes)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_SEEDS), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                        max_size=4), st.integers(0, 200))
def test_mutated_packets_never_raise(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    packet = bytearray(seed)
    for at, value in flips:
        if at < len(packet):
            packet[at] = value
    data = bytes(packet[: len(packet) - cut % (len(packet) + 1)])
    _BUSY.handle_inbound(data, 5.0)
    _BUSY.handle_outbound(data, 5.0)
    _BUSY.handle_timeout(5.0 + cut, 10.0)


# --- ICMP errors about NAT'd flows ------------------------------------------------------


def _icmp_error(src: object, dst: object, quoted: bytes, *, icmp_type: int, code: int) -> bytes:
    message = struct.pack("!BBHI", icmp_type, code, 0, 0) + quoted
    packet = ip.build_ip(src, dst, 1, message)  # type: ignore[arg-type]
    l4 = 20 if ip.ip_version(packet) == 4 else 40
    proto = 1 if l4 == 20 else 58
    checksum = ip.transport_checksum(ip.source(packet), ip.destination(packet), proto, message)
    return packet[: l4 + 2] + checksum.to_bytes(2, "big") + packet[l4 + 4 :]


@pytest.mark.parametrize(
    ("client", "proxies", "real", "error"),
    [(CLIENT4, PROXY4, REAL4, (3, 3)), (CLIENT6, PROXY6, REAL6, (1, 4))],
)
def test_icmp_error_about_nat_flow_is_reversed(
    clock: ManualClock, client: object, proxies: list, real: object, error: tuple  # type: ignore[type-arg]
) -> None:
    peer = make(clock)
    setup_dns(peer, [real])
    forwarded(peer.handle_inbound(_request("udp", client, proxies[0]), 0.0))
    out = forwarded(peer.handle_inbound(_request("udp", client, proxies[1]), 0.0))
    l4 = 20 if ip.ip_version(out) == 4 else 40
    assert struct.unpack("!H", out[l4 : l4 + 2])[0] == 40001  # collision moved the port
    unreachable = _icmp_error(real, client, out, icmp_type=error[0], code=error[1])
    back = peer.handle_outbound(unreachable, 0.0)
    assert back is not None and back != unreachable
    assert_checksums_valid(back)
    assert ip.source(back) == proxies[1].packed
    assert ip.destination(back) == ip.address_bytes(client)  # type: ignore[arg-type]
    inner = back[l4 + 8 :]
    assert_checksums_valid(inner)  # inner IP header and UDP checksum still verify
    assert ip.source(inner) == ip.address_bytes(client)  # type: ignore[arg-type]
    assert ip.destination(inner) == proxies[1].packed
    assert struct.unpack("!H", inner[l4 : l4 + 2])[0] == 40000


def test_icmp_error_from_a_router_keeps_its_source(clock: ManualClock) -> None:
    peer = make(clock)
    setup_dns(peer, [REAL4])
    out = forwarded(peer.handle_inbound(_request("tcp", CLIENT4, PROXY4[0]), 0.0))
    router = "198.51.100.1"
    exceeded = _icmp_error(router, CLIENT4, out[:28], icmp_type=11, code=0)  # 8-byte quote
    back = peer.handle_outbound(exceeded, 0.0)
    assert back is not None
    assert_checksums_valid(back)
    assert ip.source(back) == ip.address_bytes(router)
    assert back[28 + 16 : 28 + 20] == PROXY4[0].packed


def test_icmp_errors_without_session_or_across_families_pass_unchanged(
    clock: ManualClock,
) -> None:
    peer = make(clock)
    setup_dns(peer, [REAL6])  # IPv4 proxies -> NAT46
    out = forwarded(peer.handle_inbound(_request("udp", CLIENT4, PROXY4[0]), 0.0))
    error = _icmp_error(REAL6, CLIENT6, out, icmp_type=1, code=4)
    assert peer.handle_outbound(error, 0.0) == error
    unrelated = _icmp_error("10.0.0.1", CLIENT4, ip.build_udp(CLIENT4, "10.0.0.1", 5, 6),
                            icmp_type=3, code=3)
    assert peer.handle_outbound(unrelated, 0.0) == unrelated


_ERROR_SEEDS = [
    _icmp_error(REAL4, CLIENT4, _request("tcp", CLIENT4, REAL4), icmp_type=3, code=3),
    _icmp_error("198.51.100.1", CLIENT4, _request("tcp", CLIENT4, REAL4)[:28], icmp_type=11,
                code=0),
    _icmp_error(REAL6, CLIENT6, _request("udp", CLIENT6, REAL6), icmp_type=1, code=4),
    _icmp_error(REAL4, CLIENT4, _request("icmp", CLIENT4, REAL4), icmp_type=3, code=1),
]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_ERROR_SEEDS), st.lists(st.tuples(st.integers(0, 120),
                                                         st.integers(0, 255)), max_size=4),
       st.integers(0, 100))
def test_mutated_icmp_errors_never_raise(
    seed: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    for request in (_request("tcp", CLIENT4, PROXY4[0]), _request("udp", CLIENT6, PROXY6[0]),
                    _request("icmp", CLIENT4, PROXY4[0])):
        _BUSY.handle_inbound(request, 5.0)
    packet = bytearray(seed)
    for at, value in flips:
        if at < len(packet):
            packet[at] = value
    out = _BUSY.handle_outbound(bytes(packet[: len(packet) - cut % (len(packet) + 1)]), 5.0)
    assert out is None or isinstance(out, bytes)


def test_error_seeds_hit_the_reverse_path() -> None:
    """The fuzz seeds above must exercise the translation, not just pass through."""
    peer = _busy_peer()
    peer.handle_inbound(_request("tcp", CLIENT4, PROXY4[0]), 0.0)
    back = peer.handle_outbound(_ERROR_SEEDS[0], 0.0)
    assert back is not None and back != _ERROR_SEEDS[0]
    assert_checksums_valid(back)
