"""ICMP the gateway itself produces or rewrites.

"Administratively prohibited" replies for packets the filter denies, and the reverse NAT
of ICMP errors that quote a DNS-resource NAT'd packet.

Gateways >= 1.4.13 answer a denied packet with ICMPv4 destination unreachable code 13
(RFC 1812 §5.2.7.1) or ICMPv6 destination unreachable code 1 (RFC 4443 §3.1), so that
applications fail fast instead of timing out. The reply appears to come from the
destination the client tried to reach.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gateway.packet.ip import (
    CHECKSUM_OFFSET,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    adjust_checksum,
    ipv4_header,
    ipv4_header_checksum,
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


# --- ICMP errors about NAT'd flows -------------------------------------------------------

#: ICMP error types that quote the offending packet (RFC 792, RFC 4443).
ICMPV4_QUOTING_ERRORS = frozenset({3, 11, 12})
ICMPV6_QUOTING_ERRORS = frozenset({1, 2, 3, 4})


@dataclass(frozen=True, slots=True)
class QuotedFlow:
    """The flow of the packet quoted in an ICMP error, as NAT keys it.

    ``kind``/``port``/``destination`` form the NAT outside key of the quoted (outgoing)
    packet; the offsets locate the fields ``reverse_icmp_error`` rewrites.
    """

    kind: int
    port: int
    destination: bytes
    inner_at: int
    inner_l4: int
    inner_protocol: int


def quoted_flow(packet: bytes, l4: int, end: int) -> QuotedFlow | None:
    """The quoted TCP/UDP/ICMP-echo flow of an ICMP error in a valid packet, or None.

    ``l4``/``end``: offsets of the outer ICMP message. The quote must hold the whole inner
    IP header and the first 8 transport bytes (ports or echo identifier).
    """
    v4 = packet[0] >> 4 == 4
    if end - l4 < 8 or packet[l4] not in (ICMPV4_QUOTING_ERRORS if v4 else ICMPV6_QUOTING_ERRORS):
        return None
    inner_at = l4 + 8
    if v4:
        if end - inner_at < 28 or packet[inner_at] >> 4 != 4:
            return None
        inner_l4 = inner_at + (packet[inner_at] & 0x0F) * 4
        protocol = packet[inner_at + 9]
        destination = packet[inner_at + 16 : inner_at + 20]
        echo_request = (protocol == PROTO_ICMP, 8)
    else:
        if end - inner_at < 48 or packet[inner_at] >> 4 != 6:
            return None
        inner_l4 = inner_at + 40
        protocol = packet[inner_at + 6]
        destination = packet[inner_at + 24 : inner_at + 40]
        echo_request = (protocol == PROTO_ICMPV6, 128)
    if inner_l4 < inner_at + 20 or end - inner_l4 < 8:
        return None
    if protocol in (PROTO_TCP, PROTO_UDP):
        port_at, kind = inner_l4, protocol
    elif echo_request[0] and packet[inner_l4] == echo_request[1]:
        port_at, kind = inner_l4 + 4, PROTO_ICMP
    else:
        return None
    port = (packet[port_at] << 8) | packet[port_at + 1]
    return QuotedFlow(kind, port, destination, inner_at, inner_l4, protocol)


def reverse_icmp_error(
    packet: bytes, l4: int, end: int, flow: QuotedFlow, *, inner_destination: bytes,
    port: int, outer_source: bytes | None,
) -> bytes:
    """Undo NAT inside an ICMP error: the quoted packet goes to ``inner_destination`` from
    ``port`` again, and the error comes from ``outer_source`` if given (the resource itself
    sent it). Inner checksums are updated incrementally where the quote holds them; the
    ICMP checksum is recomputed.
    """
    buf = bytearray(packet[:end])
    v4 = packet[0] >> 4 == 4
    width = 4 if v4 else 16
    inner_dst_at = flow.inner_at + (16 if v4 else 24)
    address_delta = int.from_bytes(inner_destination, "big") - int.from_bytes(
        flow.destination, "big"
    )
    buf[inner_dst_at : inner_dst_at + width] = inner_destination
    if v4:
        at = flow.inner_at + 10
        checksum = (buf[at] << 8) | buf[at + 1]
        buf[at : at + 2] = adjust_checksum(checksum, 0, address_delta).to_bytes(2, "big")
    port_at = flow.inner_l4 + (4 if flow.kind == PROTO_ICMP else 0)
    delta = port - flow.port
    buf[port_at : port_at + 2] = port.to_bytes(2, "big")
    if flow.inner_protocol != PROTO_ICMP:
        delta += address_delta  # pseudo header
    at = flow.inner_l4 + CHECKSUM_OFFSET[flow.inner_protocol]
    if at + 2 <= end:
        checksum = (buf[at] << 8) | buf[at + 1]
        if not (checksum == 0 and flow.inner_protocol == PROTO_UDP and v4):
            buf[at : at + 2] = adjust_checksum(checksum, 0, delta).to_bytes(2, "big")
    if outer_source is not None:
        src_at = 12 if v4 else 8
        buf[src_at : src_at + width] = outer_source
    if v4:
        buf[10:12] = ipv4_header_checksum(bytes(buf[:l4])).to_bytes(2, "big")
    message = bytes(buf[l4:])
    src = bytes(buf[12:16] if v4 else buf[8:24])
    dst = bytes(buf[16:20] if v4 else buf[24:40])
    checksum = transport_checksum(src, dst, PROTO_ICMP if v4 else PROTO_ICMPV6, message)
    buf[l4 + 2 : l4 + 4] = checksum.to_bytes(2, "big")
    return bytes(buf)
