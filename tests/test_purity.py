"""Protocol cores under gateway/ stay sans-IO: no sockets, threads, clocks or actor code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"

#: Modules a core must not import: IO, concurrency, clocks, OS access, the shells' libraries.
FORBIDDEN_MODULES = {
    "socket", "select", "selectors", "ssl", "threading", "_thread", "multiprocessing",
    "concurrent", "asyncio", "queue", "time", "os", "io", "subprocess", "fcntl", "signal",
    "ctypes", "mmap", "shutil", "pathlib", "tempfile", "secrets", "urllib.request", "http",
    "pykka", "websocket", "websockets", "pyroute2", "logging.handlers",
}
#: Module-level functions that read hidden clocks or OS randomness.
FORBIDDEN_CALLS = {
    ("random", "random"), ("random", "randbytes"), ("random", "randint"),
    ("random", "randrange"), ("random", "uniform"), ("random", "choice"),
    ("random", "getrandbits"), ("random", "shuffle"), ("uuid", "uuid1"), ("uuid", "uuid4"),
    ("datetime", "now"), ("datetime", "utcnow"), ("date", "today"), ("builtins", "open"),
}


def _modules() -> list[Path]:
    return sorted(GATEWAY.rglob("*.py"))


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []

    def check(module: str, lineno: int) -> None:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            if ".".join(parts[:i]) in FORBIDDEN_MODULES:
                found.append(f"{path.name}:{lineno} imports {module}")
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            check(node.module, node.lineno)
            for alias in node.names:
                if (node.module.split(".")[-1], alias.name) in FORBIDDEN_CALLS:
                    found.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in {"open", "input", "print"}:
                found.append(f"{path.name}:{node.lineno} calls {func.id}()")
            elif (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and (func.value.id, func.attr) in FORBIDDEN_CALLS
            ):
                found.append(f"{path.name}:{node.lineno} calls {func.value.id}.{func.attr}()")
    return found


def test_gateway_package_is_not_empty() -> None:
    assert _modules(), "gateway/ has no modules"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(GATEWAY)))
def test_core_module_is_sans_io(path: Path) -> None:
    assert _violations(path) == []


def test_checker_catches_io(tmp_path: Path) -> None:
    """The checker itself must fail on the things it is meant to catch."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import socket\nfrom time import monotonic\nimport random\n"
        "from os import urandom\nx = random.random()\nopen('f')\n"
    )
    found = _violations(bad)
    assert len(found) == 5, found


def test_the_client_session_core_is_checked() -> None:
    """One client's data path (``gateway/session.py``) is a core like the others."""
    assert GATEWAY / "session.py" in _modules()
