"""The control API of a running ``servecore run``: a Unix socket in the state directory.

Not reachable from the network: it is a filesystem socket, ``chmod 0600`` inside a
``0700`` directory, so only the user who runs the server (and root) can connect.
One request per connection, one JSON object each way, newline-terminated::

    {"op": "status"}                          -> {"ok": true, "status": {...}}
    {"op": "apply", "text": "...", "source": "app.toml"}
        -> {"ok": true, "changes": ["create backend 'echo' (1 replica(s))"], "failed": {}}
        -> {"ok": false, "type": "AppFileError", "error": "app.toml: ...", "key": "..."}

An invalid file changes nothing: the server parses it again before applying.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import trio

from servecore._core.errors import ServecoreError
from servecore.app import AppFileError, apply, describe, parse_app

log = logging.getLogger("servecore.cli")

__all__ = ["SOCKET_NAME", "ControlUnavailable", "request", "serve_control", "socket_path"]

SOCKET_NAME = "control.sock"

#: A request larger than this is refused (an app file is a few kilobytes).
MAX_REQUEST_BYTES = 4 * 1024 * 1024


def socket_path(state_dir: Path) -> Path:
    """Where the server of ``state_dir`` listens."""
    return state_dir / SOCKET_NAME


class ControlUnavailable(ServecoreError):
    """No server answers on the control socket."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        super().__init__(
            f"no running servecore server answers at {path} ({why}); "
            f"start one with: servecore run APP.toml"
        )


def _is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


async def _read_request(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError(f"request over {MAX_REQUEST_BYTES} bytes")
    return bytes(data)


async def _answer(controller: Any, lock: trio.Lock, request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "status":
        status = await controller.status()
        return {"ok": True, "status": status.as_dict()}
    if op == "apply":
        text, source = request.get("text"), request.get("source", "<app>")
        if not isinstance(text, str) or not isinstance(source, str):
            return {"ok": False, "type": "BadRequest", "error": "apply needs text and source"}
        try:
            app = parse_app(text, source)
        except AppFileError as exc:
            return {"ok": False, "type": "AppFileError", "error": str(exc), "key": exc.key}
        async with lock:  # one apply at a time: each plans from the state the last left
            try:
                applied = await apply(controller, app)
            except ServecoreError as exc:
                return {"ok": False, "type": type(exc).__name__, "error": str(exc)}
        return {
            "ok": True,
            "changes": [describe(c) for c in applied.commands],
            "failed": applied.failed,
        }
    return {"ok": False, "type": "BadRequest", "error": f"unknown op {op!r}"}


async def serve_control(
    controller: Any,
    path: Path,
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API for ``controller`` at ``path`` until cancelled."""
    if path.exists() or path.is_symlink():
        if _is_live(path):
            raise OSError(
                errno.EADDRINUSE,
                f"another servecore server already listens at {path}; stop it first",
            )
        path.unlink()  # left by a server that was killed
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        # The directory is 0700 already; 0600 on the socket says the same on its own.
        os.chmod(path, 0o600)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    lock = trio.Lock()

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                request = json.loads(await _read_request(stream))
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                reply = await _answer(controller, lock, request)
            except (ValueError, UnicodeDecodeError) as exc:
                reply = {"ok": False, "type": "BadRequest", "error": str(exc)}
            except Exception as exc:  # one bad request must not take the server down
                log.exception("control request failed")
                reply = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(reply).encode() + b"\n")

    try:
        task_status.started(path)
        await trio.serve_listeners(handle, [trio.SocketListener(sock)])
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def request(path: Path, message: dict[str, Any], timeout_s: float | None = None) -> Any:
    """Send one request to the server at ``path`` and return its reply (blocking)."""
    if not path.exists():
        raise ControlUnavailable(path, "no control socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(str(path))
        except OSError as exc:
            raise ControlUnavailable(path, exc.strerror or str(exc)) from exc
        data = bytearray()
        try:
            s.sendall(json.dumps(message).encode() + b"\n")
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:  # a timeout, or the server went away mid-request
            raise ControlUnavailable(path, f"no answer: {exc.strerror or exc!r}") from exc
    if not data:
        raise ControlUnavailable(path, "the server closed the connection without answering")
    return json.loads(data)
