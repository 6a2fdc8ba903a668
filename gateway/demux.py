"""Demultiplexing received UDP datagrams: the rules live here, once.

One socket pair carries STUN to/from relays, ChannelData from relays, ICE checks and
WireGuard (rust/connlib/snownet/src/node.rs, RFC 7983 first-byte ranges). This runs for every
datagram, so it only looks at a few bytes and never parses.

* :func:`classify`: which handler of the node a datagram goes to.
* The fast path (``actors/io/udp.py``): WireGuard transport data goes straight to its
  client's session by receiver index (:func:`transport_key`, looked up in the routes the
  gateway core publishes as ``RouteAdded``/``RouteRemoved``), and ChannelData from a relay
  on a channel that carries a nominated relayed path is unwrapped first
  (:func:`relayed_transport`, the channel looked up in the routes published as
  ``RelayRouteAdded``/``RelayRouteRemoved``). Everything else goes to the node.
"""

from __future__ import annotations

import struct
from collections.abc import Container
from enum import Enum

from gateway.turn.channel_data import HEADER_LEN
from gateway.types import Address

#: WireGuard receiver indices: the node hands out the upper 24 bits
#: (rust/connlib/snownet/src/node.rs); the tunnel may use the low 8 bits for its sessions. A route
#: key is ``index >> INDEX_SHIFT``.
INDEX_SHIFT = 8

#: Datagrams longer than this are never processed (rust/connlib/snownet/src/allocation.rs).
MAX_DATAGRAM_PAYLOAD = 1336

_STUN_COOKIE = b"\x21\x12\xa4\x42"
_WG_INITIATION_LEN = 148
_WG_RESPONSE_LEN = 92
_WG_COOKIE_REPLY_LEN = 64
_WG_TRANSPORT_MIN_LEN = 32  # 16-byte header + 16-byte AEAD tag (keepalive)


class DatagramKind(Enum):
    STUN_FROM_RELAY = "stun-from-relay"
    CHANNEL_DATA_FROM_RELAY = "channel-data-from-relay"
    STUN = "stun"
    WIREGUARD = "wireguard"
    GARBAGE = "garbage"


def _plausible_wireguard(data: bytes, kind: int) -> bool:
    if data[1:4] != b"\x00\x00\x00":
        return False
    n = len(data)
    if kind == 4:
        # Transport: header, ciphertext, tag. Not necessarily a multiple of 16: boringtun,
        # the Firezone client's WireGuard, does not pad the plaintext.
        return n >= _WG_TRANSPORT_MIN_LEN
    if kind == 1:
        return n == _WG_INITIATION_LEN
    if kind == 2:
        return n == _WG_RESPONSE_LEN
    return n == _WG_COOKIE_REPLY_LEN  # kind 3


def classify(data: bytes, src: Address, relay_servers: Container[Address]) -> DatagramKind:
    """Which handler a datagram from ``src`` goes to; never raises."""
    n = len(data)
    if n == 0 or n > MAX_DATAGRAM_PAYLOAD:
        return DatagramKind.GARBAGE
    first = data[0]
    if first < 4:
        if src in relay_servers:
            return DatagramKind.STUN_FROM_RELAY
        if n >= 20 and data[4:8] == _STUN_COOKIE:
            return DatagramKind.STUN
        if first and n >= 4 and _plausible_wireguard(data, first):
            return DatagramKind.WIREGUARD
        return DatagramKind.GARBAGE
    if first == 4:
        if n >= 4 and _plausible_wireguard(data, first):
            return DatagramKind.WIREGUARD
        return DatagramKind.GARBAGE
    if 0x40 <= first <= 0x7F and src in relay_servers:
        return DatagramKind.CHANNEL_DATA_FROM_RELAY
    return DatagramKind.GARBAGE


_INDEX = struct.Struct("<I")
_CHANNEL_HEADER = struct.Struct("!HH")
_TRANSPORT_HEADER = b"\x04\x00\x00\x00"


def transport_key(data: bytes, shift: int = INDEX_SHIFT) -> int | None:
    """The route key (receiver index ``>> shift``) of a WireGuard transport message; None
    for anything else. The fast path's rule: never raises, allocates nothing."""
    if len(data) >= _WG_TRANSPORT_MIN_LEN and data[:4] == _TRANSPORT_HEADER:
        key: int = _INDEX.unpack_from(data, 4)[0] >> shift
        return key
    return None


def relayed_transport(data: bytes, shift: int = INDEX_SHIFT) -> tuple[int, int, bytes] | None:
    """``(channel, route key, WireGuard transport message)`` if ``data`` is ChannelData
    (``gateway/turn/channel_data.py``: the payload cut to its length field) wrapping a
    transport message; None otherwise (STUN inside ChannelData, odd lengths: the node's
    business). One call and one tuple per datagram: the relayed fast path's cost."""
    n = len(data)
    if n < HEADER_LEN + _WG_TRANSPORT_MIN_LEN or not 0x40 <= data[0] <= 0x7F:
        return None  # too short for transport data, or not a channel number (0x4000-0x7FFF)
    channel, length = _CHANNEL_HEADER.unpack_from(data)
    if (length < _WG_TRANSPORT_MIN_LEN or length > n - HEADER_LEN
            or data[HEADER_LEN:HEADER_LEN + 4] != _TRANSPORT_HEADER):
        return None
    key: int = _INDEX.unpack_from(data, HEADER_LEN + 4)[0] >> shift
    return channel, key, data[HEADER_LEN:HEADER_LEN + length]
