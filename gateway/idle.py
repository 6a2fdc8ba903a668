"""Connected <-> Idle for one connection (rust/connlib/snownet/src/node.rs), sans-IO.

A connection is idle after ``IDLE_AFTER`` seconds without data in either direction,
counted from the moment a path was nominated; any data makes it active again. "Data" is a
WireGuard transport message carrying an IP packet: keepalives, handshakes and STUN do not
count. Idle connections use the slow ICE timings.
"""

from __future__ import annotations

IDLE_AFTER = 10.0


class IdleTracker:
    """Reports transitions only: the shell tells the node about them, never per packet."""

    __slots__ = ("_last_data", "_started", "idle")

    def __init__(self) -> None:
        self._last_data = 0.0
        self._started = False
        self.idle = False

    def start(self, now: float) -> None:
        """A path was nominated: the idle countdown begins (once)."""
        if not self._started:
            self._started = True
            self._last_data = now

    def note_data(self, now: float) -> bool:
        """Data flowed (call once per batch); True when this ended an idle period."""
        self._last_data = now
        if self.idle:
            self.idle = False
            return True
        return False

    def handle_timeout(self, now: float) -> bool:
        """True when the connection has just become idle."""
        if self._started and not self.idle and now - self._last_data >= IDLE_AFTER:
            self.idle = True
            return True
        return False

    def poll_timeout(self) -> float | None:
        if not self._started or self.idle:
            return None
        return self._last_data + IDLE_AFTER
