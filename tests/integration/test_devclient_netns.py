"""``python -m devclient`` in its own namespace with a real TUN (root needed).

A websocket stub portal and the fake gateway (same cores) live in a second namespace; an
ordinary UDP socket in the client namespace talks to a CIDR resource through the TUN and
gets its echo back. Also covers roaming through the FIFO and a clean exit on SIGTERM.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.server import Server, ServerConnection, serve

from devstack import netns
from tests.support.fake_gateway import FakePortal, GatewayRunner
from tests.support.interop import require_netns

CIDR_ID = "11111111-1111-4111-8111-111111111111"
REPO = Path(__file__).resolve().parents[2]


class WsPortal:
    """Carries :class:`FakePortal` over a real websocket (Phoenix V1 JSON frames)."""

    def __init__(self, runner: GatewayRunner, host: str) -> None:
        self.runner = runner
        self.init = {
            "interface": {"ipv4": "100.64.0.9", "ipv6": "fd00:2021:1111::9"},
            "resources": [{"id": CIDR_ID, "type": "cidr", "address": "10.99.0.0/24",
                           "name": "net", "filters": []}],
            "relays": [],
        }
        self.server: Server = serve(self._handler, host, 0, ping_interval=None, close_timeout=1)
        self.port = self.server.socket.getsockname()[1]

    def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(ws.request.path).query))
        lock = threading.Lock()

        def push(event: str, payload: Any) -> None:
            with lock:
                ws.send(json.dumps({"topic": "client", "event": event, "payload": payload,
                                    "ref": None}))

        portal = FakePortal(self.runner, self.init, random.Random(5),
                            lambda: query["public_key"])
        for raw in ws:
            frame = json.loads(raw)
            if frame["event"] == "phx_join":
                with lock:
                    ws.send(json.dumps({"topic": "client", "event": "phx_reply",
                                        "ref": frame["ref"],
                                        "payload": {"status": "ok", "response": {}}}))
                portal.start(push)
            elif frame["topic"] == "client":
                portal.send(frame["event"], frame["payload"])


class Client:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def wait_for(self, prefix: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} line; saw {self.seen}")


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[tuple[str, str, GatewayRunner, WsPortal]]:
    require_netns()
    with netns.namespaces("fzdc", "fzdg") as (client_ns, gw_ns):
        va, vb = netns.unique_name("fdc"), netns.unique_name("fdg")
        netns.veth(client_ns, va, "10.203.7.2/24", gw_ns, vb, "10.203.7.1/24")
        runner = netns.in_netns(gw_ns, lambda: GatewayRunner(random.Random(4), "10.203.7.1"))
        portal = netns.in_netns(gw_ns, lambda: WsPortal(runner, "10.203.7.1"))
        threading.Thread(target=portal.server.serve_forever, daemon=True).start()
        with runner:
            try:
                yield client_ns, gw_ns, runner, portal
            finally:
                portal.server.shutdown()


def test_devclient_process_carries_udp_through_its_tun(
    topology: tuple[str, str, GatewayRunner, WsPortal], tmp_path: Path
) -> None:
    client_ns, _, runner, portal = topology
    fifo = str(tmp_path / "commands")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        ["ip", "netns", "exec", client_ns, sys.executable, "-m", "devclient",
         "--portal", f"ws://10.203.7.1:{portal.port}", "--token", "t", "--name", "netns-test",
         "--resource", "net", "--commands", fifo, "--log-level", "DEBUG"],
        stdout=subprocess.PIPE, stderr=open(tmp_path / "client.log", "w"), text=True,  # noqa: SIM115
        env=env, cwd=REPO,
    )
    client = Client(proc)
    try:
        # The default bind address is the one that routes towards the portal.
        assert client.wait_for("LISTEN").startswith("LISTEN addr=10.203.7.2:")
        ready = client.wait_for("READY")
        assert f"gateway={runner.gateway.id}" in ready and "path=direct" in ready

        sock = netns.in_netns(client_ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        with sock:
            sock.settimeout(5)
            sock.sendto(b"through the tun", ("10.99.0.5", 7))
            data, src = sock.recvfrom(2048)
            assert (data, src) == (b"through the tun", ("10.99.0.5", 7))

            with open(fifo, "w") as commands:
                commands.write("roam\n")
            client.wait_for("LISTEN")
            client.wait_for("READY")
            sock.sendto(b"after roaming", ("10.99.0.5", 7))
            assert sock.recvfrom(2048)[0] == b"after roaming"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        gone = netns.run("ip", "link", "show", "tun-fzclient", ns=client_ns, check=False)
        assert gone.returncode != 0  # the non-persistent TUN left with the process
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        print((tmp_path / "client.log").read_text()[-3000:])
