"""A deterministic in-memory network for ICE agents, driven by a ManualClock.

Addresses are delivered by exact (ip, port). Every hop between two IPs has a latency and a
seeded loss probability and can be blocked. A relay is modelled without TURN: a relayed
address belongs to an agent through a relay server IP, so a datagram sent from a relayed
address travels agent host -> relay server -> destination and arrives with the relayed
address as its source; a datagram to a relayed address travels source -> relay server ->
owning agent host and is handed to the agent as having arrived on the relayed address.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import MalformedPacket
from gateway.ice.agent import IceAgent, IceEvent
from gateway.stun.message import parse
from gateway.types import Address, Transmit
from tests.support.clock import ManualClock


@dataclass
class SimNode:
    """One agent on the simulated network."""

    name: str
    agent: IceAgent
    host: Address
    events: list[IceEvent] = field(default_factory=list)
    received: int = 0


@dataclass
class _Allocation:
    owner: str
    server_ip: str


class SimNet:
    """Seeded, latency- and loss-aware datagram delivery between ICE agents."""

    def __init__(
        self, clock: ManualClock, *, seed: int = 1, latency: float = 0.01, loss: float = 0.0
    ) -> None:
        self.clock = clock
        self.rng = random.Random(seed)
        self.default_latency = latency
        self.default_loss = loss
        self.nodes: dict[str, SimNode] = {}
        self._owners: dict[Address, str] = {}
        self._allocations: dict[Address, _Allocation] = {}
        self._links: dict[frozenset[str], tuple[float, float]] = {}
        self._blocked: set[frozenset[str]] = set()
        self._queue: list[tuple[float, int, str, Address, Address, bytes]] = []
        self._seq = itertools.count()
        self.dropped = 0
        self.delivered = 0

    # ---- topology ---------------------------------------------------------------------

    def attach(self, name: str, agent: IceAgent, host: Address) -> SimNode:
        node = SimNode(name, agent, host)
        self.nodes[name] = node
        self._owners[host] = name
        return node

    def detach(self, name: str) -> None:
        """Remove a node (a roaming peer's old socket): datagrams to it are lost."""
        node = self.nodes.pop(name)
        for address, owner in list(self._owners.items()):
            if owner == name:
                del self._owners[address]
        del node

    def allocate(self, name: str, server_ip: str, relayed: Address) -> None:
        """Give ``name`` a relayed address on the relay at ``server_ip``."""
        self._owners[relayed] = name
        self._allocations[relayed] = _Allocation(name, server_ip)

    def set_link(self, a_ip: str, b_ip: str, *, latency: float, loss: float) -> None:
        self._links[frozenset((a_ip, b_ip))] = (latency, loss)

    def block(self, a_ip: str, b_ip: str) -> None:
        self._blocked.add(frozenset((a_ip, b_ip)))

    def unblock(self, a_ip: str, b_ip: str) -> None:
        self._blocked.discard(frozenset((a_ip, b_ip)))

    # ---- delivery ---------------------------------------------------------------------

    def _hops(self, sender: SimNode, tx: Transmit) -> list[str]:
        src = tx.src if tx.src is not None else sender.host
        ips = [sender.host[0]]
        if src in self._allocations:
            ips.append(self._allocations[src].server_ip)
        if tx.dst in self._allocations:
            allocation = self._allocations[tx.dst]
            ips.append(allocation.server_ip)
            ips.append(self.nodes[allocation.owner].host[0])
        else:
            ips.append(tx.dst[0])
        return [ip for i, ip in enumerate(ips) if i == 0 or ip != ips[i - 1]]

    def send(self, sender: SimNode, tx: Transmit) -> None:
        src = tx.src if tx.src is not None else sender.host
        assert src in self._owners and self._owners[src] == sender.name, f"{sender.name}: {src}"
        owner = self._owners.get(tx.dst)
        if owner is None:
            self.dropped += 1
            return
        delay = 0.0
        hops = self._hops(sender, tx)
        for a, b in itertools.pairwise(hops):
            key = frozenset((a, b))
            latency, loss = self._links.get(key, (self.default_latency, self.default_loss))
            if key in self._blocked or (loss and self.rng.random() < loss):
                self.dropped += 1
                return
            delay += latency
        entry = (self.clock.monotonic() + delay, next(self._seq), owner, src, tx.dst, tx.payload)
        heapq.heappush(self._queue, entry)

    def _deliver(self, node: SimNode, src: Address, local: Address, payload: bytes) -> None:
        try:
            msg = parse(payload)
        except MalformedPacket:
            self.dropped += 1
            return
        if not node.agent.accepts(msg, payload):
            self.dropped += 1
            return
        node.received += 1
        self.delivered += 1
        node.agent.handle_stun(msg, payload, src, local, self.clock.monotonic())

    def _drain(self) -> None:
        for node in self.nodes.values():
            while (tx := node.agent.poll_transmit()) is not None:
                self.send(node, tx)
            while (event := node.agent.poll_event()) is not None:
                node.events.append(event)

    # ---- running ----------------------------------------------------------------------

    def run(self, duration: float, until: Callable[[], bool] | None = None) -> bool:
        """Advance the clock event by event for up to ``duration`` s or until ``until()``."""
        end = self.clock.monotonic() + duration
        while True:
            self._drain()
            if until is not None and until():
                return True
            deadlines = [t for n in self.nodes.values() if (t := n.agent.poll_timeout())
                         is not None]
            if self._queue:
                deadlines.append(self._queue[0][0])
            next_at = min(deadlines, default=None)
            if next_at is None or next_at > end:
                self.clock.skip_to(end)
                return until is not None and until()
            self.clock.skip_to(next_at)
            now = self.clock.monotonic()
            while self._queue and self._queue[0][0] <= now:
                _, _, owner, src, local, payload = heapq.heappop(self._queue)
                self._deliver(self.nodes[owner], src, local, payload)
            for node in self.nodes.values():
                deadline = node.agent.poll_timeout()
                if deadline is not None and deadline <= now:
                    node.agent.handle_timeout(now)
                    after = node.agent.poll_timeout()
                    assert after is None or after > now, f"{node.name}: busy loop at {now}"
