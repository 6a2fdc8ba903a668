"""Our sans-IO TURN client against a real coturn on 127.0.0.1.

A tiny event loop (test harness, not product code) feeds one UDP socket into the Allocation
and honours poll_transmit/poll_timeout; a plain UDP socket plays the remote peer.
"""

from __future__ import annotations

import random
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devstack.coturn import CoturnServer
from gateway.stun.message import Attr, MessageClass, Method, looks_like_stun, parse
from gateway.turn.allocation import (
    AUTHENTICATION_ERROR,
    Allocation,
    AllocationEvent,
    AllocationFailed,
    CandidateAdded,
    CandidateRemoved,
)
from tests.support.interop import require_bin

pytestmark = pytest.mark.interop

SOFTWARE = "snownet; session=" + "AB" * 32


class Harness:
    """Drives one Allocation over a real UDP socket."""

    def __init__(
        self,
        coturn: CoturnServer,
        username: str,
        password: str,
        servers: list[tuple[str, int]] | None = None,
    ) -> None:
        self.coturn = coturn
        self.servers = servers or [coturn.address]
        self.socks: dict[int, socket.socket] = {}
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            if any((":" in ip) == (family == socket.AF_INET6) for ip, _ in self.servers):
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.bind((host, 0))
                self.socks[family] = sock
        self.sock = self.socks[socket.AF_INET]
        self.local = self.sock.getsockname()
        self.alloc = Allocation(
            relay_id="coturn",
            servers=self.servers,
            username=username,
            password=password,
            software=SOFTWARE,
            rng=random.Random(7),
            now=time.monotonic(),
        )
        self.sent: list[bytes] = []
        self.events: list[AllocationEvent] = []
        self.received: list[tuple[tuple[str, int], bytes, tuple[str, int]]] = []

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()

    def flush(self) -> None:
        while (tx := self.alloc.poll_transmit()) is not None:
            assert tx.src is None and tx.dst in self.servers
            self.sent.append(tx.payload)
            family = socket.AF_INET6 if ":" in tx.dst[0] else socket.AF_INET
            self.socks[family].sendto(tx.payload, tx.dst)
        while (event := self.alloc.poll_event()) is not None:
            self.events.append(event)

    def run_until(self, done: Callable[[], bool], timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        self.flush()
        while not done():
            now = time.monotonic()
            if now >= end:
                raise AssertionError(
                    f"condition not met in {timeout}s; counters={dict(self.alloc.counters)}\n"
                    f"coturn log:\n{self.coturn.log_tail()}"
                )
            deadline = self.alloc.poll_timeout()
            wait = end - now if deadline is None else max(0.0, min(end, deadline) - now)
            readable, _, _ = select.select(list(self.socks.values()), [], [], wait)
            now = time.monotonic()
            for sock in readable:
                data, src_full = sock.recvfrom(65535)
                src, local = src_full[:2], sock.getsockname()[:2]
                if looks_like_stun(data):
                    consumed = self.alloc.handle_stun(parse(data), data, src, local, now)
                    assert consumed
                elif (inner := self.alloc.decapsulate(data, src, now)) is not None:
                    self.received.append(inner)
            if (deadline := self.alloc.poll_timeout()) is not None and deadline <= now:
                self.alloc.handle_timeout(now)
            self.flush()

    def sent_requests(self, method: int) -> list:
        msgs = [parse(raw) for raw in self.sent if looks_like_stun(raw)]
        return [m for m in msgs if m.method == method and m.cls == MessageClass.REQUEST]


@pytest.fixture
def harness(coturn: CoturnServer):  # type: ignore[no-untyped-def]
    username, password = coturn.credentials("gateway")
    h = Harness(coturn, username, password)
    yield h
    h.close()


def test_allocate_refresh_channel_and_deallocate(harness: Harness, coturn: CoturnServer) -> None:
    alloc = harness.alloc
    harness.run_until(lambda: bool(alloc.relay_addresses()))

    # BINDING gave the srflx candidate (on loopback: our own socket address).
    assert alloc.active_server() == coturn.address
    assert alloc.srflx_addresses() == [(harness.local, harness.local)]
    (relay,) = alloc.relay_addresses()
    assert relay[0] == "127.0.0.1" and coturn.min_port <= relay[1] <= coturn.max_port
    assert CandidateAdded("srflx", harness.local, harness.local) in harness.events
    assert CandidateAdded("relay", relay, None) in harness.events

    # 401 -> nonce -> success: the first ALLOCATE had no NONCE, the second did.
    allocates = harness.sent_requests(Method.ALLOCATE)
    assert len(allocates) == 2
    assert allocates[0].nonce() is None and allocates[1].nonce() is not None
    assert allocates[1].realm() == "firezone"
    assert allocates[0].transaction_id != allocates[1].transaction_id
    assert allocates[1].get(Attr.FINGERPRINT) is None
    assert alloc.counters["integrity_failed"] == 0

    # Refresh: coturn answers with its default lifetime 600 s => next refresh in ~300 s.
    start = time.monotonic()
    alloc.refresh(start)
    harness.run_until(lambda: (alloc.poll_timeout() or 0.0) > start + 200)
    next_refresh = alloc.poll_timeout()
    assert next_refresh is not None and 299 < next_refresh - start < 301
    # coturn 4.6.1 answers REQUESTED-TRANSPORT in REFRESH with 420; we resend without it.
    refreshes = harness.sent_requests(Method.REFRESH)
    assert len(refreshes) == 2
    assert refreshes[0].get(Attr.REQUESTED_TRANSPORT) is not None
    assert refreshes[1].get(Attr.REQUESTED_TRANSPORT) is None
    assert refreshes[1].get(Attr.ADDITIONAL_ADDRESS_FAMILY) is not None
    assert alloc.counters["attributes_rejected"] == 1
    assert alloc.relay_addresses() == [relay]

    # Channel to a plain UDP peer; data both ways.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(5)
        peer_addr = peer.getsockname()
        alloc.bind_channel(peer_addr, time.monotonic())
        harness.run_until(lambda: alloc.has_channel(peer_addr))
        assert alloc.channel_for(peer_addr) == 0x4000

        peer.sendto(b"hello from the peer", relay)
        harness.run_until(lambda: bool(harness.received))
        assert harness.received == [(peer_addr, b"hello from the peer", relay)]

        tx = alloc.encapsulate(peer_addr, b"hello from the gateway", time.monotonic())
        assert tx is not None
        harness.sock.sendto(tx.payload, tx.dst)
        data, src = peer.recvfrom(2048)
        assert (data, src) == (b"hello from the gateway", relay)

    # Deallocate: REFRESH with LIFETIME 0 succeeds, nothing remains in flight or scheduled.
    alloc.deallocate(time.monotonic())
    harness.flush()
    assert CandidateRemoved("relay", relay) in harness.events
    harness.run_until(lambda: alloc.poll_timeout() is None)
    deletes = [m for m in harness.sent_requests(Method.REFRESH) if m.lifetime() == 0]
    assert len(deletes) == 1 and deletes[0].get(Attr.REQUESTED_TRANSPORT) is None
    assert sum(v for k, v in alloc.counters.items() if k.startswith("error_")) == 0
    assert not alloc.is_freed


def test_wrong_password_frees_the_allocation(coturn: CoturnServer) -> None:
    username, _ = coturn.credentials("gateway")
    harness = Harness(coturn, username, "not-the-password")
    try:
        harness.run_until(lambda: harness.alloc.is_freed)
        assert AllocationFailed(AUTHENTICATION_ERROR) in harness.events
        assert harness.alloc.relay_addresses() == []
        assert harness.alloc.poll_timeout() is None
        assert harness.alloc.poll_transmit() is None
    finally:
        harness.close()


def test_dual_stack_relay(tmp_path: Path) -> None:
    """BINDING to both server addresses: two srflx candidates; coturn 4.6.1 answers
    ADDITIONAL-ADDRESS-FAMILY=IPv6 with the IPv4 relay only."""
    require_bin("turnserver", "coturn")
    server = CoturnServer(tmp_path / "coturn", ipv6=True).start()
    v6_server = ("::1", server.port)
    username, password = server.credentials("gateway")
    harness = Harness(server, username, password, servers=[server.address, v6_server])
    try:
        alloc = harness.alloc
        harness.run_until(
            lambda: bool(alloc.relay_addresses()) and len(alloc.srflx_addresses()) == 2
        )
        local6 = harness.socks[socket.AF_INET6].getsockname()[:2]
        assert alloc.srflx_addresses() == [(harness.local, harness.local), (local6, local6)]
        assert alloc.active_server() in (server.address, v6_server)
        (relay,) = alloc.relay_addresses()
        assert server.min_port <= relay[1] <= server.max_port
    finally:
        harness.close()
        server.stop()


def test_credentials_replaced_mid_allocate_leave_nothing_behind(
    harness: Harness, coturn: CoturnServer
) -> None:
    """An allocation replaced (its relay's addresses changed) while its authenticated
    ALLOCATE is at coturn deletes whatever that ALLOCATE made (coturn binds an allocation
    to its username and lets no other one delete it), so the new credentials can allocate
    on the same socket."""

    def authenticated_allocate_sent() -> bool:
        return any(m.nonce() is not None for m in harness.sent_requests(Method.ALLOCATE))

    harness.run_until(authenticated_allocate_sent)
    assert not harness.alloc.relay_addresses()  # its answer has not been read yet
    harness.alloc.deallocate(time.monotonic())
    harness.run_until(lambda: not harness.alloc.busy)
    # The ALLOCATE's success is answered with a delete (coturn refuses REFRESH's
    # REQUESTED-TRANSPORT with 420 the first time, so the delete goes twice).
    deletes = [m for m in harness.sent_requests(Method.REFRESH) if m.lifetime() == 0]
    assert deletes, "the allocation the ALLOCATE made was deleted by its maker"

    username, password = coturn.credentials("gateway-rotated")
    harness.alloc = Allocation(
        relay_id="coturn", servers=harness.servers, username=username, password=password,
        software=SOFTWARE, rng=random.Random(8), now=time.monotonic(),
    )
    # coturn frees a deleted allocation on its next tick, so the first ALLOCATE may still
    # get 437 (and its clean-up 441) and is retried 1 s later. An allocation left behind
    # would stay for its whole lifetime (600 s) and the retries would run out.
    harness.run_until(lambda: bool(harness.alloc.relay_addresses()), timeout=10)
