"""NAT table bookkeeping (rust/connlib/tunnel/src/peer/nat_table.rs)."""

from __future__ import annotations

import pytest

from gateway.packet.nat import (
    NAT_EXHAUSTED,
    NAT_LIMIT,
    NAT_MAX_SESSIONS,
    NAT_SESSION_TTL,
    NatTable,
    PortSpace,
)

P1, P2 = bytes([100, 96, 0, 1]), bytes([100, 96, 0, 2])
R1, R2 = bytes([93, 184, 216, 34]), bytes([1, 1, 1, 1])


def test_keeps_original_port_and_reverses() -> None:
    nat = NatTable()
    assert nat.translate_outgoing(6, 40000, P1, R1, now=0.0) == 40000
    assert nat.translate_incoming(6, 40000, R1) == (6, 40000, P1)
    assert nat.translate_incoming(17, 40000, R1) is None
    assert nat.translate_incoming(6, 40000, R2) is None
    assert nat.translate_outgoing(6, 40000, P1, R1, now=1.0) == 40000
    assert len(nat) == 1


def test_collision_allocates_next_free_port() -> None:
    nat = NatTable()
    # two proxy IPs that map to the same real IP, same client port
    assert nat.translate_outgoing(17, 5000, P1, R1, now=0.0) == 5000
    assert nat.translate_outgoing(17, 5000, P2, R1, now=0.0) == 5001
    assert nat.translate_incoming(17, 5001, R1) == (17, 5000, P2)
    assert nat.translate_outgoing(17, 5001, P1, R1, now=0.0) == 5002


def test_allocation_wraps_to_one() -> None:
    nat = NatTable()
    assert nat.translate_outgoing(1, 65535, P1, R1, now=0.0) == 65535
    assert nat.translate_outgoing(1, 65535, P2, R1, now=0.0) == 1


def test_real_ip_change_allocates_new_session() -> None:
    nat = NatTable()
    nat.translate_outgoing(6, 1234, P1, R1, now=0.0)
    assert nat.translate_outgoing(6, 1234, P1, R2, now=1.0) == 1234
    assert nat.translate_incoming(6, 1234, R2) == (6, 1234, P1)
    assert nat.translate_incoming(6, 1234, R1) is None


def test_exhaustion() -> None:
    nat = NatTable(max_sessions=65536)
    for port in range(1, 65536):
        assert nat.translate_outgoing(17, port, P1, R1, now=0.0) == port
    assert nat.translate_outgoing(17, 7, P2, R1, now=0.0) == NAT_EXHAUSTED
    assert nat.translate_outgoing(17, 7, P2, R2, now=0.0) == 7  # other real IP is free


def test_ttl_counts_only_outgoing() -> None:
    nat = NatTable()
    nat.translate_outgoing(6, 1000, P1, R1, now=0.0)
    nat.translate_incoming(6, 1000, R1)  # replies do not refresh (1.4 behaviour)
    assert nat.handle_timeout(NAT_SESSION_TTL - 1) == 0
    nat.translate_outgoing(6, 1000, P1, R1, now=30.0)
    assert nat.handle_timeout(NAT_SESSION_TTL + 1) == 0
    assert nat.handle_timeout(30.0 + NAT_SESSION_TTL) == 1
    assert len(nat) == 0 and nat.translate_incoming(6, 1000, R1) is None


def _fill(nat: NatTable, kind: int, real: bytes, ports: range) -> None:
    for port in ports:
        proxy = bytes([100, 96, port >> 8, port & 0xFF])
        assert nat.translate_outgoing(kind, port, proxy, real, now=0.0) == port


def test_exhaustion_is_detected_without_a_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """A used-up port space refuses a new flow from its count alone (1.4 scans 65,535
    ports per packet there, on the thread every client's traffic shares)."""
    nat = NatTable(max_sessions=65536)
    _fill(nat, 17, R1, range(1, 65536))
    space = nat.port_space(17, R1)
    assert space is not None and space.used == 65535 and space.free() == 0

    def no_search(self: PortSpace, start: int) -> int | None:
        raise AssertionError("searched an exhausted port space")

    monkeypatch.setattr(PortSpace, "_first_free", no_search)
    assert nat.translate_outgoing(17, 7, P2, R1, now=0.0) == NAT_EXHAUSTED
    assert len(nat) == 65535


def test_next_free_port_costs_a_fixed_number_of_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With one port left, far from the client's port and after a wrap, finding it reads
    a bounded number of 256-port blocks (1.4 probes port by port)."""
    nat = NatTable(max_sessions=65536)
    _fill(nat, 6, R1, range(1, 3))
    _fill(nat, 6, R1, range(4, 65536))
    probes = 0
    original = PortSpace._bits

    def counting(self: PortSpace, block: int) -> int:
        nonlocal probes
        probes += 1
        return original(self, block)

    monkeypatch.setattr(PortSpace, "_bits", counting)
    assert nat.translate_outgoing(6, 60000, P2, R1, now=0.0) == 3  # wrapped to the bottom
    assert probes <= 6
    assert nat.translate_outgoing(6, 60001, P2, R2, now=0.0) == 60001


def test_released_ports_are_reused_and_spaces_freed() -> None:
    nat = NatTable(ports=(40000, 40003))
    for index in range(4):
        proxy = bytes([100, 96, 1, index])
        assert nat.translate_outgoing(17, 5000, proxy, R1, now=float(index)) == 40000 + index
    assert nat.translate_outgoing(17, 5000, P1, R1, now=4.0) == NAT_EXHAUSTED
    assert nat.translate_outgoing(17, 5000, P1, R2, now=4.0) == 40000  # per real address
    # the first session expires: its port is free again, the search wraps to it
    assert nat.handle_timeout(NAT_SESSION_TTL) == 1
    assert nat.translate_outgoing(17, 40002, P1, R1, now=NAT_SESSION_TTL) == 40000
    nat.handle_timeout(10 * NAT_SESSION_TTL)
    assert len(nat) == 0 and nat.port_space(17, R1) is None


def test_small_range_keeps_ports_inside_it() -> None:
    nat = NatTable(ports=(40000, 40001))
    assert nat.translate_outgoing(6, 40001, P1, R1, now=0.0) == 40001  # own port kept
    assert nat.translate_outgoing(6, 40001, P2, R1, now=0.0) == 40000  # wraps to the bottom
    assert nat.translate_outgoing(6, 80, bytes([100, 96, 0, 3]), R2, now=0.0) == 40000
    with pytest.raises(ValueError):
        NatTable(ports=(0, 10))


def test_port_zero_is_kept_but_never_chosen() -> None:
    nat = NatTable()
    assert nat.translate_outgoing(1, 0, P1, R1, now=0.0) == 0  # an ICMP id 0 stays 0
    assert nat.translate_outgoing(1, 0, P2, R1, now=0.0) == 1
    assert nat.translate_outgoing(1, 65535, bytes([100, 96, 0, 3]), R1, now=0.0) == 65535
    assert nat.translate_outgoing(1, 65535, bytes([100, 96, 0, 4]), R1, now=0.0) == 2


def test_sessions_per_table_are_capped() -> None:
    nat = NatTable(max_sessions=3)
    for port in (1, 2, 3):
        assert nat.translate_outgoing(17, port, P1, R1, now=0.0) == port
    assert nat.translate_outgoing(17, 4, P1, R1, now=0.0) == NAT_LIMIT
    assert nat.translate_outgoing(17, 1, P1, R1, now=1.0) == 1  # existing sessions go on
    assert nat.translate_outgoing(17, 1, P1, R2, now=1.0) == 1  # and may move real IP
    assert len(nat) == 3
    assert NAT_MAX_SESSIONS == 16384
