"""ChannelData framing (RFC 8656 §12.5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.turn.channel_data import decode_channel_data, encode_channel_data


def test_encode_has_no_padding() -> None:
    assert encode_channel_data(0x4000, b"abc") == b"\x40\x00\x00\x03abc"
    assert encode_channel_data(0x7FFF, b"") == b"\x7f\xff\x00\x00"


@pytest.mark.parametrize("channel", [0x3FFF, 0x8000, 0, 0xFFFF])
def test_encode_rejects_numbers_outside_the_channel_range(channel: int) -> None:
    with pytest.raises(ValueError):
        encode_channel_data(channel, b"x")


def test_encode_rejects_oversize_payload() -> None:
    with pytest.raises(ValueError):
        encode_channel_data(0x4000, bytes(0x10000))


def test_decode_accepts_padding_and_truncates_to_length() -> None:
    assert decode_channel_data(b"\x40\x01\x00\x03abc\x00") == (0x4001, b"abc")
    assert decode_channel_data(b"\x4f\xff\x00\x01a\x00\x00\x00") == (0x4FFF, b"a")
    assert decode_channel_data(b"\x7f\xff\x00\x00") == (0x7FFF, b"")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x40\x00\x00",  # short header
        b"\x40\x00\x00\x04abc",  # length beyond the datagram
        b"\x3f\xff\x00\x01a",  # below 0x4000
        b"\x80\x00\x00\x01a",  # above 0x7FFF
        b"\x00\x01\x00\x00",  # STUN
    ],
)
def test_decode_rejects_malformed(data: bytes) -> None:
    assert decode_channel_data(data) is None


@given(st.integers(0x4000, 0x7FFF), st.binary(max_size=1500), st.binary(max_size=3))
def test_round_trip(channel: int, payload: bytes, padding: bytes) -> None:
    assert decode_channel_data(encode_channel_data(channel, payload) + padding) == (
        channel,
        payload,
    )


@given(st.binary(max_size=64))
def test_random_bytes_never_raise(data: bytes) -> None:
    result = decode_channel_data(data)
    if result is not None:
        channel, payload = result
        assert 0x4000 <= channel <= 0x7FFF and len(payload) <= len(data) - 4
