"""NAT46 / NAT64 header translation (rust/ip-packet/src/nat46.rs, nat64.rs)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.packet import ip
from gateway.packet.nat46 import ipv4_to_ipv6, ipv6_to_ipv4
from tests.unit.test_packet_ip import assert_checksums_valid

A4, B4 = ip.address_bytes("100.64.0.7"), ip.address_bytes("93.184.216.34")
A6, B6 = ip.address_bytes("fd00:2021:1111::7"), ip.address_bytes("2606:2800:220:1::1")


def _v4(kind: str, tos: int = 0, ttl: int = 61) -> bytes:
    if kind == "tcp":
        packet = ip.build_tcp(A4, B4, 40000, 443, payload=b"GET /", ttl=ttl)
    elif kind == "udp":
        packet = ip.build_udp(A4, B4, 40000, 53, b"query", ttl=ttl)
    else:
        packet = ip.build_icmp_echo(A4, B4, 77, 3, b"ping", ttl=ttl)
    if tos:
        header = bytearray(packet[:20])
        header[1] = tos
        header[10:12] = b"\x00\x00"
        header[10:12] = ip.internet_checksum(bytes(header)).to_bytes(2, "big")
        packet = bytes(header) + packet[20:]
    return packet


@pytest.mark.parametrize("kind", ["tcp", "udp", "icmp"])
def test_ipv4_to_ipv6_fields(kind: str) -> None:
    original = _v4(kind, tos=0xB8, ttl=61)  # DSCP 46 (EF)
    out = ipv4_to_ipv6(original, A6, B6)
    assert out is not None
    assert_checksums_valid(out)
    first = struct.unpack("!I", out[:4])[0]
    assert first >> 28 == 6
    assert (first >> 20) & 0xFF == 46  # traffic class = DSCP
    assert first & 0xFFFFF == 0  # flow label
    assert struct.unpack("!H", out[4:6])[0] == len(original) - 20
    assert out[7] == 61  # hop limit = TTL
    assert out[8:24] == A6 and out[24:40] == B6
    if kind == "icmp":
        assert out[6] == 58 and out[40] == 128
        assert out[44:] == original[24:]  # identifier, sequence, payload
    else:
        assert out[6] == original[9]
        assert out[40:44] == original[20:24]  # ports untouched


@pytest.mark.parametrize("kind", ["tcp", "udp", "icmp"])
def test_ipv6_to_ipv4_fields(kind: str) -> None:
    if kind == "tcp":
        original = ip.build_tcp(A6, B6, 1000, 80, payload=b"data", ttl=33)
    elif kind == "udp":
        original = ip.build_udp(A6, B6, 1000, 80, b"data", ttl=33)
    else:
        original = ip.build_icmp_echo(A6, B6, 9, 1, b"data", reply=True, ttl=33)
    out = ipv6_to_ipv4(original, A4, B4)
    assert out is not None
    assert_checksums_valid(out)
    assert out[0] == 0x45
    assert struct.unpack("!H", out[2:4])[0] == len(original) - 40 + 20
    assert out[4:6] == b"\x00\x00"  # identification 0
    assert out[6:8] == b"\x40\x00"  # DF, offset 0
    assert out[8] == 33
    assert out[12:16] == A4 and out[16:20] == B4
    if kind == "icmp":
        assert out[9] == 1 and out[20] == 0  # echo reply
    else:
        assert out[9] == original[6]


@pytest.mark.parametrize("kind", ["tcp", "udp", "icmp"])
def test_round_trip(kind: str) -> None:
    original = _v4(kind, tos=0x28)
    there = ipv4_to_ipv6(original, A6, B6)
    assert there is not None
    back = ipv6_to_ipv4(there, A4, B4)
    assert back is not None
    assert_checksums_valid(back)
    assert back[1] == 0x28
    assert back[9:10] == original[9:10]
    assert back[20:] == original[20:]  # transport identical, incl. checksum


def test_untranslatable_packets() -> None:
    # ICMP errors and non-echo types
    unreachable = ip.build_ip(A4, B4, 1, b"\x03\x03\x00\x00\x00\x00\x00\x00" + b"x" * 28)
    assert ipv4_to_ipv6(unreachable, A6, B6) is None
    # other protocol (GRE)
    assert ipv4_to_ipv6(ip.build_ip(A4, B4, 47, b"\x00" * 8), A6, B6) is None
    assert ipv6_to_ipv4(ip.build_ip(A6, B6, 47, b"\x00" * 8), A4, B4) is None
    # fragments
    fragment = bytearray(_v4("udp"))
    fragment[6] |= 0x20
    assert ipv4_to_ipv6(bytes(fragment), A6, B6) is None
    # IPv6 extension header first
    ext = bytearray(ip.build_udp(A6, B6, 1, 2, b"abc"))
    ext[6] = 0
    assert ipv6_to_ipv4(bytes(ext), A4, B4) is None
    # traffic class > 63
    high = bytearray(ip.build_udp(A6, B6, 1, 2, b"abc"))
    high[0], high[1] = 0x64, 0x00  # traffic class 0x40
    assert ipv6_to_ipv4(bytes(high), A4, B4) is None
    # truncated transport
    assert ipv4_to_ipv6(ip.build_ip(A4, B4, 6, b"\x00" * 10), A6, B6) is None


def test_ipv4_udp_without_checksum_gets_one_in_ipv6() -> None:
    packet = bytearray(ip.build_udp(A4, B4, 1, 2, b"abc"))
    packet[26:28] = b"\x00\x00"
    out = ipv4_to_ipv6(bytes(packet), A6, B6)
    assert out is not None
    assert out[46:48] != b"\x00\x00"
    assert_checksums_valid(out)


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["tcp", "udp", "icmp"]),
    payload=st.binary(max_size=80),
    port=st.integers(0, 65535),
    addresses=st.binary(min_size=40, max_size=40),
)
def test_translated_checksums_always_verify(
    kind: str, payload: bytes, port: int, addresses: bytes
) -> None:
    src4, dst4, src6, dst6 = addresses[:4], addresses[4:8], addresses[8:24], addresses[24:40]
    if kind == "tcp":
        original = ip.build_tcp(src4, dst4, port, 80, payload=payload)
    elif kind == "udp":
        original = ip.build_udp(src4, dst4, port, 80, payload)
    else:
        original = ip.build_icmp_echo(src4, dst4, port, 1, payload)
    v6 = ipv4_to_ipv6(original, src6, dst6)
    assert v6 is not None
    assert_checksums_valid(v6)
    v4 = ipv6_to_ipv4(v6, dst4, src4)
    assert v4 is not None
    assert_checksums_valid(v4)
