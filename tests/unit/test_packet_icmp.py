"""ICMP "administratively prohibited" replies (gateway/packet/icmp.py)."""

from __future__ import annotations

import struct

from gateway.packet import ip
from gateway.packet.icmp import build_prohibited
from tests.unit.test_packet_ip import assert_checksums_valid

CLIENT4, RES4 = "100.64.0.7", "10.0.0.5"
CLIENT6, RES6 = "fd00:2021:1111::7", "2001:db8::5"


def test_ipv4_reply_is_well_formed() -> None:
    original = ip.build_tcp_syn(CLIENT4, RES4, 40000, 22)
    reply = build_prohibited(original)
    assert reply is not None
    assert_checksums_valid(reply)
    assert reply[9] == ip.PROTO_ICMP
    assert ip.source(reply) == ip.address_bytes(RES4)
    assert ip.destination(reply) == ip.address_bytes(CLIENT4)
    assert (reply[20], reply[21]) == (3, 13)
    assert reply[24:28] == b"\x00" * 4
    assert reply[28:] == original  # short packet: quoted whole
    assert struct.unpack("!H", reply[2:4])[0] == len(reply)


def test_ipv4_quote_is_capped_at_576_bytes() -> None:
    original = ip.build_udp(CLIENT4, RES4, 1, 2, b"x" * 1200)
    reply = build_prohibited(original)
    assert reply is not None
    assert len(reply) == 576
    assert reply[28:] == original[: 576 - 28]
    assert_checksums_valid(reply)


def test_ipv6_reply_is_well_formed() -> None:
    original = ip.build_udp(CLIENT6, RES6, 5000, 53, b"q" * 1200)
    reply = build_prohibited(original)
    assert reply is not None
    assert_checksums_valid(reply)
    assert reply[6] == ip.PROTO_ICMPV6
    assert ip.source(reply) == ip.address_bytes(RES6)
    assert ip.destination(reply) == ip.address_bytes(CLIENT6)
    assert (reply[40], reply[41]) == (1, 1)
    assert len(reply) <= 1280
    assert reply[48:] == original[: len(reply) - 48]


def test_no_reply_to_icmp_errors_fragments_or_multicast() -> None:
    error = build_prohibited(ip.build_tcp_syn(CLIENT4, RES4, 1, 2))
    assert error is not None
    assert build_prohibited(bytes(reversed_src_dst(error))) is None
    error6 = build_prohibited(ip.build_tcp_syn(CLIENT6, RES6, 1, 2))
    assert error6 is not None
    assert build_prohibited(error6) is None
    # echo requests are not errors: they get a reply
    assert build_prohibited(ip.build_icmp_echo(CLIENT4, RES4, 1, 1)) is not None
    assert build_prohibited(ip.build_icmp_echo(CLIENT6, RES6, 1, 1)) is not None
    fragment = bytearray(ip.build_udp(CLIENT4, RES4, 1, 2, b"abc"))
    fragment[6:8] = b"\x00\x20"
    assert build_prohibited(bytes(fragment)) is None
    assert build_prohibited(ip.build_udp(CLIENT4, "224.0.0.251", 5353, 5353)) is None
    assert build_prohibited(ip.build_udp(CLIENT6, "ff02::fb", 5353, 5353)) is None


def reversed_src_dst(packet: bytes) -> bytes:
    """The same ICMP error as if the client had sent it (addresses swapped)."""
    return packet[:12] + packet[16:20] + packet[12:16] + packet[20:]
