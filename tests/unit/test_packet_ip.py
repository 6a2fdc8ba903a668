"""IP views, checksums, builders and incremental rewriting (gateway/packet/ip.py).

``rfc1071`` and ``assert_checksums_valid`` are an independent reference (a plain RFC 1071
loop, addresses parsed with ``ipaddress``) that other packet tests import.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.packet import ip


def rfc1071(data: bytes) -> int:
    """Textbook Internet checksum: 16-bit words, end-around carry, complement."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def assert_checksums_valid(packet: bytes) -> None:
    """IPv4 header and TCP/UDP/ICMP/ICMPv6 checksums verify (sum over data incl. field = 0)."""
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        assert rfc1071(packet[:ihl]) == 0, "IPv4 header checksum"
        total = struct.unpack("!H", packet[2:4])[0]
        src = ipaddress.IPv4Address(packet[12:16]).packed
        dst = ipaddress.IPv4Address(packet[16:20]).packed
        proto, segment = packet[9], packet[ihl:total]
    else:
        assert version == 6
        length = struct.unpack("!H", packet[4:6])[0]
        src = ipaddress.IPv6Address(packet[8:24]).packed
        dst = ipaddress.IPv6Address(packet[24:40]).packed
        proto, segment = packet[6], packet[40 : 40 + length]
    if proto == 1:
        assert rfc1071(segment) == 0, "ICMPv4 checksum"
        return
    if proto == 17 and version == 4 and segment[6:8] == b"\x00\x00":
        return  # no UDP checksum
    pseudo = src + dst + struct.pack("!IxxxB", len(segment), proto)
    if proto in (6, 17, 58):
        assert rfc1071(pseudo + segment) == 0, f"protocol {proto} checksum"


V4A, V4B = "100.64.0.1", "10.0.0.5"
V6A, V6B = "fd00:2021:1111::1", "2001:db8::5"


@pytest.mark.parametrize(("src", "dst"), [(V4A, V4B), (V6A, V6B)])
def test_builders_produce_valid_packets(src: str, dst: str) -> None:
    for packet in (
        ip.build_udp(src, dst, 5353, 53, b"hello"),
        ip.build_udp(src, dst, 1, 2, b"odd"),
        ip.build_tcp_syn(src, dst, 40000, 443, seq=7),
        ip.build_icmp_echo(src, dst, 0x1234, 9, b"ping"),
        ip.build_icmp_echo(ipaddress.ip_address(src), ipaddress.ip_address(dst), 1, 2, reply=True),
    ):
        assert ip.is_valid_ip_packet(packet)
        assert ip.source(packet) == ipaddress.ip_address(src).packed
        assert ip.destination(packet) == ipaddress.ip_address(dst).packed
        assert_checksums_valid(packet)


def test_builder_fields() -> None:
    packet = ip.build_tcp_syn(V4A, V4B, 40000, 443, seq=7)
    assert ip.ip_version(packet) == 4
    assert ip.transport(packet) == (ip.PROTO_TCP, 20, len(packet))
    assert struct.unpack("!HHI", packet[20:28]) == (40000, 443, 7)
    assert packet[33] == 0x02  # SYN
    echo6 = ip.build_icmp_echo(V6A, V6B, 5, 6)
    assert ip.ip_version(echo6) == 6
    assert echo6[6] == ip.PROTO_ICMPV6 and echo6[40] == 128
    assert ip.build_icmp_echo(V4A, V4B, 5, 6, reply=True)[20] == 0


def test_validity_checks() -> None:
    good = ip.build_udp(V4A, V4B, 1, 2, b"x" * 10)
    assert ip.is_valid_ip_packet(good)
    assert ip.is_valid_ip_packet(good + b"\x00" * 3)  # trailing padding is tolerated
    assert not ip.is_valid_ip_packet(b"")
    assert not ip.is_valid_ip_packet(good[:19])
    assert not ip.is_valid_ip_packet(good[:-1])  # total length exceeds buffer
    assert not ip.is_valid_ip_packet(bytes([0x44]) + good[1:])  # IHL 4 < 5
    assert not ip.is_valid_ip_packet(bytes([0x55]) + good[1:])  # version 5
    good6 = ip.build_udp(V6A, V6B, 1, 2, b"x")
    assert ip.is_valid_ip_packet(good6)
    assert not ip.is_valid_ip_packet(good6[:-1])
    assert ip.ip_version(b"") == 0


def test_ranges() -> None:
    assert ip.in_peers_range(ipaddress.ip_address("100.64.0.0").packed)
    assert ip.in_peers_range(ipaddress.ip_address("100.95.255.255").packed)
    assert not ip.in_peers_range(ipaddress.ip_address("100.96.0.0").packed)
    assert ip.in_resources_range(ipaddress.ip_address("100.96.0.1").packed)
    assert ip.in_resources_range(ipaddress.ip_address("100.127.255.255").packed)
    assert not ip.in_resources_range(ipaddress.ip_address("100.128.0.0").packed)
    assert ip.in_peers_range(ipaddress.ip_address("fd00:2021:1111::1f:ffff").packed)
    assert not ip.in_peers_range(ipaddress.ip_address("fd00:2021:1111::20:0").packed)
    assert ip.in_resources_range(ipaddress.ip_address("fd00:2021:1111:8000::3").packed)
    assert not ip.in_resources_range(ipaddress.ip_address("fd00:2021:1111:8000::20:0").packed)
    assert str(ip.PEERS_V4) == "100.64.0.0/11" and str(ip.PEERS_V6) == "fd00:2021:1111::/107"
    assert str(ip.RESOURCES_V4) == "100.96.0.0/11"
    assert str(ip.RESOURCES_V6) == "fd00:2021:1111:8000::/107"


def test_fragment_has_no_transport() -> None:
    packet = bytearray(ip.build_udp(V4A, V4B, 1, 2, b"abc"))
    packet[6:8] = b"\x00\x10"  # fragment offset 16
    assert ip.transport(bytes(packet))[1] == -1
    ext = bytearray(ip.build_udp(V6A, V6B, 1, 2, b"abc"))
    ext[6] = 0  # hop-by-hop first
    assert ip.transport(bytes(ext)) == (0, -1, len(ext))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_internet_checksum_matches_reference(data: bytes) -> None:
    expected = rfc1071(data)
    assert ip.internet_checksum(data) == expected


@settings(max_examples=150, deadline=None)
@given(
    family=st.sampled_from([4, 6]),
    proto=st.sampled_from(["tcp", "udp", "icmp"]),
    payload=st.binary(max_size=64),
    port=st.integers(0, 65535),
    new_port=st.integers(0, 65535),
    new_dst=st.binary(min_size=16, max_size=16),
    new_src=st.binary(min_size=16, max_size=16),
)
def test_incremental_rewrite_equals_recompute(
    family: int, proto: str, payload: bytes, port: int, new_port: int, new_dst: bytes,
    new_src: bytes,
) -> None:
    src, dst = (V4A, V4B) if family == 4 else (V6A, V6B)
    width = 4 if family == 4 else 16
    if proto == "tcp":
        packet, number, at = ip.build_tcp(src, dst, port, 80, payload=payload), 6, 0
    elif proto == "udp":
        packet, number, at = ip.build_udp(src, dst, port, 80, payload), 17, 0
    else:
        packet, number, at = ip.build_icmp_echo(src, dst, port, 1, payload), 1, 4
        if family == 6:
            number = 58
    l4 = 20 if family == 4 else 40
    out = ip.rewrite(packet, l4, number, src=new_src[:width], dst=new_dst[:width],
                     port_offset=at, port=new_port)
    assert ip.source(out) == new_src[:width] and ip.destination(out) == new_dst[:width]
    assert int.from_bytes(out[l4 + at : l4 + at + 2], "big") == new_port
    assert_checksums_valid(out)


def test_rewrite_keeps_missing_ipv4_udp_checksum() -> None:
    packet = bytearray(ip.build_udp(V4A, V4B, 1, 2, b"abc"))
    packet[26:28] = b"\x00\x00"
    out = ip.rewrite(bytes(packet), 20, 17, dst=bytes([10, 0, 0, 9]), port_offset=0, port=9)
    assert out[26:28] == b"\x00\x00"
    assert rfc1071(out[:20]) == 0


def test_reference_checker_catches_bad_checksum() -> None:
    packet = bytearray(ip.build_tcp_syn(V4A, V4B, 1, 2))
    packet[-1] ^= 1
    with pytest.raises(AssertionError):
        assert_checksums_valid(bytes(packet))
