"""When a host network change resets the gateway: only when its own addresses move."""

from __future__ import annotations

import ipaddress

from gateway.roaming import (
    IFA_F_DADFAILED,
    IFA_F_DEPRECATED,
    IFA_F_TEMPORARY,
    IFA_F_TENTATIVE,
    HostAddresses,
    Roaming,
    should_reset,
    usable_address,
)

ETH, DOCKER_VETH, TUN = 2, 7, 9


def _roaming(*, enabled: bool = True) -> Roaming:
    addresses = HostAddresses("tun-firezone")
    addresses.link(ETH, "eth0")
    addresses.link(TUN, "tun-firezone")
    addresses.added(ETH, "192.0.2.10", 0x80)
    addresses.added(ETH, "2001:db8::10", 0x80)
    addresses.added(ETH, "fe80::10", 0x80)
    addresses.added(ETH, "2001:db8::aaaa", IFA_F_TEMPORARY)
    addresses.added(TUN, "100.64.0.1", 0x80)
    roaming = Roaming(addresses, enabled=enabled)
    assert roaming.settle() is None  # the first decision is the baseline
    return roaming


def test_the_usable_set() -> None:
    roaming = _roaming()
    assert roaming.baseline == {
        ipaddress.ip_address("192.0.2.10"), ipaddress.ip_address("2001:db8::10")
    }


def test_a_docker_veth_appearing_does_not_reset() -> None:
    roaming = _roaming()
    roaming.addresses.link(DOCKER_VETH, "veth1a2b3c")
    roaming.addresses.added(DOCKER_VETH, "fe80::a8bb:ccff:fedd:eeff", IFA_F_TENTATIVE)
    roaming.addresses.added(DOCKER_VETH, "fe80::a8bb:ccff:fedd:eeff", 0x80)
    assert roaming.settle() is None
    roaming.addresses.link_removed(DOCKER_VETH)
    assert roaming.settle() is None


def test_a_temporary_ipv6_address_rotating_does_not_reset() -> None:
    roaming = _roaming()
    roaming.addresses.added(ETH, "2001:db8::bbbb", IFA_F_TEMPORARY | IFA_F_TENTATIVE)
    roaming.addresses.added(ETH, "2001:db8::bbbb", IFA_F_TEMPORARY)
    roaming.addresses.added(ETH, "2001:db8::aaaa", IFA_F_TEMPORARY | IFA_F_DEPRECATED)
    assert roaming.settle() is None
    roaming.addresses.removed(ETH, "2001:db8::aaaa")
    assert roaming.settle() is None


def test_a_route_change_alone_does_not_reset() -> None:
    """Routes never reach the core: the set the decision reads is unchanged."""
    roaming = _roaming()
    assert roaming.settle() is None
    assert not should_reset(roaming.addresses.usable(), roaming.addresses.usable())


def test_the_tun_devices_own_addresses_do_not_reset() -> None:
    roaming = _roaming()
    roaming.addresses.added(TUN, "fd00:2021:1111::1", 0x80)
    roaming.addresses.removed(TUN, "100.64.0.1")
    assert roaming.settle() is None


def test_a_new_global_address_resets() -> None:
    roaming = _roaming()
    roaming.addresses.added(ETH, "198.51.100.7", 0)
    change = roaming.settle()
    assert change is not None
    assert change.added == (ipaddress.ip_address("198.51.100.7"),)
    assert change.removed == ()
    assert roaming.settle() is None  # decided once


def test_an_ipv6_address_counts_once_dad_is_done() -> None:
    roaming = _roaming()
    roaming.addresses.added(ETH, "2001:db8::20", IFA_F_TENTATIVE)
    assert roaming.settle() is None
    roaming.addresses.added(ETH, "2001:db8::20", 0x80)
    assert roaming.settle() is not None


def test_an_address_removed_resets() -> None:
    roaming = _roaming()
    roaming.addresses.removed(ETH, "2001:db8::10")
    change = roaming.settle()
    assert change is not None and change.removed == (ipaddress.ip_address("2001:db8::10"),)


def test_the_interface_going_away_resets() -> None:
    roaming = _roaming()
    roaming.addresses.link_removed(ETH)
    change = roaming.settle()
    assert change is not None and len(change.removed) == 2


def test_a_deprecated_stable_address_still_counts_until_removed() -> None:
    roaming = _roaming()
    roaming.addresses.added(ETH, "2001:db8::10", IFA_F_DEPRECATED)
    assert roaming.settle() is None
    roaming.addresses.removed(ETH, "2001:db8::10")
    assert roaming.settle() is not None


def test_setting_off_never_resets() -> None:
    roaming = _roaming(enabled=False)
    roaming.addresses.added(ETH, "198.51.100.7", 0)
    roaming.addresses.removed(ETH, "192.0.2.10")
    roaming.addresses.link_removed(ETH)
    assert roaming.settle() is None
    assert not should_reset(frozenset(), frozenset({ipaddress.ip_address("192.0.2.1")}),
                            enabled=False)


def test_usable_address_rules() -> None:
    assert usable_address("192.0.2.1") is not None
    assert usable_address("10.0.0.1", 0x01) is not None  # IPv4 IFA_F_SECONDARY, not temporary
    assert usable_address("2001:db8::1", IFA_F_DEPRECATED) is not None
    for address, flags in (
        ("127.0.0.1", 0), ("::1", 0), ("0.0.0.0", 0), ("::", 0), ("169.254.1.1", 0),
        ("fe80::1", 0), ("224.0.0.1", 0), ("ff02::1", 0), ("not an address", 0),
        ("2001:db8::1", IFA_F_TEMPORARY), ("2001:db8::1", IFA_F_TENTATIVE),
        ("2001:db8::1", IFA_F_DADFAILED),
    ):
        assert usable_address(address, flags) is None, address


def test_removed_links_are_forgotten() -> None:
    """Veths come and go by the thousand on a container host: the tables stay bounded."""
    roaming = _roaming()
    for index in range(100, 1100):
        roaming.addresses.link(index, f"veth{index}")
        roaming.addresses.added(index, f"fe80::{index:x}", 0x80)
        roaming.addresses.link_removed(index)
    assert roaming.addresses.links == 2
    assert roaming.settle() is None
