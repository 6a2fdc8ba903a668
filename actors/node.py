"""NodeActor: owns the node's key, the UDP sockets, the relays, the ICE agents and the
connection table (through :class:`gateway.node.Node`), and one PeerActor per client.

It turns portal messages into core calls, core events into portal messages and PeerActor
commands, and carries out the reset sequence (the heart of this project):

1. ``Node.reset`` rotates the static key and forgets connections, allocations and
   candidates;
2. every PeerActor is stopped (their per-client state goes with them) and the fast-path
   routes are cleared;
3. the UDP sockets are closed and rebound on new ports (relays key allocations by 5-tuple);
4. ``KeyRotated(public_key)`` goes to the PortalActor, which reconnects with the new key in
   its login URL; the portal then pushes a fresh ``init`` (relays are allocated again) and
   derives new ICE credentials for every later flow, so ``authorize_flow`` builds fresh
   connections.

Threads: the actor's own thread handles its mailbox (portal messages, peer reports,
reset, status). Two kinds of work come too often for a mailbox hop each (waking the actor
thread costs more CPU than handling a STUN check): datagram batches for the node (STUN,
TURN, handshakes) from the UDP reader, and the node's timers from the Timer thread. They
are steps on a :class:`~actors.combining.CombiningLock` together with every mailbox
message, so the Node core and this actor's tables are touched by one thread at a time, as
in an actor, and neither the reader nor the Timer ever waits for a busy actor.

Failure (README, "Supervision"): a PeerActor that fails, or is found dead when told
something, costs its client only: the connection is forgotten (``PeerFailed``). A tell to
the PortalActor or the TunActor never raises here either (the portal may be restarting;
a dead TUN stops the process on its own). This actor's own failure is fatal: exit 1.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from actors.backpressure import InFlight
from actors.clock import Clock
from actors.combining import CombiningLock
from actors.io.udp import Datagrams, FromNetwork, PeerRoute, UdpReader, UdpSockets
from actors.logsetup import register_secret
from actors.messages import (
    Connect,
    KeyRotated,
    PortalDisconnected,
    PortalFatal,
    PortalIngress,
    PortalJoined,
    SendToPortal,
)
from actors.peer import (
    Authorize,
    ForgetClient,
    NewSession,
    PeerFailed,
    PeerHandle,
    PeerIdle,
    RemoveResource,
    SetPath,
    SetupDnsResource,
    UpdateResource,
    start_peer,
)
from actors.resolver import IPAddress, Resolver
from actors.timer import CallTimer, Timer
from actors.tun import ConfigureInterface, TunWriter
from gateway.ice.candidate import IceCredentials
from gateway.node import (
    INDEX_SHIFT,
    CandidatesAdded,
    CandidatesInvalidated,
    ConnectionCreated,
    ConnectionFailed,
    Node,
    NoTurnServers,
    Path,
    PathChanged,
    RelayedPath,
    TurnServer,
)
from gateway.peer import dns_nat_allowed
from gateway.portal.messages import (
    AllowAccess,
    AuthorizeFlow,
    BroadcastIceCandidates,
    BroadcastInvalidatedIceCandidates,
    ConnectionReady,
    FlowAuthorized,
    IceCandidates,
    Init,
    InvalidateIceCandidates,
    PortalIceCredentials,
    RejectAccess,
    RelaysPresence,
    RequestConnection,
    ResourceUpdated,
    merge_relays,
)
from gateway.types import Address, Rng
from gateway.wg.keys import encode_key

log = logging.getLogger(__name__)

#: Node batches the UDP reader may queue while another thread runs a node step.
NODE_QUEUED_BATCHES = 256
#: Seconds before the node's timers run again after a step that raised.
TIMER_RETRY = 1.0
#: Handshake batches in flight towards one PeerActor (data goes to its session directly).
PEER_INFLIGHT = 8


@dataclass(frozen=True, slots=True)
class AttachPortal:
    """Completes the wiring (portal and node refer to each other) and starts the login."""

    portal: pykka.ActorRef[Any]


@dataclass(frozen=True, slots=True)
class Reset:
    reason: str


@dataclass(frozen=True, slots=True)
class GetNodeStatus:
    pass


@dataclass(frozen=True, slots=True)
class _LegacyResolved:
    """A legacy request's domain was looked up; the request is handled now, as 1.4 does
    (resolve first, then accept and allow, gateway-messages.md §1.3/§1.4)."""

    request: RequestConnection | AllowAccess
    addresses: tuple[IPAddress, ...]
    #: ``resets`` when asked: after a reset the request was for a key that is gone.
    generation: int


@dataclass(slots=True)
class _Peer:
    ref: pykka.ActorRef[Any]
    inflight: InFlight
    deliver: Callable[[list[tuple[bytes, Address]]], None]
    route_key: int | None = None
    relay_key: tuple[Address, int] | None = None


class NodeActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        clock: Clock,
        rng: Rng,
        timer: Timer,
        tun: pykka.ActorRef[Any],
        tun_writer: TunWriter,
        sockets_factory: Callable[[], UdpSockets],
        resolver: Resolver,
        icmp_prohibited: bool = False,
        on_fatal: Callable[[str, int], None] | None = None,
        on_portal_state: Callable[[str], None] | None = None,
        peer_factory: Callable[..., PeerHandle] = start_peer,
    ) -> None:
        super().__init__()
        self._clock = clock
        self._rng = rng
        self._timer = timer
        self._tun = tun
        self._tun_writer = tun_writer
        self._sockets_factory = sockets_factory
        self._resolver = resolver
        self._icmp_prohibited = icmp_prohibited
        self._on_fatal = on_fatal
        self._on_portal_state = on_portal_state
        self._peer_factory = peer_factory
        self.node = Node(rng=rng, now=clock.monotonic())
        self._portal: pykka.ActorRef[Any] | None = None
        self._peers: dict[uuid.UUID, _Peer] = {}
        self._routes: dict[int, PeerRoute] = {}
        # Relayed fast path for the UDP reader: (relay server, channel) -> (client, peer).
        self._relay_routes: dict[tuple[Address, int], tuple[PeerRoute, Address]] = {}
        self._channel_activity: set[tuple[Address, int]] = set()
        # Every step of this actor runs under it (see the module docstring).
        self._steps = CombiningLock(NODE_QUEUED_BATCHES)
        self._timer_queued = False
        self._sockets: UdpSockets | None = None
        self._reader: UdpReader | None = None
        self._wake: CallTimer | None = None
        self._stopped = False
        self.portal_state = "disconnected"
        self.resets = 0

    # ------------------------------------------------------------------ lifecycle

    def on_start(self) -> None:
        try:
            self._steps.call(self._bind_and_arm)
        except Exception:
            # Pykka logs it and stops the actor without on_failure: escalate here.
            log.error("NodeActor failed to start; the gateway stops")
            self._steps.call(self._shutdown)
            if self._on_fatal is not None:
                self._on_fatal("node actor failed to start", 1)
            raise

    def _bind_and_arm(self) -> None:
        self._wake = CallTimer(self._timer, self._on_timer)
        self._register_key()
        self._bind()

    def _register_key(self) -> None:
        """The private key must never reach a log, whatever formats it."""
        register_secret(encode_key(self.node.static.private))

    def on_stop(self) -> None:
        self._steps.call(self._graceful_stop)

    def _graceful_stop(self) -> None:
        # Graceful: tell the relays to free our allocations before the sockets close.
        self.node.shutdown(self._clock.monotonic())
        if self._sockets is not None:
            while (tx := self.node.poll_transmit()) is not None:
                self._sockets.send(tx.dst, tx.payload)
        self._shutdown()

    def on_failure(self, *args: object) -> None:
        log.error("NodeActor crashed; closing sockets")
        self._steps.call(self._shutdown)
        if self._on_fatal is not None:
            self._on_fatal("node actor crashed", 1)

    def _shutdown(self) -> None:
        self._stopped = True
        if self._wake is not None:
            self._wake.arm(None)
        self._stop_all_peers()
        self._unbind()

    def _bind(self) -> None:
        self._sockets = self._sockets_factory()
        self._reader = UdpReader(
            self._sockets,
            to_node=self._on_datagrams,
            peer_routes=self._routes,
            index_shift=INDEX_SHIFT,
            relay_routes=self._relay_routes,
            channel_activity=self._channel_activity,
        )
        self._reader.start()
        log.info("UDP sockets bound: %s", self._sockets.ports())

    def _unbind(self) -> None:
        if self._reader is not None:
            self._reader.stop()
            self._reader.join(timeout=2)
            self._reader = None
        if self._sockets is not None:
            self._sockets.close()
            self._sockets = None

    @property
    def public_key_b64(self) -> str:
        return encode_key(self.node.public_key)

    # ------------------------------------------------------------------ dispatch

    def on_receive(self, message: Any) -> Any:
        return self._steps.call(lambda: self._step(message))

    def _step(self, message: Any) -> Any:
        now = self._clock.monotonic()
        result = self._dispatch(message, now)
        self._drain(now)
        return result

    def _dispatch(self, message: Any, now: float) -> Any:
        if isinstance(message, PortalIngress):
            self._handle_portal(message.message, now)
        elif isinstance(message, PeerIdle):
            self.node.set_idle(message.client_id, message.idle, now)
        elif isinstance(message, PeerFailed):
            self._on_peer_failed(message)
        elif isinstance(message, AttachPortal):
            self._portal = message.portal  # also a PortalActor restarted after a failure
            self._tell_portal(Connect(self.public_key_b64))
        elif isinstance(message, Reset):
            self._reset(message.reason, now)
        elif isinstance(message, PortalJoined):
            self._set_portal_state("joined")
        elif isinstance(message, PortalDisconnected):
            self._set_portal_state("disconnected")
        elif isinstance(message, PortalFatal):
            self._set_portal_state("failed")
            log.error("portal connection failed for good: %s", message.reason)
            if self._on_fatal is not None:
                self._on_fatal(message.reason, message.exit_code)
        elif isinstance(message, GetNodeStatus):
            return self._status()
        elif isinstance(message, _LegacyResolved):
            self._on_legacy_resolved(message, now)
        else:
            log.warning("NodeActor: unexpected message %s", type(message).__name__)
        return None

    def _on_datagrams(self, message: Datagrams) -> None:
        """From the UDP reader's thread: a node batch, handled without a mailbox hop."""
        reader = threading.current_thread()
        self._steps.submit(lambda: self._reader_batch(reader, message))

    def _reader_batch(self, reader: threading.Thread, message: Datagrams) -> None:
        if reader is not self._reader or self._stopped:
            return  # sockets replaced since (reset): stale datagrams for a forgotten key
        now = self._clock.monotonic()
        self._handle_datagrams(message, now)
        self._drain(now)

    def _on_timer(self) -> None:
        """From the Timer thread: the node's deadline (ICE checks, TURN refreshes)."""
        if not self._timer_queued:
            self._timer_queued = True
            self._steps.submit(self._timer_step, bounded=False)

    def _timer_step(self) -> None:
        self._timer_queued = False
        if self._stopped:
            return
        now = self._clock.monotonic()
        try:
            self._fold_channel_activity(now)
            self.node.handle_timeout(now)
            self._drain(now)
        except Exception:
            # A bug, contained like a dropped datagram batch; but the node's timers must
            # not stop with it (nothing else may re-arm them on an idle gateway), nor spin
            # on a deadline that keeps failing.
            log.exception("node timer step failed; retrying in %.0f s", TIMER_RETRY)
            self.node.counters["timer_step_failed"] += 1
            if self._wake is not None:
                self._wake.arm(now + TIMER_RETRY)

    def _set_portal_state(self, state: str) -> None:
        self.portal_state = state
        if self._on_portal_state is not None:
            self._on_portal_state(state)

    # ------------------------------------------------------------------ datagrams

    def _handle_datagrams(self, message: Datagrams, now: float) -> None:
        per_client: dict[uuid.UUID, list[tuple[bytes, tuple[str, int]]]] = {}
        for local, src, data in message.batch:
            wg = self.node.handle_datagram(local, src, data, now)
            if wg is not None:
                per_client.setdefault(wg.client_id, []).append((wg.datagram, wg.src))
        for client_id, datagrams in per_client.items():
            peer = self._peers.get(client_id)
            if peer is None:
                self.node.counters["handshake_no_peer"] += len(datagrams)
            elif not peer.inflight.try_acquire():
                self.node.counters["handshake_peer_busy"] += len(datagrams)
            elif not self._tell_peer(client_id, peer, FromNetwork(datagrams)):
                peer.inflight.release()

    def _fold_channel_activity(self, now: float) -> None:
        """Channels the reader's relayed fast path saw data on (for the rebind rule)."""
        if self._channel_activity:
            seen = list(self._channel_activity)
            self._channel_activity.clear()
            for server, number in seen:
                self.node.note_channel_data(server, number, now)

    # ------------------------------------------------------------------ portal

    def _send_portal(self, message: Any) -> None:
        self._tell_portal(SendToPortal(message))

    def _tell_portal(self, message: Any) -> None:
        if self._portal is None:
            return
        try:
            self._portal.tell(message)
        except pykka.ActorDeadError:
            # Failed: restarted by the supervisor (a new AttachPortal follows) or the
            # process exits. A new channel joins afresh, so nothing is owed.
            log.info("portal actor is gone; %s dropped", _describe(message))

    def _handle_portal(self, message: Any, now: float) -> None:
        if isinstance(message, Init):
            self._on_init(message, now)
        elif isinstance(message, AuthorizeFlow):
            self._on_authorize_flow(message, now)
        elif isinstance(message, RequestConnection):
            self._on_request_connection(message, now)
        elif isinstance(message, AllowAccess):
            self._on_allow_access(message)
        elif isinstance(message, RejectAccess):
            peer = self._peers.get(message.client_id)
            if peer is not None:  # a dead one is forgotten, and with it every access
                self._tell_peer(message.client_id, peer, RemoveResource(message.resource_id))
        elif isinstance(message, IceCandidates):
            self.node.add_remote_candidates(message.client_id, message.candidates, now)
        elif isinstance(message, InvalidateIceCandidates):
            self.node.remove_remote_candidates(message.client_id, message.candidates, now)
        elif isinstance(message, RelaysPresence):
            removed = [str(rid) for rid in message.disconnected_ids]
            self.node.update_relays(removed, _turn_servers(message.connected), now)
        elif isinstance(message, ResourceUpdated):
            for client_id, peer in list(self._peers.items()):
                self._tell_peer(client_id, peer, UpdateResource(message.resource))
        else:
            log.warning("ignoring portal message %s", type(message).__name__)

    def _on_init(self, init: Init, now: float) -> None:
        log.info("init: interface %s / %s, %d relay entries", init.interface.ipv4,
                 init.interface.ipv6, len(init.relays))
        self.node.update_relays([], _turn_servers(init.relays), now)
        with contextlib.suppress(pykka.ActorDeadError):  # a failed TUN ends the process itself
            self._tun.tell(ConfigureInterface(str(init.interface.ipv4), str(init.interface.ipv6)))

    def _on_authorize_flow(self, msg: AuthorizeFlow, now: float) -> None:
        client = msg.client
        self._live_peer(client.id)  # a failed client's flow builds a fresh connection
        result = self.node.upsert_connection(
            client.id,
            client_public_key=client.public_key_bytes,
            preshared_key=client.preshared_key_bytes,
            local=_ice(msg.gateway_ice_credentials),
            remote=_ice(msg.client_ice_credentials),
            now=now,
        )
        if isinstance(result, NoTurnServers):
            self._refetch_relays()
            return
        if isinstance(result, ConnectionCreated) and not self._start_session(result):
            return  # no PeerActor: no access and no reply (the client asks again)
        peer = self._peers.get(client.id)
        if peer is None:
            log.error("authorize_flow for %s: no peer after upsert", client.id)
            return
        authorize = Authorize(msg.resource, msg.expires_at, str(client.ipv4), str(client.ipv6))
        if self._tell_peer(client.id, peer, authorize):
            self._send_portal(FlowAuthorized(msg.ref))

    def _on_request_connection(self, msg: RequestConnection, now: float) -> None:
        if msg.client.domain is None:
            self._accept_request(msg, (), now)
        else:
            self._resolve_then(msg, msg.client.domain.name)

    def _on_allow_access(self, msg: AllowAccess) -> None:
        if msg.payload is None:
            self._allow(msg, ())
        else:
            self._resolve_then(msg, msg.payload.name)

    def _resolve_then(self, request: RequestConnection | AllowAccess, domain: str) -> None:
        """Look ``domain`` up off-thread; the request continues as ``_LegacyResolved``."""
        ref, generation = self.actor_ref, self.resets

        def done(addresses: list[IPAddress]) -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(_LegacyResolved(request, tuple(addresses), generation))

        self._resolver.resolve(domain, done)

    def _on_legacy_resolved(self, msg: _LegacyResolved, now: float) -> None:
        if msg.generation != self.resets:
            log.info("%s dropped: the gateway reset while its domain was looked up",
                     type(msg.request).__name__)
        elif isinstance(msg.request, RequestConnection):
            self._accept_request(msg.request, msg.addresses, now)
        else:
            self._allow(msg.request, msg.addresses)

    def _accept_request(
        self, msg: RequestConnection, addresses: tuple[IPAddress, ...], now: float
    ) -> None:
        """Accept a legacy connection, allow access, and answer ``connection_ready`` only
        if the DNS-resource NAT could be set up (gateway-messages.md §1.3)."""
        client = msg.client
        self._live_peer(client.id)
        result = self.node.accept_connection(
            client.id,
            client_public_key=client.peer.public_key_bytes,
            preshared_key=client.peer.preshared_key_bytes,
            remote=_ice(client.ice_parameters),
            now=now,
        )
        if isinstance(result, NoTurnServers):
            self._refetch_relays()
            return
        assert isinstance(result, ConnectionCreated)
        if not self._start_session(result):
            return
        peer = self._peers[client.id]
        domain = client.domain
        if domain is not None and not dns_nat_allowed(msg.resource, domain.name):
            # 1.4 adds the resource, fails the NAT set-up and removes the client's state;
            # the connection stays (it fails without remote candidates) and nothing is sent.
            log.warning("request_connection from %s: %s is not a name of resource %s; "
                        "no access and no reply", client.id, domain.name, msg.resource.id)
            self._tell_peer(client.id, peer, ForgetClient())
            return
        authorize = Authorize(
            msg.resource, msg.expires_at, str(client.peer.ipv4), str(client.peer.ipv6)
        )
        if not self._tell_peer(client.id, peer, authorize):
            return
        if domain is not None:
            setup = SetupDnsResource(msg.resource.id, domain.name, domain.proxy_ips, addresses)
            if not self._tell_peer(client.id, peer, setup):
                return
        creds = result.local_credentials
        self._send_portal(ConnectionReady(msg.ref, PortalIceCredentials(creds.ufrag, creds.pwd)))

    def _allow(self, msg: AllowAccess, addresses: tuple[IPAddress, ...]) -> None:
        """Legacy ``allow_access``: no reply; a failed NAT set-up is logged (§1.4)."""
        peer = self._live_peer(msg.client_id)
        if peer is None:
            log.warning("allow_access for %s without a connection; ignored", msg.client_id)
            return
        authorize = Authorize(
            msg.resource, msg.expires_at, str(msg.client_ipv4), str(msg.client_ipv6)
        )
        if self._tell_peer(msg.client_id, peer, authorize) and msg.payload is not None:
            request = msg.payload
            self._tell_peer(msg.client_id, peer, SetupDnsResource(
                msg.resource.id, request.name, request.proxy_ips, addresses))

    def _refetch_relays(self) -> None:
        """No relay known: reconnect the portal with the same key to get a fresh ``init``."""
        log.warning("no TURN servers; reconnecting to the portal for fresh relays")
        self._tell_portal(Connect(self.public_key_b64))

    # ------------------------------------------------------------------ peers

    def _start_session(self, created: ConnectionCreated) -> bool:
        """Give the client's PeerActor the new session (starting the actor if needed);
        False, and the connection forgotten, when its thread cannot be started."""
        peer = self._peers.get(created.client_id)
        if peer is not None and not peer.ref.is_alive():
            self._stop_peer(created.client_id)  # failed: its connection is this new one now
            peer = None
        if peer is None:
            assert self._sockets is not None
            inflight = InFlight(PEER_INFLIGHT)
            try:
                handle = self._peer_factory(
                    client_id=created.client_id,
                    node=self.actor_ref,
                    tun=self._tun,
                    tun_writer=self._tun_writer,
                    sockets=self._sockets,
                    clock=self._clock,
                    rng=self._rng,
                    timer=self._timer,
                    resolver=self._resolver,
                    net_inflight=inflight,
                    icmp_prohibited=self._icmp_prohibited,
                )
            except RuntimeError as exc:  # "can't start new thread": RLIMIT_NPROC, memory
                # One client refused, not every client dropped with the process.
                log.error("cannot start a PeerActor for %s (%s); flow refused",
                          created.client_id, exc)
                self.node.remove_connection(created.client_id, "no thread for its PeerActor")
                return False
            peer = _Peer(handle.ref, inflight, handle.deliver)
            self._peers[created.client_id] = peer
        if peer.route_key is not None:
            self._routes.pop(peer.route_key, None)
        session = NewSession(
            created.local_index,
            created.peer_public,
            created.preshared_key,
            self.node.static,
            self.node.rate_limiter,
        )
        if not self._tell_peer(created.client_id, peer, session):
            return False
        peer.route_key = created.local_index >> INDEX_SHIFT
        self._routes[peer.route_key] = PeerRoute(peer.deliver)
        return True

    def _publish_relay_route(self, client_id: uuid.UUID, path: Path) -> None:
        peer = self._peers[client_id]
        if peer.relay_key is not None:
            self._relay_routes.pop(peer.relay_key, None)
            peer.relay_key = None
        if isinstance(path, RelayedPath) and peer.route_key is not None:
            peer.relay_key = (path.server, path.channel)
            route = self._routes.get(peer.route_key)
            if route is not None:
                self._relay_routes[peer.relay_key] = (route, path.remote)

    def _stop_peer(self, client_id: uuid.UUID) -> None:
        peer = self._peers.pop(client_id, None)
        if peer is None:
            return
        if peer.relay_key is not None:
            self._relay_routes.pop(peer.relay_key, None)
        if peer.route_key is not None:
            self._routes.pop(peer.route_key, None)
        peer.ref.stop(block=False)

    def _stop_all_peers(self) -> None:
        for client_id in list(self._peers):
            self._stop_peer(client_id)

    # ------------------------------------------------------------------ peer failures

    def _tell_peer(self, client_id: uuid.UUID, peer: _Peer, message: Any) -> bool:
        """Tell a client's PeerActor; False when it is dead, which ends that client only."""
        try:
            peer.ref.tell(message)
        except pykka.ActorDeadError:
            self._peer_died(client_id, peer)
            return False
        return True

    def _live_peer(self, client_id: uuid.UUID) -> _Peer | None:
        """The client's PeerActor if it is alive; a dead one's connection is forgotten."""
        peer = self._peers.get(client_id)
        if peer is not None and not peer.ref.is_alive():
            self._peer_died(client_id, peer)
            return None
        return peer

    def _peer_died(self, client_id: uuid.UUID, peer: _Peer) -> None:
        """Found dead before its ``PeerFailed`` arrived: the same end for its client."""
        if self._peers.get(client_id) is not peer:
            return
        log.warning("PeerActor for %s is dead; forgetting its connection", client_id)
        self.node.remove_connection(client_id, "its PeerActor failed")
        self._stop_peer(client_id)

    def _on_peer_failed(self, message: PeerFailed) -> None:
        peer = self._peers.get(message.client_id)
        if message.actor_urn is not None and (
            peer is None or peer.ref.actor_urn != message.actor_urn
        ):
            # From an actor already forgotten (found dead, or replaced): not the current one.
            log.debug("stale PeerFailed for %s ignored: %s", message.client_id, message.reason)
            return
        log.info("client %s: %s; connection forgotten", message.client_id, message.reason)
        self.node.remove_connection(message.client_id, message.reason)
        self._stop_peer(message.client_id)

    # ------------------------------------------------------------------ reset

    def _reset(self, reason: str, now: float) -> None:
        log.info("reset (%s): rotating the WireGuard key and dropping every connection", reason)
        self.node.reset(now)
        self._register_key()
        self._stop_all_peers()
        self._relay_routes.clear()
        self._unbind()
        self._bind()
        self.resets += 1
        self._tell_portal(KeyRotated(self.public_key_b64))

    # ------------------------------------------------------------------ drain

    def _drain(self, now: float) -> None:
        node = self.node
        sockets = self._sockets
        while (tx := node.poll_transmit()) is not None:
            if sockets is not None:
                sockets.send(tx.dst, tx.payload, tx.src)  # ICE: from the pair's base
        while (event := node.poll_event()) is not None:
            if isinstance(event, CandidatesAdded):
                self._send_portal(BroadcastIceCandidates((event.client_id,), event.candidates))
            elif isinstance(event, CandidatesInvalidated):
                self._send_portal(
                    BroadcastInvalidatedIceCandidates((event.client_id,), event.candidates)
                )
            elif isinstance(event, PathChanged):
                peer = self._peers.get(event.client_id)
                if peer is not None and self._tell_peer(event.client_id, peer, SetPath(event.path)):
                    self._publish_relay_route(event.client_id, event.path)
            elif isinstance(event, ConnectionFailed):
                self._stop_peer(event.client_id)
        if self._wake is not None:
            self._wake.arm(node.poll_timeout())

    # ------------------------------------------------------------------ status

    def _udp_counters(self) -> dict[str, int]:
        counters: dict[str, int] = {}
        if self._reader is not None:
            counters.update(self._reader.counters)
        counters["node_queue_drop"] = self._steps.dropped
        if self._sockets is not None:
            counters.update(self._sockets.counters)
        return counters

    def _status(self) -> dict[str, Any]:
        connections = {
            str(conn.client_id): {
                "state": conn.state,
                "path": conn.path.describe() if conn.path is not None else "connecting",
                "relay": conn.relay_id,
            }
            for conn in self.node.connections()
        }
        return {
            "public_key": self.public_key_b64,
            "portal": {"state": self.portal_state},
            "resets": self.resets,
            "ports": self._sockets.ports() if self._sockets is not None else {},
            # (receive, send) bytes the kernel granted: what a burst may queue per socket.
            "socket_buffers": self._sockets.buffer_sizes() if self._sockets is not None else {},
            "relays": self.node.relays(),
            "host_candidates": self.node.host_candidates(),
            "connections": connections,
            "peers": {str(cid): peer.ref for cid, peer in self._peers.items()},
            "counters": {
                **self.node.counters,
                # The UDP side: queued node batches dropped, send errors, GRO trains.
                **{f"udp_{k}": v for k, v in self._udp_counters().items()},
            },
        }


def _describe(message: Any) -> str:
    inner = getattr(message, "message", message)  # SendToPortal: what it carried
    return type(inner).__name__


def _ice(creds: PortalIceCredentials) -> IceCredentials:
    return IceCredentials(creds.username, creds.password)


def _turn_servers(entries: Any) -> list[TurnServer]:
    servers = []
    for relay in merge_relays(entries):
        addresses = tuple(a for a in (relay.addr_v4, relay.addr_v6) if a is not None)
        servers.append(TurnServer(str(relay.id), addresses, relay.username, relay.password))
    return servers
