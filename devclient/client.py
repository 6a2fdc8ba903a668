"""The development client's IO loop: one thread, ``select`` over UDP, TUN, a wake-up pipe.

Everything protocol-related happens in :class:`~devclient.core.ClientCore`; this loop reads
what arrives, feeds it in with the current time, carries out what the core asks for, and
sleeps until the core's next deadline. The portal reader thread and signal handlers only
queue work and write one byte to the wake-up pipe, so the core is touched by this thread
alone. Observable state goes to ``out`` as one flushed line per event.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import select
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol, TextIO

from actors.io.ports import TunDevice
from actors.io.udp import (
    ANC_SIZE,
    SOL_UDP,
    UDP_GRO,
    GsoRefused,
    send_segmented,
    split_gro,
)
from devclient.control import Command, CommandFifo, Inject, Quit, Request, Roam, parse_command
from devclient.core import ClientCore, InterfaceConfig
from devclient.portal import PORTAL_ERROR, Deliver
from gateway.types import Address, format_address

log = logging.getLogger(__name__)

#: Datagrams / packets handled per readiness before the loop looks at the other fds.
BATCH = 64
READ_SIZE = 1316
UDP_READ_SIZE = 65535  # a GRO train


class PortalLink(Protocol):
    def start(self, deliver: Deliver) -> None: ...

    def send(self, event: str, payload: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


TunOpener = Callable[[InterfaceConfig], TunDevice]


class DevClient:
    """Owns the socket, the TUN and the core; ``run`` blocks until ``stop`` or ``quit``."""

    def __init__(
        self,
        core: ClientCore,
        *,
        portal: PortalLink,
        open_tun: TunOpener,
        bind_ip: str,
        out: TextIO,
        resources: list[str],
        commands: CommandFifo | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self._portal = portal
        self._open_tun = open_tun
        self._bind_ip = bind_ip
        self._out = out
        self._resources = resources
        self._commands = commands
        self._monotonic = monotonic
        self._wall = wall
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sock: socket.socket | None = None
        self._local: Address | None = None
        self._tun: TunDevice | None = None
        self._stopping = False
        self.exit_code = 0
        self.send_errors = 0
        self.send_counters: Counter[str] = Counter()  # losses inside GSO sends
        self._gso = True

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Ask the loop to end; safe from signal handlers and other threads."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _deliver(self, event: str, payload: Any) -> None:
        """Called by the portal reader thread."""
        self._inbox.put((event, payload))
        self._wake()

    def emit(self, line: str) -> None:
        self._out.write(line + "\n")
        self._out.flush()

    @property
    def local_address(self) -> Address | None:
        return self._local

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        try:
            self._bind()
            self.emit(f"KEY public_key={self.core.public_key}")
            now = self._monotonic()
            for resource in self._resources:
                self.core.request(resource, now)
            self._portal.start(self._deliver)
            self._flush()
            while not self._stopping:
                self._step()
        finally:
            self._close()
        return self.exit_code

    def _step(self) -> None:
        deadline = self.core.poll_timeout()
        now = self._monotonic()
        timeout = None if deadline is None else max(0.0, deadline - now)
        fds: list[Any] = [self._wake_r]
        if self._sock is not None:
            fds.append(self._sock)
        if self._tun is not None:
            fds.append(self._tun)
        if self._commands is not None:
            fds.append(self._commands)
        readable, _, _ = select.select(fds, [], [], timeout)
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
            self._drain_inbox()
        if self._sock is not None and self._sock in readable:
            self._read_socket()
        if self._tun is not None and self._tun in readable:
            self._read_tun()
        if self._commands is not None and self._commands in readable:
            for line in self._commands.read_lines():
                self._command_line(line)
        deadline = self.core.poll_timeout()
        now = self._monotonic()
        if deadline is not None and now >= deadline:
            self.core.handle_timeout(now, self._wall())
        self._flush()

    def _drain_inbox(self) -> None:
        while True:
            try:
                event, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if event == PORTAL_ERROR:
                reason = payload.get("reason", "unknown") if isinstance(payload, dict) else "?"
                self.emit(f"PORTAL_ERROR reason={reason}")
                self.exit_code = 1
                self._stopping = True
                return
            self.core.handle_portal_message(event, payload, self._monotonic(), self._wall())
            self._flush()

    def _read_socket(self) -> None:
        """Up to BATCH reads (GRO trains split), then one flush: syscalls dominate."""
        assert self._sock is not None and self._local is not None
        sock, local, handle = self._sock, self._local, self.core.handle_datagram
        now, wall = self._monotonic(), self._wall()
        try:
            for _ in range(BATCH):
                try:
                    data, ancdata, _flags, src = sock.recvmsg(UDP_READ_SIZE, ANC_SIZE)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:  # e.g. ICMP port unreachable surfaced as ECONNREFUSED
                    log.debug("recvfrom: %s", exc)
                    continue
                source = (src[0], src[1])
                train = split_gro(data, ancdata) if ancdata else None
                for datagram in train if train is not None else (data,):
                    handle(local, source, datagram, now, wall)
        finally:
            self._flush_network()

    def _read_tun(self) -> None:
        assert self._tun is not None
        tun, handle = self._tun, self.core.handle_tun_packet
        now, wall = self._monotonic(), self._wall()
        try:
            for _ in range(BATCH):
                try:
                    packet = tun.read(READ_SIZE)
                except OSError as exc:
                    log.warning("TUN read failed: %s", exc)
                    return
                if not packet:
                    return
                handle(packet, now, wall)
        finally:
            self._flush_network()

    def _command_line(self, line: str) -> None:
        try:
            command = parse_command(line)
        except ValueError as exc:
            self.emit(f"ERROR {exc}")
            return
        self.handle_command(command)

    def handle_command(self, command: Command) -> None:
        now = self._monotonic()
        if isinstance(command, Quit):
            self._stopping = True
        elif isinstance(command, Request):
            self.core.request(command.resource, now)
        elif isinstance(command, Inject):
            if not self.core.inject(command.resource, command.packet, now, self._wall()):
                self.emit(f"ERROR inject: no connection serves {command.resource}")
        elif isinstance(command, Roam):
            old = self._local
            self._bind()
            assert self._local is not None
            self.core.roam(self._local, now)
            log.info("roamed from %s to %s", old and format_address(old),
                     format_address(self._local))
        self._flush()

    # ------------------------------------------------------------------ output

    def _flush_network(self) -> None:
        sock = self._sock
        run: list[bytes] = []
        run_dst: Address | None = None
        while (tx := self.core.poll_transmit()) is not None:
            if sock is None:
                continue
            if tx.dst != run_dst and run:
                self._send_run(sock, run_dst, run)
                run = []
            run_dst = tx.dst
            run.append(tx.payload)
        if run and sock is not None:
            self._send_run(sock, run_dst, run)
        packets: list[bytes] = []
        while (packet := self.core.poll_tun()) is not None:
            packets.append(packet)
        if packets and self._tun is not None:
            self._write_tun(self._tun, packets)

    @staticmethod
    def _write_tun(tun: TunDevice, packets: list[bytes]) -> None:
        """One GSO frame per run of a flow where the device can (``LinuxTun.write_many``)."""
        write_many = getattr(tun, "write_many", None)
        if write_many is not None:
            _written, failed = write_many(packets)
            if failed:
                log.debug("TUN refused %d packet(s)", failed)
            return
        for packet in packets:
            try:
                tun.write(packet)
            except OSError as exc:
                log.debug("TUN write failed: %s", exc)

    def _send_run(self, sock: socket.socket, dst: Address | None, payloads: list[bytes]) -> None:
        """Datagrams to one destination, in order; same-size runs as one GSO send."""
        assert dst is not None
        if self._gso and len(payloads) > 1:
            try:
                send_segmented(sock, dst, payloads, self.send_counters)
                return
            except GsoRefused as exc:
                log.info("UDP GSO unavailable (%s); one datagram per send", exc)
                self._gso = False
                payloads = payloads[exc.sent:]
        for payload in payloads:
            try:
                sock.sendto(payload, dst)
            except OSError as exc:
                self.send_errors += 1
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                    log.debug("sendto %s: %s", format_address(dst), exc)

    def _flush(self) -> None:
        self._flush_network()
        while (push := self.core.poll_portal()) is not None:
            self._portal.send(*push)
        while (event := self.core.poll_event()) is not None:
            if isinstance(event, InterfaceConfig):
                self._configure(event)
            self.emit(event.line())
        self._flush_network()

    def _configure(self, config: InterfaceConfig) -> None:
        if self._tun is not None:
            self._tun.close()
        self._tun = self._open_tun(config)

    # ------------------------------------------------------------------ resources

    def _bind(self) -> None:
        if self._sock is not None:
            self._sock.close()
        family = socket.AF_INET6 if ":" in self._bind_ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # one recvmsg may then return a train
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        sock.bind((self._bind_ip, 0))
        name = sock.getsockname()
        self._sock = sock
        self._local = (name[0], name[1])
        self.core.set_local_address(self._local)
        self.emit(f"LISTEN addr={format_address(self._local)}")

    def _close(self) -> None:
        self._portal.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._tun is not None:
            self._tun.close()
            self._tun = None
        if self._commands is not None:
            self._commands.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
