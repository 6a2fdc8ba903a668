"""Our WireGuard Tunnel against wireguard-go, across two network namespaces.

Layout: namespace "us" holds a UDP socket on 10.203.77.1:51820 that a small loop in this
file drives through our ``Tunnel`` (tunnel IP 100.64.0.1); namespace "go" runs
wireguard-go on 10.203.77.2:51820 with the TUN address 100.64.0.2. Nothing leaves the
namespaces.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import select
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devstack import netns
from gateway.wg.keys import StaticKeyPair, encode_key
from gateway.wg.ratelimit import HandshakeRateLimiter
from gateway.wg.tunnel import (
    DONE,
    Dropped,
    HandshakeCompleted,
    Tunnel,
    WriteToNetwork,
    WriteToTunnel,
)
from tests.support.interop import require_bin, require_netns

pytestmark = pytest.mark.interop

OUR_UNDERLAY, GO_UNDERLAY, PORT = "10.203.77.1", "10.203.77.2", 51820
OUR_TUNNEL_IP, GO_TUNNEL_IP = "100.64.0.1", "100.64.0.2"


# ------------------------------------------------------------------ packet helpers


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_ipv4_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet with correct header and UDP checksums."""
    src_b, dst_b = socket.inet_aton(src), socket.inet_aton(dst)
    udp_len = 8 + len(payload)
    pseudo = src_b + dst_b + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    udp_sum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", udp_sum) + udp[8:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0x1234, 0, 64, 17, 0, src_b, dst_b)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def parse_udp_ipv4(packet: bytes) -> tuple[str, str, int, int, bytes]:
    assert packet[0] >> 4 == 4 and packet[9] == 17, packet[:20].hex()
    assert _checksum(packet[:20]) == 0, "bad IPv4 header checksum"
    ihl = (packet[0] & 15) * 4
    sport, dport, length = struct.unpack("!HHH", packet[ihl : ihl + 6])
    return (
        socket.inet_ntoa(packet[12:16]),
        socket.inet_ntoa(packet[16:20]),
        sport,
        dport,
        packet[ihl + 8 : ihl + length],
    )


def test_packet_helper_checksums() -> None:
    packet = udp_ipv4_packet("100.64.0.1", "100.64.0.2", 1000, 2000, b"hello")
    assert _checksum(packet[:20]) == 0
    assert parse_udp_ipv4(packet) == ("100.64.0.1", "100.64.0.2", 1000, 2000, b"hello")


# ------------------------------------------------------------------ the two sides


@dataclass
class WireguardGo:
    ns: str
    iface: str
    proc: subprocess.Popen[bytes]
    log: Path
    private: StaticKeyPair
    workdir: Path

    def wg(self, *args: str) -> str:
        return netns.run("wg", *args, ns=self.ns).stdout

    def log_tail(self, lines: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def configure(self, our_public: bytes, psk: bytes, keepalive: int | None) -> None:
        key_file, psk_file = self.workdir / "wg.key", self.workdir / "psk"
        for path, key in ((key_file, self.private.private), (psk_file, psk)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(encode_key(key) + "\n")
        args = [
            "set", self.iface, "listen-port", str(PORT), "private-key", str(key_file),
            "peer", encode_key(our_public), "preshared-key", str(psk_file),
            "endpoint", f"{OUR_UNDERLAY}:{PORT}", "allowed-ips", f"{OUR_TUNNEL_IP}/32",
        ]  # fmt: skip
        if keepalive is not None:
            args += ["persistent-keepalive", str(keepalive)]
        self.wg(*args)
        netns.run("ip", "addr", "add", f"{GO_TUNNEL_IP}/32", "dev", self.iface, ns=self.ns)
        netns.run("ip", "link", "set", self.iface, "mtu", "1280", "up", ns=self.ns)
        netns.run("ip", "route", "add", "100.64.0.0/11", "dev", self.iface, ns=self.ns)


@dataclass
class OurPeer:
    """Test harness: a UDP socket in our namespace feeding one Tunnel with real clocks."""

    sock: socket.socket
    tunnel: Tunnel
    peer_addr: tuple[str, int] = (GO_UNDERLAY, PORT)
    results: list[object] = field(default_factory=list)
    events: list[object] = field(default_factory=list)
    to_tunnel: list[bytes] = field(default_factory=list)

    def send_result(self, result: object) -> None:
        if isinstance(result, WriteToNetwork):
            self.sock.sendto(result.datagram, self.peer_addr)

    def flush(self) -> None:
        while (datagram := self.tunnel.poll_transmit()) is not None:
            self.sock.sendto(datagram, self.peer_addr)
        while (event := self.tunnel.poll_event()) is not None:
            self.events.append(event)

    def pump(self, until: Callable[[], bool], timeout: float, what: str) -> None:
        """Receive, decapsulate and answer until ``until()`` holds or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not until():
            now = time.monotonic()
            if now >= deadline:
                raise AssertionError(f"timed out waiting for {what}; results: {self.results}")
            wake = self.tunnel.poll_timeout()
            wait = deadline - now if wake is None else max(0.0, min(deadline, wake) - now)
            readable, _, _ = select.select([self.sock], [], [], min(wait, 0.1))
            if readable:
                datagram, src = self.sock.recvfrom(65535)
                result = self.tunnel.decapsulate(datagram, src, time.monotonic(), time.time())
                self.results.append(result)
                if isinstance(result, WriteToTunnel):
                    self.to_tunnel.append(result.packet)
                self.send_result(result)
            wake = self.tunnel.poll_timeout()
            if wake is not None and time.monotonic() >= wake:
                self.tunnel.handle_timeout(time.monotonic(), time.time())
            self.flush()

    def encapsulate(self, packet: bytes) -> object:
        result = self.tunnel.encapsulate(packet, time.monotonic(), time.time())
        self.send_result(result)
        self.flush()
        return result


@dataclass
class Setup:
    go: WireguardGo
    us: OurPeer
    ns_us: str
    ns_go: str


def _wait_for(path: str, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"wireguard-go did not create {path}")
        time.sleep(0.005)  # polling a file another process creates: no event to wait on


@pytest.fixture
def wg_setup(tmp_path: Path) -> Iterator[Callable[..., Setup]]:
    """Start wireguard-go and our side; ``make(psk_ours, psk_go, keepalive)`` configures."""
    require_netns()
    require_bin("wireguard-go", "wireguard-go")
    require_bin("wg", "wireguard-tools")
    rng = random.SystemRandom()
    cleanups: list[Callable[[], None]] = []

    def make(psk: bytes, go_psk: bytes | None = None, keepalive: int | None = None) -> Setup:
        ns_us, ns_go = netns.unique_name("fzwu"), netns.unique_name("fzwg")
        for ns in (ns_us, ns_go):
            cleanups.append(functools.partial(netns.delete, ns))  # delete ignores a missing ns
            netns.add(ns)
        netns.veth(
            ns_us, netns.unique_name("vu"), f"{OUR_UNDERLAY}/24",
            ns_go, netns.unique_name("vg"), f"{GO_UNDERLAY}/24",
        )  # fmt: skip
        iface = netns.unique_name("wgt")
        log = tmp_path / f"{iface}.log"
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns_go, "wireguard-go", "-f", iface],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LOG_LEVEL": "verbose"},
            )

        def stop() -> None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            print(f"--- wireguard-go {iface} log ---\n{go.log_tail()}")

        go = WireguardGo(ns_go, iface, proc, log, StaticKeyPair.generate(rng), tmp_path)
        cleanups.append(stop)
        _wait_for(f"/var/run/wireguard/{iface}.sock", proc)

        ours = StaticKeyPair.generate(rng)
        tunnel = Tunnel(
            static=ours,
            peer_public=go.private.public,
            preshared_key=psk,
            local_index=rng.getrandbits(24) << 8,
            rate_limiter=HandshakeRateLimiter(ours.public, rng),
            rng=rng,
            now=time.monotonic(),
        )

        def open_socket() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((OUR_UNDERLAY, PORT))
            return sock

        sock = netns.in_netns(ns_us, open_socket)
        cleanups.append(sock.close)
        go.configure(ours.public, psk if go_psk is None else go_psk, keepalive)
        return Setup(go, OurPeer(sock, tunnel), ns_us, ns_go)

    try:
        yield make
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


def _go_latest_handshake(go: WireguardGo) -> int:
    line = go.wg("show", go.iface, "dump").splitlines()[1]
    return int(line.split("\t")[4])


def _completed(us: OurPeer, initiator: bool) -> bool:
    return HandshakeCompleted(is_initiator=initiator) in us.events


def test_wireguard_go_initiates_and_we_respond(wg_setup: Callable[..., Setup]) -> None:
    psk = os.urandom(32)
    setup = wg_setup(psk, keepalive=25)  # keepalive + endpoint: wireguard-go initiates at once
    us = setup.us
    us.pump(lambda: _completed(us, initiator=False), 10.0, "wireguard-go's initiation")
    assert us.tunnel.has_session
    assert us.tunnel.last_handshake_unix is not None
    assert _go_latest_handshake(setup.go) > 0
    assert not us.tunnel.counters, us.tunnel.counters


def test_we_initiate_and_wireguard_go_responds(wg_setup: Callable[..., Setup]) -> None:
    psk = os.urandom(32)
    setup = wg_setup(psk)  # no keepalive: wireguard-go stays quiet until we speak
    us = setup.us
    us.send_result(us.tunnel.initiate(time.monotonic(), time.time()))
    us.pump(lambda: _completed(us, initiator=True), 10.0, "wireguard-go's response")
    us.flush()  # the confirming keepalive went out with the response handling
    deadline = time.monotonic() + 5
    while _go_latest_handshake(setup.go) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)  # wg show is a polled interface
    assert _go_latest_handshake(setup.go) > 0
    assert not us.tunnel.counters, us.tunnel.counters


def test_ip_packets_cross_both_ways(wg_setup: Callable[..., Setup]) -> None:
    psk = os.urandom(32)
    setup = wg_setup(psk)
    us = setup.us
    us.send_result(us.tunnel.initiate(time.monotonic(), time.time()))
    us.pump(lambda: _completed(us, initiator=True), 10.0, "handshake")

    def go_socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((GO_TUNNEL_IP, 4000))
        sock.settimeout(5.0)
        return sock

    receiver = netns.in_netns(setup.ns_go, go_socket)
    try:
        # Our side -> wireguard-go's TUN -> a socket in its namespace.
        payloads = [b"to-go-%d" % i + bytes(i * 97) for i in range(5)]
        for payload in payloads:
            packet = udp_ipv4_packet(OUR_TUNNEL_IP, GO_TUNNEL_IP, 3000, 4000, payload)
            assert isinstance(us.encapsulate(packet), WriteToNetwork)
        got = [receiver.recvfrom(2048) for _ in payloads]
        assert [g[0] for g in got] == payloads
        assert got[0][1] == (OUR_TUNNEL_IP, 3000)

        # A socket in wireguard-go's namespace -> its TUN -> our decapsulate.
        receiver.sendto(b"from-go", (OUR_TUNNEL_IP, 5000))
        big = os.urandom(1200)
        receiver.sendto(big, (OUR_TUNNEL_IP, 5001))
        us.pump(lambda: len(us.to_tunnel) >= 2, 10.0, "packets from wireguard-go")
    finally:
        receiver.close()
    parsed = [parse_udp_ipv4(p) for p in us.to_tunnel]
    assert parsed[0] == (GO_TUNNEL_IP, OUR_TUNNEL_IP, 4000, 5000, b"from-go")
    assert parsed[1] == (GO_TUNNEL_IP, OUR_TUNNEL_IP, 4000, 5001, big)
    assert not us.tunnel.counters, us.tunnel.counters


def test_wrong_preshared_key_fails_cleanly(wg_setup: Callable[..., Setup]) -> None:
    setup = wg_setup(os.urandom(32), go_psk=os.urandom(32))
    us = setup.us
    us.send_result(us.tunnel.initiate(time.monotonic(), time.time()))
    us.pump(lambda: any(isinstance(r, Dropped) for r in us.results), 10.0, "the response")
    assert us.results[0] == Dropped("decrypt_failed")
    assert us.tunnel.counters["decrypt_failed"] == 1
    assert not us.tunnel.has_session
    assert not any(isinstance(e, HandshakeCompleted) for e in us.events)


def test_wireguard_go_keepalives_are_accepted(wg_setup: Callable[..., Setup]) -> None:
    setup = wg_setup(os.urandom(32), keepalive=1)
    us = setup.us
    us.pump(lambda: _completed(us, initiator=False), 10.0, "handshake")
    # The confirming keepalive, then persistent keepalives every second.
    us.pump(lambda: us.results.count(DONE) >= 2, 10.0, "two keepalives")
    assert not us.tunnel.counters, us.tunnel.counters
    assert not us.to_tunnel
