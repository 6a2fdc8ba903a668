"""The garbage-collection policy: freeze after full collections, reclaim frozen cycles."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from actors.gcpolicy import CHECK_INTERVAL, RECLAIM_MIN_INTERVAL, GcPolicy
from actors.timer import TimerHandle
from tests.support.clock import ManualClock


class FakeCollector:
    """A ``gc`` stand-in: collections take ``duration`` on the clock and run the callbacks."""

    def __init__(self, clock: ManualClock, frozen: int = 1000) -> None:
        self.clock = clock
        self.callbacks: list[Any] = []
        self.frozen = frozen
        self.calls: list[str] = []
        self.duration = 0.0

    def run(self, generation: int) -> None:
        for callback in self.callbacks:
            callback("start", {"generation": generation})
        self.clock.tick(self.duration)
        for callback in self.callbacks:
            callback("stop", {"generation": generation, "collected": 0, "uncollectable": 0})

    def collect(self, generation: int = 2) -> int:
        self.calls.append("collect")
        self.run(generation)
        return 7

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def get_freeze_count(self) -> int:
        return self.frozen


class FakeTimer:
    def __init__(self) -> None:
        self.scheduled: list[tuple[float, Callable[[], None]]] = []
        self.cancelled: list[TimerHandle] = []

    def schedule_call(self, deadline: float, call: Callable[[], None]) -> TimerHandle:
        self.scheduled.append((deadline, call))
        return TimerHandle(len(self.scheduled), deadline)

    def cancel(self, handle: TimerHandle) -> None:
        self.cancelled.append(handle)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def collector(clock: ManualClock) -> FakeCollector:
    return FakeCollector(clock)


@pytest.fixture
def policy(clock: ManualClock, collector: FakeCollector) -> GcPolicy:
    policy = GcPolicy(clock, collector=collector)
    policy.install()
    collector.calls.clear()
    return policy


def test_install_freezes_the_start_up_heap_and_hooks_in(clock: ManualClock) -> None:
    collector = FakeCollector(clock)
    policy = GcPolicy(clock, collector=collector)
    policy.install()
    policy.install()  # idempotent
    assert collector.calls == ["collect", "freeze"]
    assert len(collector.callbacks) == 1
    policy.uninstall()
    assert collector.callbacks == [] and collector.calls[-1] == "unfreeze"


def test_a_full_collection_freezes_its_survivors_younger_ones_do_not(
    policy: GcPolicy, collector: FakeCollector
) -> None:
    collector.run(0)
    collector.run(1)
    assert collector.calls == []
    collector.run(2)
    assert collector.calls == ["freeze"]


def test_pauses_are_recorded_per_generation(policy: GcPolicy, collector: FakeCollector) -> None:
    collector.duration = 0.002
    collector.run(0)
    collector.duration = 0.040
    collector.run(2)
    collector.duration = 0.010
    collector.run(2)
    status = policy.status()
    assert status["collections"] == [1, 0, 2]
    assert status["longest_pause_ms"] == [2.0, 0.0, 40.0]
    assert status["full_pause_ms_last"] == 10.0
    assert status["frozen_objects"] == 1000


def test_a_reclaim_waits_for_a_quarter_more_frozen_objects_and_the_interval(
    policy: GcPolicy, collector: FakeCollector, clock: ManualClock
) -> None:
    collector.frozen = 1250  # exactly a quarter more: not yet
    clock.tick(RECLAIM_MIN_INTERVAL)
    assert not policy.maybe_reclaim()
    collector.frozen = 1251
    assert policy.maybe_reclaim()
    # unfreeze, one full pass (whose callback refreezes the survivors)
    assert collector.calls == ["unfreeze", "collect", "freeze"]
    assert policy.status()["reclaims"] == 1

    collector.calls.clear()
    collector.frozen = 5000  # grew a lot again, but the last reclaim was just now
    assert not policy.maybe_reclaim()
    clock.tick(RECLAIM_MIN_INTERVAL - 1)
    assert not policy.maybe_reclaim()
    clock.tick(1)
    assert policy.maybe_reclaim()  # 5000 > 1251 * 1.25
    assert collector.calls == ["unfreeze", "collect", "freeze"]


def test_the_timer_asks_every_check_interval_until_stopped(
    policy: GcPolicy, collector: FakeCollector, clock: ManualClock
) -> None:
    timer = FakeTimer()
    policy.start(timer)
    deadline, tick = timer.scheduled[-1]
    assert deadline == clock.monotonic() + CHECK_INTERVAL
    clock.skip_to(deadline + RECLAIM_MIN_INTERVAL)
    collector.frozen = 10_000
    tick()
    assert policy.status()["reclaims"] == 1
    assert len(timer.scheduled) == 2  # asked again
    policy.stop()
    assert timer.cancelled == [TimerHandle(2, timer.scheduled[-1][0])]


def test_with_the_real_collector_only_cycles_among_frozen_objects_wait() -> None:
    policy = GcPolicy(ManualClock(), min_interval=0.0)
    policy.install()
    try:
        class Node:
            other: Any = None

        alone, first, second = Node(), Node(), Node()
        first.other, second.other = second, first  # a reference cycle
        freed: list[str] = []
        watch = [weakref.ref(alone, lambda _: freed.append("alone")),
                 weakref.ref(first, lambda _: freed.append("cycle"))]
        gc.collect()  # all three are alive: they survive and are frozen
        assert gc.get_freeze_count() > 0
        del alone
        assert freed == ["alone"]  # reference counting frees frozen objects as before
        del first, second
        gc.collect()
        assert freed == ["alone"]  # the cycle is frozen: full collections skip it
        policy.reclaim()
        assert freed == ["alone", "cycle"]
        assert policy.status()["reclaims"] == 1 and watch
    finally:
        policy.uninstall()
    assert gc.get_freeze_count() == 0
