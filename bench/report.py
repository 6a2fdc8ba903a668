"""Figures, their summary (median, min, max), the printed table and ``latest.json``."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Results:
    """Samples per figure name; every figure keeps its unit and a note on how it was taken."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value: float | None, unit: str, note: str = "") -> None:
        self.units[name] = unit
        if note:
            self.notes[name] = note
        if value is not None:
            self.samples.setdefault(name, []).append(float(value))
        else:
            self.samples.setdefault(name, [])

    def figure(self, name: str) -> dict[str, Any]:
        values = self.samples.get(name, [])
        out: dict[str, Any] = {"unit": self.units.get(name, ""), "n": len(values),
                               "samples": [round(v, 6) for v in values]}
        if values:
            out.update(median=statistics.median(values), min=min(values), max=max(values))
        if name in self.notes:
            out["note"] = self.notes[name]
        return out

    def median(self, name: str) -> float | None:
        values = self.samples.get(name)
        return statistics.median(values) if values else None

    def ratios(self) -> dict[str, float | None]:
        def ratio(a: str, b: str) -> float | None:
            x, y = self.median(a), self.median(b)
            return None if x is None or not y else x / y

        return {
            "tcp1_vs_wireguard_go": ratio("gateway.tcp1_up_mbps", "wireguard-go.tcp1_up_mbps"),
            "tcp1_down_vs_wireguard_go": ratio("gateway.tcp1_down_mbps",
                                               "wireguard-go.tcp1_down_mbps"),
            "tcp4_vs_wireguard_go": ratio("gateway.tcp4_up_mbps", "wireguard-go.tcp4_up_mbps"),
            "tcp1_vs_routed": ratio("gateway.tcp1_up_mbps", "routed.tcp1_up_mbps"),
            "wireguard_go_tcp1_vs_routed": ratio("wireguard-go.tcp1_up_mbps",
                                                 "routed.tcp1_up_mbps"),
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": _cpus()},
            "run": self.info,
            "figures": {name: self.figure(name) for name in sorted(self.samples)},
            "ratios": self.ratios(),
        }

    def write(self, path: Path | None = None) -> Path:
        path = path or RESULTS / "latest.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json(), indent=2, sort_keys=True) + "\n")
        return path

    def table(self) -> str:
        lines = [f"{'figure':<52} {'median':>11} {'min':>11} {'max':>11}  n  unit"]
        for name in sorted(self.samples):
            values = self.samples[name]
            if not values:
                lines.append(f"{name:<52} {'-':>11} {'-':>11} {'-':>11}  0  {self.units[name]}")
                continue
            lines.append(
                f"{name:<52} {_fmt(statistics.median(values)):>11} {_fmt(min(values)):>11} "
                f"{_fmt(max(values)):>11} {len(values):>2}  {self.units[name]}"
            )
        lines.append("")
        for name, value in self.ratios().items():
            lines.append(f"ratio {name:<46} {'-' if value is None else f'{value:.3f}'}")
        return "\n".join(lines)


def _fmt(value: float) -> str:
    if value == 0 or 0.01 <= abs(value) < 1e6:
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return f"{value:.3g}"


def _cpus() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{os.cpu_count()} x {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return str(os.cpu_count())
