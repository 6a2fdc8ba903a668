"""An end-to-end test network built from namespaces the test creates and removes.

::

    client 10.203.0.2 ─┐
    gateway 10.203.0.3 ─┤ bridge "wan" (its own namespace)
    relay 10.203.0.4 ──┤
    portal 10.203.0.5 ─┘
    gateway 10.204.0.1 ── resource 10.204.0.2   (the CIDR resource 10.204.0.0/24)

No namespace has a default route; the gateway forwards and masquerades towards the
resource as Firezone's init script (rust/docker-init-gateway.sh) sets it up. Addresses repeat across
test runs on purpose: namespaces isolate them, and every namespace name carries the pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from devstack import netns

WAN = "10.203.0"
ADDRESSES = {"client": f"{WAN}.2", "gateway": f"{WAN}.3", "relay": f"{WAN}.4", "portal": f"{WAN}.5",
             "client2": f"{WAN}.6"}
GATEWAY_LAN = "10.204.0.1"
RESOURCE = "10.204.0.2"
RESOURCE_NET = "10.204.0.0/24"
RESOURCE_V6 = "fd20:204::2"
GATEWAY_LAN_V6 = "fd20:204::1"
RESOURCE_NET_V6 = "fd20:204::/64"
ROLES = ("client", "gateway", "relay", "portal", "resource")


@dataclass
class Topology:
    """Namespace names per role plus helpers to run things in them."""

    names: dict[str, str]
    wan: str
    hosts_files: list[Path] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return self.names[role]

    def run(self, role: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return netns.run(*args, ns=self.names[role], check=check)

    def popen(self, role: str, args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        cmd = ["ip", "netns", "exec", self.names[role], *args]
        return subprocess.Popen(cmd, **kwargs)  # type: ignore[call-overload]

    def set_hosts(self, role: str, entries: dict[str, str]) -> None:
        """``ip netns exec`` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts."""
        directory = Path("/etc/netns") / self.names[role]
        directory.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", *(f"{ip} {name}" for name, ip in entries.items())]
        (directory / "hosts").write_text("\n".join(lines) + "\n")
        self.hosts_files.append(directory)

    def add_wan_host(self, role: str) -> None:
        """Another namespace on the bridge at ``ADDRESSES[role]`` (e.g. a second client,
        whose routes to the resources must not collide with the first one's); removed
        with the others."""
        self.names[role] = netns.unique_name(f"fz{role[:3]}{role[-1]}")
        _attach_to_wan(self, role)

    def block_udp_port(self, role: str, peer_ip: str, port: int) -> None:
        """Drop UDP from ``role`` to ``peer_ip:port`` only (e.g. a relay's TURN port)."""
        ns = self.names[role]
        netns.run("nft", "add", "table", "inet", "fzport", ns=ns)
        netns.run("nft", "add", "chain", "inet", "fzport", "out",
                  "{ type filter hook output priority 0 ; }", ns=ns)
        netns.run("nft", "add", "rule", "inet", "fzport", "out", "ip", "daddr", peer_ip,
                  "udp", "dport", str(port), "drop", ns=ns)

    def block(self, role: str, peer_ip: str) -> None:
        """Drop every packet between ``role`` and ``peer_ip`` (forces the relayed path)."""
        ns = self.names[role]
        netns.run("nft", "add", "table", "inet", "fzblock", ns=ns)
        for chain, hook in (("in", "input"), ("out", "output")):
            netns.run(
                "nft", "add", "chain", "inet", "fzblock", chain,
                f"{{ type filter hook {hook} priority 0 ; }}", ns=ns,
            )
        netns.run("nft", "add", "rule", "inet", "fzblock", "in", "ip", "saddr", peer_ip, "drop",
                  ns=ns)
        netns.run("nft", "add", "rule", "inet", "fzblock", "out", "ip", "daddr", peer_ip, "drop",
                  ns=ns)


def _attach_to_wan(topo: Topology, role: str) -> None:
    ns = topo.names[role]
    netns.add(ns)
    port = f"v{role[:3]}" if role[-1].isalpha() else f"v{role[:3]}{role[-1]}"
    netns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns",
              topo.wan, ns=ns)
    netns.run("ip", "link", "set", port, "master", "br0", "up", ns=topo.wan)
    netns.run("ip", "addr", "add", f"{ADDRESSES[role]}/24", "dev", "eth0", ns=ns)
    netns.run("ip", "link", "set", "eth0", "up", ns=ns)


def _build(topo: Topology) -> None:
    netns.add(topo.wan)
    netns.run("ip", "link", "add", "br0", "type", "bridge", ns=topo.wan)
    netns.run("ip", "link", "set", "br0", "up", ns=topo.wan)
    for role in ("client", "gateway", "relay", "portal"):
        _attach_to_wan(topo, role)
    resource = topo.names["resource"]
    gateway = topo.names["gateway"]
    netns.add(resource)
    netns.run("ip", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns",
              resource, ns=gateway)
    netns.run("ip", "addr", "add", f"{GATEWAY_LAN}/24", "dev", "lan0", ns=gateway)
    netns.run("ip", "addr", "add", f"{GATEWAY_LAN_V6}/64", "dev", "lan0", "nodad", ns=gateway)
    netns.run("ip", "link", "set", "lan0", "up", ns=gateway)
    netns.run("ip", "addr", "add", f"{RESOURCE}/24", "dev", "eth0", ns=resource)
    netns.run("ip", "addr", "add", f"{RESOURCE_V6}/64", "dev", "eth0", "nodad", ns=resource)
    netns.run("ip", "link", "set", "eth0", "up", ns=resource)
    # The gateway host forwards and masquerades, as config/gateway-init.sh does in production.
    for sysctl in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                   "net.ipv4.conf.all.src_valid_mark=1"):
        netns.run("sysctl", "-q", "-w", sysctl, ns=gateway)
    netns.run("nft", "add", "table", "inet", "fznat", ns=gateway)
    netns.run("nft", "add", "chain", "inet", "fznat", "post",
              "{ type nat hook postrouting priority 100 ; }", ns=gateway)
    netns.run("nft", "add", "rule", "inet", "fznat", "post", "oifname", "lan0", "masquerade",
              ns=gateway)


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    """Build the whole network; remove every namespace (and /etc/netns entry) afterwards."""
    names = {role: netns.unique_name(f"fz{role[:3]}") for role in ROLES}
    topo = Topology(names=names, wan=netns.unique_name("fzwan"))
    try:
        _build(topo)
        yield topo
    finally:
        for ns in [*names.values(), topo.wan]:
            netns.delete(ns)
        for directory in topo.hosts_files:
            shutil.rmtree(directory, ignore_errors=True)


def python() -> str:
    """The interpreter running the tests (the project's virtualenv)."""
    return os.environ.get("FZ_PYTHON") or sys.executable
