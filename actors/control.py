"""Local control socket: ``firezone-gateway status`` / ``reset`` talk to the running gateway.

Protocol: a Unix stream socket; the client sends one JSON object per line
(``{"command": "status"}``) and gets one JSON object per line back. Errors come back as
``{"error": "..."}``. The socket is 0600 inside a 0700 directory: only its owner (and
root) may talk to it, because ``reset`` drops every client connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Requests are tiny; anything longer is garbage or an attack.
MAX_REQUEST_BYTES = 4096
#: A connected client that says nothing is dropped after this long.
CLIENT_IDLE_TIMEOUT = 10.0

Handlers = Mapping[str, Callable[[], dict[str, Any]]]


class ControlError(OSError):
    """The control socket cannot be served or reached (an OSError: it is an IO failure)."""


class ControlSocketBusy(ControlError):
    """Another live gateway answers on the control socket: two would fight over the TUN."""


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    handlers: Handlers


class _RequestHandler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = CLIENT_IDLE_TIMEOUT

    def handle(self) -> None:
        while True:
            try:
                line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
            except (TimeoutError, OSError):
                return
            if not line:
                return
            if len(line) > MAX_REQUEST_BYTES:
                self._send({"error": f"request longer than {MAX_REQUEST_BYTES} bytes"})
                return
            if not line.strip():
                continue
            self._send(self._dispatch(line))

    def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"error": "request is not valid JSON"}
        command = request.get("command") if isinstance(request, dict) else None
        if not isinstance(command, str):
            return {"error": 'expected {"command": "<name>"}'}
        handler = self.server.handlers.get(command)
        if handler is None:
            known = ", ".join(sorted(self.server.handlers))
            return {"error": f"unknown command {command!r} (known: {known})"}
        try:
            response = handler()
        except Exception as exc:
            log.exception("control command %r failed", command)
            return {"error": f"{command} failed: {type(exc).__name__}: {exc}"}
        if not isinstance(response, dict):
            log.error("control command %r returned %s, not a dict", command, type(response))
            return {"error": f"{command} returned no result"}
        return response

    def _send(self, response: dict[str, Any]) -> None:
        data = json.dumps(response, default=str).encode() + b"\n"
        with contextlib.suppress(OSError):
            self.wfile.write(data)
            self.wfile.flush()


class ControlServer:
    """Serves ``handlers`` (command name -> callable returning a JSON-able dict) on ``path``."""

    def __init__(self, path: str, handlers: Handlers) -> None:
        self._path = Path(path)
        self._handlers = dict(handlers)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._inode: int | None = None

    @property
    def path(self) -> Path:
        return self._path

    def start(self) -> None:
        """Bind (replacing a stale socket) and serve on the ``ControlServer`` thread.

        Raises :class:`ControlSocketBusy` if another process answers on ``path``, and
        :class:`ControlError` if binding fails.
        """
        directory = self._path.parent
        try:
            if not directory.exists():
                directory.mkdir(mode=0o700, parents=True)
            elif stat.S_IMODE(directory.stat().st_mode) & 0o077:
                log.warning(
                    "control socket directory %s is accessible to others (mode %o); "
                    "the socket itself is 0600",
                    directory,
                    stat.S_IMODE(directory.stat().st_mode),
                )
            self._remove_stale()
            server = _Server(str(self._path), _RequestHandler, bind_and_activate=False)
            server.handlers = self._handlers
            # Tighten before the socket exists: bind() honours the umask, chmod() closes the
            # gap for umasks that are not 077 anyway.
            server.server_bind()
            os.chmod(self._path, 0o600)
            server.server_activate()
        except ControlError:
            raise  # already says what is wrong (another gateway, a file in the way)
        except OSError as exc:
            raise ControlError(
                f"cannot serve the control socket {self._path}: {exc.strerror or exc}"
            ) from exc
        self._inode = self._path.stat().st_ino
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="ControlServer"
        )
        self._thread.daemon = True
        self._thread.start()
        log.info("control socket listening on %s", self._path)

    def _remove_stale(self) -> None:
        try:
            mode = self._path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"{self._path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self._path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale control socket %s", self._path)
            self._path.unlink(missing_ok=True)
            return
        finally:
            probe.close()
        raise ControlSocketBusy(
            f"another gateway is already running (it answers on {self._path}); stop it first"
        )

    def stop(self) -> None:
        """Stop serving and remove the socket file if it is still ours."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        stopper = threading.Thread(target=server.shutdown, name="ControlServer-stop")
        stopper.start()
        while stopper.is_alive():
            # Wake serve_forever's poll instead of waiting out its interval.
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as poke:
                poke.settimeout(0.2)
                poke.connect(str(self._path))
            stopper.join(timeout=0.05)
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        with contextlib.suppress(OSError):
            if self._path.stat().st_ino == self._inode:
                self._path.unlink()


def control_request(path: str, command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command and return the gateway's JSON answer.

    Raises :class:`ControlError` when nothing listens, access is denied or the answer is
    not JSON. An ``{"error": ...}`` answer is returned, not raised.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"the gateway is not running (nothing listens on {path})") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path} (run as root)") from None
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        with sock.makefile("rb") as stream:
            line = stream.readline(16 * 1024 * 1024)
    except ControlError:
        raise
    except TimeoutError:
        raise ControlError(f"the gateway did not answer on {path} within {timeout}s") from None
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if not line:
        raise ControlError(f"the gateway closed {path} without answering")
    try:
        response = json.loads(line)
    except ValueError:
        raise ControlError(f"the gateway's answer on {path} is not JSON") from None
    if not isinstance(response, dict):
        raise ControlError(f"the gateway's answer on {path} is not a JSON object")
    return response
