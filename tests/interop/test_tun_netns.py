"""A real tun-firezone in a namespace: netconfig's result, and packets both ways via TunActor."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors.io.tun_linux import (
    READ_SIZE,
    TUN_NAME,
    TUN_TX_QUEUE_LEN,
    LinuxTun,
    ensure_device_node,
    open_tun,
)
from actors.netconfig import configure_interface
from actors.tun import (
    ConfigureInterface,
    GetTunStats,
    GetTunWriter,
    RegisterClient,
    TunActor,
    TunWriter,
)
from devstack import netns
from gateway.packet.ip import build_tcp, build_tcp_syn, build_udp
from tests.support.fake_tun import udp_ipv4, udp_ipv6
from tests.support.interop import require_netns

pytestmark = [pytest.mark.interop, pytest.mark.netns]

TIMEOUT = 5.0
TABLE = "539098368"
GATEWAY_V4, GATEWAY_V6 = "100.64.0.1", "fd00:2021:1111::1"
CLIENT_V4, CLIENT_V6 = "100.64.0.2", "fd00:2021:1111::2"


@pytest.fixture
def ns() -> Iterator[str]:
    require_netns()
    with netns.namespaces("fzttun") as (name,):
        yield name


def ip_json(ns: str, *args: str) -> Any:
    return json.loads(netns.run("ip", "-j", *args, ns=ns).stdout or "[]")


def configure_in(ns: str) -> Callable[[str, str], None]:
    return lambda ipv4, ipv6: netns.in_netns(ns, lambda: configure_interface(ipv4, ipv6))


def routes(ns: str, family: str) -> list[tuple[str, str, str]]:
    shown = ip_json(ns, family, "route", "show", "table", TABLE)
    return [(r["dst"], r["dev"], r.get("protocol")) for r in shown]


def interface_state(ns: str) -> dict[str, Any]:
    [link] = ip_json(ns, "addr", "show", "dev", TUN_NAME)
    rules = [
        (rule["family"], rule)
        for family in ("-4", "-6")
        for rule in [{"family": family, **r} for r in ip_json(ns, family, "rule")]
        if rule.get("table") == TABLE
    ]
    return {
        "mtu": link["mtu"],
        "txqlen": link["txqlen"],
        "up": "UP" in link["flags"],
        "addresses": sorted((a["local"], a["prefixlen"]) for a in link["addr_info"]),
        "rules": sorted(
            (family, r.get("priority"), "not" in r, r.get("fwmark")) for family, r in rules
        ),
        "routes_v4": routes(ns, "-4"),
        "routes_v6": routes(ns, "-6"),
    }


EXPECTED_STATE = {
    "mtu": 1280,
    "txqlen": TUN_TX_QUEUE_LEN,
    "up": True,
    "addresses": [(GATEWAY_V4, 32), (GATEWAY_V6, 128)],
    "rules": [
        ("-4", 32765, True, "0xfd002021"),
        ("-6", 32765, True, "0xfd002021"),
    ],
    "routes_v4": [("100.64.0.0/11", TUN_NAME, "static")],
    "routes_v6": [("fd00:2021:1111::/107", TUN_NAME, "static")],
}


def test_netconfig_sets_up_addresses_mtu_rule_and_routes_idempotently(ns: str) -> None:
    device: LinuxTun = netns.in_netns(ns, open_tun)
    try:
        assert not os.get_blocking(device.fileno())
        assert not os.get_inheritable(device.fileno())  # O_CLOEXEC
        assert device.read(READ_SIZE) is None  # EAGAIN, not a block
        configure_in(ns)(GATEWAY_V4, GATEWAY_V6)
        assert interface_state(ns) == EXPECTED_STATE

        # A stray address goes, nothing else changes, no rule or route is duplicated.
        netns.run("ip", "addr", "add", "100.64.0.99/32", "dev", TUN_NAME, ns=ns)
        configure_in(ns)(GATEWAY_V4, GATEWAY_V6)
        configure_in(ns)(GATEWAY_V4, GATEWAY_V6)
        assert interface_state(ns) == EXPECTED_STATE
    finally:
        device.close()
    assert [link["ifname"] for link in ip_json(ns, "link")] == ["lo"]  # gone with its fd


def test_the_kernel_queue_holds_tx_queue_len_packets_and_counts_the_rest(ns: str) -> None:
    """Nobody reads: the kernel keeps TUN_TX_QUEUE_LEN packets for us and drops the rest,
    and the device reports those drops (what GetTunStats shows as ``kernel``)."""
    device: LinuxTun = netns.in_netns(ns, open_tun)
    try:
        configure_in(ns)(GATEWAY_V4, GATEWAY_V6)
        assert netns.in_netns(ns, device.kernel_drops) == 0
        extra = 250
        with udp_socket(ns, socket.AF_INET, ("0.0.0.0", 0)) as sock:
            for _ in range(TUN_TX_QUEUE_LEN + extra):
                sock.sendto(b"x", (CLIENT_V4, 5555))
        dropped = netns.in_netns(ns, device.kernel_drops)
        queued = 0
        while device.read(READ_SIZE) is not None:
            queued += 1
        assert queued == TUN_TX_QUEUE_LEN
        assert dropped == extra
    finally:
        device.close()


def test_netconfig_without_the_device_only_warns(ns: str, caplog: pytest.LogCaptureFixture) -> None:
    configure_in(ns)(GATEWAY_V4, GATEWAY_V6)
    assert "no such interface" in caplog.text
    assert [r for r in ip_json(ns, "rule") if r.get("table") == TABLE] == []


def test_a_missing_device_node_is_created(tmp_path: Path) -> None:
    require_netns()  # root, for mknod
    path = tmp_path / "dev" / "net" / "tun"

    ensure_device_node(str(path))
    ensure_device_node(str(path))  # present now: nothing to do

    info = path.stat()
    assert stat.S_ISCHR(info.st_mode)
    assert (os.major(info.st_rdev), os.minor(info.st_rdev)) == (10, 200)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o751


class Collected:
    """Packets a recording peer received, with a way to wait for a particular one."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []
        self._changed = threading.Condition()

    def add(self, packets: list[bytes]) -> None:
        with self._changed:
            self.packets.extend(packets)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[bytes], bool]) -> bytes:
        with self._changed:
            found: list[bytes] = []

            def seen() -> bool:
                found[:] = [p for p in self.packets if predicate(p)]
                return bool(found)

            assert self._changed.wait_for(seen, TIMEOUT), f"not among {self.packets!r}"
            return found[0]


@pytest.fixture
def devices() -> list[LinuxTun]:
    """The devices the ``tun`` fixture opened (to look at their GSO counters)."""
    return []


@pytest.fixture
def tun(ns: str, devices: list[LinuxTun]) -> Iterator[pykka.ActorRef[Any]]:
    configured = threading.Event()

    def configure(ipv4: str, ipv6: str) -> None:
        configure_in(ns)(ipv4, ipv6)
        configured.set()

    def open_device() -> LinuxTun:
        device: LinuxTun = netns.in_netns(ns, open_tun)
        devices.append(device)
        return device

    ref = TunActor.start(device_factory=open_device, configure=configure)
    ref.tell(ConfigureInterface(GATEWAY_V4, GATEWAY_V6))
    assert configured.wait(TIMEOUT)
    yield ref
    ref.stop(timeout=TIMEOUT)
    # The device lives exactly as long as the actor's fd.
    assert [link["ifname"] for link in ip_json(ns, "link")] == ["lo"]


def stats(tun: pykka.ActorRef[Any]) -> dict[str, Any]:
    result = tun.ask(GetTunStats(), timeout=TIMEOUT)
    assert isinstance(result, dict)
    return result


def udp_socket(ns: str, family: int, bind: tuple[str, int]) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.settimeout(TIMEOUT)
        sock.bind(bind)
        return sock

    return netns.in_netns(ns, make)


def test_datagrams_to_a_client_come_out_of_the_tun_to_its_peer(
    ns: str, tun: pykka.ActorRef[Any]
) -> None:
    collected = Collected()  # stands in for the client's PeerSession
    tun.ask(RegisterClient(uuid.uuid4(), CLIENT_V4, CLIENT_V6, collected.add), timeout=TIMEOUT)

    with udp_socket(ns, socket.AF_INET, ("0.0.0.0", 0)) as sock4:
        sock4.sendto(b"hello over v4", (CLIENT_V4, 5555))
    with udp_socket(ns, socket.AF_INET6, ("::", 0)) as sock6:
        sock6.sendto(b"hello over v6", (CLIENT_V6, 5556))

    v4 = collected.wait_for(lambda p: p.endswith(b"hello over v4"))
    v6 = collected.wait_for(lambda p: p.endswith(b"hello over v6"))
    assert v4[0] >> 4 == 4
    assert (socket.inet_ntop(socket.AF_INET, v4[12:16]), v4[16:20]) == (
        GATEWAY_V4,
        socket.inet_pton(socket.AF_INET, CLIENT_V4),
    )
    assert v6[0] >> 4 == 6
    assert (socket.inet_ntop(socket.AF_INET6, v6[8:24]), v6[24:40]) == (
        GATEWAY_V6,
        socket.inet_pton(socket.AF_INET6, CLIENT_V6),
    )
    assert stats(tun)["rx_packets"] >= 2


def test_packets_written_through_the_tun_writer_reach_namespace_sockets(
    ns: str, tun: pykka.ActorRef[Any]
) -> None:
    writer = tun.ask(GetTunWriter(), timeout=TIMEOUT)
    assert isinstance(writer, TunWriter)
    with (
        udp_socket(ns, socket.AF_INET, (GATEWAY_V4, 0)) as sock4,
        udp_socket(ns, socket.AF_INET6, (GATEWAY_V6, 0)) as sock6,
    ):
        port4, port6 = sock4.getsockname()[1], sock6.getsockname()[1]
        written = writer.write_batch(
            [
                udp_ipv4(CLIENT_V4, GATEWAY_V4, b"from the client v4", 41000, port4),
                udp_ipv6(CLIENT_V6, GATEWAY_V6, b"from the client v6", 41001, port6),
            ]
        )
        assert written == 2
        assert sock4.recvfrom(2048) == (b"from the client v4", (CLIENT_V4, 41000))
        data, source = sock6.recvfrom(2048)
        assert (data, source[:2]) == (b"from the client v6", (CLIENT_V6, 41001))
    assert stats(tun)["tx_packets"] == 2


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_a_udp_burst_written_as_one_gso_frame_arrives_as_the_original_datagrams(
    ns: str, tun: pykka.ActorRef[Any], devices: list[LinuxTun], family: str
) -> None:
    writer = tun.ask(GetTunWriter(), timeout=TIMEOUT)
    assert isinstance(writer, TunWriter)
    v4 = family == "v4"
    local, client = (GATEWAY_V4, CLIENT_V4) if v4 else (GATEWAY_V6, CLIENT_V6)
    payloads = [bytes([n]) * 1200 for n in range(20)] + [b"the shorter last one"]
    with udp_socket(ns, socket.AF_INET if v4 else socket.AF_INET6, (local, 0)) as sock:
        port = sock.getsockname()[1]
        burst = [build_udp(client, local, 41000, port, p) for p in payloads]
        assert writer.write_batch(burst) == len(burst)
        received = [sock.recvfrom(2048)[0] for _ in payloads]
    assert received == payloads
    (device,) = devices
    assert device.vnet_hdr and device.gso, "expected IFF_VNET_HDR with GSO writes"
    assert device.gso_frames == 1
    assert stats(tun)["tx_packets"] == len(burst)


def test_a_tcp_stream_written_as_tso_frames_reaches_a_socket_intact(
    ns: str, tun: pykka.ActorRef[Any], devices: list[LinuxTun]
) -> None:
    """We play the client through the TUN: handshake, then 30 full segments in one write."""
    collected = Collected()
    tun.ask(RegisterClient(uuid.uuid4(), CLIENT_V4, CLIENT_V6, collected.add), timeout=TIMEOUT)
    writer = tun.ask(GetTunWriter(), timeout=TIMEOUT)
    assert isinstance(writer, TunWriter)

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.bind((GATEWAY_V4, 0))
        sock.listen(1)
        return sock

    with netns.in_netns(ns, listen) as server:
        port = server.getsockname()[1]
        isn = 5000
        writer.write_batch([build_tcp_syn(CLIENT_V4, GATEWAY_V4, 42000, port, seq=isn)])
        syn_ack = collected.wait_for(lambda p: p[33] & 0x12 == 0x12)  # SYN|ACK flags
        server_isn = int.from_bytes(syn_ack[24:28], "big")
        ack = server_isn + 1
        writer.write_batch([build_tcp(CLIENT_V4, GATEWAY_V4, 42000, port, seq=isn + 1, ack=ack)])
        connection, _ = server.accept()
        with connection:
            connection.settimeout(TIMEOUT)
            data = b"".join(bytes([n]) * 1200 for n in range(30))
            segments = [
                build_tcp(CLIENT_V4, GATEWAY_V4, 42000, port, seq=isn + 1 + offset, ack=ack,
                          payload=data[offset:offset + 1200])
                for offset in range(0, len(data), 1200)
            ]
            before = devices[0].gso_frames
            assert writer.write_batch(segments) == len(segments)
            assert devices[0].gso_frames == before + 1, "expected one TSO frame"
            received = b""
            while len(received) < len(data):
                chunk = connection.recv(65536)
                assert chunk, "connection closed early"
                received += chunk
    assert received == data
