"""The devclient's real IO loop against an in-process gateway made of the same cores.

No root: the UDP sockets are on loopback, the TUN is a datagram socketpair, the portal is
fed in process, the command channel is a real FIFO. Proves ICE (controlling) + WireGuard
(initiator) + packet exchange, DNS proxy IPs with AssignedIps/DomainStatus, roaming, and
(with coturn) a relay-only path through TURN channels.
"""

from __future__ import annotations

import ipaddress
import queue
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devclient.client import DevClient
from devclient.control import CommandFifo
from devclient.core import ClientCore, InterfaceConfig
from devstack.coturn import CoturnServer
from gateway.packet.ip import build_udp
from tests.support.fake_gateway import FakePortal, GatewayRunner, udp_echo

CIDR_ID = "11111111-1111-4111-8111-111111111111"
DNS_ID = "22222222-2222-4222-8222-222222222222"
CLIENT_V4 = "100.64.0.9"
CLIENT_V6 = "fd00:2021:1111::9"


class SocketTun:
    """A TUN twin: one end of a datagram socketpair, one packet per datagram."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, max_size: int) -> bytes | None:
        try:
            return self.sock.recv(max_size)
        except BlockingIOError:
            return None

    def write(self, packet: bytes) -> int:
        return self.sock.send(packet)

    def close(self) -> None:
        self.closed = True
        self.sock.close()


class Lines:
    """A ``TextIO`` stand-in collecting the client's event lines for waiting on."""

    def __init__(self) -> None:
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.seen: list[str] = []
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *complete, self._partial = self._partial.split("\n")
        for line in complete:
            self.lines.put(line)
        return len(text)

    def flush(self) -> None:
        pass

    def wait_for(self, prefix: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line starting {prefix!r}; saw {self.seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line


def fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split()[1:])


class Harness:
    def __init__(self, tmp_path: Path, *, relay_only: bool = False,
                 relays: list[dict[str, Any]] | None = None) -> None:
        self.rng = random.Random(7)
        self.runner = GatewayRunner(random.Random(8))
        self.core = ClientCore(rng=self.rng, now=time.monotonic(), unix_now=time.time(),
                               relay_only=relay_only, dns_domains={DNS_ID: "app.example"})
        init = {
            "interface": {"ipv4": CLIENT_V4, "ipv6": CLIENT_V6},
            "resources": [
                {"id": CIDR_ID, "type": "cidr", "address": "10.99.0.0/24", "name": "net",
                 "filters": []},
                {"id": DNS_ID, "type": "dns", "address": "*.example", "name": "app",
                 "filters": []},
            ],
            "relays": relays or [],
        }
        self.portal = FakePortal(self.runner, init, random.Random(9),
                                 lambda: self.core.public_key)
        self.tun_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun_end.settimeout(5)
        self.tun = SocketTun(client_end)
        self.configs: list[InterfaceConfig] = []
        self.out = Lines()
        self.fifo_path = str(tmp_path / "commands")
        self.client = DevClient(self.core, portal=self.portal, open_tun=self._open_tun,
                                bind_ip="127.0.0.1", out=self.out,  # type: ignore[arg-type]
                                resources=["net"], commands=CommandFifo(self.fifo_path))
        self.thread = threading.Thread(target=self.client.run, name="devclient")

    def _open_tun(self, config: InterfaceConfig) -> SocketTun:
        self.configs.append(config)
        return self.tun

    def command(self, line: str) -> None:
        with open(self.fifo_path, "w") as fifo:
            fifo.write(line + "\n")

    def round_trip(self, dst: str, payload: bytes) -> bytes:
        src = CLIENT_V6 if ":" in dst else CLIENT_V4
        packet = build_udp(src, dst, 40000, 7, payload)
        self.tun_end.send(packet)
        reply = self.tun_end.recv(2048)
        assert reply == udp_echo(packet)
        return reply


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    with h.runner:
        h.thread.start()
        try:
            yield h
        finally:
            h.client.stop()
            h.thread.join(5)
    assert not h.thread.is_alive()


def test_connects_directly_and_moves_packets(harness: Harness) -> None:
    key = harness.out.wait_for("KEY")
    assert fields(key)["public_key"] == harness.core.public_key
    ready = fields(harness.out.wait_for("READY"))
    assert ready == {"resource": CIDR_ID, "gateway": harness.runner.gateway.id,
                     "path": "direct"}
    config = harness.configs[0]
    assert (config.ipv4, config.ipv6) == (CLIENT_V4, CLIENT_V6)
    assert "10.99.0.0/24" in config.routes and "100.96.0.0/11" in config.routes

    harness.round_trip("10.99.0.5", b"ping over wireguard")
    with harness.runner.lock:
        assert harness.runner.gateway.received[-1][16:20] == bytes([10, 99, 0, 5])

    # A host the resource does not cover gets no flow and goes nowhere.
    harness.tun_end.send(build_udp(CLIENT_V4, "10.98.0.1", 1, 2, b"x"))
    harness.round_trip("10.99.0.6", b"still fine")
    with harness.runner.lock:
        assert all(p[16:20] != bytes([10, 98, 0, 1]) for p in harness.runner.gateway.received)


def test_dns_resource_gets_proxy_ips_and_status(harness: Harness) -> None:
    harness.out.wait_for("READY")
    harness.command(f"request {DNS_ID}")
    ready = fields(harness.out.wait_for("READY"))
    assert ready["resource"] == DNS_ID
    dns = fields(harness.out.wait_for("DNS"))
    ips = dns["proxy_ips"].split(",")
    assert dns["domain"] == "app.example" and dns["status"] == "Active"
    assert [ipaddress.ip_address(ip).version for ip in ips] == [4] * 4 + [6] * 4
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("100.96.0.0/11")
               for ip in ips[:4])
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("fd00:2021:1111:8000::/107")
               for ip in ips[4:])
    with harness.runner.lock:
        assigned = harness.runner.gateway.assigned[-1]
    assert str(assigned.resource_id) == DNS_ID and assigned.domain == "app.example"
    assert [str(ip) for ip in assigned.proxy_ips] == ips

    harness.round_trip(ips[0], b"to the proxy ip")
    harness.round_trip(ips[4], b"and over ipv6")


def test_roam_rebinds_and_reconnects(harness: Harness) -> None:
    first = fields(harness.out.wait_for("LISTEN"))["addr"]
    harness.out.wait_for("READY")
    harness.round_trip("10.99.0.5", b"before")
    harness.command("roam")
    second = fields(harness.out.wait_for("LISTEN"))["addr"]
    assert second != first
    assert fields(harness.out.wait_for("READY"))["path"] == "direct"
    harness.round_trip("10.99.0.5", b"after roaming")
    with harness.runner.lock:
        assert harness.runner.gateway.peer == ("127.0.0.1", int(second.rsplit(":", 1)[1]))
    creates = [p for e, p in harness.portal.sent if e == "create_flow"]
    assert len(creates) == 2


def test_gateway_reset_replaces_the_connection(harness: Harness) -> None:
    harness.out.wait_for("READY")
    old_key = harness.runner.gateway.public_key
    with harness.runner.lock:
        harness.runner.gateway.reset()
    harness.command("request net")
    harness.out.wait_for("READY")
    conn = harness.core.connection(harness.runner.gateway.id)
    assert conn is not None and conn.public_key != old_key.encode()
    harness.round_trip("10.99.0.7", b"after the reset")


def test_flow_failure_and_quit(harness: Harness) -> None:
    harness.out.wait_for("READY")
    harness.portal.fail_resources.add(DNS_ID)
    harness.command("request app")
    assert fields(harness.out.wait_for("FAILED")) == {"resource": DNS_ID, "reason": "offline"}
    harness.command("request nope")
    assert fields(harness.out.wait_for("FAILED"))["reason"] == "unknown_resource"
    harness.command("quit")
    harness.thread.join(5)
    assert not harness.thread.is_alive()
    assert harness.tun.closed and harness.portal.closed


def test_relay_only_goes_through_turn(tmp_path: Path, coturn: CoturnServer) -> None:
    username, password = coturn.credentials("client")
    relays = [{"id": "33333333-3333-4333-8333-333333333333", "type": "turn",
               "addr": f"127.0.0.1:{coturn.port}", "username": username,
               "password": password, "expires_at": 2_000_000_000}]
    h = Harness(tmp_path, relay_only=True, relays=relays)
    with h.runner:
        h.thread.start()
        try:
            assert fields(h.out.wait_for("READY", timeout=15))["path"] == "relay"
            signalled = [c for e, p in h.portal.sent if e == "broadcast_ice_candidates"
                         for c in p["candidates"]]
            assert signalled and all(c.endswith("typ relay") for c in signalled)
            h.round_trip("10.99.0.5", b"through the relay")
            with h.runner.lock:
                peer = h.runner.gateway.peer
            assert peer is not None and peer[1] in range(coturn.min_port, coturn.max_port + 1)
        finally:
            h.client.stop()
            h.thread.join(5)
