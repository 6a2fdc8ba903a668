"""WireGuard protocol constants (the WireGuard paper, §5 and §6), in one place so timers stay
auditable."""

from __future__ import annotations

from typing import Final

CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"

KEY_LEN: Final = 32
MAC_LEN: Final = 16
AEAD_TAG_LEN: Final = 16
TAI64N_LEN: Final = 12
COOKIE_NONCE_LEN: Final = 24

# Message types; on the wire each is followed by three zero bytes.
MSG_INITIATION: Final = 1
MSG_RESPONSE: Final = 2
MSG_COOKIE_REPLY: Final = 3
MSG_TRANSPORT: Final = 4

INITIATION_LEN: Final = 148
RESPONSE_LEN: Final = 92
COOKIE_REPLY_LEN: Final = 64
TRANSPORT_HEADER_LEN: Final = 16
TRANSPORT_MIN_LEN: Final = TRANSPORT_HEADER_LEN + AEAD_TAG_LEN  # a keepalive

# Timers (seconds) and message limits, the WireGuard paper, §6.
REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME: Final = 120.0
REJECT_AFTER_TIME: Final = 180.0
REKEY_ATTEMPT_TIME: Final = 90.0
REKEY_TIMEOUT: Final = 5.0
REKEY_TIMEOUT_JITTER_MAX: Final = 0.333
KEEPALIVE_TIMEOUT: Final = 10.0
COOKIE_SECRET_MAX_AGE: Final = 120.0
#: A received cookie is used for mac2 only while younger than this (the WireGuard paper, §5.4.7).
COOKIE_EXPIRATION: Final = 120.0
#: Keys are erased when no new session was made for 3 x REJECT_AFTER_TIME.
SESSION_ZERO_AFTER: Final = 3 * REJECT_AFTER_TIME
#: An initiator with data to receive rekeys a little before the responder would reject.
REKEY_ON_RECEIVE_AGE: Final = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
#: "Sent data but heard nothing back" triggers a new handshake after this long.
NEW_HANDSHAKE_AFTER_SILENCE: Final = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT

# Node-wide handshake rate limiting (rust/connlib/snownet/src/node.rs).
HANDSHAKE_LIMIT_PER_SECOND: Final = 100
RATE_LIMIT_WINDOW: Final = 1.0

#: Packets kept while a handshake is under way (oldest dropped beyond this).
MAX_QUEUED_PACKETS: Final = 16
#: Sliding anti-replay window: bitmap words x 64 bits; the usable window is one word less.
REPLAY_WORDS: Final = 32
REPLAY_WINDOW: Final = (REPLAY_WORDS - 1) * 64
