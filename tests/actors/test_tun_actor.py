"""TunActor wiring on a fake device: batching, routing, drops, failing clients, writer, stop."""

from __future__ import annotations

import errno
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from actors.logsetup import OFF
from actors.tun import (
    ConfigureInterface,
    GetTunStats,
    GetTunWriter,
    RegisterClient,
    TunActor,
    TunWriter,
    UnregisterClient,
)
from tests.support.fake_tun import FakeTun, udp_ipv4, udp_ipv6

TIMEOUT = 2.0
CLIENT_V4, CLIENT_V6 = "100.64.0.2", "fd00:2021:1111::2"
OTHER_V4, OTHER_V6 = "100.64.0.3", "fd00:2021:1111::3"
RESOURCE_V4, RESOURCE_V6 = "10.0.0.1", "2001:db8::1"


def v4(n: int, dst: str = CLIENT_V4) -> bytes:
    return udp_ipv4(RESOURCE_V4, dst, n.to_bytes(2, "big"))


def v6(n: int, dst: str = CLIENT_V6) -> bytes:
    return udp_ipv6(RESOURCE_V6, dst, n.to_bytes(2, "big"))


class Recorder:
    """What a recording peer received, with a way to wait for it."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self._changed = threading.Condition()

    def add(self, packets: list[bytes]) -> None:
        with self._changed:
            self.batches.append(packets)
            self._changed.notify_all()

    def wait_batches(self, count: int) -> list[list[bytes]]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.batches) >= count, TIMEOUT), (
                f"got {len(self.batches)} of {count} batches"
            )
            return list(self.batches)


class Client:
    """Stands in for a PeerSession: its ``deliver`` records (or fails on) each batch."""

    def __init__(self, ipv4: str, ipv6: str, *, fail: bool = False) -> None:
        self.id = uuid.uuid4()
        self.ipv4, self.ipv6 = ipv4, ipv6
        self.recorder = Recorder()
        self.fail = fail
        self.threads: set[str] = set()

    def deliver(self, packets: list[bytes]) -> None:
        self.threads.add(threading.current_thread().name)
        self.recorder.add(packets)
        if self.fail:
            raise RuntimeError("a bug in this client's data path")

    def register(self, tun: pykka.ActorRef[Any], ipv4: str | None = None) -> None:
        message = RegisterClient(self.id, ipv4 or self.ipv4, self.ipv6, self.deliver)
        tun.ask(message, timeout=TIMEOUT)  # ask: handled before the test goes on


class KernelCountingTun(FakeTun):
    """A device that knows what the kernel dropped on the way to us (as LinuxTun does)."""

    def __init__(self, drops: int) -> None:
        super().__init__()
        self.drops = drops

    def kernel_drops(self) -> int | None:
        return self.drops


@pytest.fixture
def device() -> Iterator[FakeTun]:
    fake = FakeTun()
    yield fake
    fake.close()


@pytest.fixture
def tun(device: FakeTun) -> pykka.ActorRef[Any]:
    return TunActor.start(device_factory=lambda: device)


def stats(tun: pykka.ActorRef[Any]) -> dict[str, Any]:
    result = tun.ask(GetTunStats(), timeout=TIMEOUT)
    assert isinstance(result, dict)
    return result


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "TunReader"]


def test_packets_for_a_client_arrive_as_one_batch_in_order(
    tun: pykka.ActorRef[Any], device: FakeTun
) -> None:
    client = Client(CLIENT_V4, CLIENT_V6)
    client.register(tun)
    packets = [v4(0), v6(1), v4(2), v6(3), v4(4), v6(5), v4(6), v6(7), v4(8), v6(9)]

    device.inject(packets)

    assert client.recorder.wait_batches(1) == [packets]
    assert stats(tun)["rx_packets"] == 10
    assert client.threads == {"TunReader"}, "delivered on the reader thread, no mailbox"


def test_packets_are_grouped_per_client(tun: pykka.ActorRef[Any], device: FakeTun) -> None:
    first, second = Client(CLIENT_V4, CLIENT_V6), Client(OTHER_V4, OTHER_V6)
    first.register(tun)
    second.register(tun)
    mixed = [v4(0), v4(1, OTHER_V4), v6(2), v6(3, OTHER_V6), v4(4, OTHER_V4), v4(5)]

    device.inject(mixed)

    assert first.recorder.wait_batches(1) == [[mixed[0], mixed[2], mixed[5]]]
    assert second.recorder.wait_batches(1) == [[mixed[1], mixed[3], mixed[4]]]


def test_a_batch_is_capped_at_batch_size(device: FakeTun) -> None:
    tun = TunActor.start(device_factory=lambda: device, batch_size=4)
    client = Client(CLIENT_V4, CLIENT_V6)
    client.register(tun)
    packets = [v4(n) for n in range(10)]

    device.inject(packets)

    assert client.recorder.wait_batches(3) == [packets[0:4], packets[4:8], packets[8:10]]


def test_destinations_outside_the_peer_ranges_or_without_client_are_dropped(
    tun: pykka.ActorRef[Any], device: FakeTun
) -> None:
    client = Client(CLIENT_V4, CLIENT_V6)
    client.register(tun)
    outside = [
        v4(0, "8.8.8.8"),
        v4(1, "100.96.0.1"),  # just above 100.64.0.0/11 (the client proxy range)
        v4(2, "100.63.255.255"),
        v6(3, "ff02::16"),  # MLD report the kernel sends on the TUN
        v6(4, "fd00:2021:1111::20:0"),  # just above fd00:2021:1111::/107
        v6(5, "fd00:2021:1111:8000::1"),
    ]
    unknown = [v4(6, "100.95.255.255"), v6(7, "fd00:2021:1111::1f:ffff")]
    wanted = v4(8)

    device.inject([*outside, *unknown, wanted])

    assert client.recorder.wait_batches(1) == [[wanted]]
    dropped = stats(tun)["dropped"]
    assert dropped["not_peer_range"] == len(outside)
    assert dropped["no_client"] == len(unknown)


def test_the_kernels_drops_are_reported_when_the_device_counts_them() -> None:
    plain, counting = FakeTun(), KernelCountingTun(17)
    try:
        assert "kernel" not in stats(TunActor.start(device_factory=lambda: plain))["dropped"]
        assert stats(TunActor.start(device_factory=lambda: counting))["dropped"]["kernel"] == 17
    finally:
        pykka.ActorRegistry.stop_all()
        plain.close()
        counting.close()


def test_malformed_packets_are_dropped_and_the_reader_keeps_going(
    tun: pykka.ActorRef[Any], device: FakeTun
) -> None:
    client = Client(CLIENT_V4, CLIENT_V6)
    client.register(tun)
    malformed = [b"\x00", b"\x45" * 19, b"\x60" * 39, b"\xff" * 60, b"\x10" * 40]

    device.inject(malformed)
    device.inject([v4(1)])

    assert client.recorder.wait_batches(1) == [[v4(1)]]
    assert stats(tun)["dropped"]["not_ip"] == len(malformed)
    assert [t.is_alive() for t in reader_threads()] == [True]


def test_unregister_stops_delivery(tun: pykka.ActorRef[Any], device: FakeTun) -> None:
    client = Client(CLIENT_V4, CLIENT_V6)
    client.register(tun)
    device.inject([v4(1)])
    client.recorder.wait_batches(1)

    tun.ask(UnregisterClient(client.id), timeout=TIMEOUT)
    witness = Client(OTHER_V4, OTHER_V6)
    witness.register(tun)
    device.inject([v4(2), v6(3), v4(4, OTHER_V4)])

    witness.recorder.wait_batches(1)
    assert client.recorder.batches == [[v4(1)]]
    assert stats(tun)["dropped"]["no_client"] == 2


def test_unregister_leaves_addresses_that_moved_to_another_client(
    tun: pykka.ActorRef[Any], device: FakeTun
) -> None:
    old, new = Client(CLIENT_V4, CLIENT_V6), Client(CLIENT_V4, OTHER_V6)
    old.register(tun)
    new.register(tun)  # takes CLIENT_V4 over

    tun.ask(UnregisterClient(old.id), timeout=TIMEOUT)
    device.inject([v4(1), v6(2, OTHER_V6), v6(3, CLIENT_V6)])

    assert new.recorder.wait_batches(1) == [[v4(1), v6(2, OTHER_V6)]]
    assert old.recorder.batches == []
    assert stats(tun)["dropped"]["no_client"] == 1


def test_registering_again_adds_addresses(tun: pykka.ActorRef[Any], device: FakeTun) -> None:
    client = Client(CLIENT_V4, CLIENT_V6)
    client.register(tun)
    client.register(tun, ipv4="100.64.0.9")

    device.inject([v4(1), v4(2, "100.64.0.9")])

    assert client.recorder.wait_batches(1) == [[v4(1), v4(2, "100.64.0.9")]]


def test_invalid_registration_is_ignored(tun: pykka.ActorRef[Any]) -> None:
    client = Client(CLIENT_V4, CLIENT_V6)
    client.register(tun, ipv4="not-an-ip")
    assert tun.is_alive()


def test_a_failing_client_costs_its_batch_not_the_reader(
    tun: pykka.ActorRef[Any], device: FakeTun
) -> None:
    broken = Client(CLIENT_V4, CLIENT_V6, fail=True)
    witness = Client(OTHER_V4, OTHER_V6)
    broken.register(tun)
    witness.register(tun)

    device.inject([v4(1), v6(2), v4(3, OTHER_V4)])
    assert witness.recorder.wait_batches(1) == [[v4(3, OTHER_V4)]]
    device.inject([v4(4, OTHER_V4)])

    assert witness.recorder.wait_batches(2)[1] == [v4(4, OTHER_V4)]
    assert broken.recorder.batches == [[v4(1), v6(2)]]
    assert stats(tun)["dropped"]["peer_error"] == 2
    assert [t.is_alive() for t in reader_threads()] == [True]


def test_writer_writes_batches_in_order(tun: pykka.ActorRef[Any], device: FakeTun) -> None:
    writer = tun.ask(GetTunWriter(), timeout=TIMEOUT)
    assert isinstance(writer, TunWriter)
    first, second = [v4(n) for n in range(5)], [v6(n) for n in range(3)]

    assert writer.write_batch(first) == 5
    assert writer.write_batch(iter(second)) == 3

    assert device.wait_written(8) == first + second
    assert stats(tun)["tx_packets"] == 8


def test_writer_drops_refused_packets_and_keeps_writing(
    tun: pykka.ActorRef[Any], device: FakeTun
) -> None:
    writer = tun.ask(GetTunWriter(), timeout=TIMEOUT)
    assert isinstance(writer, TunWriter)
    device.fail_next_writes(
        OSError(errno.EAGAIN, "again"),
        OSError(errno.ENOBUFS, "no buffers"),
        OSError(errno.EINVAL, "invalid"),
        OSError(errno.EIO, "io"),
    )
    packets = [v4(n) for n in range(6)]

    assert writer.write_batch(packets) == 2

    assert device.written == packets[4:]
    current = stats(tun)
    assert current["tx_packets"] == 2
    assert current["dropped"]["write_error"] == 4


def test_concurrent_writers_never_interleave_batches() -> None:
    device = FakeTun()
    writer = TunWriter(device)
    writers, batches, size = 4, 30, 40
    start = threading.Barrier(writers)

    def produce(index: int) -> None:
        start.wait()
        for batch in range(batches):
            writer.write_batch(
                udp_ipv4(RESOURCE_V4, CLIENT_V4, bytes([index, batch, n])) for n in range(size)
            )

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 5)

    payloads = [packet[28:] for packet in device.written]
    assert len(payloads) == writers * batches * size
    for offset in range(0, len(payloads), size):
        chunk = payloads[offset : offset + size]
        assert {p[:2] for p in chunk} == {chunk[0][:2]}, "a batch was interleaved"
        assert [p[2] for p in chunk] == list(range(size)), "a batch was reordered"


def test_writes_after_close_are_dropped_and_counted() -> None:
    device = FakeTun()
    writer = TunWriter(device)
    writer.close()

    assert writer.write_batch([v4(1), v4(2)]) == 0
    assert writer.dropped["closed"] == 2
    assert device.written == []


def test_stop_closes_the_device_and_the_reader_thread(device: FakeTun) -> None:
    tun = TunActor.start(device_factory=lambda: device)
    writer = tun.ask(GetTunWriter(), timeout=TIMEOUT)
    assert isinstance(writer, TunWriter)
    assert len(reader_threads()) == 1

    tun.stop(timeout=TIMEOUT)

    assert device.closed
    assert device.close_calls == 1
    assert reader_threads() == []
    assert writer.write_batch([v4(1)]) == 0


def test_a_device_that_cannot_be_opened_stops_the_actor() -> None:
    def refuse() -> FakeTun:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    tun = TunActor.start(device_factory=refuse)

    assert tun.actor_stopped.wait(TIMEOUT)
    with pytest.raises(pykka.ActorDeadError):
        tun.ask(GetTunStats(), timeout=TIMEOUT)
    assert reader_threads() == []


@pytest.mark.parametrize("failure", ["eof", "read_error", "reader_bug"])
def test_a_failing_device_stops_the_actor_and_closes_it(device: FakeTun, failure: str) -> None:
    tun = TunActor.start(device_factory=lambda: device)
    tun.ask(GetTunStats(), timeout=TIMEOUT)
    if failure == "eof":
        device.inject_eof()
    elif failure == "read_error":
        device.inject_read_error(OSError(errno.EBADFD, "File descriptor in bad state"))
    else:
        device.inject_read_error(RuntimeError("a bug in the read path"))

    assert tun.actor_stopped.wait(TIMEOUT)
    # Pykka flags the actor stopped before on_failure has cleaned up.
    assert device.wait_closed(TIMEOUT)
    assert reader_threads() == []  # joined before the device was closed


def test_configuration_runs_off_the_actor_thread_and_keeps_only_the_newest(
    device: FakeTun,
) -> None:
    calls: list[tuple[str, str, str]] = []
    first_started, release_first, done = threading.Event(), threading.Event(), threading.Event()

    def configure(ipv4: str, ipv6: str) -> None:
        calls.append((ipv4, ipv6, threading.current_thread().name))
        if len(calls) == 1:
            first_started.set()
            assert release_first.wait(TIMEOUT)
        elif ipv4 == "100.64.0.30":
            done.set()

    tun = TunActor.start(device_factory=lambda: device, configure=configure)
    tun.tell(ConfigureInterface("100.64.0.1", "fd00:2021:1111::1"))
    assert first_started.wait(TIMEOUT)
    # The actor still answers while configuration is in progress.
    tun.ask(GetTunStats(), timeout=TIMEOUT)
    tun.tell(ConfigureInterface("100.64.0.20", "fd00:2021:1111::20"))
    tun.ask(ConfigureInterface("100.64.0.30", "fd00:2021:1111::30"), timeout=TIMEOUT)
    release_first.set()

    assert done.wait(TIMEOUT)
    assert calls == [
        ("100.64.0.1", "fd00:2021:1111::1", "TunConfigure"),
        ("100.64.0.30", "fd00:2021:1111::30", "TunConfigure"),
    ]


def test_a_failing_configuration_is_logged_not_fatal(
    device: FakeTun, caplog: pytest.LogCaptureFixture
) -> None:
    attempted = threading.Event()

    def configure(ipv4: str, ipv6: str) -> None:
        attempted.set()
        raise OSError(errno.ENODEV, "No such device")

    tun = TunActor.start(device_factory=lambda: device, configure=configure)
    tun.tell(ConfigureInterface("100.64.0.1", "fd00:2021:1111::1"))

    assert attempted.wait(TIMEOUT)
    tun.stop(timeout=TIMEOUT)  # joins the worker, so the log line is there
    assert "Configuring the TUN interface failed" in caplog.text


def test_wire_dev_traces_every_packet_when_enabled(
    tun: pykka.ActorRef[Any], device: FakeTun, caplog: pytest.LogCaptureFixture
) -> None:
    """``wire.dev.recv``/``wire.dev.send`` (named in the README) trace each packet."""
    caplog.set_level(logging.DEBUG, logger="wire.dev")
    client = Client(CLIENT_V4, CLIENT_V6)
    client.register(tun)
    device.inject([v4(0), v6(1)])
    client.recorder.wait_batches(1)
    writer = tun.ask(GetTunWriter(), timeout=TIMEOUT)
    assert writer.write_batch(iter([v6(2)])) == 1  # a generator is traced and written
    recv = [r.getMessage() for r in caplog.records if r.name == "wire.dev.recv"]
    send = [r.getMessage() for r in caplog.records if r.name == "wire.dev.send"]
    assert recv == [
        f"recv {RESOURCE_V4} -> {CLIENT_V4} protocol 17, {len(v4(0))} bytes",
        f"recv {RESOURCE_V6} -> {CLIENT_V6} protocol 17, {len(v6(1))} bytes",
    ]
    assert send == [f"send {RESOURCE_V6} -> {CLIENT_V6} protocol 17, {len(v6(2))} bytes"]
    assert device.wait_written(1) == [v6(2)]


def test_wire_dev_traces_are_off_by_default(
    tun: pykka.ActorRef[Any], device: FakeTun, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(OFF, logger="wire")  # as logsetup configures it (the suite uses DEBUG)
    client = Client(CLIENT_V4, CLIENT_V6)
    client.register(tun)
    device.inject([v4(0)])
    client.recorder.wait_batches(1)
    tun.ask(GetTunWriter(), timeout=TIMEOUT).write_batch([v4(1)])
    assert not [r for r in caplog.records if r.name.startswith("wire.")]
