"""A stand-in gateway and portal for devclient tests, built from the same cores.

:class:`FakeGateway` is one controlled ICE agent plus one responder WireGuard tunnel for a
single client (no relays of its own, host candidate only). It echoes UDP datagrams it
receives through the tunnel (addresses and ports swapped) and answers AssignedIps with
DomainStatus "Active", so a client test can see traffic make the round trip.
:class:`GatewayRunner` drives it on a real loopback socket in a thread;
:class:`FakePortal` plays the portal for an in-process ``DevClient``.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from gateway.demux import DatagramKind, classify
from gateway.errors import MalformedPacket
from gateway.ice.agent import IceAgent
from gateway.ice.candidate import Candidate, IceCredentials
from gateway.packet import p2p_control
from gateway.packet.ip import PROTO_UDP, build_udp, destination, source
from gateway.stun.message import parse as parse_stun
from gateway.types import Address, Rng, Transmit
from gateway.wg.keys import StaticKeyPair, decode_key, encode_key
from gateway.wg.ratelimit import HandshakeRateLimiter
from gateway.wg.tunnel import Tunnel, WriteToNetwork, WriteToTunnel

GATEWAY_IPV4 = "100.64.0.2"
GATEWAY_IPV6 = "fd00:2021:1111::2"


def udp_echo(packet: bytes) -> bytes | None:
    """The reply to a UDP/IPv4 or UDP/IPv6 packet: same payload, endpoints swapped."""
    v6 = packet[0] >> 4 == 6
    l4 = 40 if v6 else 20
    if (packet[6] if v6 else packet[9]) != PROTO_UDP:
        return None
    sport, dport = struct.unpack_from("!HH", packet, l4)
    return build_udp(destination(packet), source(packet), dport, sport, packet[l4 + 8:])


class FakeGateway:
    """The gateway side of one client connection; sans-IO like the cores it wraps."""

    def __init__(self, rng: Rng, local: Address, now: float) -> None:
        self.id = str(uuid.UUID(int=rng.getrandbits(128)))
        self.rng = rng
        self.local = local
        self.static = StaticKeyPair.generate(rng)
        self.agent: IceAgent | None = None
        self.tunnel: Tunnel | None = None
        self.credentials: tuple[IceCredentials, IceCredentials] | None = None
        self.peer: Address | None = None
        self.received: deque[bytes] = deque()
        self.assigned: list[p2p_control.AssignedIps] = []
        self.transmits: deque[Transmit] = deque()
        self.echo = True
        self._now = now

    @property
    def public_key(self) -> str:
        return encode_key(self.static.public)

    def reset(self) -> None:
        """A gateway restart: new key, every connection gone."""
        self.static = StaticKeyPair.generate(self.rng)
        self.agent = self.tunnel = self.credentials = None

    def authorize(self, client_public: bytes, psk: bytes, client: IceCredentials,
                  gateway: IceCredentials, now: float) -> list[str]:
        """``authorize_flow``: keep the connection if our ICE credentials match (upsert)."""
        if self.agent is None or self.credentials != (client, gateway):
            self.agent = IceAgent(controlling=False, local=gateway, remote=client,
                                  rng=self.rng, now=now)
            self.agent.add_local_candidate(Candidate.host(self.local), now)
            limiter = HandshakeRateLimiter(self.static.public, self.rng)
            self.tunnel = Tunnel(static=self.static, peer_public=client_public,
                                 preshared_key=psk, local_index=self.rng.getrandbits(24) << 8,
                                 rate_limiter=limiter, rng=self.rng, now=now)
            self.credentials = (client, gateway)
        return [Candidate.host(self.local).to_sdp()]

    def add_remote_candidates(self, lines: list[str], now: float) -> None:
        if self.agent is not None:
            for line in lines:
                self.agent.add_remote_candidate(Candidate.parse(line), now)
            self._drain(now)

    def handle_datagram(self, src: Address, data: bytes, now: float, unix_now: float) -> None:
        kind = classify(data, src, ())
        if kind is DatagramKind.STUN and self.agent is not None:
            with contextlib.suppress(MalformedPacket):
                msg = parse_stun(data)
                if self.agent.accepts(msg, data):
                    self.agent.handle_stun(msg, data, src, self.local, now)
        elif kind is DatagramKind.WIREGUARD and self.tunnel is not None:
            self.peer = src
            result = self.tunnel.decapsulate(data, src, now, unix_now)
            if isinstance(result, WriteToNetwork):
                self.transmits.append(Transmit(self.local, src, result.datagram))
            elif isinstance(result, WriteToTunnel):
                self._on_packet(result.packet, now, unix_now)
        self._drain(now)

    def _on_packet(self, packet: bytes, now: float, unix_now: float) -> None:
        event = p2p_control.decode(packet)
        if isinstance(event, p2p_control.AssignedIps):
            self.assigned.append(event)
            self.send_packet(p2p_control.encode_domain_status(event.resource_id, event.domain,
                                                              True), now, unix_now)
            return
        self.received.append(packet)
        reply = udp_echo(packet) if self.echo else None
        if reply is not None:
            self.send_packet(reply, now, unix_now)

    def send_packet(self, packet: bytes, now: float, unix_now: float) -> None:
        assert self.tunnel is not None
        result = self.tunnel.encapsulate(packet, now, unix_now)
        if isinstance(result, WriteToNetwork) and self.peer is not None:
            self.transmits.append(Transmit(self.local, self.peer, result.datagram))

    def handle_timeout(self, now: float, unix_now: float) -> None:
        if self.agent is not None:
            self.agent.handle_timeout(now)
        if self.tunnel is not None:
            self.tunnel.handle_timeout(now, unix_now)
        self._drain(now)

    def poll_timeout(self) -> float | None:
        deadlines = [self.agent.poll_timeout() if self.agent else None,
                     self.tunnel.poll_timeout() if self.tunnel else None]
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    def _drain(self, now: float) -> None:
        if self.agent is not None:
            while (tx := self.agent.poll_transmit()) is not None:
                self.transmits.append(tx)
            while self.agent.poll_event() is not None:
                pass
        if self.tunnel is not None and self.peer is not None:
            while (datagram := self.tunnel.poll_transmit()) is not None:
                self.transmits.append(Transmit(self.local, self.peer, datagram))


class GatewayRunner:
    """Runs a :class:`FakeGateway` on a UDP socket in a thread; ``lock`` guards the core."""

    def __init__(self, rng: Rng, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        name = self.sock.getsockname()
        self.gateway = FakeGateway(rng, (name[0], name[1]), time.monotonic())
        self.lock = threading.RLock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="FakeGateway", daemon=True)

    def __enter__(self) -> GatewayRunner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.wake()
        self._thread.join(5)
        for s in (self.sock, self._wake_r, self._wake_w):
            s.close()

    def wake(self) -> None:
        """Re-evaluate deadlines after the test changed the core under ``lock``."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        while not self._stop:
            with self.lock:
                deadline = self.gateway.poll_timeout()
            timeout = 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))
            readable, _, _ = select.select([self.sock, self._wake_r], [], [], timeout)
            if self._wake_r in readable:
                self._wake_r.recv(4096)
            with self.lock:
                if self.sock in readable:
                    while True:
                        try:
                            data, src = self.sock.recvfrom(2048)
                        except (BlockingIOError, ConnectionRefusedError):
                            break
                        self.gateway.handle_datagram(src, data, time.monotonic(), time.time())
                deadline = self.gateway.poll_timeout()
                if deadline is not None and time.monotonic() >= deadline:
                    self.gateway.handle_timeout(time.monotonic(), time.time())
                while self.gateway.transmits:
                    tx = self.gateway.transmits.popleft()
                    with contextlib.suppress(OSError):
                        self.sock.sendto(tx.payload, tx.dst)


Deliver = Callable[[str, Any], None]


class FakePortal:
    """The portal for one client and one gateway, in process (a devclient ``PortalLink``)."""

    def __init__(self, runner: GatewayRunner, init: dict[str, Any], rng: Rng,
                 client_public: Callable[[], str]) -> None:
        self.runner = runner
        self.init = init
        self.rng = rng
        self.client_public = client_public
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.deliver: Deliver | None = None
        self.closed = False
        self.fail_resources: set[str] = set()

    def start(self, deliver: Deliver) -> None:
        self.deliver = deliver
        deliver("init", self.init)

    def close(self) -> None:
        self.closed = True

    def _creds(self) -> tuple[IceCredentials, IceCredentials]:
        # Stable per (client key, gateway key), as the portal derives them
        # (elixir/apps/api/lib/api/client/channel.ex).
        gw = self.runner.gateway
        seed = f"{self.client_public()}:{gw.public_key}"
        tag = uuid.uuid5(uuid.NAMESPACE_OID, seed).hex
        return IceCredentials(tag[:4], tag[4:26]), IceCredentials(tag[26:30], "p" + tag[8:30])

    def send(self, event: str, payload: dict[str, Any]) -> None:
        self.sent.append((event, payload))
        assert self.deliver is not None
        gw = self.runner.gateway
        now = time.monotonic()
        if event == "create_flow":
            resource_id = payload["resource_id"]
            if resource_id in self.fail_resources:
                self.deliver("flow_creation_failed", {"resource_id": resource_id,
                                                      "reason": "offline"})
                return
            client, gateway = self._creds()
            psk = self.rng.randbytes(32)
            with self.runner.lock:
                candidates = gw.authorize(decode_key(self.client_public()), psk, client,
                                          gateway, now)
            self.runner.wake()
            self.deliver("flow_created", {
                "resource_id": resource_id, "gateway_id": gw.id,
                "gateway_public_key": gw.public_key, "gateway_ipv4": GATEWAY_IPV4,
                "gateway_ipv6": GATEWAY_IPV6,
                "client_ice_credentials": {"username": client.ufrag, "password": client.pwd},
                "gateway_ice_credentials": {"username": gateway.ufrag, "password": gateway.pwd},
                "preshared_key": encode_key(psk),
            })
            self.deliver("ice_candidates", {"gateway_id": gw.id, "candidates": candidates})
        elif event == "broadcast_ice_candidates":
            with self.runner.lock:
                gw.add_remote_candidates(list(payload["candidates"]), now)
            self.runner.wake()
