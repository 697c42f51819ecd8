"""The control API of a running ``servecore run``: a Unix socket in the state directory.

Not reachable from the network: it is a filesystem socket, ``0600`` from the moment it
is bound, in a directory only its user may write to, so only the user who runs the
server (and root) can connect. Both ends check that directory first
(:func:`check_state_dir`): a state directory owned by another user, or one that others
may write to, is refused, since whoever can write there can put their own socket in
place of the server's and read the app files (and their secrets) sent to it.

The socket listens with a backlog of :data:`CONTROL_BACKLOG`, and a client whose
connection finds the queue full retries for a while, then says the server is busy;
"no server" is said only when there is no socket or nothing listens on it. One
``apply`` runs at a time; another waits at most ``apply_wait_s`` for it, then is told
the server is busy with the first (so one apply stuck on a replica that never starts
does not wedge every later one).

One request per connection, one JSON object each way, newline-terminated::

    {"op": "status"}                          -> {"ok": true, "status": {...}}
    {"op": "apply", "text": "...", "source": "app.toml", "dry_run": false}
        -> {"ok": true, "changes": ["create backend 'echo' (1 replica(s))"], "failed": {}}
        -> {"ok": false, "type": "AppFileError", "error": "app.toml: ...", "key": "..."}
    {"op": "retry", "backend": "echo"}        -> {"ok": true, "status": "HEALTHY"}
        -> {"ok": false, "type": "BackendStartError", "error": "...", "reason": "..."}
    {"op": "delete", "kind": "endpoint" | "backend", "name": "echo"} -> {"ok": true}
    {"op": "shutdown", "stop_replicas": false} -> {"ok": true}  (then the server stops)
    {"op": "logs", "target": "echo" | "echo#3"}
        -> {"ok": true, "runtime": "subprocess", "directory": ".../replicas",
            "live": {"echo#3": ".../echo_3-....log"}}
    {"op": "load", "reporter": "host/pid/token", "ongoing": {"echo": 3}, "wake": []}
        -> {"ok": true}  (a connected client's router load, for autoscaling)
    {"op": "subscribe"}
        -> the routing-table feed: the connection stays open, one line per table
           (servecore._serving.table_feed)

Every refusal is ``{"ok": false, "type": ..., "error": ...}``, ``error`` being the
one paragraph the client prints.

An invalid file changes nothing: the server parses it again before applying.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from servecore._control_socket import (
    SOCKET_NAME,
    ControlBusy,
    ControlNoAnswer,
    ControlUnavailable,
    UnsafeStateDir,
    check_socket_owner,
    check_socket_path,
    check_state_dir,
    is_live,
    socket_path,
)
from servecore._controller.replica_lifecycle import replica_info
from servecore._core.errors import BackendStartError, ServecoreError
from servecore._core.values import backend_of
from servecore._serving.table_feed import TableFeed
from servecore.app import MAX_APP_FILE_BYTES, AppFileError, apply, describe, parse_app, plan

log = logging.getLogger("servecore.cli")

__all__ = [
    "SOCKET_NAME",
    "ControlBusy",
    "ControlNoAnswer",
    "ControlUnavailable",
    "UnsafeStateDir",
    "check_socket_path",
    "check_state_dir",
    "request",
    "serve_control",
    "socket_path",
]

#: A request larger than this is refused: an app file (at most MAX_APP_FILE_BYTES),
#: JSON-escaped, with room to spare.
MAX_REQUEST_BYTES = 4 * MAX_APP_FILE_BYTES

#: Connections the kernel queues while the server is busy (capped by somaxconn).
CONTROL_BACKLOG = 1024

#: How long a client keeps retrying a connection that finds the queue full.
BUSY_RETRY_S = 10.0

#: How long an apply waits for the one in progress before it is told the server is busy.
APPLY_WAIT_S = 30.0


async def _read_request(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise _TooLarge(f"the request is over the {MAX_REQUEST_BYTES} bytes this server takes")
    return bytes(data)


class _TooLarge(ValueError):
    """A request over MAX_REQUEST_BYTES: refused with an answer, not a dropped line."""


class _Applying:
    """The one apply at a time, and what it is (for the message to the next one)."""

    def __init__(self, wait_s: float) -> None:
        self.lock = trio.Lock()
        self.wait_s = wait_s
        self.source = ""
        self.since = 0.0


#: What ``servecore run`` does on a ``shutdown`` request: stop the server (and, when
#: told, its replicas).
Shutdown = Callable[[bool], None]


def _text_field(request: dict[str, Any], name: str) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{request.get('op')} needs {name} (a non-empty string)")
    return value


async def _command(controller: Any, request: dict[str, Any]) -> dict[str, Any]:
    """retry and delete: one controller command each."""
    op = request["op"]
    if op == "retry":
        tag = _text_field(request, "backend")
        try:
            state = await controller.retry_backend(tag)
        except BackendStartError as exc:
            return {
                "ok": False,
                "type": type(exc).__name__,
                "error": str(exc),
                "reason": exc.reason,
            }
        return {"ok": True, "status": state.backends[tag].status.value}
    kind, name = _text_field(request, "kind"), _text_field(request, "name")
    if kind == "endpoint":
        await controller.delete_endpoint(name)
    elif kind == "backend":
        await controller.delete_backend(name)
    else:
        raise ValueError(f"delete takes kind 'endpoint' or 'backend', not {kind!r}")
    return {"ok": True}


def _logs(controller: Any, target: str) -> dict[str, Any]:
    """Where the replicas of ``target`` (a backend or a replica tag) log now."""
    state = controller.state
    if "#" in target:
        tags = [target] if target in state.replicas else []
    else:
        tags = sorted(t for t in state.replicas if backend_of(t) == target)
    live = {}
    for tag in tags:
        path = replica_info(controller.runtime, tag).log_path
        if path is not None:
            live[tag] = path
    runtime = controller.runtime
    directory = getattr(runtime, "directory", None)
    return {
        "ok": True,
        "runtime": type(runtime).__name__,
        "directory": None if directory is None else str(directory),
        "known": target in state.backends or target in state.replicas,
        "live": live,
    }


async def _answer(
    controller: Any,
    applying: _Applying,
    request: dict[str, Any],
    shutdown: Shutdown | None = None,
) -> dict[str, Any]:
    op = request.get("op")
    if op == "status":
        status = await controller.status()
        return {"ok": True, "status": status.as_dict()}
    if op in {"retry", "delete"}:
        try:
            return await _command(controller, request)
        except ServecoreError as exc:
            return {"ok": False, "type": type(exc).__name__, "error": str(exc)}
    if op == "logs":
        return _logs(controller, _text_field(request, "target"))
    if op == "load":
        try:
            controller.report_router_load(
                request.get("reporter"), request.get("ongoing"), request.get("wake", ())
            )
        except ServecoreError as exc:
            return {"ok": False, "type": type(exc).__name__, "error": str(exc)}
        return {"ok": True}
    if op == "shutdown":
        if shutdown is None:
            return {"ok": False, "type": "BadRequest", "error": "this server cannot be stopped"}
        shutdown(bool(request.get("stop_replicas", False)))
        return {"ok": True}
    if op == "apply":
        text, source = request.get("text"), request.get("source", "<app>")
        if not isinstance(text, str) or not isinstance(source, str):
            return {"ok": False, "type": "BadRequest", "error": "apply needs text and source"}
        try:
            app = parse_app(text, source)
        except AppFileError as exc:
            return {"ok": False, "type": "AppFileError", "error": str(exc), "key": exc.key}
        if request.get("dry_run"):
            commands = plan(controller.state, app)
            return {"ok": True, "changes": [describe(c) for c in commands], "failed": {}}
        # One apply at a time: each plans from the state the last one left.
        acquired = False
        with trio.move_on_after(applying.wait_s):
            await applying.lock.acquire()
            acquired = True
        if not acquired:
            running_s = trio.current_time() - applying.since
            return {
                "ok": False,
                "type": "Busy",
                "error": (
                    f"the server is busy applying {applying.source} (for {running_s:.0f}s; a "
                    f"replica may be slow to start or stuck, see servecore status and the "
                    f"server's log); nothing of {source} was applied, try again later"
                ),
            }
        try:
            applying.source, applying.since = source, trio.current_time()
            applied = await apply(controller, app)
        except ServecoreError as exc:
            return {"ok": False, "type": type(exc).__name__, "error": str(exc)}
        finally:
            applying.lock.release()
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
    apply_wait_s: float = APPLY_WAIT_S,
    shutdown: Shutdown | None = None,
    replace: bool = False,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API for ``controller`` at ``path`` until cancelled.

    ``path``'s directory must pass :func:`check_state_dir`. An ``apply`` waits at most
    ``apply_wait_s`` for the one in progress, then is answered that the server is busy.
    A ``shutdown`` request calls ``shutdown(stop_replicas)`` (refused without one).
    ``replace``: a server still answering at ``path`` is replaced rather than refused
    (a standby that took the lease from it: it is fenced, frozen or on its way out).
    """
    check_socket_path(path)
    check_state_dir(path.parent)
    if path.exists() or path.is_symlink():
        if not replace and is_live(path):
            raise OSError(
                errno.EADDRINUSE,
                f"another servecore server already listens at {path}; stop it first",
            )
        path.unlink()  # left by a server that was killed
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # On Linux the socket file takes the mode of the socket's inode when bound:
        # 0600 from its first instant, not after a chmod that others could race.
        with contextlib.suppress(OSError):
            os.fchmod(sock.fileno(), 0o600)
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(CONTROL_BACKLOG)
    except BaseException:
        sock.close()
        raise
    applying = _Applying(apply_wait_s)
    feeds: list[TableFeed] = []  # made on the first subscriber (one table listener)

    async def subscribe(stream: trio.SocketStream) -> None:
        if not feeds:
            feeds.append(TableFeed(controller))
        async with trio.open_nursery() as nursery:

            async def until_gone() -> None:
                # A subscriber sends nothing more: end of stream means it went away.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while await stream.receive_some(4096):
                        pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_gone)
            await feeds[0].serve(stream)
            nursery.cancel_scope.cancel()

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                request = json.loads(await _read_request(stream))
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                if request.get("op") == "subscribe":
                    await subscribe(stream)
                    return
                reply = await _answer(controller, applying, request, shutdown)
            except _TooLarge as exc:
                reply = {"ok": False, "type": "TooLarge", "error": str(exc)}
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


#: connect() errors that mean nobody serves the socket (as opposed to a busy server).
_NO_SERVER = {errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK}


def _connect(path: Path, busy_retry_s: float) -> socket.socket:
    """A socket connected to ``path``; a full queue (EAGAIN) is retried with backoff."""
    waited, pause = 0.0, 0.01
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Non-blocking connect: a full listen queue answers EAGAIN at once.
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            if waited >= busy_retry_s:
                raise ControlBusy(path, busy_retry_s) from None
            time.sleep(pause)
            waited += pause
            pause = min(pause * 2, 0.5)
            continue
        except OSError as exc:
            s.close()
            if exc.errno in _NO_SERVER:
                raise ControlUnavailable(path, exc.strerror or str(exc)) from exc
            raise ControlNoAnswer(path, f"cannot connect: {exc.strerror or exc}") from exc
        s.setblocking(True)
        return s


def request(
    path: Path,
    message: dict[str, Any],
    timeout_s: float | None = None,
    *,
    busy_retry_s: float = BUSY_RETRY_S,
) -> Any:
    """Send one request to the server at ``path`` and return its reply (blocking).

    Raises :class:`UnsafeStateDir` before sending anything to a socket in a directory
    another user controls, :class:`ControlUnavailable` when no server listens,
    :class:`ControlBusy` when one does but its queue stays full for ``busy_retry_s``,
    and :class:`ControlNoAnswer` when it took the request but did not answer.
    """
    check_socket_path(path)
    if not path.parent.is_dir():
        raise ControlUnavailable(path, f"no state directory {path.parent}")
    check_state_dir(path.parent)
    check_socket_owner(path)
    if not path.exists():
        raise ControlUnavailable(path, "no control socket")
    payload = json.dumps(message).encode() + b"\n"
    if len(payload) > MAX_REQUEST_BYTES:
        raise ControlNoAnswer(
            path, f"not sent: the request is over the {MAX_REQUEST_BYTES} bytes a server takes"
        )
    with _connect(path, busy_retry_s) as s:
        s.settimeout(timeout_s)
        data = bytearray()
        sent_error: OSError | None = None
        try:
            s.sendall(payload)
        except OSError as exc:  # the server may have refused it and said why: read on
            sent_error = exc
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:  # a timeout, or the server went away mid-request
            if not data:
                why = sent_error or exc
                raise ControlNoAnswer(path, f"{why.strerror or why!r}") from exc
    if not data:
        raise ControlNoAnswer(path, "it closed the connection without answering")
    return json.loads(data)
