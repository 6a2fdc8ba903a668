"""Real datagrams to mutate: what the simulated client, relay and gateway exchange while a
connection is set up (direct and relayed) and carries WireGuard both ways."""

from __future__ import annotations

import functools

from gateway.types import Address
from tests.sim.test_node_sim import GATEWAY, Sim, _exchange

Datagram = tuple[Address, Address, bytes]


def connected_sim(*, relayed: bool, log: list[Datagram] | None = None) -> Sim:
    """A gateway Node with one client whose path is up and whose tunnel carried traffic."""
    sim = Sim(block_direct=relayed)
    if log is not None:
        deliver = sim._deliver

        def recording(src: Address, dst: Address, payload: bytes) -> None:
            log.append((src, dst, payload))
            deliver(src, dst, payload)

        sim._deliver = recording  # type: ignore[method-assign]
    sim.add_relay()
    sim.authorize()
    sim.run_until(lambda: sim.gw_path is not None and sim.client_nominated is not None)
    _exchange(sim)
    return sim


@functools.cache
def datagrams() -> tuple[Datagram, ...]:
    """Every datagram of a direct and of a relayed set-up (STUN, TURN, ChannelData, WG)."""
    log: list[Datagram] = []
    connected_sim(relayed=False, log=log)
    connected_sim(relayed=True, log=log)
    return tuple(log)


@functools.cache
def to_gateway() -> tuple[Datagram, ...]:
    """The datagrams the gateway received."""
    return tuple(d for d in datagrams() if d[1] == GATEWAY)
