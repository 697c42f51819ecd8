"""The control socket's safety checks and errors, for its server and its clients.

Dependency-free (the standard library and servecore's errors), so a client of
another process (``servecore.connect``) uses the same checks as ``servecore run``
without the ``cli`` extra: never talk to a socket in a directory another user
controls (see :mod:`servecore.cli._control` for why).
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from servecore._core.errors import ServecoreError

__all__ = [
    "MAX_SOCKET_PATH_BYTES",
    "SOCKET_NAME",
    "ControlBusy",
    "ControlNoAnswer",
    "ControlUnavailable",
    "SocketPathTooLong",
    "UnsafeStateDir",
    "check_socket_owner",
    "check_socket_path",
    "check_state_dir",
    "is_live",
    "socket_path",
]

SOCKET_NAME = "control.sock"

#: The longest path a Unix socket can bind (sun_path holds 108 bytes with its NUL).
MAX_SOCKET_PATH_BYTES = 107


def socket_path(state_dir: Path) -> Path:
    """Where the server of ``state_dir`` listens."""
    return state_dir / SOCKET_NAME


class ControlUnavailable(ServecoreError):
    """No server answers on the control socket: there is none, or nothing listens."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        super().__init__(
            f"no running servecore server answers at {path} ({why}); "
            f"start one with: servecore run APP.toml"
        )


class ControlBusy(ServecoreError):
    """A server listens on the control socket but is too busy to take the connection."""

    def __init__(self, path: Path, waited_s: float) -> None:
        self.path = path
        super().__init__(
            f"the servecore server at {path} is running but too busy to take a connection "
            f"(its queue stayed full for {waited_s:g}s); try again in a moment"
        )


class ControlNoAnswer(ServecoreError):
    """A server took the request but gave no answer (it stopped, or timed out)."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        super().__init__(
            f"the servecore server at {path} took the request but did not answer ({why}); "
            f"see its log, and check with: servecore status"
        )


class UnsafeStateDir(ServecoreError):
    """A state directory (or its control socket) that another user controls."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        super().__init__(
            f"refusing to use the state directory {path}: {why}. Whoever can write there "
            f"can replace the control socket and read the app files sent to it; use a "
            f"directory of your own (--store DIR/state.db; servecore creates DIR with "
            f"mode 0700)"
        )


class SocketPathTooLong(ServecoreError):
    """The control socket's path is longer than a Unix socket may have."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = len(os.fsencode(path))
        super().__init__(
            f"the control socket path {path} is {size} bytes, over the "
            f"{MAX_SOCKET_PATH_BYTES} a Unix socket may have; put --store in a directory "
            f"with a shorter path"
        )


def check_socket_path(path: Path) -> Path:
    """``path`` if a Unix socket can be bound there, else :class:`SocketPathTooLong`."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise SocketPathTooLong(path)
    return path


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_state_dir(state_dir: Path) -> None:
    """Raise :class:`UnsafeStateDir` unless ``state_dir`` is a directory owned by this
    user that no group or other user may write to. Its mode is never changed: it may
    be a shared directory such as ``/tmp``, which must stay as it is."""
    info = os.stat(state_dir)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeStateDir(state_dir, "it is not a directory")
    if info.st_uid != os.geteuid():
        raise UnsafeStateDir(state_dir, f"it is owned by {_owner(info.st_uid)}, not by you")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = f"{stat.S_IMODE(info.st_mode):04o}"
        raise UnsafeStateDir(state_dir, f"group or other users may write to it (mode {mode})")


def check_socket_owner(path: Path) -> None:
    """Raise :class:`UnsafeStateDir` if ``path`` exists and is not a socket of this user."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return  # no socket: the caller says "no server"
    if not stat.S_ISSOCK(info.st_mode):
        raise UnsafeStateDir(path.parent, f"{path.name} is not a socket")
    if info.st_uid != os.geteuid():
        raise UnsafeStateDir(
            path.parent, f"its {path.name} is owned by {_owner(info.st_uid)}, not by you"
        )


def is_live(path: Path) -> bool:
    """Whether a server accepts connections on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True
