"""One client's data path behind one lock, driven directly by the threads that own the I/O.

A pykka ``tell`` costs about as much as everything else a packet needs together, and a
hop to the PeerActor's thread adds a GIL hand-off per batch on top. So the data path does
not go through the PeerActor's mailbox: the UDP reader calls :meth:`PeerSession.from_network`,
the TUN reader calls :meth:`PeerSession.from_tun` and the Timer thread calls the session's
timeout, each on its own thread, serialised by the session's lock. The PeerActor owns the
session and feeds it the control messages (new WireGuard session, authorizations, path,
DNS answers) under the same lock.

The session is a shell over one sans-IO core, :class:`gateway.session.ClientSession`, which
makes every decision (filters, idle, expiry, path, pending datagrams, deadlines). The shell
keeps the lock, the IO it hands out (socket sends, GSO batching included, the TUN writer, the
timer, telling the node and the TUN actor), the containment of a raising data path, and the
lock-free figures registry for ``/metrics``. Everything it calls while holding the lock is
non-blocking: ``sendto`` on non-blocking sockets, the TUN writer's own short lock, ``tell``,
and the Timer's lock (a leaf).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from actors.clock import Clock
from actors.io.udp import UdpSockets
from actors.resolver import IPAddress
from actors.timer import CallTimer, Timer
from actors.tun import RegisterClient, TunWriter, UnregisterClient
from gateway.drops import Drop
from gateway.node import Path
from gateway.packet.nat import NAT_PORTS
from gateway.resources import Resource
from gateway.session import (
    PENDING_DATAGRAMS,
    PERSISTENT_KEEPALIVE,
    ClientSession,
    Figures,
    IdleChanged,
    ResolveRequest,
    SessionFailed,
    TunRegister,
    TunUnregister,
)
from gateway.types import Address, Rng
from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter

__all__ = [
    "PENDING_DATAGRAMS",
    "PERSISTENT_KEEPALIVE",
    "SESSIONS",
    "Figures",
    "PeerFailed",
    "PeerIdle",
    "PeerSession",
    "SessionRegistry",
]

log = logging.getLogger("actors.peer")

#: Called (on whatever thread noticed it) with a message for the node: PeerIdle, PeerFailed.
NodeNotify = Callable[[object], None]
#: Starts a DNS lookup whose answer the owner feeds back through ``resolved_locked``.
Resolve = Callable[[uuid.UUID, str, tuple[IPAddress, ...], bool], None]


class SessionRegistry:
    """Every live session, and the totals of the closed ones, for ``/metrics``.

    A scrape reads each session's figures without its lock (``PeerSession.figures``), so
    it costs no lock round with the data path; this registry's own lock is taken only when
    a session starts or closes and by the scrape, so a session's totals are never counted
    twice or missed while it moves from live to closed (counters stay monotonic).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[PeerSession] = weakref.WeakSet()
        self._closed = Figures(Counter())

    def register(self, session: PeerSession) -> None:
        with self._lock:
            self._live.add(session)

    def retire(self, session: PeerSession, final: Figures) -> None:
        with self._lock:
            if session in self._live:
                self._live.discard(session)
                self._closed.add(final)

    def figures(self) -> Figures:
        """Live sessions by path (``direct``, ``relay``, ``connecting``) and every total."""
        with self._lock:
            total = Figures(Counter())
            total.add(self._closed)
            for session in list(self._live):
                own = session.figures()
                total.paths[own.paths.most_common(1)[0][0]] += 1
                total.add(own)
        return total


#: The process's sessions (one gateway per process).
SESSIONS = SessionRegistry()


@dataclass(frozen=True, slots=True)
class PeerIdle:
    """Told to the NodeActor on Connected <-> Idle transitions (only then, never per packet)."""

    client_id: uuid.UUID
    idle: bool


@dataclass(frozen=True, slots=True)
class PeerFailed:
    """Told to the NodeActor when the WireGuard session expired (rust/connlib/snownet/src/node.rs:
    "connection expired"), or when this client's PeerActor or data path failed (README,
    "Supervision")."""

    client_id: uuid.UUID
    reason: str
    #: The PeerActor it concerns: a report about an actor already replaced is stale.
    #: None: whichever is current.
    actor_urn: str | None = None


class PeerSession:
    """One client's :class:`~gateway.session.ClientSession` behind a lock, and its IO."""

    #: The port range of the client's DNS-resource NAT (1.4's); ``devstack`` narrows it
    #: for the end-to-end test that exhausts it.
    nat_ports: tuple[int, int] = NAT_PORTS

    def __init__(
        self,
        *,
        client_id: uuid.UUID,
        tun: pykka.ActorRef[Any],
        tun_writer: TunWriter,
        sockets: UdpSockets,
        clock: Clock,
        rng: Rng,
        timer: Timer,
        notify_node: NodeNotify,
        icmp_prohibited: bool = False,
        registry: SessionRegistry = SESSIONS,
    ) -> None:
        self.client_id = client_id
        self.lock = threading.Lock()
        self._tun = tun
        self._tun_writer = tun_writer
        self._sockets = sockets
        self._clock = clock
        self._notify_node = notify_node
        #: Set by the owning PeerActor: lookups answer through its mailbox.
        self.resolve: Resolve = self._cannot_resolve
        self._wake = CallTimer(timer, self.on_timer)
        #: The owning PeerActor's urn (set by it), named in the failures this reports.
        self.owner: str | None = None
        self._registry = registry
        self.log = logging.LoggerAdapter(log, {"client_id": str(client_id), "actor": "PeerActor"})
        self.core = ClientSession(
            client_id, rng=rng, icmp_prohibited=icmp_prohibited, nat_ports=self.nat_ports,
            logger=self.log,
        )
        registry.register(self)

    @property
    def counters(self) -> Counter[str]:
        """Drops by reason (the core's; a live client state's own are in ``status``)."""
        return self.core.counters

    @property
    def handshakes(self) -> int:
        return self.core.handshakes

    def _cannot_resolve(
        self, resource_id: uuid.UUID, domain: str, proxy_ips: tuple[IPAddress, ...], reply: bool
    ) -> None:
        self.log.warning("no resolver attached; %s for resource %s not looked up",
                         domain, resource_id)

    # --------------------------------------------------------------- data path (any thread)

    def from_network(self, datagrams: list[tuple[bytes, Address]]) -> None:
        """WireGuard datagrams from this client (UDP reader, or the actor for handshakes)."""
        with self.lock:
            core = self.core
            if core.closed:  # a reader still holding this entry: nothing reaches the core
                core.counters[Drop.CLOSED] += len(datagrams)
                return
            try:
                clock = self._clock
                to_tun = core.from_network_batch(datagrams, clock.monotonic(), clock.unix())
                if to_tun:
                    self._tun_writer.write_batch(to_tun)
                if core.transmits:
                    self._transmit()
                if core.events:
                    self._report()
                self._wake.arm_earlier(core.poll_timeout())
            except Exception:
                self._crashed_locked("network data")

    def from_tun(self, packets: list[bytes]) -> None:
        """IP packets the TUN reader read for this client's tunnel addresses."""
        with self.lock:
            core = self.core
            if core.closed:  # a reader still holding this entry: nothing reaches the core
                core.counters[Drop.CLOSED] += len(packets)
                return
            try:
                clock = self._clock
                core.from_tun_batch(packets, clock.monotonic(), clock.unix())
                if core.transmits:
                    self._transmit()
                if core.events:
                    self._report()
                self._wake.arm_earlier(core.poll_timeout())
            except Exception:
                self._crashed_locked("TUN packets")

    def on_timer(self) -> None:
        """Called by the Timer thread at the armed deadline."""
        with self.lock:
            if not self.core.closed:  # a timer that fired while the session closed
                try:
                    self.handle_timeout_locked(self._clock.monotonic())
                    self.arm_locked()
                except Exception:
                    self._crashed_locked("timer")

    def _crashed_locked(self, what: str) -> None:
        """An exception escaped this client's data path on a shared IO or Timer thread: a
        bug, or input nothing checked. This client ends; the thread and every other client
        carry on (README, "Supervision")."""
        self.log.exception("handling %s failed; closing this client's session", what)
        self.fail_locked(f"its data path failed ({what})")

    def fail_locked(self, reason: str) -> None:
        """Close the session and have the node forget the client's connection; the client
        comes back with a new ``authorize_flow``. Once: a closed session reports nothing."""
        if self.core.closed:
            return
        self.close_locked()
        self._notify_node(PeerFailed(self.client_id, reason, self.owner))

    # --------------------------------------------------------------- carrying out

    def _transmit(self) -> None:
        """Send what the core queued; a batch to one destination goes as GSO runs."""
        sockets = self._sockets
        for transmit in self.core.take_transmits():
            payloads = transmit.payloads
            if len(payloads) == 1:
                sockets.send(transmit.dst, payloads[0], transmit.src)
            else:
                sockets.send_many(transmit.dst, payloads, transmit.src)

    def _report(self) -> None:
        """Tell the node, the resolver and the TUN actor what the core reported."""
        for event in self.core.take_events():
            if isinstance(event, IdleChanged):
                self._notify_node(PeerIdle(self.client_id, event.idle))
            elif isinstance(event, SessionFailed):
                self._notify_node(PeerFailed(self.client_id, event.reason, self.owner))
            elif isinstance(event, ResolveRequest):
                self.resolve(event.resource_id, event.domain, event.proxy_ips, event.reply)
            elif isinstance(event, TunRegister):
                self._tun.tell(
                    RegisterClient(self.client_id, event.ipv4, event.ipv6, self.from_tun)
                )
            elif isinstance(event, TunUnregister):
                self._tun.tell(UnregisterClient(self.client_id))

    def _carry_out(self) -> None:
        core = self.core
        if core.transmits:
            self._transmit()
        if core.events:
            self._report()

    # --------------------------------------------------------------- control (lock held)

    def new_session_locked(
        self,
        *,
        local_index: int,
        peer_public: bytes,
        preshared_key: bytes,
        static: StaticKeyPair,
        rate_limiter: HandshakeRateLimiter,
        now: float,
    ) -> None:
        self.core.new_wireguard_session(
            local_index=local_index, peer_public=peer_public, preshared_key=preshared_key,
            static=static, rate_limiter=rate_limiter, now=now,
        )
        self._carry_out()

    def authorize_locked(
        self,
        resource: Resource,
        expires_at: float | None,
        ipv4: str,
        ipv6: str,
        now: float,
    ) -> None:
        self.core.authorize(resource, expires_at, ipv4, ipv6, now)
        self._carry_out()

    def remove_resource_locked(self, resource_id: uuid.UUID) -> None:
        self.core.remove_resource(resource_id)
        self._carry_out()

    def update_resource_locked(self, resource: Resource) -> None:
        self.core.update_resource(resource)
        self._carry_out()

    def set_path_locked(self, path: Path) -> None:
        self.core.set_path(path, self._clock.monotonic())
        self._carry_out()

    def resolved_locked(
        self,
        resource_id: uuid.UUID,
        domain: str,
        proxy_ips: tuple[IPAddress, ...],
        addresses: tuple[IPAddress, ...],
        reply: bool,
        now: float,
    ) -> None:
        self.core.resolved(
            resource_id, domain, proxy_ips, addresses, reply, now, self._clock.unix()
        )
        self._carry_out()

    def forget_client_locked(self) -> None:
        """Drop every authorization and translation; the WireGuard session stays."""
        self.core.forget_client()
        self._carry_out()

    def handle_timeout_locked(self, now: float) -> None:
        self.core.handle_timeout(now, self._clock.unix())
        self._carry_out()

    def close_locked(self) -> None:
        """The owner stops: no more data, no more timers, the TUN forgets the client."""
        self.core.close()
        self._wake.arm(None)
        with contextlib.suppress(pykka.ActorDeadError):  # the TUN is gone: so is its table
            self._carry_out()
        self._registry.retire(self, self.figures())

    def arm_locked(self) -> None:
        """Wake exactly at the core's next deadline (after control messages and timeouts)."""
        if not self.core.closed:
            self._wake.arm(self.core.poll_timeout())

    # --------------------------------------------------------------- figures & status

    def figures(self) -> Figures:
        """This session's totals, read WITHOUT the lock (a ``/metrics`` scrape must not
        queue behind the data path); see :meth:`ClientSession.read_figures`."""
        while (figures := self.core.read_figures()) is None:
            time.sleep(0)  # the owner is between two steps of a move: let it finish
        return figures

    def status_locked(self) -> dict[str, Any]:
        return self.core.status()
