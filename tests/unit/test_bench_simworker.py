"""The scale bench's worker IPC: routing of the gateway's answers, messages over a real
socket pair, and the trickle schedule that makes a stalled client loop visible."""

from __future__ import annotations

import socket
from multiprocessing.connection import Connection

import pytest

from bench.simclient import TrickleSchedule, trickles
from bench.simworker import ClientReady, GatewayAnswer, Push, Router, Stats


def _authorize(ref: str, client_id: str) -> Push:
    return Push("authorize_flow", {"ref": ref, "client": {"id": client_id}, "flow_id": "f"})


def test_router_sends_each_answer_to_the_worker_that_owns_it() -> None:
    router = Router()
    router.note_push(0, _authorize("bench.1.aa", "c1"))
    router.note_push(1, _authorize("bench.7.bb", "c7"))
    router.note_push(1, Push("ice_candidates", {"client_id": "c8", "candidates": []}))
    assert router.route("flow_authorized", {"ref": "bench.7.bb"}) == [1]
    assert router.route("flow_authorized", {"ref": "bench.1.aa"}) == [0]
    assert router.route("flow_authorized", {"ref": "nobody"}) == []
    assert router.route("flow_authorized", {}) == []
    both = {"client_ids": ["c7", "c1", "c8", "unknown"], "candidates": ["x"]}
    assert router.route("broadcast_ice_candidates", both) == [0, 1]
    assert router.route("broadcast_ice_candidates", {"client_ids": ["c8"]}) == [1]
    assert router.route("broadcast_ice_candidates", {"client_ids": ["unknown"]}) == []
    assert router.route("connection_ready", {"ref": "bench.1.aa"}) == []


def test_messages_cross_a_socket_pair_intact() -> None:
    a, b = socket.socketpair()
    left, right = Connection(a.detach()), Connection(b.detach())
    try:
        stats = Stats(seq=3, worker=1, at=12.5, clients=10, ready=9, failed=1, idle=8,
                      trickling=1, trickle_due=4, trickle_sent=3, trickle_unsent=1,
                      trickle_late=0, trickle_missed=1, max_lag_s=0.02, late_timers=0,
                      stuck_deadlines=2, errors=0)
        sent = [_authorize("r", "c"), ClientReady(4, 1.0, 1.25), stats,
                GatewayAnswer("flow_authorized", {"ref": "r"})]
        for msg in sent:
            left.send(msg)
        assert [right.recv() for _ in sent] == sent
    finally:
        left.close()
        right.close()


def test_trickles_picks_exactly_the_share_asked_for() -> None:
    assert sum(trickles(i, 10) for i in range(1000)) == 100
    assert [i for i in range(30) if trickles(i, 10)] == [9, 19, 29]
    assert all(trickles(i, 100) for i in range(50))
    assert not any(trickles(i, 0) for i in range(50))


def test_trickle_due_comes_from_the_clock_and_a_late_loop_skips_slots() -> None:
    schedule = TrickleSchedule()
    schedule.start([(0, 100.0), (1, 105.0)], 10.0, now=100.0)
    assert schedule.due(99.0) == 0
    assert schedule.due(100.0) == 1
    assert schedule.due(125.0) == 3 + 3  # slot 0: 100, 110, 120; slot 1: 105, 115, 125
    assert schedule.take(100.0) == [0]
    assert schedule.next_time() == 105.0
    # The loop stalls until 131: each slot sends once, late, and skips the two slots it
    # missed meanwhile (slot 0: 120, 130; slot 1: 115, 125), so due = sent + missed.
    assert sorted(schedule.take(131.0)) == [0, 1]
    assert schedule.missed == 4
    assert schedule.late == 2
    assert schedule.due(131.0) == 1 + 2 + schedule.missed
    assert schedule.next_time() == 135.0
    assert schedule.take(134.9) == []
    # Stopping keeps what was due; a new schedule adds to it.
    schedule.stop(131.0)
    assert schedule.due(1000.0) == 7
    schedule.start([(5, 200.0)], 10.0, now=200.0)
    assert schedule.due(200.0) == 7 + 1
    with pytest.raises(ValueError):
        schedule.start([], 0.0, now=0.0)
