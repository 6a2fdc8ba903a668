"""One scheduler thread that tells actors when their core's deadline has come.

Every actor has at most one pending wake: "call ``handle_timeout`` at
``core.poll_timeout()``" (:class:`ActorTimer`). The :class:`Timer` keeps a heap of
``(deadline, actor, message)`` and ``tell``s the message when the deadline passes on the
injected clock. The actor then calls ``handle_timeout(clock.monotonic())`` with the current
time, never the stale deadline.

State that is safe to drive from any thread (a client's data path behind its own lock,
``actors/peer_session.py``) schedules a plain call instead (:meth:`Timer.schedule_call`,
:class:`CallTimer`): the Timer thread runs it directly, so thousands of clients' timers
cost no actor wake-ups and no thread switches.

Wake-ups are coalesced with *timer slack* (:mod:`gateway.slack`): a deadline ``T`` seconds
ahead may fire up to 1 % of ``T`` (at most 100 ms) late, on a 100/10/1 ms grid,
and every deadline already due then fires in the same wake-up. Thousands of idle clients'
25 s keepalives and 60 s ICE checks would otherwise each wake the thread (~30 us of CPU
each). A deadline due now (a new connection's first check) does not move, a short one
(a 250 ms retransmit) by at most 2.5 ms.

The thread waits on a ``Condition`` with a timeout computed from ``clock.monotonic()``.
With the real clock that is exact. With a ``ManualClock`` the thread cannot notice the
clock being moved, so tests drive ``handle_timeout`` directly (or tell ``Wake()``) instead
of relying on the timer thread; deadlines already due on the manual clock do fire at once.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pykka

from actors.clock import Clock
from gateway.slack import fire_at

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Wake:
    """The conventional timer message: "your core has a deadline now"."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class TimerHandle:
    """Identifies one scheduled message (for :meth:`Timer.cancel`)."""

    seq: int
    deadline: float


@dataclass(slots=True)
class _Entry:
    deadline: float
    seq: int
    ref: pykka.ActorRef | None
    message: object  # for a ref: the message; otherwise the callable to run
    cancelled: bool = False  # or fired: either way no longer pending

    def __lt__(self, other: _Entry) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)


class Timer:
    """A process-wide scheduler thread named ``Timer``; start and stop it explicitly."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[_Entry] = []  # by deadline: what is due
        self._by_wake: list[tuple[float, int, _Entry]] = []  # by wake-up time (deadline + slack)
        self._pending: dict[int, _Entry] = {}
        self._seq = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("Timer already started")
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="Timer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def schedule(self, ref: pykka.ActorRef, deadline: float, message: object) -> TimerHandle:
        """Tell ``message`` to ``ref`` once ``clock.monotonic() >= deadline``."""
        return self._push(deadline, ref, message)

    def schedule_call(self, deadline: float, call: Callable[[], None]) -> TimerHandle:
        """Run ``call()`` on the Timer thread once ``clock.monotonic() >= deadline``.

        ``call`` must be quick and must not block: every other deadline waits for it.
        """
        return self._push(deadline, None, call)

    def _push(self, deadline: float, ref: pykka.ActorRef | None, message: object) -> TimerHandle:
        wake_by = fire_at(deadline, self._clock.monotonic())
        with self._cond:
            entry = _Entry(deadline, next(self._seq), ref, message)
            # The thread sleeps until the first wake-up time; only an earlier one needs to
            # wake it (owners re-arm often, mostly to later deadlines).
            earlier = not self._by_wake or wake_by < self._by_wake[0][0]
            heapq.heappush(self._heap, entry)
            heapq.heappush(self._by_wake, (wake_by, entry.seq, entry))
            self._pending[entry.seq] = entry
            if earlier:
                self._cond.notify_all()
            return TimerHandle(entry.seq, deadline)

    def cancel(self, handle: TimerHandle) -> None:
        """Forget a scheduled message; a no-op if it already fired."""
        with self._cond:
            entry = self._pending.pop(handle.seq, None)
            if entry is not None:
                entry.cancelled = True

    def pending(self, handle: TimerHandle) -> bool:
        """Whether the message is still waiting to be told."""
        with self._cond:
            return handle.seq in self._pending

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                due = self._pop_due()
                if not due:
                    by_wake = self._by_wake
                    while by_wake and by_wake[0][2].cancelled:
                        heapq.heappop(by_wake)  # fired or cancelled
                    timeout = None
                    if by_wake:
                        timeout = max(0.0, by_wake[0][0] - self._clock.monotonic())
                    self._cond.wait(timeout)
                    continue
            for entry in due:  # outside the lock: a call may schedule again
                if entry.ref is None:
                    try:
                        entry.message()  # type: ignore[operator]
                    except Exception:
                        log.exception("Timer: a scheduled call failed")
                    continue
                try:
                    entry.ref.tell(entry.message)
                except pykka.ActorDeadError:
                    log.debug("Timer: actor %s is dead; dropping %r", entry.ref, entry.message)

    def _pop_due(self) -> list[_Entry]:
        now = self._clock.monotonic()
        due = []
        while self._heap and (self._heap[0].cancelled or self._heap[0].deadline <= now):
            entry = heapq.heappop(self._heap)
            if not entry.cancelled:
                entry.cancelled = True  # fired: the wake heap drops it lazily
                self._pending.pop(entry.seq, None)
                due.append(entry)
        return due


class _PendingWake:
    """One owner's single pending wake, kept at its core's ``poll_timeout()``.

    ``arm`` is not thread-safe by itself: the owner serialises it (an actor's own thread,
    or the peer session's lock).
    """

    def __init__(self, timer: Timer) -> None:
        self._timer = timer
        self._handle: TimerHandle | None = None

    @property
    def deadline(self) -> float | None:
        return self._handle.deadline if self._handle is not None else None

    def arm(self, deadline: float | None) -> None:
        """Wake at ``deadline`` (``None``: never). No-op if already pending for it."""
        if self._handle is not None:
            if self._handle.deadline == deadline and self._timer.pending(self._handle):
                return
            self._timer.cancel(self._handle)
            self._handle = None
        if deadline is not None:
            self._handle = self._schedule(deadline)

    def _schedule(self, deadline: float) -> TimerHandle:
        raise NotImplementedError


class ActorTimer(_PendingWake):
    """Tells the actor ``Wake()`` at the deadline."""

    def __init__(self, timer: Timer, ref: pykka.ActorRef) -> None:
        super().__init__(timer)
        self._ref = ref

    def _schedule(self, deadline: float) -> TimerHandle:
        return self._timer.schedule(self._ref, deadline, Wake())


class CallTimer(_PendingWake):
    """Has the Timer thread call ``call`` at the deadline (no actor wake-up)."""

    def __init__(self, timer: Timer, call: Callable[[], None]) -> None:
        super().__init__(timer)
        self._call = call

    def _schedule(self, deadline: float) -> TimerHandle:
        return self._timer.schedule_call(deadline, self._call)

    def arm_earlier(self, deadline: float | None) -> None:
        """Move the wake earlier if ``deadline`` is before it; never later (cheap per batch).

        Waking too early is harmless (the owner re-arms precisely after its timeout), so
        the data path only has to make sure no deadline is missed.
        """
        if deadline is None:
            return
        handle = self._handle
        if handle is None or deadline < handle.deadline or not self._timer.pending(handle):
            self.arm(deadline)
