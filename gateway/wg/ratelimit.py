"""Node-wide handshake rate limiter and cookie secret (snownet spec §8.2, whitepaper §5.3).

Every tunnel of a node shares one limiter. Each handshake message (initiation or
response) that passed mac1 is counted; once more than ``limit_per_second`` arrived in the
current one-second window the node is "under load" and tunnels demand a valid mac2
(answering with a cookie reply otherwise). The limiter also owns the cookie secret that
cookies are derived from, rotated every ``COOKIE_SECRET_MAX_AGE`` seconds.

The window is reset by ``handle_timeout`` and also lazily on use, so a node whose tunnels
are all idle need not wake up every second: ``poll_timeout`` only reports a reset while
something was counted.
"""

from __future__ import annotations

import logging

from gateway.types import Rng
from gateway.wg.constants import (
    COOKIE_SECRET_MAX_AGE,
    HANDSHAKE_LIMIT_PER_SECOND,
    KEY_LEN,
    RATE_LIMIT_WINDOW,
)
from gateway.wg.cookie import CookieChecker

_log = logging.getLogger(__name__)


class HandshakeRateLimiter:
    """Counts handshake messages per window; see the module docstring."""

    def __init__(
        self, public_key: bytes, rng: Rng, limit_per_second: int = HANDSHAKE_LIMIT_PER_SECOND
    ) -> None:
        if limit_per_second < 0:
            raise ValueError("limit_per_second must be >= 0")
        self.public_key = bytes(public_key)
        self.checker = CookieChecker(self.public_key)
        self.rng = rng
        self.limit = limit_per_second
        self._count = 0
        self._window_start: float | None = None
        self._secret = b""
        self._secret_born: float | None = None

    def _roll_window(self, now: float) -> None:
        start = self._window_start
        if start is None or now >= start + RATE_LIMIT_WINDOW or now < start:
            self._window_start = now
            self._count = 0

    def note_handshake(self, now: float) -> bool:
        """Count one handshake message; True when the node is under load (over the limit)."""
        self._roll_window(now)
        self._count += 1
        if self._count == self.limit + 1:
            _log.info("under load: over %d handshake messages in this %g s window; "
                      "demanding cookies until it ends", self.limit, RATE_LIMIT_WINDOW)
        return self._count > self.limit

    def is_under_load(self, now: float) -> bool:
        """Whether the current window is already over the limit (counts nothing)."""
        self._roll_window(now)
        return self._count > self.limit

    def cookie_secret(self, now: float) -> bytes:
        """The current secret cookies are derived from, renewed when older than 120 s."""
        born = self._secret_born
        if born is None or now - born >= COOKIE_SECRET_MAX_AGE or now < born:
            self._secret = self.rng.randbytes(KEY_LEN)
            self._secret_born = now
        return self._secret

    def handle_timeout(self, now: float) -> None:
        start = self._window_start
        if start is not None and now >= start + RATE_LIMIT_WINDOW:
            self._window_start = None
            self._count = 0

    def poll_timeout(self) -> float | None:
        """The end of the current window, while one is open."""
        start = self._window_start
        return None if start is None else start + RATE_LIMIT_WINDOW
