"""When CPython's cyclic garbage collector may stop the gateway, and for how long.

The collector holds the GIL while it walks the objects of the generation it collects, so
every thread stops: the UDP and TUN readers, the Timer, every actor. A full (generation 2)
collection walks every tracked object, and a gateway holds about 110-160 per client (its
PeerActor's thread, inbox and events, the ICE agent, the tunnel, counters ...). At 5,000
clients a full collection walked ~780,000 objects and stopped the data path for up to
370 ms of CPU (410 ms and more of wall time), and CPython runs one whenever a quarter more
objects have become long-lived: ten times while 5,000 clients connected (bench/README.md).

The policy:

* After every full collection the survivors are frozen (``gc.freeze``), so later
  collections skip them and each walks only what became long-lived since the previous one
  (longest 74-78 ms at 5,000 clients). The start-up heap is frozen at install.
* Frozen objects that die by reference counting are freed at once as before. Only garbage
  in reference cycles among frozen objects (a departed client's session, say) waits:
  :meth:`GcPolicy.maybe_reclaim` unfreezes everything and runs one full collection once the
  frozen set has grown by a quarter since the last reclaim (the collector's own rule,
  applied to what it no longer sees), and at most every ``min_interval`` seconds, so a
  storm of new connections costs at most one full pass per interval.

Nothing here takes a lock: the callback runs inside a collection, which may start on any
thread at any allocation, also while that thread holds a lock. Counters are plain
attributes (single stores under the GIL), read by ``status`` from other threads.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from actors.clock import Clock
from actors.timer import TimerHandle

log = logging.getLogger(__name__)

#: At most one full pass over everything (unfreeze + collect) this often.
RECLAIM_MIN_INTERVAL = 600.0
#: Reclaim once the frozen objects are this much more than after the last reclaim.
RECLAIM_GROWTH = 0.25
#: How often the Timer asks whether a reclaim is due.
CHECK_INTERVAL = 60.0


class Collector(Protocol):
    """The part of the ``gc`` module the policy uses (a fake in tests)."""

    callbacks: list[Any]

    def collect(self, generation: int = 2) -> int: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...

    def get_freeze_count(self) -> int: ...


class Scheduler(Protocol):
    """The part of :class:`actors.timer.Timer` the policy uses."""

    def schedule_call(self, deadline: float, call: Any) -> TimerHandle: ...

    def cancel(self, handle: TimerHandle) -> None: ...


@dataclass
class Pauses:
    """Collections of one generation: how many, the longest and the last (seconds)."""

    count: int = 0
    longest: float = 0.0
    last: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.last = seconds
        if seconds > self.longest:
            self.longest = seconds


class GcPolicy:
    """Freeze after full collections, reclaim frozen cycles now and then (module docstring)."""

    def __init__(
        self,
        clock: Clock,
        *,
        collector: Collector | None = None,
        min_interval: float = RECLAIM_MIN_INTERVAL,
        growth: float = RECLAIM_GROWTH,
    ) -> None:
        self.clock = clock
        self.collector: Collector = collector if collector is not None else gc
        self.min_interval = min_interval
        self.growth = growth
        #: Per generation 0, 1, 2 (2 = full collections).
        self.pauses = [Pauses(), Pauses(), Pauses()]
        self.reclaims = 0
        self.last_reclaim_pause = 0.0
        self._baseline = 0  # frozen objects right after the last reclaim (or install)
        self._last_reclaim_at = 0.0
        self._started_at: float | None = None
        self._installed = False
        self._timer: Scheduler | None = None
        self._handle: TimerHandle | None = None

    def install(self) -> None:
        """Freeze the start-up heap and hook into every collection from now on."""
        if self._installed:
            return
        self.collector.collect()
        self.collector.freeze()
        self._baseline = self.collector.get_freeze_count()
        self._last_reclaim_at = self.clock.monotonic()
        self.collector.callbacks.append(self._on_collection)
        self._installed = True
        log.info("garbage collector: %d start-up objects frozen; full collections now skip "
                 "whatever survived the previous one", self._baseline)

    def uninstall(self) -> None:
        """Unhook and unfreeze (the collector then sees every object again)."""
        self.stop()
        if not self._installed:
            return
        self._installed = False
        with contextlib.suppress(ValueError):
            self.collector.callbacks.remove(self._on_collection)
        self.collector.unfreeze()

    def start(self, timer: Scheduler) -> None:
        """Ask every ``CHECK_INTERVAL``, on the Timer's thread, whether to reclaim."""
        self._timer = timer
        self._schedule()

    def stop(self) -> None:
        timer, handle = self._timer, self._handle
        self._timer = self._handle = None
        if timer is not None and handle is not None:
            timer.cancel(handle)

    def _schedule(self) -> None:
        if self._timer is not None:
            self._handle = self._timer.schedule_call(
                self.clock.monotonic() + CHECK_INTERVAL, self._tick)

    def _tick(self) -> None:
        try:
            self.maybe_reclaim()
        finally:
            self._schedule()

    def reclaim_due(self) -> bool:
        if not self._installed:
            return False
        if self.clock.monotonic() - self._last_reclaim_at < self.min_interval:
            return False
        return self.collector.get_freeze_count() > self._baseline * (1 + self.growth)

    def maybe_reclaim(self) -> bool:
        """Run :meth:`reclaim` if it is due; True if it ran."""
        if not self.reclaim_due():
            return False
        self.reclaim()
        return True

    def reclaim(self) -> None:
        """One full pass over every object: frees cycles among frozen ones, refreezes."""
        frozen = self.collector.get_freeze_count()
        started = self.clock.monotonic()
        self.collector.unfreeze()
        collected = self.collector.collect()  # the callback freezes the survivors
        self.last_reclaim_pause = self.clock.monotonic() - started
        self._baseline = self.collector.get_freeze_count()
        self._last_reclaim_at = self.clock.monotonic()
        self.reclaims += 1
        log.info("garbage collector: reclaimed %d objects in cycles among %d frozen ones "
                 "(%.0f ms); %d frozen now", collected, frozen,
                 self.last_reclaim_pause * 1e3, self._baseline)

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started_at = self.clock.monotonic()
            return
        generation = info.get("generation", 0)
        if generation == 2 and self._installed:
            # First, before anything can allocate: the young generations are empty now,
            # so exactly the survivors of this collection move out of future walks.
            self.collector.freeze()
        started, self._started_at = self._started_at, None
        if started is not None and 0 <= generation < len(self.pauses):
            self.pauses[generation].add(self.clock.monotonic() - started)

    def status(self) -> dict[str, Any]:
        return {
            "frozen_objects": self.collector.get_freeze_count() if self._installed else 0,
            "collections": [p.count for p in self.pauses],
            "longest_pause_ms": [round(p.longest * 1e3, 2) for p in self.pauses],
            "full_pause_ms_last": round(self.pauses[2].last * 1e3, 2),
            "reclaims": self.reclaims,
            "reclaim_pause_ms_last": round(self.last_reclaim_pause * 1e3, 2),
        }
