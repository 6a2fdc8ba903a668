"""The User-Agent of the portal connection (rust/phoenix-channel/src/get_user_agent.rs).

``<os>/<version> connlib/<version> (<arch>; <kernel release>)``. The ``connlib/<semver>``
token is what the portal parses (it routes >= 1.4 clients only to >= 1.4.0 gateways);
the rest is informational.
"""

from __future__ import annotations

import platform
from pathlib import Path

from gateway import COMPATIBLE_FIREZONE_VERSION


def _os_release(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return values
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("\"'")
    return values


def os_name_and_version(path: Path = Path("/etc/os-release")) -> tuple[str, str]:
    """E.g. ``("Debian", "12")``; falls back to ``platform`` when os-release is missing."""
    info = _os_release(path)
    name = info.get("NAME") or platform.system() or "Linux"
    name = name.replace(" GNU/Linux", "").replace("/", "-").strip() or "Linux"
    version = info.get("VERSION_ID") or "unknown"
    return name, version.replace(" ", "_")


def build_user_agent(
    os_name: str,
    os_version: str,
    arch: str,
    kernel: str,
    version: str = COMPATIBLE_FIREZONE_VERSION,
) -> str:
    details = "; ".join(part for part in (arch, kernel) if part)
    suffix = f" ({details})" if details else ""
    return f"{os_name}/{os_version} connlib/{version}{suffix}"


def user_agent(os_release: Path = Path("/etc/os-release")) -> str:
    """The User-Agent of this host."""
    name, version = os_name_and_version(os_release)
    return build_user_agent(name, version, platform.machine(), platform.release())
