"""NodeActor: the shell around the gateway core (:class:`gateway.gateway.Gateway`, which
owns the node's key, relays, ICE agents and connection table through
:class:`gateway.node.Node`), with the UDP sockets and one PeerActor per client.

It feeds the core (portal messages, datagram batches, timers, peer reports, resolved
domains) and carries out the core's commands in order: tells to PeerActors, the
PortalActor and the TunActor, resolver look-ups, the UDP reader's fast-path tables, and
the socket rebind of a reset. Every protocol decision is the core's; what is left here is
IO: actor liveness and thread starts, backpressure, sockets and timers.

The reset sequence (the heart of this project), as the core orders it:

1. ``Node.reset`` rotates the static key and forgets connections, allocations and
   candidates; the new private key is registered as a secret;
2. every PeerActor is stopped (their per-client state goes with them) and the fast-path
   routes are removed;
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
message, so the core and this actor's tables are touched by one thread at a time, as in
an actor, and neither the reader nor the Timer ever waits for a busy actor.

Failure (README, "Supervision"): a PeerActor that fails, or is found dead when told
something, costs its client only: the core forgets the connection and drops what was
still queued for that client (``Gateway.session_lost``/``session_failed``). A tell to
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
from gateway import gateway as cmd
from gateway.demux import INDEX_SHIFT
from gateway.drops import Drop, Event
from gateway.gateway import Command, Gateway, LegacyRequest
from gateway.node import Node
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
    (resolve first, then accept and allow, rust/gateway/src/eventloop.rs)."""

    request: LegacyRequest
    addresses: tuple[IPAddress, ...]
    #: ``resets`` when asked: after a reset the request was for a key that is gone.
    generation: int


@dataclass(slots=True)
class _Peer:
    ref: pykka.ActorRef[Any]
    inflight: InFlight
    deliver: Callable[[list[tuple[bytes, Address]]], None]


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
        #: Every decision is the core's; this actor carries its commands out.
        self.core = Gateway(rng=rng, now=clock.monotonic())
        self._portal: pykka.ActorRef[Any] | None = None
        self._peers: dict[uuid.UUID, _Peer] = {}
        # The UDP reader's fast-path tables, filled from the core's route commands:
        # receiver-index prefix -> session, (relay server, channel) -> client address.
        self._routes: dict[int, PeerRoute] = {}
        self._relay_routes: dict[tuple[Address, int], Address] = {}
        self._channel_activity: set[tuple[Address, int]] = set()
        # Every step of this actor runs under it (see the module docstring).
        self._steps = CombiningLock(NODE_QUEUED_BATCHES)
        self._timer_queued = False
        self._sockets: UdpSockets | None = None
        self._reader: UdpReader | None = None
        self._wake: CallTimer | None = None
        self._stopped = False
        self.portal_state = "disconnected"

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
        self.core.shutdown(self._clock.monotonic())
        if self._sockets is not None:
            while (tx := self.core.poll_transmit()) is not None:
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
    def node(self) -> Node:
        return self.core.node

    @property
    def resets(self) -> int:
        return self.core.resets

    @property
    def public_key_b64(self) -> str:
        return self.core.public_key

    # ------------------------------------------------------------------ dispatch

    def on_receive(self, message: Any) -> Any:
        return self._steps.call(lambda: self._step(message))

    def _step(self, message: Any) -> Any:
        now = self._clock.monotonic()
        result = self._dispatch(message, now)
        self._carry_out()
        return result

    def _dispatch(self, message: Any, now: float) -> Any:
        if isinstance(message, PortalIngress):
            self._check_alive(self.core.session_to_check(message.message))
            self.core.handle_portal(message.message, now)
        elif isinstance(message, PeerIdle):
            self.core.session_idle(message.client_id, message.idle, now)
        elif isinstance(message, PeerFailed):
            self._on_peer_failed(message)
        elif isinstance(message, AttachPortal):
            self._portal = message.portal  # also a PortalActor restarted after a failure
            self.core.portal_attached()
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
            self._check_alive(self.core.session_to_check(message.request, message.generation))
            self.core.handle_resolved(message.request, message.addresses, message.generation,
                                      now)
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
        self.core.handle_datagrams(message.batch, self._clock.monotonic())
        self._carry_out()

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
            self.core.handle_timeout(now)
            self._carry_out()
        except Exception:
            # A bug, contained like a dropped datagram batch; but the node's timers must
            # not stop with it (nothing else may re-arm them on an idle gateway), nor spin
            # on a deadline that keeps failing.
            log.exception("node timer step failed; retrying in %.0f s", TIMER_RETRY)
            self.node.counters[Event.TIMER_STEP_FAILED] += 1
            if self._wake is not None:
                self._wake.arm(now + TIMER_RETRY)

    def _set_portal_state(self, state: str) -> None:
        self.portal_state = state
        if self._on_portal_state is not None:
            self._on_portal_state(state)

    def _fold_channel_activity(self, now: float) -> None:
        """Channels the reader's relayed fast path saw data on (for the rebind rule).

        ``set.pop`` is atomic against the reader's ``add``: copying then clearing the set
        could lose a note the reader added in between."""
        activity = self._channel_activity
        seen: list[tuple[Address, int]] = []
        while activity:
            try:
                seen.append(activity.pop())
            except KeyError:  # emptied between the test and the pop: nothing lost
                break
        if seen:
            self.core.note_channel_activity(seen, now)

    # ------------------------------------------------------------------ commands

    def _carry_out(self) -> None:
        """Carry out the core's commands in order, then send its datagrams and arm the
        timer at its deadline."""
        core = self.core
        while (command := core.poll_command()) is not None:
            self._execute(command)
        sockets = self._sockets
        while (tx := core.poll_transmit()) is not None:
            if sockets is not None:  # None only while stopping
                sockets.send(tx.dst, tx.payload, tx.src)  # ICE: from the pair's base
        if self._wake is not None:
            self._wake.arm(core.poll_timeout())

    def _execute(self, command: Command) -> None:
        if isinstance(command, cmd.DeliverHandshakes):
            self._deliver_handshakes(command)
        elif isinstance(command, cmd.SendToPortal):
            self._tell_portal(SendToPortal(command.message))
        elif isinstance(command, cmd.StartSession):
            self._start_session(command)
        elif isinstance(command, cmd.StopSession):
            self._stop_peer(command.client_id)
        elif isinstance(command, cmd.RouteAdded):
            peer = self._peers.get(command.client_id)
            if peer is not None:  # None: its actor could not start (already reported)
                self._routes[command.key] = PeerRoute(peer.deliver)
        elif isinstance(command, cmd.RouteRemoved):
            self._routes.pop(command.key, None)
        elif isinstance(command, cmd.RelayRouteAdded):
            self._relay_routes[(command.server, command.channel)] = command.remote
        elif isinstance(command, cmd.RelayRouteRemoved):
            self._relay_routes.pop((command.server, command.channel), None)
        elif isinstance(command, cmd.Resolve):
            self._resolve(command)
        elif isinstance(command, cmd.ConfigureInterface):
            with contextlib.suppress(pykka.ActorDeadError):  # a failed TUN ends the process
                self._tun.tell(ConfigureInterface(command.ipv4, command.ipv6))
        elif isinstance(command, cmd.ConnectPortal):
            self._tell_portal(Connect(command.public_key))
        elif isinstance(command, cmd.PortalKeyRotated):
            self._tell_portal(KeyRotated(command.public_key))
        elif isinstance(command, cmd.ProtectKey):
            register_secret(encode_key(command.private_key))
        elif isinstance(command, cmd.Rebind):
            self._unbind()
            self._bind()
        else:
            self._tell_session(command)

    def _tell_session(self, command: Command) -> None:
        """A command for one client's PeerActor, as the message it understands."""
        message: Any
        if isinstance(command, cmd.AuthorizeResource):
            message = Authorize(command.resource, command.expires_at, command.ipv4,
                                command.ipv6)
        elif isinstance(command, cmd.SetupDns):
            message = SetupDnsResource(command.resource_id, command.domain,
                                       command.proxy_ips, command.addresses)
        elif isinstance(command, cmd.ForgetClient):
            message = ForgetClient()
        elif isinstance(command, cmd.RemoveResource):
            message = RemoveResource(command.resource_id)
        elif isinstance(command, cmd.UpdateResource):
            message = UpdateResource(command.resource)
        elif isinstance(command, cmd.SetPath):
            message = SetPath(command.path)
        else:
            log.error("NodeActor: unknown command %s", type(command).__name__)
            return
        peer = self._peers.get(command.client_id)
        if peer is not None:  # None: it ended earlier in this step (already reported)
            self._tell_peer(command.client_id, peer, message)

    def _deliver_handshakes(self, command: cmd.DeliverHandshakes) -> None:
        peer = self._peers.get(command.client_id)
        counters = self.core.node.counters
        if peer is None:
            counters[Drop.HANDSHAKE_NO_PEER] += len(command.datagrams)
        elif not peer.inflight.try_acquire():  # backpressure: its mailbox is full
            counters[Drop.HANDSHAKE_PEER_BUSY] += len(command.datagrams)
        elif not self._tell_peer(command.client_id, peer, FromNetwork(command.datagrams)):
            peer.inflight.release()

    def _resolve(self, command: cmd.Resolve) -> None:
        """Look the domain up off-thread; the answer comes back as ``_LegacyResolved``."""
        ref = self.actor_ref
        request, generation = command.request, command.generation

        def done(addresses: list[IPAddress]) -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(_LegacyResolved(request, tuple(addresses), generation))

        self._resolver.resolve(command.domain, done)

    # ------------------------------------------------------------------ portal

    def _tell_portal(self, message: Any) -> None:
        if self._portal is None:
            return
        try:
            self._portal.tell(message)
        except pykka.ActorDeadError:
            # Failed: restarted by the supervisor (a new AttachPortal follows) or the
            # process exits. A new channel joins afresh, so nothing is owed.
            log.info("portal actor is gone; %s dropped", _describe(message))

    # ------------------------------------------------------------------ peers

    def _start_session(self, command: cmd.StartSession) -> None:
        """Give the client's PeerActor the new session, starting the actor if needed (a
        dead one is replaced: the core's session is this new one now)."""
        client_id = command.client_id
        peer = self._peers.get(client_id)
        if peer is not None and not peer.ref.is_alive():
            self._stop_peer(client_id)
            peer = None
        if peer is None:
            assert self._sockets is not None
            inflight = InFlight(PEER_INFLIGHT)
            try:
                handle = self._peer_factory(
                    client_id=client_id,
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
                log.error("cannot start a PeerActor for %s (%s); flow refused", client_id, exc)
                self.core.session_lost(client_id, "no thread for its PeerActor")
                return
            peer = _Peer(handle.ref, inflight, handle.deliver)
            self._peers[client_id] = peer
        session = NewSession(command.local_index, command.peer_public, command.preshared_key,
                             command.static, command.rate_limiter)
        self._tell_peer(client_id, peer, session)

    def _stop_peer(self, client_id: uuid.UUID) -> None:
        peer = self._peers.pop(client_id, None)
        if peer is not None:
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

    def _check_alive(self, client_id: uuid.UUID | None) -> None:
        """A dead PeerActor found before its ``PeerFailed`` arrived ends its client."""
        if client_id is None:
            return
        peer = self._peers.get(client_id)
        if peer is not None and not peer.ref.is_alive():
            self._peer_died(client_id, peer)

    def _peer_died(self, client_id: uuid.UUID, peer: _Peer) -> None:
        if self._peers.get(client_id) is not peer:
            return  # already replaced or forgotten
        log.warning("PeerActor for %s is dead; forgetting its connection", client_id)
        self.core.session_lost(client_id)

    def _on_peer_failed(self, message: PeerFailed) -> None:
        peer = self._peers.get(message.client_id)
        if message.actor_urn is not None and (
            peer is None or peer.ref.actor_urn != message.actor_urn
        ):
            # From an actor already forgotten (found dead, or replaced): not the current one.
            log.debug("stale PeerFailed for %s ignored: %s", message.client_id, message.reason)
            return
        self.core.session_failed(message.client_id, message.reason)

    # ------------------------------------------------------------------ reset

    def _reset(self, reason: str, now: float) -> None:
        self.core.reset(reason, now)

    # ------------------------------------------------------------------ status

    def _udp_counters(self) -> dict[str, int]:
        counters: dict[str, int] = {}
        if self._reader is not None:
            counters.update(self._reader.counters)
        counters[Drop.NODE_QUEUE_DROP] = self._steps.dropped
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

