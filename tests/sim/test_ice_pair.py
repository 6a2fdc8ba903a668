"""Our controlling agent against our controlled agent on a simulated network."""

from __future__ import annotations

import random

import pytest

from gateway.ice.agent import Disconnected, IceAgent, Nominated
from gateway.ice.candidate import Candidate, IceCredentials
from tests.support.clock import ManualClock
from tests.support.ice_sim import SimNet, SimNode

CLIENT_HOST = ("10.0.1.2", 40000)
GATEWAY_HOST = ("10.0.2.2", 50000)
RELAY_IP = "192.0.2.10"
CLIENT_RELAYED = (RELAY_IP, 61000)
GATEWAY_RELAYED = (RELAY_IP, 62000)


def _setup(
    clock: ManualClock, *, seed: int = 7, latency: float = 0.01, loss: float = 0.0,
    relays: bool = True,
) -> tuple[SimNet, SimNode, SimNode]:
    rng = random.Random(seed)
    client_creds = IceCredentials.random(rng)
    gateway_creds = IceCredentials.random(rng)
    now = clock.monotonic()
    client = IceAgent(controlling=True, local=client_creds, remote=gateway_creds, rng=rng,
                      now=now)
    gateway = IceAgent(controlling=False, local=gateway_creds, remote=client_creds, rng=rng,
                       now=now)
    net = SimNet(clock, seed=seed, latency=latency, loss=loss)
    c = net.attach("client", client, CLIENT_HOST)
    g = net.attach("gateway", gateway, GATEWAY_HOST)
    client_cands = [Candidate.host(CLIENT_HOST)]
    gateway_cands = [Candidate.host(GATEWAY_HOST)]
    if relays:
        net.allocate("client", RELAY_IP, CLIENT_RELAYED)
        net.allocate("gateway", RELAY_IP, GATEWAY_RELAYED)
        client_cands.append(Candidate.relay(CLIENT_RELAYED, "relay-a"))
        gateway_cands.append(Candidate.relay(GATEWAY_RELAYED, "relay-a"))
    for cand in client_cands:
        assert client.add_local_candidate(cand)
    for cand in gateway_cands:
        assert gateway.add_local_candidate(cand)
    # Trickle through a "portal" that is instantaneous; the SDP strings round-trip.
    for cand in client_cands:
        assert gateway.add_remote_candidate(Candidate.parse(cand.to_sdp()), now)
    for cand in gateway_cands:
        assert client.add_remote_candidate(Candidate.parse(cand.to_sdp()), now)
    return net, c, g


def _nominated(node: SimNode) -> list[Nominated]:
    return [e for e in node.events if isinstance(e, Nominated)]


def _both_connected(c: SimNode, g: SimNode) -> bool:
    return bool(_nominated(c)) and bool(_nominated(g))


def _selected_remote(node: SimNode) -> tuple[str, int] | None:
    pair = node.agent.selected_pair()
    return None if pair is None else pair[1]


def _consistent(c: SimNode, g: SimNode) -> bool:
    """Both ends use the same path: each one's remote is the other's local base."""
    cp, gp = c.agent.selected_pair(), g.agent.selected_pair()
    assert cp is not None and gp is not None
    return cp[1] == gp[0].base and gp[1] == cp[0].base


def test_completes_direct(clock: ManualClock) -> None:
    net, c, g = _setup(clock)
    start = clock.monotonic()
    assert net.run(5.0, lambda: _both_connected(c, g))
    assert clock.monotonic() - start < 1.0  # best pair (host-host) done in a few RTTs
    assert _nominated(c)[-1].local.kind == "host"
    assert _nominated(c)[-1].remote == GATEWAY_HOST
    assert _nominated(g)[-1].local.kind == "host"
    assert _nominated(g)[-1].remote == CLIENT_HOST
    assert c.agent.state == g.agent.state == "connected"
    assert g.agent.accepts_from(CLIENT_HOST)
    assert not g.agent.accepts_from(("10.9.9.9", 1))


def test_completes_relayed_only(clock: ManualClock) -> None:
    net, c, g = _setup(clock)
    net.block(CLIENT_HOST[0], GATEWAY_HOST[0])
    assert net.run(5.0, lambda: _both_connected(c, g))
    local, remote = g.agent.selected_pair() or (None, None)
    assert local is not None
    # Highest-priority working pair: one side's relay to the other's host.
    kinds = {local.kind, c.agent.selected_pair()[0].kind}  # type: ignore[index]
    assert "relay" in kinds
    assert remote in (CLIENT_HOST, CLIENT_RELAYED)
    assert _consistent(c, g)
    assert c.agent.state == g.agent.state == "connected"


def test_direct_cut_after_nomination_switches_to_relay(clock: ManualClock) -> None:
    net, c, g = _setup(clock)
    assert net.run(5.0, lambda: _both_connected(c, g))
    assert _selected_remote(g) == CLIENT_HOST
    cut_at = clock.monotonic()
    net.block(CLIENT_HOST[0], GATEWAY_HOST[0])

    def switched() -> bool:
        cp, gp = c.agent.selected_pair(), g.agent.selected_pair()
        return (cp is not None and gp is not None and "relay" in (cp[0].kind, gp[0].kind)
                and _consistent(c, g))

    assert net.run(30.0, switched)
    # The direct pair fails after its checks go unanswered (≈10.75 s), not before.
    assert 9.0 < clock.monotonic() - cut_at < 14.0
    assert not any(isinstance(e, Disconnected) for e in c.events + g.events)
    # The new path keeps working: consent re-checks continue and nothing disconnects.
    assert not net.run(60.0, lambda: c.agent.state != "connected" or g.agent.state != "connected")
    assert c.agent.state == g.agent.state == "connected"


def test_all_paths_cut_disconnects(clock: ManualClock) -> None:
    net, c, g = _setup(clock, relays=False)
    assert net.run(5.0, lambda: _both_connected(c, g))
    net.block(CLIENT_HOST[0], GATEWAY_HOST[0])
    cut_at = clock.monotonic()

    def both_disconnected() -> bool:
        return all(any(isinstance(e, Disconnected) for e in n.events) for n in (c, g))

    assert net.run(30.0, both_disconnected)
    assert 9.0 < clock.monotonic() - cut_at < 14.0
    assert c.agent.state == g.agent.state == "disconnected"
    assert g.agent.selected_pair() is None


def test_completes_with_loss_and_latency(clock: ManualClock) -> None:
    completed = 0
    for seed in range(5):
        net, c, g = _setup(clock, seed=seed, latency=0.05, loss=0.2)
        if net.run(10.0, lambda c=c, g=g: _both_connected(c, g)):  # type: ignore[misc]
            completed += 1
            assert _selected_remote(g) is not None
    assert completed == 5


@pytest.mark.parametrize("idle", [False, True])
def test_consent_rechecks_keep_connection_alive(clock: ManualClock, idle: bool) -> None:
    net, c, g = _setup(clock, relays=False)
    assert net.run(5.0, lambda: _both_connected(c, g))
    if idle:
        c.agent.set_idle(True, clock.monotonic())
        g.agent.set_idle(True, clock.monotonic())
    before = g.received
    assert not net.run(600.0, lambda: "disconnected" in (c.agent.state, g.agent.state))
    interval = 60.0 if idle else 1.5
    # Each side checks the pair once per interval, so the gateway sees checks + answers.
    assert g.received - before >= 2 * (600.0 / interval) * 0.9


def test_controlled_side_follows_a_roaming_peer_quickly(clock: ManualClock) -> None:
    """The client roams (new port, same ICE credentials, no trickle to the connected
    gateway): the gateway learns the new address from the checks and, once the old pair
    stops answering, switches within a couple of RTOs instead of ~10 s."""
    net, c, g = _setup(clock, relays=False)
    assert net.run(5.0, lambda: _both_connected(c, g))
    assert _selected_remote(g) == CLIENT_HOST
    roamed_host = (CLIENT_HOST[0], CLIENT_HOST[1] + 1)
    old = c.agent
    client = IceAgent(controlling=True, local=old.local_credentials,
                      remote=old.remote_credentials, rng=random.Random(99),
                      now=clock.monotonic())
    client.add_local_candidate(Candidate.host(roamed_host))
    client.add_remote_candidate(Candidate.host(GATEWAY_HOST), clock.monotonic())
    net.detach("client")
    roamed = net.attach("client2", client, roamed_host)
    start = clock.monotonic()
    assert net.run(5.0, lambda: _selected_remote(g) == roamed_host and bool(_nominated(roamed)))
    assert clock.monotonic() - start < 2.0, "fail-over took the slow path"
    assert not any(isinstance(e, Disconnected) for e in g.events)


def test_an_idle_controlled_side_follows_a_roaming_peer_at_once(clock: ManualClock) -> None:
    """As above, but the connection was idle (60 s rechecks) and the gateway's last check
    on the old pair is still unanswered when the roamed client nominates its new pair.
    The new nomination switches the socket at once, as 1.4 does; it used to wait for the
    next idle recheck (60-120 s of WireGuard replies sent to a dead address)."""
    net, c, g = _setup(clock, relays=False)
    assert net.run(5.0, lambda: _both_connected(c, g))
    g.agent.set_idle(True, clock.monotonic())
    old = c.agent
    net.detach("client")
    net.run(61.0, lambda: False)  # the gateway's idle recheck goes out, unanswered
    client = IceAgent(controlling=True, local=old.local_credentials,
                      remote=old.remote_credentials, rng=random.Random(99),
                      now=clock.monotonic())
    roamed_host = (CLIENT_HOST[0], CLIENT_HOST[1] + 1)
    client.add_local_candidate(Candidate.host(roamed_host))
    client.add_remote_candidate(Candidate.host(GATEWAY_HOST), clock.monotonic())
    roamed = net.attach("client2", client, roamed_host)
    start = clock.monotonic()
    assert net.run(10.0, lambda: _selected_remote(g) == roamed_host and bool(_nominated(roamed)))
    assert clock.monotonic() - start < 2.0, "an idle gateway took the slow path"
    assert not any(isinstance(e, Disconnected) for e in g.events)
