"""Handing the HTTP listening socket from running ingress workers to the next server
(docs/design.md §5, "Ingress workers": *Takeover*).

Ingress workers outlive a server that was killed, and keep serving on the listening
socket they inherited. The next server on the same state directory (a restart, or a
standby that took the lease) takes that very socket from them instead of binding
the port anew: each worker serves, from a thread, a Unix socket
``http-<pid>.sock`` in the state directory that answers every connection from the
same user with the listening socket's descriptor (``SCM_RIGHTS``). The new server
starts its own workers on it and only then stops the old ones, which drain what they
accepted; connections waiting in the kernel's queue are taken by whichever worker
accepts next. So the port never closes, and no connection is refused or reset.

The handoff socket is ``0600``, in a state directory only its user may write to
(checked by the server and the client of the control socket alike), and the peer's
uid is checked again (``SO_PEERCRED``). The taker checks what it got: a listening TCP
socket bound to the address it was asked to serve, else it binds as before.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterable
from pathlib import Path

from servecore._control_socket import MAX_SOCKET_PATH_BYTES

__all__ = ["handoff_path", "serve_handoff", "take_listening_socket"]

log = logging.getLogger("servecore.worker")

#: How long the taker waits for one worker's answer.
TAKE_TIMEOUT_S = 2.0


def handoff_path(state_dir: Path, pid: int) -> Path:
    """Where the worker ``pid`` of ``state_dir`` hands its listening socket over."""
    return state_dir / f"http-{pid}.sock"


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def serve_handoff(state_dir: Path, fd: int) -> Path | None:
    """In a worker: hand the listening socket ``fd`` to whoever of this user asks, at
    :func:`handoff_path`, from a daemon thread, until the process exits. Returns the
    path (``None`` when it cannot be served: the takeover then binds the port)."""
    path = handoff_path(state_dir, os.getpid())
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        log.warning("no socket handoff: %s is too long a path for a Unix socket", path)
        return None
    own = os.dup(fd)  # the server may close its descriptor while draining
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(listener.fileno(), 0o600)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a worker of the same pid that was killed
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(8)
    except OSError as exc:
        listener.close()
        os.close(own)
        log.warning("no socket handoff at %s: %s", path, exc)
        return None

    def forget() -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    atexit.register(forget)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                try:
                    if _peer_uid(conn) != os.geteuid():
                        continue
                    socket.send_fds(conn, [b"http"], [own])
                except OSError as exc:
                    log.debug("socket handoff failed: %r", exc)

    threading.Thread(target=serve, name="servecore-handoff", daemon=True).start()
    return path


def _matches(sock: socket.socket, address: tuple[object, ...]) -> bool:
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        bound = sock.getsockname()
    except OSError:
        return False
    return bool(listening) and sock.type == socket.SOCK_STREAM and bound[:2] == address[:2]


def _take_one(path: Path) -> socket.socket | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(TAKE_TIMEOUT_S)
        try:
            conn.connect(str(path))
            _, fds, _, _ = socket.recv_fds(conn, 16, 1)
        except OSError:
            return None
    if not fds:
        return None
    try:
        return socket.socket(fileno=fds[0])
    except OSError:
        os.close(fds[0])
        return None


def take_listening_socket(
    state_dir: Path, pids: Iterable[int], address: tuple[object, ...]
) -> socket.socket | None:
    """The listening socket the workers ``pids`` of ``state_dir`` serve on, if one of
    them hands it over and it is bound to ``address`` (as ``getaddrinfo`` gives it);
    ``None`` otherwise (bind the port instead)."""
    for pid in pids:
        path = handoff_path(state_dir, pid)
        if not path.exists():
            continue
        sock = _take_one(path)
        if sock is None:
            continue
        if _matches(sock, address):
            return sock
        log.warning(
            "the ingress worker pid %d serves %s, not %s: binding the port instead",
            pid,
            sock.getsockname(),
            address,
        )
        sock.close()
        return None
    return None
