"""Metrics registry and its Prometheus text rendering."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from actors.metrics import COUNTER, GAUGE, Metrics, Sample, new_gateway_metrics


def test_render_counters_and_gauges_with_labels() -> None:
    metrics = Metrics()
    metrics.describe("firezone_dropped_packets_total", COUNTER, "Packets dropped, by reason.")
    metrics.inc("firezone_dropped_packets_total", reason="filter")
    metrics.inc("firezone_dropped_packets_total", 2, reason="filter")
    metrics.inc("firezone_dropped_packets_total", reason="no_route")
    metrics.set("firezone_portal_joined", 1)
    metrics.set("firezone_portal_joined", 0.5)
    assert metrics.render() == (
        "# HELP firezone_dropped_packets_total Packets dropped, by reason.\n"
        "# TYPE firezone_dropped_packets_total counter\n"
        'firezone_dropped_packets_total{reason="filter"} 3\n'
        'firezone_dropped_packets_total{reason="no_route"} 1\n'
        "# TYPE firezone_portal_joined gauge\n"
        "firezone_portal_joined 0.5\n"
    )


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.set("g", 1, path='re"lay\\1\n')
    assert 'g{path="re\\"lay\\\\1\\n"} 1' in metrics.render()


def test_described_metric_without_values_still_has_type() -> None:
    text = new_gateway_metrics().render()
    assert "# TYPE firezone_connections gauge" in text
    assert "# TYPE firezone_handshakes_total counter" in text
    assert "# HELP firezone_portal_reconnects_total" in text


def test_counters_cannot_decrease_and_kinds_cannot_change() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError):
        metrics.inc("c", -1)
    metrics.inc("c")
    with pytest.raises(ValueError):
        metrics.set("c", 3)
    with pytest.raises(ValueError):
        metrics.describe("c", GAUGE, "now a gauge")


def test_collectors_are_read_at_scrape_time() -> None:
    metrics = new_gateway_metrics()
    rx = {"bytes": 0}

    def collect() -> Iterable[tuple[str, Mapping[str, str], float]]:
        return [
            Sample("firezone_rx_bytes_total", {}, rx["bytes"]),
            ("firezone_connections", {"path": "direct"}, 2),
        ]

    metrics.add_collector(collect)
    rx["bytes"] = 1500
    text = metrics.render()
    assert "firezone_rx_bytes_total 1500\n" in text
    assert 'firezone_connections{path="direct"} 2\n' in text
    metrics.remove_collector(collect)
    assert "firezone_rx_bytes_total 1500" not in metrics.render()


def test_failing_collector_is_skipped() -> None:
    metrics = Metrics()
    metrics.inc("ok_total")

    def broken() -> Iterable[Sample]:
        raise RuntimeError("boom")

    metrics.add_collector(broken)
    assert "ok_total 1" in metrics.render()


def test_concurrent_increments_are_not_lost() -> None:
    metrics = Metrics()

    def work() -> None:
        for _ in range(2000):
            metrics.inc("hits_total", client="a")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert metrics.get("hits_total", client="a") == 8000


def test_special_values() -> None:
    metrics = Metrics()
    metrics.set("g", float("inf"))
    metrics.set("h", 1e20)
    text = metrics.render()
    assert "g +Inf" in text
    assert "h 1e+20" in text


def test_node_counters_are_exported() -> None:
    """The node's drops (in ``status``) reach /metrics through the gateway's collector."""
    from types import SimpleNamespace

    from actors.app import _register_collectors
    from actors.messages import PortalStatus

    counters = {"garbage_datagram": 3, "malformed_stun": 2, "wireguard_no_connection": 1,
                "udp_send_error_101": 4}
    node = {"counters": counters, "resets": 0, "peers": {}, "connections": {}}
    portal = PortalStatus(state="joined", joined_since=None, reconnects=0, url="wss://h")
    tun: dict[str, Any] = {"dropped": {}}
    status = {"clients": [], "tun": tun, "resets": 0, "gc": None, "counters": counters,
              "portal": {"reconnects": 0, "state": "joined"}}

    def ref(answer: object) -> SimpleNamespace:
        return SimpleNamespace(ask=lambda *_a, **_k: answer)

    # Both ways a collector may read the actors: the status, or one ask each.
    runtime = SimpleNamespace(status=lambda: status, node=ref(node), portal=ref(portal),
                              tun=ref(tun), gc_policy=None)
    metrics = new_gateway_metrics()
    _register_collectors(metrics, runtime)  # type: ignore[arg-type]
    text = metrics.render()
    assert "# TYPE firezone_node_events_total counter" in text
    assert 'firezone_node_events_total{event="garbage_datagram"} 3' in text
    assert 'firezone_node_events_total{event="malformed_stun"} 2' in text
    assert 'firezone_node_events_total{event="wireguard_no_connection"} 1' in text
    assert 'firezone_node_events_total{event="udp_send_error_101"} 4' in text
