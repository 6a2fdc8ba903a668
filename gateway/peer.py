"""One client's state on the gateway: authorizations, filters and DNS-resource NAT.

Theory of operation (``ClientOnGateway`` in rust/connlib/tunnel/src/peer.rs, driven by
rust/connlib/tunnel/src/gateway.rs and rust/gateway/src/eventloop.rs):

* ``add_resource``/``remove_resource``/``update_resource`` change the authorized set; each
  change rebuilds the filter table. A DNS set-up only inserts its proxy IPs.
* ``handle_inbound`` takes a decrypted packet from the client: p2p control packets are
  consumed, then anti-spoofing, the destination check and the forward NAT of
  DNS-resource proxy IPs. The result is the packet itself (``bytes``: write it to
  the TUN) or a ``Drop``, ``Reply`` or ``NeedsResolution``.
* ``handle_outbound`` takes a TUN packet addressed to the client and reverses the NAT.
  Unlike 1.4.0, which drops every packet that is not TCP/UDP/ICMP echo here, it
  passes such packets (ICMP errors, GRE, ESP, ...) through unchanged, as 1.4.13 does:
  without a NAT session there is nothing to reverse. ICMP errors quoting a packet of a
  same-family NAT session are reversed too (quoted destination and port, and the outer
  source if the resource itself sent the error), so port-unreachable and traceroute work
  for DNS resources.
* ``handle_timeout`` runs the 1 s tick: authorization expiry by wall clock, NAT
  session TTL and translation health, which emits ``NeedsResolution`` events for
  domains whose proxy IPs saw no reply for 120 s. The shell resolves off-thread and calls
  ``handle_resolved``.

Bounds (1.4 has none; README "Limits"): DNS translations, domains and AssignedIps
lookups in flight per client (``MAX_DNS_*``, ``MAX_RESOLUTIONS_IN_FLIGHT``), proxy IPs only
inside the proxy ranges, and the NAT's sessions and ports (``gateway/packet/nat.py``). A
limit hit is counted in ``counters`` and logged once per client.

Sans-IO: no clocks, sockets or threads; bad packets are counted in ``counters``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from gateway.dns_pattern import matches
from gateway.drops import Drop as Reason
from gateway.packet.filter import (
    KIND_ICMP,
    KIND_OTHER,
    KIND_TCP,
    KIND_UDP,
    FilterEngine,
    PrefixTable,
    build_filter_table,
    resource_networks,
)
from gateway.packet.icmp import build_prohibited, quoted_flow, reverse_icmp_error
from gateway.packet.ip import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    IPV6_EXTENSION_HEADERS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_P2P_CONTROL,
    PROTO_TCP,
    PROTO_UDP,
    IPAddress,
    in_resources_range,
    rewrite,
)
from gateway.packet.nat import NAT_EXHAUSTED, NAT_MAX_SESSIONS, NAT_PORTS, NatTable
from gateway.packet.nat46 import ipv4_to_ipv6, ipv6_to_ipv4
from gateway.packet.p2p_control import AssignedIps, decode, encode_domain_status
from gateway.resources import CidrResource, DnsResource, Filter, InternetResource, Resource

logger = logging.getLogger(__name__)

EXPIRE_RESOURCES_INTERVAL = 1.0
#: With only expiries to watch (no NAT, no DNS translations) the tick sleeps until the next
#: ``expires_at``, but at most this long, so a step of the wall clock is noticed in time.
EXPIRY_RECHECK = 10.0
NO_INCOMING_WINDOW = 120.0
NO_INCOMING_LOOKAHEAD = 10.0
GRACE_PERIOD = 1.0
DNS_RESOLUTION_TIMEOUT = 10.0
#: Bounds on what one client can make the gateway hold or do for its DNS resources. 1.4
#: has none; a client sends 8 proxy IPs per domain, so 4096 is 512 domains in use at once.
MAX_DNS_TRANSLATIONS = 4096
#: Domains with a stored resolution, all resources together.
MAX_DNS_DOMAINS = 4096
#: AssignedIps lookups outstanding; the resolver's own budget (1000) is shared by all.
MAX_RESOLUTIONS_IN_FLIGHT = 32

_ZERO_ADDRESSES = bytes(32)
_ECHO_TYPES = frozenset({ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY})
_ECHO6_TYPES = frozenset({ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY})


@dataclass(frozen=True, slots=True)
class Drop:
    """The packet was dropped; ``reason`` is also the ``counters`` key."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reply:
    """An IP packet to encrypt back to the client (ICMP prohibited or DomainStatus)."""

    packet: bytes


@dataclass(frozen=True, slots=True)
class NeedsResolution:
    """Resolve ``domain`` (A and AAAA, 10 s timeout), then call ``handle_resolved``.

    As an ``handle_inbound`` result it answers an AssignedIps packet (``reply=True``);
    as an event it is a translation refresh (``reply=False``).
    """

    resource_id: uuid.UUID
    domain: str
    proxy_ips: tuple[IPAddress, ...]


@dataclass(frozen=True, slots=True)
class ResourceExpired:
    """The authorization of ``resource_id`` reached its ``expires_at`` and was removed."""

    resource_id: uuid.UUID


#: ``bytes`` means "write this packet to the TUN".
InboundResult: TypeAlias = bytes | Drop | Reply | NeedsResolution
Event: TypeAlias = ResourceExpired | NeedsResolution

DROP_MALFORMED = Drop(Reason.MALFORMED)
DROP_SPOOFED = Drop(Reason.SPOOFED_SOURCE)
DROP_NOT_ALLOWED = Drop(Reason.NOT_ALLOWED)
DROP_UNKNOWN_PROTOCOL = Drop(Reason.UNKNOWN_PROTOCOL)
DROP_NAT_FAILED = Drop(Reason.NAT_FAILED)
DROP_NAT_EXHAUSTED = Drop(Reason.NAT_EXHAUSTED)
DROP_NAT_SESSIONS_LIMIT = Drop(Reason.NAT_SESSIONS_LIMIT)
DROP_P2P_IGNORED = Drop(Reason.P2P_IGNORED)
DROP_RESOLUTIONS_LIMIT = Drop(Reason.DNS_RESOLUTIONS_LIMIT)


@dataclass(slots=True)
class _Authorization:
    resource: Resource
    expires_at: float | None
    #: DNS resources: domain -> resolved IPs (IPv6 first, as the resolver returns them).
    resolved: dict[str, tuple[IPAddress, ...]] = field(default_factory=dict)


@dataclass(slots=True)
class _Translation:
    """Proxy IP -> real IP of one domain, with the translation health bookkeeping."""

    resource_id: uuid.UUID
    domain: str
    real_ip: bytes
    created_at: float
    last_incoming: float | None = None
    grace_started: float | None = None

    def no_incoming_for_window(self, at: float) -> bool:
        since = self.last_incoming if self.last_incoming is not None else self.created_at
        return at - since >= NO_INCOMING_WINDOW


def dns_nat_allowed(resource: Resource, domain: str) -> bool:
    """Whether ``domain``'s proxy IPs may be translated for ``resource``: it is a
    DNS resource and the domain matches its address pattern. The only ways an
    authorized resource's NAT set-up fails, so a legacy ``request_connection`` can know
    before its reply (rust/gateway/src/eventloop.rs)."""
    return isinstance(resource, DnsResource) and matches(resource.address, domain.rstrip("."))


class ClientOnGateway:
    """One client's authorizations, filters and DNS-resource NAT (rust/connlib/tunnel/src/peer.rs).
    Sans-IO."""

    def __init__(
        self,
        *,
        client_id: uuid.UUID,
        ipv4: ipaddress.IPv4Address,
        ipv6: ipaddress.IPv6Address,
        now: float,
        icmp_prohibited: bool = False,
        nat_ports: tuple[int, int] = NAT_PORTS,
        max_nat_sessions: int = NAT_MAX_SESSIONS,
        max_translations: int = MAX_DNS_TRANSLATIONS,
        max_domains: int = MAX_DNS_DOMAINS,
        max_resolutions: int = MAX_RESOLUTIONS_IN_FLIGHT,
    ) -> None:
        self.client_id = client_id
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.counters: Counter[str] = Counter()
        self._ipv4 = ipv4.packed
        self._ipv6 = ipv6.packed
        self._icmp_prohibited = icmp_prohibited
        self._resources: dict[uuid.UUID, _Authorization] = {}
        self._translations: dict[bytes, _Translation] = {}
        #: the translations whose resource is still authorized (rebuilt with the filters)
        self._active_translations: dict[bytes, _Translation] = {}
        self._filters: PrefixTable[FilterEngine] = PrefixTable()
        self._has_internet = False
        self._nat = NatTable(ports=nat_ports, max_sessions=max_nat_sessions)
        self._max_translations = max_translations
        self._max_domains = max_domains
        self._max_resolutions = max_resolutions
        #: deadlines of the AssignedIps lookups outstanding, oldest first
        self._resolving: deque[float] = deque()
        #: limits already logged for this client (each is logged once, then only counted)
        self._logged: set[str] = set()
        self._events: deque[Event] = deque()
        self._next_tick: float | None = None
        #: (resource, domain) -> deadline of an outstanding re-resolution
        self._refreshing: dict[tuple[uuid.UUID, str], float] = {}
        self._created_at = now

    # --- authorizations ------------------------------------------------------------------

    def add_resource(self, resource: Resource, expires_at: float | None, now: float) -> None:
        """Authorize ``resource``; if already present only its filters change (1.4 quirk)."""
        existing = self._resources.get(resource.id)
        if existing is not None:
            self.update_resource(resource)
            return
        self._resources[resource.id] = _Authorization(resource, expires_at)
        self._rebuild_filters()
        if expires_at is not None:
            # A tick within a second, even if one was planned later for an older expiry.
            tick = now + EXPIRE_RESOURCES_INTERVAL
            if self._next_tick is None or tick < self._next_tick:
                self._next_tick = tick

    def remove_resource(self, resource_id: uuid.UUID) -> None:
        """Revoke access (``reject_access``); unknown ids are a no-op."""
        if self._resources.pop(resource_id, None) is not None:
            self._rebuild_filters()

    def update_resource(self, resource: Resource) -> None:
        """Replace the filters of an authorized resource (``resource_updated``).

        A change of resource type is refused; address changes are not applied (``update_resource``
        in rust/connlib/tunnel/src/peer.rs).
        """
        existing = self._resources.get(resource.id)
        if existing is None:
            return
        if type(existing.resource) is not type(resource):
            self.counters[Reason.RESOURCE_TYPE_CHANGE_REFUSED] += 1
            logger.debug("Refusing to change the type of resource %s", resource.id)
            return
        if existing.resource.filters != resource.filters:
            existing.resource = dataclasses.replace(existing.resource, filters=resource.filters)
            self._rebuild_filters()

    def is_empty(self) -> bool:
        """No resource left: the caller drops this client's state."""
        return not self._resources

    def resources(self) -> list[tuple[Resource, float | None]]:
        """Authorized resources with their ``expires_at`` (unix seconds or None)."""
        return [(auth.resource, auth.expires_at) for auth in self._resources.values()]

    def filter_table(self) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                         FilterEngine]]:
        """The current filter table entries, for status output and tests."""
        return self._filters.items()

    def translations(self) -> dict[IPAddress, IPAddress]:
        """Proxy IP -> real IP of every DNS translation, for status output and tests."""
        return {
            ipaddress.ip_address(proxy): ipaddress.ip_address(tr.real_ip)
            for proxy, tr in self._translations.items()
        }

    # --- DNS-resource translations ---------------------------------------------------------

    def setup_dns_translation(
        self,
        resource_id: uuid.UUID,
        domain: str,
        proxy_ips: Sequence[IPAddress],
        resolved: Sequence[IPAddress],
        now: float,
    ) -> bool:
        """Map ``proxy_ips`` of ``domain`` round-robin to ``resolved``.

        False if the resource is not authorized, not a DNS resource, or ``domain`` does
        not match its pattern. An empty ``resolved`` succeeds without installing anything.

        Beyond 1.4: proxy IPs outside the DNS proxy ranges (100.96.0.0/11,
        fd00:2021:1111:8000::/107) are ignored, since a translation for any other
        address would override that address's filters; with none left, or past the
        client's caps on translations and domains, the set-up fails (``Inactive``). The
        filter table is updated in place for the new proxy IPs, not rebuilt, so a
        client's AssignedIps costs the same with 10 translations as with 4000.
        """
        auth = self._resources.get(resource_id)
        if auth is None or not dns_nat_allowed(auth.resource, domain):
            return False
        domain = domain.rstrip(".")
        proxies_v4: list[bytes] = []
        proxies_v6: list[bytes] = []
        for ip in proxy_ips:
            raw = ip.packed
            if in_resources_range(raw):
                (proxies_v4 if len(raw) == 4 else proxies_v6).append(raw)
        rejected = len(proxy_ips) - len(proxies_v4) - len(proxies_v6)
        if rejected:
            self._limit_hit(Reason.PROXY_IP_OUT_OF_RANGE, rejected,
                            "proxy IPs outside the DNS proxy ranges ignored")
            if not proxies_v4 and not proxies_v6:
                return False
        if not resolved:
            # Nothing to install (1.4 answers Active all the same). Forgetting the domain's
            # old list is what storing an empty one would do, without a new entry.
            if auth.resolved.pop(domain, None):
                self._rebuild_filters()
            return True
        translations = self._translations
        new = sum(1 for raw in (*proxies_v4, *proxies_v6) if raw not in translations)
        if new and len(translations) + new > self._max_translations:
            self._limit_hit(Reason.DNS_TRANSLATIONS_LIMIT, 1,
                            f"more than {self._max_translations} DNS translations refused")
            return False
        if domain not in auth.resolved and self._domain_count() >= self._max_domains:
            self._limit_hit(Reason.DNS_DOMAINS_LIMIT, 1,
                            f"more than {self._max_domains} DNS domains refused")
            return False
        real_v4 = [ip.packed for ip in resolved if ip.version == 4]
        real_v6 = [ip.packed for ip in resolved if ip.version == 6]
        installed: list[tuple[bytes, _Translation]] = []
        for proxies, pool in ((proxies_v4, real_v4 or real_v6), (proxies_v6, real_v6 or real_v4)):
            for index, proxy in enumerate(proxies):
                translation = _Translation(resource_id, domain, pool[index % len(pool)], now)
                translations[proxy] = translation
                installed.append((proxy, translation))
        previous = auth.resolved.get(domain, ())
        auth.resolved[domain] = tuple(resolved)
        if self._host_resources_touched(set(previous) ^ set(resolved)):
            self._rebuild_filters()
        else:
            engine = FilterEngine.from_filter_lists([auth.resource.filters])
            for proxy, translation in installed:
                self._filters.insert(ipaddress.ip_network(proxy), engine)
                self._active_translations[proxy] = translation
        self._arm(now)
        return True

    def handle_resolved(
        self,
        resource_id: uuid.UUID,
        domain: str,
        proxy_ips: Sequence[IPAddress],
        resolved: Sequence[IPAddress],
        now: float,
        *,
        reply: bool,
    ) -> bytes | None:
        """Apply a resolution; with ``reply`` return the DomainStatus packet for the client.

        A translation refresh (``reply=False`` while a refresh is outstanding) that yields the same
        set of IPs changes nothing.
        """
        domain = domain.rstrip(".")
        key = (resource_id, domain)
        if reply and self._resolving:
            self._resolving.popleft()
        if not reply and self._refreshing.pop(key, None) is not None:
            auth = self._resources.get(resource_id)
            if auth is not None and set(auth.resolved.get(domain, ())) == set(resolved):
                return None
        ok = self.setup_dns_translation(resource_id, domain, proxy_ips, resolved, now)
        if not ok:
            self.counters[Reason.DNS_SETUP_FAILED] += 1
        return encode_domain_status(resource_id, domain, ok) if reply else None

    # --- data path -------------------------------------------------------------------------

    def handle_inbound(self, packet: bytes, now: float) -> InboundResult:
        """A decrypted packet from the client (``handle_network_input`` in
        rust/connlib/tunnel/src/gateway.rs)."""
        n = len(packet)
        if n < 20:
            self.counters[Reason.MALFORMED] += 1
            return DROP_MALFORMED
        version = packet[0] >> 4
        if version == 4:
            l4 = (packet[0] & 0x0F) << 2
            end = (packet[2] << 8) | packet[3]
            if l4 < 20 or end < l4 or end > n:
                self.counters[Reason.MALFORMED] += 1
                return DROP_MALFORMED
            if end != n:
                packet = packet[:end]
            if packet[12:16] != self._ipv4:
                self.counters[Reason.SPOOFED_SOURCE] += 1
                return DROP_SPOOFED
            dst = packet[16:20]
            protocol = packet[9]
            if (packet[6] & 0x1F) or packet[7]:
                l4 = -1  # not the first fragment: no transport header
            icmp = PROTO_ICMP
        elif version == 6:
            end = 40 + ((packet[4] << 8) | packet[5])
            if n < 40 or end > n:
                self.counters[Reason.MALFORMED] += 1
                return DROP_MALFORMED
            if end != n:
                packet = packet[:end]
            protocol = packet[6]
            if protocol == PROTO_P2P_CONTROL and packet[8:40] == _ZERO_ADDRESSES:
                return self._handle_control(packet, now)
            if packet[8:24] != self._ipv6:
                self.counters[Reason.SPOOFED_SOURCE] += 1
                return DROP_SPOOFED
            dst = packet[24:40]
            l4 = 40 if protocol not in IPV6_EXTENSION_HEADERS else -1
            icmp = PROTO_ICMPV6
        else:
            self.counters[Reason.MALFORMED] += 1
            return DROP_MALFORMED

        if not self._has_internet or in_resources_range(dst):
            engine = self._filters.lookup(dst)
            if engine is None:
                return self._deny(packet)
            if not engine.permit_all:
                kind = KIND_OTHER
                port = 0
                if l4 >= 0:
                    if protocol == PROTO_TCP:
                        if end - l4 >= 20:
                            kind = KIND_TCP
                            port = (packet[l4 + 2] << 8) | packet[l4 + 3]
                    elif protocol == PROTO_UDP:
                        if end - l4 >= 8:
                            kind = KIND_UDP
                            port = (packet[l4 + 2] << 8) | packet[l4 + 3]
                    elif protocol == icmp and end - l4 >= 8:
                        kind = KIND_ICMP
                if not engine.allows(kind, port):
                    return self._deny(packet)

        if self._active_translations:
            translation = self._active_translations.get(dst)
            if translation is not None:
                return self._translate_forward(packet, dst, translation, protocol, l4, now)
        return packet

    def handle_outbound(self, packet: bytes, now: float) -> bytes | None:
        """A TUN packet towards this client (``handle_tun_input`` in
        rust/connlib/tunnel/src/gateway.rs): reverse NAT if a session matches.

        None means drop (malformed, or a NAT46/64 translation back that is impossible).
        """
        n = len(packet)
        if n < 20:
            self.counters[Reason.OUTBOUND_MALFORMED] += 1
            return None
        version = packet[0] >> 4
        if version == 4:
            l4 = (packet[0] & 0x0F) << 2
            end = (packet[2] << 8) | packet[3]
            if l4 < 20 or end < l4 or end > n:
                self.counters[Reason.OUTBOUND_MALFORMED] += 1
                return None
            if end != n:
                packet = packet[:end]
            if (packet[6] & 0x1F) or packet[7]:
                return packet  # a later fragment carries no ports: nothing to reverse
            src = packet[12:16]
        elif version == 6:
            end = 40 + ((packet[4] << 8) | packet[5])
            if n < 40 or end > n:
                self.counters[Reason.OUTBOUND_MALFORMED] += 1
                return None
            if end != n:
                packet = packet[:end]
            l4 = 40
            src = packet[8:24]
        else:
            self.counters[Reason.OUTBOUND_MALFORMED] += 1
            return None
        if not self._nat:
            return packet
        protocol = packet[9] if version == 4 else packet[6]
        if protocol == PROTO_TCP:
            key = (PROTO_TCP, 2) if end - l4 >= 20 else None
        elif protocol == PROTO_UDP:
            key = (PROTO_UDP, 2) if end - l4 >= 8 else None
        else:
            key = self._nat_key(packet, version, protocol, l4, end, reply=True)
        if key is None:
            if protocol == (PROTO_ICMP if version == 4 else PROTO_ICMPV6):
                return self._reverse_icmp_error(packet, l4, end, src)
            return packet
        kind, port_offset = key
        port = (packet[l4 + port_offset] << 8) | packet[l4 + port_offset + 1]
        inside = self._nat.translate_incoming(kind, port, src)
        if inside is None:
            return packet
        _, original_port, proxy = inside
        translation = self._translations.get(proxy)
        if translation is not None:
            translation.last_incoming = now
            translation.grace_started = None
        if len(proxy) == len(src):
            return rewrite(packet, l4, protocol, src=proxy, port_offset=port_offset,
                           port=original_port)
        if port != original_port:
            packet = rewrite(packet, l4, protocol, port_offset=port_offset, port=original_port)
        if len(proxy) == 16:
            translated = ipv4_to_ipv6(packet, proxy, self._ipv6)
        else:
            translated = ipv6_to_ipv4(packet, proxy, self._ipv4)
        if translated is None:
            self.counters[Reason.OUTBOUND_NAT_FAILED] += 1
        return translated

    # --- timers and events -----------------------------------------------------------------

    def handle_timeout(self, now: float, unix_now: float) -> None:
        """The tick: expiry (by ``unix_now``), NAT TTL, translation health.

        It runs every second while NAT sessions or DNS translations exist. With only
        expiries to watch it runs at the next ``expires_at`` instead (at most
        ``EXPIRY_RECHECK`` later), which removes access on time without waking thousands
        of idle clients every second.
        """
        if self._next_tick is None or now < self._next_tick:
            return
        self._next_tick = None
        expired = [
            rid for rid, auth in self._resources.items()
            if auth.expires_at is not None and auth.expires_at <= unix_now
        ]
        for rid in expired:
            del self._resources[rid]
            logger.debug("Access to resource %s expired for client %s", rid, self.client_id)
            self._events.append(ResourceExpired(rid))
        if expired:
            self._rebuild_filters()
        self._nat.handle_timeout(now)
        self._check_translations(now)
        self._arm(now, unix_now)

    def poll_timeout(self) -> float | None:
        """The next tick while anything can expire, else None."""
        return self._next_tick

    def poll_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # --- internals -------------------------------------------------------------------------

    def _arm(self, now: float, unix_now: float | None = None) -> None:
        """Schedule the next tick; ``unix_now`` (known in a tick) allows sleeping longer."""
        if self._next_tick is not None:
            return
        if self._nat or self._translations:
            self._next_tick = now + EXPIRE_RESOURCES_INTERVAL
            return
        expiries = [a.expires_at for a in self._resources.values() if a.expires_at is not None]
        if not expiries:
            return
        if unix_now is None:
            self._next_tick = now + EXPIRE_RESOURCES_INTERVAL
        else:
            wait = min(max(min(expiries) - unix_now, 0.0), EXPIRY_RECHECK)
            self._next_tick = now + wait

    def _reverse_icmp_error(self, packet: bytes, l4: int, end: int, src: bytes) -> bytes:
        """Point an ICMP error about a NAT'd packet back at the proxy IP (1.4.13 behaviour).

        Errors about NAT46/64 flows and errors without a session pass unchanged.
        """
        flow = quoted_flow(packet, l4, end)
        if flow is None:
            return packet
        inside = self._nat.translate_incoming(flow.kind, flow.port, flow.destination)
        if inside is None:
            return packet
        _, original_port, proxy = inside
        if len(proxy) != len(flow.destination):
            self.counters[Reason.ICMP_ERROR_NAT46_UNTRANSLATED] += 1
            return packet
        return reverse_icmp_error(
            packet, l4, end, flow, inner_destination=proxy, port=original_port,
            outer_source=proxy if src == flow.destination else None,
        )

    def _deny(self, packet: bytes) -> Drop | Reply:
        self.counters[Reason.NOT_ALLOWED] += 1
        if self._icmp_prohibited:
            reply = build_prohibited(packet)
            if reply is not None:
                return Reply(reply)
        return DROP_NOT_ALLOWED

    def _handle_control(self, packet: bytes, now: float) -> Reply | NeedsResolution | Drop:
        event = decode(packet)
        if not isinstance(event, AssignedIps):
            self.counters[Reason.P2P_IGNORED] += 1
            return DROP_P2P_IGNORED
        auth = self._resources.get(event.resource_id)
        # Checking the type and pattern before resolving spares a DNS lookup of a name we
        # would refuse anyway; the answer (Inactive) is the one rust/connlib/tunnel/src/gateway.rs
        # gives a resource not allowed.
        if (
            auth is None
            or not isinstance(auth.resource, DnsResource)
            or not matches(auth.resource.address, event.domain)
        ):
            self.counters[Reason.P2P_INACTIVE] += 1
            return Reply(encode_domain_status(event.resource_id, event.domain, False))
        # One client may not hold more than its share of the resolver: the client
        # retransmits AssignedIps until answered, so a dropped one is retried later.
        resolving = self._resolving
        while resolving and resolving[0] <= now:
            resolving.popleft()  # an answer that never came back
        if len(resolving) >= self._max_resolutions:
            self._limit_hit(Reason.DNS_RESOLUTIONS_LIMIT, 1,
                            f"more than {self._max_resolutions} DNS lookups in flight; "
                            "AssignedIps dropped")
            return DROP_RESOLUTIONS_LIMIT
        resolving.append(now + DNS_RESOLUTION_TIMEOUT + EXPIRE_RESOURCES_INTERVAL)
        return NeedsResolution(event.resource_id, event.domain, event.proxy_ips)

    def _limit_hit(self, counter: str, count: int, message: str) -> None:
        """Count a refusal; log it the first time for this client only."""
        self.counters[counter] += count
        if counter not in self._logged:
            self._logged.add(counter)
            logger.warning("client %s: %s (counted as %s from now on)",
                           self.client_id, message, counter)

    def _domain_count(self) -> int:
        return sum(len(auth.resolved) for auth in self._resources.values())

    def _host_resources_touched(self, addresses: set[IPAddress]) -> bool:
        """Whether a CIDR resource is exactly one of ``addresses`` (a /32 or /128): only
        then does a DNS resource's resolved list change a CIDR entry's filters."""
        if not addresses:
            return False
        for auth in self._resources.values():
            resource = auth.resource
            if isinstance(resource, CidrResource):
                network = resource.address
                if network.prefixlen == network.max_prefixlen and (
                    network.network_address in addresses
                ):
                    return True
        return False

    @staticmethod
    def _nat_key(
        packet: bytes, version: int, protocol: int, l4: int, end: int, *, reply: bool
    ) -> tuple[int, int] | None:
        """(NAT kind, offset of the port/identifier in the transport) or None if no key."""
        if protocol == PROTO_TCP:
            if end - l4 >= 20:
                return PROTO_TCP, 2 if reply else 0
        elif protocol == PROTO_UDP:
            if end - l4 >= 8:
                return PROTO_UDP, 2 if reply else 0
        elif end - l4 >= 8:
            echo = _ECHO_TYPES if version == 4 else _ECHO6_TYPES
            icmp = PROTO_ICMP if version == 4 else PROTO_ICMPV6
            if protocol == icmp and packet[l4] in echo and packet[l4 + 1] == 0:
                return PROTO_ICMP, 4
        return None

    def _translate_forward(
        self, packet: bytes, dst: bytes, translation: _Translation, protocol: int, l4: int,
        now: float,
    ) -> bytes | Drop:
        # Inlined _nat_key(reply=False): this runs for every packet to a proxy IP.
        end = len(packet)
        if l4 < 0:
            key = None
        elif protocol == PROTO_TCP:
            key = (PROTO_TCP, 0) if end - l4 >= 20 else None
        elif protocol == PROTO_UDP:
            key = (PROTO_UDP, 0) if end - l4 >= 8 else None
        else:
            key = self._nat_key(packet, packet[0] >> 4, protocol, l4, end, reply=False)
        if key is None:
            self.counters[Reason.UNKNOWN_PROTOCOL] += 1
            return DROP_UNKNOWN_PROTOCOL
        kind, port_offset = key
        port = (packet[l4 + port_offset] << 8) | packet[l4 + port_offset + 1]
        real = translation.real_ip
        new_port = self._nat.translate_outgoing(kind, port, dst, real, now)
        if new_port < 0:
            if new_port == NAT_EXHAUSTED:
                self.counters[Reason.NAT_EXHAUSTED] += 1
                return DROP_NAT_EXHAUSTED
            self.counters[Reason.NAT_SESSIONS_LIMIT] += 1
            return DROP_NAT_SESSIONS_LIMIT
        if translation.grace_started is None:
            last = translation.last_incoming
            since = translation.created_at if last is None else last
            if now + NO_INCOMING_LOOKAHEAD - since >= NO_INCOMING_WINDOW:
                translation.grace_started = now
        if self._next_tick is None:
            self._next_tick = now + EXPIRE_RESOURCES_INTERVAL
        if len(real) == len(dst):
            return rewrite(packet, l4, protocol, dst=real, port_offset=port_offset, port=new_port)
        if new_port != port:
            packet = rewrite(packet, l4, protocol, port_offset=port_offset, port=new_port)
        if len(real) == 16:
            translated = ipv4_to_ipv6(packet, self._ipv6, real)
        else:
            translated = ipv6_to_ipv4(packet, self._ipv4, real)
        if translated is None:
            self.counters[Reason.NAT_FAILED] += 1
            return DROP_NAT_FAILED
        return translated

    def _check_translations(self, now: float) -> None:
        """Emit a refresh for each (resource, domain) whose translations all went quiet."""
        for key, deadline in list(self._refreshing.items()):
            if deadline <= now:
                del self._refreshing[key]  # the resolution result never came back
        candidates: dict[tuple[uuid.UUID, str], list[bytes]] = {}
        expired: set[tuple[uuid.UUID, str]] = set()
        for proxy, tr in self._translations.items():
            if tr.resource_id not in self._resources:
                continue
            key = (tr.resource_id, tr.domain)
            candidates.setdefault(key, []).append(proxy)
            if (
                tr.grace_started is not None
                and now - tr.grace_started >= GRACE_PERIOD
                and tr.no_incoming_for_window(now)
            ):
                expired.add(key)
        for key in expired:
            if key in self._refreshing:
                continue
            proxies = candidates[key]
            if not all(self._translations[p].no_incoming_for_window(now) for p in proxies):
                continue
            self._refreshing[key] = now + DNS_RESOLUTION_TIMEOUT + EXPIRE_RESOURCES_INTERVAL
            self._events.append(
                NeedsResolution(key[0], key[1], tuple(ipaddress.ip_address(p) for p in proxies))
            )

    def _rebuild_filters(self) -> None:
        authorized = []
        has_internet = False
        for auth in self._resources.values():
            resource = auth.resource
            if isinstance(resource, InternetResource):
                has_internet = True
            resolved = [ip for ips in auth.resolved.values() for ip in ips]
            authorized.append((resource, resource_networks(resource, resolved)))
        proxies: list[tuple[bytes, tuple[Filter, ...]]] = []
        self._active_translations = {}
        for proxy, tr in self._translations.items():
            owner = self._resources.get(tr.resource_id)
            if owner is not None:
                proxies.append((proxy, owner.resource.filters))
                self._active_translations[proxy] = tr
        self._filters = build_filter_table(authorized, proxies)
        self._has_internet = has_internet
