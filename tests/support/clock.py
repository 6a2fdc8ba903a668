"""A manual clock for driving sans-IO cores and actors deterministically."""

from __future__ import annotations


class ManualClock:
    """Monotonic and wall-clock time that only move when the test says so."""

    def __init__(self, monotonic: float = 1000.0, unix: float = 1_700_000_000.0) -> None:
        self._monotonic = monotonic
        self._unix = unix

    def monotonic(self) -> float:
        return self._monotonic

    def unix(self) -> float:
        return self._unix

    def tick(self, seconds: float) -> None:
        """Advance both clocks by ``seconds``."""
        self._monotonic += seconds
        self._unix += seconds

    def skip_to(self, monotonic: float) -> None:
        """Jump the monotonic clock (and the wall clock by the same amount) forward."""
        if monotonic > self._monotonic:
            self.tick(monotonic - self._monotonic)
