"""coturn (Debian ``turnserver``) started by tests on loopback as a stand-in Firezone relay.

Readiness is probed with raw STUN Binding requests built here (20 bytes; no dependency on
our own codec so this fixture also serves the codec's interop tests).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import random
import secrets
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MAGIC_COOKIE = 0x2112A442


def _free_udp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def rest_credentials(secret: str, user: str, ttl: int = 3600) -> tuple[str, str]:
    """TURN REST credentials as coturn's ``--use-auth-secret`` expects them."""
    username = f"{int(time.time()) + ttl}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


@dataclass
class CoturnServer:
    """A coturn process on 127.0.0.1 (and ::1 when ``ipv6``)."""

    workdir: Path
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    ipv6: bool = False
    listen_ip: str = "127.0.0.1"
    port: int = 0
    min_port: int = 0
    max_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()
    #: Run inside this network namespace (listen_ip must then be an address there).
    netns: str | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_ip, self.port)

    @property
    def log_path(self) -> Path:
        return self.workdir / "turnserver.log"

    def credentials(self, user: str = "gateway", ttl: int = 3600) -> tuple[str, str]:
        return rest_credentials(self.secret, user, ttl)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout: float = 15.0) -> CoturnServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            # A namespace of our own has no other listeners: any port is free there.
            in_ns = self.netns is not None
            self.port = random.randrange(20000, 30000) if in_ns else _free_udp_port(self.listen_ip)
        self.min_port = random.randrange(50000, 63900)
        self.max_port = self.min_port + 99
        listen = [f"--listening-ip={self.listen_ip}", f"--relay-ip={self.listen_ip}"]
        if self.ipv6:
            listen += ["--listening-ip=::1", "--relay-ip=::1"]
        args = [
            "turnserver", "-n", *listen, f"--listening-port={self.port}",
            f"--min-port={self.min_port}", f"--max-port={self.max_port}",
            "--no-tls", "--no-dtls", "--no-tcp", "--no-cli", "--no-rfc5780",
            "--log-file=stdout", "--simple-log", "--no-software-attribute",
            f"--pidfile={self.workdir / 'turnserver.pid'}", f"--userdb={self.workdir / 'turndb'}",
            "--realm=firezone", "--fingerprint", "--no-multicast-peers", "--allow-loopback-peers",
            "-v", "--use-auth-secret", f"--static-auth-secret={self.secret}", *self.extra_args,
        ]
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        sent: set[bytes] = set()
        deadline = time.monotonic() + timeout
        if self.netns:
            from devstack.netns import in_netns

            probe = in_netns(self.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        else:
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with probe as sock:
            sock.settimeout(0.05)
            while self.proc.poll() is None and time.monotonic() < deadline:
                tid = os.urandom(12)
                sent.add(tid)
                sock.sendto(struct.pack("!HHI", 0x0001, 0, MAGIC_COOKIE) + tid, self.address)
                with contextlib.suppress(TimeoutError, ConnectionRefusedError):
                    reply = sock.recv(2048)
                    if reply[:2] == b"\x01\x01" and reply[8:20] in sent:
                        return
        self.stop()
        raise RuntimeError(f"turnserver not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
