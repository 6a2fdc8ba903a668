"""Strict validation of WireGuard keys as the portal spells them (gateway-messages.md §0.1).

A key is 32 bytes in the *standard* base64 alphabet *with* padding: exactly 44 characters.
URL-safe alphabet, missing padding and non-canonical trailing bits are rejected, as the
Rust ``base64`` STANDARD engine does.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

KEY_LENGTH = 32
KEY_B64_LENGTH = 44


def parse_key(value: Any, where: str) -> str:
    """Return ``value`` unchanged if it is a valid key, else raise ``ValueError``.

    The message names ``where`` but never echoes the value (it may be a preshared key).
    """
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a base64 key string")
    if len(value) != KEY_B64_LENGTH:
        raise ValueError(f"{where}: expected 44 base64 characters, got {len(value)}")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{where}: not standard base64") from None
    if len(raw) != KEY_LENGTH or base64.b64encode(raw).decode("ascii") != value:
        raise ValueError(f"{where}: not a canonical base64 encoding of 32 bytes")
    return value


def key_bytes(value: str) -> bytes:
    """The 32 raw bytes of a key already validated by :func:`parse_key`."""
    return base64.b64decode(value)


def encode_key(raw: bytes) -> str:
    """The portal's spelling of 32 raw key bytes."""
    if len(raw) != KEY_LENGTH:
        raise ValueError(f"a key has {KEY_LENGTH} bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")
