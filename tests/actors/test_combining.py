"""CombiningLock: steps never overlap, none is lost, and submitters never wait."""

from __future__ import annotations

import logging
import threading

import pytest

from actors.combining import CombiningLock


def test_a_step_submitted_to_a_free_lock_runs_at_once_on_the_caller() -> None:
    lock = CombiningLock(limit=4)
    ran_on: list[threading.Thread] = []
    assert lock.submit(lambda: ran_on.append(threading.current_thread()))
    assert ran_on == [threading.current_thread()]


def test_steps_submitted_while_held_run_on_the_holder_before_it_returns() -> None:
    lock = CombiningLock(limit=4)
    inside, submitted = threading.Event(), threading.Event()
    ran_on: list[str] = []

    def long_step() -> str:
        inside.set()
        assert submitted.wait(5)
        ran_on.append("owner step")
        return "result"

    def submitter() -> None:
        assert inside.wait(5)
        lock.submit(lambda: ran_on.append(threading.current_thread().name))
        submitted.set()  # returned without waiting for the holder

    other = threading.Thread(target=submitter, name="submitter")
    other.start()
    assert lock.call(long_step) == "result"
    other.join(5)
    # The queued step ran on the holder's thread, after its own step, before call() returned.
    assert ran_on == ["owner step", threading.current_thread().name]


def test_bounded_steps_beyond_the_limit_are_dropped_and_counted() -> None:
    lock = CombiningLock(limit=2)
    results: list[bool] = []
    ran: list[int] = []

    def holder() -> None:
        for i in range(4):
            results.append(lock.submit(lambda i=i: ran.append(i)))
        results.append(lock.submit(lambda: ran.append(99), bounded=False))

    lock.call(holder)
    assert results == [True, True, False, False, True]
    assert ran == [0, 1, 99]
    assert lock.dropped == 2


def test_a_failing_step_is_logged_and_the_rest_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lock = CombiningLock(limit=4)
    ran: list[str] = []

    def holder() -> None:
        lock.submit(lambda: 1 / 0)  # type: ignore[func-returns-value]
        lock.submit(lambda: ran.append("after"))

    with caplog.at_level(logging.ERROR, logger="actors.combining"):
        lock.call(holder)
    assert ran == ["after"]
    assert "queued step failed" in caplog.text
    assert lock.submit(lambda: ran.append("free again"))  # the lock was released
    assert ran == ["after", "free again"]


def test_an_owner_step_that_raises_releases_the_lock() -> None:
    lock = CombiningLock(limit=4)
    with pytest.raises(ZeroDivisionError):
        lock.call(lambda: 1 / 0)
    ran: list[int] = []
    lock.submit(lambda: ran.append(1))
    assert ran == [1]


def test_under_contention_no_step_is_lost_and_none_overlap() -> None:
    lock = CombiningLock(limit=1_000_000)
    state = {"count": 0, "inside": 0, "overlaps": 0}

    def step() -> None:
        state["inside"] += 1
        if state["inside"] != 1:
            state["overlaps"] += 1
        state["count"] += 1
        state["inside"] -= 1

    per_thread = 5_000

    def submitter() -> None:
        for _ in range(per_thread):
            lock.submit(step)

    def owner() -> None:
        for _ in range(per_thread):
            lock.call(step)

    threads = [threading.Thread(target=submitter) for _ in range(3)]
    threads.append(threading.Thread(target=owner))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert state["count"] == 4 * per_thread
    assert state["overlaps"] == 0
    assert lock.dropped == 0


class _ReleaseHook:
    """Wraps the real lock: just before the first release another thread submits a step
    (it finds the lock held, queues the step and returns): the narrowest race there is."""

    def __init__(self, real: threading.Lock, on_first_release: threading.Thread) -> None:
        self._real = real
        self._hook: threading.Thread | None = on_first_release

    def acquire(self, blocking: bool = True) -> bool:
        return self._real.acquire(blocking)

    def release(self) -> None:
        hook, self._hook = self._hook, None
        if hook is not None:
            hook.start()
            hook.join(5)
        self._real.release()


def test_a_step_queued_just_before_the_holder_releases_is_not_stranded() -> None:
    lock = CombiningLock(limit=4)
    ran: list[str] = []
    late = threading.Thread(target=lambda: lock.submit(lambda: ran.append("late")))
    lock._lock = _ReleaseHook(lock._lock, late)  # type: ignore[assignment]
    lock.call(lambda: ran.append("owner"))
    assert ran == ["owner", "late"]
