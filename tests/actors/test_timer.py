"""Timer thread and ActorTimer: ordering, cancel, re-arm, dead actors."""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from actors.clock import SystemClock
from actors.timer import ActorTimer, Timer, Wake
from gateway.slack import MAX_SLACK
from tests.support.clock import ManualClock
from tests.support.portal import Recorder


@pytest.fixture
def timer() -> Iterator[Timer]:
    t = Timer(SystemClock())
    t.start()
    yield t
    t.stop()


@pytest.fixture
def inbox() -> queue.Queue[Any]:
    return queue.Queue()


def test_messages_arrive_in_deadline_order(timer: Timer, inbox: queue.Queue[Any]) -> None:
    ref = Recorder.start(inbox)
    now = SystemClock().monotonic()
    timer.schedule(ref, now + 0.06, "third")
    timer.schedule(ref, now + 0.02, "first")
    timer.schedule(ref, now + 0.04, "second")
    got = [inbox.get(timeout=2) for _ in range(3)]
    assert got == ["first", "second", "third"]
    assert SystemClock().monotonic() >= now + 0.06


def test_cancel_prevents_delivery(timer: Timer, inbox: queue.Queue[Any]) -> None:
    ref = Recorder.start(inbox)
    now = SystemClock().monotonic()
    handle = timer.schedule(ref, now + 0.02, "cancelled")
    timer.schedule(ref, now + 0.05, "kept")
    timer.cancel(handle)
    assert not timer.pending(handle)
    assert inbox.get(timeout=2) == "kept"
    assert inbox.empty()


def test_dead_actor_does_not_kill_the_timer(timer: Timer, inbox: queue.Queue[Any]) -> None:
    dead = Recorder.start(queue.Queue())
    dead.stop()
    alive = Recorder.start(inbox)
    now = SystemClock().monotonic()
    timer.schedule(dead, now, "lost")
    timer.schedule(alive, now + 0.02, "delivered")
    assert inbox.get(timeout=2) == "delivered"


def test_due_deadline_on_a_manual_clock_fires_at_once(inbox: queue.Queue[Any]) -> None:
    clock = ManualClock()
    timer = Timer(clock)
    timer.start()
    try:
        ref = Recorder.start(inbox)
        timer.schedule(ref, clock.monotonic(), Wake("due"))
        assert inbox.get(timeout=2) == Wake("due")
        handle = timer.schedule(ref, clock.monotonic() + 3600, Wake("later"))
        assert timer.pending(handle)
    finally:
        timer.stop()


def test_actor_timer_keeps_one_pending_wake(inbox: queue.Queue[Any]) -> None:
    clock = ManualClock()
    timer = Timer(clock)  # not started: we inspect the bookkeeping only
    actor_timer = ActorTimer(timer, Recorder.start(inbox))
    actor_timer.arm(clock.monotonic() + 10)
    first = actor_timer._handle
    actor_timer.arm(clock.monotonic() + 10)
    assert actor_timer._handle is first  # same deadline: no-op
    actor_timer.arm(clock.monotonic() + 20)
    assert first is not None and not timer.pending(first)
    assert actor_timer.deadline == clock.monotonic() + 20
    actor_timer.arm(None)
    assert actor_timer.deadline is None


def test_actor_timer_rearms_same_deadline_after_it_fired(
    timer: Timer, inbox: queue.Queue[Any]
) -> None:
    actor_timer = ActorTimer(timer, Recorder.start(inbox))
    deadline = SystemClock().monotonic() + 0.01
    actor_timer.arm(deadline)
    assert inbox.get(timeout=2) == Wake()
    actor_timer.arm(deadline)  # already fired: must schedule again, not be swallowed
    assert inbox.get(timeout=2) == Wake()


def test_stop_is_prompt_and_idempotent() -> None:
    t = Timer(SystemClock())
    t.start()
    t.schedule(pykka.ActorRef.__new__(pykka.ActorRef), SystemClock().monotonic() + 3600, "x")
    t.stop()
    t.stop()
    with pytest.raises(RuntimeError):
        t.start()
        t.start()
    t.stop()


def test_only_an_earlier_deadline_wakes_the_timer_thread() -> None:
    """Actors re-arm after every message, mostly to later deadlines: those must not wake
    the timer thread (thousands of pointless wake-ups a second with many clients)."""
    clock = ManualClock()
    timer = Timer(clock)  # not started: count the notifications it would send
    notified: list[None] = []
    original = timer._cond.notify_all
    timer._cond.notify_all = lambda: (notified.append(None), original())[1]  # type: ignore[method-assign]
    ref: Any = object()
    timer.schedule(ref, clock.monotonic() + 100, Wake())
    assert len(notified) == 1
    timer.schedule(ref, clock.monotonic() + 200, Wake())
    assert len(notified) == 1
    timer.schedule(ref, clock.monotonic() + 50, Wake())
    assert len(notified) == 2


def test_deadlines_within_the_slack_share_one_wake_up(timer: Timer) -> None:
    # 2 s ahead gives 20 ms of slack (SLACK_FRACTION 1 %). 51 ms past a 100 ms grid point
    # the first fires on the next 10 ms grid point, 9 ms late: the second deadline, 4 ms
    # after it, fires in the same wake-up instead of waking the thread again.
    fired: dict[str, tuple[float, threading.Thread]] = {}
    done = threading.Event()
    clock = SystemClock()
    now = clock.monotonic()
    first = math.ceil((now + 2.0) / 0.1) * 0.1 + 0.051
    second = first + 0.004

    def record(name: str) -> None:
        fired[name] = (clock.monotonic(), threading.current_thread())
        if len(fired) == 2:
            done.set()

    timer.schedule_call(first, lambda: record("first"))
    timer.schedule_call(second, lambda: record("second"))
    assert done.wait(5)
    assert fired["first"][0] >= first and fired["second"][0] >= second  # never early
    assert fired["second"][0] - fired["first"][0] < 0.005  # one wake-up, not two
    assert fired["first"][0] - first <= MAX_SLACK + 0.05  # late by the slack at most


def test_a_deadline_due_now_gets_no_slack(timer: Timer) -> None:
    clock = SystemClock()
    timer.schedule_call(clock.monotonic() + 60, lambda: None)  # a far one, for contrast
    done = threading.Event()
    start = clock.monotonic()
    timer.schedule_call(start, done.set)
    assert done.wait(2)
    assert clock.monotonic() - start < 0.05
