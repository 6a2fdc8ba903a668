"""DNS resolution for DNS resources, off the actor threads, with the 1.4 gateway's 10 s timeout.

``getaddrinfo`` cannot be cancelled, so a worker pool runs it and a watchdog answers with an
empty list when the deadline passes first (rust/gateway/src/eventloop.rs: error or timeout = empty).
At most ``max_in_flight`` resolutions run; excess requests are answered empty at once.
A lookup keeps its slot until ``getaddrinfo`` really returns, also after the watchdog has
answered for it: otherwise lookups that hang longer than the timeout would queue behind
the pool without bound. Per client, ``gateway.peer`` caps the lookups in flight (32), so
one client cannot take this whole budget.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ResolveCallback = Callable[[list[IPAddress]], None]

RESOLVE_TIMEOUT = 10.0


def system_resolve(domain: str) -> list[IPAddress]:
    """IPv6 results followed by IPv4 results, as the reference gateway orders them."""
    out: list[IPAddress] = []
    for family in (socket.AF_INET6, socket.AF_INET):
        try:
            infos = socket.getaddrinfo(domain, None, family, socket.SOCK_STREAM)
        except OSError:
            continue
        for info in infos:
            ip = ipaddress.ip_address(info[4][0])
            if ip not in out:
                out.append(ip)
    return out


class Resolver:
    """Runs ``resolve_fn`` on a small pool; every request's callback fires exactly once."""

    def __init__(
        self,
        resolve_fn: Callable[[str], list[IPAddress]] = system_resolve,
        *,
        timeout: float = RESOLVE_TIMEOUT,
        max_in_flight: int = 1000,
    ) -> None:
        self._resolve_fn = resolve_fn
        self._timeout = timeout
        # A worker per lookup in flight (started only when needed): with fewer, lookups that
        # hang (a blackholed domain a client keeps asking for) would hold the pool and make
        # every other client's lookups time out empty (rust/gateway/src/eventloop.rs: 1000
        # concurrent).
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="Resolver")
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        #: lookups answered empty at once because every slot was taken
        self.refused = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Lookups holding a slot (running, or hung past their watchdog)."""
        return self._in_flight

    def resolve(self, domain: str, callback: ResolveCallback) -> None:
        with self._lock:
            if self._in_flight >= self._max_in_flight:
                self.refused += 1
                refused = self.refused
            else:
                refused = 0
                self._in_flight += 1
        if refused:
            if refused == 1 or refused % 1000 == 0:
                log.warning("too many DNS resolutions in flight; %s answered empty "
                            "(%d so far)", domain, refused)
            callback([])
            return
        done = threading.Event()

        def finish(result: list[IPAddress]) -> None:
            with self._lock:
                if done.is_set():
                    return
                done.set()
            callback(result)

        def work() -> None:
            try:
                finish(self._resolve_fn(domain))
            except Exception as exc:
                log.info("resolving %s failed: %s", domain, exc)
                finish([])
            finally:
                with self._lock:
                    self._in_flight -= 1

        watchdog = threading.Timer(self._timeout, lambda: finish([]))
        watchdog.daemon = True
        watchdog.name = "ResolverWatchdog"
        watchdog.start()
        self._pool.submit(work).add_done_callback(lambda _f: watchdog.cancel())

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
