"""Node-wide handshake rate limiter (Firezone ``rust/connlib/snownet/src/node.rs``, which
passes boringtun's ``RateLimiter`` no source address).

Every tunnel of a node shares one limiter. Each handshake message (initiation or
response) that passed mac1 is counted; once more than ``limit_per_second`` arrived in the
current one-second window the node is "under load" and tunnels drop further handshake
messages until the window ends, as the 1.4 gateway does. No cookie reply is sent: it
would go to whatever source a spoofed initiation claims.

The window is reset by ``handle_timeout`` and also lazily on use, so a node whose tunnels
are all idle need not wake up every second: ``poll_timeout`` only reports a reset while
something was counted.

The limiter is shared by every client's session, and each is driven by whichever IO
thread has its datagram, with the ``now`` that thread read. It is safe for that without a
lock (cores import no threading): a window is an object with an ``itertools.count``,
whose ``next()`` is atomic, so every message is counted exactly once; windows are
replaced by a compare-and-swap built on ``list.append`` (every thread that saw the same
expired window gets the same successor); a window covers every ``now`` before its end,
so a thread whose clock reading is a little older than the window's start counts in it
instead of starting it over.
"""

from __future__ import annotations

import itertools
import logging

from gateway.errors import InvalidArgument
from gateway.types import Rng
from gateway.wg.constants import (
    HANDSHAKE_LIMIT_PER_SECOND,
    RATE_LIMIT_WINDOW,
)
from gateway.wg.cookie import CookieChecker

_log = logging.getLogger(__name__)


class _Window:
    """One counting window (``end is None``: idle, nothing counted since the last one)."""

    __slots__ = ("_counter", "_successors", "end", "over")

    def __init__(self, end: float | None) -> None:
        self.end = end
        self.over = False  # more than the limit counted: only ever set to True
        self._counter = itertools.count(1)
        self._successors: list[_Window] = []

    def covers(self, now: float) -> bool:
        return self.end is not None and now < self.end

    def count(self) -> int:
        """Count one message; its 1-based number in this window (atomic)."""
        return next(self._counter)

    def successor(self, candidate: _Window) -> _Window:
        """The window after this one: ``candidate`` unless another thread got there first."""
        self._successors.append(candidate)  # atomic; the first appended wins
        return self._successors[0]


class HandshakeRateLimiter:
    """Counts handshake messages per window; see the module docstring."""

    def __init__(
        self, public_key: bytes, rng: Rng, limit_per_second: int = HANDSHAKE_LIMIT_PER_SECOND
    ) -> None:
        if limit_per_second < 0:
            raise InvalidArgument("limit_per_second must be >= 0")
        self.public_key = bytes(public_key)
        self.checker = CookieChecker(self.public_key)
        self.rng = rng
        self.limit = limit_per_second
        self._window = _Window(None)

    def _current(self, now: float) -> _Window:
        """The window ``now`` counts in, starting one (at ``now``) if the last one ended."""
        window = self._window
        while not window.covers(now):
            window = window.successor(_Window(now + RATE_LIMIT_WINDOW))
            self._window = window  # a stale store is harmless: its successor is linked
        return window

    def note_handshake(self, now: float) -> bool:
        """Count one handshake message; True when the node is under load (over the limit)."""
        window = self._current(now)
        number = window.count()
        if number <= self.limit:
            return False
        window.over = True
        if number == self.limit + 1:
            _log.info("under load: over %d handshake messages in this %g s window; "
                      "dropping handshakes until it ends", self.limit, RATE_LIMIT_WINDOW)
        return True

    def is_under_load(self, now: float) -> bool:
        """Whether the current window is already over the limit (counts nothing)."""
        window = self._window
        return window.covers(now) and window.over

    def handle_timeout(self, now: float) -> None:
        window = self._window
        if window.end is not None and now >= window.end:
            self._window = window.successor(_Window(None))  # idle until the next message

    def poll_timeout(self) -> float | None:
        """The end of the current window, while one is open."""
        return self._window.end
