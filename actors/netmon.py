"""Tell the gateway when its own addresses changed, once per burst of changes.

The app resets every connection when ``on_change`` fires, which is right only when the
gateway roams: the addresses it can be reached on changed. Which addresses count is
decided by ``gateway/roaming.py``; this shell only feeds it from a raw NETLINK_ROUTE
socket subscribed to link and IPv4/IPv6 address events. Routes are not subscribed to at
all (a routing daemon's churn never resets, and a full table costs nothing to ignore), and
link events only name interfaces: our own TUN device is ignored by name, and a link that
brings no usable address (a Docker veth) changes nothing.

Interface names and the starting address set are learnt from a link dump and then an
address dump sent on the monitor socket itself, so the monitor works in whatever
namespace the socket was created in, whichever thread reads it. The set at the end of the
address dump is the baseline; after a lost-events overflow (``ENOBUFS``) both dumps run
again and the result is compared with it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from pyroute2.netlink.rtnl import (
    RTM_GETADDR,
    RTM_GETLINK,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from actors.clock import Clock, SystemClock
from actors.io.tun_linux import TUN_NAME
from gateway.roaming import Debouncer, HostAddresses, IPAddress, Roaming

__all__ = ["DEFAULT_DEBOUNCE", "GROUPS", "Debouncer", "NetworkMonitor", "open_monitor_socket"]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

THREAD_NAME = "NetMonitor"
DEFAULT_DEBOUNCE = 2.0
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
_NETLINK_ROUTE = 0
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_RECV_SIZE = 1 << 17
_JOIN_TIMEOUT = 5.0


def open_monitor_socket() -> socket.socket:
    """A NETLINK_ROUTE socket subscribed to ``GROUPS``, in the calling thread's namespace."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE)
    try:
        sock.bind((0, GROUPS))
    except BaseException:
        sock.close()
        raise
    return sock


class NetworkMonitor:
    """Runs ``on_change()`` on its ``NetMonitor`` thread once per debounced burst that
    changed the gateway's usable addresses (``gateway/roaming.py``)."""

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
        self._addresses = HostAddresses(ignore_ifname)
        self._roaming = Roaming(self._addresses)
        self._debouncer = Debouncer(debounce)
        self._clock = clock or SystemClock()
        self._socket_factory = socket_factory
        self._poll_interval = poll_interval
        self._marshal = MarshalRtnl()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = -1, -1
        self._dump_seq = 0
        self._dump_kind: int | None = None  # RTM_GETLINK or RTM_GETADDR while one runs
        self._redump = False
        self._last_usable: frozenset[IPAddress] = frozenset()
        self._portid = -1
        #: Bursts of events that changed the usable address set, and resets asked for.
        self.changes_seen = 0
        self.callbacks = 0

    @property
    def usable_addresses(self) -> frozenset[IPAddress]:
        """The addresses a reset is judged on, at the last decision (for status and tests)."""
        return self._roaming.baseline or frozenset()

    def start(self) -> None:
        """Subscribe (before returning, so no later change is missed) and start the thread."""
        if self._thread is not None:
            raise RuntimeError("NetworkMonitor already started")
        self._sock = self._socket_factory()
        self._sock.setblocking(False)
        self._portid = self._sock.getsockname()[0]
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._request_dump(RTM_GETLINK)
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
            timeout = self._poll_interval
            if self._dump_kind is None:  # decide only on a complete table
                if self._debouncer.poll(now):
                    self._decide()
                    continue
                deadline = self._debouncer.deadline
                if deadline is not None:
                    timeout = max(0.0, min(timeout, deadline - now))
            if poller.poll(timeout * 1000) and not self._stopping.is_set():
                self._receive()

    def _decide(self) -> None:
        change = self._roaming.settle()
        if change is None:
            return
        logger.info(
            "Host addresses changed (added %s, removed %s): resetting",
            ", ".join(map(str, change.added)) or "none",
            ", ".join(map(str, change.removed)) or "none",
        )
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
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    logger.warning("Network monitor cannot read: %s", exc)
                    return
                # The kernel dropped events for us: read the whole table again.
                if self._dump_kind is None:
                    self._request_dump(RTM_GETLINK)
                else:
                    self._redump = True
                continue
            for message in self._marshal.parse(data):
                self._handle(message)
        if self._dump_kind is None:
            usable = self._addresses.usable()
            if usable != self._last_usable:
                self._last_usable = usable
                self.changes_seen += 1
                self._debouncer.note(self._clock.monotonic())

    def _handle(self, message: Any) -> None:
        event = message.get("event")
        header = message["header"]
        if event in ("RTM_NEWLINK", "RTM_DELLINK"):
            index, name = message["index"], message.get_attr("IFLA_IFNAME")
            if name:
                self._addresses.link(index, name)
            if event == "RTM_DELLINK":
                self._addresses.link_removed(index)
        elif event in ("RTM_NEWADDR", "RTM_DELADDR"):
            # IFA_LOCAL is the local end of a point-to-point address; IFA_ADDRESS otherwise.
            address = message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
            if not isinstance(address, str):
                return
            if event == "RTM_DELADDR":
                self._addresses.removed(message["index"], address)
            else:
                flags = message.get_attr("IFA_FLAGS")
                flags = message["flags"] if flags is None else flags
                self._addresses.added(message["index"], address, int(flags))
        elif (event == "NLMSG_DONE" and header["sequence_number"] == self._dump_seq
                and header["pid"] == self._portid):  # fmt: skip
            self._dump_finished()

    def _dump_finished(self) -> None:
        if self._dump_kind == RTM_GETLINK:
            self._addresses.clear()  # the address dump refills it
            self._request_dump(RTM_GETADDR)
            return
        self._dump_kind = None
        if self._redump:
            self._redump = False
            self._request_dump(RTM_GETLINK)
            return
        if self._roaming.baseline is None:
            self._roaming.settle()  # the addresses we started on
            self._last_usable = self._roaming.baseline or frozenset()
            logger.debug("Host addresses: %s", ", ".join(map(str, sorted(
                self._last_usable, key=lambda ip: (ip.version, int(ip))))) or "none")

    def _request_dump(self, kind: int) -> None:
        """Ask for every link (``RTM_GETLINK``) or address (``RTM_GETADDR``)."""
        assert self._sock is not None
        self._dump_kind = kind
        self._dump_seq += 1
        if kind == RTM_GETLINK:
            body = struct.pack("BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)  # ifinfomsg
        else:
            body = struct.pack("BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0)  # ifaddrmsg
        header = struct.pack(
            "IHHII", 16 + len(body), kind, _NLM_F_REQUEST | _NLM_F_DUMP, self._dump_seq, 0,
        )
        try:
            self._sock.sendto(header + body, (0, 0))
        except OSError as exc:
            logger.warning("Network monitor cannot list %s: %s",
                           "links" if kind == RTM_GETLINK else "addresses", exc)
            self._dump_kind = None
