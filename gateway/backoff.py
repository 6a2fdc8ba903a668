"""Reconnect backoff of the portal connection (rust/phoenix-channel/src/lib.rs).

Mirrors the defaults of the Rust ``backoff`` crate that the 1.4 gateway uses: the
*interval* starts at 0.5 s and grows by 1.5 per attempt up to 60 s; each *delay* is drawn
uniformly from ``interval ± 50 %``. The crate caps only the interval, which lets a jittered
delay reach 90 s; we also cap the delay itself at 60 s, so "capped at 60 s" holds for every
wait (once capped a delay lies in [30 s, 60 s]). There is no maximum elapsed time: the
gateway retries forever. Randomness is injected so tests are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import InvalidArgument
from gateway.types import Rng

INITIAL_INTERVAL = 0.5
MULTIPLIER = 1.5
RANDOMIZATION_FACTOR = 0.5
MAX_INTERVAL = 60.0


@dataclass(slots=True)
class ExponentialBackoff:
    """Produces successive jittered delays; ``reset()`` starts over at the initial interval."""

    initial_interval: float = INITIAL_INTERVAL
    multiplier: float = MULTIPLIER
    randomization_factor: float = RANDOMIZATION_FACTOR
    max_interval: float = MAX_INTERVAL
    _current: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if not 0 < self.initial_interval <= self.max_interval:
            raise InvalidArgument("need 0 < initial_interval <= max_interval")
        if self.multiplier < 1 or not 0 <= self.randomization_factor < 1:
            raise InvalidArgument("need multiplier >= 1 and 0 <= randomization_factor < 1")
        self._current = self.initial_interval

    @property
    def current_interval(self) -> float:
        """The interval the next delay is drawn around."""
        return self._current

    def reset(self) -> None:
        self._current = self.initial_interval

    def next_delay(self, rng: Rng) -> float:
        """The next delay in seconds; advances the interval."""
        delta = self.randomization_factor * self._current
        delay = self._current - delta + rng.random() * 2 * delta
        self._current = min(self._current * self.multiplier, self.max_interval)
        return min(delay, self.max_interval)
