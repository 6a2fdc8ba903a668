"""The network monitor on a real rtnetlink socket inside a namespace."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from actors.io.tun_linux import TUN_NAME, open_tun
from actors.netconfig import configure_interface
from actors.netmon import NetworkMonitor, open_monitor_socket
from devstack import netns
from tests.support.interop import require_netns

pytestmark = [pytest.mark.interop, pytest.mark.netns]

DEBOUNCE = 0.3
QUIET = 2 * DEBOUNCE  # long enough for a second (wrong) callback to show up
TIMEOUT = 5.0


class Calls:
    """Counts callbacks; lets a test wait for the n-th."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()

    def __call__(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def wait(self, count: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= count, timeout)


@pytest.fixture
def ns() -> Iterator[str]:
    require_netns()
    with netns.namespaces("fztmon") as (name,):
        # A veth pair kept down: no carrier, so no IPv6 DAD events trickling in later.
        netns.run("ip", "link", "add", "fztva", "type", "veth", "peer", "name", "fztvb", ns=name)
        yield name


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def monitor(ns: str, calls: Calls) -> Iterator[NetworkMonitor]:
    mon = NetworkMonitor(
        calls,
        debounce=DEBOUNCE,
        ignore_ifname=TUN_NAME,
        socket_factory=lambda: netns.in_netns(ns, open_monitor_socket),
    )
    mon.start()
    yield mon
    mon.stop()
    assert not [t for t in threading.enumerate() if t.name == "NetMonitor"]


def test_a_burst_of_changes_gives_one_callback(
    ns: str, monitor: NetworkMonitor, calls: Calls
) -> None:
    for host in (1, 2, 3):
        netns.run("ip", "addr", "add", f"10.203.9.{host}/24", "dev", "fztva", ns=ns)
    netns.run("ip", "addr", "add", "fd00:203:9::1/64", "dev", "fztva", "nodad", ns=ns)
    netns.run("ip", "link", "set", "fztvb", "mtu", "1400", ns=ns)

    assert calls.wait(1, TIMEOUT)
    assert not calls.wait(2, QUIET)
    assert monitor.changes_seen >= 1

    netns.run("ip", "addr", "del", "10.203.9.3/24", "dev", "fztva", ns=ns)
    assert calls.wait(2, TIMEOUT)  # a later burst is reported again


def test_changes_on_the_tun_device_are_ignored(
    ns: str, monitor: NetworkMonitor, calls: Calls
) -> None:
    device = netns.in_netns(ns, open_tun)
    try:
        netns.in_netns(ns, lambda: configure_interface("100.64.0.1", "fd00:2021:1111::1"))
        netns.run("ip", "addr", "add", "100.64.0.9/32", "dev", "tun-firezone", ns=ns)
        netns.run("ip", "link", "set", "tun-firezone", "mtu", "1300", ns=ns)
    finally:
        device.close()  # the device, its addresses and routes go away: still ours

    assert not calls.wait(1, QUIET)
    assert monitor.changes_seen == 0

    netns.run("ip", "addr", "add", "10.203.9.1/24", "dev", "fztva", ns=ns)  # the control
    assert calls.wait(1, TIMEOUT)


def test_link_local_and_multicast_changes_are_ignored(
    ns: str, monitor: NetworkMonitor, calls: Calls
) -> None:
    """IPv6 link-local addresses settling after link-up (DAD) are not a network change."""
    netns.run("ip", "addr", "add", "fe80::1234/64", "dev", "fztva", "nodad", ns=ns)
    netns.run("ip", "addr", "add", "169.254.7.7/16", "dev", "fztva", ns=ns)
    assert not calls.wait(1, QUIET)
    assert monitor.changes_seen == 0

    netns.run("ip", "addr", "add", "10.203.9.1/24", "dev", "fztva", ns=ns)  # the control
    assert calls.wait(1, TIMEOUT)


def test_tun_changes_queued_before_the_link_dump_are_still_ignored(
    ns: str, calls: Calls
) -> None:
    """The TUN exists before the monitor subscribes, and is configured after subscribing
    but before the monitor's link dump names its index: those events must not count."""
    device = netns.in_netns(ns, open_tun)

    def subscribe_then_configure() -> Any:
        sock = netns.in_netns(ns, open_monitor_socket)
        # An address first (no link event that would name the device on the way).
        netns.run("ip", "addr", "add", "100.64.0.9/32", "dev", TUN_NAME, ns=ns)
        netns.in_netns(ns, lambda: configure_interface("100.64.0.1", "fd00:2021:1111::1"))
        return sock

    mon = NetworkMonitor(calls, debounce=DEBOUNCE, ignore_ifname=TUN_NAME,
                         socket_factory=subscribe_then_configure)
    mon.start()
    try:
        assert not calls.wait(1, QUIET)
        assert mon.changes_seen == 0
        netns.run("ip", "addr", "add", "10.203.9.1/24", "dev", "fztva", ns=ns)  # the control
        assert calls.wait(1, TIMEOUT)
    finally:
        mon.stop()
        device.close()


def _temporary_addresses(ns: str, dev: str) -> list[str]:
    out = netns.run("ip", "-6", "-o", "addr", "show", "dev", dev, "temporary", ns=ns).stdout
    return [line.split()[3] for line in out.splitlines()]


def _wait_for_new_temporary(ns: str, dev: str, old: list[str]) -> list[str]:
    """Poll ``ip`` until the kernel made a temporary address other than ``old``."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = _temporary_addresses(ns, dev)
        if found and found != old:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no new temporary address on {dev}")


def test_links_routes_and_privacy_rotation_do_not_reset(ns: str, calls: Calls) -> None:
    """A veth appearing, routes changing and an IPv6 temporary address rotating leave the
    gateway's own addresses alone: no reset. Adding one of those is the control."""
    netns.run("ip", "link", "add", "fztdm", "type", "veth", "peer", "name", "fztdn", ns=ns)
    netns.run("sysctl", "-qw", "net.ipv6.conf.fztdm.use_tempaddr=2", ns=ns)
    netns.run("ip", "link", "set", "fztdn", "up", ns=ns)
    netns.run("ip", "link", "set", "fztdm", "up", ns=ns)
    stable = ("fd00:77::1/64", "dev", "fztdm", "nodad", "valid_lft", "3600",
              "preferred_lft", "1800")
    netns.run("ip", "addr", "add", *stable, "mngtmpaddr", ns=ns)
    netns.run("ip", "addr", "add", "10.203.8.1/24", "dev", "fztdm", ns=ns)
    first = _wait_for_new_temporary(ns, "fztdm", [])

    mon = NetworkMonitor(calls, debounce=DEBOUNCE, ignore_ifname=TUN_NAME,
                         socket_factory=lambda: netns.in_netns(ns, open_monitor_socket))
    mon.start()
    try:
        # Privacy rotation: the kernel drops the temporary address and makes a new one.
        netns.run("ip", "addr", "change", *stable, ns=ns)
        netns.run("ip", "addr", "change", *stable, "mngtmpaddr", ns=ns)
        assert _wait_for_new_temporary(ns, "fztdm", first) != first
        # A Docker-style veth pair appearing and coming up (IPv6 link-local only).
        netns.run("ip", "link", "add", "fztvc", "type", "veth", "peer", "name", "fztvd", ns=ns)
        netns.run("ip", "link", "set", "fztvd", "up", ns=ns)
        netns.run("ip", "link", "set", "fztvc", "up", ns=ns)
        # A routing daemon touching routes.
        netns.run("ip", "route", "add", "10.98.0.0/16", "via", "10.203.8.2", ns=ns)
        netns.run("ip", "-6", "route", "add", "fd00:98::/64", "dev", "fztdm", ns=ns)
        netns.run("ip", "route", "replace", "10.98.0.0/16", "via", "10.203.8.3", ns=ns)
        netns.run("ip", "route", "del", "10.98.0.0/16", ns=ns)
        assert not calls.wait(1, 2 * QUIET)
        assert mon.changes_seen == 0

        netns.run("ip", "addr", "add", "10.203.9.1/24", "dev", "fztva", ns=ns)  # the control
        assert calls.wait(1, TIMEOUT)
    finally:
        mon.stop()


def test_removing_an_address_the_gateway_uses_resets(ns: str, calls: Calls) -> None:
    netns.run("ip", "addr", "add", "10.203.9.1/24", "dev", "fztva", ns=ns)
    netns.run("ip", "addr", "add", "fd00:203:9::1/64", "dev", "fztva", "nodad", ns=ns)
    mon = NetworkMonitor(calls, debounce=DEBOUNCE, ignore_ifname=TUN_NAME,
                         socket_factory=lambda: netns.in_netns(ns, open_monitor_socket))
    mon.start()
    try:
        assert not calls.wait(1, QUIET)  # the addresses it started on are the baseline
        assert {str(ip) for ip in mon.usable_addresses} == {"10.203.9.1", "fd00:203:9::1"}
        netns.run("ip", "addr", "del", "fd00:203:9::1/64", "dev", "fztva", ns=ns)
        assert calls.wait(1, TIMEOUT)
        assert {str(ip) for ip in mon.usable_addresses} == {"10.203.9.1"}
    finally:
        mon.stop()
