"""Bounded in-flight batches between a reader thread and the actor that consumes them.

Pykka inboxes are unbounded: a reader that outpaces its consumer would grow the inbox
without limit and add latency to every packet behind it. Readers therefore take a slot
before they ``tell`` a batch and the consumer gives it back after handling the batch; when
no slot is free the reader drops the batch instead of blocking (a blocked reader would
stall every other destination too).
"""

from __future__ import annotations

import threading


class InFlight:
    """A non-blocking counting semaphore that counts refusals; safe across threads."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._limit = limit
        self._in_flight = 0
        self._dropped = 0
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        """Batches handed over and not yet released."""
        return self._in_flight

    @property
    def dropped(self) -> int:
        """How many ``try_acquire`` calls were refused (each one a dropped batch)."""
        return self._dropped

    def try_acquire(self) -> bool:
        """Take a slot if one is free; otherwise count the refusal and return False."""
        with self._lock:
            if self._in_flight >= self._limit:
                self._dropped += 1
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        """Give a slot back; releasing more than was acquired is a bug in the caller."""
        with self._lock:
            if self._in_flight == 0:
                raise ValueError("InFlight.release() without a matching try_acquire()")
            self._in_flight -= 1
