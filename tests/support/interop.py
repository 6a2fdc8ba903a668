"""Guards for tests that need real peers, root or network namespaces.

Locally a missing peer skips the test; CI sets ``FZ_REQUIRE_INTEROP=1`` so that a broken
install step fails loudly instead of turning the interop suite green by skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def skip_or_fail(msg: str) -> None:
    """Skip locally; fail under FZ_REQUIRE_INTEROP=1 (CI), where nothing may be left out."""
    if os.environ.get("FZ_REQUIRE_INTEROP") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def require_bin(binary: str, package: str) -> None:
    """Skip (or fail under FZ_REQUIRE_INTEROP=1) when ``binary`` is not installed."""
    if shutil.which(binary) is None:
        hint = f"apt-get install -y --no-install-recommends {package}"
        skip_or_fail(f"{binary} not installed ({hint})")


def require_module(module: str) -> None:
    """Skip (or fail) when a test-only Python package is missing."""
    try:
        __import__(module)
    except ImportError:
        skip_or_fail(f"python package {module} not installed (pip install -e '.[test]')")


def require_netns() -> None:
    """Root, /dev/net/tun and working ``ip netns`` are needed."""
    if os.geteuid() != 0:
        skip_or_fail("needs root for network namespaces")
    if not os.path.exists("/dev/net/tun"):
        skip_or_fail("needs /dev/net/tun")
    require_bin("ip", "iproute2")
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, check=False)
    if probe.returncode != 0:
        skip_or_fail(f"ip netns does not work here: {probe.stderr.decode().strip()}")
