"""The systemd unit's required settings, and gateway-init.sh inside a throw-away namespace."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devstack import netns
from gateway.exit_codes import ExitCode
from tests.support.interop import require_bin, require_netns, skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "config" / "firezone-gateway.service"
INIT = ROOT / "config" / "gateway-init.sh"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values in order (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    return unit["Service"]


def test_capabilities_and_credentials(service: dict[str, list[str]]) -> None:
    assert service["AmbientCapabilities"] == ["CAP_NET_ADMIN"]
    assert service["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert service["LoadCredential"] == ["FIREZONE_TOKEN:/etc/firezone/gateway-token"]
    assert service["User"] == ["firezone"]


def test_environment_files(service: dict[str, list[str]]) -> None:
    """Upstream's pair (rust/gateway/debian/firezone-gateway.service), both optional; the operator's
    file is read last, so its settings win over the installer's preset (systemd: later assignments
    win)."""
    assert service["EnvironmentFile"] == [
        "-/etc/firezone/gateway-preset-env",
        "-/etc/firezone/gateway-env",
    ]


#: Threads the gateway needs per connected client (one Pykka PeerActor each) and the
#: clients a unit must allow at least (bench/README.md measures 5,000).
CLIENTS = 5_000


def _allows(limits: list[str], threads: int) -> bool:
    (value,) = limits
    return value == "infinity" or int(value) >= threads


@pytest.mark.parametrize("key", ["LimitNPROC", "TasksMax"])
def test_thread_limits_do_not_cap_the_clients(service: dict[str, list[str]], key: str) -> None:
    """Both count every thread; systemd's default TasksMax is 15 % of kernel.pid_max (4915
    with 32768), and upstream's LimitNPROC=512 stops the gateway at about 500 clients."""
    assert key in service, f"{key} unset: the default may cap the clients"
    assert _allows(service[key], threads=2 * CLIENTS), service[key]


def test_restart_policy(service: dict[str, list[str]]) -> None:
    assert service["Restart"] == ["always"]
    prevented = service["RestartPreventExitStatus"][0].split()
    assert str(int(ExitCode.AUTH_REJECTED)) in prevented
    assert str(int(ExitCode.FATAL)) not in prevented  # runtime failures do restart


def test_directories(service: dict[str, list[str]]) -> None:
    assert service["RuntimeDirectory"] == ["firezone-gateway"]
    assert service["RuntimeDirectoryMode"] == ["0700"]
    assert service["StateDirectory"] == ["firezone"]
    assert any("/run/firezone-gateway/control.sock" in v for v in service["ExecStart"])


def test_init_script_runs_privileged(service: dict[str, list[str]]) -> None:
    (pre,) = service["ExecStartPre"]
    assert pre.startswith("+") and pre.endswith("gateway-init.sh")


def test_hardening(service: dict[str, list[str]]) -> None:
    families = service["RestrictAddressFamilies"][0].split()
    assert {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"} == set(families)
    for key, value in {
        "NoNewPrivileges": "true",
        "PrivateTmp": "true",
        "ProtectHome": "read-only",
        "RestrictNamespaces": "yes",
        "LockPersonality": "true",
        "MemoryDenyWriteExecute": "true",
        "SystemCallFilter": "@system-service",
        "LimitCORE": "0",
    }.items():
        assert service[key] == [value], key
    assert "PrivateDevices" not in service  # it would hide /dev/net/tun
    assert service["DeviceAllow"] == ["/dev/net/tun rw"]


MDWE_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        sys.exit(77)
    import mmap
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("MDWE not effective")
    except OSError:
        pass
    import nacl.public
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from pyroute2 import IPRoute
    nacl.public.Box(nacl.public.PrivateKey.generate(), nacl.public.PrivateKey.generate().public_key)
    ChaCha20Poly1305(ChaCha20Poly1305.generate_key()).encrypt(bytes(12), b"x", None)
    with IPRoute() as ipr:
        ipr.get_links()
    cmp = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
    values = (ctypes.c_int * 3)(3, 1, 2)
    libc.qsort(values, 3, ctypes.sizeof(ctypes.c_int), cmp(lambda a, b: a[0] - b[0]))
    assert list(values) == [1, 2, 3]
    """
)


def test_dependencies_work_without_write_execute_memory() -> None:
    """Backs MemoryDenyWriteExecute=true: the kernel's MDWE prctl is the same restriction."""
    result = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE], capture_output=True, text=True, timeout=60
    )
    if result.returncode == 77:
        skip_or_fail("kernel without PR_SET_MDWE (Linux < 6.3)")
    assert result.returncode == 0, result.stderr


# --- gateway-init.sh in a namespace ----------------------------------------------------------

SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.conf.all.src_valid_mark": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv6.conf.default.forwarding": "1",
    "net.ipv6.conf.all.disable_ipv6": "0",
}


def _sysctl(ns: str, name: str) -> str:
    path = "/proc/sys/" + name.replace(".", "/")
    return netns.run("cat", path, ns=ns).stdout.strip()


def _init(ns: str, tun: str = "tun-firezone") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "env", f"FIREZONE_TUN_NAME={tun}", "bash", str(INIT)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )


def _host_setup(ns: str, tun: str = "tun-firezone") -> str:
    code = f"from actors.checks import apply_host_setup; print(apply_host_setup({tun!r}))"
    return netns.run(sys.executable, "-c", code, ns=ns).stdout.strip()


@pytest.mark.netns
def test_init_script_sets_sysctls_and_rules_idempotently() -> None:
    require_netns()
    require_bin("nft", "nftables")
    with netns.namespaces("fzi") as (ns,):
        assert _sysctl(ns, "net.ipv4.ip_forward") == "0"  # a fresh namespace forwards nothing
        first = _init(ns, "tun-test")
        assert "net.ipv4.ip_forward=1" in first.stdout
        for name, value in SYSCTLS.items():
            assert _sysctl(ns, name) == value, name
        ruleset = netns.run("nft", "list", "ruleset", ns=ns).stdout
        assert 'iifname "tun-test" accept' in ruleset
        assert 'oifname "tun-test" accept' in ruleset
        assert 'oifname != "tun-test" ip saddr 100.64.0.0/11 masquerade' in ruleset
        assert 'oifname != "tun-test" ip6 saddr fd00:2021:1111::/107 masquerade' in ruleset
        second = _init(ns, "tun-test")
        assert second.stdout == ""  # no sysctl changed
        assert netns.run("nft", "list", "ruleset", ns=ns).stdout == ruleset


@pytest.mark.netns
def test_init_script_and_apply_host_setup_agree() -> None:
    require_netns()
    require_bin("nft", "nftables")
    with netns.namespaces("fzs", "fzp") as (by_script, by_python):
        _init(by_script)
        done = _host_setup(by_python)
        assert "net.ipv4.ip_forward=1" in done and "nft table" in done
        assert _host_setup(by_python) == "[]"  # idempotent: nothing to do the second time
        for name, value in SYSCTLS.items():
            assert _sysctl(by_python, name) == value, name
        rules = [netns.run("nft", "list", "ruleset", ns=ns).stdout for ns in (by_script, by_python)]
        assert rules[0] == rules[1]


def test_init_script_rejects_a_bad_tun_name() -> None:
    result = subprocess.run(
        ["bash", str(INIT)],
        env={"FIREZONE_TUN_NAME": 'x" accept; drop', "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "invalid FIREZONE_TUN_NAME" in result.stderr
