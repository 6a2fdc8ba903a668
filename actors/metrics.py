"""A small thread-safe metrics registry rendered in the Prometheus text format (0.0.4).

Counters and gauges with labels; actors that count per packet register a collector
instead, so the hot path keeps plain integers and the registry reads them at scrape time.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

log = logging.getLogger(__name__)

COUNTER = "counter"
GAUGE = "gauge"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The metrics the gateway feeds: name -> (kind, help).
GATEWAY_METRICS: dict[str, tuple[str, str]] = {
    "firezone_connections": (GAUGE, "Client connections by path (direct, relay, connecting)."),
    "firezone_handshakes_total": (COUNTER, "Completed WireGuard handshakes."),
    "firezone_rx_bytes_total": (COUNTER, "WireGuard payload bytes received from clients."),
    "firezone_tx_bytes_total": (COUNTER, "WireGuard payload bytes sent to clients."),
    "firezone_dropped_packets_total": (
        COUNTER, "Packets dropped, by reason (gateway/drops.py; tun_ for the TUN device's)."),
    "firezone_node_events_total": (
        COUNTER, "Node-level events and drops, by name (the counters of status): garbage "
        "datagrams, malformed STUN, WireGuard for no connection, UDP reader and send drops."),
    "firezone_portal_reconnects_total": (COUNTER, "Reconnections to the portal."),
    "firezone_portal_malformed_frames_total": (
        COUNTER, "Portal frames refused: unparseable, over the size/nesting/number bounds, "
        "or not a message of the protocol."),
    "firezone_portal_joined": (GAUGE, "1 while joined to the portal's gateway channel."),
    "firezone_resets_total": (COUNTER, "Resets (new WireGuard key, all connections dropped)."),
    "firezone_gc_collections_total": (COUNTER, "Garbage collections, by generation (2 = full)."),
    "firezone_gc_longest_pause_seconds": (
        GAUGE, "Longest garbage collection so far, by generation: every thread waits for it."),
}

LabelKey = tuple[tuple[str, str], ...]


class Sample(NamedTuple):
    """One value of a metric, as collectors return them (plain 3-tuples work too)."""

    name: str
    labels: Mapping[str, str]
    value: float


#: What a collector yields: ``Sample``s or plain ``(name, labels, value)`` tuples.
Collector = Callable[[], Iterable[tuple[str, Mapping[str, str], float]]]


def _label_key(labels: Mapping[str, object]) -> LabelKey:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class Metrics:
    """Counters and gauges keyed by name and labels; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[LabelKey, float]] = {}
        self._collectors: list[Collector] = []

    def describe(self, name: str, kind: str, help: str) -> None:
        """Declare a metric's type and help text (shown even before the first value)."""
        if kind not in (COUNTER, GAUGE):
            raise ValueError(f"metric kind must be counter or gauge, got {kind!r}")
        with self._lock:
            known = self._kinds.get(name)
            if known is not None and known[0] != kind:
                raise ValueError(f"{name} is a {known[0]}, not a {kind}")
            self._kinds[name] = (kind, help)

    def _ensure(self, name: str, kind: str) -> dict[LabelKey, float]:
        known = self._kinds.setdefault(name, (kind, ""))
        if known[0] != kind:
            raise ValueError(f"{name} is a {known[0]}, not a {kind}")
        return self._values.setdefault(name, {})

    def inc(self, name: str, value: float = 1, **labels: object) -> None:
        """Add ``value`` (>= 0) to a counter."""
        if value < 0:
            raise ValueError(f"counter {name} cannot decrease (got {value})")
        with self._lock:
            series = self._ensure(name, COUNTER)
            key = _label_key(labels)
            series[key] = series.get(key, 0) + value

    def set(self, name: str, value: float, **labels: object) -> None:
        """Set a gauge."""
        with self._lock:
            self._ensure(name, GAUGE)[_label_key(labels)] = value

    def get(self, name: str, **labels: object) -> float:
        """Current value of one series (0 when never set); for tests and status output."""
        with self._lock:
            return self._values.get(name, {}).get(_label_key(labels), 0)

    def add_collector(self, collector: Collector) -> None:
        """Call ``collector`` at every scrape; its samples are rendered with the rest."""
        with self._lock:
            self._collectors.append(collector)

    def remove_collector(self, collector: Collector) -> None:
        with self._lock:
            if collector in self._collectors:
                self._collectors.remove(collector)

    def render(self) -> str:
        """The Prometheus text exposition of every metric, sorted by name and labels."""
        with self._lock:
            kinds = dict(self._kinds)
            series = {name: dict(values) for name, values in self._values.items()}
            collectors = list(self._collectors)
        for collector in collectors:  # outside the lock: collectors may be slow
            try:
                samples = list(collector())
            except Exception:
                log.exception("metrics collector %r failed; its samples are skipped", collector)
                continue
            for name, labels, value in samples:
                values = series.setdefault(name, {})
                key = _label_key(labels)
                values[key] = values.get(key, 0) + value
        lines: list[str] = []
        for name in sorted(set(kinds) | set(series)):
            kind, help_text = kinds.get(name, ("untyped", ""))
            if help_text:
                lines.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2)}")
            lines.append(f"# TYPE {name} {kind}")
            for key, value in sorted(series.get(name, {}).items()):
                label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                selector = f"{name}{{{label_text}}}" if label_text else name
                lines.append(f"{selector} {_format_value(value)}")
        return "\n".join(lines) + "\n" if lines else ""


def node_event_samples(counters: Mapping[str, float]) -> list[tuple[str, dict[str, str], float]]:
    """The node's counters (``status``'s ``counters``) as ``firezone_node_events_total``;
    their names are those of :mod:`gateway.drops` (errno-suffixed ones by the errno), so
    bounded; a :class:`~gateway.drops.Drop` key is labelled with its plain string."""
    return [("firezone_node_events_total", {"event": str(name)}, float(count))
            for name, count in counters.items()]


def new_gateway_metrics() -> Metrics:
    """A registry with the gateway's metrics described."""
    metrics = Metrics()
    for name, (kind, help_text) in GATEWAY_METRICS.items():
        metrics.describe(name, kind, help_text)
    return metrics
