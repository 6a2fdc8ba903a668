"""The timer slack rule shared by the Timer thread and the Node core."""

from __future__ import annotations

import random

import pytest

from gateway.slack import MAX_SLACK, SLACK_FRACTION, fire_at


def _on_grid(value: float, step: float) -> bool:
    return abs(value / step - round(value / step)) < 1e-6


@pytest.mark.parametrize("lead", [0.0, -1.0])
def test_due_deadlines_get_no_slack(lead: float) -> None:
    now = 1000.0123
    assert fire_at(now + lead, now) == now + lead


def test_a_near_deadline_moves_by_less_than_a_millisecond() -> None:
    rng = random.Random(6)
    for _ in range(2000):
        now = rng.uniform(0, 1e6)
        deadline = now + rng.uniform(0.001, 0.09)
        assert deadline <= fire_at(deadline, now) < deadline + 0.001


def test_a_deadline_on_the_grid_stays_put_whatever_its_lead() -> None:
    # Owners re-arm with less and less lead; a snapped deadline must not wander.
    rng = random.Random(5)
    for _ in range(2000):
        now = rng.uniform(0, 1e6)
        snapped = fire_at(now + rng.uniform(10.0, 120.0), now)
        for later in (now + 1.0, snapped - 5.0, snapped - 0.5, snapped - 0.01):
            assert fire_at(snapped, later) == snapped


def test_a_far_deadline_fires_late_by_at_most_the_slack_and_on_the_100_ms_grid() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        now = rng.uniform(0, 1e6)
        deadline = now + rng.uniform(10.0, 120.0)
        at = fire_at(deadline, now)
        assert deadline <= at <= deadline + MAX_SLACK
        assert _on_grid(at, 0.1)


def test_the_slack_is_a_fraction_of_the_lead_below_the_cap() -> None:
    rng = random.Random(8)
    for _ in range(2000):
        now = rng.uniform(0, 1e6)
        lead = rng.uniform(1.0, 9.9)
        at = fire_at(now + lead, now)
        assert now + lead <= at <= now + lead + lead * SLACK_FRACTION
        assert _on_grid(at, 0.01)


def test_deadlines_of_unrelated_owners_land_on_shared_instants() -> None:
    # 5,000 idle connections' 60 s checks spread over one minute: one wake-up per 100 ms
    # serves them all, instead of one each.
    rng = random.Random(9)
    now = 5000.0
    instants = {fire_at(now + 60.0 + rng.uniform(0, 60.0), now) for _ in range(5000)}
    assert len(instants) <= 601
