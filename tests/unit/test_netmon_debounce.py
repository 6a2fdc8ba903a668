"""The network monitor's debounce, driven by a manual clock."""

from __future__ import annotations

from actors.netmon import Debouncer
from tests.support.clock import ManualClock


def test_nothing_is_due_without_events(clock: ManualClock) -> None:
    debouncer = Debouncer(2.0)
    clock.tick(100)
    assert not debouncer.poll(clock.monotonic())
    assert debouncer.deadline is None


def test_due_once_after_a_quiet_period(clock: ManualClock) -> None:
    debouncer = Debouncer(2.0)
    debouncer.note(clock.monotonic())
    clock.tick(1.999)
    assert not debouncer.poll(clock.monotonic())
    clock.tick(0.001)
    assert debouncer.poll(clock.monotonic())
    assert not debouncer.poll(clock.monotonic())
    clock.tick(10)
    assert not debouncer.poll(clock.monotonic())


def test_a_burst_is_one_call_timed_from_its_last_event(clock: ManualClock) -> None:
    debouncer = Debouncer(2.0)
    start = clock.monotonic()
    for _ in range(5):
        debouncer.note(clock.monotonic())
        clock.tick(1.5)
        assert not debouncer.poll(clock.monotonic())
    assert debouncer.deadline == start + 4 * 1.5 + 2.0
    clock.skip_to(start + 4 * 1.5 + 2.0)
    assert debouncer.poll(clock.monotonic())
    assert debouncer.deadline is None
