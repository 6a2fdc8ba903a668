"""The UDP reader's dispatch: fast paths to client sessions, everything else to the NodeActor.

Also the syscall batching both ways: GSO sends and GRO trains on loopback.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from actors.io.udp import (
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SOCKET_BUFFER_BYTES,
    Datagrams,
    PeerRoute,
    UdpReader,
    UdpSockets,
    _set_buffers,
    split_gro,
)
from actors.logsetup import OFF
from gateway.turn.channel_data import encode_channel_data
from tests.support.interop import skip_or_fail

INDEX = 0xABCDE << 8


class Inbox:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.event = threading.Event()

    def tell(self, message: Any) -> None:
        self.items.append(message)
        self.event.set()

    def wait(self) -> Any:
        if not self.items:
            assert self.event.wait(5), "nothing arrived"
        self.event.clear()
        return self.items.pop(0)


def _transport(payload: bytes = b"x" * 32) -> bytes:
    return struct.pack("<II", 4, INDEX | 1) + bytes(8) + payload


@pytest.fixture
def setup() -> Iterator[dict[str, Any]]:
    sockets = UdpSockets(mark=False, ipv6=False)
    assert sockets.v4 is not None
    port = sockets.v4.getsockname()[1]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    node, peer = Inbox(), Inbox()
    routes = {INDEX >> 8: PeerRoute(peer.tell)}
    relay_routes: dict[Any, Any] = {}
    activity: set[Any] = set()
    reader = UdpReader(sockets, to_node=node.tell, peer_routes=routes,
                       index_shift=8, relay_routes=relay_routes, channel_activity=activity)
    reader.start()
    yield {"send": lambda data: sender.sendto(data, ("127.0.0.1", port)), "node": node,
           "peer": peer, "relay_routes": relay_routes, "activity": activity, "routes": routes,
           "relay": sender.getsockname(), "reader": reader, "port": port, "sockets": sockets}
    reader.stop()
    reader.join(5)
    sockets.close()
    sender.close()


def test_transport_data_goes_straight_to_the_peer(setup: dict[str, Any]) -> None:
    setup["send"](_transport())
    batch = setup["peer"].wait()
    assert batch == [(_transport(), setup["relay"])]
    assert setup["node"].items == []


def test_everything_else_goes_to_the_node(setup: dict[str, Any]) -> None:
    setup["send"](b"\x01\x00\x00\x00" + bytes(144))  # a handshake initiation
    message = setup["node"].wait()
    assert isinstance(message, Datagrams)
    assert message.batch[0][0][0] == "127.0.0.1"  # the local address via IP_PKTINFO


def test_relayed_transport_data_is_unwrapped_for_the_peer(setup: dict[str, Any]) -> None:
    relay = setup["relay"]
    client = ("10.203.0.2", 40000)
    setup["relay_routes"][(relay, 0x4001)] = client
    setup["send"](encode_channel_data(0x4001, _transport()) + b"\x00\x00")  # padded
    assert setup["peer"].wait() == [(_transport(), client)]
    assert setup["activity"] == {(relay, 0x4001)}
    # Another channel, or STUN inside ChannelData, is the node's business.
    setup["send"](encode_channel_data(0x4002, _transport()))
    assert isinstance(setup["node"].wait(), Datagrams)
    setup["send"](encode_channel_data(0x4001, b"\x00\x01" + bytes(38)))
    assert isinstance(setup["node"].wait(), Datagrams)


def test_short_or_odd_channel_data_on_a_routed_channel_does_not_kill_the_reader(
    setup: dict[str, Any],
) -> None:
    relay = setup["relay"]
    setup["relay_routes"][(relay, 0x4001)] = ("10.0.0.2", 1)
    odd = [encode_channel_data(0x4001, inner) for inner in
           (b"\x04", b"\x04\x00\x00\x00\x01", b"\x04\x01\x00\x00" + bytes(40))]
    odd.append(encode_channel_data(0x4001, b"\x04") + bytes(40))  # length 1, trailing junk
    for datagram in odd:
        setup["send"](datagram)
        assert isinstance(setup["node"].wait(), Datagrams)  # not ours to unwrap
    setup["send"](_transport())  # the reader still works
    assert setup["peer"].wait()[0][0] == _transport()


def test_a_failing_session_costs_its_batch_not_the_reader(setup: dict[str, Any]) -> None:
    def broken(batch: list[Any]) -> None:
        setup["peer"].tell("raised")
        raise RuntimeError("a bug in a client's data path")

    route = setup["routes"][INDEX >> 8]
    setup["routes"][INDEX >> 8] = PeerRoute(broken)
    setup["send"](_transport())
    assert setup["peer"].wait() == "raised"
    setup["routes"][INDEX >> 8] = route
    setup["send"](_transport())
    assert setup["peer"].wait()[0][0] == _transport()
    reader = setup["reader"]
    assert reader.counters["peer_error"] == 1  # counted before the next batch was read
    assert reader.is_alive()


def _send_as_one_gso_run(setup: dict[str, Any], datagrams: list[bytes]) -> None:
    """One send_many from a fresh socket: same-size runs leave as UDP GSO sends."""
    sender = UdpSockets(mark=False, ipv6=False)
    try:
        sender.send_many(("127.0.0.1", setup["port"]), datagrams)
    finally:
        sender.close()
    assert sender.gso, "the kernel refused UDP GSO"


def _peer_datagrams(setup: dict[str, Any], count: int) -> list[bytes]:
    """The next ``count`` datagrams the reader handed the client's route."""
    received: list[bytes] = []
    while len(received) < count:
        received.extend(d for d, _src in setup["peer"].wait())
    return received


def test_gso_send_arrives_as_separate_datagrams_in_order(setup: dict[str, Any]) -> None:
    """send_many batches same-size runs (GSO); the reader splits GRO trains again."""
    # Ten of one size and a shorter last one: one GSO send.
    payloads = [_transport(bytes([n]) * 100) for n in range(10)] + [_transport(b"s" * 20)]
    _send_as_one_gso_run(setup, payloads)
    assert _peer_datagrams(setup, len(payloads)) == payloads
    assert setup["reader"].counters["gro_trains"] >= 1, "expected the run as one GRO train"


def test_a_train_that_mixes_clients_and_kinds_is_sorted_datagram_by_datagram(
    setup: dict[str, Any],
) -> None:
    """The train fast path follows the first datagram's client only while type and
    receiver index match; anything else in the train is sorted on its own."""
    ours = [_transport(bytes([n]) * 100) for n in range(8)]
    other_index = struct.pack("<II", 4, (0x12345 << 8) | 1) + bytes(108)
    handshake_like = b"\x01\x00\x00\x00" + bytes(112)
    train = [*ours[:3], other_index, *ours[3:6], handshake_like, *ours[6:]]
    assert len({len(d) for d in train}) == 1  # one size: one GSO send, one GRO train
    _send_as_one_gso_run(setup, train)
    assert _peer_datagrams(setup, len(ours)) == ours
    to_node: list[bytes] = []
    while len(to_node) < 2:
        to_node.extend(d for _local, _src, d in setup["node"].wait().batch)
    assert to_node == [other_index, handshake_like]
    assert setup["reader"].counters["gro_trains"] >= 1, "expected one GRO train"


def test_datagrams_over_1336_bytes_are_dropped_before_any_fast_path(
    setup: dict[str, Any],
) -> None:
    """As the 1.4 gateway (MAX_DATAGRAM_PAYLOAD, 1336 bytes): larger datagrams are dropped before
    any processing, also a known client's transport data and the segments of a GRO train."""
    oversized = _transport(b"o" * (1337 - 16))
    small = _transport(b"s" * 100)
    setup["send"](oversized)
    setup["send"](small)
    assert _peer_datagrams(setup, 1) == [small]
    assert setup["reader"].counters["oversized"] == 1
    train = [_transport(bytes([n]) * 1400) for n in range(4)] + [_transport(b"t" * 50)]
    _send_as_one_gso_run(setup, train)
    assert _peer_datagrams(setup, 1) == [train[-1]]  # only the short last one is small
    assert setup["reader"].counters["oversized"] == 5


def test_split_gro_cuts_a_train_at_the_segment_size() -> None:
    gro = [(17, 104, struct.pack("=i", 4))]
    assert split_gro(b"aaaabbbbcc", gro) == [b"aaaa", b"bbbb", b"cc"]
    assert split_gro(b"aaaa", gro) is None  # one datagram
    assert split_gro(b"aaaabbbb", []) is None  # no GRO control message
    assert split_gro(b"aaaabbbb", [(0, 8, bytes(12))]) is None  # IP_PKTINFO only


def test_stop_ends_the_reader_at_once_not_at_its_next_poll(setup: dict[str, Any]) -> None:
    # A reset joins the reader while the portal waits for the new key: no select timeout.
    reader = setup["reader"]
    started = time.monotonic()
    reader.stop()
    reader.join(5)
    assert not reader.is_alive()
    assert time.monotonic() - started < 0.5


def test_every_node_datagram_is_handed_over_on_the_readers_thread() -> None:
    # No mailbox between the reader and the node: to_node runs on the reader itself.
    sockets = UdpSockets(mark=False, ipv6=False)
    assert sockets.v4 is not None
    port = sockets.v4.getsockname()[1]
    seen: list[Datagrams] = []
    threads: set[str] = set()
    arrived = threading.Event()

    def to_node(message: Datagrams) -> None:
        seen.append(message)
        threads.add(threading.current_thread().name)
        if sum(len(m.batch) for m in seen) == 20:
            arrived.set()

    reader = UdpReader(sockets, to_node=to_node, peer_routes={}, index_shift=8)
    reader.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(20):
            sender.sendto(b"\x01\x00\x00\x00" + bytes([i]) * 144, ("127.0.0.1", port))
        assert arrived.wait(5)
        assert threads == {"UdpReader"}
        payloads = sorted(data[4] for m in seen for _, _, data in m.batch)
        assert payloads == list(range(20))
    finally:
        reader.stop()
        reader.join(5)
        sockets.close()
        sender.close()


def _host_limit(name: str) -> int:
    with open(f"/proc/sys/net/core/{name}") as limit:
        return int(limit.read())


def test_buffers_go_past_the_hosts_limit_with_cap_net_admin() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root (CAP_NET_ADMIN) for SO_RCVBUFFORCE")
    # More than net.core.rmem_max/wmem_max allow a plain SO_RCVBUF/SO_SNDBUF to get.
    size = max(_host_limit("rmem_max"), _host_limit("wmem_max")) + (1 << 20)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _set_buffers(sock, size)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * size
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * size
    sockets = UdpSockets(mark=False)
    try:
        granted = sockets.buffer_sizes()
        assert set(granted) == {"ipv4", "ipv6"}
        assert all(sizes == (2 * SOCKET_BUFFER_BYTES,) * 2 for sizes in granted.values())
    finally:
        sockets.close()


class RefusesForcedSizes:
    """A socket as an unprivileged process sees it: the FORCE options raise EPERM."""

    def __init__(self) -> None:
        self.set: dict[int, int] = {}

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if option in (SO_RCVBUFFORCE, SO_SNDBUFFORCE):
            raise PermissionError(1, "Operation not permitted")
        self.set[option] = value


def test_without_the_capability_buffers_fall_back_to_the_plain_options() -> None:
    sock = RefusesForcedSizes()
    _set_buffers(sock, 1 << 22)  # type: ignore[arg-type]
    assert sock.set == {socket.SO_RCVBUF: 1 << 22, socket.SO_SNDBUF: 1 << 22}


@pytest.fixture
def loopback_peer() -> Iterator[socket.socket]:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    yield peer
    peer.close()


def test_a_send_leaves_from_the_source_it_names(loopback_peer: socket.socket) -> None:
    """As rust/connlib/snownet/src/node.rs: a direct path sends from its base (IP_PKTINFO). Every
    127/8 address is local, so 127.0.0.2 is one of ours though the kernel would pick 127.0.0.1."""
    sockets = UdpSockets(mark=False, ipv6=False)
    assert sockets.v4 is not None
    port = sockets.v4.getsockname()[1]
    dst = loopback_peer.getsockname()
    try:
        sockets.send(dst, b"plain")
        assert loopback_peer.recvfrom(100) == (b"plain", ("127.0.0.1", port))
        sockets.send(dst, b"sourced", ("127.0.0.2", port))
        assert loopback_peer.recvfrom(100) == (b"sourced", ("127.0.0.2", port))
        run = [bytes([n]) * 50 for n in range(5)] + [b"short"]
        sockets.send_many(dst, run, ("127.0.0.2", port))  # one GSO send, same source
        assert [loopback_peer.recvfrom(100) for _ in run] == [(d, ("127.0.0.2", port))
                                                              for d in run]
        assert sockets.counters == {}
    finally:
        sockets.close()


def test_a_source_that_is_not_ours_falls_back_to_the_kernels_choice(
    loopback_peer: socket.socket,
) -> None:
    """The address may be gone (the host's network changed): the datagram still goes."""
    sockets = UdpSockets(mark=False, ipv6=False)
    assert sockets.v4 is not None
    port = sockets.v4.getsockname()[1]
    dst = loopback_peer.getsockname()
    try:
        sockets.send(dst, b"one", ("192.0.2.77", port))
        assert loopback_peer.recvfrom(100) == (b"one", ("127.0.0.1", port))
        sockets.send_many(dst, [b"a" * 20, b"b" * 20], ("192.0.2.77", port))
        assert [loopback_peer.recvfrom(100)[0] for _ in range(2)] == [b"a" * 20, b"b" * 20]
        assert sockets.counters["send_source_refused"] == 2
        assert sockets.gso, "a refused source is not a refused GSO"
    finally:
        sockets.close()


def test_wire_net_traces_are_logged_when_enabled(
    setup: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """``wire.net.recv``/``wire.net.send`` (named in the README) trace every datagram."""
    caplog.set_level(logging.DEBUG, logger="wire.net.recv")
    caplog.set_level(logging.DEBUG, logger="wire.net.send")
    setup["send"](b"\x00\x01garbage")
    setup["node"].wait()
    setup["send"](b"\x00\x01again")  # its wake-up comes after the reader re-read the level
    setup["node"].wait()
    sender = setup["relay"]
    setup["sockets"].send(sender, b"hello")
    setup["sockets"].send_many(sender, [b"a" * 40, b"b" * 40, b"c" * 20])
    recv = [r.getMessage() for r in caplog.records if r.name == "wire.net.recv"]
    send = [r.getMessage() for r in caplog.records if r.name == "wire.net.send"]
    port = setup["port"]
    assert recv[:2] == [
        f"recv 127.0.0.1:{sender[1]} -> 127.0.0.1:{port}: 9 bytes",
        f"recv 127.0.0.1:{sender[1]} -> 127.0.0.1:{port}: 7 bytes",
    ]
    assert send[0] == f"send * -> 127.0.0.1:{sender[1]}: 1 datagram(s), 5 bytes"
    assert f"send * -> 127.0.0.1:{sender[1]}: 3 datagram(s), 20/40 bytes" in send


def test_wire_net_traces_are_off_by_default(
    setup: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(OFF, logger="wire")  # as logsetup configures it (the suite uses DEBUG)
    setup["send"](b"\x00\x01garbage")
    setup["node"].wait()
    setup["send"](b"\x00\x01again")
    setup["node"].wait()
    assert setup["sockets"].trace is False
    setup["sockets"].send(setup["relay"], b"hello")
    assert not [r for r in caplog.records if r.name.startswith("wire.")]
