"""The benchmark network: the e2e namespaces, the gateway, a dev client, a wireguard-go pair.

::

    client 10.203.0.2 ── bridge ── gateway 10.203.0.3 ── lan0 10.204.0.1 ── resource 10.204.0.2

Three paths from the client namespace to the resource, chosen by one /32 route in the
client namespace so that every configuration runs against the same processes:

* ``routed``: ``10.204.0.2/32 via 10.203.0.3``: plain kernel forwarding (the ceiling);
* ``wireguard-go``: ``10.204.0.2/32 dev wgc…``: wireguard-go in the client and in the
  gateway namespace (tunnel 10.250.0.1 <-> 10.250.0.2, MTU 1280 like the gateway's TUN);
* ``gateway``: no /32, so the dev client's ``10.204.0.0/24 dev tun-fzclient`` route
  carries the traffic through our gateway.

The gateway namespace masquerades everything leaving ``lan0`` in all three cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstack.stack import CIDR_RESOURCE, Proc, Stack, stack
from devstack.topology import ADDRESSES, RESOURCE

WG_MTU = 1280
WG_PORT = 51830
WG_CLIENT_IP = "10.250.0.1"
WG_GATEWAY_IP = "10.250.0.2"
IPERF_PORT = 5201
CONFIGS = ("routed", "wireguard-go", "gateway")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class WgPair:
    """wireguard-go in the client and the gateway namespace, one peer each."""

    client_if: str
    gateway_if: str
    procs: list[subprocess.Popen[bytes]]


@dataclass
class BenchNet:
    """Everything a measurement needs; built by :func:`bench_net`."""

    stack: Stack
    tmp: Path
    wg: WgPair | None = None
    client: Proc | None = None
    _port: int = IPERF_PORT
    mode: str = "gateway"

    @property
    def gateway_pid(self) -> int:
        """The python pid: ``ip netns exec`` execs, so the Popen pid is the gateway itself."""
        assert self.stack.gateway is not None
        return self.stack.gateway.popen.pid

    def run(self, role: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.stack.topo.run(role, *args, check=check)

    def use(self, mode: str) -> None:
        """Route client -> resource traffic over ``mode`` (one of :data:`CONFIGS`)."""
        dst = f"{RESOURCE}/32"
        if mode == "routed":
            self.run("client", "ip", "route", "replace", dst, "via", ADDRESSES["gateway"],
                     "dev", "eth0")
        elif mode == "wireguard-go":
            assert self.wg is not None
            self.run("client", "ip", "route", "replace", dst, "dev", self.wg.client_if)
        elif mode == "gateway":
            self.run("client", "ip", "route", "del", dst, check=False)
        else:
            raise ValueError(mode)
        self.mode = mode

    def iperf3(self, *args: str, seconds: float) -> dict[str, Any]:
        """Run an iperf3 client in the client namespace against the resource; its JSON.

        Each run gets a fresh one-off server (``iperf3 -s -1``) on a new port: a server
        left "busy" by an aborted test would otherwise fail every later run.
        """
        self._port = IPERF_PORT + (self._port - IPERF_PORT + 1) % 100
        server = self.stack.topo.popen("resource", ["iperf3", "-s", "-1", "-p", str(self._port)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            cmd = ["iperf3", "-c", RESOURCE, "-p", str(self._port), "-J", "-t", f"{seconds:g}",
                   "--connect-timeout", "3000", *args]
            for _ in range(20):  # until the server listens
                time.sleep(0.05)
                result = self.run("client", *cmd, check=False)
                if "Connection refused" not in result.stdout:
                    break
            try:
                data: dict[str, Any] = json.loads(result.stdout)
            except ValueError:
                data = {"error": (result.stdout + result.stderr)[-500:]}
            if result.returncode != 0 and "error" not in data:
                data["error"] = f"iperf3 exited {result.returncode}"
            return data
        finally:
            stop_procs([server])

    def gateway_cpu_seconds(self) -> float:
        """utime + stime of the gateway process so far, in seconds."""
        return proc_cpu_seconds(self.gateway_pid)


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` (all its threads) in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    return sum(proc_cpu_split(pid))


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (bytes) and Threads of ``pid``."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                out["rss_bytes"] = int(value.split()[0]) * 1024
            elif key == "Threads":
                out["threads"] = int(value)
    return out


def _wg_genkey() -> tuple[str, str]:
    private = subprocess.run(["wg", "genkey"], check=True, capture_output=True,
                             text=True).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, check=True, capture_output=True,
                            text=True).stdout.strip()
    return private, public


def _wait_path(path: str, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"wireguard-go did not create {path}")
        time.sleep(0.005)


def start_wg_pair(net: BenchNet) -> WgPair:
    """wireguard-go at both ends; the client's peer allows the resource network."""
    suffix = os.getpid() % 100000
    pair = WgPair(f"wgc{suffix}", f"wgg{suffix}", [])
    keys = {role: _wg_genkey() for role in ("client", "gateway")}
    keydir = net.tmp / "wg"
    keydir.mkdir(mode=0o700, exist_ok=True)
    for role, (private, _) in keys.items():
        path = keydir / f"{role}.key"
        path.write_text(private + "\n")
        path.chmod(0o600)
    sides = (
        ("client", pair.client_if, WG_CLIENT_IP, "gateway",
         f"{WG_GATEWAY_IP}/32,10.204.0.0/24", f"{ADDRESSES['gateway']}:{WG_PORT}",
         WG_GATEWAY_IP),
        ("gateway", pair.gateway_if, WG_GATEWAY_IP, "client", f"{WG_CLIENT_IP}/32", None,
         WG_CLIENT_IP),
    )
    env = dict(os.environ, LOG_LEVEL="error")
    for role, iface, address, peer, allowed, endpoint, peer_ip in sides:
        log = open(net.tmp / f"wireguard-go-{role}.log", "wb")  # noqa: SIM115
        proc = net.stack.topo.popen(role, ["wireguard-go", "-f", iface], stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
        pair.procs.append(proc)
        _wait_path(f"/var/run/wireguard/{iface}.sock", proc)
        args = ["wg", "set", iface, "private-key", str(keydir / f"{role}.key"), "peer",
                keys[peer][1], "allowed-ips", allowed]
        if endpoint:
            args += ["endpoint", endpoint, "persistent-keepalive", "25"]
        else:
            args[3:3] = ["listen-port", str(WG_PORT)]
        net.run(role, *args)
        net.run(role, "ip", "addr", "add", f"{address}/32", "dev", iface)
        net.run(role, "ip", "link", "set", iface, "mtu", str(WG_MTU), "up")
        net.run(role, "ip", "route", "add", f"{peer_ip}/32", "dev", iface)
    return pair


def stop_procs(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_gateway(net: BenchNet) -> None:
    """The gateway at INFO (the e2e default is DEBUG, which would dominate the figures);
    ``FZ_BENCH_GATEWAY_LOG`` overrides the filter to diagnose a run, not to measure one."""
    net.stack.start_gateway("--log-filter", os.environ.get("FZ_BENCH_GATEWAY_LOG", "info"))
    net.stack.wait_gateway_ready(timeout=30)
    # The namespaces are seconds old: IPv6 link-local addresses still appear, and the
    # gateway's network monitor may reset once (2 s debounce). Let that happen first.
    time.sleep(2.5)
    net.stack.wait_gateway_ready(timeout=30)


def start_devclient(net: BenchNet) -> Proc:
    """``python -m devclient`` with a TUN in the client namespace, connected to the CIDR
    resource over the direct path."""
    client = net.stack.start_client(CIDR_RESOURCE, extra=("--log-level", "WARNING"))
    client.wait_line(lambda line: line.startswith("READY"), timeout=30)
    net.client = client
    deadline = time.monotonic() + 30
    while net.stack.udp_echo(RESOURCE, 7000, b"up", timeout=0.2) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no path through the dev client:\n{client.tail()}")
    return client


@contextlib.contextmanager
def bench_net(*, devclient: bool = True, wireguard: bool = True) -> Iterator[BenchNet]:
    """Build the network and start everything; tear all of it down afterwards."""
    with tempfile.TemporaryDirectory(prefix="fzbench") as tmpdir:
        tmp = Path(tmpdir)
        with stack(tmp) as st:
            net = BenchNet(stack=st, tmp=tmp)
            try:
                st.start_portal()
                if wireguard:  # before the gateway: new links would make it reset
                    net.wg = start_wg_pair(net)
                start_gateway(net)
                st.start_resource_servers()
                if devclient:
                    start_devclient(net)
                yield net
            finally:
                if net.wg is not None:
                    stop_procs(net.wg.procs)
