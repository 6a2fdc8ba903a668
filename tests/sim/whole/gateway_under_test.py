"""The ONE place the whole-gateway simulation touches the gateway's internals.

A thin, single-threaded stand-in for the actor shells around the two pure cores that make
every decision: :class:`gateway.gateway.Gateway` (portal messages, the node's datagrams and
timers, sessions' reports in; commands out) and one :class:`gateway.session.ClientSession`
per client. It carries their outputs out the way the shells do, minus threads, sockets,
mailboxes and actor liveness:

* ``actors/node.py`` (NodeActor): the core's commands in order, then its transmits; the
  UDP reader's fast-path tables (route key -> session, relay channel -> client address)
  filled from ``RouteAdded``/``RelayRouteAdded``; the channel-activity fold before the
  node's timer step; the socket rebind of a reset (a new port);
* ``actors/io/udp.py`` (UdpReader): each datagram is sorted by ``gateway/demux.py``'s rules
  (transport data by route key, relayed transport data by channel, the rest to the node);
* ``actors/peer.py`` / ``actors/peer_session.py`` (PeerActor, PeerSession): the session's
  transmits go to the network, its packets to the TUN, its reports to the node (after the
  current node step, as a ``tell`` would: see :meth:`GatewayUnderTest._node_mailbox`);
* ``actors/tun.py`` (TunActor/TunReader): packets from the TUN go to the client that
  registered their destination address.

Every ``if`` below is one of those IO concerns; no protocol decision is made here. The
legacy path (``request_connection``/DNS) is wired too, with a resolver that knows no
names, though the simulated portal never uses it.

The interface the world uses (everything else is private):

* inputs: :meth:`start`, :meth:`portal_message` (event, payload as the portal pushes them),
  :meth:`datagram_in`, :meth:`tun_packet_in`, :meth:`advance`, :meth:`reset`;
* outputs: :meth:`portal_out` (event, payload), :meth:`datagrams_out` (src, dst, payload),
  :meth:`tun_out` (IP packets), :meth:`connect_requests` (the public key the portal
  connection must (re)connect with), :attr:`public_key`, :attr:`local_addresses`,
  :meth:`poll_timeout`.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from gateway import gateway as cmd
from gateway.demux import MAX_DATAGRAM_PAYLOAD, relayed_transport, transport_key
from gateway.errors import GatewayError
from gateway.gateway import Command, Gateway
from gateway.portal.messages import encode_egress, parse_ingress
from gateway.session import (
    ClientSession,
    IdleChanged,
    ResolveRequest,
    SessionFailed,
    TunRegister,
    TunUnregister,
)
from gateway.types import Address, Rng

#: A message for the node, handled after the current node step (what a ``tell`` does).
_NodeMessage = Callable[[], None]
#: Commands the NodeActor tells one client's PeerActor.
_SESSION_COMMANDS = (
    cmd.DeliverHandshakes, cmd.AuthorizeResource, cmd.SetupDns, cmd.ForgetClient,
    cmd.RemoveResource, cmd.UpdateResource, cmd.SetPath,
)


class GatewayUnderTest:
    """The gateway as the world sees it; see the module docstring."""

    def __init__(self, *, rng: Rng, host_ip: str, now: float, unix: float) -> None:
        self.rng = rng
        self._host_ip = host_ip
        self._port = 40000
        self._now = now
        self._unix = unix
        self.core = Gateway(rng=rng, now=now)
        #: PeerActors: one session per client the core started.
        self._sessions: dict[uuid.UUID, ClientSession] = {}
        # The UDP reader's fast-path tables (actors/node.py fills them from route commands).
        self._routes: dict[int, ClientSession] = {}
        self._relay_routes: dict[tuple[Address, int], Address] = {}
        self._channel_activity: set[tuple[Address, int]] = set()
        # The TunActor's table: destination address -> client; and each client's addresses.
        self._tun_routes: dict[bytes, uuid.UUID] = {}
        self._tun_addresses: dict[uuid.UUID, set[bytes]] = {}
        #: Reports told to the NodeActor (PeerIdle, PeerFailed, resolver answers).
        self._mailbox: deque[_NodeMessage] = deque()
        self.udp: list[tuple[Address | None, Address, bytes]] = []
        self.tun: list[bytes] = []
        self._portal: list[tuple[str, dict[str, Any]]] = []
        self._connects: list[str] = []
        self.portal_errors = 0

    # ------------------------------------------------------------------ identity

    @property
    def public_key(self) -> str:
        return self.core.public_key

    @property
    def local_addresses(self) -> tuple[Address, ...]:
        """The bound UDP socket (rebound on a new port by every reset, as NodeActor does)."""
        return ((self._host_ip, self._port),)

    # ------------------------------------------------------------------ inputs

    def start(self) -> None:
        """``AttachPortal``: the core asks the portal to log in with its key."""
        self._node_step(self.core.portal_attached)

    def portal_message(self, event: str, payload: Any) -> None:
        try:
            message = parse_ingress(event, payload)
        except GatewayError:  # the portal channel counts and drops it
            self.portal_errors += 1
            return
        # NodeActor._check_alive: a session here never dies but by StopSession.
        self._node_step(lambda: self.core.handle_portal(message, self._now))

    def datagram_in(self, local: Address, src: Address, data: bytes) -> None:
        """UdpReader._sort for one datagram, then its delivery."""
        if local not in self.local_addresses:
            return  # a socket closed by a reset
        if len(data) > MAX_DATAGRAM_PAYLOAD:
            return  # dropped before any processing (the reader counts it)
        key = transport_key(data)
        if key is not None:
            session = self._routes.get(key)
            if session is not None:
                self._session_data(session, [(data, src)])
                self._run_mailbox()
                return
        elif self._relay_routes and (relayed := relayed_transport(data)) is not None:
            number, key, inner = relayed
            remote = self._relay_routes.get((src, number))
            session = self._routes.get(key)
            if remote is not None and session is not None:
                self._channel_activity.add((src, number))
                self._session_data(session, [(inner, remote)])
                self._run_mailbox()
                return
        batch = [(local, src, data)]
        self._node_step(lambda: self.core.handle_datagrams(batch, self._now))

    def tun_packet_in(self, packet: bytes) -> None:
        """TunReader._dispatch: to the client that registered the destination."""
        dst = packet[16:20] if packet[0] >> 4 == 4 else packet[24:40]
        client_id = self._tun_routes.get(dst)
        session = self._sessions.get(client_id) if client_id is not None else None
        if session is not None:
            session.from_tun_batch([packet], self._now, self._unix)
            self._session_outputs(session)
            self._run_mailbox()

    def advance(self, now: float, unix: float) -> None:
        """The clock moved to ``now``: every timer due fires (the node's, then each
        session's, as the Timer thread would in some order)."""
        self._now, self._unix = now, unix
        deadline = self.core.poll_timeout()
        if deadline is not None and deadline <= now:
            self._node_step(self._node_timer)
        for session in list(self._sessions.values()):
            deadline = session.poll_timeout()
            if deadline is not None and deadline <= now:
                session.handle_timeout(now, unix)
                self._session_outputs(session)
        self._run_mailbox()

    def poll_timeout(self) -> float | None:
        deadlines = [self.core.poll_timeout()]
        deadlines += [s.poll_timeout() for s in self._sessions.values()]
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    def reset(self) -> None:
        """NodeActor's ``Reset`` message."""
        self._node_step(lambda: self.core.reset("simulated reset", self._now))

    # ------------------------------------------------------------------ outputs

    def portal_out(self) -> list[tuple[str, dict[str, Any]]]:
        out, self._portal = self._portal, []
        return out

    def connect_requests(self) -> list[str]:
        out, self._connects = self._connects, []
        return out

    def datagrams_out(self) -> list[tuple[Address | None, Address, bytes]]:
        out, self.udp = self.udp, []
        return out

    def tun_out(self) -> list[bytes]:
        out, self.tun = self.tun, []
        return out

    # ------------------------------------------------------------------ the node's shell

    def _node_step(self, step: Callable[[], None]) -> None:
        """One NodeActor step (NodeActor._step), then what it told itself meanwhile."""
        step()
        self._carry_out()
        self._run_mailbox()

    def _run_mailbox(self) -> None:
        while self._mailbox:
            self._mailbox.popleft()()
            self._carry_out()

    def _node_timer(self) -> None:
        """NodeActor._timer_step: fold the fast path's channel notes, then the timers."""
        if self._channel_activity:
            seen = list(self._channel_activity)
            self._channel_activity.clear()
            self.core.note_channel_activity(seen, self._now)
        self.core.handle_timeout(self._now)

    def _legacy_resolved(self, command: cmd.Resolve) -> None:
        """NodeActor's ``_LegacyResolved`` (no addresses)."""
        self.core.handle_resolved(command.request, (), command.generation, self._now)

    def _carry_out(self) -> None:
        """NodeActor._carry_out: the commands in order, then the node's datagrams."""
        core = self.core
        while (command := core.poll_command()) is not None:
            self._execute(command)
        while (tx := core.poll_transmit()) is not None:
            self.udp.append((tx.src, tx.dst, tx.payload))

    def _execute(self, command: Command) -> None:
        now = self._now
        if isinstance(command, cmd.StartSession):
            session = self._sessions.get(command.client_id)
            if session is None:  # a new PeerActor; an existing one swaps its tunnel
                session = self._sessions[command.client_id] = ClientSession(
                    command.client_id, rng=self.rng)
            session.new_wireguard_session(
                local_index=command.local_index, peer_public=command.peer_public,
                preshared_key=command.preshared_key, static=command.static,
                rate_limiter=command.rate_limiter, now=now)
            self._session_outputs(session)
        elif isinstance(command, cmd.StopSession):
            stopped = self._sessions.pop(command.client_id, None)
            if stopped is not None:
                stopped.close()
                self._session_outputs(stopped)
        elif isinstance(command, cmd.RouteAdded):
            self._routes[command.key] = self._sessions[command.client_id]
        elif isinstance(command, cmd.RouteRemoved):
            self._routes.pop(command.key, None)
        elif isinstance(command, cmd.RelayRouteAdded):
            self._relay_routes[(command.server, command.channel)] = command.remote
        elif isinstance(command, cmd.RelayRouteRemoved):
            self._relay_routes.pop((command.server, command.channel), None)
        elif isinstance(command, cmd.SendToPortal):
            self._portal.append(encode_egress(command.message))
        elif isinstance(command, (cmd.ConnectPortal, cmd.PortalKeyRotated)):
            self._connects.append(command.public_key)
        elif isinstance(command, cmd.Rebind):
            self._port += 1
        elif isinstance(command, cmd.Resolve):
            # A resolver that knows no names; the answer comes as a later message.
            self._mailbox.append(partial(self._legacy_resolved, command))
        elif isinstance(command, (cmd.ProtectKey, cmd.ConfigureInterface)):
            pass  # no log to keep the key from; no device to configure
        else:
            self._tell_session(command)

    def _tell_session(self, command: Command) -> None:
        """A command for one client's PeerActor, applied to its session (NodeActor's
        ``_tell_session`` and ``_deliver_handshakes``; PeerActor's ``_control``)."""
        assert isinstance(command, _SESSION_COMMANDS), f"unknown command {command!r}"
        session = self._sessions.get(command.client_id)
        if session is None:  # it ended earlier in this step
            return
        now = self._now
        if isinstance(command, cmd.DeliverHandshakes):
            self._session_data(session, command.datagrams)
            return
        if isinstance(command, cmd.AuthorizeResource):
            session.authorize(command.resource, command.expires_at, command.ipv4,
                              command.ipv6, now)
        elif isinstance(command, cmd.SetupDns):
            session.resolved(command.resource_id, command.domain, command.proxy_ips,
                             command.addresses, False, now, self._unix)
        elif isinstance(command, cmd.ForgetClient):
            session.forget_client()
        elif isinstance(command, cmd.RemoveResource):
            session.remove_resource(command.resource_id)
        elif isinstance(command, cmd.UpdateResource):
            session.update_resource(command.resource)
        else:
            session.set_path(command.path, now)
        self._session_outputs(session)

    # ------------------------------------------------------------------ sessions' shell

    def _session_data(self, session: ClientSession, datagrams: list[tuple[bytes, Address]]
                      ) -> None:
        """PeerSession.from_network: decrypted packets to the TUN, then the outputs."""
        self.tun += session.from_network_batch(datagrams, self._now, self._unix)
        self._session_outputs(session)

    def _session_outputs(self, session: ClientSession) -> None:
        """PeerSession._transmit and _report."""
        for transmit in session.take_transmits():
            for payload in transmit.payloads:
                self.udp.append((transmit.src, transmit.dst, payload))
        client_id = session.client_id
        for event in session.take_events():
            if isinstance(event, IdleChanged):
                self._mailbox.append(partial(self._session_idle, client_id, event.idle))
            elif isinstance(event, SessionFailed):
                self._mailbox.append(partial(self._session_failed, session, event.reason))
            elif isinstance(event, ResolveRequest):
                self._mailbox.append(partial(self._resolved, session, event))
            elif isinstance(event, TunRegister):
                self._tun_register(client_id, event.ipv4, event.ipv6)
            elif isinstance(event, TunUnregister):
                self._tun_unregister(client_id)

    def _session_idle(self, client_id: uuid.UUID, idle: bool) -> None:
        """NodeActor's ``PeerIdle``."""
        self.core.session_idle(client_id, idle, self._now)

    def _session_failed(self, session: ClientSession, reason: str) -> None:
        """NodeActor._on_peer_failed: a report from a session already stopped is stale."""
        if self._sessions.get(session.client_id) is session:
            self.core.session_failed(session.client_id, reason)

    def _resolved(self, session: ClientSession, request: ResolveRequest) -> None:
        """The PeerActor's ``Resolved`` message, from a resolver that knows no names."""
        if not session.closed:
            session.resolved(request.resource_id, request.domain, request.proxy_ips, (),
                             request.reply, self._now, self._unix)
            self._session_outputs(session)

    # ------------------------------------------------------------------ the TUN's table

    def _tun_register(self, client_id: uuid.UUID, ipv4: str, ipv6: str) -> None:
        """TunActor._register: every address the client was authorized with routes to it;
        an address that moved to this client no longer belongs to the previous one."""
        addresses = self._tun_addresses.setdefault(client_id, set())
        for address in (ipaddress.ip_address(ipv4).packed, ipaddress.ip_address(ipv6).packed):
            previous = self._tun_routes.get(address)
            if previous is not None and previous != client_id:
                self._tun_addresses.get(previous, set()).discard(address)
            addresses.add(address)
        for address in addresses:
            self._tun_routes[address] = client_id

    def _tun_unregister(self, client_id: uuid.UUID) -> None:
        for address in self._tun_addresses.pop(client_id, set()):
            if self._tun_routes.get(address) == client_id:
                del self._tun_routes[address]
