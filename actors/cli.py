"""``firezone-gateway`` command line: ``[run] [OPTIONS] [TOKEN]``, ``status``, ``reset``.

``run`` accepts the real gateway's flags (``-u``, ``-n``, ``-i``, ``--no-telemetry``,
``--health-check-addr``) plus ours; every value can also come from the environment or the
YAML file (see config/gateway.example.yaml). Exit codes are :class:`ExitCode`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from gateway import COMPATIBLE_FIREZONE_VERSION, __version__
from gateway.config import DEFAULT_CONTROL_SOCKET, ConfigError, GatewayConfig
from gateway.exit_codes import ExitCode

PROG = "firezone-gateway"
#: ``-V`` prints what the reference prints (rust/gateway/src/main.rs): deployments that check the
#: version of a drop-in replacement compare it with ``firezone-gateway 1.4.0``. Our own
#: package version is in ``--help``.
VERSION = f"{PROG} {COMPATIBLE_FIREZONE_VERSION}"
COMMANDS = ("run", "status", "reset")


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} [run]",
        description=(
            f"Run the Firezone-compatible gateway (pyfz-gateway {__version__}, speaking the "
            f"protocol of Firezone gateway {COMPATIBLE_FIREZONE_VERSION}). Other commands: "
            "status, reset."
        ),
        epilog="Precedence: flag > environment > config file > default.",
    )
    parser.add_argument("-V", "--version", action="version", version=VERSION)
    add = parser.add_argument
    add("token", nargs="?", metavar="TOKEN", help="portal token [env FIREZONE_TOKEN]")
    add(
        "--config",
        metavar="PATH",
        help="YAML file [env FIREZONE_CONFIG; default /etc/firezone/gateway.yaml, may be missing]",
    )
    add("--token-file", metavar="PATH", help="read the token from a file [FIREZONE_TOKEN_FILE]")
    add("-u", "--api-url", metavar="URL", help="portal URL [FIREZONE_API_URL]")
    add("-n", "--firezone-name", dest="name", metavar="NAME", help="name [FIREZONE_NAME]")
    add("-i", "--firezone-id", dest="firezone_id", metavar="ID", help="id [FIREZONE_ID]")
    add(
        "--no-telemetry",
        dest="telemetry",
        action="store_const",
        const=False,
        default=None,
        help="accepted for compatibility; nothing is sent [FIREZONE_NO_TELEMETRY]",
    )
    add("--health-check-addr", metavar="HOST:PORT", help="health endpoint [HEALTH_CHECK_ADDR]")
    add("--log-filter", metavar="FILTER", help="e.g. info,gateway.wg=debug [RUST_LOG]")
    add("--log-format", metavar="human|json", help="[FIREZONE_LOG_FORMAT]")
    add("--control-socket", metavar="PATH", help="[FIREZONE_CONTROL_SOCKET]")
    add("--state-dir", metavar="DIR", help="Firezone ID directory [FIREZONE_STATE_DIR]")
    add("--tun-name", metavar="NAME", help="TUN device name [FIREZONE_TUN_NAME]")
    add(
        "--no-network-change-reset",
        dest="network_change_reset",
        action="store_const",
        const=False,
        default=None,
        help="do not reset when the host's own addresses change "
        "[FIREZONE_NETWORK_CHANGE_RESET=false]",
    )
    add(
        "--network-change-debounce",
        metavar="SECONDS",
        help="quiet time before judging a network change [FIREZONE_NETWORK_CHANGE_DEBOUNCE]",
    )
    for flag, env in (
        ("--no-check", "skip the privilege and TUN checks [FIREZONE_NO_CHECK]"),
        ("--setup-host", "set sysctls and masquerade at start [FIREZONE_SETUP_HOST]"),
        ("--icmp-prohibited", "answer filtered packets with ICMP [FIREZONE_ICMP_PROHIBITED]"),
    ):
        add(flag, action="store_true", default=None, help=env)
    return parser


def _client_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} {command}", description=description)
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help=f"default: $FIREZONE_CONTROL_SOCKET or {DEFAULT_CONTROL_SOCKET}",
    )
    if command == "status":
        parser.add_argument("--json", action="store_true", help="print the raw JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] in COMMANDS else "run"
    try:
        if command == "run":
            return _run(_run_parser().parse_args(args))
        description = {
            "status": "Show the running gateway's portal, relays and clients.",
            "reset": "Drop every connection and rotate the WireGuard key (like the portal's "
            "reset).",
        }[command]
        namespace = _client_parser(command, description).parse_args(args)
        socket_path = (
            namespace.control_socket
            or os.environ.get("FIREZONE_CONTROL_SOCKET")
            or DEFAULT_CONTROL_SOCKET
        )
        if command == "status":
            return _status(socket_path, as_json=namespace.json)
        return _reset(socket_path)
    except SystemExit as exc:  # argparse: --help/--version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else int(ExitCode.USAGE)


def _run(namespace: argparse.Namespace) -> int:
    from actors.config_loader import load_config

    flags = vars(namespace).copy()
    config_path = flags.pop("config")
    try:
        config = load_config(config_path=config_path, flags=flags)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    from actors import app  # lazily: tests replace app.run, and app imports the world

    def reload() -> GatewayConfig:
        """SIGHUP: the same sources again (flags stay as given on the command line)."""
        return load_config(config_path=config_path, flags=flags)

    return int(app.run(config, reload=reload))


def _request(path: str, command: str) -> dict[str, Any] | None:
    from actors.control import ControlError, control_request

    try:
        return control_request(path, command)
    except ControlError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return None


def _status(path: str, *, as_json: bool) -> int:
    status = _request(path, "status")
    if status is None:
        return int(ExitCode.FATAL)
    if "error" in status:
        print(f"{PROG}: status failed: {status['error']}", file=sys.stderr)
        return int(ExitCode.FATAL)
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        render_status(status, sys.stdout, now=time.time())
    return int(ExitCode.OK)


def _reset(path: str) -> int:
    response = _request(path, "reset")
    if response is None:
        return int(ExitCode.FATAL)
    if "error" in response:
        print(f"{PROG}: reset failed: {response['error']}", file=sys.stderr)
        return int(ExitCode.FATAL)
    print("reset requested: connections dropped, new key published to the portal")
    return int(ExitCode.OK)


# --- status rendering ------------------------------------------------------------------------


def _when(ts: Any, now: float) -> str:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "-"
    ago = max(0.0, now - ts)
    stamp = datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    if ago < 120:
        return f"{stamp} ({ago:.0f}s ago)"
    if ago < 7200:
        return f"{stamp} ({ago / 60:.0f}m ago)"
    return f"{stamp} ({ago / 3600:.1f}h ago)"


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - loop always returns


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def render_status(status: dict[str, Any], out: TextIO, *, now: float) -> None:
    """A human summary of the control socket's status JSON; missing keys show as ``-``."""
    portal = status.get("portal") if isinstance(status.get("portal"), dict) else {}
    assert isinstance(portal, dict)
    since = portal.get("joined_since")
    line = f"Portal:      {_text(portal.get('state'))}"
    if since is not None:
        line += f" since {_when(since, now)}"
    line += f", {_text(portal.get('reconnects', 0))} reconnects"
    print(line, file=out)
    print(f"Public key:  {_text(status.get('public_key'))}", file=out)
    relays = [r for r in status.get("relays") or [] if isinstance(r, dict)]
    print(f"Relays:      {len(relays)}", file=out)
    if relays:
        rows = [["ID", "SERVER", "ADDRESSES", "STATE"]]
        rows += [
            [
                _text(r.get("id")),
                _text(r.get("server")),
                _text(r.get("relay_addresses")),
                _text(r.get("state")),
            ]
            for r in relays
        ]
        _table(rows, out)
    clients = [c for c in status.get("clients") or [] if isinstance(c, dict)]
    print(f"Clients:     {len(clients)}", file=out)
    if clients:
        rows = [["CLIENT", "PATH", "REMOTE", "LAST HANDSHAKE", "RX", "TX", "RESOURCES"]]
        for client in clients:
            resources = [
                _text(r.get("name") or r.get("id"))
                + (
                    f" (until {_when(r['expires_at'], now).split(' (')[0]})"
                    if r.get("expires_at")
                    else ""
                )
                for r in client.get("resources") or []
                if isinstance(r, dict)
            ]
            rows.append(
                [
                    _text(client.get("client_id")),
                    _text(client.get("path")),
                    _text(client.get("remote")),
                    _when(client.get("last_handshake"), now),
                    _bytes(client.get("rx_bytes")),
                    _bytes(client.get("tx_bytes")),
                    ", ".join(resources) or "-",
                ]
            )
        _table(rows, out)


if __name__ == "__main__":
    sys.exit(main())
