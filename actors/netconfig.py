"""Apply an ``init`` interface to ``tun-firezone`` over rtnetlink
(rust/bin-shared/src/tun_device_manager/linux.rs).

Every step is attempted even when an earlier one failed, and every failure is a logged
warning, never an exception: a half-configured interface still beats a gateway that
exits on a transient netlink error. Running it again with the same input changes nothing.

Routing: unmarked packets (forwarded ones and local processes) look up ``FIREZONE_TABLE``
first, which sends the peer ranges into the TUN; the gateway's own sockets carry
``FIREZONE_MARK`` so its tunnel traffic never loops back into the device.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from actors.io.tun_linux import TUN_MTU, TUN_NAME

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

FIREZONE_MARK = 0xFD002021
FIREZONE_TABLE = 0x2021FD00
IPV4_PEERS = "100.64.0.0/11"
IPV6_PEERS = "fd00:2021:1111::/107"

FIB_RULE_INVERT = 0x2  # linux/fib_rules.h: the rule matches when its selector does not
RTPROT_KERNEL = 2
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
IN6_ADDR_GEN_MODE_NONE = 1
_NO_LINK_LOCAL = {
    "attrs": [("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE)]})]
}

_ROUTES = ((socket.AF_INET, IPV4_PEERS), (socket.AF_INET6, IPV6_PEERS))


def configure_interface(ipv4: str, ipv6: str, *, ifname: str = TUN_NAME) -> None:
    """Give ``ifname`` exactly these addresses, MTU 1280, link up, the rule and the routes.

    Uses the network namespace of the calling thread.
    """
    try:
        ipr = IPRoute()
    except Exception:
        logger.warning("Cannot open rtnetlink to configure %s", ifname, exc_info=True)
        return
    with ipr:
        _configure(ipr, ifname, ipv4, ipv6)


def _configure(ipr: IPRoute, ifname: str, ipv4: str, ipv6: str) -> None:
    indexes = _attempt(f"look up {ifname}", ipr.link_lookup, ifname=ifname)
    if not indexes:
        logger.warning("Cannot configure %s: no such interface", ifname)
        return
    index = indexes[0]

    wanted = {
        (family, ipaddress.ip_address(address), prefixlen)
        for family, address, prefixlen in ((socket.AF_INET, ipv4, 32), (socket.AF_INET6, ipv6, 128))
        if _valid(family, address)
    }
    # The 1.4 gateway (rust/bin-shared/src/tun_device_manager/linux.rs) flushes every address and
    # adds the wanted ones back; keeping the wanted ones ends in the same state without a window in
    # which the routes through the TUN vanish (the kernel drops them with the device's last IPv4
    # address).
    for address in _attempt(f"list addresses of {ifname}", ipr.get_addr, index=index) or []:
        value = address.get_attr("IFA_LOCAL") or address.get_attr("IFA_ADDRESS")
        prefixlen = address["prefixlen"]
        if (address["family"], ipaddress.ip_address(value), prefixlen) not in wanted:
            _attempt(f"remove {value}/{prefixlen}", ipr.addr, "del", index=index, address=value,
                     prefixlen=prefixlen)  # fmt: skip
    _attempt(f"set MTU {TUN_MTU}", ipr.link, "set", index=index, mtu=TUN_MTU)

    configured_families = []
    for family, address, prefixlen in sorted(wanted, key=lambda entry: entry[0]):
        if _attempt(
            f"add {address}/{prefixlen}",
            ipr.addr, "add", index=index, address=str(address), prefixlen=prefixlen,
            ignore=errno.EEXIST,
        ) is not None:  # fmt: skip
            configured_families.append(family)

    # Not done by the 1.4 gateway: without this the kernel gives the TUN a random fe80:: address
    # when it comes up, which the next init would flush; with it, repeated inits end identical
    # and the kernel sends no MLD/RS noise into the tunnel.
    _attempt(
        "disable IPv6 link-local address generation",
        ipr.link, "set", index=index, IFLA_AF_SPEC=_NO_LINK_LOCAL,
    )  # fmt: skip
    _attempt(f"set {ifname} up", ipr.link, "set", index=index, state="up")

    for family in configured_families:
        _ensure_rule(ipr, family)

    for family, network in _ROUTES:
        _attempt(
            f"add route {network} to table {FIREZONE_TABLE:#x}",
            ipr.route, "add", family=family, dst=network, table=FIREZONE_TABLE, oif=index,
            proto=RTPROT_STATIC, scope=RT_SCOPE_UNIVERSE,
            ignore=errno.EEXIST,
        )  # fmt: skip
    logger.info("Configured %s with %s and %s", ifname, ipv4, ipv6)


def _ensure_rule(ipr: IPRoute, family: int) -> None:
    """Add ``not fwmark FIREZONE_MARK lookup FIREZONE_TABLE`` unless it is there already.

    No priority is given, so the kernel picks one just above its first non-local rule
    (32765 on a default host). The kernel compares priorities when it checks for
    duplicates, so without an explicit one EEXIST never comes; look before adding.
    """
    rules = _attempt("list policy rules", ipr.get_rules, family=family)
    if rules is None:
        return
    for rule in rules:
        if (
            rule.get_attr("FRA_TABLE") == FIREZONE_TABLE
            and rule.get_attr("FRA_FWMARK") == FIREZONE_MARK
            and rule["flags"] & FIB_RULE_INVERT
        ):
            return
    _attempt(
        f"add policy rule to table {FIREZONE_TABLE:#x}",
        ipr.rule, "add", family=family, table=FIREZONE_TABLE, fwmark=FIREZONE_MARK,
        flags=FIB_RULE_INVERT, protocol=RTPROT_KERNEL, priority=None,
        ignore=errno.EEXIST,
    )  # fmt: skip


def _valid(family: int, address: str) -> bool:
    version = 4 if family == socket.AF_INET else 6
    try:
        return ipaddress.ip_address(address).version == version
    except ValueError:
        pass
    logger.warning("Not configuring invalid IPv%d address %r", version, address)
    return False


def _attempt(what: str, call: Any, *args: Any, ignore: int | None = None, **kwargs: Any) -> Any:
    """Run one netlink step; a failure is a warning and yields ``None``."""
    try:
        result = call(*args, **kwargs)
        return list(result) if result is not None else []
    except NetlinkError as exc:
        if exc.code == ignore:
            return []
        logger.warning("Cannot %s: %s", what, exc)
    except Exception:
        logger.warning("Cannot %s", what, exc_info=True)
    return None
