"""Start-up checks on fake /proc data; the iptables fallback with a fake firewall."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from actors import checks
from actors.checks import (
    PRIVILEGE_MESSAGE,
    apply_host_setup,
    check_forwarding,
    check_privileges,
    check_tun,
    has_cap_net_admin,
)
from actors.io import tun_linux
from tests.support.interop import skip_or_fail

STATUS = "Name:\tpython\nCapInh:\t0000000000000000\nCapPrm:\t{0}\nCapEff:\t{0}\n"


@pytest.mark.parametrize(
    ("cap_eff", "expected"),
    [
        ("0000000000001000", True),  # exactly bit 12
        ("000001fffeffffff", True),
        ("0000000000000000", False),
        ("0000000000002fff", False),  # bits 0-11 and 13, not 12
    ],
)
def test_cap_net_admin_parsing(cap_eff: str, expected: bool) -> None:
    assert has_cap_net_admin(STATUS.format(cap_eff)) is expected


def test_cap_parsing_tolerates_garbage() -> None:
    assert has_cap_net_admin("CapEff:\tzz\n") is False
    assert has_cap_net_admin("") is False


def test_check_privileges(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text(STATUS.format("0000000000000000"))
    assert check_privileges(euid=0, status_path=str(status)) is None
    assert check_privileges(euid=1000, status_path=str(status)) == PRIVILEGE_MESSAGE
    status.write_text(STATUS.format("0000000000001000"))
    assert check_privileges(euid=1000, status_path=str(status)) is None
    assert check_privileges(euid=1000, status_path=str(tmp_path / "none")) == PRIVILEGE_MESSAGE


def _cannot_mknod(path: str = "") -> None:
    raise PermissionError(errno.EPERM, "Operation not permitted", path)


def test_check_tun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    regular = tmp_path / "file"
    regular.write_text("")
    assert "not a character device" in (check_tun(str(regular)) or "")
    if os.path.exists("/dev/null"):
        assert check_tun("/dev/null") is None  # a character device we may open
    monkeypatch.setattr(tun_linux, "ensure_device_node", _cannot_mknod)
    missing = check_tun(str(tmp_path / "tun"))
    assert missing is not None and "missing" in missing and "--device" in missing
    assert "Operation not permitted" in missing  # why it could not be created


def test_check_tun_creates_a_missing_device_node(tmp_path: Path) -> None:
    """The check makes the node the gateway would make
    (rust/bin-shared/src/tun_device_manager/linux.rs) instead of refusing to start: parent directory
    0751, character device 10:200."""
    path = tmp_path / "dev" / "net" / "tun"
    problem = check_tun(str(path))
    if problem is not None and "cannot be created" in problem:
        skip_or_fail(f"mknod needs root or CAP_MKNOD: {problem}")
    info = path.stat()
    assert stat.S_ISCHR(info.st_mode)
    assert (os.major(info.st_rdev), os.minor(info.st_rdev)) == (10, 200)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o751
    if problem is not None:  # created; opening needs the tun driver
        assert "modprobe tun" in problem, problem
        skip_or_fail(f"no tun driver: {problem}")
    assert check_tun(str(path)) is None  # present now: nothing more to do


def test_check_tun_uses_the_gateways_mknod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a copy: the check runs ``ensure_device_node`` itself, on the path checked."""
    calls: list[str] = []
    monkeypatch.setattr(tun_linux, "ensure_device_node", calls.append)
    check_tun(str(tmp_path / "tun"))
    assert calls == [str(tmp_path / "tun")]


@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (errno.ENODEV, "modprobe tun"),
        (errno.ENXIO, "modprobe tun"),
        (errno.EPERM, "cannot open"),
        (errno.EACCES, "cannot open"),
    ],
)
def test_check_tun_fails_when_the_device_cannot_be_opened(
    monkeypatch: pytest.MonkeyPatch, error: int, fragment: str
) -> None:
    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        raise OSError(error, os.strerror(error), path)

    monkeypatch.setattr(checks.os, "open", refuse)
    problem = check_tun("/dev/null")
    assert problem is not None and fragment in problem and os.strerror(error) in problem


def _fake_proc(tmp_path: Path, values: dict[str, str]) -> Path:
    for name, value in values.items():
        path = tmp_path.joinpath(*name.split("."))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return tmp_path


def test_check_forwarding_warnings(tmp_path: Path) -> None:
    proc = _fake_proc(
        tmp_path,
        {
            "net.ipv4.ip_forward": "0",
            "net.ipv4.conf.all.src_valid_mark": "1",
            "net.ipv6.conf.all.forwarding": "0",
            "net.ipv6.conf.all.disable_ipv6": "0",
        },
    )
    warnings = check_forwarding(proc)
    assert len(warnings) == 2
    assert warnings[0].startswith("net.ipv4.ip_forward is 0")
    assert warnings[1].startswith("net.ipv6.conf.all.forwarding is 0")


def test_check_forwarding_without_ipv6(tmp_path: Path) -> None:
    proc = _fake_proc(
        tmp_path, {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.src_valid_mark": "1"}
    )
    assert check_forwarding(proc) == []


class FakeIptables:
    """Remembers added rules; ``-C`` succeeds only for rules added before."""

    def __init__(self) -> None:
        self.rules: set[tuple[str, ...]] = set()
        self.calls: list[list[str]] = []

    def run(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        binary, rest = Path(args[0]).name, args[1:]
        action = next(a for a in rest if a in ("-C", "-I", "-A"))
        rule = [a for a in rest if a not in ("-C", "-I", "-A", "1")]
        key = (binary, *rule)
        if action == "-C":
            return subprocess.CompletedProcess(args, 0 if key in self.rules else 1, "", "")
        self.rules.add(key)
        return subprocess.CompletedProcess(args, 0, "", "")


def test_iptables_fallback_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    firewall = FakeIptables()
    monkeypatch.setattr(checks, "_run", firewall.run)
    monkeypatch.setattr(
        checks.shutil, "which", lambda name: None if name == "nft" else f"/sbin/{name}"
    )
    proc = _fake_proc(tmp_path, {"net.ipv4.ip_forward": "0"})
    done = apply_host_setup("tun-x", proc_sys=proc)
    assert done[0] == "net.ipv4.ip_forward=1"
    assert (proc / "net" / "ipv4" / "ip_forward").read_text() == "1\n"
    assert "iptables -I FORWARD 1 -i tun-x -j ACCEPT" in done
    assert "ip6tables -t nat -A POSTROUTING -s fd00:2021:1111::/107 ! -o tun-x -j MASQUERADE" in (
        done
    )
    assert len(firewall.rules) == 6
    assert apply_host_setup("tun-x", proc_sys=proc) == []
    assert len(firewall.rules) == 6


def test_failing_firewall_command_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 1, "", "Permission denied (you must be root)")

    monkeypatch.setattr(checks, "_run", fail)
    monkeypatch.setattr(checks.shutil, "which", lambda name: f"/sbin/{name}")
    with pytest.raises(checks.HostSetupError, match="Permission denied"):
        apply_host_setup("tun-x", proc_sys=tmp_path)
