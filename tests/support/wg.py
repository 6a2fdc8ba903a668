"""Two WireGuard tunnels wired back to back under a ManualClock (tests only).

``WgPair`` plays the network: whatever one tunnel emits is handed to the other at once
(unless that direction is set to drop), answers cascade until the pair is quiet, and
``run_until`` drives both tunnels' timers deadline by deadline. Every delivery is logged
with its time, so tests can assert *when* a keepalive or a retry went out. After each
``handle_timeout(now)`` it asserts ``poll_timeout()`` moved past ``now`` (no busy loops).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from gateway.types import Address
from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter
from gateway.wg.tunnel import (
    Dropped,
    Tunnel,
    TunnelEvent,
    TunnResult,
    WriteToNetwork,
    WriteToTunnel,
)
from tests.support.clock import ManualClock

ADDR_A: Address = ("192.0.2.1", 51820)
ADDR_B: Address = ("192.0.2.2", 51820)


@dataclass
class Delivery:
    at: float
    sender: str  # "a" or "b"
    datagram: bytes
    result: TunnResult | None  # None when the datagram was dropped on the wire

    @property
    def kind(self) -> int:
        return self.datagram[0]


@dataclass
class WgPair:
    """``a`` and ``b`` know each other's keys; by convention ``a`` initiates."""

    psk_a: bytes | None = b"\x07" * 32
    psk_b: bytes | None = b"\x07" * 32
    seed: int = 7
    keepalive_a: float | None = None
    keepalive_b: float | None = None
    limit: int = 100
    clock: ManualClock = field(default_factory=ManualClock)
    drop_to_a: bool = False
    drop_to_b: bool = False

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.key_a = StaticKeyPair.generate(self.rng)
        self.key_b = StaticKeyPair.generate(self.rng)
        self.limiter_a = HandshakeRateLimiter(self.key_a.public, self.rng, self.limit)
        self.limiter_b = HandshakeRateLimiter(self.key_b.public, self.rng, self.limit)
        self.a = self._tunnel(self.key_a, self.key_b, self.psk_a, 0x0A0000, self.limiter_a,
                              self.keepalive_a)  # fmt: skip
        self.b = self._tunnel(self.key_b, self.key_a, self.psk_b, 0x0B0000, self.limiter_b,
                              self.keepalive_b)  # fmt: skip
        self.log: list[Delivery] = []
        self.events: dict[str, list[TunnelEvent]] = {"a": [], "b": []}
        self.to_tunnel: dict[str, list[bytes]] = {"a": [], "b": []}

    def _tunnel(
        self,
        me: StaticKeyPair,
        peer: StaticKeyPair,
        psk: bytes | None,
        index: int,
        limiter: HandshakeRateLimiter,
        keepalive: float | None,
    ) -> Tunnel:
        return Tunnel(static=me, peer_public=peer.public, preshared_key=psk, local_index=index,
                      rate_limiter=limiter, rng=self.rng, now=self.clock.monotonic(),
                      persistent_keepalive=keepalive)  # fmt: skip

    @property
    def now(self) -> float:
        return self.clock.monotonic()

    def tunnel(self, name: str) -> Tunnel:
        return self.a if name == "a" else self.b

    # ------------------------------------------------------------------ the wire

    def deliver(self, sender: str, datagram: bytes) -> TunnResult | None:
        """Hand ``datagram`` from ``sender`` to the other side; answers cascade."""
        receiver = "b" if sender == "a" else "a"
        if self.drop_to_b if receiver == "b" else self.drop_to_a:
            self.log.append(Delivery(self.now, sender, datagram, None))
            self.settle()
            return None
        src = ADDR_A if sender == "a" else ADDR_B
        result = self.tunnel(receiver).decapsulate(datagram, src, self.now, self.clock.unix())
        self.log.append(Delivery(self.now, sender, datagram, result))
        if isinstance(result, WriteToTunnel):
            self.to_tunnel[receiver].append(result.packet)
        if isinstance(result, WriteToNetwork):
            self.deliver(receiver, result.datagram)
        self.settle()
        return result

    def send(self, sender: str, result: TunnResult) -> TunnResult | None:
        """Deliver ``result`` if it is a datagram, then whatever the tunnels queued after it."""
        if isinstance(result, WriteToNetwork):
            return self.deliver(sender, result.datagram)
        self.settle()
        return None

    def encapsulate(self, sender: str, packet: bytes) -> TunnResult:
        result = self.tunnel(sender).encapsulate(packet, self.now, self.clock.unix())
        self.send(sender, result)
        return result

    def settle(self) -> None:
        """Drain both tunnels' transmit and event queues until quiet."""
        moved = True
        while moved:
            moved = False
            for name in ("a", "b"):
                tunnel = self.tunnel(name)
                while (event := tunnel.poll_event()) is not None:
                    self.events[name].append(event)
                datagram = tunnel.poll_transmit()
                if datagram is not None:
                    moved = True
                    self.deliver(name, datagram)

    # ----------------------------------------------------------------- the clock

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self.a.poll_timeout(), self.b.poll_timeout()) if d is not None]
        return min(deadlines) if deadlines else None

    def run_until(self, until: float) -> None:
        """Fire every timer up to and including ``until`` (absolute), then stop there."""
        while (deadline := self.next_deadline()) is not None and deadline <= until:
            self.clock.skip_to(deadline)
            now = self.now
            for tunnel in (self.a, self.b):
                due = tunnel.poll_timeout()
                if due is not None and due <= now:
                    tunnel.handle_timeout(now, self.clock.unix())
                    after = tunnel.poll_timeout()
                    assert after is None or after > now, f"busy loop: {after} <= {now}"
            self.settle()
        self.clock.skip_to(until)

    def advance(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    # ---------------------------------------------------------------- shortcuts

    def handshake(self, initiator: str = "a") -> None:
        self.send(initiator, self.tunnel(initiator).initiate(self.now, self.clock.unix()))

    def deliveries(self, sender: str, kind: int) -> list[Delivery]:
        return [d for d in self.log if d.sender == sender and d.kind == kind]

    def drops(self) -> list[Delivery]:
        return [d for d in self.log if isinstance(d.result, Dropped)]
