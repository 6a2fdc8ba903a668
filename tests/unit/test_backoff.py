"""Reconnect backoff: crate-default intervals, ±50 % jitter, every delay capped at 60 s, reset."""

from __future__ import annotations

import random

import pytest

from gateway.backoff import ExponentialBackoff


def _intervals(n: int) -> list[float]:
    expected, interval = [], 0.5
    for _ in range(n):
        expected.append(interval)
        interval = min(interval * 1.5, 60.0)
    return expected


def test_interval_grows_by_one_and_a_half_up_to_sixty_seconds() -> None:
    backoff = ExponentialBackoff()
    seen = []
    for _ in range(20):
        seen.append(backoff.current_interval)
        backoff.next_delay(random.Random(1))
    assert seen == pytest.approx(_intervals(20))
    assert seen[0] == 0.5 and seen[1] == 0.75 and seen[-1] == 60.0


@pytest.mark.parametrize("step", [0, 1, 5, 9])
def test_delays_stay_within_half_an_interval_and_cover_the_range(step: int) -> None:
    rng = random.Random(7)
    interval = _intervals(step + 1)[step]
    draws = []
    for _ in range(2000):
        backoff = ExponentialBackoff()
        for _ in range(step):
            backoff.next_delay(rng)
        draws.append(backoff.next_delay(rng))
    assert min(draws) >= interval * 0.5
    assert max(draws) <= interval * 1.5
    # jitter really spans the ±50 % band (not a constant)
    assert min(draws) < interval * 0.55 and max(draws) > interval * 1.45


def test_capped_delay_never_exceeds_sixty_seconds() -> None:
    rng = random.Random(3)
    backoff = ExponentialBackoff()
    delays = [backoff.next_delay(rng) for _ in range(500)]
    assert max(delays) <= 60.0
    late = delays[30:]
    assert min(late) >= 30.0
    assert min(late) < 31.0 and max(late) == 60.0, "jitter still spans the lower half"


def test_reset_starts_over() -> None:
    rng = random.Random(5)
    backoff = ExponentialBackoff()
    for _ in range(10):
        backoff.next_delay(rng)
    backoff.reset()
    assert backoff.current_interval == 0.5
    assert 0.25 <= backoff.next_delay(rng) <= 0.75


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        ExponentialBackoff(initial_interval=0)
    with pytest.raises(ValueError):
        ExponentialBackoff(randomization_factor=1.5)
