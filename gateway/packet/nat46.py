"""IPv4 <-> IPv6 header translation for DNS-resource NAT (rust/ip-packet/src/nat46.rs and nat64.rs,
RFC 6145).

Only what the NAT table can carry is translated: TCP, UDP and ICMP echo request/reply.
1.4.x never reaches its ICMP-error translation (the NAT table rejects
ICMP errors), so ICMP errors, other ICMP types, other protocols, IPv4 fragments and IPv6
packets starting with an extension header are untranslatable: the functions return None
and the caller drops the packet.

DSCP: IPv4 -> IPv6 copies the 6-bit DSCP into the traffic class; IPv6 -> IPv4 puts the
traffic class back into the DSCP bits and fails if it does not fit (> 63), as 1.4 does.
"""

from __future__ import annotations

from gateway.packet.ip import (
    CHECKSUM_OFFSET,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    IPV6_EXTENSION_HEADERS,
    MIN_TRANSPORT_LEN,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    adjust_checksum,
    ipv4_header,
    ipv6_header,
    pseudo_header_sum,
    transport_checksum,
)

_V4_TO_V6_ICMP = {ICMP_ECHO_REQUEST: ICMPV6_ECHO_REQUEST, ICMP_ECHO_REPLY: ICMPV6_ECHO_REPLY}
_V6_TO_V4_ICMP = {ICMPV6_ECHO_REQUEST: ICMP_ECHO_REQUEST, ICMPV6_ECHO_REPLY: ICMP_ECHO_REPLY}


def _translate_segment(
    segment: bytes, protocol: int, icmp_types: dict[int, int], new_protocol: int,
    old_src: bytes, old_dst: bytes, src: bytes, dst: bytes,
) -> bytes | None:
    """The transport segment for the other family, its checksum updated incrementally.

    Only the pseudo header (addresses; for ICMP its presence) and the ICMP type change,
    so RFC 1624 arithmetic on those words replaces a pass over the whole payload.
    """
    if len(segment) < MIN_TRANSPORT_LEN[protocol]:
        return None
    at = CHECKSUM_OFFSET[protocol]
    checksum = (segment[at] << 8) | segment[at + 1]
    head = segment[:at]
    if protocol in (PROTO_ICMP, PROTO_ICMPV6):
        icmp_type = icmp_types.get(segment[0])
        if icmp_type is None or segment[1] != 0:
            return None
        delta = (icmp_type - segment[0]) << 8
        if protocol == PROTO_ICMP:
            delta += pseudo_header_sum(src, dst, PROTO_ICMPV6, len(segment))
        else:
            delta -= pseudo_header_sum(old_src, old_dst, PROTO_ICMPV6, len(segment))
        head = bytes((icmp_type,)) + segment[1:at]
    elif protocol == PROTO_UDP and checksum == 0:
        # IPv4 UDP without checksum: IPv6 requires one, so compute it in full.
        checksum = transport_checksum(src, dst, new_protocol, segment)
        return head + checksum.to_bytes(2, "big") + segment[at + 2 :]
    else:
        delta = (
            int.from_bytes(src, "big") + int.from_bytes(dst, "big")
            - int.from_bytes(old_src, "big") - int.from_bytes(old_dst, "big")
        )
    checksum = adjust_checksum(checksum, 0, delta)
    if checksum == 0 and new_protocol == PROTO_UDP:
        checksum = 0xFFFF
    return head + checksum.to_bytes(2, "big") + segment[at + 2 :]


def ipv4_to_ipv6(packet: bytes, src: bytes, dst: bytes) -> bytes | None:
    """Translate a valid IPv4 packet to IPv6 with the given 16-byte addresses."""
    if (packet[6] & 0x3F) or packet[7]:
        return None  # a fragment: transport checksums cannot be recomputed
    protocol = packet[9]
    if protocol == PROTO_ICMP:
        new_protocol = PROTO_ICMPV6
    elif protocol in (PROTO_TCP, PROTO_UDP):
        new_protocol = protocol
    else:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total = (packet[2] << 8) | packet[3]
    segment = _translate_segment(
        packet[ihl:total], protocol, _V4_TO_V6_ICMP, new_protocol, packet[12:16],
        packet[16:20], src, dst,
    )
    if segment is None:
        return None
    header = ipv6_header(
        src, dst, new_protocol, len(segment), hop_limit=packet[8], traffic_class=packet[1] >> 2
    )
    return header + segment


def ipv6_to_ipv4(packet: bytes, src: bytes, dst: bytes) -> bytes | None:
    """Translate a valid IPv6 packet to IPv4 with the given 4-byte addresses."""
    next_header = packet[6]
    if next_header in IPV6_EXTENSION_HEADERS:
        return None
    if next_header == PROTO_ICMPV6:
        new_protocol = PROTO_ICMP
    elif next_header in (PROTO_TCP, PROTO_UDP):
        new_protocol = next_header
    else:
        return None
    traffic_class = ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)
    if traffic_class > 63:
        return None
    payload_length = (packet[4] << 8) | packet[5]
    if payload_length + 20 > 0xFFFF:
        return None
    segment = _translate_segment(
        packet[40 : 40 + payload_length], next_header, _V6_TO_V4_ICMP, new_protocol,
        packet[8:24], packet[24:40], src, dst,
    )
    if segment is None:
        return None
    header = ipv4_header(
        src, dst, new_protocol, len(segment), ttl=packet[7], tos=traffic_class << 2,
        identification=0, dont_fragment=True,
    )
    return header + segment
