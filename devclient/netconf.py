"""Open and configure the client's TUN device in the current namespace (needs CAP_NET_ADMIN).

Uses ``ip`` so that what we do reads exactly like the shell commands in the test guides.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess

from actors.io.tun_linux import LinuxTun, open_tun
from devclient.core import InterfaceConfig

log = logging.getLogger(__name__)

MTU = 1280


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def open_configured_tun(name: str, config: InterfaceConfig) -> LinuxTun:
    """A new TUN ``name`` with our /32 and /128, MTU 1280, up, and a route per entry."""
    tun = open_tun(name)
    try:
        apply_config(name, config)
    except BaseException:
        tun.close()
        raise
    return tun


def apply_config(name: str, config: InterfaceConfig) -> None:
    """(Re)apply addresses and routes; ``replace`` keeps it idempotent for a second init."""
    _ip("link", "set", "dev", name, "mtu", str(MTU), "up")
    _ip("address", "replace", f"{config.ipv4}/32", "dev", name)
    _ip("-6", "address", "replace", f"{config.ipv6}/128", "dev", name, "nodad")
    for route in config.routes:
        network = ipaddress.ip_network(route, strict=False)
        family = "-6" if network.version == 6 else "-4"
        _ip(family, "route", "replace", str(network), "dev", name)
    log.info("configured %s: %s, %s, %d route(s)", name, config.ipv4, config.ipv6,
             len(config.routes))
