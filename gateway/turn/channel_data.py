"""TURN ChannelData framing (RFC 8656 §12.5): 2-byte channel number, 2-byte length, payload.

We never pad when sending (UDP needs no alignment); on receive the payload is cut to the
length field, so a peer that pads is understood too.
"""

from __future__ import annotations

import struct

from gateway.errors import InvalidArgument

CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x7FFF
HEADER_LEN = 4

_HEADER = struct.Struct("!HH")


def encode_channel_data(channel: int, payload: bytes) -> bytes:
    """Frame ``payload`` for ``channel``; ``InvalidArgument`` on a bad number or a payload
    over 65535 bytes."""
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise InvalidArgument(f"channel number {channel:#x} outside 0x4000-0x7FFF")
    if len(payload) > 0xFFFF:
        raise InvalidArgument("ChannelData payload longer than 65535 bytes")
    return _HEADER.pack(channel, len(payload)) + payload


def decode_channel_data(data: bytes) -> tuple[int, bytes] | None:
    """``(channel, payload)``, or None when ``data`` is not a well-formed ChannelData message."""
    if len(data) < HEADER_LEN:
        return None
    channel, length = _HEADER.unpack_from(data)
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX or length > len(data) - HEADER_LEN:
        return None
    return channel, data[HEADER_LEN : HEADER_LEN + length]
