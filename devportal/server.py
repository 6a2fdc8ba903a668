"""The development portal server (websockets' threaded sync server).

Gateways connect to ``/gateway/websocket`` and join topic ``gateway``; development
clients connect to ``/client/websocket`` and join topic ``client``. Both pass ``token``,
``external_id``, ``name`` and ``public_key`` in the query, like the real portal expects.

Gateway protocol (1.4): after the join, ``init`` (interface, config, relays with TURN REST
credentials valid 14 days). ``flow_authorized`` completes a flow; candidates are forwarded
between the two sides. Client protocol (a small subset of the real one): after the join,
``init`` {interface, resources, relays}; ``create_flow`` {resource_id} starts a flow and
ends in ``flow_created`` or ``flow_creation_failed``.

Every socket runs in its own server thread; shared state sits behind one lock. Nothing
secret (tokens, PSKs, passwords) is logged; :attr:`DevPortal.events` keeps a full record
for test assertions.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

from actors.io.websocket import install_log_redaction
from devportal.config import ClientConfig, DevPortalConfig
from gateway.portal.derive import (
    coturn_rest_credentials,
    derive_ice_credentials,
    generate_preshared_key,
)
from gateway.portal.keys import parse_key
from gateway.resources import Resource, resource_to_json
from gateway.types import format_address

log = logging.getLogger(__name__)
install_log_redaction("websockets.server")  # it logs request paths, i.e. tokens, at DEBUG

#: Namespace for stable ids: a gateway's id is uuid5(NAMESPACE, external_id).
NAMESPACE = uuid.UUID("5b0f2b1e-8f6a-4c55-9a8e-2f1d0c3b7a64")
GATEWAY_PATH = "/gateway/websocket"
CLIENT_PATH = "/client/websocket"


@dataclass(frozen=True, slots=True)
class PortalEventRecord:
    """One entry of :attr:`DevPortal.events`: what went in or out, and on which socket."""

    at: float
    direction: str  # "in", "out" or "connect"
    kind: str  # "gateway" or "client"
    peer: str  # gateway id / client name / "-"
    event: str
    payload: Any = field(repr=False)


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    id: uuid.UUID
    external_id: str
    name: str
    public_key: str
    open_sockets: int
    connections: int  # successful upgrades so far


@dataclass(eq=False)
class _Session:
    kind: str
    ws: ServerConnection
    id: uuid.UUID
    name: str
    public_key: str
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address
    external_id: str = ""
    client: ClientConfig | None = None
    joined: bool = False
    send_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _PendingFlow:
    client: _Session
    gateway: _Session
    resource: Resource
    preshared_key: str = field(repr=False)
    client_creds: dict[str, str] = field(repr=False, default_factory=dict)
    gateway_creds: dict[str, str] = field(repr=False, default_factory=dict)


class DevPortal:
    """A running development portal plus the test hooks later tests use."""

    def __init__(self, config: DevPortalConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.SystemRandom()
        #: TURN salts never come from a seeded ``rng``: the real portal draws fresh relay
        #: credentials for every init, so two portals started with one seed (a restart)
        #: must not hand out the same ones within a second.
        self._turn_rng = random.SystemRandom()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._sessions: list[_Session] = []
        self._params: dict[ServerConnection, dict[str, Any]] = {}
        self._addresses: dict[str, tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]] = {}
        self._gateway_connections: dict[uuid.UUID, int] = {}
        self._gateway_last: dict[uuid.UUID, GatewayInfo] = {}
        self._flows: dict[str, _PendingFlow] = {}
        self._authorized: dict[uuid.UUID, set[tuple[uuid.UUID, uuid.UUID]]] = {}
        self._resources: dict[uuid.UUID, Resource] = {r.id: r for r in config.resources}
        self.events: list[PortalEventRecord] = []
        self.connection_attempts = 0

    # ----------------------------------------------------------------- lifecycle

    def start(self, sock: socket.socket | None = None) -> DevPortal:
        """Serve on ``sock`` (already bound, e.g. inside a netns) or on config host/port."""
        if self._server is not None:
            raise RuntimeError("DevPortal already running")
        if sock is None:
            host = self.config.host
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, self.config.port), family=family)
        self._server = serve(
            self._handle,
            sock=sock,
            process_request=self._process_request,
            ping_interval=None,
            close_timeout=1,
            compression=None,
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="DevPortal", daemon=True
        )
        self._thread.start()
        log.info("Development portal %r listening on %s", self.config.account, self.address)
        return self

    def stop(self) -> None:
        """Close every socket (code 1001) and the listener."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        log.info("Development portal stopped")

    def __enter__(self) -> DevPortal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("DevPortal is not running")
        name = self._server.socket.getsockname()
        return (name[0], name[1])

    @property
    def url(self) -> str:
        """The base URL a gateway's ``--api-url`` should use."""
        return f"ws://{format_address(self.address)}"

    # ----------------------------------------------------------------- test hooks

    def gateways(self) -> list[GatewayInfo]:
        """Known gateways with their current public key and open socket count."""
        with self._lock:
            out = []
            for gid, last in self._gateway_last.items():
                open_sockets = sum(1 for s in self._sessions if s.kind == "gateway" and s.id == gid)
                current = next(
                    (s for s in reversed(self._sessions) if s.kind == "gateway" and s.id == gid),
                    None,
                )
                out.append(
                    GatewayInfo(
                        gid,
                        last.external_id,
                        last.name,
                        current.public_key if current else last.public_key,
                        open_sockets,
                        self._gateway_connections.get(gid, 0),
                    )
                )
            return out

    def wait_for(self, predicate: Callable[[DevPortal], bool], timeout: float = 5.0) -> bool:
        """Block until ``predicate(self)`` holds (re-checked whenever something happens)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def wait_for_event(
        self, direction: str, event: str, *, after: int = 0, timeout: float = 5.0
    ) -> PortalEventRecord | None:
        """The first record at index >= ``after`` matching direction and event."""

        def find() -> PortalEventRecord | None:
            return next(
                (e for e in self.events[after:] if e.direction == direction and e.event == event),
                None,
            )

        with self._cond:
            self._cond.wait_for(lambda: find() is not None, timeout)
            return find()

    def push_to_gateway(self, event: str, payload: Any, gateway_id: uuid.UUID | None = None) -> int:
        """Push a raw event to joined gateways (all, or one); returns how many got it."""
        count = 0
        for session in self._joined("gateway"):
            if gateway_id is None or session.id == gateway_id:
                self._push(session, "gateway", event, payload)
                count += 1
        return count

    def push_raw_to_gateway(self, text: str, gateway_id: uuid.UUID | None = None) -> int:
        """Send one text frame, as given, to joined gateways (all, or one): what a broken or
        hostile portal could send (deep nesting, lone surrogates, NaN). Returns how many got it."""
        count = 0
        for session in self._joined("gateway"):
            if gateway_id is None or session.id == gateway_id:
                self._record("out", session.kind, session.name, "raw", text)
                try:
                    with session.send_lock:
                        session.ws.send(text)
                except ConnectionClosed:
                    continue
                count += 1
        return count

    def drop_gateway(self, gateway_id: uuid.UUID | None = None) -> int:
        """Close the websocket of connected gateways (all, or one) from the portal's side,
        as a portal deploy does; clients stay connected. The gateway reconnects, joins
        and gets a fresh ``init`` (with fresh TURN credentials). Returns how many closed."""
        with self._lock:
            sessions = [
                s for s in self._sessions
                if s.kind == "gateway" and (gateway_id is None or s.id == gateway_id)
            ]
        for session in sessions:
            self._record("connect", session.kind, session.name, "dropped", {})
            session.ws.close(1001, "going away")
        return len(sessions)

    def reject_access(self, client_name: str, resource_id: uuid.UUID) -> int:
        """Revoke a client's access to a resource on every gateway that authorized it."""
        client_id = self.client_id(client_name)
        count = 0
        for session in self._joined("gateway"):
            with self._lock:
                granted = self._authorized.get(session.id, set())
                if (client_id, resource_id) not in granted:
                    continue
                granted.discard((client_id, resource_id))
            payload = {
                "client_id": str(client_id),
                "resource_id": str(resource_id),
                "flow_id": str(uuid.uuid4()),
            }
            self._push(session, "gateway", "reject_access", payload)
            count += 1
        return count

    def update_resource(self, resource: Resource) -> int:
        """Replace a resource's definition; gateways that authorized it get ``resource_updated``."""
        with self._lock:
            self._resources[resource.id] = resource
        count = 0
        for session in self._joined("gateway"):
            with self._lock:
                uses = any(rid == resource.id for _, rid in self._authorized.get(session.id, ()))
            if uses:
                self._push(session, "gateway", "resource_updated", resource_to_json(resource))
                count += 1
        return count

    @staticmethod
    def gateway_id(external_id: str) -> uuid.UUID:
        return uuid.uuid5(NAMESPACE, f"gateway:{external_id}")

    @staticmethod
    def client_id(name: str) -> uuid.UUID:
        return uuid.uuid5(NAMESPACE, f"client:{name}")

    # ----------------------------------------------------------------- upgrade

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        with self._cond:
            self.connection_attempts += 1
            self._cond.notify_all()
        parts = urlsplit(request.path)
        kind = {GATEWAY_PATH: "gateway", CLIENT_PATH: "client"}.get(parts.path)
        if kind is None:
            return self._refuse(conn, "-", HTTPStatus.NOT_FOUND, "Not found")
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        token = query.get("token")
        if not token:
            return self._refuse(conn, kind, HTTPStatus.UNAUTHORIZED, "Missing token")
        client: ClientConfig | None = None
        if kind == "gateway":
            if not any(secrets.compare_digest(token, t) for t in self.config.gateway_tokens):
                return self._refuse(conn, kind, HTTPStatus.UNAUTHORIZED, "Invalid token")
        else:
            client = self.config.client_by_token(token)
            if client is None:
                return self._refuse(conn, kind, HTTPStatus.UNAUTHORIZED, "Invalid token")
        try:
            public_key = parse_key(query.get("public_key"), "public_key")
        except ValueError as exc:
            return self._refuse(
                conn,
                kind,
                HTTPStatus.UNPROCESSABLE_ENTITY,
                f"Invalid or missing connection parameters: {exc}",
            )
        external_id = query.get("external_id", "")
        if kind == "gateway" and not external_id:
            return self._refuse(
                conn,
                kind,
                HTTPStatus.UNPROCESSABLE_ENTITY,
                "Invalid or missing connection parameters: external_id",
            )
        user_agent = request.headers.get("User-Agent", "")
        if kind == "gateway" and not any(p.startswith("connlib/") for p in user_agent.split()):
            return self._refuse(
                conn,
                kind,
                HTTPStatus.UNPROCESSABLE_ENTITY,
                "Invalid or missing connection parameters: last_seen_user_agent is invalid",
            )
        with self._lock:
            self._params[conn] = {
                "kind": kind,
                "client": client,
                "public_key": public_key,
                "external_id": external_id,
                "name": query.get("name", ""),
                "user_agent": user_agent,
            }
        return None

    def _refuse(self, conn: ServerConnection, kind: str, status: HTTPStatus, text: str) -> Response:
        log.info("Refusing %s connection: %d %s", kind, status.value, text)
        self._record("connect", kind, "-", "refused", {"status": status.value, "reason": text})
        return conn.respond(status, text)

    # ----------------------------------------------------------------- sessions

    def _handle(self, ws: ServerConnection) -> None:
        with self._lock:
            params = self._params.pop(ws, None)
        if params is None:
            return
        session = self._open_session(ws, params)
        try:
            for raw in ws:
                if isinstance(raw, bytes):
                    continue
                self._on_frame(session, raw)
        except ConnectionClosed:
            pass
        finally:
            with self._cond:
                if session in self._sessions:
                    self._sessions.remove(session)
                self._cond.notify_all()
            self._record("connect", session.kind, session.name, "closed", {})
            log.info("%s %s disconnected", session.kind.capitalize(), session.name)

    def _open_session(self, ws: ServerConnection, params: dict[str, Any]) -> _Session:
        kind = params["kind"]
        if kind == "gateway":
            external_id = params["external_id"]
            sid = self.gateway_id(external_id)
            key = f"gateway:{external_id}"
            name = params["name"] or str(sid)
        else:
            client = params["client"]
            sid = self.client_id(client.name)
            key = f"client:{client.name}"
            name = client.name
            external_id = ""
        ipv4, ipv6 = self._tunnel_addresses(key)
        session = _Session(
            kind, ws, sid, name, params["public_key"], ipv4, ipv6, external_id, params["client"]
        )
        with self._cond:
            self._sessions.append(session)
            if kind == "gateway":
                self._gateway_connections[sid] = self._gateway_connections.get(sid, 0) + 1
                self._gateway_last[sid] = GatewayInfo(
                    sid, external_id, name, session.public_key, 0, 0
                )
            self._cond.notify_all()
        self._record("connect", kind, name, "opened", {"public_key": session.public_key})
        log.info(
            "%s %s connected (id %s, key %s, UA %r)",
            kind.capitalize(),
            name,
            sid,
            session.public_key,
            params["user_agent"],
        )
        return session

    def _tunnel_addresses(self, key: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
        with self._lock:
            if key not in self._addresses:
                index = len(self._addresses) + 2
                self._addresses[key] = (
                    self.config.ipv4_pool.network_address + index,
                    self.config.ipv6_pool.network_address + index,
                )
            return self._addresses[key]

    def _joined(self, kind: str) -> list[_Session]:
        with self._lock:
            return [s for s in self._sessions if s.kind == kind and s.joined]

    # ----------------------------------------------------------------- frames

    def _on_frame(self, session: _Session, raw: str) -> None:
        try:
            frame = json.loads(raw)
            topic, event, payload, ref = (
                frame["topic"],
                frame["event"],
                frame.get("payload"),
                frame.get("ref"),
            )
        except (ValueError, KeyError, TypeError):
            log.warning("Malformed frame from %s %s dropped", session.kind, session.name)
            return
        self._record("in", session.kind, session.name, event, payload)
        if topic == "phoenix" and event == "heartbeat":
            self._reply(session, "phoenix", ref)
        elif event == "phx_join":
            if topic != session.kind:
                self._reply(session, topic, ref, status="error", reason="unmatched topic")
                return
            self._reply(session, topic, ref)
            session.joined = True
            with self._cond:
                self._cond.notify_all()
            self._send_init(session)
        elif not session.joined or topic != session.kind:
            self._reply(session, topic, ref, status="error", reason="unmatched topic")
        elif session.kind == "gateway":
            self._on_gateway_event(session, event, payload, ref)
        else:
            self._on_client_event(session, event, payload, ref)

    def _on_gateway_event(self, gw: _Session, event: str, payload: Any, ref: Any) -> None:
        if event == "flow_authorized":
            flow_ref = payload.get("ref") if isinstance(payload, dict) else None
            with self._lock:
                flow = self._flows.pop(flow_ref, None) if isinstance(flow_ref, str) else None
            if flow is None or flow.gateway is not gw:
                self._reply(gw, "gateway", ref, status="error", reason="invalid_ref")
                return
            self._reply(gw, "gateway", ref)
            self._push(
                flow.client,
                "client",
                "flow_created",
                {
                    "resource_id": str(flow.resource.id),
                    "gateway_id": str(gw.id),
                    "gateway_public_key": gw.public_key,
                    "gateway_ipv4": str(gw.ipv4),
                    "gateway_ipv6": str(gw.ipv6),
                    "client_ice_credentials": flow.client_creds,
                    "gateway_ice_credentials": flow.gateway_creds,
                    "preshared_key": flow.preshared_key,
                },
            )
        elif event == "connection_ready":
            self._reply(gw, "gateway", ref)
        elif event in ("broadcast_ice_candidates", "broadcast_invalidated_ice_candidates"):
            forward = (
                "ice_candidates"
                if event == "broadcast_ice_candidates"
                else "invalidate_ice_candidates"
            )
            ids = payload.get("client_ids", []) if isinstance(payload, dict) else []
            candidates = payload.get("candidates", []) if isinstance(payload, dict) else []
            for client in self._joined("client"):
                if str(client.id) in ids:
                    self._push(
                        client,
                        "client",
                        forward,
                        {
                            "gateway_id": str(gw.id),
                            "candidates": candidates,
                        },
                    )
        else:
            log.warning("Unknown gateway event %r from %s", event, gw.name)

    def _on_client_event(self, cl: _Session, event: str, payload: Any, ref: Any) -> None:
        if event == "create_flow":
            self._reply(cl, "client", ref)
            self._create_flow(cl, payload)
        elif event in ("broadcast_ice_candidates", "broadcast_invalidated_ice_candidates"):
            forward = (
                "ice_candidates"
                if event == "broadcast_ice_candidates"
                else "invalidate_ice_candidates"
            )
            ids = payload.get("gateway_ids", []) if isinstance(payload, dict) else []
            candidates = payload.get("candidates", []) if isinstance(payload, dict) else []
            for gw in self._joined("gateway"):
                if str(gw.id) in ids:
                    self._push(
                        gw,
                        "gateway",
                        forward,
                        {
                            "client_id": str(cl.id),
                            "candidates": candidates,
                        },
                    )
        else:
            log.warning("Unknown client event %r from %s", event, cl.name)

    def _create_flow(self, cl: _Session, payload: Any) -> None:
        raw_id = payload.get("resource_id") if isinstance(payload, dict) else None
        try:
            resource_id = uuid.UUID(str(raw_id))
        except ValueError:
            self._push(
                cl, "client", "flow_creation_failed", {"resource_id": raw_id, "reason": "not_found"}
            )
            return
        with self._lock:
            resource = self._resources.get(resource_id)
        policy = self.config.allowed(cl.name, resource_id)
        if resource is None or policy is None:
            log.info("Flow for %s to %s refused: no policy", cl.name, resource_id)
            self._push(
                cl,
                "client",
                "flow_creation_failed",
                {"resource_id": str(resource_id), "reason": "forbidden"},
            )
            return
        gateways = self._joined("gateway")
        if not gateways:
            self._push(
                cl,
                "client",
                "flow_creation_failed",
                {"resource_id": str(resource_id), "reason": "offline"},
            )
            return
        gw = gateways[-1]  # the most recently connected gateway
        creds = derive_ice_credentials(cl.id, cl.public_key, gw.id, gw.public_key)
        psk = generate_preshared_key(self._rng)
        flow_ref = f"devportal.{self._rng.getrandbits(128):032x}"
        expires_at = int(time.time() + policy.expires_in) if policy.expires_in is not None else None
        flow = _PendingFlow(cl, gw, resource, psk, creds.client.to_json(), creds.gateway.to_json())
        with self._lock:
            self._flows[flow_ref] = flow
            self._authorized.setdefault(gw.id, set()).add((cl.id, resource_id))
        log.info("Authorizing flow %s -> %s via gateway %s", cl.name, resource_id, gw.name)
        self._push(
            gw,
            "gateway",
            "authorize_flow",
            {
                "ref": flow_ref,
                "flow_id": str(uuid.uuid4()),
                "actor": {"id": str(uuid.uuid5(NAMESPACE, f"actor:{cl.name}"))},
                "resource": resource_to_json(resource),
                "expires_at": expires_at,
                "client": {
                    "id": str(cl.id),
                    "public_key": cl.public_key,
                    "preshared_key": psk,
                    "ipv4": str(cl.ipv4),
                    "ipv6": str(cl.ipv6),
                },
                "client_ice_credentials": creds.client.to_json(),
                "gateway_ice_credentials": creds.gateway.to_json(),
            },
        )

    def _send_init(self, session: _Session) -> None:
        relays = self._relay_entries()
        interface = {"ipv4": str(session.ipv4), "ipv6": str(session.ipv6)}
        if session.kind == "gateway":
            payload: dict[str, Any] = {
                "interface": interface,
                "config": {"ipv4_masquerade_enabled": True, "ipv6_masquerade_enabled": True},
                "relays": relays,
            }
        else:
            with self._lock:
                allowed = [
                    r
                    for rid, r in self._resources.items()
                    if self.config.allowed(session.name, rid) is not None
                ]
            payload = {
                "interface": interface,
                "resources": [resource_to_json(r) for r in allowed],
                "relays": relays,
            }
        self._push(session, session.kind, "init", payload)

    def _relay_entries(self) -> list[dict[str, Any]]:
        entries = []
        for relay in self.config.relays:
            # One entry per address, each with fresh credentials, on every init (as the
            # real portal does: a reconnect always brings new ones for the same relay).
            for addr in relay.addrs:
                creds = coturn_rest_credentials(relay.secret, time.time(), self._turn_rng)
                entries.append(
                    {
                        "id": str(relay.id),
                        "type": "turn",
                        "addr": format_address(addr),
                        "username": creds.username,
                        "password": creds.password,
                        "expires_at": creds.expires_at,
                    }
                )
        return entries

    # ----------------------------------------------------------------- output

    def _reply(
        self, session: _Session, topic: str, ref: Any, *, status: str = "ok", reason: str = ""
    ) -> None:
        response: dict[str, Any] = {"reason": reason} if status == "error" else {}
        self._send(
            session,
            {
                "topic": topic,
                "event": "phx_reply",
                "ref": ref,
                "payload": {"status": status, "response": response},
            },
        )

    def _push(self, session: _Session, topic: str, event: str, payload: Any) -> None:
        self._send(session, {"topic": topic, "event": event, "payload": payload, "ref": None})

    def _send(self, session: _Session, frame: dict[str, Any]) -> None:
        self._record("out", session.kind, session.name, frame["event"], frame["payload"])
        try:
            with session.send_lock:
                session.ws.send(json.dumps(frame))
        except ConnectionClosed:
            log.info("Could not send %s to %s: socket closed", frame["event"], session.name)

    def _record(self, direction: str, kind: str, peer: str, event: str, payload: Any) -> None:
        with self._cond:
            self.events.append(
                PortalEventRecord(time.monotonic(), direction, kind, peer, event, payload)
            )
            self._cond.notify_all()
