"""TUN write coalescing: which packets merge, and that segmenting a frame gives them back.

``segment`` below does what the kernel's GSO does with a frame (cut the payload at
``gso_size``, fix lengths, sequence numbers, the IPv4 header checksum and finish the
transport checksum), so "segment(frame(run)) == run" checks the headers byte for byte.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.packet.coalesce import (
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    MAX_SEGMENTS,
    PLAIN_HEADER,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_LEN,
    _flow,
    frame,
    plan,
    tcp_continues,
    tcp_template,
    udp_continues,
    udp_template,
)
from gateway.packet.ip import (
    build_tcp,
    build_tcp_syn,
    build_udp,
    ipv4_header_checksum,
    transport_checksum,
)

SRC, DST = "100.64.0.7", "10.204.0.2"
SRC6, DST6 = "fd00:2021:1111::7", "fd20:204::2"
MSS = 1200


def tcp_run(count: int, *, src: str = SRC, dst: str = DST, seq: int = 1000, size: int = MSS,
            last: int | None = None, sport: int = 40000) -> list[bytes]:
    packets = []
    for n in range(count):
        length = last if last is not None and n == count - 1 else size
        packets.append(build_tcp(src, dst, sport, 5201, seq=seq, ack=77,
                                 payload=bytes([n % 256]) * length))
        seq += length
    return packets


def udp_run(count: int, *, src: str = SRC, dst: str = DST, size: int = MSS,
            last: int | None = None) -> list[bytes]:
    return [build_udp(src, dst, 40000, 5201,
                      bytes([n]) * (last if last is not None and n == count - 1 else size))
            for n in range(count)]


def segment(data: bytes) -> list[bytes]:
    """The kernel's side: a written frame back into the packets it stands for."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from(
        "=BBHHHH", data)
    packet = data[VIRTIO_NET_HDR_LEN:]
    if gso_type == 0:
        assert flags == 0
        return [packet]
    assert flags == VIRTIO_NET_HDR_F_NEEDS_CSUM
    v4 = packet[0] >> 4 == 4
    l3 = 20 if v4 else 40
    assert csum_start == l3
    head, payload = packet[:hdr_len], packet[hdr_len:]
    protocol = head[9] if v4 else head[6]
    out = []
    seq = int.from_bytes(head[l3 + 4:l3 + 8], "big")
    for offset in range(0, len(payload), gso_size):
        chunk = payload[offset:offset + gso_size]
        h = bytearray(head)
        last = offset + gso_size >= len(payload)
        if v4:
            struct.pack_into("!H", h, 2, hdr_len + len(chunk))
        else:
            struct.pack_into("!H", h, 4, hdr_len - l3 + len(chunk))
        if protocol == 6:
            struct.pack_into("!I", h, l3 + 4, seq)
            seq += len(chunk)
            if not last:
                h[l3 + 13] &= ~0x08  # PSH stays on the last segment only
        else:
            struct.pack_into("!H", h, l3 + 4, hdr_len - l3 + len(chunk))
        if v4:
            struct.pack_into("!H", h, 10, ipv4_header_checksum(bytes(h[:20])))
        seg = bytes(h) + chunk
        src, dst = (seg[12:16], seg[16:20]) if v4 else (seg[8:24], seg[24:40])
        checksum = transport_checksum(src, dst, protocol, seg[l3:])
        at = csum_start + csum_offset
        out.append(seg[:at] + checksum.to_bytes(2, "big") + seg[at + 2:])
    return out


def roundtrip(packets: list[bytes]) -> list[bytes]:
    return [p for group in plan(packets) for p in segment(frame(group))]


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_a_tcp_burst_becomes_one_tso_frame_and_segments_back(family: str) -> None:
    src, dst = (SRC, DST) if family == "v4" else (SRC6, DST6)
    packets = tcp_run(10, src=src, dst=dst, last=300)
    groups = plan(packets)
    assert [len(g) for g in groups] == [10]
    data = frame(groups[0])
    _flags, gso_type, hdr_len, gso_size, _start, csum_offset = struct.unpack_from("=BBHHHH", data)
    assert gso_type == (GSO_TCPV4 if family == "v4" else GSO_TCPV6)
    assert (hdr_len, gso_size, csum_offset) == ((20 if family == "v4" else 40) + 20, MSS, 16)
    assert len(data) == VIRTIO_NET_HDR_LEN + hdr_len + 9 * MSS + 300
    assert segment(data) == packets


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_a_udp_burst_becomes_one_uso_frame_and_segments_back(family: str) -> None:
    src, dst = (SRC, DST) if family == "v4" else (SRC6, DST6)
    packets = udp_run(8, src=src, dst=dst, last=17)
    (group,) = plan(packets)
    data = frame(group)
    assert struct.unpack_from("=BBHHHH", data)[1] == GSO_UDP_L4
    assert segment(data) == packets


def test_a_single_packet_is_written_plain() -> None:
    packet = tcp_run(1)[0]
    assert plan([packet]) == [[packet]]
    assert frame([packet]) == PLAIN_HEADER + packet


def test_runs_break_where_merging_would_change_the_stream() -> None:
    a = tcp_run(3)
    gap = tcp_run(2, seq=1000 + 3 * MSS + 1)  # sequence gap
    other_flow = tcp_run(2, sport=40001, seq=5000)
    syn = build_tcp_syn(SRC, DST, 40002, 5201)
    short_then_more = tcp_run(3, seq=9000, size=MSS)
    short_then_more[1] = build_tcp(SRC, DST, 40000, 5201, seq=9000 + MSS, ack=77,
                                   payload=b"s" * 100)
    short_then_more[2] = build_tcp(SRC, DST, 40000, 5201, seq=9000 + MSS + 100, ack=77,
                                   payload=b"t" * 100)
    packets = [*a, *gap, *other_flow, syn, *short_then_more]
    sizes = [len(g) for g in plan(packets)]
    assert sizes == [3, 2, 2, 1, 2, 1]
    assert roundtrip(packets) == packets


def test_psh_ends_a_run_and_stays_on_the_last_segment() -> None:
    packets = tcp_run(4)
    packets[1] = build_tcp(SRC, DST, 40000, 5201, seq=1000 + MSS, ack=77, flags=0x18,
                           payload=bytes([1]) * MSS)
    groups = plan(packets)
    assert [len(g) for g in groups] == [2, 2]
    assert roundtrip(packets) == packets


def test_different_ack_window_or_ttl_do_not_merge() -> None:
    base = build_tcp(SRC, DST, 40000, 5201, seq=0, ack=1, payload=b"a" * MSS)
    other_ack = build_tcp(SRC, DST, 40000, 5201, seq=MSS, ack=2, payload=b"b" * MSS)
    other_window = build_tcp(SRC, DST, 40000, 5201, seq=2 * MSS, ack=2, window=100,
                             payload=b"c" * MSS)
    other_ttl = build_tcp(SRC, DST, 40000, 5201, seq=3 * MSS, ack=2, window=100, ttl=3,
                          payload=b"d" * MSS)
    assert [len(g) for g in plan([base, other_ack, other_window, other_ttl])] == [1, 1, 1, 1]


def test_ipv4_without_df_with_options_or_fragments_is_written_alone() -> None:
    no_df = bytearray(udp_run(1)[0])
    no_df[6] = 0
    no_df[10:12] = ipv4_header_checksum(bytes(no_df[:20])).to_bytes(2, "big")
    fragment = bytearray(udp_run(1)[0])
    fragment[6] |= 0x20  # more fragments
    packets = [bytes(no_df), bytes(no_df), bytes(fragment), bytes(fragment)]
    assert [len(g) for g in plan(packets)] == [1, 1, 1, 1]


def test_udp_runs_close_after_a_shorter_datagram_and_at_the_segment_cap() -> None:
    packets = udp_run(3, last=10) + udp_run(2)
    assert [len(g) for g in plan(packets)] == [3, 2]
    many = udp_run(MAX_SEGMENTS + 5, size=100)
    assert [len(g) for g in plan(many)] == [MAX_SEGMENTS, 5]


def test_a_super_packet_never_exceeds_the_16_bit_length() -> None:
    packets = udp_run(60, size=1400)  # 84 000 bytes of payload
    groups = plan(packets)
    assert all(sum(len(p) - 28 for p in g) + 28 <= 65535 for g in groups)
    assert roundtrip(packets) == packets


def test_non_ip_and_short_packets_pass_through_in_order() -> None:
    junk = [b"", b"\x45", b"\x60" * 30, bytes(100)]
    packets = [*tcp_run(2), *junk, *tcp_run(2, seq=1000 + 2 * MSS)]
    assert [p for g in plan(packets) for p in g] == packets


# IPv4: version/IHL, TOS, length, flags, TTL, protocol, addresses, ports, UDP length;
# IPv6: version/class, payload length, next header, hop limit, addresses, ports, length.
HEADER_FIELDS = [0, 1, 2, 3, 6, 7, 8, 9, 12, 19, 20, 23, 24, 25, 4, 5, 39, 40, 43, 44, 45]


@settings(max_examples=400, deadline=None)
@given(
    family=st.sampled_from(["v4", "v6"]),
    size=st.integers(1, 300),
    edits=st.lists(
        st.tuples(
            # Any header byte, and often the ones the run check looks at.
            st.one_of(st.integers(0, 47), st.sampled_from(HEADER_FIELDS)),
            st.integers(0, 255),
        ),
        max_size=3,
    ),
    cut=st.integers(-4, 4),
)
def test_the_udp_run_check_agrees_with_the_flow_key(
    family: str, size: int, edits: list[tuple[int, int]], cut: int
) -> None:
    """plan()'s shortcut for a UDP run's later datagrams (two slice compares) says
    "mergeable, payload n" exactly when the full flow key matches the run's."""
    src, dst = (SRC, DST) if family == "v4" else (SRC6, DST6)
    first = build_udp(src, dst, 40000, 5201, b"f" * 200)
    packet = bytearray(build_udp(src, dst, 40000, 5201, b"p" * size))
    for position, value in edits:
        if position < len(packet):
            packet[position] = value
    mutated = bytes(packet[:len(packet) + cut] if cut < 0 else packet + bytes(cut))
    flow, run = _flow(mutated), _flow(first)
    assert run is not None
    expected = flow[4] if flow is not None and flow[0] == run[0] else -1
    assert udp_continues(mutated, udp_template(first)) == expected


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_the_udp_run_check_agrees_with_the_flow_key_for_every_one_byte_change(
    family: str,
) -> None:
    src, dst = (SRC, DST) if family == "v4" else (SRC6, DST6)
    first = build_udp(src, dst, 40000, 5201, b"f" * 200)
    run = _flow(first)
    assert run is not None
    template = udp_template(first)
    for size in (0, 1, 8, 20, 200, 201):
        base = build_udp(src, dst, 40000, 5201, b"p" * size)
        for position in range(48):
            for flip in (0x01, 0x40, 0xFF):
                packet = bytearray(base)
                if position < len(packet):
                    packet[position] ^= flip
                for cut in (-1, 0, 1):
                    mutated = bytes(packet[:cut] if cut < 0 else packet + bytes(cut))
                    flow = _flow(mutated)
                    expected = flow[4] if flow is not None and flow[0] == run[0] else -1
                    assert udp_continues(mutated, template) == expected, (size, position, flip)


def full_rules_accept(packet: bytes, first: bytes, next_seq: int) -> bool:
    """plan()'s general rules for a TCP run's next segment, restricted to what its fast
    path takes: same size as the first, flags exactly ACK, the same IPv4 fragment field."""
    run, flow = _flow(first), _flow(packet)
    assert run is not None
    if flow is None or flow[0] != run[0] or len(packet) != len(first):
        return False
    l3 = flow[2]
    return (
        int.from_bytes(packet[l3 + 4:l3 + 8], "big") == next_seq
        and packet[l3 + 13] == 0x10
        and (l3 == 40 or packet[6:8] == first[6:8])
    )


def tcp_pair(family: str, options: bytes) -> tuple[bytes, bytes, int]:
    """A run's first segment and the next one, with ``options`` in both."""
    src, dst = (SRC, DST) if family == "v4" else (SRC6, DST6)
    l3 = 20 if family == "v4" else 40
    first, second = (
        build_tcp(src, dst, 40000, 5201, seq=seq, ack=77, payload=b"p" * 100)
        for seq in (1000, 1100)
    )
    if options:
        def with_options(packet: bytes) -> bytes:
            head = bytearray(packet[:l3 + 20])
            head[l3 + 12] = (20 + len(options)) // 4 << 4
            total = len(packet) + len(options)
            if l3 == 20:
                struct.pack_into("!H", head, 2, total)
            else:
                struct.pack_into("!H", head, 4, total - 40)
            return bytes(head) + options + packet[l3 + 20:]
        first, second = with_options(first), with_options(second)
    return first, second, 1100


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize("options", [b"", b"\x01\x01\x08\x0a" + bytes(range(8))])
def test_the_tcp_fast_path_agrees_with_the_full_rules_for_every_one_byte_change(
    family: str, options: bytes
) -> None:
    """plan()'s shortcut for a TCP run's next segment (one struct read) accepts exactly
    what the flow key, sequence, flag and size rules accept in its case, and nothing more:
    every byte of the header is changed three ways, and the packet cut or extended."""
    first, second, next_seq = tcp_pair(family, options)
    l3 = 20 if family == "v4" else 40
    run = tcp_template(first, l3, (first[l3 + 12] >> 4) * 4)
    assert tcp_continues(second, run, next_seq)  # the common case takes the fast path
    assert not tcp_continues(second, run, next_seq + 1)
    for position in range(l3 + 20 + len(options) + 2):
        for flip in (0x01, 0x40, 0xFF):
            packet = bytearray(second)
            packet[position] ^= flip
            for cut in (-1, 0, 1):
                mutated = bytes(packet[:cut] if cut < 0 else packet + bytes(cut))
                assert tcp_continues(mutated, run, next_seq) == full_rules_accept(
                    mutated, first, next_seq), (position, flip, cut)


@settings(max_examples=300, deadline=None)
@given(
    family=st.sampled_from(["v4", "v6"]),
    edits=st.lists(st.tuples(st.integers(0, 71), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_the_tcp_fast_path_never_accepts_what_the_full_rules_reject(
    family: str, edits: list[tuple[int, int]]
) -> None:
    first, second, next_seq = tcp_pair(family, b"\x01\x01\x08\x0a" + bytes(range(8)))
    l3 = 20 if family == "v4" else 40
    run = tcp_template(first, l3, (first[l3 + 12] >> 4) * 4)
    packet = bytearray(second)
    for position, value in edits:
        packet[position] = value
    mutated = bytes(packet)
    assert tcp_continues(mutated, run, next_seq) == full_rules_accept(mutated, first, next_seq)
