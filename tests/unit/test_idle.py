from __future__ import annotations

from gateway.idle import IDLE_AFTER, IdleTracker


def test_idle_counts_from_nomination_and_data_ends_it() -> None:
    tracker = IdleTracker()
    assert tracker.poll_timeout() is None and not tracker.handle_timeout(1e9)  # no path yet
    tracker.start(100.0)
    tracker.start(105.0)  # a re-nomination does not restart the countdown
    assert tracker.poll_timeout() == 100.0 + IDLE_AFTER
    assert not tracker.handle_timeout(100.0 + IDLE_AFTER - 0.01)
    assert tracker.handle_timeout(100.0 + IDLE_AFTER)
    assert tracker.idle and tracker.poll_timeout() is None
    assert not tracker.handle_timeout(200.0), "reported once"
    assert tracker.note_data(201.0) and not tracker.idle
    assert not tracker.note_data(202.0), "only the transition is reported"
    assert tracker.poll_timeout() == 202.0 + IDLE_AFTER
