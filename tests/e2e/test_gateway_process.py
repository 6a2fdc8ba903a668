"""The real gateway process: health/ready, signals, exit codes, reload, and secrets in logs."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.io.udp import SOCKET_BUFFER_BYTES
from devstack.stack import CIDR_RESOURCE, GATEWAY_TOKEN, Stack, stack
from devstack.topology import RESOURCE
from gateway.exit_codes import ExitCode
from tests.support.interop import require_bin, require_netns
from tests.support.secrets_scan import assert_no_secrets

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(120)]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Stack]:
    require_netns()
    require_bin("turnserver", "coturn")
    require_bin("curl", "curl")
    with stack(tmp_path) as built:
        built.start_portal()
        try:
            yield built
        except BaseException:
            print(built.logs())
            raise


def _health(world: Stack, path: str) -> str:
    """HTTP status of the gateway's health endpoint (it listens inside its namespace)."""
    result = world.topo.run(
        "gateway", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
        f"http://127.0.0.1:18080{path}", check=False,
    )
    return result.stdout.strip()


def _wait(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_health_ready_and_a_graceful_sigterm(world: Stack) -> None:
    assert world.portal is not None
    world.portal.stop()  # not joined yet: alive but not ready
    gateway = world.start_gateway()
    assert _wait(lambda: _health(world, "/healthz") == "200")
    assert _health(world, "/readyz") == "503"
    assert _health(world, "/nope") == "404"
    world.start_portal()
    assert _wait(lambda: _health(world, "/readyz") == "200", timeout=20), world.logs()
    metrics = world.topo.run("gateway", "curl", "-s", "http://127.0.0.1:18080/metrics").stdout
    assert "firezone_portal_joined 1" in metrics, metrics
    assert 'firezone_gc_collections_total{generation="2"}' in metrics, metrics
    gateway.popen.send_signal(signal.SIGTERM)
    assert gateway.popen.wait(15) == 0, world.logs()
    output = "\n".join(gateway.lines)
    assert "gateway stopped (exit code 0)" in output
    assert "threads left after shutdown" not in output
    # The portal saw the socket go away (clean close), so it marks the gateway offline.
    assert _wait(lambda: world.portal.gateways()[0].open_sockets == 0)


def test_rejected_token_exits_with_its_own_code_and_no_retry_storm(world: Stack) -> None:
    assert world.portal is not None
    gateway = world.start_gateway("--api-url", world.portal_url, "not-the-token-at-all")
    assert gateway.popen.wait(20) == int(ExitCode.AUTH_REJECTED), world.logs()
    assert world.portal.connection_attempts == 1
    assert any("401" in line or "rejected" in line.lower() for line in gateway.lines), (
        gateway.tail()
    )
    assert_no_secrets("\n".join(gateway.lines), ["not-the-token-at-all"])


def test_sighup_reloads_the_log_filter(world: Stack, tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("log_filter: info\n")
    gateway = world.start_gateway_with_config(config)
    world.wait_gateway_ready()
    assert not any(" DEBUG " in line for line in gateway.lines)
    config.write_text("log_filter: debug,pykka=info\n")
    mark = len(gateway.lines)
    gateway.popen.send_signal(signal.SIGHUP)
    gateway.wait_line(lambda line: "SIGHUP: log filter now" in line, timeout=10, after=mark)
    world.topo.run("gateway", "curl", "-s", "http://127.0.0.1:18080/healthz")
    assert gateway.wait_line(lambda line: " DEBUG " in line, timeout=10, after=mark)


def test_no_secret_reaches_the_logs_even_at_debug_with_wire_traces(world: Stack) -> None:
    """Token, PSKs, TURN passwords and ICE passwords never appear in the gateway's or the
    development client's output, even with every logger at DEBUG and raw wire traces."""
    world.start_resource_servers()
    gateway = world.start_gateway(log_filter="debug,wire=debug,pykka=debug")
    world.wait_gateway_ready()
    client = world.start_client(CIDR_RESOURCE)
    client.wait_line(lambda line: line.startswith("READY"), timeout=30)
    assert world.udp_echo(RESOURCE, 7000, b"secret scan traffic") == b"secret scan traffic"
    world.topo.run("gateway", "true")
    secrets = {GATEWAY_TOKEN, world.coturn.secret}
    assert world.portal is not None
    for record in world.portal.events:
        secrets.update(_secret_values(record.payload))
    assert len(secrets) > 4, "the scan must have real secrets to look for"
    gateway.popen.send_signal(signal.SIGTERM)
    gateway.popen.wait(15)
    for proc in (gateway, client):
        assert_no_secrets("\n".join(proc.lines), secrets)
    assert any("wire.api.recv" in line for line in gateway.lines), "wire traces were enabled"


def _secret_values(payload: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(payload, dict):
        for key, value in payload.items():
            if key in ("preshared_key", "password") and isinstance(value, str):
                found.add(value)
            else:
                found |= _secret_values(value)
    elif isinstance(payload, list):
        for item in payload:
            found |= _secret_values(item)
    return found


def test_status_and_reset_over_the_control_socket(world: Stack) -> None:
    world.start_gateway()
    before = world.wait_gateway_ready()
    cli = [world.python, "-m", "actors.cli"]
    status = subprocess.run([*cli, "status", "--control-socket", world.control_socket],
                            capture_output=True, text=True, check=False)
    assert status.returncode == 0, status.stderr
    assert before["public_key"] in status.stdout and "joined" in status.stdout
    assert before["gc"]["frozen_objects"] > 10_000  # the start-up heap, out of every walk
    # As root the sockets get their buffers past the host's net.core limits.
    assert before["socket_buffers"]["ipv4"] == [2 * SOCKET_BUFFER_BYTES] * 2
    reset = subprocess.run([*cli, "reset", "--control-socket", world.control_socket],
                           capture_output=True, text=True, check=False)
    assert reset.returncode == 0, reset.stderr
    assert world.portal is not None
    assert _wait(lambda: world.portal.gateways()[0].public_key != before["public_key"])
    after = world.wait_gateway_ready()
    assert after["public_key"] == world.portal.gateways()[0].public_key
    assert after["resets"] == 1


def test_sigusr1_logs_every_threads_stack(world: Stack) -> None:
    gateway = world.start_gateway()
    world.wait_gateway_ready()
    mark = len(gateway.lines)
    gateway.popen.send_signal(signal.SIGUSR1)
    for thread in ("MainThread", "NodeActor", "PortalActor", "TunActor", "UdpReader",
                   "TunReader", "Timer"):
        gateway.wait_line(lambda line, t=thread: "Current state of" in line and t in line,
                          timeout=10, after=mark)
    gateway.popen.send_signal(signal.SIGTERM)
    assert gateway.popen.wait(15) == 0


def test_bad_input_is_logged_and_dropped_and_nothing_else_is_lost(world: Stack) -> None:
    world.start_resource_servers()
    gateway = world.start_gateway()
    status = world.wait_gateway_ready()
    client = world.start_client(CIDR_RESOURCE)
    client.wait_line(lambda line: line.startswith("READY"), timeout=30)
    assert world.udp_echo(RESOURCE, 7000, b"before garbage") == b"before garbage"
    assert world.portal is not None
    mark = len(gateway.lines)
    world.portal.push_to_gateway("authorize_flow", {"resource": "not an object"})
    world.portal.push_to_gateway("no_such_event", {"x": 1})
    world.portal.push_to_gateway("reject_access", {"client_id": "not-a-uuid"})
    # Garbage datagrams at the gateway's UDP port, from the client's namespace.
    port = status["ports"]["ipv4"]

    def spray() -> None:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for payload in (b"", b"\x00", b"\x01\x00\x00\x00garbage", b"\x04" + bytes(40),
                            b"\x40\x00\x00\x10" + bytes(16), bytes(range(256)) * 6):
                sock.sendto(payload, ("10.203.0.3", port))

    from devstack.netns import in_netns

    in_netns(world.topo.ns("client"), spray)
    gateway.wait_line(lambda line: "no_such_event" in line, timeout=10, after=mark)
    gateway.wait_line(lambda line: "authorize_flow" in line and "ERROR" in line, timeout=10,
                      after=mark)
    after = world.gateway_status()
    assert after["portal"]["state"] == "joined" and after["public_key"] == status["public_key"]
    assert len(after["clients"]) == 1 and after["clients"][0]["resources"]
    assert world.udp_echo(RESOURCE, 7000, b"after garbage") == b"after garbage"
    assert gateway.popen.poll() is None
