"""Noise_IKpsk2 messages in isolation (interop with wireguard-go is in tests/interop)."""

from __future__ import annotations

import random

import pytest

from gateway.wg.constants import INITIATION_LEN, RESPONSE_LEN
from gateway.wg.keys import StaticKeyPair
from gateway.wg.noise import (
    INITIATION_BODY_LEN,
    RESPONSE_BODY_LEN,
    HandshakeContext,
    HandshakeRejected,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    initiator_public_key,
    tai64n,
)

MACS = bytes(32)  # the noise layer ignores the mac trailer; cookie.py owns it


def _keys(seed: int = 1) -> tuple[StaticKeyPair, StaticKeyPair, random.Random]:
    rng = random.Random(seed)
    return StaticKeyPair.generate(rng), StaticKeyPair.generate(rng), rng


@pytest.mark.parametrize("psk", [None, b"\x42" * 32])
def test_round_trip_gives_matching_transport_keys(psk: bytes | None) -> None:
    i, r, rng = _keys()
    ctx_i, ctx_r = HandshakeContext(i, r.public, psk), HandshakeContext(r, i.public, psk)
    body, state = create_initiation(ctx_i, 0x1234, rng.randbytes(32), 1_700_000_000.5)
    assert len(body) == INITIATION_BODY_LEN and len(body + MACS) == INITIATION_LEN
    assert body[:8] == b"\x01\0\0\0" + (0x1234).to_bytes(4, "little")
    consumed = consume_initiation(ctx_r, body + MACS)
    assert consumed.peer_index == 0x1234
    assert consumed.timestamp == tai64n(1_700_000_000.5)
    response, keys_r = create_response(ctx_r, consumed, 0x9999, rng.randbytes(32))
    assert len(response) == RESPONSE_BODY_LEN and len(response + MACS) == RESPONSE_LEN
    peer_index, keys_i = consume_response(ctx_i, state, response + MACS)
    assert peer_index == 0x9999
    assert keys_i.send == keys_r.receive and keys_i.receive == keys_r.send
    assert keys_i.send != keys_i.receive
    assert repr(keys_i.send) not in repr(keys_i) and repr(keys_i.receive) not in repr(keys_i)


def test_psk_mismatch_fails_on_the_response() -> None:
    i, r, rng = _keys()
    ctx_i, ctx_r = HandshakeContext(i, r.public, b"\1" * 32), HandshakeContext(r, i.public, None)
    body, state = create_initiation(ctx_i, 1, rng.randbytes(32), 1e9)
    consumed = consume_initiation(ctx_r, body + MACS)  # the psk is not used in message 1
    response, _ = create_response(ctx_r, consumed, 2, rng.randbytes(32))
    with pytest.raises(HandshakeRejected) as info:
        consume_response(ctx_i, state, response + MACS)
    assert info.value.reason == "decrypt_failed"


def test_initiation_from_an_unexpected_key_is_rejected() -> None:
    i, r, rng = _keys()
    stranger = StaticKeyPair.generate(rng)
    ctx = HandshakeContext(stranger, r.public, None)
    body, _ = create_initiation(ctx, 1, rng.randbytes(32), 1e9)
    with pytest.raises(HandshakeRejected) as info:
        consume_initiation(HandshakeContext(r, i.public, None), body + MACS)
    assert info.value.reason == "wrong_peer"


def test_initiation_for_another_responder_does_not_decrypt() -> None:
    i, r, rng = _keys()
    other = StaticKeyPair.generate(rng)
    body, _ = create_initiation(HandshakeContext(i, other.public, None), 1, rng.randbytes(32), 1e9)
    with pytest.raises(HandshakeRejected) as info:
        consume_initiation(HandshakeContext(r, i.public, None), body + MACS)
    assert info.value.reason == "not_for_us"


def test_low_order_ephemeral_is_rejected() -> None:
    i, r, rng = _keys()
    body, _ = create_initiation(HandshakeContext(i, r.public, None), 1, rng.randbytes(32), 1e9)
    forged = body[:8] + bytes(32) + body[40:]
    with pytest.raises(HandshakeRejected) as info:
        consume_initiation(HandshakeContext(r, i.public, None), forged + MACS)
    assert info.value.reason == "low_order_point"


def test_context_rejects_bad_keys() -> None:
    i, r, _ = _keys()
    with pytest.raises(ValueError):
        HandshakeContext(i, bytes(32), None)  # low-order public key
    with pytest.raises(ValueError):
        HandshakeContext(i, r.public[:31], None)
    with pytest.raises(ValueError):
        HandshakeContext(i, r.public, b"short")


def test_tai64n_is_ordered_and_whitened() -> None:
    t = 1_700_000_000.0
    assert len(tai64n(t)) == 12
    assert tai64n(t) < tai64n(t + 0.02) < tai64n(t + 1)
    assert tai64n(t + 0.001) == tai64n(t)  # below the ~16.8 ms granularity
    assert int.from_bytes(tai64n(0)[:8], "big") == (1 << 62) + 10


def test_initiator_public_key_peeks_at_the_sender() -> None:
    i, r, rng = _keys()
    body, _ = create_initiation(HandshakeContext(i, r.public, None), 1, rng.randbytes(32), 1e9)
    assert initiator_public_key(r, body + MACS) == i.public
    assert initiator_public_key(i, body + MACS) is None  # not addressed to i
    assert initiator_public_key(r, (body + MACS)[:100]) is None
    forged = body[:8] + bytes(32) + body[40:]
    assert initiator_public_key(r, forged + MACS) is None
