"""``make demo`` (``python -m devstack.demo``): set-up, checks and teardown, as CI runs them.

1. ``--non-interactive``: exit 0, the resource's HTTP body and the how-to-look-at-it
   instructions are printed, and no namespace or process of the demo is left;
2. SIGINT to the whole process group during ``--keep-seconds`` tears everything down and
   exits 0;
3. the default (interactive) mode on a terminal, directly and under ``make``: Ctrl-C typed
   into the terminal does too, and make exits 0 (no "Interrupt");
4. a failing step exits 1 with the log tail, and the teardown still runs.
"""

from __future__ import annotations

import fcntl
import os
import queue
import re
import select
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devstack.topology import python
from tests.support.interop import require_bin, require_netns

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parent.parent.parent
BODY = "hello through the tunnel"


@pytest.fixture(autouse=True)
def _requirements() -> None:
    require_netns()
    require_bin("turnserver", "coturn")
    require_bin("nft", "nftables")
    require_bin("curl", "curl")


def _namespaces(output: str) -> list[str]:
    line = next(s for s in output.splitlines() if s.startswith("Namespaces: "))
    return re.findall(r"=(\w+)", line)


def _pids(output: str, demo_pid: int) -> list[int]:
    return [int(p) for p in re.findall(r"\bpid (\d+)", output) if int(p) != demo_pid]


def _assert_clean(output: str, demo_pid: int) -> None:
    names = _namespaces(output)
    assert len(names) == 6, output
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=True).stdout
    present = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert not present & set(names), f"namespaces left: {present & set(names)}"
    pids = _pids(output, demo_pid)
    assert len(pids) >= 4, output  # coturn, http, udp echo, gateway, client
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    assert "Cleaned up: no namespace or process of the demo is left." in output


def test_non_interactive_demo_sets_up_checks_and_cleans_up() -> None:
    env = dict(os.environ, CI="1")
    started = time.monotonic()
    result = subprocess.run([python(), "-m", "devstack.demo", "--non-interactive"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert time.monotonic() - started < 30, output
    for n in range(1, 9):
        assert re.search(rf"^\[{n}/8\] .* \.\.\. ok \(", output, re.M), output
    assert f"response: {BODY}" in output
    assert re.search(r"path=(direct|relay)", output), output
    assert re.search(r"status --control-socket \S+control\.sock", output), output
    assert re.search(r"reset --control-socket \S+control\.sock", output), output
    assert re.search(r"ip netns exec fzcli\w+ curl http://10\.204\.0\.2:8080/", output), output
    assert re.search(r"ip netns exec fzgat\w+ curl -s 127\.0\.0\.1:18080/readyz", output)
    assert re.search(r"tail -f \S+gateway\.log", output), output
    assert "readyz in fzgat" in output and "answers 200" in output, output
    _assert_clean(output, demo_pid=-1)


def test_sigint_during_the_wait_cleans_up_and_exits_0() -> None:
    proc = subprocess.Popen(
        [python(), "-m", "devstack.demo", "--keep-seconds", "60"], cwd=REPO,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while not any("Ctrl-C stops it earlier" in s for s in seen):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "".join(seen)
            seen.append(line)
        os.killpg(proc.pid, signal.SIGINT)  # the whole group: children ignore it, demo cleans
        assert proc.wait(timeout=20) == 0, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    while (line := lines.get(timeout=5)) is not None:
        seen.append(line)
    output = "".join(seen)
    assert "SIGINT: stopping the demo" in output, output
    assert output.count("[cleanup]") == 6 and "FAILED" not in output, output
    assert f"response: {BODY}" in output
    _assert_clean(output, demo_pid=proc.pid)


@pytest.mark.parametrize("via_make", [False, True], ids=["python", "make"])
def test_ctrl_c_on_a_terminal_in_interactive_mode_cleans_up_and_exits_0(
    via_make: bool, tmp_path: Path
) -> None:
    """Under make too: make shares the demo's process group, yet must exit 0 as well."""
    command = [python(), "-m", "devstack.demo"]
    if via_make:
        require_bin("make", "make")
        makefile = tmp_path / "Makefile"
        makefile.write_text(f"demo:\n\t{' '.join(command)}\n")
        command = ["make", "-s", "-f", str(makefile), "demo"]
    master, slave = os.openpty()

    def controlling_tty() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = {k: v for k, v in os.environ.items() if k != "CI"}
    proc = subprocess.Popen(  # preexec_fn: the terminal becomes its controlling tty
        command, cwd=REPO, env=env, stdin=slave, stdout=slave,
        stderr=slave, start_new_session=True, preexec_fn=controlling_tty,
    )
    os.close(slave)
    output = b""

    def read_until(predicate: Callable[[bytes], bool], timeout: float) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while not predicate(output) and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal is gone
                    return
                if not chunk:
                    return
                output += chunk

    try:
        read_until(lambda b: b"Press Ctrl-C to stop the demo" in b, 30)
        assert b"Press Ctrl-C to stop the demo" in output, output.decode(errors="replace")
        os.write(master, b"\x03")  # the terminal sends SIGINT to its foreground group
        read_until(lambda b: b"Cleaned up" in b or b"left behind" in b, 20)
        assert proc.wait(timeout=20) == 0, output.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
    text = output.decode(errors="replace").replace("\r\n", "\n")
    assert "SIGINT: stopping the demo" in text, text
    assert text.count("[cleanup]") == 6 and "FAILED" not in text, text
    assert "Interrupt" not in text, text
    _assert_clean(text, demo_pid=proc.pid)


def test_a_failing_step_exits_1_with_the_log_tail_and_still_cleans_up(tmp_path: Path) -> None:
    """A gateway that cannot start: the step fails with its log, everything else goes."""
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$*" in *actors.cli*) echo "demo-test: gateway refuses to start"; exit 3;; esac\n'
        f'exec {python()} "$@"\n'
    )
    wrapper.chmod(0o755)
    env = dict(os.environ, FZ_PYTHON=str(wrapper))
    workdir = tmp_path / "work"
    result = subprocess.run([python(), "-m", "devstack.demo", "--non-interactive", "--workdir",
                             str(workdir)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout
    assert result.returncode == 1, output + result.stderr
    assert re.search(r"^\[5/8\] starting the gateway .* FAILED", output, re.M), output
    assert "the gateway exited with status 3" in output
    assert "| demo-test: gateway refuses to start" in output
    assert "demo: step 5/8 failed" in output
    assert "[cleanup] removing the network namespaces ... ok" in output
    assert "Cleaned up: no namespace or process of the demo is left." in output
    assert f"Logs kept in {workdir}" in output
    assert "refuses to start" in (workdir / "gateway.log").read_text()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=True).stdout
    names = re.findall(r"\b(fz[a-z]{3}\d+x\d+)", output)
    assert names and not set(names) & set(listed.split()), listed
