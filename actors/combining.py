"""A combining lock: steps from several threads run one at a time, and no caller but the
owner ever waits.

The NodeActor's Node core is fed from three threads: the actor's own (portal messages,
peer reports), the UDP reader (STUN, TURN, handshakes) and the Timer (ICE and TURN
deadlines). A mailbox hop per STUN message costs more CPU than handling the message (a
thread wake-up each), while a plain lock would let a busy actor stall the UDP reader and
with it every client's data path, or stall the Timer and with it every session's timers.

So the reader and the Timer *submit* a step: it runs at once on the submitting thread if
the lock is free, otherwise it is queued and whichever thread holds the lock runs it before
releasing (flat combining). The owner's own steps (``call``) wait for the lock like any
lock; they are the only blocking callers.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class CombiningLock:
    """Serialises steps; see the module docstring. ``limit`` bounds queued bounded steps."""

    def __init__(self, limit: int) -> None:
        self._lock = threading.Lock()
        self._pending: deque[Callable[[], None]] = deque()
        self._limit = limit
        self.dropped = 0

    def submit(self, step: Callable[[], None], *, bounded: bool = True) -> bool:
        """Run ``step`` now if the lock is free, else leave it to the holder; never blocks.

        A ``bounded`` step is dropped (False) while ``limit`` steps are already queued: a
        node that cannot keep up sheds datagrams instead of growing a queue without end.
        """
        if bounded and len(self._pending) >= self._limit:
            self.dropped += 1
            return False
        self._pending.append(step)
        if self._lock.acquire(blocking=False):
            self._release()
        return True

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` under the lock, waiting for it (the owner's thread), then what queued."""
        self._lock.acquire()
        try:
            return fn()
        finally:
            self._release()

    def _release(self) -> None:
        """Run every queued step, release, and take over again if one slipped in meanwhile
        (a submitter that found the lock held just before we released it)."""
        while True:
            while self._pending:
                step = self._pending.popleft()
                try:
                    step()
                except Exception:
                    log.exception("a queued step failed; dropped")
            self._lock.release()
            if not self._pending or not self._lock.acquire(blocking=False):
                return
