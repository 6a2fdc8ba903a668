"""The WireGuard Tunnel: handshakes in both roles, transport, timers, cookies, bad input.

Two tunnels talk through ``tests.support.wg.WgPair`` under a ManualClock; ``run_until``
also checks after every ``handle_timeout`` that the next deadline moved past ``now``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import LocalProtocolError
from gateway.wg.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_QUEUED_PACKETS,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    SESSION_ZERO_AFTER,
)
from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter
from gateway.wg.tunnel import (
    DONE,
    ConnectionExpired,
    DoneType,
    Dropped,
    HandshakeCompleted,
    Tunnel,
    WriteToNetwork,
    WriteToTunnel,
    message_type,
    receiver_index,
)
from tests.support.wg import ADDR_A, ADDR_B, WgPair

PSK = b"\x07" * 32


def ip4(size: int, tag: int = 0) -> bytes:
    """An IPv4-looking packet of ``size`` bytes (the core only reads version and length)."""
    assert size >= 20
    return bytes((0x45, 0)) + size.to_bytes(2, "big") + bytes([tag & 0xFF]) * (size - 4)


def ip6(payload: int, tag: int = 0) -> bytes:
    return bytes((0x60, 0, 0, 0)) + payload.to_bytes(2, "big") + bytes([tag]) * (34 + payload)


def established(**kwargs: object) -> WgPair:
    pair = WgPair(**kwargs)  # type: ignore[arg-type]
    pair.handshake()
    assert pair.a.has_session and pair.b.has_session
    return pair


def kinds(pair: WgPair, since: int = 0) -> list[tuple[str, int]]:
    return [(d.sender, d.kind) for d in pair.log[since:]]


# ------------------------------------------------------------------ handshake + transport


@pytest.mark.parametrize("psk", [PSK, None], ids=["psk", "no-psk"])
def test_handshake_then_transport_both_ways(psk: bytes | None) -> None:
    pair = WgPair(psk_a=psk, psk_b=psk)
    pair.handshake()
    assert kinds(pair) == [("a", 1), ("b", 2), ("a", 4)]
    assert [len(d.datagram) for d in pair.log] == [148, 92, 32]
    assert pair.events["a"] == [HandshakeCompleted(is_initiator=True)]
    assert pair.events["b"] == [HandshakeCompleted(is_initiator=False)]
    assert pair.log[-1].result is DONE  # the confirming keepalive
    for sender, receiver, size in (("a", "b", 1420), ("b", "a", 60), ("a", "b", 21)):
        packet = ip4(size, tag=size)
        pair.encapsulate(sender, packet)
        assert pair.to_tunnel[receiver][-1] == packet
    assert pair.a.last_handshake_unix == pair.b.last_handshake_unix == pair.clock.unix()
    assert pair.a.tx_bytes == pair.b.rx_bytes > 0 and pair.b.tx_bytes == pair.a.rx_bytes > 0
    assert not pair.a.counters and not pair.b.counters


def test_ipv6_packets_are_cut_at_their_length() -> None:
    pair = established()
    packet = ip6(payload=13, tag=9)
    pair.encapsulate("a", packet)
    assert pair.to_tunnel["b"] == [packet]


def test_first_packets_wait_for_the_handshake_and_confirm_it() -> None:
    pair = WgPair()
    first = pair.a.encapsulate(ip4(100, 1), pair.now, pair.clock.unix())
    assert isinstance(first, WriteToNetwork) and message_type(first.datagram) == 1
    assert pair.a.encapsulate(ip4(100, 2), pair.now, pair.clock.unix()) is DONE
    pair.send("a", first)
    assert pair.to_tunnel["b"] == [ip4(100, 1), ip4(100, 2)]
    assert all(len(d.datagram) > 32 for d in pair.deliveries("a", 4))  # no extra keepalive


def test_queue_is_bounded_oldest_dropped() -> None:
    pair = WgPair()
    packets = [ip4(40, i) for i in range(MAX_QUEUED_PACKETS + 4)]
    first = pair.a.encapsulate(packets[0], pair.now, pair.clock.unix())
    for packet in packets[1:]:
        assert pair.a.encapsulate(packet, pair.now, pair.clock.unix()) is DONE
    assert pair.a.counters["queue_overflow"] == 4
    pair.send("a", first)
    assert pair.to_tunnel["b"] == packets[4:]


def test_responder_holds_packets_until_the_initiator_confirms() -> None:
    pair = WgPair()
    initiation = pair.a.initiate(pair.now, pair.clock.unix())
    assert isinstance(initiation, WriteToNetwork)
    response = pair.b.decapsulate(initiation.datagram, ADDR_A, pair.now, pair.clock.unix())
    assert isinstance(response, WriteToNetwork)
    assert not pair.b.has_session  # only a ``next`` session so far
    assert pair.b.encapsulate(ip4(50, 3), pair.now, pair.clock.unix()) is DONE  # queued
    pair.deliver("b", response.datagram)  # a completes, sends a keepalive, b confirms
    assert pair.b.has_session
    assert pair.to_tunnel["a"] == [ip4(50, 3)]
    assert pair.events["b"] == [HandshakeCompleted(is_initiator=False)]


def test_simultaneous_initiations_both_end_with_working_sessions() -> None:
    pair = WgPair()
    from_a = pair.a.initiate(pair.now, pair.clock.unix())
    from_b = pair.b.initiate(pair.now, pair.clock.unix())
    pair.send("a", from_a)
    pair.clock.tick(0.05)
    pair.send("b", from_b)
    pair.encapsulate("a", ip4(30, 1))
    pair.encapsulate("b", ip4(30, 2))
    assert pair.to_tunnel == {"a": [ip4(30, 2)], "b": [ip4(30, 1)]}
    assert not pair.a.counters and not pair.b.counters


def test_late_packet_on_the_previous_session_still_decrypts() -> None:
    pair = established()
    held = pair.a.encapsulate(ip4(80, 5), pair.now, pair.clock.unix())
    pair.clock.tick(1)
    pair.handshake()  # rekey: b's old session becomes ``previous``
    assert len(pair.events["b"]) == 2
    assert isinstance(held, WriteToNetwork)
    pair.deliver("a", held.datagram)
    assert pair.to_tunnel["b"] == [ip4(80, 5)]


def test_indices_and_demux_helpers() -> None:
    pair = established()
    result = pair.encapsulate("a", ip4(40))
    assert isinstance(result, WriteToNetwork)
    index = receiver_index(result.datagram)
    assert index == pair.b.local_index  # the first session uses local_index itself
    assert pair.b.owns_index(index) and not pair.a.owns_index(index)
    response = pair.log[1].datagram
    assert receiver_index(response) == pair.a.local_index
    assert message_type(b"\x04\0\0") is None and message_type(b"\x04\0\0\x01") is None
    assert message_type(b"\x05\0\0\0") is None and receiver_index(b"\x01\0\0\0" * 40) is None
    pair.clock.tick(1)
    pair.handshake()
    second = pair.encapsulate("a", ip4(40))
    assert isinstance(second, WriteToNetwork)
    new_index = receiver_index(second.datagram)
    assert new_index is not None and new_index != index and pair.b.owns_index(new_index)


# ------------------------------------------------------------------ authentication failures


def test_preshared_key_mismatch_fails_cleanly() -> None:
    pair = WgPair(psk_b=b"\x08" * 32)
    pair.handshake()
    assert pair.drops()[0].result == Dropped("decrypt_failed")
    assert pair.a.counters == {"decrypt_failed": 1}
    assert not pair.a.has_session and not pair.b.has_session
    assert pair.events == {"a": [], "b": []}


def test_psk_on_one_side_only_fails() -> None:
    pair = WgPair(psk_a=None)
    pair.handshake()
    assert pair.a.counters == {"decrypt_failed": 1} and not pair.a.has_session


def test_initiation_from_a_wrong_peer_key_is_dropped() -> None:
    pair = WgPair()
    stranger = StaticKeyPair.generate(random.Random(99))
    impostor = Tunnel(
        static=stranger,
        peer_public=pair.key_b.public,
        preshared_key=PSK,
        local_index=1,
        rate_limiter=HandshakeRateLimiter(stranger.public, random.Random(1)),
        rng=random.Random(2),
        now=pair.now,
    )
    initiation = impostor.initiate(pair.now, pair.clock.unix())
    assert isinstance(initiation, WriteToNetwork)
    result = pair.b.decapsulate(initiation.datagram, ADDR_A, pair.now, pair.clock.unix())
    assert result == Dropped("wrong_peer")
    assert pair.b.counters == {"wrong_peer": 1} and pair.b.poll_transmit() is None


def test_initiation_for_another_responder_fails_mac1() -> None:
    pair = WgPair()
    other = StaticKeyPair.generate(random.Random(98))
    confused = Tunnel(
        static=pair.key_a,
        peer_public=other.public,
        preshared_key=PSK,
        local_index=1,
        rate_limiter=pair.limiter_a,
        rng=random.Random(3),
        now=pair.now,
    )
    initiation = confused.initiate(pair.now, pair.clock.unix())
    assert isinstance(initiation, WriteToNetwork)
    result = pair.b.decapsulate(initiation.datagram, ADDR_A, pair.now, pair.clock.unix())
    assert result == Dropped("bad_mac1")


def test_replayed_initiation_is_refused_by_timestamp() -> None:
    pair = WgPair()
    older = pair.a.initiate(pair.now, pair.clock.unix())
    pair.clock.tick(1)
    newer = pair.a.initiate(pair.now, pair.clock.unix())
    assert isinstance(older, WriteToNetwork) and isinstance(newer, WriteToNetwork)
    unix = pair.clock.unix()
    first = pair.b.decapsulate(newer.datagram, ADDR_A, pair.now, unix)
    assert isinstance(first, WriteToNetwork)
    assert pair.b.decapsulate(newer.datagram, ADDR_A, pair.now, unix) == Dropped("timestamp_replay")
    assert pair.b.decapsulate(older.datagram, ADDR_A, pair.now, unix) == Dropped("timestamp_replay")
    assert pair.b.counters == {"timestamp_replay": 2}


def test_replayed_transport_is_dropped() -> None:
    pair = established()
    sent = pair.encapsulate("a", ip4(60))
    assert isinstance(sent, WriteToNetwork)
    assert pair.deliver("a", sent.datagram) == Dropped("replay")
    assert pair.b.counters == {"replay": 1}
    assert pair.to_tunnel["b"] == [ip4(60)]


# ------------------------------------------------------------------ malformed input


def _valid(pair: WgPair, kind: str) -> bytes:
    """A fresh, valid datagram of ``kind`` addressed to b."""
    unix = pair.clock.unix()
    if kind == "initiation":
        pair.clock.tick(0.1)
        result = pair.a.initiate(pair.now, pair.clock.unix())
    elif kind == "transport":
        result = pair.a.encapsulate(ip4(100), pair.now, unix)
    else:
        raise AssertionError(kind)
    assert isinstance(result, WriteToNetwork)
    return result.datagram


def _flip(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 0x55
    return bytes(out)


MALFORMED: list[tuple[str, Callable[[WgPair], bytes], str]] = [
    ("empty", lambda p: b"", "too_short"),
    ("one byte", lambda p: b"\x01", "too_short"),
    ("three bytes", lambda p: b"\x04\0\0", "too_short"),
    ("short transport", lambda p: b"\x04\0\0\0" + bytes(27), "too_short"),
    ("unknown type 5", lambda p: b"\x05\0\0\0" + bytes(60), "unknown_type"),
    ("type 0", lambda p: bytes(148), "unknown_type"),
    ("reserved not zero", lambda p: b"\x01\x01\0\0" + bytes(144), "unknown_type"),
    ("initiation 147", lambda p: _valid(p, "initiation")[:147], "bad_size"),
    ("initiation 149", lambda p: _valid(p, "initiation") + b"\0", "bad_size"),
    ("response 91", lambda p: b"\x02\0\0\0" + bytes(87), "bad_size"),
    ("cookie 65", lambda p: b"\x03\0\0\0" + bytes(61), "bad_size"),
    ("initiation bad mac1", lambda p: _flip(_valid(p, "initiation"), 120), "bad_mac1"),
    ("initiation body tampered", lambda p: _flip(_valid(p, "initiation"), 60), "bad_mac1"),
    ("response bad mac1", lambda p: b"\x02\0\0\0" + bytes(88), "bad_mac1"),
    ("cookie unknown index", lambda p: b"\x03\0\0\0" + bytes(60), "unknown_index"),
    ("transport unknown index", lambda p: b"\x04\0\0\0\xff\xff\xff\x7f" + bytes(40),
     "unknown_index"),
    ("transport truncated", lambda p: _valid(p, "transport")[:40], "decrypt_failed"),
    ("transport tampered", lambda p: _flip(_valid(p, "transport"), 50), "decrypt_failed"),
    ("transport counter changed", lambda p: _flip(_valid(p, "transport"), 8), "decrypt_failed"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "reason"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_input_is_dropped_and_counted(
    make: Callable[[WgPair], bytes], reason: str
) -> None:
    pair = established()
    datagram = make(pair)
    result = pair.b.decapsulate(datagram, ADDR_A, pair.now, pair.clock.unix())
    assert result == Dropped(reason)
    assert pair.b.counters == {reason: 1}
    assert pair.b.poll_transmit() is None
    pair.encapsulate("a", ip4(40, 7))  # the session still works
    assert pair.to_tunnel["b"][-1] == ip4(40, 7)


def test_response_without_pending_handshake_is_dropped() -> None:
    pair = established()
    response = pair.log[1].datagram  # valid mac1, but a's handshake is done
    assert pair.deliver("b", response) == Dropped("unknown_index")


def _raw_transport(pair: WgPair, plaintext: bytes) -> bytes:
    """Encrypt arbitrary plaintext with a's current session (bypassing padding/IP checks)."""
    session = pair.a._current
    assert session is not None
    counter = session.send_counter
    session.send_counter += 1
    header = b"\x04\0\0\0" + session.remote_index.to_bytes(4, "little")
    nonce = bytes(4) + counter.to_bytes(8, "little")
    return header + counter.to_bytes(8, "little") + session.seal(nonce, plaintext, None)


@pytest.mark.parametrize(
    ("plaintext", "reason"),
    [
        (b"\x12" + bytes(15), "not_ip"),
        (b"\x45\0\0\x10" + bytes(28), "bad_ip_length"),  # shorter than a header
        (b"\x45\0\x01\x00" + bytes(28), "bad_ip_length"),  # longer than the plaintext
        (b"\x45" + bytes(15), "not_ip"),  # too short for an IPv4 header
        (b"\x60\0\0\0\0\x40" + bytes(42), "bad_ip_length"),
    ],
)
def test_authenticated_garbage_is_dropped(plaintext: bytes, reason: str) -> None:
    pair = established()
    assert pair.deliver("a", _raw_transport(pair, plaintext)) == Dropped(reason)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(st.sampled_from([1, 2, 3, 4]), st.binary(max_size=160)).map(
            lambda t: bytes((t[0], 0, 0, 0)) + t[1]
        ),
    )
)
def test_random_bytes_never_raise(datagram: bytes) -> None:
    pair = established()
    for tunnel in (pair.a, pair.b):
        result = tunnel.decapsulate(datagram, ADDR_A, pair.now, pair.clock.unix())
        assert isinstance(result, Dropped)
        assert sum(tunnel.counters.values()) == 1


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["initiation", "transport"]), st.data())
def test_mutated_valid_messages_never_raise(kind: str, data: st.DataObject) -> None:
    pair = established()
    datagram = bytearray(_valid(pair, kind))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(datagram) - 1))
        datagram[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(datagram)))
    result = pair.b.decapsulate(bytes(datagram[:cut]), ADDR_A, pair.now, pair.clock.unix())
    assert isinstance(result, WriteToNetwork | WriteToTunnel | Dropped | DoneType)


# ------------------------------------------------------------------ timers


def test_initiator_rekeys_on_send_after_120_s() -> None:
    pair = established()
    start = pair.now
    pair.run_until(start + REKEY_AFTER_TIME - 1)
    pair.encapsulate("a", ip4(40))
    assert not pair.deliveries("a", 1)[1:]  # only the first handshake so far
    pair.run_until(start + REKEY_AFTER_TIME)
    mark = len(pair.log)
    pair.encapsulate("a", ip4(40, 2))
    assert kinds(pair, mark)[:3] == [("a", 4), ("a", 1), ("b", 2)]
    assert pair.to_tunnel["b"][-1] == ip4(40, 2)  # sent on the old session meanwhile
    assert len(pair.events["a"]) == len(pair.events["b"]) == 2
    pair.encapsulate("a", ip4(40, 3))
    assert pair.to_tunnel["b"][-1] == ip4(40, 3)
    assert not pair.a.counters and not pair.b.counters


def test_responder_does_not_rekey_on_age() -> None:
    pair = established()
    pair.run_until(pair.now + REKEY_AFTER_TIME + 1)
    mark = len(pair.log)
    pair.encapsulate("b", ip4(40))
    assert kinds(pair, mark) == [("b", 4)]


def test_initiator_rekeys_on_receive_near_reject_time() -> None:
    pair = established()
    start = pair.now
    pair.run_until(start + REKEY_ON_RECEIVE_AGE - 1)
    pair.encapsulate("b", ip4(40))
    assert not pair.deliveries("a", 1)[1:]
    pair.run_until(start + REKEY_ON_RECEIVE_AGE)
    mark = len(pair.log)
    pair.encapsulate("b", ip4(40, 1))
    assert ("a", 1) in kinds(pair, mark)
    assert len(pair.events["a"]) == 2


def test_sessions_are_rejected_after_180_s() -> None:
    pair = established()
    start = pair.now
    early = pair.a.encapsulate(b"", pair.now, pair.clock.unix())
    late = pair.a.encapsulate(b"", pair.now, pair.clock.unix())
    assert isinstance(early, WriteToNetwork) and isinstance(late, WriteToNetwork)
    pair.run_until(start + REJECT_AFTER_TIME - 0.001)
    assert pair.deliver("a", early.datagram) is DONE
    pair.run_until(start + REJECT_AFTER_TIME)
    assert pair.deliver("a", late.datagram) == Dropped("expired_session")
    # Sending now needs a new handshake (the responder becomes the initiator here).
    mark = len(pair.log)
    pair.encapsulate("b", ip4(44, 4))
    assert kinds(pair, mark)[:2] == [("b", 1), ("a", 2)]
    assert pair.to_tunnel["a"] == [ip4(44, 4)]


def test_keys_are_erased_after_540_s_without_a_new_session() -> None:
    pair = established()
    start = pair.now
    assert pair.a.poll_timeout() == pair.b.poll_timeout() == start + SESSION_ZERO_AFTER
    pair.run_until(start + SESSION_ZERO_AFTER - 0.001)
    assert pair.events["a"] == [HandshakeCompleted(is_initiator=True)]
    pair.run_until(start + SESSION_ZERO_AFTER)
    for name in ("a", "b"):
        assert pair.events[name][-1] == ConnectionExpired("no_new_session")
        assert not pair.tunnel(name).has_session
        assert pair.tunnel(name).poll_timeout() is None
    assert pair.log[-1].kind == 4  # nothing was sent at expiry


def test_passive_keepalive_10_s_after_receiving_data() -> None:
    pair = established()
    pair.advance(1)
    sent_at = pair.now
    pair.encapsulate("a", ip4(40))
    pair.run_until(sent_at + KEEPALIVE_TIMEOUT - 0.001)
    assert len(pair.deliveries("b", 4)) == 0
    pair.run_until(sent_at + KEEPALIVE_TIMEOUT)
    keepalives = pair.deliveries("b", 4)
    assert [(k.at, len(k.datagram), k.result) for k in keepalives] == [
        (sent_at + KEEPALIVE_TIMEOUT, 32, DONE)
    ]
    pair.advance(30)  # nothing more: a heard back, so no new handshake either
    assert len(pair.deliveries("b", 4)) == 1 and len(pair.deliveries("a", 1)) == 1


def test_no_passive_keepalive_when_data_went_back() -> None:
    pair = established()
    pair.encapsulate("a", ip4(40))
    pair.advance(5)
    pair.encapsulate("b", ip4(40))
    pair.advance(KEEPALIVE_TIMEOUT - 0.5)
    assert [len(d.datagram) for d in pair.deliveries("b", 4)] == [32 + 48]  # data, no keepalive


def test_new_handshake_when_sent_data_gets_no_answer() -> None:
    pair = established()
    pair.drop_to_a = True
    sent_at = pair.now
    pair.encapsulate("a", ip4(40))
    pair.run_until(sent_at + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT - 0.001)
    assert len(pair.deliveries("a", 1)) == 1
    pair.run_until(sent_at + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)
    assert pair.deliveries("a", 1)[-1].at == sent_at + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT


def test_persistent_keepalive_every_25_s_and_it_rekeys() -> None:
    pair = established(keepalive_a=25.0)
    start = pair.now
    pair.run_until(start + 80)
    assert [(k.at - start, len(k.datagram)) for k in pair.deliveries("a", 4)] == [
        (0, 32),
        (25, 32),
        (50, 32),
        (75, 32),
    ]
    assert not pair.deliveries("b", 4)
    pair.run_until(start + 126)  # the keepalive at 125 finds the session older than 120 s
    assert [d.at - start for d in pair.deliveries("a", 1)] == [0, 125]
    assert len(pair.events["a"]) == 2


def test_handshake_retries_every_5_s_with_jitter_then_gives_up_at_90_s() -> None:
    pair = WgPair(drop_to_b=True)
    start = pair.now
    pair.handshake()
    pair.run_until(start + REKEY_ATTEMPT_TIME - 0.001)
    times = [d.at for d in pair.deliveries("a", 1)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 17
    assert all(REKEY_TIMEOUT <= g <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX for g in gaps)
    assert len({round(g, 6) for g in gaps}) > 1  # jittered
    assert len({d.datagram for d in pair.deliveries("a", 1)}) == len(times)  # fresh each time
    assert pair.events["a"] == []
    pair.run_until(start + REKEY_ATTEMPT_TIME)
    assert pair.events["a"] == [ConnectionExpired("handshake_timeout")]
    assert pair.a.poll_timeout() is None and not pair.a.handshake_in_flight


def test_queued_packets_are_discarded_when_the_handshake_gives_up() -> None:
    pair = WgPair(drop_to_b=True)
    pair.encapsulate("a", ip4(40))
    pair.advance(REKEY_ATTEMPT_TIME)
    pair.drop_to_b = False
    pair.handshake()
    assert pair.to_tunnel["b"] == []


def test_message_count_limits() -> None:
    pair = established()
    session = pair.a._current
    assert session is not None
    session.send_counter = REKEY_AFTER_MESSAGES
    pair.advance(REKEY_TIMEOUT)  # no new initiation within 5 s of the last handshake message
    mark = len(pair.log)
    pair.encapsulate("a", ip4(40))
    assert kinds(pair, mark)[:2] == [("a", 4), ("a", 1)]  # sent, then rekeyed

    pair = established()
    session = pair.a._current
    assert session is not None
    session.send_counter = REJECT_AFTER_MESSAGES
    pair.advance(REKEY_TIMEOUT)
    result = pair.a.encapsulate(ip4(40, 1), pair.now, pair.clock.unix())
    assert isinstance(result, WriteToNetwork) and message_type(result.datagram) == 1


# ------------------------------------------------------------------ under load


def test_under_load_an_initiation_is_dropped_without_a_cookie_reply() -> None:
    """1.4 (boringtun without a source address): over the limit, handshakes are dropped.

    A cookie reply would go wherever the initiation claims to come from (through the
    client's path), so a spoofed flood would be reflected onto that client.
    """
    pair = WgPair()
    for _ in range(100):
        pair.limiter_b.note_handshake(pair.now)
    pair.handshake()
    assert kinds(pair) == [("a", 1)]
    assert pair.log[0].result == Dropped("under_load")
    assert pair.b.counters == {"under_load": 1} and not pair.b.has_session
    assert pair.b.poll_transmit() is None
    # The initiator retries after REKEY_TIMEOUT; the window has ended by then.
    retry_at = pair.a.poll_timeout()
    assert retry_at is not None
    pair.run_until(retry_at)
    assert kinds(pair) == [("a", 1), ("a", 1), ("b", 2), ("a", 4)]
    assert pair.a.has_session and pair.b.has_session
    assert pair.b.counters == {"under_load": 1}


def test_under_load_responses_are_dropped_too_and_no_cookie_reply_is_sent() -> None:
    pair = WgPair(limit=0)  # every handshake message is over the limit
    pair.handshake()
    pair.advance(2 * (REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX))
    assert 3 not in {kind for _, kind in kinds(pair)}  # never a cookie reply
    assert not pair.a.has_session and not pair.b.has_session
    assert pair.b.counters["under_load"] >= 2
    pair.handshake("b")  # b's initiation: a is under load too
    assert pair.a.counters["under_load"] >= 1 and not pair.a.has_session


def test_under_load_mac1_is_still_verified_first() -> None:
    pair = WgPair()
    for _ in range(100):
        pair.limiter_b.note_handshake(pair.now)
    initiation = pair.a.initiate(pair.now, pair.clock.unix())
    assert isinstance(initiation, WriteToNetwork)
    bad = bytearray(initiation.datagram)
    bad[20] ^= 1
    assert pair.b.decapsulate(bytes(bad), ADDR_A, pair.now, pair.clock.unix()) == Dropped(
        "bad_mac1"
    )
    assert pair.b.counters == {"bad_mac1": 1}


def test_not_under_load_mac2_is_not_required() -> None:
    pair = WgPair()
    for _ in range(99):
        pair.limiter_b.note_handshake(pair.now)
    pair.handshake()  # the 100th message in this window: still within the limit
    assert pair.b.has_session and not pair.b.counters


# ------------------------------------------------------------------ API and invariants


def test_constructor_rejects_misuse() -> None:
    pair = WgPair()
    base = dict(
        static=pair.key_a,
        peer_public=pair.key_b.public,
        preshared_key=PSK,
        local_index=5,
        rate_limiter=pair.limiter_a,
        rng=random.Random(1),
        now=0.0,
    )
    with pytest.raises(LocalProtocolError):
        Tunnel(**{**base, "rate_limiter": pair.limiter_b})  # type: ignore[arg-type]
    for bad in ({"local_index": -1}, {"local_index": 1 << 32}, {"preshared_key": b"x"},
                {"persistent_keepalive": 0.0}, {"peer_public": bytes(32)}):  # fmt: skip
        with pytest.raises(ValueError):
            Tunnel(**{**base, **bad})  # type: ignore[arg-type]


def test_done_is_a_singleton_and_results_print_without_keys() -> None:
    assert DoneType() is DONE and repr(DONE) == "DONE"
    pair = established()
    assert "private" not in repr(pair.a) and pair.key_a.private.hex() not in repr(pair.a)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abxyz"), st.floats(0, 40)), max_size=25))
def test_random_traffic_and_time_keep_deadlines_moving(ops: list[tuple[str, float]]) -> None:
    """run_until asserts poll_timeout() > now after every handle_timeout."""
    pair = WgPair(keepalive_a=25.0, keepalive_b=25.0)
    for op, seconds in ops:
        if op in "ab":
            pair.encapsulate(op, ip4(40))
        elif op == "x":
            pair.drop_to_a = not pair.drop_to_a
        elif op == "y":
            pair.drop_to_b = not pair.drop_to_b
        pair.advance(seconds * (10 if op == "z" else 1))
    for tunnel in (pair.a, pair.b):
        deadline = tunnel.poll_timeout()
        assert deadline is None or deadline > pair.now


# ------------------------------------------------------------------ batches

RECIPES = st.lists(
    st.one_of(
        st.tuples(st.just("data"), st.integers(20, 1400)),
        st.tuples(st.just("keepalive"), st.just(0)),
        st.tuples(st.just("replay"), st.integers(0, 50)),
        st.tuples(st.just("tamper"), st.integers(0, 50)),
        st.tuples(st.just("garbage"), st.integers(0, 200)),
        st.tuples(st.just("not_ip"), st.just(0)),
        st.tuples(st.just("initiation"), st.just(0)),
    ),
    max_size=40,
)


def _make_batch(pair: WgPair, sender: str, recipes: list[tuple[str, int]]) -> list[bytes]:
    """Datagrams from ``sender`` as the recipes say; the same on twin pairs (same seed)."""
    tunnel = pair.tunnel(sender)
    out: list[bytes] = []
    for kind, n in recipes:
        unix = pair.clock.unix()
        if kind in ("data", "keepalive"):
            result = tunnel.encapsulate(ip4(n, tag=n) if n else b"", pair.now, unix)
        elif kind == "initiation":
            result = tunnel.initiate(pair.now, unix)
        elif kind in ("replay", "tamper"):
            if not out:
                continue
            earlier = out[n % len(out)]
            out.append(earlier if kind == "replay" else _flip(earlier, n % len(earlier)))
            continue
        elif kind == "garbage":
            out.append(bytes([4, 0, 0, 0]) + bytes(range(n % 256))[:n])
            continue
        else:  # authenticated, but not an IP packet
            session = tunnel._current
            assert session is not None
            counter = session.send_counter
            session.send_counter += 1
            nonce = bytes(4) + counter.to_bytes(8, "little")
            body = session.seal(nonce, b"\x12" + bytes(15), None)
            out.append(b"\x04\0\0\0" + session.remote_index.to_bytes(4, "little")
                       + counter.to_bytes(8, "little") + body)  # fmt: skip
            continue
        if isinstance(result, WriteToNetwork):
            out.append(result.datagram)
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    recipes=RECIPES,
    receiver=st.sampled_from(["a", "b"]),
    age=st.sampled_from([0.0, REKEY_ON_RECEIVE_AGE + 1, REJECT_AFTER_TIME + 1]),
)
def test_a_batch_decapsulates_exactly_like_one_call_per_datagram(
    recipes: list[tuple[str, int]], receiver: str, age: float
) -> None:
    """decapsulate_many is an optimisation: packets, other results, counters, byte counts,
    deadlines and events all match a twin tunnel fed one datagram at a time."""
    sender = "b" if receiver == "a" else "a"
    twins = [established(), established()]
    batches = []
    for pair in twins:
        pair.clock.tick(age / 2)  # sessions old enough for rekey-on-receive or rejection
        batches.append(_make_batch(pair, sender, recipes))
        pair.clock.tick(age / 2)
    assert batches[0] == batches[1]
    one, many = (pair.tunnel(receiver) for pair in twins)
    src = ADDR_A if sender == "a" else ADDR_B
    now, unix = twins[0].now, twins[0].clock.unix()
    expected_packets, expected_others = [], []
    for datagram in batches[0]:
        result = one.decapsulate(datagram, src, now, unix)
        if isinstance(result, WriteToTunnel):
            expected_packets.append(result.packet)
        elif result is not DONE:
            expected_others.append(result)
    packets: list[bytes] = []
    others = many.decapsulate_many([(d, src) for d in batches[1]], now, unix, packets)
    assert packets == expected_packets
    assert others == expected_others
    assert many.counters == one.counters
    assert (many.rx_bytes, many.tx_bytes) == (one.rx_bytes, one.tx_bytes)
    assert many.poll_timeout() == one.poll_timeout()
    drained = [[], []]  # type: ignore[var-annotated]
    for tunnel, sink in ((one, drained[0]), (many, drained[1])):
        while (datagram := tunnel.poll_transmit()) is not None:
            sink.append(datagram)
        while (event := tunnel.poll_event()) is not None:
            sink.append(event)
    assert drained[0] == drained[1]


def test_a_batch_across_a_rekey_confirms_the_new_session() -> None:
    """Old-session packets, then the first ones on the new session, in one batch: the
    responder confirms its next session mid-batch and delivers every packet in order."""
    pair = established()
    pair.clock.tick(1.0)
    old = [pair.a.encapsulate(ip4(60, tag=i), pair.now, pair.clock.unix()) for i in range(3)]
    initiation = pair.a.initiate(pair.now, pair.clock.unix())
    assert isinstance(initiation, WriteToNetwork)
    response = pair.b.decapsulate(initiation.datagram, ADDR_A, pair.now, pair.clock.unix())
    assert isinstance(response, WriteToNetwork)
    confirm = pair.a.decapsulate(response.datagram, ADDR_B, pair.now, pair.clock.unix())
    assert isinstance(confirm, WriteToNetwork)  # a's first packet on the new session
    new = [pair.a.encapsulate(ip4(60, tag=10 + i), pair.now, pair.clock.unix())
           for i in range(3)]  # fmt: skip
    batch = [r.datagram for r in (*old, confirm, *new) if isinstance(r, WriteToNetwork)]
    packets: list[bytes] = []
    others = pair.b.decapsulate_many([(d, ADDR_A) for d in batch], pair.now,
                                     pair.clock.unix(), packets)  # fmt: skip
    assert others == []
    assert packets == [ip4(60, tag=t) for t in (0, 1, 2, 10, 11, 12)]
    assert pair.b.poll_event() == HandshakeCompleted(is_initiator=False)
    assert not pair.b.counters
