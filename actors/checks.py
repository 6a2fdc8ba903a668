"""Start-up checks (privileges, TUN device, forwarding) and the optional host set-up.

The host set-up is what ``config/gateway-init.sh`` does for the systemd unit (Firezone's
rust/docker-init-gateway.sh and scripts/gateway-systemd-install.sh), for deployments that let the
gateway do it itself (``setup_host``): forwarding sysctls, FORWARD accept for the tunnel and
MASQUERADE restricted to the tunnel's source ranges. It is idempotent and uses ``nft`` when present,
else ``iptables``/``ip6tables``.

Caveat of the nft path: an ``accept`` in our own table does not override a ``drop`` in
another table's forward chain (e.g. Docker's iptables FORWARD policy DROP); such hosts need
the accept rules in that chain too.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

CAP_NET_ADMIN = 12
PRIVILEGE_MESSAGE = (
    "firezone-gateway needs to be executed as `root` or with the `CAP_NET_ADMIN` capability."
)
TUN_PATH = "/dev/net/tun"
PROC_SYS = Path("/proc/sys")
#: The tunnel address ranges clients use as their source (``IPV4_PEERS``, ``IPV6_PEERS`` in
#: rust/connlib/tunnel/src/gateway.rs).
IPV4_TUNNEL_RANGE = "100.64.0.0/11"
IPV6_TUNNEL_RANGE = "fd00:2021:1111::/107"
NFT_TABLE = "firezone_gateway"
#: sysctl name -> value the gateway needs (rust/docker-init-gateway.sh).
SYSCTLS: dict[str, str] = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.conf.all.src_valid_mark": "1",
    "net.ipv6.conf.all.disable_ipv6": "0",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv6.conf.default.forwarding": "1",
}


class HostSetupError(OSError):
    """A firewall command failed during the host set-up."""


def has_cap_net_admin(proc_status: str) -> bool:
    """Whether the ``CapEff`` line of a ``/proc/<pid>/status`` text has CAP_NET_ADMIN."""
    for line in proc_status.splitlines():
        name, _, value = line.partition(":")
        if name == "CapEff":
            try:
                return bool(int(value.strip(), 16) >> CAP_NET_ADMIN & 1)
            except ValueError:
                return False
    return False


def check_privileges(euid: int | None = None, status_path: str = "/proc/self/status") -> str | None:
    """None when running as root or with effective CAP_NET_ADMIN, else the message to print."""
    if (os.geteuid() if euid is None else euid) == 0:
        return None
    try:
        status = Path(status_path).read_text()
    except OSError:
        return PRIVILEGE_MESSAGE
    return None if has_cap_net_admin(status) else PRIVILEGE_MESSAGE


def check_tun(path: str = TUN_PATH) -> str | None:
    """None when the TUN clone device is usable, else what is wrong and how to fix it.

    A missing node is created first, as the gateway itself would before opening it
    (rust/bin-shared/src/tun_device_manager/linux.rs; rust/gateway/src/main.rs), so only a device
    that still cannot be opened stops start-up.
    """
    from actors.io import tun_linux  # the module attribute: tests replace it

    try:
        tun_linux.ensure_device_node(path)
    except OSError as exc:
        return (
            f"{path} is missing and cannot be created ({exc.strerror or exc}): load the `tun` "
            f"kernel module (modprobe tun), or pass the device to the container "
            f"(--device {path})"
        )
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot inspect {path}: {exc.strerror}"
    if not stat.S_ISCHR(mode):
        return f"{path} is not a character device"
    try:
        # Opening the clone device without TUNSETIFF creates nothing; it is what the
        # gateway does first, under the same permissions and device policy (a cgroup or
        # systemd DeviceAllow= refusal shows only here, not in access()).
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            return (
                f"cannot open {path} ({exc.strerror}): the `tun` kernel module is not "
                "loaded (modprobe tun)"
            )
        return (
            f"cannot open {path} for reading and writing ({exc.strerror}): root or "
            "CAP_NET_ADMIN needed, and containers must be given the device"
        )
    return None


def _sysctl_path(name: str, proc_sys: Path) -> Path:
    return proc_sys.joinpath(*name.split("."))


def _read_sysctl(name: str, proc_sys: Path) -> str | None:
    try:
        return _sysctl_path(name, proc_sys).read_text().strip()
    except OSError:
        return None


def check_forwarding(proc_sys: Path = PROC_SYS) -> list[str]:
    """Warnings for sysctls that would stop forwarding (missing IPv6 is not a problem)."""
    warnings = []
    for name, wanted in SYSCTLS.items():
        if name.endswith("default.forwarding"):
            continue  # only matters for interfaces created later
        current = _read_sysctl(name, proc_sys)
        if current is not None and current != wanted:
            warnings.append(
                f"{name} is {current}, the gateway needs {wanted}: run gateway-init.sh, "
                f"enable setup_host, or set it with sysctl"
            )
    return warnings


def nft_ruleset(tun_name: str) -> str:
    """Our whole nft table; loading it replaces the previous version atomically."""
    return (
        f"table inet {NFT_TABLE}\n"
        f"delete table inet {NFT_TABLE}\n"
        f"table inet {NFT_TABLE} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f'    iifname "{tun_name}" accept\n'
        f'    oifname "{tun_name}" accept\n'
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname != "{tun_name}" ip saddr {IPV4_TUNNEL_RANGE} masquerade\n'
        f'    oifname != "{tun_name}" ip6 saddr {IPV6_TUNNEL_RANGE} masquerade\n'
        "  }\n"
        "}\n"
    )


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)


def _apply_nft(nft: str, tun_name: str) -> list[str]:
    def current() -> str | None:
        listed = _run([nft, "list", "table", "inet", NFT_TABLE])
        return listed.stdout if listed.returncode == 0 else None

    before = current()
    result = _run([nft, "-f", "-"], stdin=nft_ruleset(tun_name))
    if result.returncode != 0:
        raise HostSetupError(f"nft failed: {result.stderr.strip()}")
    if current() == before:
        return []
    return [
        f"nft table inet {NFT_TABLE}: accept forwarding via {tun_name}, masquerade "
        f"{IPV4_TUNNEL_RANGE} and {IPV6_TUNNEL_RANGE}"
    ]


def iptables_commands(tun_name: str) -> list[tuple[str, list[str], list[str]]]:
    """(binary, check args, add args) per rule: FORWARD accept inserted first, masquerade."""
    commands = []
    for binary, source in (("iptables", IPV4_TUNNEL_RANGE), ("ip6tables", IPV6_TUNNEL_RANGE)):
        for direction in ("-i", "-o"):
            rule = [direction, tun_name, "-j", "ACCEPT"]
            commands.append((binary, ["-C", "FORWARD", *rule], ["-I", "FORWARD", "1", *rule]))
        rule = ["-s", source, "!", "-o", tun_name, "-j", "MASQUERADE"]
        commands.append(
            (
                binary,
                ["-t", "nat", "-C", "POSTROUTING", *rule],
                ["-t", "nat", "-A", "POSTROUTING", *rule],
            )
        )
    return commands


def _apply_iptables(tun_name: str) -> list[str]:
    done = []
    for binary, check, add in iptables_commands(tun_name):
        path = shutil.which(binary)
        if path is None:
            log.warning("%s not found; skipping %s", binary, " ".join(add))
            continue
        if _run([path, *check]).returncode == 0:
            continue
        result = _run([path, *add])
        if result.returncode != 0:
            raise HostSetupError(f"{binary} {' '.join(add)} failed: {result.stderr.strip()}")
        done.append(f"{binary} {' '.join(add)}")
    return done


def apply_host_setup(tun_name: str = "tun-firezone", proc_sys: Path = PROC_SYS) -> list[str]:
    """Enable forwarding and add the firewall rules; returns what changed (empty if nothing).

    Raises :class:`HostSetupError` when a firewall command fails.
    """
    done = []
    for name, wanted in SYSCTLS.items():
        current = _read_sysctl(name, proc_sys)
        if current is None or current == wanted:
            continue  # absent: e.g. IPv6 disabled on the kernel command line
        try:
            _sysctl_path(name, proc_sys).write_text(wanted + "\n")
        except OSError as exc:
            log.warning("cannot set %s=%s: %s", name, wanted, exc.strerror or exc)
            continue
        done.append(f"{name}={wanted}")
    nft = shutil.which("nft")
    if nft is not None:
        done += _apply_nft(nft, tun_name)
    elif shutil.which("iptables") or shutil.which("ip6tables"):
        done += _apply_iptables(tun_name)
    else:
        log.warning(
            "neither nft nor iptables found: add FORWARD accept and MASQUERADE rules yourself"
        )
    return done
