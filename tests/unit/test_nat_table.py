"""NAT table bookkeeping (dataplane.md §8.2-§8.4)."""

from __future__ import annotations

from gateway.packet.nat import NAT_SESSION_TTL, NatTable

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
    nat = NatTable()
    for port in range(1, 65536):
        assert nat.translate_outgoing(17, port, P1, R1, now=0.0) == port
    assert nat.translate_outgoing(17, 7, P2, R1, now=0.0) is None
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
