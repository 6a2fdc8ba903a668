"""Noise_IKpsk2 handshake messages of WireGuard (the WireGuard paper, §5.4.2, §5.4.3, §5.4.5), both
roles.

Pure functions over a per-peer :class:`HandshakeContext`. They build and check message
*bodies* (everything before mac1); :mod:`gateway.wg.cookie` adds and verifies the macs.
Failures raise :class:`HandshakeRejected` carrying a counter-friendly ``reason``; the
tunnel catches it at its ``decapsulate`` boundary.

Ephemeral private keys come from the caller (drawn from the injected ``Rng``).
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass, field
from hashlib import blake2s

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.exceptions import CryptoError

from gateway.drops import Drop
from gateway.errors import InvalidArgument, RemoteProtocolError
from gateway.wg.constants import (
    CONSTRUCTION,
    IDENTIFIER,
    INITIATION_LEN,
    KEY_LEN,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESPONSE_LEN,
)
from gateway.wg.keys import StaticKeyPair, clamp

_ZERO_NONCE = bytes(12)
_ZERO_KEY = bytes(KEY_LEN)
_INITIATION_HEAD = struct.Struct("<II")  # type+reserved, sender index
_RESPONSE_HEAD = struct.Struct("<III")  # type+reserved, sender index, receiver index
#: TAI64 label of 1970 (2^62) plus the 10 s TAI-UTC offset, as wireguard-go writes it.
_TAI64_BASE = (1 << 62) + 10
#: Timestamps are rounded down to 2^24 ns (~16.8 ms) so they leak no fine timing.
_NANO_WHITEN = ~((1 << 24) - 1)

INITIATION_BODY_LEN = INITIATION_LEN - 32
RESPONSE_BODY_LEN = RESPONSE_LEN - 32


class LowOrderPeerKey(RemoteProtocolError, ValueError):
    """A peer static key of small order: no handshake can be computed with it. The portal
    parser refuses such keys (:func:`gateway.portal.keys.parse_public_key`); this is the
    last line."""


class HandshakeRejected(RemoteProtocolError):
    """A handshake message that is well-formed but must not be accepted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _hash(data: bytes) -> bytes:
    return blake2s(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "blake2s")


def _kdf1(key: bytes, data: bytes) -> bytes:
    return _hmac(_hmac(key, data), b"\x01")


def _kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    prk = _hmac(key, data)
    t1 = _hmac(prk, b"\x01")
    return t1, _hmac(prk, t1 + b"\x02")


def _kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    prk = _hmac(key, data)
    t1 = _hmac(prk, b"\x01")
    t2 = _hmac(prk, t1 + b"\x02")
    return t1, t2, _hmac(prk, t2 + b"\x03")


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        return crypto_scalarmult(private, public)
    except CryptoError as exc:  # libsodium refuses low-order points (all-zero result)
        raise HandshakeRejected(Drop.LOW_ORDER_POINT) from exc


def _seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, plaintext, ad)


def _open(key: bytes, ciphertext: bytes, ad: bytes, reason: str) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, ciphertext, ad)
    except InvalidTag as exc:
        raise HandshakeRejected(reason) from exc


def tai64n(unix_now: float) -> bytes:
    """12-byte TAI64N label of ``unix_now`` (whitened), big-endian so bytes compare in order."""
    seconds = int(unix_now)
    nanos = int((unix_now - seconds) * 1e9) & _NANO_WHITEN
    return struct.pack(">QI", _TAI64_BASE + seconds, nanos)


_INITIAL_CHAIN = _hash(CONSTRUCTION)
_INITIAL_HASH = _hash(_INITIAL_CHAIN + IDENTIFIER)


@dataclass(frozen=True, slots=True)
class TransportKeys:
    """The two directional keys a completed handshake yields (never shown in repr)."""

    send: bytes = field(repr=False)
    receive: bytes = field(repr=False)


class HandshakeContext:
    """Everything about one (our key, peer key, psk) triple that never changes: precomputed."""

    __slots__ = ("_hash_to_peer", "_hash_to_us", "peer_public", "psk", "static", "static_static")

    def __init__(self, static: StaticKeyPair, peer_public: bytes, psk: bytes | None) -> None:
        if len(peer_public) != KEY_LEN:
            raise InvalidArgument("peer public key must be 32 bytes")
        if psk is not None and len(psk) != KEY_LEN:
            raise InvalidArgument("preshared key must be 32 bytes")
        self.static = static
        self.peer_public = peer_public
        self.psk = psk if psk is not None else _ZERO_KEY
        try:
            self.static_static = crypto_scalarmult(static.private, peer_public)
        except CryptoError as exc:
            raise LowOrderPeerKey("peer public key is a low-order point") from exc
        self._hash_to_peer = _hash(_INITIAL_HASH + peer_public)
        self._hash_to_us = _hash(_INITIAL_HASH + static.public)

    def __repr__(self) -> str:
        return f"HandshakeContext(peer_public={self.peer_public.hex()[:16]}...)"


@dataclass(slots=True, repr=False)
class InitiatorState:
    """What an initiator keeps between sending message 1 and receiving message 2."""

    sender_index: int
    ephemeral_private: bytes
    chaining_key: bytes
    hash: bytes


@dataclass(slots=True, repr=False)
class ConsumedInitiation:
    """A verified initiation: what the responder needs to answer it."""

    peer_index: int
    timestamp: bytes
    peer_ephemeral: bytes
    chaining_key: bytes
    hash: bytes


def create_initiation(
    ctx: HandshakeContext, sender_index: int, ephemeral_seed: bytes, unix_now: float
) -> tuple[bytes, InitiatorState]:
    """Message 1 without its macs (116 bytes) and the state to finish the handshake."""
    ephemeral_private = clamp(ephemeral_seed)
    ephemeral_public = crypto_scalarmult_base(ephemeral_private)
    chain = _kdf1(_INITIAL_CHAIN, ephemeral_public)
    h = _hash(ctx._hash_to_peer + ephemeral_public)
    chain, key = _kdf2(chain, _dh(ephemeral_private, ctx.peer_public))
    encrypted_static = _seal(key, ctx.static.public, h)
    h = _hash(h + encrypted_static)
    chain, key = _kdf2(chain, ctx.static_static)
    encrypted_timestamp = _seal(key, tai64n(unix_now), h)
    h = _hash(h + encrypted_timestamp)
    body = (
        _INITIATION_HEAD.pack(MSG_INITIATION, sender_index)
        + ephemeral_public
        + encrypted_static
        + encrypted_timestamp
    )
    return body, InitiatorState(sender_index, ephemeral_private, chain, h)


def consume_initiation(ctx: HandshakeContext, message: bytes) -> ConsumedInitiation:
    """Decrypt and check message 1 (macs already verified); only ``ctx.peer_public`` may send it."""
    if len(message) != INITIATION_LEN:
        raise HandshakeRejected(Drop.BAD_SIZE)
    _, peer_index = _INITIATION_HEAD.unpack_from(message)
    ephemeral_public = message[8:40]
    chain = _kdf1(_INITIAL_CHAIN, ephemeral_public)
    h = _hash(ctx._hash_to_us + ephemeral_public)
    chain, key = _kdf2(chain, _dh(ctx.static.private, ephemeral_public))
    encrypted_static = message[40:88]
    peer_static = _open(key, encrypted_static, h, Drop.NOT_FOR_US)
    if not hmac.compare_digest(peer_static, ctx.peer_public):
        raise HandshakeRejected(Drop.WRONG_PEER)
    h = _hash(h + encrypted_static)
    chain, key = _kdf2(chain, ctx.static_static)
    encrypted_timestamp = message[88:116]
    timestamp = _open(key, encrypted_timestamp, h, Drop.DECRYPT_FAILED)
    h = _hash(h + encrypted_timestamp)
    return ConsumedInitiation(peer_index, timestamp, ephemeral_public, chain, h)


def create_response(
    ctx: HandshakeContext, initiation: ConsumedInitiation, sender_index: int, ephemeral_seed: bytes
) -> tuple[bytes, TransportKeys]:
    """Message 2 without its macs (60 bytes) and the responder's transport keys."""
    ephemeral_private = clamp(ephemeral_seed)
    ephemeral_public = crypto_scalarmult_base(ephemeral_private)
    chain = _kdf1(initiation.chaining_key, ephemeral_public)
    h = _hash(initiation.hash + ephemeral_public)
    chain = _kdf1(chain, _dh(ephemeral_private, initiation.peer_ephemeral))
    chain = _kdf1(chain, _dh(ephemeral_private, ctx.peer_public))
    chain, tau, key = _kdf3(chain, ctx.psk)
    h = _hash(h + tau)
    encrypted_nothing = _seal(key, b"", h)
    body = (
        _RESPONSE_HEAD.pack(MSG_RESPONSE, sender_index, initiation.peer_index)
        + ephemeral_public
        + encrypted_nothing
    )
    initiator_send, responder_send = _kdf2(chain, b"")
    return body, TransportKeys(send=responder_send, receive=initiator_send)


def consume_response(
    ctx: HandshakeContext, state: InitiatorState, message: bytes
) -> tuple[int, TransportKeys]:
    """Check message 2 against our pending initiation; returns (peer index, our keys).

    A wrong preshared key shows up here, as an AEAD failure on the empty payload.
    """
    if len(message) != RESPONSE_LEN:
        raise HandshakeRejected(Drop.BAD_SIZE)
    _, peer_index, receiver = _RESPONSE_HEAD.unpack_from(message)
    if receiver != state.sender_index:
        raise HandshakeRejected(Drop.UNKNOWN_INDEX)
    ephemeral_public = message[12:44]
    chain = _kdf1(state.chaining_key, ephemeral_public)
    h = _hash(state.hash + ephemeral_public)
    chain = _kdf1(chain, _dh(state.ephemeral_private, ephemeral_public))
    chain = _kdf1(chain, _dh(ctx.static.private, ephemeral_public))
    chain, tau, key = _kdf3(chain, ctx.psk)
    h = _hash(h + tau)
    _open(key, message[44:60], h, Drop.DECRYPT_FAILED)
    initiator_send, responder_send = _kdf2(chain, b"")
    return peer_index, TransportKeys(send=initiator_send, receive=responder_send)


def initiator_public_key(static: StaticKeyPair, message: bytes) -> bytes | None:
    """The static public key inside an initiation addressed to ``static``, or None.

    Lets a node pick the tunnel for an initiation by key when the source address does
    not identify it. Costs one DH; verify mac1 first so garbage never gets this far.
    """
    if len(message) != INITIATION_LEN:
        return None
    ephemeral_public = message[8:40]
    initial = _hash(_hash(_INITIAL_HASH + static.public) + ephemeral_public)
    try:
        _, key = _kdf2(
            _kdf1(_INITIAL_CHAIN, ephemeral_public), _dh(static.private, ephemeral_public)
        )
        return _open(key, message[40:88], initial, Drop.NOT_FOR_US)
    except HandshakeRejected:
        return None
