"""PeerActor: owns one client's :class:`~actors.peer_session.PeerSession` and feeds it control.

The data path does not cross this actor's mailbox: the UDP and TUN readers and the Timer
call the session directly, under the session's lock (see ``actors/peer_session.py`` for
why). The actor handles what the NodeActor and the resolver tell it: a new WireGuard
session, authorizations, resource updates and removals, the nominated path, DNS answers,
status, and the WireGuard handshakes the node demultiplexed (``FromNetwork``). Each message
is applied under the session's lock; what it means is decided by the session's pure core,
:class:`gateway.session.ClientSession`.

Lifecycle: started by the NodeActor when a client's first connection is created; a new
connection for the same client (``authorize_flow`` with new ICE credentials) only swaps the
WireGuard session (per-client state survives, as in rust/connlib/tunnel/src/gateway.rs); stopped
when the connection fails or on reset. Stopping closes the session, so a reader still holding it
drops data.

Failure (README, "Supervision"): an exception in a handler stops this actor alone; its
``on_failure`` closes the session and tells the node ``PeerFailed`` naming this actor, so
the node forgets the connection and the client's next ``authorize_flow`` starts afresh.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from actors.backpressure import InFlight
from actors.clock import Clock
from actors.io.udp import FromNetwork, UdpSockets
from actors.peer_session import PeerFailed, PeerIdle, PeerSession
from actors.resolver import IPAddress, Resolver
from actors.timer import Timer, Wake
from actors.tun import TunWriter
from gateway.node import Path
from gateway.resources import Resource
from gateway.types import Address, Rng
from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter

__all__ = [
    "Authorize",
    "ForgetClient",
    "GetPeerStatus",
    "NewSession",
    "PeerActor",
    "PeerFailed",
    "PeerHandle",
    "PeerIdle",
    "RemoveResource",
    "Resolved",
    "SetPath",
    "SetupDnsResource",
    "UpdateResource",
    "start_peer",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class NewSession:
    """Start (or replace) the WireGuard session with these parameters."""

    local_index: int
    peer_public: bytes
    preshared_key: bytes
    static: StaticKeyPair
    rate_limiter: HandshakeRateLimiter

    def __repr__(self) -> str:
        return f"NewSession(index={self.local_index:#x})"


@dataclass(frozen=True, slots=True)
class Authorize:
    resource: Resource
    expires_at: float | None
    ipv4: str
    ipv6: str


@dataclass(frozen=True, slots=True)
class SetupDnsResource:
    """Legacy DNS set-up (``request_connection``/``allow_access`` with a ResolveRequest),
    with the addresses the NodeActor resolved before it accepted the request."""

    resource_id: uuid.UUID
    domain: str
    proxy_ips: tuple[IPAddress, ...]
    addresses: tuple[IPAddress, ...]


@dataclass(frozen=True, slots=True)
class ForgetClient:
    """Drop the client's authorizations and NAT state (a legacy request that failed)."""


@dataclass(frozen=True, slots=True)
class RemoveResource:
    resource_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class UpdateResource:
    resource: Resource


@dataclass(frozen=True, slots=True)
class SetPath:
    path: Path


@dataclass(frozen=True, slots=True)
class Resolved:
    resource_id: uuid.UUID
    domain: str
    proxy_ips: tuple[IPAddress, ...]
    addresses: tuple[IPAddress, ...]
    reply: bool


@dataclass(frozen=True, slots=True)
class GetPeerStatus:
    pass


# ----------------------------------------------------------------------------- actor


@dataclass(frozen=True, slots=True)
class PeerHandle:
    """What the NodeActor keeps of a started peer: its actor, and its data-path entry."""

    ref: pykka.ActorRef[Any]
    deliver: Callable[[list[tuple[bytes, Address]]], None]


def start_peer(
    *,
    client_id: uuid.UUID,
    node: pykka.ActorRef[Any],
    tun: pykka.ActorRef[Any],
    tun_writer: TunWriter,
    sockets: UdpSockets,
    clock: Clock,
    rng: Rng,
    timer: Timer,
    resolver: Resolver,
    net_inflight: InFlight,
    icmp_prohibited: bool = False,
) -> PeerHandle:
    """Build a client's session and start the PeerActor that owns it."""

    def notify_node(message: object) -> None:
        # A node that is gone is taking the process down: nothing to report to.
        with contextlib.suppress(pykka.ActorDeadError):
            node.tell(message)

    session = PeerSession(
        client_id=client_id,
        tun=tun,
        tun_writer=tun_writer,
        sockets=sockets,
        clock=clock,
        rng=rng,
        timer=timer,
        notify_node=notify_node,
        icmp_prohibited=icmp_prohibited,
    )
    ref = PeerActor.start(
        session=session, clock=clock, resolver=resolver, net_inflight=net_inflight
    )
    return PeerHandle(ref, session.from_network)


class PeerActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        session: PeerSession,
        clock: Clock,
        resolver: Resolver,
        net_inflight: InFlight,
    ) -> None:
        super().__init__()
        self.client_id = session.client_id
        self._clock = clock
        self._resolver = resolver
        #: Bounds the handshake batches the NodeActor hands over (data never comes this way).
        self.net_inflight = net_inflight
        self.session = session
        session.resolve = self._resolve
        session.owner = self.actor_urn
        self._log = session.log

    # --------------------------------------------------------------- lifecycle

    def on_stop(self) -> None:
        self._close()

    def on_failure(self, *args: object) -> None:
        # Pykka has logged the traceback and stopped this actor; only this client goes.
        self._log.error("PeerActor for %s crashed; ending this client's connection",
                        self.client_id)
        with self.session.lock:
            self.session.fail_locked("its PeerActor crashed")

    def _close(self) -> None:
        with self.session.lock:
            self.session.close_locked()

    # --------------------------------------------------------------- dispatch

    def on_receive(self, message: Any) -> Any:
        session = self.session
        if isinstance(message, FromNetwork):
            try:
                session.from_network(message.datagrams)
            finally:
                self.net_inflight.release()
            return None
        with session.lock:
            now = self._clock.monotonic()
            result = self._control(message, now)
            session.arm_locked()
        return result

    def _control(self, message: Any, now: float) -> Any:
        session = self.session
        if isinstance(message, Wake):
            session.handle_timeout_locked(now)
        elif isinstance(message, NewSession):
            session.new_session_locked(
                local_index=message.local_index,
                peer_public=message.peer_public,
                preshared_key=message.preshared_key,
                static=message.static,
                rate_limiter=message.rate_limiter,
                now=now,
            )
        elif isinstance(message, Authorize):
            session.authorize_locked(
                message.resource, message.expires_at, message.ipv4, message.ipv6, now
            )
        elif isinstance(message, RemoveResource):
            session.remove_resource_locked(message.resource_id)
        elif isinstance(message, UpdateResource):
            session.update_resource_locked(message.resource)
        elif isinstance(message, SetupDnsResource):
            session.resolved_locked(
                message.resource_id, message.domain, message.proxy_ips, message.addresses,
                False, now,
            )
        elif isinstance(message, ForgetClient):
            session.forget_client_locked()
        elif isinstance(message, Resolved):
            session.resolved_locked(
                message.resource_id, message.domain, message.proxy_ips, message.addresses,
                message.reply, now,
            )
        elif isinstance(message, SetPath):
            session.set_path_locked(message.path)
        elif isinstance(message, GetPeerStatus):
            return {**session.status_locked(), "actor": self.actor_urn}
        else:
            self._log.warning("unexpected message %r", type(message).__name__)
        return None

    # --------------------------------------------------------------- DNS

    def _resolve(
        self,
        resource_id: uuid.UUID,
        domain: str,
        proxy_ips: tuple[IPAddress, ...],
        reply: bool,
    ) -> None:
        """Look ``domain`` up off-thread; the answer comes back as a ``Resolved`` message."""
        ref = self.actor_ref
        proxies = tuple(proxy_ips)

        def done(addresses: list[IPAddress]) -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(Resolved(resource_id, domain, proxies, tuple(addresses), reply))

        self._resolver.resolve(domain, done)
