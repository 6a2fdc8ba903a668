"""Datagram classification (rust/connlib/snownet/src/node.rs) and the fast path's rules."""

from __future__ import annotations

import random
import struct

from hypothesis import given
from hypothesis import strategies as st

from gateway.demux import (
    MAX_DATAGRAM_PAYLOAD,
    DatagramKind,
    classify,
    relayed_transport,
    transport_key,
)
from gateway.stun.message import Method, encode, new_request
from gateway.turn.channel_data import encode_channel_data

RELAY = ("192.0.2.1", 3478)
PEER = ("198.51.100.7", 40000)
RELAYS = frozenset({RELAY})


def _stun() -> bytes:
    return encode(new_request(Method.BINDING, random.Random(3)), fingerprint=True)


def _wg(kind: int, length: int) -> bytes:
    return bytes([kind, 0, 0, 0]) + b"\xab" * (length - 4)


def test_stun_from_relay_and_from_peer() -> None:
    assert classify(_stun(), RELAY, RELAYS) is DatagramKind.STUN_FROM_RELAY
    assert classify(_stun(), PEER, RELAYS) is DatagramKind.STUN
    # From a relay the first byte decides, cookie or not (the allocation consumes it).
    assert classify(b"\x01\x01" + b"\x00" * 30, RELAY, RELAYS) is DatagramKind.STUN_FROM_RELAY


def test_channel_data_only_from_relays() -> None:
    data = b"\x40\x00\x00\x04abcd"
    assert classify(data, RELAY, RELAYS) is DatagramKind.CHANNEL_DATA_FROM_RELAY
    assert classify(b"\x7f\xff\x00\x00", RELAY, RELAYS) is DatagramKind.CHANNEL_DATA_FROM_RELAY
    assert classify(data, PEER, RELAYS) is DatagramKind.GARBAGE
    assert classify(b"\x80\x00\x00\x00", RELAY, RELAYS) is DatagramKind.GARBAGE


def test_wireguard_messages() -> None:
    for kind, length in ((1, 148), (2, 92), (3, 64), (4, 32), (4, 48), (4, 1328)):
        assert classify(_wg(kind, length), PEER, RELAYS) is DatagramKind.WIREGUARD, (kind, length)


def test_wireguard_implausible_lengths_and_headers() -> None:
    for kind, length in ((1, 147), (2, 93), (3, 60), (4, 31), (5, 148)):
        assert classify(_wg(kind, length), PEER, RELAYS) is DatagramKind.GARBAGE, (kind, length)
    assert classify(b"\x01\x00\x01\x00" + b"\x00" * 144, PEER, RELAYS) is DatagramKind.GARBAGE
    assert classify(_wg(0, 148), PEER, RELAYS) is DatagramKind.GARBAGE


def test_unpadded_transport_data_is_wireguard() -> None:
    """boringtun (the Firezone client) does not pad transport plaintexts to 16 bytes."""
    for length in (32, 33, 40, 1000, MAX_DATAGRAM_PAYLOAD):
        assert classify(_wg(4, length), PEER, RELAYS) is DatagramKind.WIREGUARD, length


def test_size_limits() -> None:
    assert classify(b"", PEER, RELAYS) is DatagramKind.GARBAGE
    assert classify(b"\x00", PEER, RELAYS) is DatagramKind.GARBAGE
    assert classify(_wg(4, 1344), PEER, RELAYS) is DatagramKind.GARBAGE  # > 1336
    big_stun = _stun() + b"\x00" * (MAX_DATAGRAM_PAYLOAD + 1 - len(_stun()))
    assert classify(big_stun, PEER, RELAYS) is DatagramKind.GARBAGE
    assert classify(b"\x40\x00" + b"\x00" * MAX_DATAGRAM_PAYLOAD, RELAY, RELAYS) is (
        DatagramKind.GARBAGE
    )


@given(st.binary(max_size=1500), st.booleans())
def test_random_bytes_never_raise(data: bytes, from_relay: bool) -> None:
    assert isinstance(classify(data, RELAY if from_relay else PEER, RELAYS), DatagramKind)


def _transport(index: int, length: int = 48) -> bytes:
    return struct.pack("<II", 4, index) + bytes(length - 8)


def test_transport_data_routes_by_its_receiver_index_prefix() -> None:
    assert transport_key(_transport(0x123456 << 8 | 7)) == 0x123456
    assert transport_key(_transport(0x123456 << 8, 32)) == 0x123456  # a keepalive
    assert transport_key(_transport(0x123456 << 8, 31)) is None  # too short for the tag
    assert transport_key(_wg(1, 148)) is None  # a handshake: the node's
    assert transport_key(b"\x04\x01\x00\x00" + bytes(40)) is None  # not reserved zeros
    assert transport_key(b"") is None


def test_channel_data_is_unwrapped_only_around_transport_data() -> None:
    inner = _transport(0x10 << 8)
    assert relayed_transport(encode_channel_data(0x4001, inner)) == (0x4001, 0x10, inner)
    assert relayed_transport(encode_channel_data(0x7FFF, inner) + b"\x00\x00") == (
        0x7FFF, 0x10, inner)  # padded to 4 bytes
    assert relayed_transport(encode_channel_data(0x4001, _transport(0x10 << 8, 32))) == (
        0x4001, 0x10, _transport(0x10 << 8, 32))  # a keepalive
    assert relayed_transport(encode_channel_data(0x4001, _stun())) is None
    assert relayed_transport(encode_channel_data(0x4001, inner[:20])) is None
    assert relayed_transport(inner) is None
    assert relayed_transport(b"") is None
    assert relayed_transport(b"\x40\x01\x00\xff" + inner) is None  # longer than sent
    assert relayed_transport(b"\x80\x01" + encode_channel_data(0x4001, inner)[2:]) is None


@given(st.binary(max_size=200))
def test_the_fast_path_rules_never_raise(data: bytes) -> None:
    transport_key(data)
    relayed_transport(data)
