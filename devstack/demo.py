"""``make demo``: the gateway with the development portal, coturn and a client, in namespaces.

``python -m devstack.demo [--non-interactive] [--keep-seconds N] [--workdir DIR]`` (as root)
builds the end-to-end test network (``devstack/topology.py``), starts coturn, the
development portal, a demo resource (HTTP :8080, UDP echo :7000), the gateway and a
development client, sends an HTTP request and a UDP datagram through the tunnel, and prints
what runs and how to look at it. It then waits for Ctrl-C (interactive), for
``--keep-seconds``, or not at all (``--non-interactive``, ``CI`` set, or stdin not a TTY),
and removes everything it created. Exit status: 0 when set-up, checks and teardown
succeeded (also after Ctrl-C during the wait), 1 when a step failed, 130 when interrupted
during set-up.

The building blocks are the rest of :mod:`devstack` (the same world the end-to-end tests
and the benchmarks use).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from actors.cli import render_status
from devstack.coturn import CoturnServer
from devstack.stack import CIDR_RESOURCE, Proc, Stack
from devstack.topology import ADDRESSES, RESOURCE, Topology, topology

log = logging.getLogger("devstack.demo")

HTTP_URL = f"http://{RESOURCE}:8080/"
UDP_PORT = 7000
HEALTH = "127.0.0.1:18080"
STEPS = 8
REQUIRED_BINARIES = {"ip": "iproute2", "turnserver": "coturn", "nft": "nftables",
                     "curl": "curl"}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Marker line printed once everything runs (tests wait for it).
RUNNING_LINE = "The demo is running."


class StepFailed(Exception):
    """A set-up step or check failed; the message says which and why."""


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived (a BaseException so library code cannot swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """Turns SIGINT/SIGTERM/SIGHUP into :class:`Interrupted`, deferred inside :meth:`shield`.

    Children are started with SIGINT blocked (the mask is inherited), so a Ctrl-C in the
    terminal, which reaches the whole foreground process group, only reaches the demo: the
    demo then stops the children itself, in order, with SIGTERM.
    """

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.depth = 0
        self.pending: int | None = None
        self.tearing_down = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in self.HANDLED:
            self._previous[signum] = signal.signal(signum, self._handler)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.tearing_down:
            print("\n(still cleaning up, please wait)", file=self.out, flush=True)
        elif self.depth:
            self.pending = signum
        else:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        """Start children here: they inherit a blocked SIGINT; our own signal waits."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if not self.depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)


@dataclass
class StepNote:
    """What a step adds to its ``ok`` line and prints below it."""

    detail: str = ""
    lines: list[str] = field(default_factory=list)


class Progress:
    """Numbered set-up steps and the teardown steps, printed as they happen."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self.number = 0
        self.teardown_failures = 0

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    @contextlib.contextmanager
    def step(self, label: str, logs: Callable[[], str] | None = None) -> Iterator[StepNote]:
        """``[i/N] label ... ok (0.1 s)``; on failure the tail of ``logs`` follows."""
        self.number += 1
        print(f"[{self.number}/{self.total}] {label} ...", end=" ", file=self.out, flush=True)
        note = StepNote()
        started = time.monotonic()
        try:
            yield note
        except Interrupted:
            self.say("interrupted")
            raise
        except Exception as exc:
            self.say(f"FAILED ({time.monotonic() - started:.1f} s)")
            self.say(f"    {type(exc).__name__}: {exc}".rstrip())
            if logs is not None:
                self.say(_indent(_safe(logs), "    | "))
            raise StepFailed(f"step {self.number}/{self.total} failed: {label}") from exc
        extra = f", {note.detail}" if note.detail else ""
        self.say(f"ok ({time.monotonic() - started:.1f} s{extra})")
        for line in note.lines:
            self.say(f"      {line}")

    def teardown(self, label: str, action: Callable[[], object]) -> None:
        """One cleanup step; a failure is reported and counted, never raised."""
        print(f"[cleanup] {label} ...", end=" ", file=self.out, flush=True)
        started = time.monotonic()
        try:
            action()
        except Exception as exc:
            self.teardown_failures += 1
            log.debug("cleanup step %r failed", label, exc_info=True)
            self.say(f"FAILED: {type(exc).__name__}: {exc}")
            return
        self.say(f"ok ({time.monotonic() - started:.1f} s)")


def _safe(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as exc:  # a log tail must never hide the real failure
        return f"(no log: {exc})"


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in (text.strip() or "(empty)").splitlines())


def _file_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _gateway_cli() -> list[str]:
    """How the user runs the gateway's ``status``/``reset`` commands."""
    script = Path(sys.executable).parent / "firezone-gateway"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "actors.cli"]


def _netns_list() -> set[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in result.stdout.splitlines() if line.strip()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _terminal_foreground() -> Iterator[None]:
    """Under ``make``, become the terminal's foreground process group for the demo's life.

    A terminal's Ctrl-C goes to its whole foreground group. ``make`` shares ours, would
    die of it and report "Interrupt" even though the demo cleaned up and exited 0. So a
    demo that is not its group's leader moves to a group of its own and takes the
    terminal; the old group gets it back at the end.
    """
    try:
        fd = sys.stdin.fileno()
        shared = (os.isatty(fd) and os.getpgrp() != os.getpid()
                  and os.tcgetpgrp(fd) == os.getpgrp())
    except (OSError, ValueError):
        shared = False
    if not shared:
        yield
        return
    old_group = os.getpgrp()
    old_ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # tcsetpgrp from a background group
    try:
        os.setpgid(0, 0)
        os.tcsetpgrp(fd, os.getpgrp())
    except OSError as exc:
        log.debug("could not take the terminal's foreground: %s", exc)
    finally:
        signal.signal(signal.SIGTTOU, old_ttou)
    try:
        yield
    finally:
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        with contextlib.suppress(OSError):
            os.tcsetpgrp(fd, old_group)
        signal.signal(signal.SIGTTOU, old_ttou)


@dataclass
class Options:
    """Parsed command line."""

    interactive: bool
    keep_seconds: float | None
    workdir: Path | None
    verbose: bool


class Demo:
    """Sets up the world step by step, reports, waits, and tears it down."""

    def __init__(self, options: Options, out: TextIO) -> None:
        self.options = options
        self.progress = Progress(out, STEPS)
        self.signals = Signals(out)
        self.exits = contextlib.ExitStack()
        self.topo: Topology | None = None
        self.stack: Stack | None = None
        self.client: Proc | None = None
        self.workdir = Path()
        self.status: dict[str, Any] = {}
        self.running = False
        self.path = "?"
        self.coturn_pid: int | None = None

    # ----------------------------------------------------------------- entry point

    def run(self) -> int:
        problem = self._preflight()
        if problem:
            self.progress.say(f"demo: {problem}")
            return 1
        self.signals.install()
        try:
            with _terminal_foreground():
                return self._run_and_clean_up()
        finally:
            self.signals.restore()

    def _run_and_clean_up(self) -> int:
        say = self.progress.say
        code, failed = 0, False
        with self.exits:  # runs every registered cleanup step, last started first
            try:
                self._make_workdir()
                self._set_up()
                self._report()
                self._wait()
            except Interrupted as exc:
                say(f"\n{exc}: stopping the demo")
                code = 0 if self.running else 130
            except StepFailed as exc:
                say(f"\ndemo: {exc}; cleaning up")
                failed, code = True, 1
            except Exception:
                log.exception("demo: unexpected error; cleaning up")
                failed, code = True, 1
            finally:
                self.signals.tearing_down = True
        return self._after_teardown(code, failed)

    def _preflight(self) -> str:
        if os.geteuid() != 0:
            return "needs root (network namespaces); run `sudo make demo`"
        if not os.path.exists("/dev/net/tun"):
            return "needs /dev/net/tun (modprobe tun)"
        missing = [f"{b} ({p})" for b, p in REQUIRED_BINARIES.items() if not shutil.which(b)]
        if missing:
            return f"missing {', '.join(missing)}; run `make deps` (or apt-get install them)"
        return ""

    def _make_workdir(self) -> None:
        if self.options.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="pyfz-demo-"))
            return
        self.workdir = self.options.workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Leftovers of an earlier run in the same directory (appended logs, the client's FIFO).
        for name in ("gateway.log", "portal.log", "client0.log", "http.log", "udp-echo.log",
                     "client0.cmd", "coturn/turnserver.log", "gw/control.sock"):
            (self.workdir / name).unlink(missing_ok=True)

    # ----------------------------------------------------------------- set-up

    def _set_up(self) -> None:
        step, teardown = self.progress.step, self.progress.teardown
        say = self.progress.say
        say("pyfz-gateway demo: portal, relay, gateway, client and a resource in namespaces")
        say(f"work directory (logs): {self.workdir}")

        with step("creating network namespaces") as note, self.signals.shield():
            topo_cm = topology()
            self.exits.callback(teardown, "removing the network namespaces",
                                lambda: topo_cm.__exit__(None, None, None))
            topo = self.topo = topo_cm.__enter__()
            note.detail = ", ".join(f"{role} {ns}" for role, ns in topo.names.items())

        coturn = CoturnServer(self.workdir / "coturn", netns=topo.ns("relay"),
                              listen_ip=ADDRESSES["relay"])
        with step(f"starting coturn (the relay) in {topo.ns('relay')}",
                  lambda: coturn.log_tail(20)) as note, self.signals.shield():
            self.exits.callback(teardown, "stopping coturn", coturn.stop)
            coturn.start()
            self.coturn_pid = coturn.proc.pid if coturn.proc is not None else None
            note.detail = f"{ADDRESSES['relay']}:{coturn.port}"
        built = self.stack = Stack(topo=topo, tmp=self.workdir, coturn=coturn)

        with step(f"starting the development portal in {topo.ns('portal')}",
                  lambda: _file_tail(self.portal_log)) as note, self.signals.shield():
            self._log_portal_to_file()
            self.exits.callback(teardown, "stopping the development portal", self._stop_portal)
            built.start_portal()
            note.detail = built.portal_url

        with step(f"starting the demo resource in {topo.ns('resource')}",
                  lambda: "\n".join(p.tail(20) for p in built.servers)) as note, \
                self.signals.shield():
            self.exits.callback(teardown, "stopping the demo resource",
                                lambda: [p.stop() for p in built.servers])
            built.start_resource_servers()
            note.detail = f"HTTP {RESOURCE}:8080, UDP echo {RESOURCE}:{UDP_PORT}"

        with step(f"starting the gateway in {topo.ns('gateway')} (portal join, TURN allocation)",
                  lambda: built.gateway.tail(40) if built.gateway else "") as note:
            with self.signals.shield():
                self.exits.callback(teardown, "stopping the gateway", self._stop_gateway)
                built.start_gateway()
            self.status = self._wait_gateway(timeout=30)
            note.detail = f"public key {self.status.get('public_key', '?')}"

        with step(f"starting the development client in {topo.ns('client')} (tunnel up)",
                  self._client_logs) as note:
            with self.signals.shield():
                self.exits.callback(teardown, "stopping the development client",
                                    lambda: [c.stop() for c in built.clients])
                self.client = built.start_client(CIDR_RESOURCE)
            line = self._wait_client(self.client, timeout=30)
            if not line.startswith("READY"):
                raise RuntimeError(f"client reported: {line}")
            self.path = line.split("path=")[-1].split()[0] if "path=" in line else "?"
            note.detail = f"path={self.path}"

        with step(f"HTTP through the tunnel: curl {HTTP_URL}", self._client_logs) as note:
            note.lines = self._http_check()

        with step(f"UDP echo through the tunnel to {RESOURCE}:{UDP_PORT}",
                  self._client_logs) as note:
            note.detail = self._udp_check()

    def _wait_gateway(self, timeout: float) -> dict[str, Any]:
        """Joined to the portal with a relay allocated; fails early if the gateway exits."""
        assert self.stack is not None and self.stack.gateway is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.stack.gateway.popen.poll()
            if code is not None:
                time.sleep(0.2)  # let the log collector catch the last lines
                raise RuntimeError(f"the gateway exited with status {code}")
            try:
                return self.stack.wait_gateway_ready(timeout=0.5)
            except AssertionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"not joined with a relay allocation after {timeout:g} s") from None

    @staticmethod
    def _wait_client(client: Proc, timeout: float) -> str:
        """The client's READY (or FAILED/PORTAL_ERROR) line; fails early if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return client.wait_line(
                    lambda s: s.startswith(("READY", "FAILED", "PORTAL_ERROR")), timeout=0.5)
            except AssertionError:
                if client.popen.poll() is not None:
                    time.sleep(0.2)
                    raise RuntimeError(
                        f"the client exited with status {client.popen.returncode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no tunnel after {timeout:g} s") from None

    def _http_check(self) -> list[str]:
        assert self.stack is not None
        result = None
        for _ in range(3):
            result = self.stack.http_get(HTTP_URL, timeout=5)
            if result.returncode == 0 and result.stdout:
                return [f"response: {line}" for line in result.stdout.strip().splitlines()]
            time.sleep(0.5)
        assert result is not None
        raise RuntimeError(f"curl exit {result.returncode}: {result.stderr.strip()}")

    def _udp_check(self) -> str:
        assert self.stack is not None
        payload = b"hello over udp"
        for attempt in range(1, 6):
            started = time.monotonic()
            reply = self.stack.udp_echo(RESOURCE, UDP_PORT, payload, timeout=1.0)
            if reply == payload:
                rtt = (time.monotonic() - started) * 1000
                return f"echoed {payload.decode()!r} in {rtt:.1f} ms (attempt {attempt})"
        raise RuntimeError("no echo after 5 datagrams")

    def _client_logs(self) -> str:
        assert self.stack is not None
        parts = [f"--- client ---\n{self.client.tail(30) if self.client else ''}",
                 f"--- gateway ---\n{self.stack.gateway.tail(30) if self.stack.gateway else ''}"]
        return "\n".join(parts)

    @property
    def portal_log(self) -> Path:
        return self.workdir / "portal.log"

    def _log_portal_to_file(self) -> None:
        """The portal runs in this process: its log records go to ``portal.log``."""
        handler = logging.FileHandler(self.portal_log)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        portal_logger = logging.getLogger("devportal")
        portal_logger.addHandler(handler)
        portal_logger.setLevel(logging.DEBUG if self.options.verbose else logging.INFO)

        def close() -> None:
            portal_logger.removeHandler(handler)
            handler.close()

        self.exits.callback(close)

    def _stop_portal(self) -> None:
        if self.stack is not None and self.stack.portal is not None:
            self.stack.portal.stop()

    def _stop_gateway(self) -> None:
        gateway = self.stack.gateway if self.stack is not None else None
        if gateway is not None and gateway.popen.poll() is None:  # an early exit was reported
            code = gateway.stop()
            if code not in (0, None, -signal.SIGTERM):  # SIGTERM before its handler is set
                raise RuntimeError(f"gateway exited with {code}")

    # ----------------------------------------------------------------- report and wait

    def _processes(self) -> list[tuple[str, str, int]]:
        """(what, namespace, pid) for every process the demo started."""
        assert self.stack is not None and self.topo is not None
        built, topo = self.stack, self.topo
        rows: list[tuple[str, str, int]] = []
        if self.coturn_pid is not None:
            rows.append(("coturn (relay)", topo.ns("relay"), self.coturn_pid))
        rows.append(("development portal (in this process)", topo.ns("portal"), os.getpid()))
        for proc in built.servers:
            rows.append((f"resource {proc.name} server", topo.ns("resource"), proc.popen.pid))
        if built.gateway is not None:
            rows.append(("gateway", topo.ns("gateway"), built.gateway.popen.pid))
        for proc in built.clients:
            rows.append((f"development client ({proc.name})", topo.ns("client"), proc.popen.pid))
        return rows

    def _report(self) -> None:
        assert self.stack is not None and self.topo is not None
        say, built, topo = self.progress.say, self.stack, self.topo
        with contextlib.suppress(OSError, ValueError):
            self.status = built.gateway_status()
        say()
        say(RUNNING_LINE)
        say("Namespaces: " + ", ".join(f"{role}={ns}" for role, ns in topo.names.items())
            + f", bridge={topo.wan}")
        say("Processes:")
        for what, ns, pid in self._processes():
            say(f"  {what:<40} netns {ns:<14} pid {pid}")
        buffer = io.StringIO()
        render_status(self.status, buffer, now=time.time())
        say(f"Client to gateway path: {self.path} (direct, or relay via coturn)")
        say("Gateway status:")
        say(_indent(buffer.getvalue(), "  "))
        ready = topo.run("gateway", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                         f"{HEALTH}/readyz", check=False).stdout.strip()
        say(f"Health: {HEALTH}/readyz in {topo.ns('gateway')} answers {ready or '(nothing)'}")
        cli = " ".join(_gateway_cli())
        sock = built.control_socket
        logs = [built.gateway.log_path if built.gateway else None, self.portal_log,
                *(c.log_path for c in built.clients), *(s.log_path for s in built.servers),
                built.coturn.log_path]
        say()
        say("Look at it (in another terminal, as root):")
        say(f"  status:    {cli} status --control-socket {sock}")
        say(f"  reset:     {cli} reset --control-socket {sock}")
        say(f"  request:   ip netns exec {topo.ns('client')} curl {HTTP_URL}")
        say(f"  health:    ip netns exec {topo.ns('gateway')} curl -s {HEALTH}/readyz")
        say(f"  metrics:   ip netns exec {topo.ns('gateway')} curl -s {HEALTH}/metrics")
        say("  logs:      tail -f " + " ".join(str(p) for p in logs if p is not None))
        if self.options.workdir is None:
            say("             (removed after a clean run; --workdir DIR keeps them)")
        say()
        self.running = True

    def _wait(self) -> None:
        say = self.progress.say
        keep = self.options.keep_seconds
        if keep is None and not self.options.interactive:
            say("Non-interactive mode: cleaning up now.")
            return
        if keep is None:
            say("Press Ctrl-C to stop the demo and clean up.")
            deadline = float("inf")
        else:
            say(f"Keeping it running for {keep:g} s (Ctrl-C stops it earlier).")
            deadline = time.monotonic() + keep
        while time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            self._check_alive()
        say("Time is up: stopping the demo.")

    def _check_alive(self) -> None:
        assert self.stack is not None
        built = self.stack
        procs = [p for p in (built.gateway, *built.clients, *built.servers) if p is not None]
        for proc in procs:
            if proc.popen.poll() is not None:
                self.progress.say(f"\n{proc.name} exited with {proc.popen.returncode}:")
                self.progress.say(_indent(proc.tail(30), "    | "))
                raise StepFailed(f"{proc.name} stopped unexpectedly")
        coturn = built.coturn.proc
        if coturn is not None and coturn.poll() is not None:
            self.progress.say(_indent(built.coturn.log_tail(20), "    | "))
            raise StepFailed("coturn stopped unexpectedly")

    # ----------------------------------------------------------------- after teardown

    def _after_teardown(self, code: int, failed: bool) -> int:
        say = self.progress.say
        names = set(self.topo.names.values()) | {self.topo.wan} if self.topo else set()
        left_ns = sorted(names & _netns_list())
        left_pids = ([pid for _, _, pid in self._processes() if pid != os.getpid()
                      and _alive(pid)] if self.stack is not None else [])
        if left_ns or left_pids:
            say(f"demo: left behind: namespaces {left_ns or '-'}, pids {left_pids or '-'}")
            code = code or 1
        elif self.topo is not None:
            say("Cleaned up: no namespace or process of the demo is left.")
        if self.progress.teardown_failures:
            code = code or 1
        if failed or code not in (0, 130):
            if self.workdir != Path():
                say(f"Logs kept in {self.workdir}")
        elif self.options.workdir is None and self.workdir != Path():
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code


def parse_args(argv: Sequence[str] | None) -> Options:
    """Command line to :class:`Options`; non-interactive when asked, in CI or without a TTY."""
    parser = argparse.ArgumentParser(
        prog="python -m devstack.demo",
        description="Run the gateway against the development portal, coturn and a "
        "development client in network namespaces (needs root).",
    )
    parser.add_argument("--non-interactive", action="store_true",
                        help="set up, check, print, tear down and exit (also when CI is set "
                        "or stdin is not a terminal)")
    parser.add_argument("--keep-seconds", type=float, metavar="N",
                        help="keep everything running N seconds before tearing down "
                        "(Ctrl-C still works)")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="put logs and sockets here and keep them (default: a temporary "
                        "directory, removed after a clean run)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the demo's internals")
    args = parser.parse_args(argv)
    interactive = not (args.non_interactive or os.environ.get("CI") or not sys.stdin.isatty())
    return Options(interactive=interactive, keep_seconds=args.keep_seconds,
                   workdir=args.workdir, verbose=args.verbose)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m devstack.demo``."""
    options = parse_args(argv)
    console = logging.StreamHandler()  # stderr; portal.log gets the portal's INFO records
    console.setLevel(logging.DEBUG if options.verbose else logging.WARNING)
    console.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=logging.DEBUG if options.verbose else logging.WARNING,
                        handlers=[console])
    return Demo(options, sys.stdout).run()


if __name__ == "__main__":
    sys.exit(main())
