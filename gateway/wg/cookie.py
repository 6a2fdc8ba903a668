"""mac1, mac2 and cookie replies (the WireGuard paper, §5.4.4 and §5.4.7), both sides.

Responder side, :class:`CookieChecker` (one per node, keyed by our static public key):
verifies mac1 of every handshake message. Under load the gateway drops handshakes as
Firezone 1.4 does (``gateway/wg/tunnel.py``) and sends no cookie replies; ``verify_mac2``
and ``cookie_reply`` are the WireGuard paper's responder half, kept for the tests and peers
that exercise :class:`CookieJar`. Initiator side, :class:`CookieJar` (one per tunnel, keyed
by the peer's public key): adds mac1/mac2 to the handshake messages we send and decrypts
cookie replies (a client under load may send us one).

The cookie is ``MAC(secret, source ip bytes || source port)``; the secret belongs to the
rate limiter, which rotates it every two minutes.
"""

from __future__ import annotations

import hmac
import ipaddress
from hashlib import blake2s

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from gateway.types import Address, Rng
from gateway.wg.constants import (
    COOKIE_EXPIRATION,
    COOKIE_NONCE_LEN,
    COOKIE_REPLY_LEN,
    LABEL_COOKIE,
    LABEL_MAC1,
    MAC_LEN,
    MSG_COOKIE_REPLY,
)

_MAC_TRAILER = 2 * MAC_LEN
_ZERO_MAC = bytes(MAC_LEN)


def mac1_key(public: bytes) -> bytes:
    """HASH(LABEL_MAC1 || public): the key mac1 is computed with, for messages *to* ``public``."""
    return blake2s(LABEL_MAC1 + public).digest()


def cookie_key(public: bytes) -> bytes:
    """HASH(LABEL_COOKIE || public): encrypts cookie replies sent *by* ``public``'s owner."""
    return blake2s(LABEL_COOKIE + public).digest()


def mac(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s with a 16-byte digest (the WireGuard paper's MAC)."""
    return blake2s(data, digest_size=MAC_LEN, key=key).digest()


def address_bytes(src: Address) -> bytes:
    """The bytes a cookie binds to: packed IP then the port, big-endian."""
    ip, port = src
    return ipaddress.ip_address(ip).packed + port.to_bytes(2, "big")


class CookieChecker:
    """Our side of mac1/mac2 for handshake messages addressed to ``public``."""

    __slots__ = ("_cookie_key", "_mac1_key")

    def __init__(self, public: bytes) -> None:
        self._mac1_key = mac1_key(public)
        self._cookie_key = cookie_key(public)

    def verify_mac1(self, message: bytes) -> bool:
        """mac1 covers everything before it; always checked, before any DH work."""
        end = len(message) - _MAC_TRAILER
        return hmac.compare_digest(mac(self._mac1_key, message[:end]), message[end : end + MAC_LEN])

    def verify_mac2(self, message: bytes, src: Address, secret: bytes) -> bool:
        """True if mac2 was made with the cookie we would give ``src`` right now."""
        received = message[-MAC_LEN:]
        if received == _ZERO_MAC:
            return False
        cookie = mac(secret, address_bytes(src))
        return hmac.compare_digest(mac(cookie, message[:-MAC_LEN]), received)

    def cookie_reply(self, message: bytes, src: Address, secret: bytes, rng: Rng) -> bytes:
        """A type-3 message answering ``message`` (an initiation or a response) from ``src``."""
        cookie = mac(secret, address_bytes(src))
        nonce = rng.randbytes(COOKIE_NONCE_LEN)
        end = len(message) - _MAC_TRAILER
        their_mac1 = message[end : end + MAC_LEN]
        sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(
            cookie, their_mac1, nonce, self._cookie_key
        )
        reply = bytes((MSG_COOKIE_REPLY, 0, 0, 0)) + message[4:8] + nonce + sealed
        assert len(reply) == COOKIE_REPLY_LEN
        return reply


class CookieJar:
    """The cookie a peer gave us and the macs we put on handshake messages to that peer."""

    __slots__ = ("_cookie", "_cookie_at", "_cookie_key", "_last_mac1", "_mac1_key")

    def __init__(self, peer_public: bytes) -> None:
        self._mac1_key = mac1_key(peer_public)
        self._cookie_key = cookie_key(peer_public)
        self._cookie: bytes | None = None
        self._cookie_at = 0.0
        self._last_mac1: bytes | None = None

    @property
    def has_cookie(self) -> bool:
        return self._cookie is not None

    def seal(self, body: bytes, now: float) -> bytes:
        """Append mac1 and mac2 (zeros unless we hold a cookie younger than 120 s)."""
        mac1 = mac(self._mac1_key, body)
        self._last_mac1 = mac1
        with_mac1 = body + mac1
        cookie = self._cookie
        if cookie is not None and now - self._cookie_at < COOKIE_EXPIRATION:
            return with_mac1 + mac(cookie, with_mac1)
        self._cookie = None
        return with_mac1 + _ZERO_MAC

    def consume_reply(self, reply: bytes, now: float) -> bool:
        """Store the cookie from a type-3 message; False if it does not decrypt."""
        if self._last_mac1 is None or len(reply) != COOKIE_REPLY_LEN:
            return False
        nonce = reply[8 : 8 + COOKIE_NONCE_LEN]
        try:
            cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(
                reply[8 + COOKIE_NONCE_LEN :], self._last_mac1, nonce, self._cookie_key
            )
        except CryptoError:
            return False
        self._cookie = cookie
        self._cookie_at = now
        return True
