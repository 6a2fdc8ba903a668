"""WireGuard keys as portal message fields (gateway-messages.md §0.1).

The rule itself (44 characters of canonical, padded standard base64 for 32 bytes) lives in
:mod:`gateway.wg.keys`; this module only names the offending field in the error, and never
echoes the value (it may be a preshared key).
"""

from __future__ import annotations

from typing import Any

from gateway.wg.keys import decode_key, encode_key

__all__ = ["encode_key", "key_bytes", "parse_key"]


def parse_key(value: Any, where: str) -> str:
    """Return ``value`` unchanged if it is a valid key, else raise ``ValueError``."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a base64 key string")
    try:
        decode_key(value)
    except ValueError:
        raise ValueError(
            f"{where}: expected 44 characters of canonical standard base64 (32 bytes)"
        ) from None
    return value


def key_bytes(value: str) -> bytes:
    """The 32 raw bytes of a key already validated by :func:`parse_key`."""
    return decode_key(value)
