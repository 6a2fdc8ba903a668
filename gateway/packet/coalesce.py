"""Coalescing a batch of IP packets into GSO super-packets for a TUN with IFF_VNET_HDR, sans-IO.

One ``write`` to a TUN device costs about 5 µs, most of it the kernel routing, filtering
and forwarding one packet. With ``IFF_VNET_HDR`` each write starts with a
``virtio_net_hdr`` and may carry a GSO super-packet: the kernel then routes, NATs and
forwards one large packet and cuts it into segments only where it must (often never,
since veth and most NICs take GSO packets as they are). This module does for the TUN what
GRO does for a NIC: it merges *adjacent* packets of one flow into one super-packet.

What merges (the rules follow Linux's TCP/UDP GRO, so segmenting the result gives back
the packets that went in, header for header):

* TCP over IPv4 without options (DF set, not fragmented) or IPv6 without extension
  headers: the same addresses, ports, TOS/traffic class, TTL/hop limit, ACK number,
  window and TCP options; flags exactly ACK, PSH allowed on the last one; each sequence
  number continues the previous segment; every payload the size of the first, except a
  shorter last one.
* UDP with the same fields (minus the TCP ones): payloads the size of the first, except a
  shorter last one ("UDP_L4" GSO, Linux 6.2+ on a TUN; the caller falls back when refused).

The super-packet's transport checksum holds the pseudo-header sum and the header asks the
kernel to finish it (``VIRTIO_NET_HDR_F_NEEDS_CSUM``), as a NIC driver would.
"""

from __future__ import annotations

import struct

from gateway.packet.ip import ipv4_header_checksum, pseudo_header_sum

VIRTIO_NET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP_L4 = 5
GSO_TCPV6 = 4

#: The header in front of a packet that is not a super-packet.
PLAIN_HEADER = bytes(VIRTIO_NET_HDR_LEN)
#: Segments merged at most (Linux GRO stops at 64 too).
MAX_SEGMENTS = 64
#: An IPv4 total length / IPv6 payload length field is 16 bits.
MAX_LENGTH = 65535

_VNET = struct.Struct("=BBHHHH")
#: The header fields a TCP run's segments repeat (all but the IP ID, the checksums, the
#: sequence number and the urgent pointer), read in one call; options are compared apart.
_TCP4_RUN = struct.Struct("!HH2xHH2xQI4xIBBH")
_TCP6_RUN = struct.Struct("!IHHQQQQI4xIBBH")
_SEQ = struct.Struct("!I")
_TCP_ACK, _TCP_PSH = 0x10, 0x08
_PROTO_TCP, _PROTO_UDP = 6, 17


def _flow(packet: bytes) -> tuple[bytes, int, int, int, int] | None:
    """``(flow key, protocol, l3 header length, l4 header length, payload length)`` or None.

    None means "never merge this packet" (not TCP/UDP, options, fragments, odd lengths).
    """
    size = len(packet)
    if size < 28:
        return None
    version = packet[0] >> 4
    if version == 4:
        if packet[0] != 0x45 or ((packet[2] << 8) | packet[3]) != size:
            return None
        if packet[6] & 0x7F != 0x40 or packet[7]:  # DF set, MF clear, offset zero
            return None
        protocol, l3 = packet[9], 20
        # TOS, TTL, protocol, addresses: the fields every segment must share.
        key = packet[1:2] + packet[8:10] + packet[12:20]
    elif version == 6:
        if size < 48 or 40 + ((packet[4] << 8) | packet[5]) != size:
            return None
        protocol, l3 = packet[6], 40
        key = packet[0:4] + packet[6:8] + packet[8:40]
    else:
        return None
    if protocol == _PROTO_TCP:
        if size < l3 + 20:
            return None
        l4 = (packet[l3 + 12] >> 4) * 4
        if l4 < 20 or size <= l3 + l4:
            return None
        # Ports, ACK number, data offset, window and options must all match.
        key += packet[l3:l3 + 4] + packet[l3 + 8:l3 + 13] + packet[l3 + 14:l3 + 16]
        key += packet[l3 + 20:l3 + l4]
    elif protocol == _PROTO_UDP:
        l4 = 8
        if ((packet[l3 + 4] << 8) | packet[l3 + 5]) != size - l3 or size <= l3 + 8:
            return None
        key += packet[l3:l3 + 4]
    else:
        return None
    return key, protocol, l3, l4, size - l3 - l4


def udp_template(first: bytes) -> tuple[bytes, bytes, bytes]:
    """What a UDP run's later datagrams must repeat: see :func:`udp_continues`."""
    if first[0] >> 4 == 4:
        return first[:2], first[8:10], first[12:24]  # version+IHL+TOS; TTL+proto; addrs+ports
    return first[:4], first[6:44], b""  # version+class+label; next header..ports


def udp_continues(packet: bytes, template: tuple[bytes, bytes, bytes]) -> int:
    """The payload length if ``packet`` is a mergeable UDP datagram of the run
    ``template`` comes from (the fields :func:`_flow` keys on, and its checks), else -1.

    Two slice compares instead of building the flow key: in a bulk UDP run this is the
    check every datagram after the first takes.
    """
    size = len(packet)
    head, middle, tail = template
    if tail:  # IPv4
        if (
            size <= 28
            or packet[:2] != head
            or ((packet[2] << 8) | packet[3]) != size
            or packet[6] & 0x7F != 0x40
            or packet[7]
            or packet[12:24] != tail
            or packet[8:10] != middle
            or ((packet[24] << 8) | packet[25]) != size - 20
        ):
            return -1
        return size - 28
    if (
        size <= 48
        or packet[:4] != head
        or 40 + ((packet[4] << 8) | packet[5]) != size
        or packet[6:44] != middle
        or ((packet[44] << 8) | packet[45]) != size - 40
    ):
        return -1
    return size - 48


#: A TCP run's first segment as :func:`tcp_continues` needs it.
TcpTemplate = tuple[struct.Struct, tuple[int, ...], int, int, bytes]


def tcp_template(first: bytes, l3: int, l4: int) -> TcpTemplate:
    """What a TCP run's later full-size segments must repeat of ``first`` (pure ACKs)."""
    fields = _TCP4_RUN if l3 == 20 else _TCP6_RUN
    return fields, fields.unpack_from(first), len(first), l3, first[l3 + 20:l3 + l4]


def tcp_continues(packet: bytes, run: TcpTemplate, next_seq: int) -> bool:
    """True if ``packet`` is the next full-size, ACK-only segment of ``run``: the same size
    and header fields as its first segment, ``next_seq`` as its sequence number.

    One struct read and a tuple compare instead of building the flow key. It accepts a
    subset of what :func:`plan`'s full rules accept (a shorter last segment or PSH takes
    those), so it only saves time: bulk TCP runs are mostly segments like this.
    """
    fields, expected, size, l3, options = run
    return (
        len(packet) == size
        and fields.unpack_from(packet) == expected
        and _SEQ.unpack_from(packet, l3 + 4)[0] == next_seq
        and (not options or packet[l3 + 20:l3 + 20 + len(options)] == options)
    )


def plan(packets: list[bytes]) -> list[list[bytes]]:
    """Split ``packets`` into runs to write as one (super-)packet each, order kept."""
    groups: list[list[bytes]] = []
    current: list[bytes] | None = None
    key: bytes = b""
    segment = total = next_seq = 0
    protocol = l3 = l4 = 0
    template = (b"", b"", b"")
    run: TcpTemplate | None = None
    for packet in packets:
        # A run's later packets: compared with its first instead of building a flow key.
        if current is not None:
            if protocol == _PROTO_UDP:
                payload = udp_continues(packet, template)
                if 0 <= payload <= segment and total + payload <= MAX_LENGTH:
                    current.append(packet)
                    total += payload
                    if payload < segment or len(current) >= MAX_SEGMENTS:
                        current = None
                    continue
            elif (
                run is not None
                and total + segment <= MAX_LENGTH
                and tcp_continues(packet, run, next_seq)
            ):
                current.append(packet)
                total += segment
                next_seq = (next_seq + segment) & 0xFFFFFFFF
                if len(current) >= MAX_SEGMENTS:
                    current = None
                continue
        flow = _flow(packet)
        if flow is None:
            groups.append([packet])
            current = None
            continue
        if current is not None and flow[0] == key:
            payload = flow[4]
            if payload <= segment and total + payload <= MAX_LENGTH:
                if protocol == _PROTO_UDP:
                    current.append(packet)
                    total += payload
                    if payload < segment or len(current) >= MAX_SEGMENTS:
                        current = None
                    continue
                flags = packet[l3 + 13]
                seq = int.from_bytes(packet[l3 + 4:l3 + 8], "big")
                if seq == next_seq and flags in (_TCP_ACK, _TCP_ACK | _TCP_PSH):
                    current.append(packet)
                    total += payload
                    next_seq = (seq + payload) & 0xFFFFFFFF
                    if payload < segment or flags & _TCP_PSH or len(current) >= MAX_SEGMENTS:
                        current = None
                    continue
        # Start a new run with this packet.
        key, protocol, l3, l4, segment = flow
        current = [packet]
        groups.append(current)
        total = l3 + l4 + segment
        if protocol == _PROTO_UDP:
            template = udp_template(packet)
        elif protocol == _PROTO_TCP:
            if packet[l3 + 13] != _TCP_ACK:
                current = None  # SYN/FIN/RST/URG/PSH...: write it alone
            else:
                seq = int.from_bytes(packet[l3 + 4:l3 + 8], "big")
                next_seq = (seq + segment) & 0xFFFFFFFF
                run = tcp_template(packet, l3, l4)
    return groups


def frame(group: list[bytes]) -> bytes:
    """The ``virtio_net_hdr`` plus packet to write for one run from :func:`plan`."""
    first = group[0]
    if len(group) == 1:
        return PLAIN_HEADER + first
    # plan() checked every run; only the header lengths are needed again.
    if first[0] >> 4 == 4:
        l3, protocol = 20, first[9]
    else:
        l3, protocol = 40, first[6]
    l4 = (first[l3 + 12] >> 4) * 4 if protocol == _PROTO_TCP else 8
    segment = len(first) - l3 - l4
    head = bytearray(first[:l3 + l4])
    payloads = [first[l3 + l4:]]
    payloads += [packet[l3 + l4:] for packet in group[1:]]
    l4_length = l4 + sum(len(p) for p in payloads)
    if l3 == 20:
        struct.pack_into("!H", head, 2, l3 + l4_length)
        struct.pack_into("!H", head, 10, ipv4_header_checksum(bytes(head[:20])))
        gso_type = GSO_TCPV4 if protocol == _PROTO_TCP else GSO_UDP_L4
        addresses = bytes(head[12:20])
    else:
        struct.pack_into("!H", head, 4, l4_length)
        gso_type = GSO_TCPV6 if protocol == _PROTO_TCP else GSO_UDP_L4
        addresses = bytes(head[8:40])
    if protocol == _PROTO_TCP:
        if group[-1][l3 + 13] & _TCP_PSH:
            head[l3 + 13] |= _TCP_PSH
        csum_offset = 16
    else:
        struct.pack_into("!H", head, l3 + 4, l4_length)
        csum_offset = 6
    # The pseudo-header sum, not complemented: the kernel adds the segment's words to it.
    half = len(addresses) // 2
    pseudo = pseudo_header_sum(addresses[:half], addresses[half:], protocol, l4_length)
    struct.pack_into("!H", head, l3 + csum_offset, pseudo)
    header = _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, l3 + l4, segment, l3, csum_offset)
    return b"".join((header, head, *payloads))
