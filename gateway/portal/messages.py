"""Typed portal messages on topic ``gateway`` (rust/connlib/tunnel/src/messages/gateway.rs).

Every message is a frozen dataclass. :func:`parse_ingress` turns an ``(event, payload)``
pair from the portal into one of them and raises
:class:`~gateway.errors.MalformedMessage` (a ``ValueError`` too) naming the offending field
when the payload does not decode (the caller drops the whole message, as serde does), and nothing
else: strings must be Unicode scalar values (no lone surrogates, which no UTF-8 encoder
accepts), numbers finite and in range, credentials of bounded length.
:func:`encode_egress` renders what the gateway sends; :func:`parse_egress` is its inverse
(used by the development portal and round-trip tests).

Conventions: UUIDs are ``uuid.UUID``; IPs are ``ipaddress`` objects; keys stay in their
base64 form (validated strictly, see :mod:`gateway.portal.keys`); socket addresses are
:data:`gateway.types.Address`; unix timestamps are ``float`` seconds; unknown JSON fields
are ignored. Secrets (PSKs, TURN and ICE passwords) are hidden from ``repr`` and never
echoed in error messages.
"""

from __future__ import annotations

import ipaddress
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from gateway.errors import MalformedMessage
from gateway.portal.keys import key_bytes, parse_key, parse_public_key
from gateway.resources import Resource, parse_resource, parse_uuid
from gateway.types import Address, format_address

IpAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Latest accepted timestamp: the end of year 9999 (what a timer can still add to).
MAX_UNIX_SECONDS = 253_402_300_799
#: ICE ufrag/password: at most 256 characters (RFC 8839 §5.4).
MAX_ICE_CREDENTIAL = 256
#: A TURN USERNAME is less than 513 bytes (RFC 8489 §14.3); the password only feeds MD5.
MAX_TURN_USERNAME_BYTES = 512
MAX_TURN_PASSWORD = 1024
#: A DNS name in text form, and the proxy IPs a client assigns to one (1.4 clients: 8).
MAX_DOMAIN = 253
MAX_PROXY_IPS = 64

_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: str, where: str) -> str:
    """``value`` if every character is a Unicode scalar value (encodable as UTF-8)."""
    if not value.isascii() and _SURROGATE.search(value) is not None:
        raise MalformedMessage(f"{where}: lone surrogate in a string")
    return value


def check_strings(value: Any, where: str) -> None:
    """Every string (key or value) in a decoded JSON tree is valid text; no recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            check_text(item, where)
        elif isinstance(item, Mapping):
            for key, child in item.items():
                if isinstance(key, str):
                    check_text(key, where)
                stack.append(child)
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _short(value: Any) -> str:
    """``repr`` of hostile input, cut short for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

# --------------------------------------------------------------------------------------
# Field helpers


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MalformedMessage(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _required(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if obj.get(key) is None:
        raise MalformedMessage(f"{where}: missing field {key!r}")
    return obj[key]


def _string(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = _required(obj, key, where)
    if not isinstance(value, str):
        raise MalformedMessage(f"{where}.{key}: expected a string")
    return check_text(value, f"{where}.{key}")


def _bounded_string(obj: Mapping[str, Any], key: str, where: str, limit: int) -> str:
    value = _string(obj, key, where)
    if len(value) > limit:
        raise MalformedMessage(f"{where}.{key}: longer than {limit} characters")
    return value


def _list(obj: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = _required(obj, key, where)
    if not isinstance(value, list):
        raise MalformedMessage(f"{where}.{key}: expected an array")
    return value


def _strings(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    items = _list(obj, key, where)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise MalformedMessage(f"{where}.{key}[{i}]: expected a string")
        check_text(item, f"{where}.{key}[{i}]")
    return tuple(items)


def _ipv4(value: Any, where: str) -> ipaddress.IPv4Address:
    if not isinstance(value, str):
        raise MalformedMessage(f"{where}: expected an IPv4 address string")
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise MalformedMessage(f"{where}: not an IPv4 address: {_short(value)}") from None


def _ipv6(value: Any, where: str) -> ipaddress.IPv6Address:
    if not isinstance(value, str) or "%" in value:
        raise MalformedMessage(f"{where}: expected an IPv6 address string (no scope)")
    try:
        return ipaddress.IPv6Address(value)
    except ValueError:
        raise MalformedMessage(f"{where}: not an IPv6 address: {_short(value)}") from None


def _ip(value: Any, where: str) -> IpAddress:
    if not isinstance(value, str) or "%" in value:
        raise MalformedMessage(f"{where}: expected an IP address string (no scope)")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise MalformedMessage(f"{where}: not an IP address: {_short(value)}") from None


def parse_socket_address(value: Any, where: str) -> Address:
    """``"ip:port"`` or ``"[ipv6]:port"`` into ``(ip, port)`` (IPv6 without brackets)."""
    if not isinstance(value, str) or ":" not in value:
        raise MalformedMessage(f"{where}: expected 'ip:port', got {_short(value)}")
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        ip: IpAddress = _ipv6(host[1:-1], where)
    else:
        ip = _ipv4(host, where)
    if (
        not port_text.isascii()
        or not port_text.isdigit()
        or len(port_text) > 5
        or not 0 < int(port_text) <= 65535
    ):
        raise MalformedMessage(f"{where}: invalid port in {_short(value)}")
    return (str(ip), int(port_text))


def _unix_seconds(value: Any, where: str) -> float:
    """A finite, non-negative timestamp no later than :data:`MAX_UNIX_SECONDS` (a NaN or
    an infinity would reach the timers, which cannot compare or add them)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= MAX_UNIX_SECONDS  # False for NaN
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise MalformedMessage(
            f"{where}: expected unix seconds (a finite number 0..{MAX_UNIX_SECONDS})"
        )
    return float(value)


def _nullable_unix_seconds(obj: Mapping[str, Any], key: str, where: str) -> float | None:
    """Required-but-nullable: the key must be present, ``null`` means "never"."""
    if key not in obj:
        raise MalformedMessage(f"{where}: missing field {key!r} (may be null, not absent)")
    value = obj[key]
    return None if value is None else _unix_seconds(value, f"{where}.{key}")


def _seconds_json(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


# --------------------------------------------------------------------------------------
# Shared shapes


@dataclass(frozen=True, slots=True)
class PortalIceCredentials:
    """ICE ufrag/password as the portal names them. The node converts these."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def parse(cls, value: Any, where: str) -> PortalIceCredentials:
        obj = _object(value, where)
        return cls(
            _bounded_string(obj, "username", where, MAX_ICE_CREDENTIAL),
            _bounded_string(obj, "password", where, MAX_ICE_CREDENTIAL),
        )

    def to_json(self) -> dict[str, str]:
        return {"username": self.username, "password": self.password}


@dataclass(frozen=True, slots=True)
class Interface:
    """The gateway's own tunnel addresses; ``upstream_dns`` is ignored."""

    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address

    @classmethod
    def parse(cls, value: Any, where: str) -> Interface:
        obj = _object(value, where)
        return cls(
            _ipv4(_required(obj, "ipv4", where), f"{where}.ipv4"),
            _ipv6(_required(obj, "ipv6", where), f"{where}.ipv6"),
        )


@dataclass(frozen=True, slots=True)
class TurnRelayEntry:
    """One ``"turn"`` entry: a single address of a relay with its own credentials."""

    id: uuid.UUID
    addr: Address
    username: str
    password: str = field(repr=False)
    expires_at: float


@dataclass(frozen=True, slots=True)
class StunRelayEntry:
    """A ``"stun"`` entry: accepted and ignored by the gateway."""

    id: uuid.UUID
    addr: Address


RelayEntry: TypeAlias = TurnRelayEntry | StunRelayEntry


def parse_relay(value: Any, where: str) -> RelayEntry:
    obj = _object(value, where)
    kind = _string(obj, "type", where)
    rid = parse_uuid(_required(obj, "id", where), f"{where}.id")
    addr = parse_socket_address(_required(obj, "addr", where), f"{where}.addr")
    if kind == "stun":
        return StunRelayEntry(rid, addr)
    if kind == "turn":
        username = _string(obj, "username", where)
        if len(username.encode("utf-8")) > MAX_TURN_USERNAME_BYTES:
            raise MalformedMessage(
                f"{where}.username: longer than {MAX_TURN_USERNAME_BYTES} bytes"
            )
        return TurnRelayEntry(
            rid,
            addr,
            username,
            _bounded_string(obj, "password", where, MAX_TURN_PASSWORD),
            _unix_seconds(_required(obj, "expires_at", where), f"{where}.expires_at"),
        )
    raise MalformedMessage(f"{where}.type: unknown relay type {_short(kind)}")


def relay_to_json(relay: RelayEntry) -> dict[str, Any]:
    if isinstance(relay, StunRelayEntry):
        return {"id": str(relay.id), "type": "stun", "addr": format_address(relay.addr)}
    return {
        "id": str(relay.id),
        "type": "turn",
        "addr": format_address(relay.addr),
        "username": relay.username,
        "password": relay.password,
        "expires_at": _seconds_json(relay.expires_at),
    }


def _relays(obj: Mapping[str, Any], key: str, where: str) -> tuple[RelayEntry, ...]:
    items = _list(obj, key, where)
    return tuple(parse_relay(r, f"{where}.{key}[{i}]") for i, r in enumerate(items))


@dataclass(frozen=True, slots=True)
class TurnRelay:
    """A TURN relay after merging its per-family entries."""

    id: uuid.UUID
    addr_v4: Address | None
    addr_v6: Address | None
    username: str
    password: str = field(repr=False)
    expires_at: float


def merge_relays(relays: Iterable[RelayEntry]) -> list[TurnRelay]:
    """Merge *consecutive* TURN entries with equal ``id`` into one dual-stack relay.

    The last entry's credentials win; STUN entries are skipped; non-consecutive
    duplicates stay separate; a second address of the same family replaces the first.
    """
    merged: list[TurnRelay] = []
    for entry in relays:
        if not isinstance(entry, TurnRelayEntry):
            continue
        is_v6 = ":" in entry.addr[0]
        if merged and merged[-1].id == entry.id:
            previous = merged[-1]
            v4, v6 = previous.addr_v4, previous.addr_v6
        else:
            previous, v4, v6 = None, None, None
        if is_v6:
            v6 = entry.addr
        else:
            v4 = entry.addr
        relay = TurnRelay(entry.id, v4, v6, entry.username, entry.password, entry.expires_at)
        if previous is not None:
            merged[-1] = relay
        else:
            merged.append(relay)
    return merged


@dataclass(frozen=True, slots=True)
class ResolveRequest:
    """A DNS resource name and the proxy IPs the client assigned to it."""

    name: str
    proxy_ips: tuple[IpAddress, ...]

    @classmethod
    def parse(cls, value: Any, where: str) -> ResolveRequest:
        obj = _object(value, where)
        ips = _list(obj, "proxy_ips", where)
        if len(ips) > MAX_PROXY_IPS:
            raise MalformedMessage(f"{where}.proxy_ips: more than {MAX_PROXY_IPS}")
        name = _string(obj, "name", where)
        if not 0 < len(name) <= MAX_DOMAIN:
            raise MalformedMessage(f"{where}.name: expected a domain of 1..{MAX_DOMAIN} characters")
        return cls(
            name,
            tuple(_ip(ip, f"{where}.proxy_ips[{i}]") for i, ip in enumerate(ips)),
        )


def _optional_resolve(obj: Mapping[str, Any], key: str, where: str) -> ResolveRequest | None:
    value = obj.get(key)
    return None if value is None else ResolveRequest.parse(value, f"{where}.{key}")


# --------------------------------------------------------------------------------------
# Ingress (portal -> gateway)


@dataclass(frozen=True, slots=True)
class InitConfig:
    """Masquerade flags: required, values ignored by 1.4.x (configured outside the binary)."""

    ipv4_masquerade_enabled: bool
    ipv6_masquerade_enabled: bool


@dataclass(frozen=True, slots=True)
class Init:
    interface: Interface
    config: InitConfig
    relays: tuple[RelayEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class FlowClient:
    """The ``client`` object of ``authorize_flow``."""

    id: uuid.UUID
    public_key: str
    preshared_key: str = field(repr=False)
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address

    @property
    def public_key_bytes(self) -> bytes:
        return key_bytes(self.public_key)

    @property
    def preshared_key_bytes(self) -> bytes:
        return key_bytes(self.preshared_key)


@dataclass(frozen=True, slots=True)
class AuthorizeFlow:
    ref: str
    resource: Resource
    client: FlowClient
    client_ice_credentials: PortalIceCredentials
    gateway_ice_credentials: PortalIceCredentials
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class LegacyPeer:
    """``client.peer`` of the legacy ``request_connection``."""

    public_key: str
    preshared_key: str = field(repr=False)
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address
    persistent_keepalive: int | None = None

    @property
    def public_key_bytes(self) -> bytes:
        return key_bytes(self.public_key)

    @property
    def preshared_key_bytes(self) -> bytes:
        return key_bytes(self.preshared_key)


@dataclass(frozen=True, slots=True)
class LegacyClient:
    id: uuid.UUID
    ice_parameters: PortalIceCredentials
    domain: ResolveRequest | None
    peer: LegacyPeer


@dataclass(frozen=True, slots=True)
class RequestConnection:
    """Legacy (1.1-1.3 clients); answered with :class:`ConnectionReady`."""

    ref: str
    resource: Resource
    client: LegacyClient
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class AllowAccess:
    """Legacy: add a resource to an existing connection; no reply in 1.4.x."""

    client_id: uuid.UUID
    resource: Resource
    expires_at: float | None
    payload: ResolveRequest | None
    ref: str
    client_ipv4: ipaddress.IPv4Address
    client_ipv6: ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class RejectAccess:
    client_id: uuid.UUID
    resource_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class IceCandidates:
    """The client's trickled candidates (SDP attribute strings without ``a=``)."""

    client_id: uuid.UUID
    candidates: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InvalidateIceCandidates:
    client_id: uuid.UUID
    candidates: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RelaysPresence:
    disconnected_ids: tuple[uuid.UUID, ...]
    connected: tuple[RelayEntry, ...]


@dataclass(frozen=True, slots=True)
class ResourceUpdated:
    resource: Resource


IngressMessage: TypeAlias = (
    Init
    | AuthorizeFlow
    | RequestConnection
    | AllowAccess
    | RejectAccess
    | IceCandidates
    | InvalidateIceCandidates
    | RelaysPresence
    | ResourceUpdated
)


def _parse_init(p: Mapping[str, Any]) -> Init:
    config = _object(_required(p, "config", "init"), "init.config")
    flags = []
    for key in ("ipv4_masquerade_enabled", "ipv6_masquerade_enabled"):
        value = _required(config, key, "init.config")
        if not isinstance(value, bool):
            raise MalformedMessage(f"init.config.{key}: expected a boolean")
        flags.append(value)
    relays = _relays(p, "relays", "init") if p.get("relays") is not None else ()
    return Init(
        Interface.parse(_required(p, "interface", "init"), "init.interface"),
        InitConfig(flags[0], flags[1]),
        relays,
    )


def _parse_authorize_flow(p: Mapping[str, Any]) -> AuthorizeFlow:
    w = "authorize_flow"
    c = _object(_required(p, "client", w), f"{w}.client")
    cw = f"{w}.client"
    client = FlowClient(
        parse_uuid(_required(c, "id", cw), f"{cw}.id"),
        parse_public_key(_required(c, "public_key", cw), f"{cw}.public_key"),
        parse_key(_required(c, "preshared_key", cw), f"{cw}.preshared_key"),
        _ipv4(_required(c, "ipv4", cw), f"{cw}.ipv4"),
        _ipv6(_required(c, "ipv6", cw), f"{cw}.ipv6"),
    )
    return AuthorizeFlow(
        _string(p, "ref", w),
        parse_resource(_required(p, "resource", w), f"{w}.resource"),
        client,
        PortalIceCredentials.parse(
            _required(p, "client_ice_credentials", w), f"{w}.client_ice_credentials"
        ),
        PortalIceCredentials.parse(
            _required(p, "gateway_ice_credentials", w), f"{w}.gateway_ice_credentials"
        ),
        _nullable_unix_seconds(p, "expires_at", w),
    )


def _parse_request_connection(p: Mapping[str, Any]) -> RequestConnection:
    w = "request_connection"
    c = _object(_required(p, "client", w), f"{w}.client")
    cw = f"{w}.client"
    inner = _object(_required(c, "payload", cw), f"{cw}.payload")
    peer_obj = _object(_required(c, "peer", cw), f"{cw}.peer")
    pw = f"{cw}.peer"
    keepalive = peer_obj.get("persistent_keepalive")
    if keepalive is not None and (
        isinstance(keepalive, bool) or not isinstance(keepalive, int) or not 0 <= keepalive < 65536
    ):
        raise MalformedMessage(f"{pw}.persistent_keepalive: expected 0..65535")
    peer = LegacyPeer(
        parse_public_key(_required(peer_obj, "public_key", pw), f"{pw}.public_key"),
        parse_key(_required(peer_obj, "preshared_key", pw), f"{pw}.preshared_key"),
        _ipv4(_required(peer_obj, "ipv4", pw), f"{pw}.ipv4"),
        _ipv6(_required(peer_obj, "ipv6", pw), f"{pw}.ipv6"),
        keepalive,
    )
    client = LegacyClient(
        parse_uuid(_required(c, "id", cw), f"{cw}.id"),
        PortalIceCredentials.parse(
            _required(inner, "ice_parameters", f"{cw}.payload"), f"{cw}.payload.ice_parameters"
        ),
        _optional_resolve(inner, "domain", f"{cw}.payload"),
        peer,
    )
    return RequestConnection(
        _string(p, "ref", w),
        parse_resource(_required(p, "resource", w), f"{w}.resource"),
        client,
        _nullable_unix_seconds(p, "expires_at", w),
    )


def _parse_allow_access(p: Mapping[str, Any]) -> AllowAccess:
    w = "allow_access"
    return AllowAccess(
        parse_uuid(_required(p, "client_id", w), f"{w}.client_id"),
        parse_resource(_required(p, "resource", w), f"{w}.resource"),
        _nullable_unix_seconds(p, "expires_at", w),
        _optional_resolve(p, "payload", w),
        _string(p, "ref", w),
        _ipv4(_required(p, "client_ipv4", w), f"{w}.client_ipv4"),
        _ipv6(_required(p, "client_ipv6", w), f"{w}.client_ipv6"),
    )


def _parse_reject_access(p: Mapping[str, Any]) -> RejectAccess:
    w = "reject_access"
    return RejectAccess(
        parse_uuid(_required(p, "client_id", w), f"{w}.client_id"),
        parse_uuid(_required(p, "resource_id", w), f"{w}.resource_id"),
    )


def _parse_candidates(
    cls: type[IceCandidates] | type[InvalidateIceCandidates], w: str
) -> Callable[[Mapping[str, Any]], IngressMessage]:
    def parse(p: Mapping[str, Any]) -> IngressMessage:
        return cls(
            parse_uuid(_required(p, "client_id", w), f"{w}.client_id"),
            _strings(p, "candidates", w),
        )

    return parse


def _parse_relays_presence(p: Mapping[str, Any]) -> RelaysPresence:
    w = "relays_presence"
    ids = _list(p, "disconnected_ids", w)
    return RelaysPresence(
        tuple(parse_uuid(v, f"{w}.disconnected_ids[{i}]") for i, v in enumerate(ids)),
        _relays(p, "connected", w),
    )


def _parse_resource_updated(p: Mapping[str, Any]) -> ResourceUpdated:
    return ResourceUpdated(parse_resource(p, "resource_updated"))


_INGRESS_PARSERS: dict[str, Callable[[Mapping[str, Any]], IngressMessage]] = {
    "init": _parse_init,
    "authorize_flow": _parse_authorize_flow,
    "request_connection": _parse_request_connection,
    "allow_access": _parse_allow_access,
    "reject_access": _parse_reject_access,
    "ice_candidates": _parse_candidates(IceCandidates, "ice_candidates"),
    "invalidate_ice_candidates": _parse_candidates(
        InvalidateIceCandidates, "invalidate_ice_candidates"
    ),
    "relays_presence": _parse_relays_presence,
    "resource_updated": _parse_resource_updated,
}

INGRESS_EVENTS = frozenset(_INGRESS_PARSERS)


def parse_ingress(event: str, payload: Any) -> IngressMessage:
    """Decode a portal push; :class:`MalformedMessage` names the event and field on failure.

    Any string in the payload that is not valid text refuses the whole message, also in
    fields the gateway ignores: what the portal sent is not what it meant to send.
    """
    parser = _INGRESS_PARSERS.get(event)
    if parser is None:
        raise MalformedMessage(f"unknown event {_short(event)}")
    check_strings(payload, f"{event} payload")
    return parser(_object(payload, f"{event} payload"))


# --------------------------------------------------------------------------------------
# Egress (gateway -> portal)


@dataclass(frozen=True, slots=True)
class FlowAuthorized:
    """Answer to ``authorize_flow``: echoes its ``ref`` verbatim."""

    ref: str


@dataclass(frozen=True, slots=True)
class ConnectionReady:
    """Legacy answer to ``request_connection`` with the gateway's (random) ICE credentials."""

    ref: str
    ice_credentials: PortalIceCredentials


@dataclass(frozen=True, slots=True)
class BroadcastIceCandidates:
    client_ids: tuple[uuid.UUID, ...]
    candidates: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BroadcastInvalidatedIceCandidates:
    client_ids: tuple[uuid.UUID, ...]
    candidates: tuple[str, ...]


EgressMessage: TypeAlias = (
    FlowAuthorized | ConnectionReady | BroadcastIceCandidates | BroadcastInvalidatedIceCandidates
)

_EGRESS_EVENTS: dict[type, str] = {
    FlowAuthorized: "flow_authorized",
    ConnectionReady: "connection_ready",
    BroadcastIceCandidates: "broadcast_ice_candidates",
    BroadcastInvalidatedIceCandidates: "broadcast_invalidated_ice_candidates",
}


def egress_event(message: EgressMessage) -> str:
    try:
        return _EGRESS_EVENTS[type(message)]
    except KeyError:
        raise TypeError(f"not an egress message: {type(message).__name__}") from None


def encode_egress(message: EgressMessage) -> tuple[str, dict[str, Any]]:
    """``(event, payload)`` for a frame on topic ``gateway``
    (rust/connlib/tunnel/src/messages/gateway.rs, ``EgressMessages``)."""
    event = egress_event(message)
    if isinstance(message, FlowAuthorized):
        return event, {"ref": message.ref}
    if isinstance(message, ConnectionReady):
        accepted = {"ice_parameters": message.ice_credentials.to_json()}
        return event, {"ref": message.ref, "gateway_payload": {"ConnectionAccepted": accepted}}
    return event, {
        "client_ids": [str(cid) for cid in message.client_ids],
        "candidates": list(message.candidates),
    }


def parse_egress(event: str, payload: Any) -> EgressMessage:
    """Inverse of :func:`encode_egress` (what a portal does with our frames)."""
    p = _object(payload, f"{event} payload")
    if event == "flow_authorized":
        return FlowAuthorized(_string(p, "ref", event))
    if event == "connection_ready":
        gw = _object(_required(p, "gateway_payload", event), f"{event}.gateway_payload")
        accepted = _object(
            _required(gw, "ConnectionAccepted", f"{event}.gateway_payload"),
            f"{event}.gateway_payload.ConnectionAccepted",
        )
        creds = PortalIceCredentials.parse(
            _required(accepted, "ice_parameters", f"{event}.gateway_payload.ConnectionAccepted"),
            f"{event}.gateway_payload.ConnectionAccepted.ice_parameters",
        )
        return ConnectionReady(_string(p, "ref", event), creds)
    if event in ("broadcast_ice_candidates", "broadcast_invalidated_ice_candidates"):
        ids = _list(p, "client_ids", event)
        client_ids = tuple(parse_uuid(v, f"{event}.client_ids[{i}]") for i, v in enumerate(ids))
        candidates = _strings(p, "candidates", event)
        if event == "broadcast_ice_candidates":
            return BroadcastIceCandidates(client_ids, candidates)
        return BroadcastInvalidatedIceCandidates(client_ids, candidates)
    raise MalformedMessage(f"unknown event {event!r}")
