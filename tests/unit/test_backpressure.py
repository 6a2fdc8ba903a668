"""InFlight: the bound readers respect before they hand a batch to an actor."""

from __future__ import annotations

import threading

import pytest

from actors.backpressure import InFlight


def test_acquires_up_to_the_limit_then_refuses_and_counts() -> None:
    inflight = InFlight(3)
    assert [inflight.try_acquire() for _ in range(3)] == [True, True, True]
    assert inflight.in_flight == 3
    assert inflight.try_acquire() is False
    assert inflight.try_acquire() is False
    assert inflight.dropped == 2
    assert inflight.in_flight == 3


def test_release_frees_a_slot() -> None:
    inflight = InFlight(1)
    assert inflight.try_acquire()
    assert not inflight.try_acquire()
    inflight.release()
    assert inflight.in_flight == 0
    assert inflight.try_acquire()
    assert inflight.dropped == 1


def test_release_without_acquire_is_a_bug() -> None:
    inflight = InFlight(2)
    with pytest.raises(ValueError):
        inflight.release()


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        InFlight(0)


def test_concurrent_acquire_release_never_exceeds_the_limit() -> None:
    limit, threads, rounds = 4, 8, 2000
    inflight = InFlight(limit)
    granted = [0] * threads
    over_limit = threading.Event()
    start = threading.Barrier(threads)

    def worker(index: int) -> None:
        start.wait()
        for _ in range(rounds):
            if inflight.try_acquire():
                granted[index] += 1
                if inflight.in_flight > limit:
                    over_limit.set()
                inflight.release()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=10)
    assert not over_limit.is_set()
    assert inflight.in_flight == 0
    assert sum(granted) + inflight.dropped == threads * rounds
