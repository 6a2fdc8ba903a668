"""The sliding anti-replay window: edges, and agreement with a reference model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.wg.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW
from gateway.wg.replay import ReplayWindow


class ReferenceWindow:
    """Obviously-correct model: a set of everything seen and the greatest counter."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.greatest = -1

    def accept(self, counter: int) -> bool:
        if counter >= REJECT_AFTER_MESSAGES or counter < 0 or counter in self.seen:
            return False
        if counter <= self.greatest and self.greatest - counter >= REPLAY_WINDOW:
            return False
        self.seen.add(counter)
        self.greatest = max(self.greatest, counter)
        return True


def test_in_order_and_duplicates() -> None:
    w = ReplayWindow()
    assert all(w.accept(i) for i in range(200))
    assert not w.accept(199)
    assert not w.accept(0)
    assert w.greatest == 199


def test_out_of_order_within_window() -> None:
    w = ReplayWindow()
    assert w.accept(100)
    assert w.accept(5)
    assert w.accept(99)
    assert not w.accept(5)
    assert w.accept(101)


def test_too_old_edge() -> None:
    w = ReplayWindow()
    top = 10_000
    assert w.accept(top)
    assert not w.accept(top - REPLAY_WINDOW)
    assert w.accept(top - REPLAY_WINDOW + 1)
    assert not w.accept(top - REPLAY_WINDOW + 1)


def test_far_ahead_jump_clears_old_marks() -> None:
    w = ReplayWindow()
    for i in range(64):
        assert w.accept(i)
    jump = 64 + 40 * 64  # more than the whole ring ahead
    assert w.accept(jump)
    assert w.accept(jump - 1)  # never seen, in window: marks from block 0 must not leak
    assert not w.accept(63)  # too old now
    # A counter that maps to the same ring slot as an old one is still accepted.
    assert w.accept(jump - 32 * 64 + 65)


def test_window_slide_keeps_recent_marks() -> None:
    w = ReplayWindow()
    for i in range(0, 3000, 2):
        assert w.accept(i)
    for i in range(3000 - REPLAY_WINDOW + 2, 3000, 2):
        assert not w.accept(i)  # seen
    assert w.accept(2999)  # odd ones were never seen
    assert not w.accept(1)  # slid out


def test_reject_limit() -> None:
    w = ReplayWindow()
    assert not w.accept(REJECT_AFTER_MESSAGES)
    assert w.accept(REJECT_AFTER_MESSAGES - 1)
    assert not w.accept(REJECT_AFTER_MESSAGES - 1)


counters = st.one_of(
    st.integers(min_value=0, max_value=5000),
    st.integers(min_value=REJECT_AFTER_MESSAGES - 3000, max_value=REJECT_AFTER_MESSAGES + 2),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(counters, st.integers(0, 300)), max_size=300))
def test_matches_reference_model(sequence: list[int]) -> None:
    real, model = ReplayWindow(), ReferenceWindow()
    for counter in sequence:
        assert real.accept(counter) == model.accept(counter), counter


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 100_000), st.lists(st.integers(-2500, 2500), max_size=200))
def test_matches_reference_model_around_a_moving_point(base: int, deltas: list[int]) -> None:
    real, model = ReplayWindow(), ReferenceWindow()
    point = base
    for delta in deltas:
        point = max(0, point + delta // 3)
        counter = max(0, point + delta)
        assert real.accept(counter) == model.accept(counter), counter
