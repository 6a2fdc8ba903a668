"""The whole product in namespaces: development portal, coturn, the gateway, dev clients.

The portal runs in the test process on a socket opened inside the portal namespace; coturn,
the gateway and the clients are subprocesses under ``ip netns exec``. Everything is
stopped and removed by :meth:`Stack.close`, and logs are attached to failures.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.control import control_request
from devportal.config import parse_config
from devportal.server import DevPortal
from devstack.coturn import CoturnServer
from devstack.netns import in_netns
from devstack.topology import (
    ADDRESSES,
    RESOURCE,
    RESOURCE_NET,
    Topology,
    python,
    topology,
)

GATEWAY_TOKEN = "e2e-gateway-token-SFMyNTY"
CLIENT_TOKEN = "e2e-client-token"
#: A second client ("bob", same resources as alice), for tests where clients must not
#: affect each other; its namespace is made by ``Stack.start_client(role="client2")``.
CLIENT2_TOKEN = "e2e-client-token-bob"
CIDR_RESOURCE = uuid.UUID("0b3c6d7e-1f2a-4b5c-8d9e-0f1a2b3c4d5e")
DNS_RESOURCE = uuid.UUID("1c4d7e8f-2a3b-4c5d-9e0f-1a2b3c4d5e6f")
FILTERED_RESOURCE = uuid.UUID("2d5e8f9a-3b4c-4d5e-af10-2b3c4d5e6f70")
UNAUTHORIZED_RESOURCE = uuid.UUID("3e6f9a0b-4c5d-4e6f-b021-3c4d5e6f7a81")
RELAY_ID = uuid.UUID("4f7a0b1c-5d6e-4f70-8132-4d5e6f7a8b92")
DNS_NAME = "web.corp.test"
REPO = Path(__file__).resolve().parent.parent  # the repository root (devstack/..)


def portal_config(relay_port: int, secret: str, *, expires_in: float | None = None) -> Any:
    policy: dict[str, Any] = {
        "client": "alice",
        "resources": [str(CIDR_RESOURCE), str(DNS_RESOURCE), str(FILTERED_RESOURCE)],
    }
    if expires_in is not None:
        policy["expires_in"] = expires_in
    return parse_config({
        "account": "e2e",
        "gateway_tokens": [GATEWAY_TOKEN],
        "clients": [{"name": "alice", "token": CLIENT_TOKEN},
                    {"name": "bob", "token": CLIENT2_TOKEN}],
        "resources": [
            {"id": str(CIDR_RESOURCE), "type": "cidr", "address": RESOURCE_NET, "name": "lan"},
            {"id": str(DNS_RESOURCE), "type": "dns", "address": "*.corp.test", "name": "corp"},
            # The same host as a /32 with a filter: only UDP 7000 is allowed.
            {"id": str(FILTERED_RESOURCE), "type": "cidr", "address": "10.204.0.3/32",
             "name": "filtered", "filters": {"udp": [7000]}},
            {"id": str(UNAUTHORIZED_RESOURCE), "type": "cidr", "address": "10.204.0.4/32",
             "name": "not for alice"},
        ],
        "policies": [policy, {**policy, "client": "bob"}],
        "relays": [{"id": str(RELAY_ID), "addrs": [f"{ADDRESSES['relay']}:{relay_port}"],
                    "secret": secret}],
    })


@dataclass
class Proc:
    """A subprocess whose stdout lines are collected by a thread (for waiting on them)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def start_collecting(self) -> None:
        def pump() -> None:
            assert self.popen.stdout is not None
            with open(self.log_path, "ab") as log:
                for raw in iter(self.popen.stdout.readline, b""):
                    log.write(raw)
                    log.flush()
                    with self._cond:
                        self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                        self._cond.notify_all()
            with self._cond:
                self._cond.notify_all()

        threading.Thread(target=pump, name=f"collect-{self.name}", daemon=True).start()

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = 30.0,
                  after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    if predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.popen.poll() is not None and not remaining):
                    raise AssertionError(
                        f"{self.name}: no matching line in {timeout}s\n{self.tail()}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


@dataclass
class Stack:
    topo: Topology
    tmp: Path
    coturn: CoturnServer
    portal: DevPortal | None = None
    gateway: Proc | None = None
    clients: list[Proc] = field(default_factory=list)
    servers: list[Proc] = field(default_factory=list)
    portal_port: int = 18081
    expires_in: float | None = None

    # ----------------------------------------------------------------- portal

    def start_portal(self) -> DevPortal:
        config = portal_config(self.coturn.port, self.coturn.secret, expires_in=self.expires_in)

        def bind() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ADDRESSES["portal"], self.portal_port))
            sock.listen(64)
            return sock

        if self.portal is None:
            self.portal = DevPortal(config)
        self.portal.start(sock=in_netns(self.topo.ns("portal"), bind))
        return self.portal

    @property
    def portal_url(self) -> str:
        return f"ws://{ADDRESSES['portal']}:{self.portal_port}"

    # ----------------------------------------------------------------- gateway

    @property
    def control_socket(self) -> str:
        return str(self.tmp / "gw" / "control.sock")

    def start_gateway(
        self, *extra: str, log_filter: str | None = "debug,pykka=info,wire=info",
        config: Path | None = None, nat_ports: tuple[int, int] | None = None,
    ) -> Proc:
        """``python -m actors.cli run`` in the gateway namespace (token from the env).

        ``log_filter=None`` leaves RUST_LOG unset so a config file's filter applies.
        ``nat_ports`` (test only) narrows the DNS-resource NAT's port range, so that a
        test can exhaust it with a few flows (``devstack/narrow_nat.py``).
        """
        env = dict(os.environ)
        env.update({
            "FIREZONE_TOKEN": GATEWAY_TOKEN,
            "FIREZONE_ID": "e2e-gateway-1",
            "FIREZONE_NAME": "e2e-gateway",
            "FIREZONE_API_URL": self.portal_url,
            "PYTHONPATH": str(REPO),
        })
        env.pop("RUST_LOG", None)
        if log_filter is not None:
            env["RUST_LOG"] = log_filter
        (self.tmp / "gw").mkdir(exist_ok=True, mode=0o700)
        if config is None:
            config = self.tmp / "none.yaml"
            config.write_text("{}\n")
        entry = ["actors.cli"] if nat_ports is None else [
            "devstack.narrow_nat", str(nat_ports[0]), str(nat_ports[1])]
        args = [
            python(), "-m", *entry, "run",
            "--health-check-addr", "127.0.0.1:18080",
            "--control-socket", self.control_socket,
            "--config", str(config),
            *extra,
        ]
        popen = self.topo.popen("gateway", args, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        self.gateway = Proc("gateway", popen, self.tmp / "gateway.log")
        self.gateway.start_collecting()
        return self.gateway

    def start_gateway_with_config(self, config: Path) -> Proc:
        return self.start_gateway(log_filter=None, config=config)

    @property
    def python(self) -> str:
        return python()

    def gateway_status(self) -> dict[str, Any]:
        return control_request(self.control_socket, "status")

    def wait_gateway_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        """Joined to the portal and at least one relay allocated."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                status = self.gateway_status()
                if status["portal"]["state"] == "joined" and any(
                    r.get("relay_addresses") for r in status.get("relays", [])
                ):
                    return status
            time.sleep(0.1)
        gw = self.gateway.tail() if self.gateway else ""
        raise AssertionError(f"gateway not ready: {status}\n{gw}")

    # ----------------------------------------------------------------- clients

    def start_client(self, *resources: uuid.UUID, extra: tuple[str, ...] = (),
                     role: str = "client") -> Proc:
        """Client alice in the client namespace, or (``role="client2"``) bob in his own."""
        fifo = self.tmp / f"client{len(self.clients)}.cmd"
        os.mkfifo(fifo)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if role != "client" and role not in self.topo.names:
            self.topo.add_wan_host(role)
        token, name = (CLIENT_TOKEN, "alice") if role == "client" else (CLIENT2_TOKEN, "bob")
        args = [
            python(), "-m", "devclient", "--portal", self.portal_url, "--token", token,
            "--name", name, "--bind", ADDRESSES[role], "--commands", str(fifo),
            *[a for r in resources for a in ("--resource", str(r))], *extra,
        ]
        popen = self.topo.popen(role, args, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        name = f"client{len(self.clients)}"
        proc = Proc(name, popen, self.tmp / f"{name}.log")
        proc.start_collecting()
        proc.fifo = fifo  # type: ignore[attr-defined]
        self.clients.append(proc)
        return proc

    def client_command(self, client: Proc, command: str) -> None:
        fd = os.open(client.fifo, os.O_WRONLY)  # type: ignore[attr-defined]
        try:
            os.write(fd, (command + "\n").encode())
        finally:
            os.close(fd)

    # ----------------------------------------------------------------- resource side

    def start_resource_servers(self) -> None:
        """HTTP on 10.204.0.2:8080 and UDP echo on 10.204.0.2:7000 (and .3 for filters)."""
        for ip in (RESOURCE, "10.204.0.3", "10.204.0.4"):
            self.topo.run("resource", "ip", "addr", "add", f"{ip}/32", "dev", "eth0", check=False)
        http = self.topo.popen(
            "resource", [python(), "-m", "http.server", "--bind", "0.0.0.0", "8080"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(self.tmp),
        )
        (self.tmp / "index.html").write_text("hello through the tunnel\n")
        echo = self.topo.popen(
            "resource", [python(), "-c", UDP_ECHO], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for name, popen in (("http", http), ("udp-echo", echo)):
            proc = Proc(name, popen, self.tmp / f"{name}.log")
            proc.start_collecting()
            self.servers.append(proc)
        self.servers[1].wait_line(lambda line: "ready" in line, timeout=10)

    def udp_echo(self, ip: str, port: int, payload: bytes, timeout: float = 2.0,
                 role: str = "client") -> bytes | None:
        """Send a datagram from a client namespace (a new source port, so a new flow each
        time) and return the echo (None on loss)."""

        def exchange() -> bytes | None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(payload, (ip, port))
                ready, _, _ = select.select([sock], [], [], timeout)
                return sock.recv(2048) if ready else None

        return in_netns(self.topo.ns(role), exchange)

    def resource_received(self, text: str) -> bool:
        """Whether the resource's UDP echo server ever got a datagram containing ``text``."""
        echo = next(p for p in self.servers if p.name == "udp-echo")
        return any(text in line for line in echo.lines)

    def http_get(self, url: str, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
        return self.topo.run("client", "curl", "-sS", "--max-time", str(timeout), url,
                             check=False)

    # ----------------------------------------------------------------- teardown

    def logs(self) -> str:
        parts = []
        for proc in [self.gateway, *self.clients]:
            if proc is not None:
                parts.append(f"----- {proc.name} -----\n{proc.tail(80)}")
        parts.append(f"----- coturn -----\n{self.coturn.log_tail(20)}")
        return "\n".join(parts)

    def close(self) -> None:
        for proc in [*self.clients, self.gateway, *self.servers]:
            if proc is not None:
                proc.stop()
        if self.portal is not None:
            with contextlib.suppress(Exception):
                self.portal.stop()
        self.coturn.stop()


UDP_ECHO = """
import socket
socks = []
for ip in ("10.204.0.2", "10.204.0.3", "10.204.0.4"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 7000))
    socks.append(s)
    t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    t.bind((ip, 7001))
    socks.append(t)
print("ready", flush=True)
import select
while True:
    for s in select.select(socks, [], [])[0]:
        data, src = s.recvfrom(4096)
        print("got", data.decode(errors="replace"), "from", src[0], flush=True)
        s.sendto(data, src)
"""


@contextlib.contextmanager
def stack(tmp: Path, *, expires_in: float | None = None) -> Iterator[Stack]:
    with topology() as topo:
        coturn = CoturnServer(tmp / "coturn", netns=topo.ns("relay"),
                              listen_ip=ADDRESSES["relay"])
        coturn.start()
        built = Stack(topo=topo, tmp=tmp, coturn=coturn, expires_in=expires_in)
        try:
            yield built
        finally:
            built.close()
