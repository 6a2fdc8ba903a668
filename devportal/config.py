"""Strict YAML configuration of the development portal (see config/devportal.yaml).

Unknown keys are errors (a typo must not silently disable a policy); every error names
its place, e.g. ``resources[1].filters.tcp[0]``.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from gateway.portal.messages import parse_socket_address
from gateway.resources import (
    CidrResource,
    DnsResource,
    Filter,
    IcmpFilter,
    InternetResource,
    PortRangeFilter,
    Resource,
    parse_network,
)
from gateway.types import Address

DEFAULT_IPV4_POOL: Final = ipaddress.IPv4Network("100.64.0.0/11")
DEFAULT_IPV6_POOL: Final = ipaddress.IPv6Network("fd00:2021:1111::/107")


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    name: str
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    client: str
    resources: tuple[uuid.UUID, ...]
    expires_in: float | None = None


@dataclass(frozen=True, slots=True)
class RelayConfig:
    id: uuid.UUID
    addrs: tuple[Address, ...]
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class DevPortalConfig:
    account: str = "Development"
    host: str = "127.0.0.1"
    port: int = 8081
    gateway_tokens: tuple[str, ...] = field(default=(), repr=False)
    clients: tuple[ClientConfig, ...] = ()
    resources: tuple[Resource, ...] = ()
    policies: tuple[PolicyConfig, ...] = ()
    relays: tuple[RelayConfig, ...] = ()
    ipv4_pool: ipaddress.IPv4Network = DEFAULT_IPV4_POOL
    ipv6_pool: ipaddress.IPv6Network = DEFAULT_IPV6_POOL

    def client_by_token(self, token: str) -> ClientConfig | None:
        return next((c for c in self.clients if c.token == token), None)

    def resource(self, resource_id: uuid.UUID) -> Resource | None:
        return next((r for r in self.resources if r.id == resource_id), None)

    def allowed(self, client: str, resource_id: uuid.UUID) -> PolicyConfig | None:
        """The policy granting ``client`` access to ``resource_id``, if any."""
        return next(
            (p for p in self.policies if p.client == client and resource_id in p.resources), None
        )


def _mapping(value: Any, where: str, allowed: set[str], required: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = set(value) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = required - set(value)
    if missing:
        raise ConfigError(f"{where}: missing key(s) {sorted(missing)}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list")
    return value


def _uuid(value: Any, where: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise ConfigError(f"{where}: not a UUID: {value!r}") from None


def _ports(value: Any, where: str, protocol: str) -> list[Filter]:
    if value is True or value == []:
        return [PortRangeFilter(protocol)]
    if value is False or value is None:
        return []
    out: list[Filter] = []
    for i, item in enumerate(_list(value, where)):
        spot = f"{where}[{i}]"
        text = str(item)
        start_text, sep, end_text = text.partition("-")
        try:
            start = int(start_text)
            end = int(end_text) if sep else start
        except ValueError:
            raise ConfigError(f"{spot}: expected a port or 'start-end', got {item!r}") from None
        if not 0 <= start <= end <= 65535:
            raise ConfigError(f"{spot}: invalid port range {item!r}")
        out.append(PortRangeFilter(protocol, start, end))
    return out


def _filters(value: Any, where: str) -> tuple[Filter, ...]:
    if value is None:
        return ()
    obj = _mapping(value, where, {"tcp", "udp", "icmp"}, set())
    filters: list[Filter] = []
    for protocol in ("tcp", "udp"):
        if protocol in obj:
            filters.extend(_ports(obj[protocol], f"{where}.{protocol}", protocol))
    icmp = obj.get("icmp", False)
    if not isinstance(icmp, bool):
        raise ConfigError(f"{where}.icmp: expected true or false")
    if icmp:
        filters.append(IcmpFilter())
    return tuple(filters)


def _resource(value: Any, where: str) -> Resource:
    obj = _mapping(value, where, {"id", "type", "address", "name", "filters"}, {"id", "type"})
    rid = _uuid(obj["id"], f"{where}.id")
    kind = obj["type"]
    if kind == "internet":
        return InternetResource(rid)
    if kind not in ("cidr", "dns"):
        raise ConfigError(f"{where}.type: expected cidr, dns or internet, got {kind!r}")
    address = _str(obj.get("address"), f"{where}.address")
    name = str(obj.get("name") or address)
    filters = _filters(obj.get("filters"), f"{where}.filters")
    if kind == "dns":
        return DnsResource(rid, address, name, filters)
    try:
        network = parse_network(address, f"{where}.address")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return CidrResource(rid, network, name, filters)


def _relay(value: Any, where: str) -> RelayConfig:
    obj = _mapping(value, where, {"id", "addr", "addrs", "secret"}, {"id", "secret"})
    raw = _list(obj.get("addrs"), f"{where}.addrs") + ([obj["addr"]] if "addr" in obj else [])
    if not raw:
        raise ConfigError(f"{where}: needs 'addr' or 'addrs'")
    addrs = []
    for i, addr in enumerate(raw):
        try:
            addrs.append(parse_socket_address(addr, f"{where}.addrs[{i}]"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return RelayConfig(
        _uuid(obj["id"], f"{where}.id"), tuple(addrs), _str(obj["secret"], f"{where}.secret")
    )


def parse_config(data: Any) -> DevPortalConfig:
    """Validate a parsed YAML document."""
    top = _mapping(
        data,
        "config",
        {
            "account",
            "listen",
            "gateway_tokens",
            "clients",
            "resources",
            "policies",
            "relays",
            "address_pools",
        },
        {"gateway_tokens"},
    )
    listen = _mapping(top.get("listen") or {}, "listen", {"host", "port"}, set())
    port = listen.get("port", 8081)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError("listen.port: expected 0..65535")
    tokens = tuple(
        _str(t, f"gateway_tokens[{i}]")
        for i, t in enumerate(_list(top["gateway_tokens"], "gateway_tokens"))
    )
    clients = []
    for i, item in enumerate(_list(top.get("clients"), "clients")):
        obj = _mapping(item, f"clients[{i}]", {"name", "token"}, {"name", "token"})
        clients.append(
            ClientConfig(
                _str(obj["name"], f"clients[{i}].name"), _str(obj["token"], f"clients[{i}].token")
            )
        )
    resources = tuple(
        _resource(r, f"resources[{i}]")
        for i, r in enumerate(_list(top.get("resources"), "resources"))
    )
    known_resources = {r.id for r in resources}
    known_clients = {c.name for c in clients}
    policies = []
    for i, item in enumerate(_list(top.get("policies"), "policies")):
        where = f"policies[{i}]"
        obj = _mapping(item, where, {"client", "resources", "expires_in"}, {"client", "resources"})
        client = _str(obj["client"], f"{where}.client")
        if client not in known_clients:
            raise ConfigError(f"{where}.client: no client named {client!r}")
        ids = tuple(
            _uuid(r, f"{where}.resources[{j}]")
            for j, r in enumerate(_list(obj["resources"], f"{where}.resources"))
        )
        for j, rid in enumerate(ids):
            if rid not in known_resources:
                raise ConfigError(f"{where}.resources[{j}]: no resource with id {rid}")
        expires_in = obj.get("expires_in")
        if expires_in is not None and (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, int | float)
            or expires_in <= 0
        ):
            raise ConfigError(f"{where}.expires_in: expected a positive number of seconds")
        policies.append(
            PolicyConfig(client, ids, float(expires_in) if expires_in is not None else None)
        )
    relays = tuple(
        _relay(r, f"relays[{i}]") for i, r in enumerate(_list(top.get("relays"), "relays"))
    )
    pools = _mapping(top.get("address_pools") or {}, "address_pools", {"ipv4", "ipv6"}, set())
    try:
        ipv4_pool = ipaddress.IPv4Network(pools.get("ipv4", "100.64.0.0/11"))
        ipv6_pool = ipaddress.IPv6Network(pools.get("ipv6", "fd00:2021:1111::/107"))
    except ValueError as exc:
        raise ConfigError(f"address_pools: {exc}") from None
    return DevPortalConfig(
        account=str(top.get("account", "Development")),
        host=str(listen.get("host", "127.0.0.1")),
        port=port,
        gateway_tokens=tokens,
        clients=tuple(clients),
        resources=resources,
        policies=tuple(policies),
        relays=relays,
        ipv4_pool=ipv4_pool,
        ipv6_pool=ipv6_pool,
    )


def load_config(path: Path | str) -> DevPortalConfig:
    """Read and validate a YAML file; ``ConfigError`` says what is wrong where."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
