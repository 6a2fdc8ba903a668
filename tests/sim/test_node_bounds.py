"""The node does not index or bind channels for remote candidates its agent refused:
otherwise the per-connection cap on candidates would not bound the node's tables."""

from __future__ import annotations

from gateway.ice.agent import MAX_REMOTE_CANDIDATES
from gateway.ice.candidate import Candidate
from tests.sim.test_node_sim import CLIENT_ID, Sim


def test_remote_candidates_beyond_the_cap_are_neither_indexed_nor_bound() -> None:
    sim = Sim()
    sim.add_relay()
    sim.authorize(signal=False)
    extra = 30
    lines = [
        Candidate.relay((f"10.9.{n // 250}.{n % 250}", 3000), "theirs").to_sdp()
        for n in range(MAX_REMOTE_CANDIDATES + extra)
    ]
    sim.node.add_remote_candidates(CLIENT_ID, lines, sim.now)
    assert sim.node.counters["remote_candidates_over_limit"] == extra
    (allocation,) = sim.node._allocations.values()
    assert len(allocation._channel_by_peer) <= MAX_REMOTE_CANDIDATES
    assert len(sim.node._by_remote) <= MAX_REMOTE_CANDIDATES
