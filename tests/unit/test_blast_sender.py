"""The blast sender's packets: the bench's own handshake and its transport messages must be
exactly what the gateway's :class:`Tunnel` accepts, with the header fields in place."""

from __future__ import annotations

import ipaddress
import random
import socket
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from bench.blast import Initiator, Session
from bench.blast_sender import (
    MAX_GSO_BYTES,
    TICK_S,
    PlainBatch,
    Sender,
    TransportBatch,
    pad16,
    transport_message,
    udp_packet,
)
from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter
from gateway.wg.tunnel import DONE, Tunnel, WriteToNetwork, WriteToTunnel

PSK = b"\x05" * 32
SRC = ("10.203.0.2", 40000)


def ones_complement_sum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def gateway_and_session(rng: random.Random) -> tuple[Tunnel, Session]:
    """A gateway-side tunnel (responder) and a session made by :class:`Initiator`."""
    gateway = StaticKeyPair.generate(rng)
    client = StaticKeyPair.generate(rng)
    tunnel = Tunnel(static=gateway, peer_public=client.public, preshared_key=PSK,
                    local_index=0x12345600, rate_limiter=HandshakeRateLimiter(gateway.public, rng),
                    rng=rng, now=0.0, persistent_keepalive=None)
    initiator = Initiator(client, gateway.public, PSK, index=0xABCDEF01)
    response = tunnel.decapsulate(initiator.initiation(1_700_000_000.0), SRC, 0.0, 1.7e9)
    assert isinstance(response, WriteToNetwork)
    assert initiator.is_reply(response.datagram)
    session = initiator.complete(response.datagram)
    assert session is not None
    assert tunnel.owns_index(session.receiver)
    # The keepalive confirms the session (the gateway sends on it only after this).
    assert tunnel.decapsulate(session.seal(b""), SRC, 0.01, 1.7e9) is DONE
    assert tunnel.has_session
    return tunnel, session


def test_udp_packet_is_a_valid_1280_byte_ipv4_udp_packet() -> None:
    packet = udp_packet("100.80.0.1", "10.204.0.2", 41000, 7010, 1280)
    assert len(packet) == 1280
    assert packet[0] == 0x45 and packet[9] == 17
    assert struct.unpack("!H", packet[2:4])[0] == 1280
    assert ones_complement_sum(packet[:20]) == 0xFFFF  # header checksum
    assert ipaddress.IPv4Address(packet[12:16]) == ipaddress.IPv4Address("100.80.0.1")
    assert ipaddress.IPv4Address(packet[16:20]) == ipaddress.IPv4Address("10.204.0.2")
    sport, dport, length, _ = struct.unpack("!HHHH", packet[20:28])
    assert (sport, dport, length) == (41000, 7010, 1260)


def test_batch_messages_are_accepted_by_the_gateway_tunnel() -> None:
    tunnel, session = gateway_and_session(random.Random(3))
    packet = udp_packet("100.80.0.1", "10.204.0.2", 41000, 7010, 1280)
    batch = TransportBatch(session.send_key, session.receiver, session.counter, packet, 49)
    data = bytes(batch.fill(49))
    assert batch.size == 16 + 1280 + 16 and len(data) == 49 * batch.size
    assert 49 * batch.size <= MAX_GSO_BYTES
    for i in range(49):
        message = data[i * batch.size:(i + 1) * batch.size]
        assert message[:4] == b"\x04\x00\x00\x00"
        assert int.from_bytes(message[4:8], "little") == session.receiver
        assert int.from_bytes(message[8:16], "little") == session.counter + i
        result = tunnel.decapsulate(message, SRC, 0.02, 1.7e9)
        assert isinstance(result, WriteToTunnel), (i, result)
        assert result.packet == packet
    # The next fill continues the counters: the replay window accepts them too.
    follow = bytes(batch.fill(2))[:batch.size]
    assert int.from_bytes(follow[8:16], "little") == session.counter + 49
    assert isinstance(tunnel.decapsulate(follow, SRC, 0.03, 1.7e9), WriteToTunnel)
    assert tunnel.counters["replay"] == 0 and tunnel.counters["decrypt_failed"] == 0


def test_message_matches_the_plain_aead_with_the_counter_nonce() -> None:
    key = bytes(range(32))
    packet = udp_packet("100.80.0.1", "10.204.0.2", 1, 2, 1001)  # needs padding
    message = bytes(TransportBatch(key, 0x01020304, 7, packet, 1).fill(1))
    header, sealed = message[:16], message[16:]
    assert header == struct.pack("<IIQ", 4, 0x01020304, 7)
    plain = ChaCha20Poly1305(key).decrypt(b"\0\0\0\0" + (7).to_bytes(8, "little"), sealed, None)
    assert plain == pad16(packet) and len(plain) % 16 == 0 and plain[:1001] == packet
    assert message == transport_message(ChaCha20Poly1305(key), 0x01020304, 7, packet)
    with pytest.raises(Exception):  # noqa: B017 - any AEAD failure: the nonce is the counter
        ChaCha20Poly1305(key).decrypt(bytes(4) + (8).to_bytes(8, "little"), sealed, None)


def test_plain_batch_is_equal_sized_payloads() -> None:
    batch = PlainBatch(1252, 51)
    assert len(batch.fill(51)) == 51 * 1252 <= MAX_GSO_BYTES


class CostlyClock:
    """A fake clock on which each send takes ``call_s`` plus ``per_datagram_s`` each."""

    def __init__(self, call_s: float, per_datagram_s: float) -> None:
        self.now = 0.0
        self.call_s = call_s
        self.per_datagram_s = per_datagram_s
        self.sends: list[int] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds

    def send(self, count: int) -> None:
        self.sends.append(count)
        self.now += self.call_s + self.per_datagram_s * count


def run_costly(rate: float, seconds: float = 0.5) -> tuple[int, CostlyClock, Sender]:
    fake = CostlyClock(call_s=4e-6, per_datagram_s=2e-6)
    sender = Sender(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), ("127.0.0.1", 9),
                    PlainBatch(1252, 51).fill, 1252)
    sender.sock.close()  # never used: sends go to the fake
    sender.send = fake.send  # type: ignore[method-assign]
    sent, _ = sender.run(rate, seconds, clock=fake.clock, sleep=fake.sleep)
    return sent, fake, sender


@pytest.mark.parametrize("rate", [40_000, 120_000, 160_000])
def test_a_starved_sender_keeps_its_bursts_at_every_rate(rate: int) -> None:
    # A send costs 4 us + 2 us per datagram: chasing the schedule send by send would settle
    # at about rate * 4 us / (1 - rate * 2 us) datagrams per send (one at 160k/s).
    sent, fake, sender = run_costly(rate)
    assert sum(fake.sends) == sent
    assert all(0 < n <= sender.per_send for n in fake.sends)
    per_tick = rate * TICK_S
    mean = sent / len(fake.sends)
    # One burst per 1 ms tick, cut into per_send runs: the mean run is a tick's datagrams
    # over the runs needed for them (40k: 40 in one; 160k: 160 in 49+49+49+13).
    assert mean >= 0.9 * per_tick / -(-per_tick // sender.per_send)
    assert abs(sent - rate * 0.5) <= rate * TICK_S + sender.per_send  # on schedule


def test_an_overrun_tick_is_caught_up_by_the_next_burst_not_lost() -> None:
    # 600k/s: a tick's 600 datagrams take 1.25 ms to send, so every burst overruns its
    # tick. The sender must then run flat out in full runs (about 480k/s at this cost),
    # never pausing while behind and never falling back to one datagram per send.
    sent, fake, sender = run_costly(600_000, seconds=0.2)
    capacity = 1 / (fake.per_datagram_s + fake.call_s / sender.per_send)
    assert sent == pytest.approx(capacity * 0.2, rel=0.03)
    assert sent / len(fake.sends) > 0.95 * sender.per_send
