"""IceAgent against a hand-driven peer built from the STUN codec (injected clock)."""

from __future__ import annotations

import random

import pytest

from gateway.ice.agent import (
    DEFAULT_TIMINGS,
    Disconnected,
    IceAgent,
    Nominated,
    PairState,
    PeerReflexive,
    pair_priority,
)
from gateway.ice.candidate import Candidate, IceCredentials, prflx_priority
from gateway.stun.message import (
    Attr,
    MessageClass,
    Method,
    StunMessage,
    encode,
    new_request,
    new_response,
    parse,
    short_term_key,
    verify_integrity,
)
from gateway.types import Address, Transmit
from tests.support.clock import ManualClock

GW = IceCredentials("gwuf", "gatewaypassword0123456")
CL = IceCredentials("cluf", "clientpassword01234567")
GW_HOST: Address = ("10.0.0.1", 50000)
GW_RELAY: Address = ("192.0.2.1", 60000)
CL_HOST: Address = ("10.0.0.2", 40000)
CL_OTHER: Address = ("10.0.0.3", 40001)

#: Send times of the checks of a never-answered pair (str0m's check schedule) and its failure time.
# max_retransmits (8) unanswered checks, then one more RTO: str0m's count.
CHECK_TIMES = [0.0, 0.25, 0.75, 1.75, 3.25, 4.75, 6.25, 7.75]
FAIL_AT = 9.25


def _agent(clock: ManualClock, *, controlling: bool = False, **kwargs: object) -> IceAgent:
    local, remote = (CL, GW) if controlling else (GW, CL)
    kwargs.setdefault("remote", remote)
    return IceAgent(controlling=controlling, local=local, rng=random.Random(5),  # type: ignore[arg-type]
                    now=clock.monotonic(), **kwargs)


def _drain(agent: IceAgent) -> list[Transmit]:
    out = []
    while (tx := agent.poll_transmit()) is not None:
        out.append(tx)
    return out


def _events(agent: IceAgent) -> list[object]:
    out = []
    while (ev := agent.poll_event()) is not None:
        out.append(ev)
    return out


def _run_timers(agent: IceAgent, clock: ManualClock, until: float) -> list[tuple[float, Transmit]]:
    """Fire every deadline up to ``until`` (relative to now); collect (time, transmit)."""
    end = clock.monotonic() + until
    sent: list[tuple[float, Transmit]] = []
    while (deadline := agent.poll_timeout()) is not None and deadline <= end:
        clock.skip_to(deadline)
        now = clock.monotonic()
        agent.handle_timeout(now)
        after = agent.poll_timeout()
        assert after is None or after > now, "deadline did not move forward (busy loop)"
        sent += [(now, tx) for tx in _drain(agent)]
    clock.skip_to(end)
    return sent


def _client_check(*, use_candidate: bool = False, controlled: bool = False, pwd: str = GW.pwd,
                  username: str = f"{GW.ufrag}:{CL.ufrag}", tie: int = 1,
                  priority: int | None = 1853824767) -> tuple[StunMessage, bytes]:
    req = new_request(Method.BINDING, random.Random()).add_str(Attr.USERNAME, username)
    if priority is not None:
        req.add_u32(Attr.PRIORITY, priority)
    req.add_u64(Attr.ICE_CONTROLLED if controlled else Attr.ICE_CONTROLLING, tie)
    if use_candidate:
        req.add(Attr.USE_CANDIDATE, b"")
    raw = encode(req, integrity_key=short_term_key(pwd), fingerprint=True)
    return parse(raw), raw


def _answer(tx: Transmit, *, pwd: str = CL.pwd, error: int | None = None) -> tuple[StunMessage,
                                                                                   bytes]:
    request = parse(tx.payload)
    if error is None:
        resp = new_response(request, MessageClass.SUCCESS)
        resp.add_xor_address(Attr.XOR_MAPPED_ADDRESS, tx.src or ("0.0.0.0", 0))
    else:
        resp = new_response(request, MessageClass.ERROR).add_error_code(error, "nope")
    raw = encode(resp, integrity_key=short_term_key(pwd), fingerprint=True)
    return parse(raw), raw


def _deliver_answer(agent: IceAgent, tx: Transmit, clock: ManualClock, **kw: object) -> None:
    msg, raw = _answer(tx, **kw)  # type: ignore[arg-type]
    assert agent.accepts(msg, raw)
    assert tx.src is not None
    agent.handle_stun(msg, raw, tx.dst, tx.src, clock.monotonic())


def _connected_gateway(clock: ManualClock) -> tuple[IceAgent, Transmit]:
    """Controlled agent with one host pair, nominated by the client; returns its last check."""
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    agent.add_remote_candidate(Candidate.host(CL_HOST), clock.monotonic())
    agent.handle_timeout(clock.monotonic())
    (check,) = _drain(agent)
    msg, raw = _client_check(use_candidate=True)
    agent.handle_stun(msg, raw, CL_HOST, GW_HOST, clock.monotonic())
    _drain(agent)
    _deliver_answer(agent, check, clock)
    assert agent.state == "connected"
    return agent, check


# ---- what goes on the wire ---------------------------------------------------------------


def test_check_attributes_of_the_controlled_gateway(clock: ManualClock) -> None:
    agent = _agent(clock)
    host = Candidate.host(GW_HOST)
    assert agent.add_local_candidate(host)
    assert agent.add_remote_candidate(Candidate.host(CL_HOST), clock.monotonic())
    assert agent.poll_timeout() == clock.monotonic()
    agent.handle_timeout(clock.monotonic())
    (tx,) = _drain(agent)
    assert (tx.src, tx.dst) == (GW_HOST, CL_HOST)
    msg = parse(tx.payload)  # parse verifies FINGERPRINT
    assert msg.get(Attr.FINGERPRINT) is None and tx.payload[-8:-6] == b"\x80\x28"
    assert (msg.method, msg.cls) == (Method.BINDING, MessageClass.REQUEST)
    assert msg.username() == f"{CL.ufrag}:{GW.ufrag}"
    assert msg.priority() == prflx_priority(host.priority)
    assert msg.ice_controlled() is not None and msg.ice_controlling() is None
    assert not msg.use_candidate()
    assert verify_integrity(tx.payload, short_term_key(CL.pwd))
    assert not verify_integrity(tx.payload, short_term_key(GW.pwd))


def test_answers_checks_with_mapped_address_integrity_and_fingerprint(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    msg, raw = _client_check()
    assert agent.accepts(msg, raw)
    agent.handle_stun(msg, raw, CL_HOST, GW_HOST, clock.monotonic())
    (tx,) = _drain(agent)
    assert (tx.src, tx.dst) == (GW_HOST, CL_HOST)
    resp = parse(tx.payload)
    assert resp.cls == MessageClass.SUCCESS and resp.transaction_id == msg.transaction_id
    assert resp.xor_address(Attr.XOR_MAPPED_ADDRESS) == CL_HOST
    assert verify_integrity(tx.payload, short_term_key(GW.pwd))
    assert tx.payload[-8:-6] == b"\x80\x28"
    assert agent.accepts_from(CL_HOST)


def test_relayed_local_candidate_sends_from_the_relayed_address(clock: ManualClock) -> None:
    agent = _agent(clock)
    relay = Candidate.relay(GW_RELAY, "relay-1")
    agent.add_local_candidate(relay)
    agent.add_remote_candidate(Candidate.host(CL_HOST), clock.monotonic())
    agent.handle_timeout(clock.monotonic())
    (tx,) = _drain(agent)
    assert tx.src == GW_RELAY
    msg, raw = _client_check(use_candidate=True)
    agent.handle_stun(msg, raw, CL_HOST, GW_RELAY, clock.monotonic())
    (response,) = _drain(agent)
    assert response.src == GW_RELAY
    _deliver_answer(agent, tx, clock)
    (event,) = [e for e in _events(agent) if isinstance(e, Nominated)]
    assert event.local.relay_id == "relay-1" and event.remote == CL_HOST


# ---- retransmissions, failure, consent --------------------------------------------------


def test_unanswered_checks_follow_the_schedule_then_the_pair_fails(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    start = clock.monotonic()
    agent.add_remote_candidate(Candidate.host(CL_HOST), start)
    sent = _run_timers(agent, clock, 30.0)
    assert [round(t - start, 3) for t, _ in sent] == CHECK_TIMES
    assert len({parse(tx.payload).transaction_id for _, tx in sent}) == len(CHECK_TIMES)
    assert agent.pair_states() == {(GW_HOST, CL_HOST): PairState.FAILED}
    assert agent.poll_timeout() is None
    assert _events(agent) == [Disconnected("all candidate pairs failed")]
    assert agent.state == "disconnected"


def test_failure_time_is_after_the_last_retransmit(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    start = clock.monotonic()
    agent.add_remote_candidate(Candidate.host(CL_HOST), start)
    _run_timers(agent, clock, FAIL_AT - 0.01)
    assert agent.pair_states()[(GW_HOST, CL_HOST)] is PairState.IN_PROGRESS
    assert agent.poll_timeout() == pytest.approx(start + FAIL_AT)
    _run_timers(agent, clock, 0.02)
    assert agent.pair_states()[(GW_HOST, CL_HOST)] is PairState.FAILED


def test_late_answer_to_an_earlier_retransmission_counts(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    agent.add_remote_candidate(Candidate.host(CL_HOST), clock.monotonic())
    sent = _run_timers(agent, clock, 1.0)
    assert len(sent) == 3
    _deliver_answer(agent, sent[0][1], clock)
    assert agent.pair_states()[(GW_HOST, CL_HOST)] is PairState.SUCCEEDED


def test_consent_rechecks_every_max_rto_and_retransmit_when_unanswered(
    clock: ManualClock,
) -> None:
    agent, _ = _connected_gateway(clock)
    start = clock.monotonic()
    for _ in range(20):  # 30 s of answered re-checks, one per 1.5 s
        sent = _run_timers(agent, clock, 1.5)
        assert len(sent) == 1
        _deliver_answer(agent, sent[0][1], clock)
    assert clock.monotonic() - start == pytest.approx(30.0)
    assert agent.state == "connected"
    assert _events(agent) == [Nominated(Candidate.host(GW_HOST), CL_HOST)]
    # Now the peer goes silent: retransmits speed up again, then the pair fails.
    silent_from = clock.monotonic()
    sent = _run_timers(agent, clock, 20.0)
    offsets = [round(t - silent_from, 3) for t, _ in sent]
    # The re-check is due 1.5 s after the last answered one, then the backoff restarts.
    assert offsets == [round(1.5 + t, 3) for t in CHECK_TIMES]
    assert agent.state == "disconnected"
    assert clock.monotonic() - silent_from == pytest.approx(20.0)
    (event,) = _events(agent)
    assert isinstance(event, Disconnected)


def test_idle_timings_are_slow(clock: ManualClock) -> None:
    agent, _ = _connected_gateway(clock)
    agent.set_idle(True, clock.monotonic())
    sent = _run_timers(agent, clock, 59.0)
    assert sent == []
    sent = _run_timers(agent, clock, 1.0 + 60.0 * 3 + 0.1)
    assert len(sent) == 4  # max_retransmits (4) unanswered checks, 60 s apart
    assert agent.state == "connected"
    _run_timers(agent, clock, 60.0)  # one more RTO: 300 s after the last answer
    assert agent.state == "disconnected"


def test_set_idle_false_restores_fast_rechecks(clock: ManualClock) -> None:
    agent, _ = _connected_gateway(clock)
    agent.set_idle(True, clock.monotonic())
    agent.set_idle(False, clock.monotonic())
    deadline = agent.poll_timeout()
    assert deadline is not None and deadline <= clock.monotonic() + DEFAULT_TIMINGS.max_rto


def test_keeps_answering_checks_while_alive(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    agent.add_remote_candidate(Candidate.host(CL_HOST), clock.monotonic())
    _run_timers(agent, clock, 60.0)
    assert agent.state == "disconnected"
    msg, raw = _client_check()
    agent.handle_stun(msg, raw, CL_HOST, GW_HOST, clock.monotonic())
    txs = _drain(agent)
    assert any(parse(tx.payload).cls == MessageClass.SUCCESS for tx in txs)
    # The request revived the failed pair (triggered check).
    assert agent.pair_states()[(GW_HOST, CL_HOST)] is PairState.WAITING


# ---- authentication and demultiplexing --------------------------------------------------


def test_requests_with_bad_credentials_are_not_accepted_and_are_counted(
    clock: ManualClock,
) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    for kwargs in (
        {"pwd": "wrongpassword012345678"},
        {"username": f"{GW.ufrag}:xxxx"},
        {"username": f"xxxx:{CL.ufrag}"},
        {"username": "nocolon"},
    ):
        msg, raw = _client_check(**kwargs)  # type: ignore[arg-type]
        assert not agent.accepts(msg, raw)
        agent.handle_stun(msg, raw, CL_HOST, GW_HOST, clock.monotonic())
    assert _drain(agent) == []
    assert agent.counters["request_unauthenticated"] == 4
    assert not agent.accepts_from(CL_HOST)


def test_responses_with_bad_integrity_are_dropped_and_counted(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    agent.add_remote_candidate(Candidate.host(CL_HOST), clock.monotonic())
    agent.handle_timeout(clock.monotonic())
    (tx,) = _drain(agent)
    msg, raw = _answer(tx, pwd="wrongpassword012345678")
    assert agent.accepts(msg, raw)  # the transaction is ours ...
    agent.handle_stun(msg, raw, CL_HOST, GW_HOST, clock.monotonic())
    assert agent.counters["response_bad_integrity"] == 1  # ... but it is forged
    assert agent.pair_states()[(GW_HOST, CL_HOST)] is PairState.IN_PROGRESS
    _deliver_answer(agent, tx, clock)  # the genuine answer still counts
    assert agent.pair_states()[(GW_HOST, CL_HOST)] is PairState.SUCCEEDED


def test_unknown_transactions_and_other_methods_are_not_accepted(clock: ManualClock) -> None:
    agent = _agent(clock)
    foreign = new_response(new_request(Method.BINDING, random.Random(9)), MessageClass.SUCCESS)
    raw = encode(foreign, integrity_key=short_term_key(CL.pwd))
    assert not agent.accepts(parse(raw), raw)
    alloc = encode(new_request(Method.ALLOCATE, random.Random(9)))
    assert not agent.accepts(parse(alloc), alloc)
    indication = StunMessage(Method.BINDING, MessageClass.INDICATION, b"\x01" * 12)
    raw = encode(indication)
    assert not agent.accepts(parse(raw), raw)
    agent.handle_stun(parse(raw), raw, CL_HOST, GW_HOST, clock.monotonic())
    agent.handle_stun(parse(alloc), alloc, CL_HOST, GW_HOST, clock.monotonic())
    assert agent.counters["indication"] == 1 and agent.counters["not_binding"] == 1
    assert _drain(agent) == []


def test_asymmetric_response_fails_the_pair(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    agent.add_remote_candidate(Candidate.host(CL_HOST), clock.monotonic())
    agent.handle_timeout(clock.monotonic())
    (tx,) = _drain(agent)
    msg, raw = _answer(tx)
    agent.handle_stun(msg, raw, CL_OTHER, GW_HOST, clock.monotonic())
    assert agent.counters["response_not_symmetric"] == 1
    assert agent.pair_states()[(GW_HOST, CL_HOST)] is PairState.FAILED


def test_error_response_fails_the_pair(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    agent.add_remote_candidate(Candidate.host(CL_HOST), clock.monotonic())
    agent.handle_timeout(clock.monotonic())
    (tx,) = _drain(agent)
    _deliver_answer(agent, tx, clock, error=400)
    assert agent.counters["error_response_400"] == 1
    assert agent.pair_states()[(GW_HOST, CL_HOST)] is PairState.FAILED
    assert agent.state == "disconnected"


def test_malformed_attribute_values_are_dropped_not_raised(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    req = new_request(Method.BINDING, random.Random(1)).add_str(Attr.USERNAME,
                                                               f"{GW.ufrag}:{CL.ufrag}")
    req.add(Attr.PRIORITY, b"\x01\x02")  # must be 4 bytes
    raw = encode(req, integrity_key=short_term_key(GW.pwd), fingerprint=True)
    msg = parse(raw)
    assert agent.accepts(msg, raw)
    agent.handle_stun(msg, raw, CL_OTHER, GW_HOST, clock.monotonic())
    assert agent.counters["malformed"] == 1


# ---- candidates, prflx, pairs ----------------------------------------------------------


def test_learns_peer_reflexive_remote_from_a_check(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    msg, raw = _client_check(priority=1853824767)
    agent.handle_stun(msg, raw, CL_OTHER, GW_HOST, clock.monotonic())
    assert _events(agent) == [PeerReflexive(CL_OTHER)]
    (prflx,) = agent.remote_candidates
    assert (prflx.kind, prflx.address, prflx.priority) == ("prflx", CL_OTHER, 1853824767)
    assert agent.pair_states() == {(GW_HOST, CL_OTHER): PairState.WAITING}
    # The signalled candidate for that address replaces the learned one.
    signalled = Candidate.parse(f"candidate:1 1 udp 1694498559 {CL_OTHER[0]} {CL_OTHER[1]} "
                                "typ srflx")
    assert agent.add_remote_candidate(signalled)
    assert agent.remote_candidates == [signalled]


def test_check_without_priority_cannot_create_a_prflx(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    msg, raw = _client_check(priority=None)
    agent.handle_stun(msg, raw, CL_OTHER, GW_HOST, clock.monotonic())
    assert len(_drain(agent)) == 1  # still answered
    assert agent.remote_candidates == []
    assert agent.counters["request_without_priority"] == 1


def test_duplicates_families_and_components(clock: ManualClock) -> None:
    agent = _agent(clock)
    assert agent.add_local_candidate(Candidate.host(GW_HOST))
    assert not agent.add_local_candidate(Candidate.host(GW_HOST))
    assert agent.add_local_candidate(Candidate.host(("2001:db8::1", 5)))
    assert agent.add_local_candidate(Candidate.srflx(("198.51.100.1", 9), GW_HOST))
    assert not agent.add_local_candidate(Candidate("prflx", GW_HOST, 1, "x"))
    assert agent.add_remote_candidate(Candidate.host(CL_HOST))
    assert not agent.add_remote_candidate(Candidate.host(CL_HOST))
    assert not agent.add_remote_candidate(Candidate("host", CL_OTHER, 1, "x", component=2))
    # srflx sends from its base: only host-v4 and host-v6 pair, each with its own family.
    assert list(agent.pair_states()) == [(GW_HOST, CL_HOST)]
    assert agent.add_remote_candidate(Candidate.host(("2001:db8::2", 6)))
    assert len(agent.pair_states()) == 2


def test_max_pairs_keeps_the_best(clock: ManualClock) -> None:
    agent = _agent(clock, max_pairs=3)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    for i in range(5):
        kind = "host" if i == 4 else "relay"
        c = Candidate(kind, (f"10.1.0.{i}", 1000), (126 if kind == "host" else 2) << 24 | i, "f")
        agent.add_remote_candidate(c, clock.monotonic())
    remotes = {remote for _, remote in agent.pair_states()}
    assert remotes == {("10.1.0.4", 1000), ("10.1.0.3", 1000), ("10.1.0.2", 1000)}
    assert agent.counters["pairs_pruned"] == 2


def test_remote_candidates_are_bounded_signalled_or_learned(clock: ManualClock) -> None:
    """A client signalling thousands of candidates costs a bounded table and no scan each."""
    agent = _agent(clock)  # MAX_REMOTE_CANDIDATES: 100
    agent.add_local_candidate(Candidate.host(GW_HOST))
    added = [agent.add_remote_candidate(Candidate.host((f"10.1.{i // 250}.{i % 250}", 1000)))
             for i in range(105)]
    assert added == [True] * 100 + [False] * 5
    assert getattr(agent, "remote_candidates_full", False) and len(agent.remote_candidates) == 100
    assert agent.counters["remote_candidates_full"] == 5
    # A verified check from a new address is still answered (and may carry WireGuard),
    # but no peer-reflexive candidate or pair is made for it.
    msg, raw = _client_check()
    agent.handle_stun(msg, raw, CL_OTHER, GW_HOST, clock.monotonic())
    assert len(_drain(agent)) == 1 and _events(agent) == []
    assert len(agent.remote_candidates) == 100 and agent.accepts_from(CL_OTHER)
    assert all(remote != CL_OTHER for _, remote in agent.pair_states())


def test_pair_priority_formula() -> None:
    g = Candidate.host(GW_HOST)
    d = Candidate.relay(GW_RELAY, "r")
    assert pair_priority(g, d) == (d.priority << 32) + 2 * g.priority + 1
    assert pair_priority(d, g) == (d.priority << 32) + 2 * g.priority


def test_pacing_spaces_out_first_checks(clock: ManualClock) -> None:
    agent = _agent(clock, pacing=0.05)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    start = clock.monotonic()
    for addr in (CL_HOST, CL_OTHER, ("10.0.0.4", 1)):
        agent.add_remote_candidate(Candidate.host(addr), start)
    sent = _run_timers(agent, clock, 0.2)
    firsts = {}
    for t, tx in sent:
        firsts.setdefault(tx.dst, t - start)
    assert sorted(round(t, 3) for t in firsts.values()) == [0.0, 0.05, 0.1]


def test_without_remote_credentials_answers_but_does_not_check(clock: ManualClock) -> None:
    agent = _agent(clock, remote=None)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    agent.add_remote_candidate(Candidate.host(CL_HOST), clock.monotonic())
    assert agent.poll_timeout() is None
    msg, raw = _client_check(username=f"{GW.ufrag}:anything")
    assert agent.accepts(msg, raw)
    agent.handle_stun(msg, raw, CL_HOST, GW_HOST, clock.monotonic())
    assert len(_drain(agent)) == 1
    agent.set_remote_credentials(CL)
    assert agent.poll_timeout() is not None
    agent.handle_timeout(clock.monotonic())
    (check,) = _drain(agent)
    assert parse(check.payload).username() == f"{CL.ufrag}:{GW.ufrag}"


# ---- nomination, role conflicts, invalidation -----------------------------------------


def test_use_candidate_before_our_check_succeeds_nominates_on_success(
    clock: ManualClock,
) -> None:
    agent, _ = _connected_gateway(clock)
    (event,) = _events(agent)
    assert event == Nominated(Candidate.host(GW_HOST), CL_HOST)
    assert agent.selected_pair() == (Candidate.host(GW_HOST), CL_HOST)
    assert agent.accepts_from(CL_HOST)


def test_use_candidate_after_our_check_succeeded_nominates_at_once(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    agent.add_remote_candidate(Candidate.host(CL_HOST), clock.monotonic())
    agent.handle_timeout(clock.monotonic())
    (check,) = _drain(agent)
    _deliver_answer(agent, check, clock)
    assert agent.state == "checking" and _events(agent) == []  # succeeded, not nominated
    msg, raw = _client_check(use_candidate=True)
    agent.handle_stun(msg, raw, CL_HOST, GW_HOST, clock.monotonic())
    assert _events(agent) == [Nominated(Candidate.host(GW_HOST), CL_HOST)]


def test_aggressive_nomination_first_wins_higher_priority_switches(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    agent.add_local_candidate(Candidate.relay(GW_RELAY, "r"))
    agent.add_remote_candidate(Candidate.host(CL_HOST), clock.monotonic())
    agent.handle_timeout(clock.monotonic())
    checks = {tx.src: tx for tx in _drain(agent)}
    # The relayed pair completes first with USE-CANDIDATE: it wins for now.
    msg, raw = _client_check(use_candidate=True)
    agent.handle_stun(msg, raw, CL_HOST, GW_RELAY, clock.monotonic())
    _deliver_answer(agent, checks[GW_RELAY], clock)
    assert [e.local.kind for e in _events(agent) if isinstance(e, Nominated)] == ["relay"]
    # Then the better host pair is nominated: switch.
    msg, raw = _client_check(use_candidate=True)
    agent.handle_stun(msg, raw, CL_HOST, GW_HOST, clock.monotonic())
    _deliver_answer(agent, checks[GW_HOST], clock)
    assert [e.local.kind for e in _events(agent) if isinstance(e, Nominated)] == ["host"]
    # A renewed nomination of the worse pair does not switch back.
    msg, raw = _client_check(use_candidate=True)
    agent.handle_stun(msg, raw, CL_HOST, GW_RELAY, clock.monotonic())
    assert _events(agent) == []
    assert agent.selected_pair() == (Candidate.host(GW_HOST), CL_HOST)


def test_controlling_side_nominates_with_use_candidate(clock: ManualClock) -> None:
    agent = _agent(clock, controlling=True)
    agent.add_local_candidate(Candidate.host(CL_HOST))
    agent.add_remote_candidate(Candidate.host(GW_HOST), clock.monotonic())
    agent.handle_timeout(clock.monotonic())
    (check,) = _drain(agent)
    msg = parse(check.payload)
    assert msg.ice_controlling() is not None and not msg.use_candidate()
    assert msg.username() == f"{GW.ufrag}:{CL.ufrag}"
    _deliver_answer(agent, check, clock, pwd=GW.pwd)
    # Best pair succeeded: nominate right away with a USE-CANDIDATE re-check.
    assert agent.poll_timeout() == clock.monotonic()
    agent.handle_timeout(clock.monotonic())
    (nominate,) = _drain(agent)
    assert parse(nominate.payload).use_candidate()
    assert agent.state == "checking"
    _deliver_answer(agent, nominate, clock, pwd=GW.pwd)
    assert _events(agent) == [Nominated(Candidate.host(CL_HOST), GW_HOST)]


def test_controlling_side_waits_briefly_for_better_pairs(clock: ManualClock) -> None:
    agent = _agent(clock, controlling=True)
    agent.add_local_candidate(Candidate.host(CL_HOST))
    agent.add_local_candidate(Candidate.relay(GW_RELAY, "r"))
    agent.add_remote_candidate(Candidate.host(GW_HOST), clock.monotonic())
    agent.handle_timeout(clock.monotonic())
    checks = {tx.src: tx for tx in _drain(agent)}
    _deliver_answer(agent, checks[GW_RELAY], clock, pwd=GW.pwd)  # only the worse pair works
    sent = _run_timers(agent, clock, 0.49)
    assert not any(parse(tx.payload).use_candidate() for _, tx in sent)
    sent = _run_timers(agent, clock, 0.02)
    assert [tx.src for _, tx in sent if parse(tx.payload).use_candidate()] == [GW_RELAY]


def test_role_conflict_when_both_claim_controlled(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    tie = agent._tie_breaker
    # Their tie-breaker is larger: we keep our role and answer 487.
    msg, raw = _client_check(controlled=True, tie=tie + 1)
    agent.handle_stun(msg, raw, CL_HOST, GW_HOST, clock.monotonic())
    (tx,) = _drain(agent)
    resp = parse(tx.payload)
    assert resp.cls == MessageClass.ERROR and resp.error_code() == (487, "Role Conflict")
    assert verify_integrity(tx.payload, short_term_key(GW.pwd))
    assert not agent.controlling
    # Ours is larger: we switch to controlling and answer normally.
    msg, raw = _client_check(controlled=True, tie=tie - 1)
    agent.handle_stun(msg, raw, CL_HOST, GW_HOST, clock.monotonic())
    (tx,) = _drain(agent)
    assert parse(tx.payload).cls == MessageClass.SUCCESS
    assert agent.controlling
    assert agent.counters["role_conflict"] == 2


def test_role_conflict_when_both_claim_controlling(clock: ManualClock) -> None:
    agent = _agent(clock, controlling=True)
    agent.add_local_candidate(Candidate.host(CL_HOST))
    tie = agent._tie_breaker
    req = new_request(Method.BINDING, random.Random(2)).add_str(Attr.USERNAME,
                                                               f"{CL.ufrag}:{GW.ufrag}")
    req.add_u32(Attr.PRIORITY, 1).add_u64(Attr.ICE_CONTROLLING, tie - 1)
    raw = encode(req, integrity_key=short_term_key(CL.pwd), fingerprint=True)
    agent.handle_stun(parse(raw), raw, GW_HOST, CL_HOST, clock.monotonic())
    assert parse(_drain(agent)[0].payload).error_code() == (487, "Role Conflict")
    assert agent.controlling


def test_487_response_switches_role_and_retries(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    agent.add_remote_candidate(Candidate.host(CL_HOST), clock.monotonic())
    agent.handle_timeout(clock.monotonic())
    (check,) = _drain(agent)
    _deliver_answer(agent, check, clock, error=487)
    assert agent.controlling
    assert agent.poll_timeout() == clock.monotonic()
    agent.handle_timeout(clock.monotonic())
    (retry,) = _drain(agent)
    assert parse(retry.payload).ice_controlling() is not None
    assert agent.pair_states()[(GW_HOST, CL_HOST)] is PairState.IN_PROGRESS


def test_invalidating_the_nominated_remote_disconnects(clock: ManualClock) -> None:
    agent, _ = _connected_gateway(clock)
    _events(agent)
    agent.invalidate_remote_candidate(Candidate.host(CL_HOST), clock.monotonic())
    assert agent.state == "disconnected"
    assert _events(agent) == [Disconnected("the selected candidate pair was removed")]
    assert agent.selected_pair() is None
    assert not agent.accepts_from(CL_HOST)
    assert agent.poll_timeout() is None


def test_invalidating_a_relay_falls_back_to_another_working_pair(clock: ManualClock) -> None:
    agent = _agent(clock)
    agent.add_local_candidate(Candidate.host(GW_HOST))
    agent.add_local_candidate(Candidate.relay(GW_RELAY, "r"))
    agent.add_remote_candidate(Candidate.host(CL_OTHER), clock.monotonic())
    agent.handle_timeout(clock.monotonic())
    checks = {tx.src: tx for tx in _drain(agent)}
    for local in (GW_HOST, GW_RELAY):
        _deliver_answer(agent, checks[local], clock)
    msg, raw = _client_check(use_candidate=True)
    agent.handle_stun(msg, raw, CL_OTHER, GW_RELAY, clock.monotonic())
    assert agent.selected_pair() == (Candidate.relay(GW_RELAY, "r"), CL_OTHER)
    _events(agent)
    agent.invalidate_local_candidate(GW_RELAY, clock.monotonic())
    # The host pair still answers: use it until the client nominates something.
    assert _events(agent) == [Nominated(Candidate.host(GW_HOST), CL_OTHER)]
    assert agent.state == "connected"
