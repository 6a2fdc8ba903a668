"""Minimal IPv4/IPv6 packet views, Internet checksums and packet builders.

The data path calls these for every packet, so they read raw bytes with slicing and
``int.from_bytes`` instead of building ``ipaddress`` objects. Addresses are raw ``bytes``
(4 or 16). Checksums use the identity "one's complement sum of 16-bit words == the number
modulo 0xFFFF", which lets CPython do the arithmetic in C on one big integer.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from typing import TypeAlias

from gateway.errors import InvalidArgument

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressLike: TypeAlias = IPAddress | str | bytes

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_P2P_CONTROL = 255

#: IPv6 next-header values that are extension headers (RFC 8200 §4; 59 = no next header).
IPV6_EXTENSION_HEADERS = frozenset({0, 43, 44, 50, 51, 60, 135, 139, 140, 253, 254})

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129

#: Tunnel addresses of clients and gateways (``IPV4_PEERS``, ``IPV6_PEERS`` in
#: rust/connlib/tunnel/src/gateway.rs).
PEERS_V4 = ipaddress.IPv4Network("100.64.0.0/11")
PEERS_V6 = ipaddress.IPv6Network("fd00:2021:1111::/107")
#: Proxy IPs clients assign to DNS-resource names.
RESOURCES_V4 = ipaddress.IPv4Network("100.96.0.0/11")
RESOURCES_V6 = ipaddress.IPv6Network("fd00:2021:1111:8000::/107")

#: Upper bound of an IP packet on the TUN device.
MAX_PACKET_SIZE = 1280

# Offsets of the checksum field inside each transport header.
CHECKSUM_OFFSET = {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMP: 2, PROTO_ICMPV6: 2}
# Minimum transport header sizes we require to consider the transport "parseable".
MIN_TRANSPORT_LEN = {PROTO_TCP: 20, PROTO_UDP: 8, PROTO_ICMP: 8, PROTO_ICMPV6: 8}

_V4_PEERS_KEY = int(PEERS_V4.network_address) >> 21
_V6_PEERS_KEY = int(PEERS_V6.network_address) >> 21
_V4_RESOURCES_KEY = int(RESOURCES_V4.network_address) >> 21
_V6_RESOURCES_KEY = int(RESOURCES_V6.network_address) >> 21


_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


# --- views -------------------------------------------------------------------------------


def ip_version(packet: bytes) -> int:
    """The version nibble (4 or 6 for IP); 0 for an empty buffer."""
    return packet[0] >> 4 if packet else 0


def is_valid_ip_packet(packet: bytes) -> bool:
    """Version nibble and header/length fields are consistent with the buffer."""
    n = len(packet)
    if n < 20:
        return False
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        total = (packet[2] << 8) | packet[3]
        return ihl >= 20 and ihl <= total <= n
    if version == 6:
        return n >= 40 and 40 + ((packet[4] << 8) | packet[5]) <= n
    return False


def packet_length(packet: bytes) -> int:
    """Length the IP header claims (trailing padding excluded). Assumes a valid packet."""
    if packet[0] >> 4 == 4:
        return (packet[2] << 8) | packet[3]
    return 40 + ((packet[4] << 8) | packet[5])


def source(packet: bytes) -> bytes:
    """Raw source address (4 or 16 bytes). Assumes a valid packet."""
    return packet[12:16] if packet[0] >> 4 == 4 else packet[8:24]


def destination(packet: bytes) -> bytes:
    """Raw destination address (4 or 16 bytes). Assumes a valid packet."""
    return packet[16:20] if packet[0] >> 4 == 4 else packet[24:40]


def transport(packet: bytes) -> tuple[int, int, int]:
    """``(protocol, transport offset, end)`` of a valid packet.

    The offset is -1 when there is no transport header to read: an IPv4 fragment other
    than the first, or an IPv6 packet whose first next header is an extension header (the
    protocol is then that extension header's number, as the 1.4 gateway sees it).
    """
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        offset = ihl if not ((packet[6] & 0x1F) or packet[7]) else -1
        return packet[9], offset, (packet[2] << 8) | packet[3]
    protocol = packet[6]
    offset = 40 if protocol not in IPV6_EXTENSION_HEADERS else -1
    return protocol, offset, 40 + ((packet[4] << 8) | packet[5])


def in_peers_range(address: bytes) -> bool:
    """Inside 100.64.0.0/11 or fd00:2021:1111::/107 (both /11 and /107 leave 21 host bits)."""
    key = int.from_bytes(address, "big") >> 21
    return key == _V4_PEERS_KEY if len(address) == 4 else key == _V6_PEERS_KEY


def in_resources_range(address: bytes) -> bool:
    """Inside the DNS proxy ranges 100.96.0.0/11 or fd00:2021:1111:8000::/107."""
    key = int.from_bytes(address, "big") >> 21
    return key == _V4_RESOURCES_KEY if len(address) == 4 else key == _V6_RESOURCES_KEY


def address_bytes(address: AddressLike) -> bytes:
    """Raw bytes of an address given as ``ipaddress`` object, string or bytes."""
    if isinstance(address, bytes):
        if len(address) not in (4, 16):
            raise InvalidArgument(f"raw address must be 4 or 16 bytes, got {len(address)}")
        return address
    if isinstance(address, str):
        address = ipaddress.ip_address(address)
    return address.packed


def to_ip_address(raw: bytes) -> IPAddress:
    """The ``ipaddress`` object for 4 or 16 raw bytes."""
    return ipaddress.IPv4Address(raw) if len(raw) == 4 else ipaddress.IPv6Address(raw)


# --- checksums ---------------------------------------------------------------------------


def word_sum(data: bytes) -> int:
    """One's complement sum of ``data`` as 16-bit big-endian words, modulo 0xFFFF.

    ``data`` of odd length is padded with a zero byte, as RFC 1071 says.
    """
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    return value % 0xFFFF


def fold(total: int, nonzero: bool = True) -> int:
    """The checksum field value for a modulo-0xFFFF word sum (RFC 1071 result range)."""
    total %= 0xFFFF
    if total == 0 and nonzero:
        total = 0xFFFF  # one's complement "negative zero": the sum of non-zero data
    return 0xFFFF - total


def internet_checksum(data: bytes) -> int:
    """RFC 1071 checksum of ``data`` (whose checksum field must be zero)."""
    return fold(word_sum(data), any(data))


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Word sum of the TCP/UDP/ICMPv6 pseudo header (RFC 768, RFC 8200 §8.1)."""
    return (int.from_bytes(src, "big") + int.from_bytes(dst, "big") + protocol + length) % 0xFFFF


def transport_checksum(src: bytes, dst: bytes, protocol: int, segment: bytes) -> int:
    """Checksum of a TCP/UDP/ICMP/ICMPv6 ``segment`` whose checksum field may hold anything.

    ICMPv4 has no pseudo header. A UDP result of zero is sent as 0xFFFF (RFC 768).
    """
    offset = CHECKSUM_OFFSET[protocol]
    stale = (segment[offset] << 8) | segment[offset + 1]
    total = word_sum(segment) - stale
    if protocol != PROTO_ICMP:
        total += pseudo_header_sum(src, dst, protocol, len(segment))
    checksum = fold(total)
    if checksum == 0 and protocol == PROTO_UDP:
        checksum = 0xFFFF
    return checksum


def adjust_checksum(checksum: int, removed: int, added: int) -> int:
    """RFC 1624 incremental update: the word sums ``removed`` were replaced by ``added``."""
    return fold((0xFFFF - checksum) - removed + added)


def ipv4_header_checksum(header: bytes) -> int:
    """Checksum of an IPv4 header whose checksum field may hold anything."""
    stale = (header[10] << 8) | header[11]
    return fold(word_sum(header) - stale)


# --- rewriting ---------------------------------------------------------------------------


def rewrite(
    packet: bytes,
    l4: int,
    protocol: int,
    *,
    src: bytes | None = None,
    dst: bytes | None = None,
    port_offset: int = -1,
    port: int = 0,
) -> bytes:
    """Replace addresses and/or one 16-bit transport field, updating checksums incrementally.

    Works on a valid TCP/UDP/ICMP packet of either family whose transport header starts at
    ``l4`` and is at least ``MIN_TRANSPORT_LEN`` long. ``port_offset`` is relative to
    ``l4`` (0: source port, 2: destination port, 4: ICMP echo identifier). Incremental
    updates (RFC 1624) cost the same for any packet size, keep a wrong checksum wrong
    instead of silently "fixing" it, and also work for the first fragment of a datagram.
    This runs per NAT'd packet, so the checksum folding is inlined:
    ``0xFFFF - ((sum - 1) % 0xFFFF + 1)`` is ``fold(sum)``.
    """
    buf = bytearray(packet)
    unpack_address: Callable[[bytes, int], tuple[int, ...]]
    if packet[0] >> 4 == 4:
        src_at, dst_at, width, unpack_address = 12, 16, 4, _U32.unpack_from
    else:
        src_at, dst_at, width, unpack_address = 8, 24, 16, _u128
    delta = 0
    if src is not None:
        delta = int.from_bytes(src, "big") - unpack_address(packet, src_at)[0]
        buf[src_at : src_at + width] = src
    if dst is not None:
        delta += int.from_bytes(dst, "big") - unpack_address(packet, dst_at)[0]
        buf[dst_at : dst_at + width] = dst
    if width == 4 and delta:
        checksum = _U16.unpack_from(packet, 10)[0]
        _U16.pack_into(buf, 10, 0xFFFF - ((0xFFFF - checksum + delta - 1) % 0xFFFF + 1))
    if protocol == PROTO_ICMP:
        delta = 0  # ICMPv4 has no pseudo header
    if port_offset >= 0:
        at = l4 + port_offset
        old_port = _U16.unpack_from(packet, at)[0]
        if old_port != port:
            delta += port - old_port
            _U16.pack_into(buf, at, port)
    if not delta:
        return bytes(buf)
    at = l4 + (16 if protocol == PROTO_TCP else 6 if protocol == PROTO_UDP else 2)
    checksum = _U16.unpack_from(packet, at)[0]
    if protocol == PROTO_UDP and checksum == 0 and width == 4:
        return bytes(buf)  # IPv4 UDP without checksum stays without
    checksum = 0xFFFF - ((0xFFFF - checksum + delta - 1) % 0xFFFF + 1)
    if checksum == 0 and protocol == PROTO_UDP:
        checksum = 0xFFFF
    _U16.pack_into(buf, at, checksum)
    return bytes(buf)


def _u128(packet: bytes, offset: int) -> tuple[int]:
    return (int.from_bytes(packet[offset : offset + 16], "big"),)


# --- builders ----------------------------------------------------------------------------


def ipv4_header(
    src: bytes, dst: bytes, protocol: int, payload_length: int, *, ttl: int = 64,
    tos: int = 0, identification: int = 0, dont_fragment: bool = True,
) -> bytes:
    """A 20-byte IPv4 header with a correct checksum."""
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, tos, 20 + payload_length, identification,
        0x4000 if dont_fragment else 0, ttl, protocol, 0, src, dst,
    )
    return header[:10] + internet_checksum(header).to_bytes(2, "big") + header[12:]


def ipv6_header(
    src: bytes, dst: bytes, next_header: int, payload_length: int, *, hop_limit: int = 64,
    traffic_class: int = 0, flow_label: int = 0,
) -> bytes:
    """A 40-byte IPv6 header."""
    first = (6 << 28) | (traffic_class << 20) | flow_label
    return struct.pack("!IHBB", first, payload_length, next_header, hop_limit) + src + dst


def build_ip(
    src: AddressLike, dst: AddressLike, protocol: int, payload: bytes, *, ttl: int = 64
) -> bytes:
    """An IP packet of the addresses' family carrying ``payload`` as-is (no checksum work).

    ``protocol`` is the IPv4 protocol number; ICMP (1) becomes 58 for IPv6.
    """
    s, d = address_bytes(src), address_bytes(dst)
    if len(s) != len(d):
        raise InvalidArgument("source and destination must be of the same family")
    if len(s) == 4:
        return ipv4_header(s, d, protocol, len(payload), ttl=ttl) + payload
    if protocol == PROTO_ICMP:
        protocol = PROTO_ICMPV6
    return ipv6_header(s, d, protocol, len(payload), hop_limit=ttl) + payload


def _with_transport_checksum(packet: bytes, protocol: int) -> bytes:
    l4 = 20 if packet[0] >> 4 == 4 else 40
    if l4 == 40 and protocol == PROTO_ICMP:
        protocol = PROTO_ICMPV6
    segment = packet[l4:]
    checksum = transport_checksum(source(packet), destination(packet), protocol, segment)
    at = l4 + CHECKSUM_OFFSET[protocol]
    return packet[:at] + checksum.to_bytes(2, "big") + packet[at + 2 :]


def build_udp(
    src: AddressLike, dst: AddressLike, sport: int, dport: int, payload: bytes = b"",
    *, ttl: int = 64,
) -> bytes:
    """A UDP datagram with correct checksums."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return _with_transport_checksum(build_ip(src, dst, PROTO_UDP, udp, ttl=ttl), PROTO_UDP)


def build_tcp(
    src: AddressLike, dst: AddressLike, sport: int, dport: int, *, flags: int = 0x10,
    seq: int = 0, ack: int = 0, payload: bytes = b"", window: int = 65535, ttl: int = 64,
) -> bytes:
    """A TCP segment (20-byte header, no options) with correct checksums."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0)
    return _with_transport_checksum(
        build_ip(src, dst, PROTO_TCP, tcp + payload, ttl=ttl), PROTO_TCP
    )


def build_tcp_syn(
    src: AddressLike, dst: AddressLike, sport: int, dport: int, *, seq: int = 0, ttl: int = 64
) -> bytes:
    """A TCP SYN with correct checksums."""
    return build_tcp(src, dst, sport, dport, flags=0x02, seq=seq, ttl=ttl)


def build_icmp_echo(
    src: AddressLike, dst: AddressLike, identifier: int, sequence: int, payload: bytes = b"",
    *, reply: bool = False, ttl: int = 64,
) -> bytes:
    """An ICMP (IPv4) or ICMPv6 (IPv6) echo request, or reply if ``reply``."""
    v4 = len(address_bytes(src)) == 4
    if v4:
        icmp_type = ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST
    else:
        icmp_type = ICMPV6_ECHO_REPLY if reply else ICMPV6_ECHO_REQUEST
    icmp = struct.pack("!BBHHH", icmp_type, 0, 0, identifier, sequence) + payload
    return _with_transport_checksum(build_ip(src, dst, PROTO_ICMP, icmp, ttl=ttl), PROTO_ICMP)
