"""``/metrics`` reads client figures without any session's lock, and they never go back.

Before, every scrape asked every PeerActor for its status (a mailbox round and the
session's lock each), and a client's bytes and drops vanished from the totals when its
state, tunnel or session went away.
"""

from __future__ import annotations

import ipaddress
import random
import threading
import uuid
from collections.abc import Callable
from typing import Any
from unittest import mock

from actors.app import _register_collectors
from actors.messages import PortalStatus
from actors.metrics import new_gateway_metrics
from actors.peer_session import PENDING_DATAGRAMS, SESSIONS, PeerSession, SessionRegistry
from actors.timer import Timer
from gateway.node import DirectPath
from gateway.resources import CidrResource
from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter
from tests.support.clock import ManualClock

RESOURCE = CidrResource(uuid.uuid4(), ipaddress.ip_network("10.204.0.0/24"), "lan", ())


def make_session(clock: ManualClock, registry: SessionRegistry = SESSIONS) -> PeerSession:
    return PeerSession(
        client_id=uuid.uuid4(), tun=mock.Mock(), tun_writer=mock.Mock(), sockets=mock.Mock(),
        clock=clock, rng=random.Random(1), timer=Timer(clock), notify_node=mock.Mock(),
        registry=registry,
    )


def new_tunnel(session: PeerSession, clock: ManualClock, index: int) -> None:
    rng = random.Random(index)
    static = StaticKeyPair.generate(rng)
    with session.lock:
        session.new_session_locked(
            local_index=index, peer_public=StaticKeyPair.generate(rng).public,
            preshared_key=bytes(32), static=static,
            rate_limiter=HandshakeRateLimiter(static.public, rng), now=clock.monotonic(),
        )


def without_the_lock(session: PeerSession, read: Callable[[], Any]) -> Any:
    """``read()`` on another thread while this one holds ``session``'s lock."""
    box: list[Any] = []
    with session.lock:
        reader = threading.Thread(target=lambda: box.append(read()), daemon=True)
        reader.start()
        reader.join(timeout=5)
    assert box, "the read waited for the session's lock"
    return box[0]


def test_figures_are_read_without_the_session_lock_and_stay_monotonic() -> None:
    clock = ManualClock()
    registry = SessionRegistry()
    session = make_session(clock, registry)
    new_tunnel(session, clock, 1)
    assert session.core.tunnel is not None
    session.core.tunnel.rx_bytes, session.core.tunnel.tx_bytes = 100, 40
    with session.lock:
        session.authorize_locked(RESOURCE, None, "100.64.0.7", "fd00:2021:1111::7",
                                 clock.monotonic())
        session.set_path_locked(DirectPath(("10.0.0.1", 1), ("10.0.0.2", 2)))
        assert session.core.client is not None
        session.core.client.counters["not_allowed"] += 3
    figures = without_the_lock(session, registry.figures)
    assert (figures.rx_bytes, figures.tx_bytes) == (100, 40)
    assert figures.paths == {"direct": 1} and figures.drops["not_allowed"] == 3
    # a new WireGuard session and a dropped client state keep what was counted
    new_tunnel(session, clock, 2)
    with session.lock:
        session.forget_client_locked()
    figures = registry.figures()
    assert (figures.rx_bytes, figures.tx_bytes, figures.drops["not_allowed"]) == (100, 40, 3)
    # and so does the end of the session
    with session.lock:
        session.close_locked()
    figures = registry.figures()
    assert (figures.rx_bytes, figures.tx_bytes, figures.drops["not_allowed"]) == (100, 40, 3)
    assert sum(figures.paths.values()) == 0
    with session.lock:
        session.close_locked()  # twice: counted once
    assert registry.figures().rx_bytes == 100


def test_a_scrape_asks_no_peer_actor_and_takes_no_session_lock() -> None:
    clock = ManualClock()
    session = make_session(clock)
    new_tunnel(session, clock, 3)
    assert session.core.tunnel is not None
    session.core.tunnel.rx_bytes = 7
    runtime = mock.Mock()
    runtime.gc_policy = None
    runtime.node.ask.return_value = {"resets": 2, "counters": {"garbage": 4}}
    runtime.portal.ask.return_value = PortalStatus(state="joined", joined_since=None,
                                                   reconnects=1, url="wss://portal",
                                                   malformed_frames=3)
    runtime.tun.ask.return_value = {"dropped": {"kernel": 5}}
    runtime.status.side_effect = AssertionError("a scrape must not gather every status")
    metrics = new_gateway_metrics()
    _register_collectors(metrics, runtime)
    try:
        text = without_the_lock(session, metrics.render)
    finally:
        with session.lock:
            session.close_locked()
    assert 'firezone_connections{path="connecting"}' in text
    assert 'firezone_dropped_packets_total{reason="tun_kernel"} 5' in text
    assert "firezone_resets_total 2" in text and "firezone_portal_joined 1" in text
    assert 'firezone_node_events_total{event="garbage"} 4' in text
    assert "firezone_portal_malformed_frames_total 3" in text
    rx = next(line for line in text.splitlines() if line.startswith("firezone_rx_bytes_total"))
    assert int(rx.split()[1]) >= 7


def test_datagrams_beyond_the_pending_buffer_are_counted() -> None:
    clock = ManualClock()
    session = make_session(clock, SessionRegistry())
    with session.lock:
        for n in range(PENDING_DATAGRAMS + 5):
            session.core._send(bytes([n]))
        assert len(session.core.pending) == PENDING_DATAGRAMS
        assert session.counters["pending_full"] == 5
        session.close_locked()
