"""WireGuard keys as portal message fields (rust/connlib/tunnel/src/messages/key.rs).

The rule itself (44 characters of canonical, padded standard base64 for 32 bytes) lives in
:mod:`gateway.wg.keys`; this module only names the offending field in the error, and never
echoes the value (it may be a preshared key).
"""

from __future__ import annotations

from typing import Any

from gateway.errors import MalformedMessage
from gateway.wg.keys import decode_key, encode_key, is_low_order

__all__ = ["encode_key", "key_bytes", "parse_key", "parse_public_key"]


def parse_key(value: Any, where: str) -> str:
    """Return ``value`` unchanged if it is a valid key, else raise ``MalformedMessage``."""
    if not isinstance(value, str):
        raise MalformedMessage(f"{where}: expected a base64 key string")
    try:
        decode_key(value)
    except ValueError:
        raise MalformedMessage(
            f"{where}: expected 44 characters of canonical standard base64 (32 bytes)"
        ) from None
    return value


def key_bytes(value: str) -> bytes:
    """The 32 raw bytes of a key already validated by :func:`parse_key`."""
    return decode_key(value)


def parse_public_key(value: Any, where: str) -> str:
    """:func:`parse_key` for a peer's X25519 public key, which must not be of small order.

    With such a key no handshake can be computed (libsodium refuses the all-zero shared
    secret), so the flow that carries one is refused with its message: it gets no
    connection that could never carry traffic, and the session set-up never sees the key.
    """
    key = parse_key(value, where)
    if is_low_order(decode_key(key)):
        raise MalformedMessage(f"{where}: a low-order X25519 point cannot be a peer key")
    return key
