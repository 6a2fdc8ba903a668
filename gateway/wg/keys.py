"""X25519 static keys and their base64 text form (as ``wg`` and the portal spell them)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.exceptions import CryptoError

from gateway.errors import InvalidArgument, MalformedMessage
from gateway.types import Rng
from gateway.wg.constants import KEY_LEN


def clamp(private: bytes) -> bytes:
    """Clamp an X25519 scalar the way wg(8) does, so stored keys match ``wg genkey`` output."""
    if len(private) != KEY_LEN:
        raise InvalidArgument("an X25519 private key is 32 bytes")
    clamped = bytearray(private)
    clamped[0] &= 248
    clamped[31] = (clamped[31] & 127) | 64
    return bytes(clamped)


def encode_key(raw: bytes) -> str:
    """Standard base64 with padding: 44 characters for a 32-byte key."""
    if len(raw) != KEY_LEN:
        raise InvalidArgument("a WireGuard key is 32 bytes")
    return base64.b64encode(raw).decode("ascii")


def decode_key(text: str) -> bytes:
    """Strictly parse a 44-character padded standard-base64 key; ``MalformedMessage`` (a
    ``ValueError``) otherwise.

    Strict means canonical too: a string whose last data character carries non-zero
    unused bits decodes, but would not round-trip, so it is rejected.
    """
    if not isinstance(text, str) or len(text) != 44 or not text.endswith("="):
        raise MalformedMessage("a WireGuard key is 44 characters of padded standard base64")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise MalformedMessage("invalid base64 key") from exc
    if len(raw) != KEY_LEN or base64.b64encode(raw).decode("ascii") != text:
        raise MalformedMessage("invalid base64 key")
    return raw


#: Any clamped scalar works: clamping makes it a multiple of the cofactor 8, so it maps
#: exactly the points of small order (and their non-canonical encodings) to zero.
_PROBE_SCALAR = clamp(bytes(range(1, 33)))


def is_low_order(public: bytes) -> bool:
    """Whether X25519 with this peer key yields the all-zero secret for *every* private
    key (a point of small order). libsodium refuses such a key in ``crypto_scalarmult``,
    so a handshake with it could never be computed; it is refused where it enters."""
    try:
        crypto_scalarmult(_PROBE_SCALAR, bytes(public))
    except CryptoError:
        return True
    return False


@dataclass(frozen=True, slots=True)
class StaticKeyPair:
    """A node's long-lived X25519 key pair. ``repr`` shows only the public half."""

    private: bytes = field(repr=False)
    public: bytes

    @classmethod
    def generate(cls, rng: Rng) -> StaticKeyPair:
        return cls.from_private(rng.randbytes(KEY_LEN))

    @classmethod
    def from_private(cls, private: bytes) -> StaticKeyPair:
        """Build from a raw private key (clamped on the way in, as wg does)."""
        clamped = clamp(bytes(private))
        return cls(private=clamped, public=crypto_scalarmult_base(clamped))

    def public_b64(self) -> str:
        return encode_key(self.public)

    def __repr__(self) -> str:
        return f"StaticKeyPair(public={self.public_b64()!r})"
