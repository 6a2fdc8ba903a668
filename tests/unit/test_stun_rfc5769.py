"""RFC 5769 test vectors: parsing, integrity, fingerprint, and byte-exact re-encoding."""

from __future__ import annotations

import pytest

from gateway.stun.message import (
    Attr,
    MessageClass,
    Method,
    encode,
    long_term_key,
    parse,
    short_term_key,
    verify_integrity,
)

SHORT_TERM_PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"

# RFC 5769 §2.1 (the padding after USERNAME is three 0x20 bytes on purpose).
SAMPLE_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e20746573742063 6c69656e74"
    "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a683676 59202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf".replace(" ", "")
)
# RFC 5769 §2.2
SAMPLE_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
# RFC 5769 §2.3
SAMPLE_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)
# RFC 5769 §2.4
SAMPLE_LONG_TERM_REQUEST = bytes.fromhex(
    "000100602112a44278ad3433c6ad72c029da412e"
    "00060012e3839ee38388e383aae38383e382afe382b90000"
    "0015001c662f2f343939 6b3935346436 4f4c33346f4c394653547679363473 41".replace(" ", "")
    + "0014000b6578616d706c652e6f726700"
    "00080014f67024656dd64a3e02b8e0712e85c9a28ca89666"
)
LONG_TERM_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"


def test_sample_request() -> None:
    msg = parse(SAMPLE_REQUEST)
    assert (msg.method, msg.cls) == (Method.BINDING, MessageClass.REQUEST)
    assert msg.transaction_id == bytes.fromhex("b7e7a701bc34d686fa87dfae")
    assert msg.get(Attr.SOFTWARE) == b"STUN test client"
    assert msg.priority() == 0x6E0001FF
    assert msg.ice_controlled() == 0x932FF9B151263B36
    assert msg.ice_controlling() is None
    assert not msg.use_candidate()
    assert msg.username() == "evtj:h6vY"
    assert msg.unknown_required == []
    assert verify_integrity(SAMPLE_REQUEST, short_term_key(SHORT_TERM_PASSWORD))
    assert not verify_integrity(SAMPLE_REQUEST, short_term_key("wrong"))


def test_sample_request_reencodes_identically_apart_from_padding() -> None:
    msg = parse(SAMPLE_REQUEST)
    out = encode(msg, integrity_key=short_term_key(SHORT_TERM_PASSWORD), fingerprint=True)
    # We pad with zeros where the vector pads USERNAME with spaces (padding is covered by the
    # HMAC, so MESSAGE-INTEGRITY and FINGERPRINT differ too).
    assert out[:73] + out[76:80] == SAMPLE_REQUEST[:73] + SAMPLE_REQUEST[76:80]
    assert out[73:76] == b"\x00\x00\x00"
    assert len(out) == len(SAMPLE_REQUEST)
    assert verify_integrity(out, short_term_key(SHORT_TERM_PASSWORD))
    assert parse(out).attributes == [*msg.attributes[:-1], (Attr.MESSAGE_INTEGRITY, out[80:100])]


@pytest.mark.parametrize(
    ("vector", "address"),
    [
        (SAMPLE_IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (SAMPLE_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
    ids=["ipv4", "ipv6"],
)
def test_sample_responses(vector: bytes, address: tuple[str, int]) -> None:
    msg = parse(vector)
    assert (msg.method, msg.cls) == (Method.BINDING, MessageClass.SUCCESS)
    assert msg.get(Attr.SOFTWARE) == b"test vector"
    assert msg.xor_address(Attr.XOR_MAPPED_ADDRESS) == address
    assert verify_integrity(vector, short_term_key(SHORT_TERM_PASSWORD))
    # The vector pads SOFTWARE with 0x20, we pad with 0x00: equal up to the signed part.
    rebuilt = encode(msg, integrity_key=short_term_key(SHORT_TERM_PASSWORD), fingerprint=True)
    assert rebuilt[:35] + rebuilt[36:-32] == vector[:35] + vector[36:-32]
    assert verify_integrity(rebuilt, short_term_key(SHORT_TERM_PASSWORD))
    assert parse(rebuilt).xor_address(Attr.XOR_MAPPED_ADDRESS) == address


def test_xor_address_encoding_matches_vectors() -> None:
    for vector, address in (
        (SAMPLE_IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (SAMPLE_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ):
        original = parse(vector)
        msg = parse(vector)
        msg.attributes = []
        msg.add_xor_address(Attr.XOR_MAPPED_ADDRESS, address)
        assert msg.attributes[0] == (Attr.XOR_MAPPED_ADDRESS, original.get(Attr.XOR_MAPPED_ADDRESS))


def test_sample_long_term_request() -> None:
    msg = parse(SAMPLE_LONG_TERM_REQUEST)
    assert msg.transaction_id == bytes.fromhex("78ad3433c6ad72c029da412e")
    assert msg.username() == LONG_TERM_USERNAME
    assert msg.nonce() == "f//499k954d6OL34oL9FSTvy64sA"
    assert msg.realm() == "example.org"
    key = long_term_key(LONG_TERM_USERNAME, "example.org", "TheMatrIX")
    assert verify_integrity(SAMPLE_LONG_TERM_REQUEST, key)
    assert not verify_integrity(SAMPLE_LONG_TERM_REQUEST, long_term_key("x", "example.org", "y"))
    rebuilt = encode(msg, integrity_key=key)
    assert rebuilt == SAMPLE_LONG_TERM_REQUEST
