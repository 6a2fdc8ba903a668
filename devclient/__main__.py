"""``python -m devclient``: run the development client (inside its network namespace).

Example::

    ip netns exec fz-client python -m devclient --portal ws://10.0.0.1:8080 \\
        --token TOKEN --name laptop --resource web --bind 10.0.1.2 --commands /tmp/fz.fifo

Prints one line per event on stdout (``KEY``, ``LISTEN``, ``INTERFACE``, ``READY``,
``DNS``, ``FAILED``, ``PORTAL_ERROR``); logs go to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import random
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import Sequence
from types import FrameType

from actors.io.ports import TunDevice
from devclient.client import DevClient
from devclient.control import CommandFifo
from devclient.core import ClientCore, InterfaceConfig
from devclient.netconf import open_configured_tun
from devclient.portal import WebSocketPortal, login_url


def _dns_domain(text: str) -> tuple[str, str]:
    resource, sep, domain = text.partition("=")
    if not sep or not resource or not domain:
        raise argparse.ArgumentTypeError("expected RESOURCE=DOMAIN")
    return resource, domain


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devclient", description=__doc__.split("\n")[0])
    parser.add_argument("--portal", required=True, help="ws://HOST:PORT of the dev portal")
    parser.add_argument("--token", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--external-id", help="default: derived from --name")
    parser.add_argument("--resource", action="append", default=[],
                        help="resource id or name to connect to (repeatable)")
    parser.add_argument("--bind", help="local IP for the UDP socket (default: the address "
                        "that routes to the portal)")
    parser.add_argument("--tun", default="tun-fzclient", help="TUN device name")
    parser.add_argument("--relay-only", action="store_true",
                        help="signal and use relayed candidates only")
    parser.add_argument("--dns-domain", action="append", type=_dns_domain, default=[],
                        metavar="RESOURCE=DOMAIN", help="domain to assign proxy IPs for")
    parser.add_argument("--commands", help="FIFO to read commands from (roam, request X, quit)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def default_bind_ip(portal: str) -> str:
    """The source address the kernel picks towards the portal (a UDP connect sends nothing)."""
    parts = urllib.parse.urlsplit(portal)
    host = parts.hostname or "127.0.0.1"
    info = socket.getaddrinfo(host, parts.port or 80, type=socket.SOCK_DGRAM)[0]
    with socket.socket(info[0], socket.SOCK_DGRAM) as probe:
        probe.connect(info[4])
        return str(probe.getsockname()[0])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rng = random.SystemRandom()
    core = ClientCore(rng=rng, now=time.monotonic(), unix_now=time.time(),
                      relay_only=args.relay_only, dns_domains=dict(args.dns_domain))
    external_id = args.external_id or hashlib.sha256(args.name.encode()).hexdigest()
    url = login_url(args.portal, token=args.token, external_id=external_id, name=args.name,
                    public_key=core.public_key)
    commands = CommandFifo(args.commands) if args.commands else None

    def open_tun(config: InterfaceConfig) -> TunDevice:
        return open_configured_tun(args.tun, config)

    client = DevClient(core, portal=WebSocketPortal(url), open_tun=open_tun,
                       bind_ip=args.bind or default_bind_ip(args.portal), out=sys.stdout,
                       resources=list(args.resource), commands=commands)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        client.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return client.run()


if __name__ == "__main__":
    sys.exit(main())
