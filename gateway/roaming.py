"""When a host network change is worth a reset: only when the gateway itself roams.

A reset drops every client and rotates the key (``README.rst``, "Reset and key rotation"),
so it is right only when the addresses clients can reach the gateway on change — the
addresses that can become host candidates (``rust/connlib/snownet/src/node.rs`` learns
them from the local address each datagram arrived on). The 1.4 gateway never resets on
its own; our automatic reset is an extra, and this core keeps it from firing on changes
that do not move the gateway:

* routes never count: a routing daemon touching the table moves no address;
* links never count by themselves: a Docker veth or a down interface brings no address
  (an address arriving on it does count, through the address rules);
* the TUN device's own addresses are ours, not the host's;
* loopback, unspecified, multicast and link-local addresses (IPv4 169.254/16, as
  snownet refuses them as host candidates; IPv6 fe80::/10 too, reachable only on their
  own link and re-added by the kernel on every link-up) cannot be host candidates;
* tentative (duplicate address detection still running) and DAD-failed IPv6 addresses
  are not usable yet: the address counts once the kernel clears the flag;
* IPv6 temporary (privacy, ``IFA_F_TEMPORARY``) addresses rotate by design, typically
  daily: a server is reached on its stable addresses, and a temporary address a
  connection happens to use stays valid for days after it is deprecated. Were they
  counted, every rotation would drop every client;
* deprecated stable addresses still count: deprecation only stops the kernel choosing
  them for new outgoing traffic, the flows on them still work, so the reset waits until
  the address is really removed.

``HostAddresses`` keeps the kernel's address table as netlink reports it (``actors/netmon.py``
feeds it); ``Roaming`` compares the usable set with the one at the last decision.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: ``ifa_flags`` bits (``include/uapi/linux/if_addr.h``). IPv4 uses 0x01 for
#: ``IFA_F_SECONDARY`` (a second address in a subnet: as usable as the first), so the
#: IPv6-only flags are tested on IPv6 addresses only.
IFA_F_TEMPORARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
#: IPv6 flags that make an address not (or not yet) one the gateway is reached on.
UNUSABLE_FLAGS = IFA_F_TEMPORARY | IFA_F_DADFAILED | IFA_F_TENTATIVE


def usable_address(address: str, flags: int = 0) -> IPAddress | None:
    """The address if it can be a host candidate (see the module docstring), else None."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version == 6 and flags & UNUSABLE_FLAGS:
        return None
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local:
        return None
    return ip


def should_reset(
    previous: frozenset[IPAddress], current: frozenset[IPAddress], *, enabled: bool = True
) -> bool:
    """Reset when the usable address set changed, and automatic resets are on."""
    return enabled and previous != current


@dataclass(frozen=True, slots=True)
class AddressChange:
    """What moved between two decisions, for the log line."""

    added: tuple[IPAddress, ...]
    removed: tuple[IPAddress, ...]


class HostAddresses:
    """The host's addresses by interface index, and which of them are usable.

    Entries are keyed by ``(index, address)`` as netlink reports them; names are looked
    up when the set is read, so an address reported before its link was named is judged
    correctly once the name is known. Both tables are bounded by the kernel's own: a
    removed link takes its name and addresses with it (Docker churns through veths).
    """

    def __init__(self, ignore_ifname: str) -> None:
        self._ignore_ifname = ignore_ifname
        self._names: dict[int, str] = {}
        self._addresses: dict[tuple[int, str], int] = {}

    def link(self, index: int, name: str) -> None:
        """A link's name (from a link event or dump)."""
        self._names[index] = name

    def link_removed(self, index: int) -> None:
        """Its name and addresses go with it (the kernel reports the addresses' removal
        before the link's, so none can arrive for it afterwards)."""
        self._names.pop(index, None)
        for key in [key for key in self._addresses if key[0] == index]:
            del self._addresses[key]

    @property
    def links(self) -> int:
        """How many links are named (for tests of the bound)."""
        return len(self._names)

    def added(self, index: int, address: str, flags: int) -> None:
        """``RTM_NEWADDR``: a new address, or new flags (DAD done, deprecated) on one."""
        self._addresses[(index, address)] = flags

    def removed(self, index: int, address: str) -> None:
        """``RTM_DELADDR``."""
        self._addresses.pop((index, address), None)

    def clear(self) -> None:
        """Before a full dump refills the table (events were lost)."""
        self._addresses.clear()

    def usable(self) -> frozenset[IPAddress]:
        """The addresses that can be host candidates, excluding the ignored (TUN) device."""
        found: set[IPAddress] = set()
        for (index, address), flags in self._addresses.items():
            if self._names.get(index) == self._ignore_ifname:
                continue
            ip = usable_address(address, flags)
            if ip is not None:
                found.add(ip)
        return frozenset(found)


class Roaming:
    """Decides, once per quiet burst, whether the gateway's own addresses moved."""

    def __init__(self, addresses: HostAddresses, *, enabled: bool = True) -> None:
        self.addresses = addresses
        self.enabled = enabled
        self._baseline: frozenset[IPAddress] | None = None

    @property
    def baseline(self) -> frozenset[IPAddress] | None:
        """The usable set at the last decision (None before the first dump completed)."""
        return self._baseline

    def settle(self) -> AddressChange | None:
        """Take the current set as the baseline; the change to act on, if a reset is due.

        The first call only records the baseline (the addresses the gateway started on).
        """
        current = self.addresses.usable()
        previous, self._baseline = self._baseline, current
        if previous is None or not should_reset(previous, current, enabled=self.enabled):
            return None
        return AddressChange(
            added=tuple(sorted(current - previous, key=_order)),
            removed=tuple(sorted(previous - current, key=_order)),
        )


def _order(ip: IPAddress) -> tuple[int, int]:
    return ip.version, int(ip)


class Debouncer:
    """Trailing debounce: due ``delay`` seconds after the last event of a burst."""

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._deadline: float | None = None

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def note(self, now: float) -> None:
        """An event happened at ``now``; push the deadline out."""
        self._deadline = now + self._delay

    def poll(self, now: float) -> bool:
        """True exactly once when a burst has been quiet for ``delay``."""
        if self._deadline is None or now < self._deadline:
            return False
        self._deadline = None
        return True
