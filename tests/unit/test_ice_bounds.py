"""Remote candidates per connection are bounded, signalled and peer-reflexive alike."""

from __future__ import annotations

import random

from gateway.ice.agent import MAX_REMOTE_CANDIDATES, IceAgent
from gateway.ice.candidate import Candidate, IceCredentials
from gateway.stun.message import Attr, Method, encode, new_request, parse, short_term_key
from tests.support.clock import ManualClock

GW = IceCredentials("gwuf", "gatewaypassword0123456")
CL = IceCredentials("cluf", "clientpassword01234567")
GW_HOST = ("10.0.0.1", 50000)


def _agent(clock: ManualClock) -> IceAgent:
    agent = IceAgent(controlling=False, local=GW, remote=CL, rng=random.Random(5),
                     now=clock.monotonic())
    agent.add_local_candidate(Candidate.host(GW_HOST))
    return agent


def test_signalled_remote_candidates_are_capped() -> None:
    clock = ManualClock()
    agent = _agent(clock)
    for n in range(MAX_REMOTE_CANDIDATES + 50):
        added = agent.add_remote_candidate(Candidate.host((f"10.1.{n // 250}.{n % 250}", 4000)))
        assert added == (n < MAX_REMOTE_CANDIDATES)
    assert len(agent.remote_candidates) == MAX_REMOTE_CANDIDATES
    assert agent.counters["remote_candidates_full"] == 50


def test_peer_reflexive_candidates_are_capped() -> None:
    clock = ManualClock()
    agent = _agent(clock)
    for n in range(MAX_REMOTE_CANDIDATES + 20):
        req = new_request(Method.BINDING, random.Random(n))
        req.add_str(Attr.USERNAME, f"{GW.ufrag}:{CL.ufrag}").add_u32(Attr.PRIORITY, 1000 + n)
        req.add_u64(Attr.ICE_CONTROLLING, 1)
        raw = encode(req, integrity_key=short_term_key(GW.pwd), fingerprint=True)
        agent.handle_stun(parse(raw), raw, (f"10.2.{n // 250}.{n % 250}", 4000), GW_HOST,
                          clock.monotonic())
    assert len(agent.remote_candidates) == MAX_REMOTE_CANDIDATES
    assert agent.counters["remote_candidates_full"] == 20
