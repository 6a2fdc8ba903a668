"""ICMP "administratively prohibited" replies for packets the filter denies.

Gateways >= 1.4.13 answer a denied packet with ICMPv4 destination unreachable code 13
(RFC 1812 §5.2.7.1) or ICMPv6 destination unreachable code 1 (RFC 4443 §3.1), so that
applications fail fast instead of timing out. The reply appears to come from the
destination the client tried to reach.
"""

from __future__ import annotations

import struct

from gateway.packet.ip import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    ipv4_header,
    ipv6_header,
    transport_checksum,
)

ICMP_DEST_UNREACHABLE = 3
ICMP_CODE_ADMIN_PROHIBITED = 13
ICMPV6_DEST_UNREACHABLE = 1
ICMPV6_CODE_ADMIN_PROHIBITED = 1

#: ICMPv4 errors may quote as much as fits in 576 bytes (RFC 1812 §4.3.2.3).
_MAX_ICMPV4_ERROR = 576
#: ICMPv6 errors must not exceed the minimum IPv6 MTU (RFC 4443 §2.4 (c)).
_MAX_ICMPV6_ERROR = 1280

# Never answer an ICMP error with an ICMP error (RFC 1122 §3.2.2, RFC 4443 §2.4 (e)).
_ICMPV4_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})


def build_prohibited(packet: bytes, *, ttl: int = 64) -> bytes | None:
    """The prohibited reply for a valid IP ``packet``, or None where RFCs forbid one.

    No reply for ICMP errors, non-initial IPv4 fragments or multicast/broadcast
    destinations.
    """
    if packet[0] >> 4 == 4:
        return _prohibited_v4(packet, ttl)
    return _prohibited_v6(packet, ttl)


def _prohibited_v4(packet: bytes, ttl: int) -> bytes | None:
    ihl = (packet[0] & 0x0F) * 4
    if (packet[6] & 0x1F) or packet[7]:
        return None
    if packet[16] >= 224 or packet[16:20] == b"\xff\xff\xff\xff":
        return None
    total = (packet[2] << 8) | packet[3]
    if packet[9] == PROTO_ICMP and (total <= ihl or packet[ihl] in _ICMPV4_ERROR_TYPES):
        return None
    quote = packet[: min(total, _MAX_ICMPV4_ERROR - 28)]
    icmp = struct.pack("!BBHI", ICMP_DEST_UNREACHABLE, ICMP_CODE_ADMIN_PROHIBITED, 0, 0) + quote
    src, dst = packet[16:20], packet[12:16]
    checksum = transport_checksum(src, dst, PROTO_ICMP, icmp)
    icmp = icmp[:2] + checksum.to_bytes(2, "big") + icmp[4:]
    return ipv4_header(src, dst, PROTO_ICMP, len(icmp), ttl=ttl) + icmp


def _prohibited_v6(packet: bytes, ttl: int) -> bytes | None:
    if packet[24] == 0xFF:
        return None
    total = 40 + ((packet[4] << 8) | packet[5])
    if packet[6] == PROTO_ICMPV6 and (total <= 40 or packet[40] < 128):
        return None
    quote = packet[: min(total, _MAX_ICMPV6_ERROR - 48)]
    icmp = (
        struct.pack("!BBHI", ICMPV6_DEST_UNREACHABLE, ICMPV6_CODE_ADMIN_PROHIBITED, 0, 0)
        + quote
    )
    src, dst = packet[24:40], packet[8:24]
    checksum = transport_checksum(src, dst, PROTO_ICMPV6, icmp)
    icmp = icmp[:2] + checksum.to_bytes(2, "big") + icmp[4:]
    return ipv6_header(src, dst, PROTO_ICMPV6, len(icmp), hop_limit=ttl) + icmp
