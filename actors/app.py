"""Composition root: configuration in, running actors out, an exit code at the end.

Start order: Timer, TunActor (the device must exist before anything can be routed),
NodeActor (keys, sockets), PortalActor (wired to the node, which then connects it with the
node's public key), health/metrics, control socket, network monitor. Stop order is the
reverse; ``ActorRegistry.stop_all`` runs in a ``finally`` so no non-daemon actor thread can
keep the process alive, and leftover threads are logged as a bug.

Supervision (README, "Supervision"): a failed PortalActor is replaced by
:class:`PortalSupervisor` within a restart budget; a failed NodeActor or TunActor stops the
process with exit 1 (``Runtime.fail``); ``/readyz`` is ready only while joined and the
node, TUN and portal actors are alive.

Signals: SIGTERM/SIGINT stop gracefully (exit 0); SIGUSR1 logs every thread's stack
(``pykka.debug.log_thread_tracebacks``) so a development run is debuggable by thread; SIGHUP
reloads the log filter from the configuration file.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import signal
import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pykka
import pykka.debug

from actors.clock import Clock, SystemClock
from actors.gcpolicy import GcPolicy
from actors.io.udp import UdpSockets
from actors.io.websocket import WebSocketFactory, connect_websocket
from actors.messages import GetPortalStatus, PortalStatus
from actors.metrics import node_event_samples
from actors.node import AttachPortal, GetNodeStatus, NodeActor, Reset
from actors.peer import GetPeerStatus
from actors.peer_session import SESSIONS
from actors.portal import PortalActor
from actors.resolver import Resolver
from actors.timer import Timer
from actors.tun import GetTunStats, GetTunWriter, TunActor
from gateway.config import GatewayConfig
from gateway.exit_codes import ExitCode
from gateway.portal.login_url import LoginUrlPrototype

log = logging.getLogger(__name__)

ASK_TIMEOUT = 5.0


@dataclass
class Runtime:
    """The running gateway: its actors and servers (also what tests and ``status`` inspect)."""

    config: GatewayConfig
    timer: Timer
    tun: pykka.ActorRef[Any]
    node: pykka.ActorRef[Any]
    portal: pykka.ActorRef[Any]
    clock: Clock = field(default_factory=SystemClock)
    stopping: threading.Event = field(default_factory=threading.Event)
    exit_code: int = int(ExitCode.OK)
    portal_state: str = "disconnected"
    closers: list[Callable[[], None]] = field(default_factory=list)
    #: Installed by ``run`` (not by ``start``: in-process tests keep the plain collector).
    gc_policy: GcPolicy | None = None

    def fail(self, reason: str, code: int) -> None:
        if not self.stopping.is_set():
            log.error("Eventloop failed: %s", reason)  # as rust/gateway/src/main.rs logs it
            self.exit_code = code
            self.stopping.set()

    def is_ready(self) -> bool:
        """Joined, and nothing it depends on has failed or is stopping (``/readyz``)."""
        return (
            self.portal_state == "joined"
            and not self.stopping.is_set()
            and self.node.is_alive()
            and self.tun.is_alive()
            and self.portal.is_alive()
        )

    def status(self) -> dict[str, Any]:
        node: dict[str, Any] = self.node.ask(GetNodeStatus(), block=True, timeout=ASK_TIMEOUT)
        portal: PortalStatus = self.portal.ask(GetPortalStatus(), block=True, timeout=ASK_TIMEOUT)
        # Ask every PeerActor first, then collect: thousands of clients answer in parallel.
        asked = []
        for client_id, ref in node.pop("peers").items():
            try:
                asked.append((client_id, ref.ask(GetPeerStatus(), block=False)))
            except pykka.ActorDeadError:
                continue
        clients = []
        for client_id, future in asked:
            try:
                peer: dict[str, Any] = future.get(timeout=ASK_TIMEOUT)
            except (pykka.ActorDeadError, pykka.Timeout):
                continue
            peer.update({"connection": node["connections"].get(client_id)})
            clients.append(peer)
        return {
            "public_key": node["public_key"],
            "portal": {
                "state": portal.state,
                # The actor keeps monotonic time; operators want a wall-clock timestamp.
                "joined_since": (
                    None if portal.joined_since is None
                    else self.clock.unix() - (self.clock.monotonic() - portal.joined_since)
                ),
                "reconnects": portal.reconnects,
                "connection_attempts": portal.connection_attempts,
                "malformed_frames": portal.malformed_frames,
            },
            "resets": node["resets"],
            "ports": node["ports"],
            "relays": node["relays"],
            "clients": clients,
            "tun": self.tun.ask(GetTunStats(), timeout=ASK_TIMEOUT),
            "counters": node["counters"],
            "socket_buffers": node["socket_buffers"],
            "gc": self.gc_policy.status() if self.gc_policy is not None else None,
        }

    def reset(self) -> dict[str, Any]:
        self.node.tell(Reset("operator command"))
        return {"ok": True}


#: Portal actor restarts allowed within PORTAL_RESTART_WINDOW seconds; one more is fatal
#: (exit 1), so a crash loop ends in the service manager's restart, not a spinning thread.
PORTAL_RESTARTS = 5
PORTAL_RESTART_WINDOW = 600.0


class PortalSupervisor:
    """Replaces a failed PortalActor with a fresh one (same login-URL prototype, wired to the
    same node), within a restart budget; past it, ``on_fatal`` ends the process (exit 1).

    The replacement is attached to the node (``AttachPortal``), which connects it with the
    node's *current* public key, as at start-up. Until it has joined, the node's portal
    state is ``disconnected`` (the dying actor said so), so ``/readyz`` is not ready.
    """

    def __init__(
        self,
        *,
        start: Callable[[Callable[[str], None]], pykka.ActorRef[Any]],
        node: pykka.ActorRef[Any],
        clock: Clock,
        on_fatal: Callable[[str, int], None],
        stopping: threading.Event,
        on_replaced: Callable[[pykka.ActorRef[Any]], None] = lambda _ref: None,
        restarts: int = PORTAL_RESTARTS,
        window: float = PORTAL_RESTART_WINDOW,
    ) -> None:
        self._start = start
        self._node = node
        self._clock = clock
        self._on_fatal = on_fatal
        self._stopping = stopping
        self._on_replaced = on_replaced
        self._restarts = restarts
        self._window = window
        self._recent: deque[float] = deque()
        self._lock = threading.Lock()
        self.current: pykka.ActorRef[Any] | None = None

    def start(self) -> pykka.ActorRef[Any]:
        """Start the first PortalActor (the caller attaches it to the node)."""
        self.current = self._start(self.crashed)
        return self.current

    def crashed(self, reason: str) -> None:
        """The PortalActor failed (called on its dying thread)."""
        with self._lock:
            if self._stopping.is_set():
                return
            now = self._clock.monotonic()
            while self._recent and now - self._recent[0] > self._window:
                self._recent.popleft()
            if len(self._recent) >= self._restarts:
                log.error("%s; %d restarts in %.0f s already: giving up", reason,
                          len(self._recent), self._window)
                self._on_fatal(f"{reason} (restart budget spent)", int(ExitCode.FATAL))
                return
            self._recent.append(now)
            try:
                replacement = self._start(self.crashed)
            except Exception as exc:  # e.g. no thread: nothing left to talk to the portal
                log.error("cannot restart the portal actor: %s", exc)
                self._on_fatal(f"{reason}; restart failed", int(ExitCode.FATAL))
                return
            log.warning("%s; restarted it (%d of %d in %.0f s)", reason, len(self._recent),
                        self._restarts, self._window)
            self.current = replacement
            self._on_replaced(replacement)
        # A dead node is taking the process down: nothing to attach to.
        with contextlib.suppress(pykka.ActorDeadError):
            self._node.tell(AttachPortal(replacement))


def _gateway_name(config: GatewayConfig) -> str:
    if config.name:
        return config.name
    try:
        return socket.gethostname() or str(uuid.uuid4())
    except (OSError, UnicodeError):
        return str(uuid.uuid4())


def resolve_api_host(prototype: LoginUrlPrototype) -> None:
    """Resolve the portal's host once at start-up (rust/phoenix-channel/src/login_url.rs,
    rust/gateway/src/main.rs).

    As in 1.4, a name that does not resolve now stops the gateway (``run`` exits 1); every
    connection attempt resolves again, and failures then are transient (retried with
    backoff). The result is not kept: addresses may change while the gateway runs.
    """
    try:
        socket.getaddrinfo(prototype.host, prototype.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise OSError(f"cannot resolve the portal host {prototype.host!r}: {exc}") from exc


def start(config: GatewayConfig, *, firezone_id: str) -> Runtime:
    """Start every actor; raises on a fatal start-up error (the caller maps exit codes)."""
    from actors.io.tun_linux import open_tun
    from actors.netconfig import configure_interface
    from actors.useragent import user_agent

    prototype = LoginUrlPrototype.build(
        config.api_url, config.token, firezone_id, _gateway_name(config)
    )
    resolve_api_host(prototype)  # before the timer and every actor: a failure is fatal
    clock = SystemClock()
    rng = random.SystemRandom()
    timer = Timer(clock)
    timer.start()
    try:
        return _start_actors(config, prototype, clock, rng, timer, open_tun, configure_interface,
                             user_agent())
    except BaseException:
        timer.stop()
        raise


def _start_actors(
    config: GatewayConfig,
    prototype: LoginUrlPrototype,
    clock: SystemClock,
    rng: random.Random,
    timer: Timer,
    open_tun: Callable[..., Any],
    configure_interface: Callable[..., None],
    agent: str,
    *,
    websocket_factory: WebSocketFactory = connect_websocket,
) -> Runtime:
    runtime_box: list[Runtime] = []
    early_failures: list[tuple[str, int]] = []  # before the Runtime exists
    stopping = threading.Event()

    def on_fatal(reason: str, code: int) -> None:
        if runtime_box:
            runtime_box[0].fail(reason, code)
        else:
            early_failures.append((reason, code))

    tun = TunActor.start(
        device_factory=functools.partial(open_tun, config.tun_name),
        configure=functools.partial(configure_interface, ifname=config.tun_name),
        on_fatal=on_fatal,
    )
    # A device that cannot be opened stops the actor in on_start: the ask fails here.
    tun_writer = tun.ask(GetTunWriter(), timeout=ASK_TIMEOUT)
    resolver = Resolver()

    def on_portal_state(state: str) -> None:
        if runtime_box:
            runtime_box[0].portal_state = state

    node = NodeActor.start(
        clock=clock,
        rng=rng,
        timer=timer,
        tun=tun,
        tun_writer=tun_writer,
        sockets_factory=UdpSockets,
        resolver=resolver,
        icmp_prohibited=config.icmp_prohibited,
        on_fatal=on_fatal,
        on_portal_state=on_portal_state,
    )

    def start_portal(on_crash: Callable[[str], None]) -> pykka.ActorRef[Any]:
        return PortalActor.start(
            prototype=prototype,
            listener=node,
            clock=clock,
            rng=rng,
            timer=timer,
            user_agent=agent,
            websocket_factory=websocket_factory,
            on_crash=on_crash,
        )

    def replaced(portal: pykka.ActorRef[Any]) -> None:
        if runtime_box:
            runtime_box[0].portal = portal

    supervisor = PortalSupervisor(start=start_portal, node=node, clock=clock, on_fatal=on_fatal,
                                  stopping=stopping, on_replaced=replaced)
    portal = supervisor.start()
    runtime = Runtime(config=config, timer=timer, tun=tun, node=node, portal=portal, clock=clock,
                      stopping=stopping)
    runtime_box.append(runtime)
    runtime.portal = supervisor.current or portal  # replaced meanwhile: the newest
    for reason, code in early_failures:
        runtime.fail(reason, code)
    runtime.closers.append(resolver.shutdown)
    node.tell(AttachPortal(runtime.portal))
    return runtime


def stop(runtime: Runtime) -> None:
    """Reverse start order: servers first, then the portal (a clean close frame, so the
    portal marks this gateway offline at once and steers new flows elsewhere), then the
    node (TURN allocations deleted, sockets closed, PeerActors stopped), TUN, timer."""
    runtime.stopping.set()  # no portal restart from here on, and never ready again
    for close in reversed(runtime.closers):
        try:
            close()
        except Exception:
            log.exception("error while stopping")
    for ref in (runtime.portal, runtime.node, runtime.tun):
        try:
            ref.stop(timeout=ASK_TIMEOUT)
        except pykka.Timeout:
            log.error("%s did not stop in time", ref)
    pykka.ActorRegistry.stop_all(timeout=ASK_TIMEOUT)
    runtime.timer.stop()


def run(config: GatewayConfig, reload: Callable[[], GatewayConfig] | None = None) -> int:
    """The gateway's main job; returns the process exit code.

    ``reload`` re-reads the configuration on SIGHUP; what can change live is applied
    (the log filter and format), the rest is logged as needing a restart.
    """
    from actors.checks import apply_host_setup, check_forwarding, check_privileges, check_tun
    from actors.identity import resolve_firezone_id
    from actors.logsetup import configure_logging, register_secret

    configure_logging(config.log_filter, config.log_format)
    register_secret(config.token)
    if not config.no_check:
        for problem in (check_privileges(), check_tun()):
            if problem:
                log.error("%s", problem)
                return int(ExitCode.MISSING_PRIVILEGES)
    if config.setup_host:
        try:
            for line in apply_host_setup(config.tun_name):
                log.info("host set-up: %s", line)
        except OSError as exc:
            log.error("host set-up failed: %s", exc)
            return int(ExitCode.FATAL)
    for warning in check_forwarding():
        log.warning("%s", warning)
    try:
        firezone_id = resolve_firezone_id(config.firezone_id, Path(config.state_dir))
    except OSError as exc:
        log.error("%s", exc)
        return int(ExitCode.FATAL)
    try:
        runtime = start(config, firezone_id=firezone_id)
    except Exception as exc:
        log.error("start-up failed: %s", exc)
        pykka.ActorRegistry.stop_all(timeout=ASK_TIMEOUT)
        return int(ExitCode.FATAL)
    runtime.gc_policy = GcPolicy(runtime.clock)
    runtime.gc_policy.install()  # after start-up: its objects are frozen for good
    runtime.gc_policy.start(runtime.timer)
    runtime.closers.append(runtime.gc_policy.stop)
    started = False
    try:
        # Signals first: once /readyz answers, a signal must find its handler (SIGUSR1's
        # default action would kill the process).
        _install_signals(runtime, reload)
        _start_servers(runtime)  # raises when another gateway owns the control socket
        started = True
        log.info("gateway running")
        while not runtime.stopping.wait(0.5):
            pass
    except Exception as exc:
        log.error("start-up failed: %s", exc)
        runtime.exit_code = int(ExitCode.FATAL)
    finally:
        stop(runtime)
        leftovers = [
            t.name for t in threading.enumerate()
            if t is not threading.main_thread() and not t.daemon and t.is_alive()
        ]
        if leftovers:
            log.error("threads left after shutdown (a bug): %s", ", ".join(leftovers))
    log.info("gateway stopped (exit code %d)%s", runtime.exit_code, "" if started else
             " before it was running")
    return runtime.exit_code


def _start_servers(runtime: Runtime) -> None:
    from actors.health import HealthServer
    from actors.metrics import new_gateway_metrics

    config = runtime.config
    metrics = new_gateway_metrics()
    _register_collectors(metrics, runtime)
    health = HealthServer(config.health_check_addr, runtime.is_ready, metrics.render)
    health.start()
    runtime.closers.append(health.stop)
    _start_control(runtime)
    if config.network_change_reset:
        from actors.netmon import NetworkMonitor

        monitor = NetworkMonitor(
            lambda: runtime.node.tell(Reset("host network changed")),
            ignore_ifname=config.tun_name,
            debounce=config.network_change_debounce,
        )
        try:
            monitor.start()
            runtime.closers.append(monitor.stop)
        except OSError as exc:
            log.warning("network change monitor unavailable: %s", exc)


def _start_control(runtime: Runtime) -> None:
    """The ``status``/``reset`` socket. Another live gateway on it is fatal (two would
    fight over the TUN and the portal identity); any other failure (no right to create
    the directory, as for a non-root CAP_NET_ADMIN service the 1.4 units run) only costs
    those two commands: the 1.4 gateway has no control socket at all."""
    from actors.control import ControlError, ControlServer, ControlSocketBusy

    control = ControlServer(
        runtime.config.control_socket, {"status": runtime.status, "reset": runtime.reset}
    )
    try:
        control.start()
    except ControlSocketBusy:
        raise
    except ControlError as exc:
        log.warning("%s; running without status and reset", exc)
        return
    runtime.closers.append(control.stop)


def _register_collectors(metrics: Any, runtime: Runtime) -> None:
    """Expose the actors' own counters at scrape time (no per-packet locking).

    A scrape takes no session's lock and asks no PeerActor: client figures come from the
    session registry (``actors/peer_session.py``), which reads each session's counters
    without its lock and keeps closed sessions' totals, so counters never go back when a
    client leaves. The rest is one ask each to the portal, node and TUN actors.
    """

    def collect() -> list[tuple[str, dict[str, str], float]]:
        try:
            node: dict[str, Any] = runtime.node.ask(
                GetNodeStatus(), block=True, timeout=ASK_TIMEOUT)
            resets = node["resets"]
            portal: PortalStatus = runtime.portal.ask(
                GetPortalStatus(), block=True, timeout=ASK_TIMEOUT)
            tun: dict[str, Any] = runtime.tun.ask(GetTunStats(), block=True, timeout=ASK_TIMEOUT)
        except Exception:
            return []
        figures = SESSIONS.figures()
        drops: dict[str, float] = dict(figures.drops)
        for reason, count in tun.get("dropped", {}).items():
            drops[f"tun_{reason}"] = drops.get(f"tun_{reason}", 0) + count
        samples: list[tuple[str, dict[str, str], float]] = [
            ("firezone_connections", {"path": path}, count)
            for path, count in figures.paths.items()
        ]
        samples += [("firezone_dropped_packets_total", {"reason": str(r)}, c)
                    for r, c in drops.items()]
        samples += node_event_samples(node["counters"])
        samples += [
            ("firezone_rx_bytes_total", {}, figures.rx_bytes),
            ("firezone_tx_bytes_total", {}, figures.tx_bytes),
            ("firezone_handshakes_total", {}, figures.handshakes),
            ("firezone_portal_reconnects_total", {}, portal.reconnects),
            ("firezone_portal_malformed_frames_total", {}, portal.malformed_frames),
            ("firezone_portal_joined", {}, 1.0 if portal.state == "joined" else 0.0),
            ("firezone_resets_total", {}, resets),
        ]
        gc_status = runtime.gc_policy.status() if runtime.gc_policy is not None else None
        if gc_status is not None:
            for generation, (count, longest) in enumerate(
                zip(gc_status["collections"], gc_status["longest_pause_ms"], strict=True)
            ):
                labels = {"generation": str(generation)}
                samples.append(("firezone_gc_collections_total", labels, count))
                samples.append(("firezone_gc_longest_pause_seconds", labels, longest / 1e3))
        return samples

    metrics.add_collector(collect)


def _install_signals(runtime: Runtime, reload: Callable[[], GatewayConfig] | None) -> None:
    def graceful(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        runtime.stopping.set()

    def hangup(_signum: int, _frame: FrameType | None) -> None:
        if reload is None:
            log.info("SIGHUP: nothing to reload")
            return
        # Re-reading files must not run inside the signal handler's frame for long; it is
        # cheap (a YAML file and the environment), and errors keep the old configuration.
        try:
            fresh = reload()
        except Exception as exc:
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        apply_reload(runtime, fresh)

    signal.signal(signal.SIGTERM, graceful)
    signal.signal(signal.SIGINT, graceful)
    signal.signal(signal.SIGHUP, hangup)
    signal.signal(signal.SIGUSR1, pykka.debug.log_thread_tracebacks)


#: Keys a running gateway applies on SIGHUP; everything else needs a restart.
LIVE_KEYS = ("log_filter", "log_format")


def apply_reload(runtime: Runtime, fresh: GatewayConfig) -> list[str]:
    """Apply the live-changeable part of ``fresh``; returns the keys that need a restart."""
    from dataclasses import fields

    from actors.logsetup import configure_logging, register_secret

    old = runtime.config
    changed = [f.name for f in fields(old) if getattr(old, f.name) != getattr(fresh, f.name)]
    if any(key in changed for key in LIVE_KEYS):
        configure_logging(fresh.log_filter, fresh.log_format)
        register_secret(fresh.token)
        log.info("SIGHUP: log filter now %r, format %s", fresh.log_filter, fresh.log_format)
    needs_restart = [key for key in changed if key not in LIVE_KEYS]
    if needs_restart:
        log.warning("SIGHUP: %s changed; restart the gateway to apply", ", ".join(needs_restart))
    runtime.config = fresh if not needs_restart else _with_live(old, fresh)
    return needs_restart


def _with_live(old: GatewayConfig, fresh: GatewayConfig) -> GatewayConfig:
    from dataclasses import replace

    return replace(old, **{key: getattr(fresh, key) for key in LIVE_KEYS})
