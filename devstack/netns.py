"""Network namespaces for tests: every name carries the pid so parallel runs never clash.

Underlay addresses live only inside the namespaces the tests create (10.203.x.0/24); no
namespace gets a default route, so nothing can leave the machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

_counter = itertools.count()
CLONE_NEWNET = 0x40000000


def unique_name(prefix: str) -> str:
    """A name unique to this process and call, at most 15 characters (IFNAMSIZ - 1)."""
    name = f"{prefix}{os.getpid() % 100000}x{next(_counter)}"
    if len(name) > 15:
        raise ValueError(f"interface/netns name too long: {name}")
    return name


def run(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, optionally inside namespace ``ns``."""
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def add(name: str) -> None:
    """Create namespace ``name`` with loopback up."""
    run("ip", "netns", "add", name)
    run("ip", "link", "set", "lo", "up", ns=name)


def delete(name: str) -> None:
    """Delete a namespace (its veths go with it); ignores a missing one."""
    run("ip", "netns", "del", name, check=False)


def veth(ns_a: str, if_a: str, addr_a: str, ns_b: str, if_b: str, addr_b: str) -> None:
    """Link two namespaces with a veth pair created inside ``ns_a`` (nothing in the root ns).

    Addresses are CIDR strings such as ``10.203.1.1/24``.
    """
    run("ip", "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b, ns=ns_a)
    for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
        flags = ["nodad"] if ":" in addr else []
        run("ip", "addr", "add", addr, "dev", ifname, *flags, ns=ns)
        run("ip", "link", "set", ifname, "up", ns=ns)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` on a short-lived thread that has entered namespace ``ns``.

    Sockets and fds created by ``fn`` stay in that namespace after the thread ends.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=body, name=f"setns-{ns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


@contextlib.contextmanager
def namespaces(*prefixes: str) -> Iterator[list[str]]:
    """Create one namespace per prefix and remove them all afterwards."""
    names = [unique_name(p) for p in prefixes]
    try:
        for name in names:
            add(name)
        yield names
    finally:
        for name in names:
            delete(name)
