"""Static keys and their strict base64 form."""

from __future__ import annotations

import base64
import random

import pytest
from nacl.bindings import crypto_scalarmult_base

from gateway.wg.keys import StaticKeyPair, clamp, decode_key, encode_key


def test_generate_is_clamped_and_deterministic_under_a_seed() -> None:
    a = StaticKeyPair.generate(random.Random(1))
    b = StaticKeyPair.generate(random.Random(1))
    assert a == b
    assert a.private[0] & 7 == 0 and a.private[31] & 128 == 0 and a.private[31] & 64
    assert a.public == crypto_scalarmult_base(a.private)
    assert StaticKeyPair.generate(random.Random(2)) != a


def test_from_private_clamps_like_wg() -> None:
    raw = bytes(range(32))
    pair = StaticKeyPair.from_private(raw)
    assert pair.private == clamp(raw) != raw
    assert pair.public == crypto_scalarmult_base(clamp(raw))
    with pytest.raises(ValueError):
        StaticKeyPair.from_private(b"short")


def test_repr_and_str_hide_the_private_key() -> None:
    pair = StaticKeyPair.generate(random.Random(3))
    for text in (repr(pair), str(pair)):
        assert pair.public_b64() in text
        assert encode_key(pair.private) not in text
        assert pair.private.hex() not in text


def test_public_b64_round_trips() -> None:
    pair = StaticKeyPair.generate(random.Random(4))
    text = pair.public_b64()
    assert len(text) == 44 and text.endswith("=")
    assert decode_key(text) == pair.public


@pytest.mark.parametrize(
    "text",
    [
        "",
        "A" * 43,
        "A" * 43 + "==",
        "A" * 44,  # no padding
        "A" * 42 + "==",  # 31 bytes
        "-" + "A" * 42 + "=",  # URL-safe alphabet
        "_" + "A" * 42 + "=",
        " " + "A" * 42 + "=",
        "A" * 42 + "B=",  # non-canonical: unused bits set
        "Ä" + "A" * 42 + "=",
    ],
)
def test_decode_key_is_strict(text: str) -> None:
    with pytest.raises(ValueError):
        decode_key(text)


def test_decode_key_accepts_wg_genkey_format() -> None:
    raw = bytes(range(32))
    assert decode_key(base64.b64encode(raw).decode()) == raw
    assert encode_key(raw) == base64.b64encode(raw).decode()
    with pytest.raises(ValueError):
        encode_key(b"\0" * 31)
