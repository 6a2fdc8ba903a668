"""ICE credentials and candidates (RFC 8445 §5.1, RFC 8839 §5.1 string form).

The portal carries candidates as SDP ``candidate`` attribute values without ``a=``
(rust/connlib/snownet/src/node.rs). We produce exactly what the 1.4 gateway produces (component 1,
udp, no raddr/rport, no ufrag) and accept the grammar clients and aioice emit, with the optional
trailing tokens. Parsing is strict: every malformation raises
:class:`~gateway.errors.MalformedMessage` (a ``ValueError``) so the caller can drop just that
candidate, and nothing else does.
"""

from __future__ import annotations

import hashlib
import ipaddress
import string
from dataclasses import dataclass, field

from gateway.errors import MalformedMessage
from gateway.types import Address, Rng

KINDS = ("host", "srflx", "prflx", "relay")

#: RFC 8445 §5.1.2.2 recommended type preferences (the ones str0m uses).
TYPE_PREFERENCE = {"host": 126, "prflx": 110, "srflx": 100, "relay": 2}
LOCAL_PREF_IPV6 = 65535
LOCAL_PREF_IPV4 = 65534

_ICE_CHARS = frozenset(string.ascii_letters + string.digits + "+/")
_ALNUM = string.ascii_letters + string.digits
_MAX_U32 = 0xFFFFFFFF
#: Longest candidate line we read; a full one with every extension is about 200.
MAX_LINE = 1024
#: Optional tokens a client may append after ``typ <kind>`` (each a name/value pair).
_KNOWN_EXTENSIONS = frozenset({"tcptype", "generation", "network-id", "ufrag", "network-cost"})


@dataclass(frozen=True, slots=True)
class IceCredentials:
    """Short-term ICE credentials; the password never appears in ``repr``."""

    ufrag: str
    pwd: str = field(repr=False)

    @classmethod
    def random(cls, rng: Rng) -> IceCredentials:
        """Fresh credentials: 4-char ufrag and 22-char password, alphanumeric (legacy flows)."""
        ufrag = "".join(rng.choice(_ALNUM) for _ in range(4))
        pwd = "".join(rng.choice(_ALNUM) for _ in range(22))
        return cls(ufrag, pwd)


def priority_for(kind: str, ip: str, component: int = 1) -> int:
    """RFC 8445 §5.1.2.1: type_pref << 24 | local_pref << 8 | (256 - component)."""
    local_pref = LOCAL_PREF_IPV6 if ":" in ip else LOCAL_PREF_IPV4
    return (TYPE_PREFERENCE[kind] << 24) | (local_pref << 8) | (256 - component)


def prflx_priority(local_priority: int, component: int = 1) -> int:
    """The PRIORITY a check carries: prflx type preference, the candidate's local preference."""
    local_pref = (local_priority >> 8) & 0xFFFF
    return (TYPE_PREFERENCE["prflx"] << 24) | (local_pref << 8) | (256 - component)


def foundation_for(kind: str, base_ip: str) -> str:
    """An opaque token, stable for (kind, base IP) so equal-origin candidates share it."""
    return hashlib.blake2s(f"{kind}|{base_ip}".encode(), digest_size=12).hexdigest()


def _parse_ip(text: str) -> str:
    """A literal IP in the canonical text form sockets use (mDNS names are rejected)."""
    if "%" in text:
        raise MalformedMessage(f"scoped addresses are not usable: {text!r}")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError as exc:
        raise MalformedMessage(f"not an IP literal: {text!r}") from exc


def _parse_int(text: str, what: str, low: int, high: int) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        raise MalformedMessage(f"{what} is not a number: {text!r}")
    value = int(text)
    if not low <= value <= high:
        raise MalformedMessage(f"{what} out of range: {value}")
    return value


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ICE candidate (UDP only).

    ``base`` is where a local candidate sends from: a host socket address, or for a relay
    candidate the relayed address itself (the node then wraps the datagram in ChannelData).
    ``related`` is informational (raddr/rport of a parsed remote string).
    """

    kind: str
    address: Address
    priority: int
    foundation: str
    component: int = 1
    base: Address | None = None
    related: Address | None = None
    relay_id: str | None = None

    # ---- construction of local candidates --------------------------------------------

    @classmethod
    def host(cls, address: Address) -> Candidate:
        ip = address[0]
        return cls("host", address, priority_for("host", ip), foundation_for("host", ip),
                   base=address)

    @classmethod
    def srflx(cls, address: Address, base: Address) -> Candidate:
        return cls("srflx", address, priority_for("srflx", address[0]),
                   foundation_for("srflx", base[0]), base=base)

    @classmethod
    def relay(cls, address: Address, relay_id: str) -> Candidate:
        ip = address[0]
        return cls("relay", address, priority_for("relay", ip), foundation_for("relay", ip),
                   base=address, relay_id=relay_id)

    # ---- the SDP string form ------------------------------------------------------------

    def to_sdp(self) -> str:
        """``candidate:<foundation> 1 udp <prio> <ip> <port> typ <kind>``, as 1.4 emits it."""
        ip, port = self.address
        return (f"candidate:{self.foundation} {self.component} udp {self.priority} "
                f"{ip} {port} typ {self.kind}")

    @classmethod
    def parse(cls, line: str) -> Candidate:
        """Parse a Firezone/WebRTC candidate string (with or without ``candidate:``).

        Raises ``MalformedMessage`` on any malformation, including non-UDP transports and
        hostnames (we cannot use either), and lines longer than :data:`MAX_LINE`.
        """
        if len(line) > MAX_LINE:
            raise MalformedMessage(f"candidate longer than {MAX_LINE} characters")
        text = line.strip()
        if text.startswith("a="):
            text = text[2:]
        if text.startswith("candidate:"):
            text = text[len("candidate:"):]
        tokens = text.split(" ")
        if len(tokens) < 8 or "" in tokens:
            raise MalformedMessage("candidate needs 8 space-separated fields")
        foundation, component_s, transport, priority_s, ip_s, port_s, typ, kind = tokens[:8]
        if not 1 <= len(foundation) <= 32 or not set(foundation) <= _ICE_CHARS:
            raise MalformedMessage(f"bad foundation {foundation!r:.40}")
        component = _parse_int(component_s, "component", 1, 256)
        if transport.lower() != "udp":
            raise MalformedMessage(f"unsupported transport {transport!r}")
        priority = _parse_int(priority_s, "priority", 1, _MAX_U32)
        ip = _parse_ip(ip_s)
        port = _parse_int(port_s, "port", 1, 65535)
        if typ != "typ":
            raise MalformedMessage("expected 'typ'")
        if kind not in KINDS:
            raise MalformedMessage(f"unknown candidate type {kind!r}")
        rest = tokens[8:]
        if len(rest) % 2:
            raise MalformedMessage("dangling extension token")
        related_ip: str | None = None
        related_port: int | None = None
        seen: set[str] = set()
        for name, value in zip(rest[::2], rest[1::2], strict=True):
            if name in seen:
                raise MalformedMessage(f"duplicate {name!r}")
            seen.add(name)
            if name == "raddr":
                related_ip = _parse_ip(value)
            elif name == "rport":
                related_port = _parse_int(value, "rport", 0, 65535)
            elif name not in _KNOWN_EXTENSIONS:
                raise MalformedMessage(f"unknown extension {name!r}")
        if (related_ip is None) != (related_port is None):
            raise MalformedMessage("raddr and rport must come together")
        related = None if related_ip is None or related_port is None else (related_ip, related_port)
        return cls(kind, (ip, port), priority, foundation, component, related=related)
