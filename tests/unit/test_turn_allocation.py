"""TURN client (Allocation) driven by a scripted relay and an injected clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import MalformedPacket
from gateway.stun.message import (
    Attr,
    MessageClass,
    Method,
    StunMessage,
    encode,
    long_term_key,
    looks_like_stun,
    new_response,
    parse,
    verify_integrity,
)
from gateway.turn.allocation import (
    ALLOCATE_RETRIES,
    ALLOCATE_RETRY_DELAY,
    AUTHENTICATION_ERROR,
    NO_RESPONSE,
    Allocation,
    AllocationEvent,
    AllocationFailed,
    CandidateAdded,
    CandidateRemoved,
)
from gateway.turn.channel_data import encode_channel_data

SERVER = ("192.0.2.1", 3478)
SERVER6 = ("2001:db8::1", 3478)
LOCAL = ("10.0.0.2", 50000)
LOCAL6 = ("fd00::2", 50001)
MAPPED = ("203.0.113.5", 40000)
MAPPED6 = ("2001:db8::55", 40001)
RELAY = ("192.0.2.1", 50123)
RELAY6 = ("2001:db8::1", 50124)
PEER = ("198.51.100.7", 51820)
PEER2 = ("198.51.100.8", 51820)
USER, PASSWORD, REALM = "1700000000:salt", "secret-password", "firezone"
KEY = long_term_key(USER, REALM, PASSWORD)
#: The same relay's credentials in a later init (the portal draws new ones every time).
USER2, PASSWORD2 = "1700000001:salt2", "rotated-password"
KEY2 = long_term_key(USER2, REALM, PASSWORD2)
SOFTWARE = "snownet; session=ABCD"
T0 = 1000.0


class Relay:
    """Scripted relay: reads what the allocation sent and answers it."""

    def __init__(self, alloc: Allocation) -> None:
        self.alloc = alloc

    def sent(self) -> list[tuple[tuple[str, int], StunMessage, bytes]]:
        out = []
        while (tx := self.alloc.poll_transmit()) is not None:
            assert tx.src is None
            out.append((tx.dst, parse(tx.payload), tx.payload))
        return out

    def one(self, method: int | None = None) -> tuple[tuple[str, int], StunMessage, bytes]:
        sent = self.sent()
        assert len(sent) == 1, sent
        if method is not None:
            assert sent[0][1].method == method
        return sent[0]

    def answer(
        self,
        request: StunMessage,
        cls: int = MessageClass.SUCCESS,
        attrs: list[tuple[int, bytes]] | None = None,
        *,
        now: float,
        src: tuple[str, int] = SERVER,
        local: tuple[str, int] = LOCAL,
        key: bytes | None = KEY,
        error: tuple[int, str] | None = None,
        xor: list[tuple[int, tuple[str, int]]] | None = None,
    ) -> bool:
        resp = new_response(request, cls)
        if error is not None:
            resp.add_error_code(*error)
        for attr, addr in xor or []:
            resp.add_xor_address(attr, addr)
        for attr, value in attrs or []:
            resp.add(attr, value)
        raw = encode(resp, integrity_key=key, fingerprint=True)
        return self.alloc.handle_stun(parse(raw), raw, src, local, now)

    def challenge(self, request: StunMessage, now: float, nonce: str = "nonce-1") -> None:
        self.answer(
            request,
            MessageClass.ERROR,
            [(Attr.REALM, REALM.encode()), (Attr.NONCE, nonce.encode())],
            error=(401, "Unauthorized"),
            key=None,
            now=now,
        )


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def events(alloc: Allocation) -> list[AllocationEvent]:
    out = []
    while (event := alloc.poll_event()) is not None:
        out.append(event)
    return out


def new_alloc(servers: list[tuple[str, int]] | None = None, now: float = T0) -> Allocation:
    return Allocation(
        relay_id="relay-1",
        servers=servers or [SERVER],
        username=USER,
        password=PASSWORD,
        software=SOFTWARE,
        rng=random.Random(42),
        now=now,
    )


def tick(alloc: Allocation, now: float) -> None:
    """handle_timeout, then check the no-busy-loop rule."""
    alloc.handle_timeout(now)
    deadline = alloc.poll_timeout()
    assert deadline is None or deadline > now, (deadline, now)


def allocated(
    relays: list[tuple[str, int]] | None = None, lifetime: int = 600, now: float = T0
) -> tuple[Allocation, Relay]:
    alloc = new_alloc(now=now)
    relay = Relay(alloc)
    _, binding, _ = relay.one(Method.BINDING)
    relay.answer(binding, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=now)
    _, first, _ = relay.one(Method.ALLOCATE)
    relay.challenge(first, now)
    _, second, _ = relay.one(Method.ALLOCATE)
    relay.answer(
        second,
        xor=[(Attr.XOR_RELAYED_ADDRESS, r) for r in (relays or [RELAY])],
        attrs=[(Attr.LIFETIME, u32(lifetime))],
        now=now,
    )
    events(alloc)
    return alloc, relay


def bound(alloc: Allocation, relay: Relay, peer: tuple[str, int], now: float) -> int:
    alloc.bind_channel(peer, now)
    _, req, _ = relay.one(Method.CHANNEL_BIND)
    relay.answer(req, now=now)
    number = alloc.channel_for(peer)
    assert number is not None
    return number


# ---- start: BINDING -----------------------------------------------------------------------


def test_starts_with_unauthenticated_binding_to_every_server() -> None:
    alloc = new_alloc([SERVER, SERVER6])
    sent = Relay(alloc).sent()
    assert [dst for dst, _, _ in sent] == [SERVER, SERVER6]
    for _, msg, _ in sent:
        assert (msg.method, msg.cls) == (Method.BINDING, MessageClass.REQUEST)
        assert msg.attributes == [(Attr.SOFTWARE, SOFTWARE.encode())]
    assert alloc.server_addresses() == frozenset({SERVER, SERVER6})
    assert alloc.active_server() is None
    assert alloc.poll_timeout() == T0 + 1.0


def test_first_binding_response_picks_the_active_server() -> None:
    alloc = new_alloc([SERVER, SERVER6])
    relay = Relay(alloc)
    (_, b4, _), (_, b6, _) = relay.sent()
    now = T0 + 0.05
    relay.answer(
        b6, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED6)], src=SERVER6, local=LOCAL6, key=None, now=now
    )
    assert alloc.active_server() == SERVER6
    dst, allocate, _ = relay.one(Method.ALLOCATE)
    assert dst == SERVER6
    # the first ALLOCATE goes out unsigned to fetch the nonce
    assert allocate.attributes == [
        (Attr.REQUESTED_TRANSPORT, b"\x11\x00\x00\x00"),
        (Attr.ADDITIONAL_ADDRESS_FAMILY, b"\x02\x00\x00\x00"),
        (Attr.SOFTWARE, SOFTWARE.encode()),
    ]
    relay.answer(b4, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=now)
    assert relay.sent() == []  # no second ALLOCATE
    assert alloc.active_server() == SERVER6
    assert events(alloc) == [
        CandidateAdded("srflx", MAPPED6, LOCAL6),
        CandidateAdded("srflx", MAPPED, LOCAL),
    ]
    assert alloc.srflx_addresses() == [(MAPPED, LOCAL), (MAPPED6, LOCAL6)]


def test_binding_retransmits_then_frees_the_allocation() -> None:
    alloc = new_alloc()
    relay = Relay(alloc)
    _, first, raw = relay.one(Method.BINDING)
    sends = []
    now = T0
    while not alloc.is_freed:
        deadline = alloc.poll_timeout()
        assert deadline is not None
        now = deadline
        tick(alloc, now)
        for _, msg, again in relay.sent():
            assert msg.transaction_id == first.transaction_id and again == raw
            sends.append(round(now - T0, 4))
    assert sends == [1.0, 2.5, 4.75, 8.125]
    assert now - T0 == pytest.approx(13.1875)
    assert events(alloc) == [AllocationFailed(NO_RESPONSE)]
    assert alloc.poll_timeout() is None


def test_one_answered_binding_is_enough() -> None:
    alloc = new_alloc([SERVER, SERVER6])
    relay = Relay(alloc)
    (_, b4, _), _ = relay.sent()
    relay.answer(b4, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=T0 + 0.1)
    for _ in range(20):
        deadline = alloc.poll_timeout()
        if deadline is None:
            break
        tick(alloc, deadline)
        relay.sent()
    assert not alloc.is_freed


# ---- authentication -----------------------------------------------------------------------


def test_401_nonce_then_signed_allocate_and_success() -> None:
    alloc = new_alloc()
    relay = Relay(alloc)
    _, binding, _ = relay.one()
    relay.answer(binding, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=T0)
    _, first, _ = relay.one(Method.ALLOCATE)
    relay.challenge(first, T0, nonce="abc")
    dst, signed, raw = relay.one(Method.ALLOCATE)
    assert dst == SERVER and signed.transaction_id != first.transaction_id
    assert [k for k, _ in signed.attributes] == [
        Attr.REQUESTED_TRANSPORT,
        Attr.ADDITIONAL_ADDRESS_FAMILY,
        Attr.SOFTWARE,
        Attr.USERNAME,
        Attr.REALM,
        Attr.NONCE,
        Attr.MESSAGE_INTEGRITY,
    ]
    assert (signed.username(), signed.realm(), signed.nonce()) == (USER, REALM, "abc")
    assert verify_integrity(raw, KEY)
    assert raw[-24:-20] == b"\x00\x08\x00\x14"  # MESSAGE-INTEGRITY last: no FINGERPRINT
    relay.answer(
        signed,
        xor=[(Attr.XOR_RELAYED_ADDRESS, RELAY)],
        attrs=[(Attr.LIFETIME, u32(600))],
        now=T0 + 0.1,
    )
    assert events(alloc) == [
        CandidateAdded("srflx", MAPPED, LOCAL),
        CandidateAdded("relay", RELAY, None),
    ]
    assert alloc.relay_addresses() == [RELAY]
    assert alloc.poll_timeout() == T0 + 0.1 + 300


def test_two_relayed_addresses_give_two_candidates() -> None:
    alloc, _ = allocated([RELAY, RELAY6])
    assert alloc.relay_addresses() == [RELAY, RELAY6]


def test_stale_nonce_resends_with_new_nonce() -> None:
    alloc, relay = allocated()
    alloc.refresh(T0 + 1)
    _, refresh, _ = relay.one(Method.REFRESH)
    assert refresh.nonce() == "nonce-1"
    relay.answer(
        refresh,
        MessageClass.ERROR,
        [(Attr.REALM, b"firezone"), (Attr.NONCE, b"n2")],
        error=(438, "Stale Nonce"),
        key=None,
        now=T0 + 1,
    )
    _, again, raw = relay.one(Method.REFRESH)
    assert again.nonce() == "n2" and again.transaction_id != refresh.transaction_id
    assert verify_integrity(raw, KEY)
    assert not alloc.is_freed


def test_401_to_a_request_with_nonce_frees_the_allocation() -> None:
    alloc, relay = allocated()
    alloc.refresh(T0 + 1)
    _, refresh, _ = relay.one(Method.REFRESH)
    relay.challenge(refresh, T0 + 1)
    assert alloc.is_freed
    assert events(alloc) == [
        CandidateRemoved("relay", RELAY),
        AllocationFailed(AUTHENTICATION_ERROR),
    ]
    assert alloc.poll_timeout() is None and relay.sent() == []
    alloc.refresh(T0 + 2)
    alloc.bind_channel(PEER, T0 + 2)
    assert relay.sent() == []


def test_wrong_realm_is_refused() -> None:
    alloc = new_alloc()
    relay = Relay(alloc)
    _, binding, _ = relay.one()
    relay.answer(binding, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=T0)
    _, first, _ = relay.one(Method.ALLOCATE)
    relay.answer(
        first,
        MessageClass.ERROR,
        [(Attr.REALM, b"evil"), (Attr.NONCE, b"n")],
        error=(401, "Unauthorized"),
        key=None,
        now=T0,
    )
    assert relay.sent() == []
    assert alloc.counters["wrong_realm"] == 1
    assert not alloc.is_freed and alloc.relay_addresses() == []


# ---- retransmission of authenticated requests ---------------------------------------------


def test_allocate_retransmits_with_fresh_ids_then_gives_up() -> None:
    alloc = new_alloc()
    relay = Relay(alloc)
    _, binding, _ = relay.one()
    relay.answer(binding, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=T0)
    _, first, _ = relay.one(Method.ALLOCATE)
    ids = {first.transaction_id}
    sends = []
    while (deadline := alloc.poll_timeout()) is not None:
        tick(alloc, deadline)
        for _, msg, _ in relay.sent():
            assert msg.method == Method.ALLOCATE and msg.transaction_id not in ids
            ids.add(msg.transaction_id)
            sends.append(round(deadline - T0, 4))
    assert sends == [1.0, 2.5, 4.75, 8.125]
    assert not alloc.is_freed  # suspended, not freed
    # a late answer to an earlier transaction id is consumed but ignored
    assert relay.answer(
        first,
        xor=[(Attr.XOR_RELAYED_ADDRESS, RELAY)],
        attrs=[(Attr.LIFETIME, u32(600))],
        key=None,
        now=T0 + 20,
    )
    assert alloc.relay_addresses() == []
    # refresh() of a suspended allocation starts over from BINDING
    alloc.refresh(T0 + 30)
    sent = relay.sent()
    assert [m.method for _, m, _ in sent] == [Method.BINDING]


# ---- lifetime and refresh -----------------------------------------------------------------


def test_refresh_at_half_lifetime_and_relay_raised_lifetime() -> None:
    alloc, relay = allocated(lifetime=600)
    assert alloc.poll_timeout() == T0 + 300
    tick(alloc, T0 + 299)
    assert relay.sent() == []
    tick(alloc, T0 + 300)
    _, refresh, raw = relay.one(Method.REFRESH)
    assert refresh.lifetime() is None
    assert refresh.get(Attr.REQUESTED_TRANSPORT) == b"\x11\x00\x00\x00"
    assert refresh.get(Attr.ADDITIONAL_ADDRESS_FAMILY) == b"\x02\x00\x00\x00"
    assert verify_integrity(raw, KEY)
    assert alloc.poll_timeout() == T0 + 301  # retransmission, not the refresh again
    relay.answer(refresh, attrs=[(Attr.LIFETIME, u32(3600))], now=T0 + 300.2)
    assert alloc.poll_timeout() == pytest.approx(T0 + 300.2 + 1800)
    assert events(alloc) == []


def test_refresh_give_up_invalidates_relay_candidates() -> None:
    alloc, relay = allocated()
    tick(alloc, T0 + 300)
    relay.one(Method.REFRESH)
    while alloc.relay_addresses():
        deadline = alloc.poll_timeout()
        assert deadline is not None
        tick(alloc, deadline)
        relay.sent()
    assert deadline == pytest.approx(T0 + 313.1875)
    assert events(alloc) == [CandidateRemoved("relay", RELAY)]
    assert alloc.active_server() is None and not alloc.is_freed
    assert alloc.poll_timeout() is None
    alloc.refresh(T0 + 400)
    assert [m.method for _, m, _ in relay.sent()] == [Method.BINDING]


def test_allocation_expires_at_lifetime() -> None:
    alloc, relay = allocated(lifetime=20)
    tick(alloc, T0 + 10)
    relay.one(Method.REFRESH)
    for t in (11, 12.5, 14.75, 18.125):
        tick(alloc, T0 + t)
        relay.one(Method.REFRESH)
    tick(alloc, T0 + 20)
    assert events(alloc) == [CandidateRemoved("relay", RELAY)]
    assert alloc.relay_addresses() == []


def test_refresh_with_lifetime_zero_success_after_deallocate() -> None:
    alloc, relay = allocated()
    number = bound(alloc, relay, PEER, T0 + 1)
    alloc.deallocate(T0 + 2)
    assert events(alloc) == [CandidateRemoved("relay", RELAY)]
    assert alloc.encapsulate(PEER, b"x", T0 + 2) is None and number == 0x4000
    _, delete, raw = relay.one(Method.REFRESH)
    assert delete.lifetime() == 0 and verify_integrity(raw, KEY)
    relay.answer(delete, attrs=[(Attr.LIFETIME, u32(0))], now=T0 + 2.1)
    assert relay.sent() == [] and events(alloc) == []
    assert alloc.poll_timeout() is None and not alloc.is_freed


# ---- 437 and other errors -----------------------------------------------------------------


def challenged() -> tuple[Allocation, Relay]:
    """An allocation whose first ALLOCATE got its nonce: the next one is signed."""
    alloc = new_alloc()
    relay = Relay(alloc)
    _, binding, _ = relay.one()
    relay.answer(binding, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=T0)
    _, first, _ = relay.one(Method.ALLOCATE)
    relay.challenge(first, T0)
    return alloc, relay


def test_437_to_allocate_deletes_then_allocates_again() -> None:
    alloc, relay = challenged()
    _, signed, _ = relay.one(Method.ALLOCATE)
    relay.answer(signed, MessageClass.ERROR, error=(437, "Allocation Mismatch"), now=T0)
    _, delete, _ = relay.one(Method.REFRESH)
    assert delete.lifetime() == 0
    relay.answer(delete, attrs=[(Attr.LIFETIME, u32(0))], now=T0)
    _, again, _ = relay.one(Method.ALLOCATE)
    relay.answer(
        again, xor=[(Attr.XOR_RELAYED_ADDRESS, RELAY)], attrs=[(Attr.LIFETIME, u32(600))], now=T0
    )
    assert alloc.relay_addresses() == [RELAY]


def test_437_whose_delete_is_refused_retries_the_allocate_shortly() -> None:
    """The stale allocation belongs to other credentials (441 to our delete): it is on its
    way out, so ALLOCATE again after a second, a bounded number of times."""
    alloc, relay = challenged()
    for attempt in range(ALLOCATE_RETRIES + 1):
        _, signed, _ = relay.one(Method.ALLOCATE)
        relay.answer(signed, MessageClass.ERROR, error=(437, "Allocation Mismatch"), now=T0)
        _, delete, _ = relay.one(Method.REFRESH)
        relay.answer(delete, MessageClass.ERROR, error=(441, "Wrong Credentials"), now=T0)
        if attempt == ALLOCATE_RETRIES:
            break
        assert alloc.poll_timeout() == T0 + ALLOCATE_RETRY_DELAY
        tick(alloc, T0 + ALLOCATE_RETRY_DELAY - 0.01)
        assert relay.sent() == [], "not before the delay"
        tick(alloc, T0 + ALLOCATE_RETRY_DELAY)
    # Out of retries: no more ALLOCATE until a refresh restarts it.
    assert alloc.poll_timeout() != T0 + ALLOCATE_RETRY_DELAY
    tick(alloc, T0 + 5)
    assert not [m for m in relay.sent() if m[1].method == Method.ALLOCATE]


def test_an_init_during_the_437_retry_delay_waits_for_the_retry() -> None:
    """Neither a refresh nor new credentials start a second round beside the retry; the
    retry, a new ALLOCATE, takes the new credentials."""
    alloc, relay = challenged()
    _, signed, _ = relay.one(Method.ALLOCATE)
    relay.answer(signed, MessageClass.ERROR, error=(437, "Allocation Mismatch"), now=T0)
    _, delete, _ = relay.one(Method.REFRESH)
    relay.answer(delete, MessageClass.ERROR, error=(441, "Wrong Credentials"), now=T0)
    alloc.refresh(T0 + 0.5)
    alloc.update_credentials(USER2, PASSWORD2, T0 + 0.5)
    assert relay.sent() == []
    tick(alloc, T0 + ALLOCATE_RETRY_DELAY)
    _, again, raw = relay.one(Method.ALLOCATE)
    assert again.username() == USER2 and verify_integrity(raw, KEY2)


def test_437_whose_delete_is_refused_then_succeeds() -> None:
    alloc, relay = challenged()
    _, signed, _ = relay.one(Method.ALLOCATE)
    relay.answer(signed, MessageClass.ERROR, error=(437, "Allocation Mismatch"), now=T0)
    _, delete, _ = relay.one(Method.REFRESH)
    relay.answer(delete, MessageClass.ERROR, error=(441, "Wrong Credentials"), now=T0)
    tick(alloc, T0 + ALLOCATE_RETRY_DELAY)
    _, again, _ = relay.one(Method.ALLOCATE)
    relay.answer(
        again, xor=[(Attr.XOR_RELAYED_ADDRESS, RELAY)], attrs=[(Attr.LIFETIME, u32(600))],
        now=T0 + ALLOCATE_RETRY_DELAY,
    )
    assert alloc.relay_addresses() == [RELAY]


def test_437_to_refresh_allocates_again() -> None:
    alloc, relay = allocated()
    alloc.refresh(T0 + 5)
    _, refresh, _ = relay.one(Method.REFRESH)
    relay.answer(refresh, MessageClass.ERROR, error=(437, "Allocation Mismatch"), now=T0 + 5)
    assert events(alloc) == [CandidateRemoved("relay", RELAY)]
    _, allocate, _ = relay.one(Method.ALLOCATE)
    relay.answer(
        allocate,
        xor=[(Attr.XOR_RELAYED_ADDRESS, RELAY6)],
        attrs=[(Attr.LIFETIME, u32(600))],
        now=T0 + 5,
    )
    assert events(alloc) == [CandidateAdded("relay", RELAY6, None)]


def test_437_to_channel_bind_allocates_again_and_rebinds() -> None:
    alloc, relay = allocated()
    alloc.bind_channel(PEER, T0 + 1)
    _, bind, _ = relay.one(Method.CHANNEL_BIND)
    relay.answer(bind, MessageClass.ERROR, error=(437, "Allocation Mismatch"), now=T0 + 1)
    _, allocate, _ = relay.one(Method.ALLOCATE)
    relay.answer(
        allocate,
        xor=[(Attr.XOR_RELAYED_ADDRESS, RELAY)],
        attrs=[(Attr.LIFETIME, u32(600))],
        now=T0 + 1,
    )
    _, rebind, _ = relay.one(Method.CHANNEL_BIND)
    assert rebind.xor_address(Attr.XOR_PEER_ADDRESS) == PEER


def test_allocate_error_clears_buffered_channel_bindings() -> None:
    alloc = new_alloc()
    relay = Relay(alloc)
    alloc.bind_channel(PEER, T0)
    _, binding, _ = relay.one()
    relay.answer(binding, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=T0)
    _, first, _ = relay.one(Method.ALLOCATE)
    relay.challenge(first, T0)
    _, signed, _ = relay.one(Method.ALLOCATE)
    relay.answer(signed, MessageClass.ERROR, error=(486, "Allocation Quota Reached"), now=T0)
    assert alloc.counters["error_486"] == 1
    alloc.refresh(T0 + 1)
    _, binding, _ = relay.one(Method.BINDING)
    relay.answer(binding, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=T0 + 1)
    _, allocate, _ = relay.one(Method.ALLOCATE)
    relay.answer(
        allocate,
        xor=[(Attr.XOR_RELAYED_ADDRESS, RELAY)],
        attrs=[(Attr.LIFETIME, u32(600))],
        now=T0 + 1,
    )
    assert relay.sent() == []  # the buffered binding is gone


def test_420_drops_the_unknown_attribute_from_then_on() -> None:
    alloc, relay = allocated()
    alloc.refresh(T0 + 1)
    _, refresh, _ = relay.one(Method.REFRESH)
    relay.answer(
        refresh,
        MessageClass.ERROR,
        [(Attr.UNKNOWN_ATTRIBUTES, b"\x00\x19\x00\x00")],
        error=(420, "Unknown Attribute"),
        now=T0 + 1,
    )
    _, again, _ = relay.one(Method.REFRESH)
    assert again.get(Attr.REQUESTED_TRANSPORT) is None
    assert again.get(Attr.ADDITIONAL_ADDRESS_FAMILY) is not None
    relay.answer(again, attrs=[(Attr.LIFETIME, u32(600))], now=T0 + 1)
    tick(alloc, T0 + 301)
    _, later, _ = relay.one(Method.REFRESH)
    assert later.get(Attr.REQUESTED_TRANSPORT) is None
    # a 420 naming nothing we sent is an ordinary REFRESH error: allocate again
    relay.answer(
        later,
        MessageClass.ERROR,
        [(Attr.UNKNOWN_ATTRIBUTES, b"\x00\x31\x00\x00")],
        error=(420, "Unknown Attribute"),
        now=T0 + 301,
    )
    assert [m.method for _, m, _ in relay.sent()] == [Method.ALLOCATE]


# ---- response validation ------------------------------------------------------------------


def test_responses_from_a_wrong_address_are_ignored() -> None:
    alloc = new_alloc([SERVER, SERVER6])
    relay = Relay(alloc)
    (_, b4, _), _ = relay.sent()
    assert not relay.answer(
        b4, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, src=("192.0.2.99", 3478), now=T0
    )
    assert relay.answer(b4, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, src=SERVER6, now=T0)
    assert alloc.counters["wrong_source"] == 1 and alloc.active_server() is None
    assert relay.answer(b4, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=T0)
    assert alloc.active_server() == SERVER


def test_integrity_failure_is_dropped_and_the_request_stays_pending() -> None:
    alloc, relay = allocated()
    alloc.refresh(T0 + 1)
    _, refresh, _ = relay.one(Method.REFRESH)
    bad_key = long_term_key(USER, REALM, "wrong")
    relay.answer(refresh, attrs=[(Attr.LIFETIME, u32(60))], key=bad_key, now=T0 + 1)
    relay.answer(refresh, attrs=[(Attr.LIFETIME, u32(60))], key=None, now=T0 + 1)
    assert alloc.counters["integrity_failed"] == 1
    assert alloc.counters["missing_integrity"] == 1
    assert alloc.poll_timeout() == T0 + 2  # still waiting for an authentic answer
    relay.answer(refresh, attrs=[(Attr.LIFETIME, u32(60))], now=T0 + 1.5)
    assert alloc.poll_timeout() == T0 + 1.5 + 30


def test_oversized_and_unsolicited_messages_are_consumed_and_dropped() -> None:
    alloc, relay = allocated()
    alloc.refresh(T0 + 1)
    _, refresh, _ = relay.one(Method.REFRESH)
    assert relay.answer(
        refresh, attrs=[(Attr.LIFETIME, u32(60)), (Attr.SOFTWARE, b"x" * 1400)], now=T0 + 1
    )
    assert alloc.counters["oversized"] == 1
    stray = StunMessage(Method.REFRESH, MessageClass.SUCCESS, bytes(12))
    raw = encode(stray)
    assert alloc.handle_stun(parse(raw), raw, SERVER, LOCAL, T0 + 1)
    assert alloc.counters["unknown_transaction"] == 1
    request = StunMessage(Method.BINDING, MessageClass.REQUEST, bytes(12))
    raw = encode(request)
    assert alloc.handle_stun(parse(raw), raw, SERVER, LOCAL, T0 + 1)
    assert alloc.counters["not_a_response"] == 1


# ---- channels -----------------------------------------------------------------------------


def test_channel_bind_buffered_until_allocated_then_data_both_ways() -> None:
    alloc = new_alloc()
    relay = Relay(alloc)
    alloc.bind_channel(PEER, T0)
    alloc.bind_channel(PEER, T0)  # once is enough
    _, binding, _ = relay.one(Method.BINDING)
    relay.answer(binding, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=T0)
    _, first, _ = relay.one(Method.ALLOCATE)
    relay.challenge(first, T0)
    _, signed, _ = relay.one(Method.ALLOCATE)
    relay.answer(
        signed, xor=[(Attr.XOR_RELAYED_ADDRESS, RELAY)], attrs=[(Attr.LIFETIME, u32(600))], now=T0
    )
    dst, bind, raw = relay.one(Method.CHANNEL_BIND)
    assert dst == SERVER and verify_integrity(raw, KEY)
    assert bind.xor_address(Attr.XOR_PEER_ADDRESS) == PEER
    assert bind.channel_number() == 0x4000
    assert [k for k, _ in bind.attributes][:3] == [
        Attr.XOR_PEER_ADDRESS,
        Attr.CHANNEL_NUMBER,
        Attr.SOFTWARE,
    ]
    assert alloc.encapsulate(PEER, b"early", T0) is None  # not confirmed yet
    assert alloc.counters["no_channel"] == 1
    assert alloc.decapsulate(encode_channel_data(0x4000, b"x"), SERVER, T0) is None
    relay.answer(bind, now=T0 + 0.1)
    assert alloc.has_channel(PEER) and alloc.channel_for(PEER) == 0x4000

    tx = alloc.encapsulate(PEER, b"payload", T0 + 1)
    assert tx is not None and tx.src is None and tx.dst == SERVER
    assert tx.payload == b"\x40\x00\x00\x07payload"  # no padding
    # receive: padding tolerated, length truncates, other sources and channels dropped
    padded = encode_channel_data(0x4000, b"hello") + b"\x00\x00\x00"
    assert alloc.decapsulate(padded, SERVER, T0 + 1) == (PEER, b"hello", RELAY)
    assert alloc.decapsulate(padded, ("192.0.2.99", 3478), T0 + 1) is None
    assert alloc.decapsulate(encode_channel_data(0x4001, b"x"), SERVER, T0 + 1) is None
    assert alloc.decapsulate(b"\x40\x00\x00\x09short", SERVER, T0 + 1) is None
    assert alloc.counters["unknown_channel"] == 2
    assert alloc.counters["malformed_channel_data"] == 1


def test_peer_of_a_family_without_relay_is_not_bound() -> None:
    alloc, relay = allocated([RELAY])
    alloc.bind_channel(("2001:db8::9", 1000), T0)
    assert relay.sent() == [] and alloc.counters["no_relay_for_family"] == 1
    alloc2, relay2 = allocated([RELAY, RELAY6])
    alloc2.bind_channel(("2001:db8::9", 1000), T0)
    _, bind, _ = relay2.one(Method.CHANNEL_BIND)
    assert bind.xor_address(Attr.XOR_PEER_ADDRESS) == ("2001:db8::9", 1000)
    relay2.answer(bind, now=T0)
    data = encode_channel_data(0x4000, b"v6")
    assert alloc2.decapsulate(data, SERVER, T0) == (("2001:db8::9", 1000), b"v6", RELAY6)


def test_channel_rebinds_after_5_minutes_only_with_received_data() -> None:
    alloc, relay = allocated(lifetime=3600)
    bound(alloc, relay, PEER, T0)
    bound(alloc, relay, PEER2, T0)
    assert alloc.poll_timeout() == T0 + 1800  # idle channels schedule nothing
    data = encode_channel_data(0x4000, b"x")
    assert alloc.decapsulate(data, SERVER, T0 + 120) is not None
    assert alloc.poll_timeout() == T0 + 300
    tick(alloc, T0 + 300)
    _, rebind, _ = relay.one(Method.CHANNEL_BIND)
    assert rebind.channel_number() == 0x4000
    assert rebind.xor_address(Attr.XOR_PEER_ADDRESS) == PEER
    assert alloc.channel_for(PEER) == 0x4000  # usable while the rebind is in flight
    relay.answer(rebind, now=T0 + 300.1)
    assert alloc.poll_timeout() == T0 + 1800
    # PEER2 never received data: its channel lapses after 10 minutes
    assert alloc.encapsulate(PEER2, b"x", T0 + 599) is not None
    assert alloc.encapsulate(PEER2, b"x", T0 + 600) is None
    assert alloc.encapsulate(PEER, b"x", T0 + 800) is not None


def test_data_noted_by_a_fast_path_counts_for_the_rebind_rule() -> None:
    """A shell that unwraps ChannelData itself reports it with note_channel_data."""
    alloc, relay = allocated(lifetime=3600)
    bound(alloc, relay, PEER, T0)
    assert alloc.poll_timeout() == T0 + 1800
    alloc.note_channel_data(0x4000, T0 + 120)
    alloc.note_channel_data(0x4999, T0 + 120)  # unknown channel: ignored
    assert alloc.poll_timeout() == T0 + 300
    tick(alloc, T0 + 300)
    _, rebind, _ = relay.one(Method.CHANNEL_BIND)
    assert rebind.channel_number() == 0x4000


def test_rebind_deadlines_do_not_scan_every_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """With hundreds of idle channels, timers look only at channels that carried data."""
    alloc, relay = allocated(lifetime=3600)
    peers = [(f"10.9.{i // 250}.{i % 250 + 1}", 5000) for i in range(300)]
    numbers = [bound(alloc, relay, peer, T0) for peer in peers]
    alloc.note_channel_data(numbers[7], T0 + 10)
    checked: list[object] = []
    original = Allocation._channel_needs_rebind
    monkeypatch.setattr(Allocation, "_channel_needs_rebind",
                        staticmethod(lambda c: (checked.append(c), original(c))[1]))
    assert alloc.poll_timeout() == T0 + 300
    tick(alloc, T0 + 300)
    _, rebind, _ = relay.one(Method.CHANNEL_BIND)
    assert rebind.xor_address(Attr.XOR_PEER_ADDRESS) == peers[7]
    assert len(checked) <= 4, f"{len(checked)} channels examined"


def test_channel_rebind_give_up_waits_for_new_data() -> None:
    alloc, relay = allocated(lifetime=3600)
    bound(alloc, relay, PEER, T0)
    alloc.decapsulate(encode_channel_data(0x4000, b"x"), SERVER, T0 + 10)
    tick(alloc, T0 + 300)
    relay.one(Method.CHANNEL_BIND)
    while (deadline := alloc.poll_timeout()) is not None and deadline < T0 + 1800:
        tick(alloc, deadline)
        relay.sent()
    assert alloc.poll_timeout() == T0 + 1800
    alloc.decapsulate(encode_channel_data(0x4000, b"x"), SERVER, T0 + 400)
    tick(alloc, T0 + 400)
    relay.one(Method.CHANNEL_BIND)


def test_expired_channel_is_bound_again_with_the_same_number() -> None:
    alloc, relay = allocated(lifetime=3600)
    bound(alloc, relay, PEER, T0)
    alloc.bind_channel(PEER, T0 + 100)
    assert relay.sent() == []
    alloc.bind_channel(PEER, T0 + 700)
    _, again, _ = relay.one(Method.CHANNEL_BIND)
    assert again.channel_number() == 0x4000


def test_failed_channel_bind_forgets_the_channel() -> None:
    alloc, relay = allocated()
    alloc.bind_channel(PEER, T0)
    _, bind, _ = relay.one(Method.CHANNEL_BIND)
    relay.answer(bind, MessageClass.ERROR, error=(403, "Forbidden"), now=T0)
    assert not alloc.has_channel(PEER)
    alloc.bind_channel(PEER, T0 + 1)
    _, again, _ = relay.one(Method.CHANNEL_BIND)
    assert again.channel_number() == 0x4001  # numbers are handed out cyclically


def test_channel_numbers_cycle_and_are_reused_only_after_15_idle_minutes() -> None:
    alloc, relay = allocated(lifetime=3600)
    peers = [(f"10.{i // 256}.{i % 256}.1", 9) for i in range(0x1000)]
    for peer in peers:
        alloc.bind_channel(peer, T0)
    sent = relay.sent()
    assert [m.channel_number() for _, m, _ in sent] == list(range(0x4000, 0x5000))
    for _, msg, _ in sent:
        relay.answer(msg, now=T0)
    alloc.bind_channel(PEER, T0 + 1)
    assert alloc.counters["channels_exhausted"] == 1
    # data on 0x4000 at minute 10 keeps it from being reused at minute 15
    alloc.decapsulate(encode_channel_data(0x4000, b"x"), SERVER, T0 + 600)
    alloc.bind_channel(PEER, T0 + 900)
    _, reuse, _ = relay.one(Method.CHANNEL_BIND)
    assert reuse.channel_number() == 0x4001
    assert alloc.channel_for(peers[1]) is None
    assert alloc.decapsulate(encode_channel_data(0x4001, b"x"), SERVER, T0 + 900) is None


def test_same_config() -> None:
    alloc = new_alloc([SERVER, SERVER6])
    assert alloc.same_config([SERVER6, SERVER], USER, PASSWORD)
    assert not alloc.same_config([SERVER], USER, PASSWORD)
    assert not alloc.same_config([SERVER, SERVER6], USER, "other")
    assert not alloc.same_config([SERVER, SERVER6], "other", PASSWORD)


# ---- new credentials for the same relay (every portal init) ---------------------------------

def test_new_credentials_keep_a_made_allocation_and_its_channels() -> None:
    """The portal salts credentials on every init: a made allocation keeps its relayed
    address and channels and goes on with the credentials that made it (coturn binds the
    allocation to them); the init only refreshes it."""
    alloc, relay = allocated()
    number = bound(alloc, relay, PEER, T0 + 1)
    alloc.update_credentials(USER2, PASSWORD2, T0 + 2)
    _, refresh, _ = relay.one(Method.REFRESH)
    assert refresh.username() == USER and refresh.lifetime() is None
    relay.answer(refresh, attrs=[(Attr.LIFETIME, u32(600))], now=T0 + 2)
    assert events(alloc) == []
    assert alloc.relay_addresses() == [RELAY] and alloc.channel_for(PEER) == number
    tick(alloc, T0 + 302)
    _, later, _ = relay.one(Method.REFRESH)
    assert later.username() == USER
    alloc.bind_channel(PEER2, T0 + 303)
    _, bind, _ = relay.one(Method.CHANNEL_BIND)
    assert bind.username() == USER


def test_new_credentials_make_the_next_allocation() -> None:
    """Once the allocation is gone (here: expired), the next ALLOCATE uses the newest
    credentials."""
    alloc, relay = allocated(lifetime=20)
    alloc.update_credentials(USER2, PASSWORD2, T0 + 1)
    relay.answer(relay.one(Method.REFRESH)[1], attrs=[(Attr.LIFETIME, u32(20))], now=T0 + 1)
    for t in (11, 12, 13.5, 15.75, 19.125):
        tick(alloc, T0 + t)
        relay.sent()  # REFRESHes nobody answers
    tick(alloc, T0 + 21)
    assert events(alloc) == [CandidateRemoved("relay", RELAY)]
    alloc.refresh(T0 + 22)
    _, binding, _ = relay.one(Method.BINDING)
    relay.answer(binding, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=T0 + 22)
    _, allocate, raw = relay.one(Method.ALLOCATE)
    assert allocate.username() == USER2 and verify_integrity(raw, KEY2)


def test_rejected_old_credentials_give_way_to_the_new_ones() -> None:
    """The credentials that made the allocation expired (or the relay's secret changed):
    the request goes again with the newest ones instead of freeing the allocation."""
    alloc, relay = allocated()
    alloc.update_credentials(USER2, PASSWORD2, T0 + 1)
    _, refresh, _ = relay.one(Method.REFRESH)
    relay.answer(refresh, MessageClass.ERROR, error=(401, "Unauthorized"), key=None,
                 now=T0 + 1)
    _, again, raw = relay.one(Method.REFRESH)
    assert again.username() == USER2 and verify_integrity(raw, KEY2)
    relay.answer(again, attrs=[(Attr.LIFETIME, u32(600))], key=KEY2, now=T0 + 1)
    assert not alloc.is_freed and alloc.relay_addresses() == [RELAY]
    assert events(alloc) == []


def test_new_credentials_before_any_authenticated_allocate_apply_at_once() -> None:
    alloc = new_alloc()
    relay = Relay(alloc)
    _, binding, _ = relay.one(Method.BINDING)
    alloc.update_credentials(USER2, PASSWORD2, T0)
    assert relay.sent() == []  # the BINDING is still out
    relay.answer(binding, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=T0)
    _, first, _ = relay.one(Method.ALLOCATE)
    relay.challenge(first, T0)
    _, second, raw = relay.one(Method.ALLOCATE)
    assert second.username() == USER2 and verify_integrity(raw, KEY2)


def test_new_credentials_during_an_authenticated_allocate_wait_for_its_answer() -> None:
    """That ALLOCATE may have made an allocation bound to the old username: it is kept."""
    alloc = new_alloc()
    relay = Relay(alloc)
    _, binding, _ = relay.one(Method.BINDING)
    relay.answer(binding, xor=[(Attr.XOR_MAPPED_ADDRESS, MAPPED)], key=None, now=T0)
    relay.challenge(relay.one(Method.ALLOCATE)[1], T0)
    _, signed, _ = relay.one(Method.ALLOCATE)
    alloc.update_credentials(USER2, PASSWORD2, T0)
    assert relay.sent() == []
    relay.answer(signed, xor=[(Attr.XOR_RELAYED_ADDRESS, RELAY)],
                 attrs=[(Attr.LIFETIME, u32(600))], now=T0)
    assert alloc.relay_addresses() == [RELAY]
    alloc.bind_channel(PEER, T0 + 1)
    assert relay.one(Method.CHANNEL_BIND)[1].username() == USER


# ---- fuzzing ------------------------------------------------------------------------------


@given(st.binary(max_size=300))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_random_datagrams_never_raise(data: bytes) -> None:
    alloc, _ = allocated()
    for src in (SERVER, ("192.0.2.99", 1)):
        alloc.decapsulate(data, src, T0 + 1)
        if looks_like_stun(data):
            try:
                msg = parse(data)
            except MalformedPacket:
                continue
            alloc.handle_stun(msg, data, src, LOCAL, T0 + 1)
    alloc.handle_timeout(T0 + 2)


_attrs = st.lists(
    st.tuples(
        st.sampled_from([a for a in Attr if a not in (Attr.FINGERPRINT, Attr.MESSAGE_INTEGRITY)]),
        st.binary(max_size=24),
    ),
    max_size=6,
)


@given(
    which=st.sampled_from(["binding", "allocate", "refresh", "channel"]),
    cls=st.sampled_from([MessageClass.SUCCESS, MessageClass.ERROR]),
    attrs=_attrs,
    signed=st.booleans(),
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_random_responses_to_pending_requests_never_raise(
    which: str, cls: int, attrs: list[tuple[int, bytes]], signed: bool
) -> None:
    if which == "binding":
        alloc = new_alloc()
        relay = Relay(alloc)
        _, request, _ = relay.one()
    else:
        alloc, relay = allocated()
        if which == "refresh":
            alloc.refresh(T0 + 1)
        else:
            alloc.bind_channel(PEER, T0 + 1)
        _, request, _ = relay.one()
    resp = new_response(request, cls)
    for kind, value in attrs:
        resp.add(kind, value)
    raw = encode(resp, integrity_key=KEY if signed else None)
    assert alloc.handle_stun(parse(raw), raw, SERVER, LOCAL, T0 + 1)
    for _ in range(30):
        deadline = alloc.poll_timeout()
        if deadline is None:
            break
        tick(alloc, deadline)
        relay.sent()
