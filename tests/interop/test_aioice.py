"""Our ICE agent against aioice (an independent ICE implementation) over real UDP sockets.

aioice plays the client; it runs in a thread of its own under ``asyncio.run``. Our agent is
driven by a small select() loop in the test thread with a socket on 127.0.0.1, classifying
datagrams with our demux exactly as the node will.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from devstack.coturn import CoturnServer
from gateway.demux import DatagramKind, classify
from gateway.ice.agent import IceAgent, IceEvent, Nominated
from gateway.ice.candidate import Candidate, IceCredentials
from gateway.stun.message import MessageClass, parse
from gateway.types import Address
from tests.support.interop import require_module

pytestmark = pytest.mark.interop

#: Non-STUN payloads shaped like WireGuard transport messages (type 4, 16-byte multiples).
FROM_AIOICE = b"\x04\x00\x00\x00" + b"A" * 28
FROM_US = b"\x04\x00\x00\x00" + b"B" * 44


class AioiceThread:
    """An asyncio loop (``asyncio.run``) in its own thread; coroutines are submitted to it."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),),
                                        name="aioice", daemon=True)
        self._thread.start()
        assert self._ready.wait(5), "aioice thread did not start"

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


class OurSide:
    """Our agent on a real socket: the node's receive path, reduced to ICE + raw data."""

    def __init__(self, agent: IceAgent) -> None:
        self.agent = agent
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address: Address = self.sock.getsockname()
        self.events: list[IceEvent] = []
        self.data: list[tuple[bytes, Address]] = []
        self.requests_answered = 0
        self.blocked_sources: set[Address] = set()

    def close(self) -> None:
        self.sock.close()

    def nominated(self) -> list[Nominated]:
        return [e for e in self.events if isinstance(e, Nominated)]

    def _drain(self) -> None:
        while (tx := self.agent.poll_transmit()) is not None:
            assert tx.src == self.address
            self.sock.sendto(tx.payload, tx.dst)
        while (event := self.agent.poll_event()) is not None:
            self.events.append(event)

    def _receive(self, data: bytes, src: Address) -> None:
        if src in self.blocked_sources:
            return  # a firewall in front of the gateway
        kind = classify(data, src, frozenset())
        if kind is DatagramKind.STUN:
            msg = parse(data)
            if self.agent.accepts(msg, data):
                if msg.cls == MessageClass.REQUEST:
                    self.requests_answered += 1
                self.agent.handle_stun(msg, data, src, self.address, time.monotonic())
        elif kind is DatagramKind.WIREGUARD and self.agent.accepts_from(src):
            self.data.append((data, src))

    def pump(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        """Run our side for up to ``seconds`` (or until ``until()``); True if it came true."""
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            deadline = self.agent.poll_timeout()
            if deadline is not None and deadline <= now:
                self.agent.handle_timeout(now)
            self._drain()
            if until is not None and until():
                return True
            if now >= end:
                return False
            deadline = self.agent.poll_timeout()
            wait = end - now if deadline is None else min(end, deadline) - now
            readable, _, _ = select.select([self.sock], [], [], max(wait, 0.0))
            if readable:
                data, src = self.sock.recvfrom(2048)
                self._receive(data, src)
                self._drain()

    def send_data(self, payload: bytes) -> None:
        selected = self.agent.selected_pair()
        assert selected is not None
        self.sock.sendto(payload, selected[1])


@pytest.fixture
def aioice_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[AioiceThread]:
    require_module("aioice")
    import aioice.ice

    # aioice skips 127.0.0.1 when gathering; keep the test hermetic on loopback.
    monkeypatch.setattr(aioice.ice, "get_host_addresses",
                        lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    runner = AioiceThread()
    try:
        yield runner
    finally:
        runner.close()


def _our_agent(controlling: bool, remote: IceCredentials | None) -> tuple[OurSide,
                                                                          IceCredentials]:
    rng = random.Random(0xA10)
    creds = IceCredentials.random(rng)
    agent = IceAgent(controlling=controlling, local=creds, remote=remote, rng=rng,
                     now=time.monotonic())
    side = OurSide(agent)
    assert agent.add_local_candidate(Candidate.host(side.address), time.monotonic())
    return side, creds


async def _signal_to_aioice(conn: Any, creds: IceCredentials, lines: list[str]) -> None:
    import aioice

    conn.remote_username, conn.remote_password = creds.ufrag, creds.pwd
    for line in lines:
        await conn.add_remote_candidate(aioice.Candidate.from_sdp(line.removeprefix("candidate:")))
    await conn.add_remote_candidate(None)


async def _recv(conn: Any, timeout: float) -> bytes:
    return bytes(await asyncio.wait_for(conn.recv(), timeout))


def _exchange_data(aio: AioiceThread, conn: Any, ours: OurSide) -> None:
    """Non-STUN datagrams flow both ways on the ICE sockets."""
    ours.data.clear()
    aio.call(conn.send(FROM_AIOICE))
    assert ours.pump(5.0, lambda: bool(ours.data)), "aioice's datagram did not arrive"
    assert ours.data[0][0] == FROM_AIOICE
    pending = aio.submit(_recv(conn, 5.0))
    ours.send_data(FROM_US)
    assert pending.result(6.0) == FROM_US


def test_aioice_controlling_direct_and_consent_for_40s(aioice_thread: AioiceThread) -> None:
    import aioice

    conn = aioice.Connection(ice_controlling=True, use_ipv6=False)
    aioice_thread.call(conn.gather_candidates())
    theirs = IceCredentials(conn.local_username, conn.local_password)
    ours, creds = _our_agent(controlling=False, remote=theirs)
    try:
        for c in conn.local_candidates:
            assert ours.agent.add_remote_candidate(Candidate.parse(c.to_sdp()), time.monotonic())
        our_lines = [c.to_sdp() for c in ours.agent.local_candidates]
        aioice_thread.call(_signal_to_aioice(conn, creds, our_lines))
        connecting = aioice_thread.submit(conn.connect())
        assert ours.pump(10.0, lambda: bool(ours.nominated()) and connecting.done())
        connecting.result(0)
        nominated = ours.nominated()[-1]
        assert nominated.local.address == ours.address
        assert nominated.remote == (conn.local_candidates[0].host, conn.local_candidates[0].port)
        _exchange_data(aioice_thread, conn, ours)

        # aioice closes after ~30 s of unanswered consent checks; we keep answering.
        answered_before = ours.requests_answered
        ours.pump(40.0)
        assert ours.requests_answered - answered_before >= 6  # consent every 4-6 s
        assert ours.agent.state == "connected"
        _exchange_data(aioice_thread, conn, ours)
        assert ours.agent.counters["request_unauthenticated"] == 0
    finally:
        aioice_thread.call(conn.close())
        ours.close()


def test_aioice_relayed_through_coturn(aioice_thread: AioiceThread, coturn: CoturnServer) -> None:
    import aioice

    user, password = coturn.credentials("client")
    conn = aioice.Connection(ice_controlling=True, use_ipv6=False, turn_server=coturn.address,
                             turn_username=user, turn_password=password, turn_transport="udp")
    aioice_thread.call(conn.gather_candidates(), timeout=15.0)
    relay_lines = [c.to_sdp() for c in conn.local_candidates if c.type == "relay"]
    assert relay_lines, f"aioice got no relay candidate\n{coturn.log_tail()}"
    theirs = IceCredentials(conn.local_username, conn.local_password)
    ours, creds = _our_agent(controlling=False, remote=theirs)
    try:
        # Only the relay path may work: drop everything from aioice's host candidates.
        ours.blocked_sources = {(c.host, c.port) for c in conn.local_candidates
                                if c.type == "host"}
        relayed = Candidate.parse(relay_lines[0])
        assert ours.agent.add_remote_candidate(relayed, time.monotonic())
        our_lines = [c.to_sdp() for c in ours.agent.local_candidates]
        aioice_thread.call(_signal_to_aioice(conn, creds, our_lines))
        connecting = aioice_thread.submit(conn.connect())
        done = ours.pump(20.0, lambda: bool(ours.nominated()) and connecting.done())
        assert done, f"ICE via coturn did not complete\n{coturn.log_tail()}"
        connecting.result(0)
        assert ours.nominated()[-1].remote == relayed.address
        assert ours.nominated()[-1].local.address == ours.address
        _exchange_data(aioice_thread, conn, ours)
    finally:
        aioice_thread.call(conn.close())
        ours.close()


def test_our_controlling_agent_against_aioice_controlled(aioice_thread: AioiceThread) -> None:
    import aioice

    conn = aioice.Connection(ice_controlling=False, use_ipv6=False)
    aioice_thread.call(conn.gather_candidates())
    theirs = IceCredentials(conn.local_username, conn.local_password)
    ours, creds = _our_agent(controlling=True, remote=theirs)
    try:
        for c in conn.local_candidates:
            assert ours.agent.add_remote_candidate(Candidate.parse(c.to_sdp()), time.monotonic())
        our_lines = [c.to_sdp() for c in ours.agent.local_candidates]
        aioice_thread.call(_signal_to_aioice(conn, creds, our_lines))
        connecting = aioice_thread.submit(conn.connect())
        assert ours.pump(10.0, lambda: bool(ours.nominated()) and connecting.done())
        connecting.result(0)  # aioice saw our USE-CANDIDATE and completed
        assert ours.agent.state == "connected"
        assert ours.agent.counters["role_conflict"] == 0
        _exchange_data(aioice_thread, conn, ours)
    finally:
        aioice_thread.call(conn.close())
        ours.close()
