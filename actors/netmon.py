"""Tell the gateway when the host network changed, once per burst of changes.

A new address, route or link usually means new ICE candidates are needed; the app resets
its connections when ``on_change`` fires. Changes come from a raw NETLINK_ROUTE socket
(link, IPv4/IPv6 address and route groups). Our own TUN device is ignored: configuring it
would otherwise look like a network change and reset everything we just set up.

Interface names are learnt from a link dump sent on the monitor socket itself, so the
monitor works in whatever namespace the socket was created in, whichever thread reads it.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from pyroute2.netlink.rtnl import (
    RTM_GETLINK,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from actors.clock import Clock, SystemClock
from actors.io.tun_linux import TUN_NAME

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

THREAD_NAME = "NetMonitor"
DEFAULT_DEBOUNCE = 2.0
GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
)
_NETLINK_ROUTE = 0
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_RECV_SIZE = 1 << 17
_JOIN_TIMEOUT = 5.0
_LINK_EVENTS = frozenset({"RTM_NEWLINK", "RTM_DELLINK"})
_ADDR_EVENTS = frozenset({"RTM_NEWADDR", "RTM_DELADDR"})
_ROUTE_EVENTS = frozenset({"RTM_NEWROUTE", "RTM_DELROUTE"})


#: The kernel's per-address "local" routes mirror address changes we already see.
_RT_TABLE_LOCAL = 255


def _is_link_scoped(address: object) -> bool:
    """Link-local and multicast addresses never make ICE candidates: not a network change.

    Without this, IPv6 link-local addresses finishing duplicate address detection right
    after an interface comes up would look like a change and reset every connection.
    """
    if not isinstance(address, str):
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_link_local or ip.is_multicast


def open_monitor_socket() -> socket.socket:
    """A NETLINK_ROUTE socket subscribed to ``GROUPS``, in the calling thread's namespace."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE)
    try:
        sock.bind((0, GROUPS))
    except BaseException:
        sock.close()
        raise
    return sock


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


class NetworkMonitor:
    """Runs ``on_change()`` on its ``NetMonitor`` thread once per debounced burst."""

    def __init__(
        self,
        on_change: Callable[[], None],
        *,
        ignore_ifname: str = TUN_NAME,
        debounce: float = DEFAULT_DEBOUNCE,
        clock: Clock | None = None,
        socket_factory: Callable[[], socket.socket] = open_monitor_socket,
        poll_interval: float = 0.5,
    ) -> None:
        self._on_change = on_change
        self._ignore_ifname = ignore_ifname
        self._debouncer = Debouncer(debounce)
        self._clock = clock or SystemClock()
        self._socket_factory = socket_factory
        self._poll_interval = poll_interval
        self._marshal = MarshalRtnl()
        self._names: dict[int, str] = {}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = -1, -1
        self._dump_seq = 0
        self._dump_pending = False
        self._held: list[Any] = []
        self._portid = -1
        self.changes_seen = 0
        self.callbacks = 0

    def start(self) -> None:
        """Subscribe (before returning, so no later change is missed) and start the thread."""
        if self._thread is not None:
            raise RuntimeError("NetworkMonitor already started")
        self._sock = self._socket_factory()
        self._sock.setblocking(False)
        self._portid = self._sock.getsockname()[0]
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._request_link_dump()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close the socket; a pending debounced call is dropped."""
        self._stopping.set()
        if self._wake_write >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_write, b"\0")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(_JOIN_TIMEOUT)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read = self._wake_write = -1

    # the thread

    def _run(self) -> None:
        assert self._sock is not None
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        while not self._stopping.is_set():
            now = self._clock.monotonic()
            if self._debouncer.poll(now):
                self._notify()
                continue
            timeout = self._poll_interval
            deadline = self._debouncer.deadline
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - now))
            if poller.poll(timeout * 1000) and not self._stopping.is_set():
                self._receive()

    def _notify(self) -> None:
        self.callbacks += 1
        try:
            self._on_change()
        except Exception:
            logger.exception("Network change callback failed")

    def _receive(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    logger.warning("Network monitor cannot read: %s", exc)
                    return
                # The kernel dropped events for us: assume a change, relearn the names.
                self._changed()
                self._request_link_dump()
                continue
            for message in self._marshal.parse(data):
                if self._is_change(message):
                    self._changed()

    def _changed(self) -> None:
        self.changes_seen += 1
        self._debouncer.note(self._clock.monotonic())

    def _is_change(self, message: Any) -> bool:
        event = message.get("event")
        header = message["header"]
        if event in _LINK_EVENTS:
            index, name = message["index"], message.get_attr("IFLA_IFNAME")
            if name:
                # Kept after RTM_DELLINK: IPv6 route removals can follow it, and the kernel
                # does not hand out a just-freed index again right away.
                self._names[index] = name
            else:
                name = self._names.get(index)
            if header["sequence_number"] == self._dump_seq and header["pid"] == self._portid:
                return False  # our own dump reply, not a change
            return name != self._ignore_ifname
        if event in _ADDR_EVENTS:
            index = message["index"]
            if _is_link_scoped(message.get_attr("IFA_ADDRESS")):
                return False
        elif event in _ROUTE_EVENTS:
            index = message.get_attr("RTA_OIF")
            table = message.get_attr("RTA_TABLE") or message.get("table")
            if table == _RT_TABLE_LOCAL or _is_link_scoped(message.get_attr("RTA_DST")):
                return False
        else:
            if (event == "NLMSG_DONE" and header["sequence_number"] == self._dump_seq
                    and header["pid"] == self._portid):
                return self._dump_finished()
            return False  # errors and the like
        if index is not None and index not in self._names and self._dump_pending:
            # Events queued before our link dump's answer (e.g. the TUN being configured
            # right after we subscribed) name interfaces we cannot name yet: decide later.
            self._held.append(message)
            return False
        return index is None or self._names.get(index) != self._ignore_ifname

    def _dump_finished(self) -> bool:
        """Every link is named now: judge the events held back while the dump ran."""
        self._dump_pending = False
        held, self._held = self._held, []
        return any(self._is_change(message) for message in held)

    def _request_link_dump(self) -> None:
        """Ask for every link on the monitor socket; replies fill the index -> name map."""
        assert self._sock is not None
        self._dump_pending = True
        self._dump_seq += 1
        ifinfomsg = struct.pack("BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
        header = struct.pack(
            "IHHII", 16 + len(ifinfomsg), RTM_GETLINK, _NLM_F_REQUEST | _NLM_F_DUMP,
            self._dump_seq, 0,
        )  # fmt: skip
        try:
            self._sock.sendto(header + ifinfomsg, (0, 0))
        except OSError as exc:
            logger.warning("Network monitor cannot list links: %s", exc)
