"""STUN message codec (RFC 8489 / RFC 5389), shared by the ICE agent and the TURN client.

Parsing is strict because everything here comes from the wire: any structural problem raises
``MalformedPacket`` and nothing else. Attribute values stay raw bytes in wire order; typed
readers decode them on demand so the per-packet path does no work for attributes nobody reads.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from gateway.errors import InvalidArgument, MalformedPacket
from gateway.types import Address, Rng

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
_FINGERPRINT_XOR = 0x5354554E
HEADER_LEN = 20
_MI_LEN = 20  # HMAC-SHA1


class Method(IntEnum):
    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class MessageClass(IntEnum):
    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


class Attr(IntEnum):
    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    RESERVATION_TOKEN = 0x0022
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    ADDITIONAL_ADDRESS_FAMILY = 0x8000
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


_KNOWN_ATTRS = frozenset(int(a) for a in Attr)
#: Attributes RFC 8489 allows after MESSAGE-INTEGRITY.
_ALLOWED_AFTER_MI = frozenset({int(Attr.MESSAGE_INTEGRITY_SHA256), int(Attr.FINGERPRINT)})
#: Plain ints for the per-attribute comparisons in ``parse`` (no enum lookups there).
_FINGERPRINT = int(Attr.FINGERPRINT)
_MESSAGE_INTEGRITY = int(Attr.MESSAGE_INTEGRITY)

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

_HEADER = struct.Struct("!HHI12s")
_ATTR_HEADER = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


def _encode_type(method: int, cls: int) -> int:
    """Interleave method and class bits as RFC 8489 §5 lays them out."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def _decode_type(msg_type: int) -> tuple[int, int]:
    method = (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2)
    cls = ((msg_type & 0x0010) >> 4) | ((msg_type & 0x0100) >> 7)
    return method, cls


def _utf8(text: str) -> bytes:
    """UTF-8 that cannot raise: credentials come from the portal, and a lone surrogate
    (which the portal parser refuses) is encoded as is rather than crash the caller; it
    then simply matches nothing."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _decode_ip(family: int, raw: bytes) -> str:
    if family == FAMILY_IPV4:
        return f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"
    return str(ipaddress.IPv6Address(raw))


@functools.lru_cache(maxsize=4096)
def _family_and_packed(ip: str) -> tuple[int, bytes]:
    """Cached: the same few peer addresses are encoded in every check and answer."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError as exc:
        raise InvalidArgument(f"not an IP address: {ip!r}") from exc
    return (FAMILY_IPV4 if parsed.version == 4 else FAMILY_IPV6), parsed.packed


def _split_address(value: bytes) -> tuple[int, int, bytes]:
    """(family, port, address bytes) of a (XOR-)MAPPED-ADDRESS style value; checks lengths."""
    if len(value) < 4:
        raise MalformedPacket("address attribute too short")
    family = value[1]
    if family == FAMILY_IPV4:
        if len(value) != 8:
            raise MalformedPacket("IPv4 address attribute must be 8 bytes")
    elif family == FAMILY_IPV6:
        if len(value) != 20:
            raise MalformedPacket("IPv6 address attribute must be 20 bytes")
    else:
        raise MalformedPacket(f"unknown address family {family:#x}")
    return family, (value[2] << 8) | value[3], value[4:]


def _xor_bytes(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise InvalidArgument("XOR operands differ in length")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


@dataclass(slots=True)
class StunMessage:
    """One STUN message; attribute values are raw bytes in wire order (FINGERPRINT excluded)."""

    method: int
    cls: int
    transaction_id: bytes
    attributes: list[tuple[int, bytes]] = field(default_factory=list)
    unknown_required: list[int] = field(default_factory=list)

    # ---- readers ------------------------------------------------------------------------

    def get(self, attr: int) -> bytes | None:
        """The first value of ``attr`` (RFC 8489: later duplicates are ignored)."""
        for kind, value in self.attributes:
            if kind == attr:
                return value
        return None

    def xor_address(self, attr: int) -> Address | None:
        value = self.get(attr)
        if value is None:
            return None
        return self._unxor(value)

    def xor_addresses(self, attr: int) -> list[Address]:
        """Every value of a repeated XOR address attribute (TURN may return two relays)."""
        return [self._unxor(value) for kind, value in self.attributes if kind == attr]

    def _xor_mask(self, family: int) -> bytes:
        return _COOKIE_BYTES if family == FAMILY_IPV4 else _COOKIE_BYTES + self.transaction_id

    def _unxor(self, value: bytes) -> Address:
        family, xport, xaddr = _split_address(value)
        ip = _decode_ip(family, _xor_bytes(xaddr, self._xor_mask(family)))
        return ip, xport ^ (MAGIC_COOKIE >> 16)

    def address(self, attr: int) -> Address | None:
        value = self.get(attr)
        if value is None:
            return None
        family, port, raw = _split_address(value)
        return _decode_ip(family, raw), port

    def error_code(self) -> tuple[int, str] | None:
        value = self.get(Attr.ERROR_CODE)
        if value is None:
            return None
        if len(value) < 4:
            raise MalformedPacket("ERROR-CODE too short")
        klass, number = value[2] & 0x07, value[3]
        if not 3 <= klass <= 6 or number > 99:
            raise MalformedPacket("ERROR-CODE out of range")
        return klass * 100 + number, self._text(value[4:], "ERROR-CODE reason")

    def unknown_attributes(self) -> list[int] | None:
        """The attribute types listed in UNKNOWN-ATTRIBUTES (sent with 420 errors)."""
        value = self.get(Attr.UNKNOWN_ATTRIBUTES)
        if value is None:
            return None
        if len(value) % 2:
            raise MalformedPacket("UNKNOWN-ATTRIBUTES length is odd")
        return [int.from_bytes(value[i : i + 2], "big") for i in range(0, len(value), 2)]

    @staticmethod
    def _text(value: bytes, what: str) -> str:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPacket(f"{what} is not UTF-8") from exc

    def _str_attr(self, attr: int, what: str) -> str | None:
        value = self.get(attr)
        return None if value is None else self._text(value, what)

    def username(self) -> str | None:
        return self._str_attr(Attr.USERNAME, "USERNAME")

    def realm(self) -> str | None:
        return self._str_attr(Attr.REALM, "REALM")

    def nonce(self) -> str | None:
        return self._str_attr(Attr.NONCE, "NONCE")

    def _u32(self, attr: int, what: str) -> int | None:
        value = self.get(attr)
        if value is None:
            return None
        if len(value) != 4:
            raise MalformedPacket(f"{what} must be 4 bytes")
        return int(_U32.unpack(value)[0])

    def _u64(self, attr: int, what: str) -> int | None:
        value = self.get(attr)
        if value is None:
            return None
        if len(value) != 8:
            raise MalformedPacket(f"{what} must be 8 bytes")
        return int(_U64.unpack(value)[0])

    def lifetime(self) -> int | None:
        return self._u32(Attr.LIFETIME, "LIFETIME")

    def priority(self) -> int | None:
        return self._u32(Attr.PRIORITY, "PRIORITY")

    def channel_number(self) -> int | None:
        value = self._u32(Attr.CHANNEL_NUMBER, "CHANNEL-NUMBER")
        return None if value is None else value >> 16

    def ice_controlling(self) -> int | None:
        return self._u64(Attr.ICE_CONTROLLING, "ICE-CONTROLLING")

    def ice_controlled(self) -> int | None:
        return self._u64(Attr.ICE_CONTROLLED, "ICE-CONTROLLED")

    def use_candidate(self) -> bool:
        return self.get(Attr.USE_CANDIDATE) is not None

    # ---- builders -----------------------------------------------------------------------

    def add(self, attr: int, value: bytes) -> StunMessage:
        if not 0 <= attr <= 0xFFFF or len(value) > 0xFFFF:
            raise InvalidArgument("attribute type or length out of range")
        self.attributes.append((attr, bytes(value)))
        return self

    def add_xor_address(self, attr: int, addr: Address) -> StunMessage:
        ip, port = addr
        family, packed = _family_and_packed(ip)
        xaddr = _xor_bytes(packed, self._xor_mask(family))
        value = struct.pack("!BBH", 0, family, port ^ (MAGIC_COOKIE >> 16)) + xaddr
        return self.add(attr, value)

    def add_address(self, attr: int, addr: Address) -> StunMessage:
        ip, port = addr
        family, packed = _family_and_packed(ip)
        return self.add(attr, struct.pack("!BBH", 0, family, port) + packed)

    def add_u32(self, attr: int, value: int) -> StunMessage:
        return self.add(attr, _U32.pack(value))

    def add_u64(self, attr: int, value: int) -> StunMessage:
        return self.add(attr, _U64.pack(value))

    def add_str(self, attr: int, value: str) -> StunMessage:
        return self.add(attr, _utf8(value))

    def add_error_code(self, code: int, reason: str) -> StunMessage:
        if not 300 <= code <= 699:
            raise InvalidArgument(f"error code {code} out of range")
        return self.add(
            Attr.ERROR_CODE, struct.pack("!HBB", 0, code // 100, code % 100) + _utf8(reason)
        )


def new_request(method: int, rng: Rng) -> StunMessage:
    """A request with a random transaction id."""
    return StunMessage(method, MessageClass.REQUEST, rng.randbytes(12))


def new_response(request: StunMessage, cls: int) -> StunMessage:
    """A response (success or error) to ``request``: same method and transaction id."""
    return StunMessage(request.method, cls, request.transaction_id)


def looks_like_stun(data: bytes) -> bool:
    """Cheap demux test (RFC 7983 first-byte range plus the magic cookie)."""
    return len(data) >= HEADER_LEN and data[0] < 4 and data[4:8] == _COOKIE_BYTES


def _fingerprint(data: bytes) -> int:
    return (binascii.crc32(data) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF


def parse(data: bytes) -> StunMessage:
    """Parse and validate one STUN message; raises ``MalformedPacket`` on any defect."""
    total = len(data)
    if total < HEADER_LEN:
        raise MalformedPacket("shorter than a STUN header")
    msg_type, length, cookie, tid = _HEADER.unpack_from(data)
    if msg_type & 0xC000:
        raise MalformedPacket("top bits of the message type are not zero")
    if cookie != MAGIC_COOKIE:
        raise MalformedPacket("bad magic cookie")
    if length & 3 or length != total - HEADER_LEN:
        raise MalformedPacket("bad message length")
    method, cls = _decode_type(msg_type)
    attributes: list[tuple[int, bytes]] = []
    unknown: list[int] = []
    seen_integrity = False
    offset = HEADER_LEN
    unpack_attr = _ATTR_HEADER.unpack_from
    while offset < total:
        if offset + 4 > total:
            raise MalformedPacket("truncated attribute header")
        kind, alen = unpack_attr(data, offset)
        start = offset + 4
        end = start + alen
        next_offset = start + ((alen + 3) & ~3)
        if next_offset > total:
            raise MalformedPacket(f"attribute {kind:#06x} overruns the message")
        if kind == _FINGERPRINT:
            if alen != 4 or end != total:
                raise MalformedPacket("FINGERPRINT must be the last attribute, 4 bytes")
            if _U32.unpack_from(data, start)[0] != _fingerprint(data[:offset]):
                raise MalformedPacket("bad FINGERPRINT")
            break
        if seen_integrity and kind not in _ALLOWED_AFTER_MI:
            raise MalformedPacket(f"attribute {kind:#06x} after MESSAGE-INTEGRITY")
        if kind == _MESSAGE_INTEGRITY:
            if alen != _MI_LEN:
                raise MalformedPacket("MESSAGE-INTEGRITY must be 20 bytes")
            seen_integrity = True
        elif kind < 0x8000 and kind not in _KNOWN_ATTRS:
            unknown.append(kind)
        attributes.append((kind, data[start:end]))
        offset = next_offset
    return StunMessage(method, cls, bytes(tid), attributes, unknown)


def encode(
    msg: StunMessage, *, integrity_key: bytes | None = None, fingerprint: bool = False
) -> bytes:
    """Serialise ``msg``; optionally append MESSAGE-INTEGRITY (HMAC-SHA1) and FINGERPRINT.

    With ``integrity_key`` any MESSAGE-INTEGRITY already in ``msg.attributes`` is replaced.
    """
    if len(msg.transaction_id) != 12:
        raise InvalidArgument("transaction id must be 12 bytes")
    parts: list[bytes] = []
    for kind, value in msg.attributes:
        if integrity_key is not None and kind == Attr.MESSAGE_INTEGRITY:
            continue
        parts.append(_ATTR_HEADER.pack(kind, len(value)))
        parts.append(value)
        pad = -len(value) & 3
        if pad:
            parts.append(b"\x00" * pad)
    body = b"".join(parts)
    msg_type = _encode_type(msg.method, msg.cls)
    if integrity_key is not None:
        header = _HEADER.pack(msg_type, len(body) + 24, MAGIC_COOKIE, msg.transaction_id)
        mac = hmac.digest(integrity_key, header + body, "sha1")
        body += _ATTR_HEADER.pack(Attr.MESSAGE_INTEGRITY, _MI_LEN) + mac
    if fingerprint:
        header = _HEADER.pack(msg_type, len(body) + 8, MAGIC_COOKIE, msg.transaction_id)
        crc = _fingerprint(header + body)
        return header + body + _ATTR_HEADER.pack(Attr.FINGERPRINT, 4) + _U32.pack(crc)
    return _HEADER.pack(msg_type, len(body), MAGIC_COOKIE, msg.transaction_id) + body


def _integrity_offset(data: bytes) -> int | None:
    """Offset of the MESSAGE-INTEGRITY attribute header, or None (structure not trusted)."""
    total = len(data)
    if total < HEADER_LEN:
        return None
    offset = HEADER_LEN
    while offset + 4 <= total:
        kind, alen = _ATTR_HEADER.unpack_from(data, offset)
        if kind == Attr.MESSAGE_INTEGRITY:
            return offset if alen == _MI_LEN and offset + 4 + _MI_LEN <= total else None
        offset += 4 + _pad4(alen)
    return None


def verify_integrity(data: bytes, key: bytes) -> bool:
    """Check MESSAGE-INTEGRITY of raw ``data`` (length field adjusted per RFC 5389 §15.4)."""
    offset = _integrity_offset(data)
    if offset is None:
        return False
    adjusted_len = offset - HEADER_LEN + 4 + _MI_LEN
    signed = data[:2] + struct.pack("!H", adjusted_len) + data[4:offset]
    expected = hmac.digest(key, signed, "sha1")
    return hmac.compare_digest(expected, data[offset + 4 : offset + 4 + _MI_LEN])


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 5389 §15.4 long-term credential key: MD5(username ":" realm ":" password)."""
    return hashlib.md5(_utf8(f"{username}:{realm}:{password}"), usedforsecurity=False).digest()


def short_term_key(password: str) -> bytes:
    """ICE short-term credential key: the password itself (RFC 8445 §7.2.2)."""
    return _utf8(password)
