"""The only place that reads the OS clocks; everything else gets time injected."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic time for timers, wall-clock time for TAI64N and portal expiries."""

    def monotonic(self) -> float: ...

    def unix(self) -> float: ...


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def unix(self) -> float:
        return time.time()
