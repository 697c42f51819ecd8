"""What keeps a checkpoint to one controller, and the file helpers stores share.

Locks follow the resolved file, not the name a store was given (symlinks, relative
paths, hard links), and files holding a checkpoint are created owner-only.
"""

from __future__ import annotations

import fcntl
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from servecore._core.errors import StoreLocked, StoreUnwritable

__all__ = [
    "PRIVATE",
    "StoreLock",
    "fsync_dir",
    "memory_id",
    "open_private",
    "prepare_directory",
    "resolve",
    "unwritable",
]

# Files that hold the checkpoint (or guard it) are readable by their owner only: a
# checkpoint holds init arguments, which may hold secrets.
PRIVATE = 0o600


def memory_id() -> str:
    """A fresh ``"memory:<32 hex digits>"`` store id."""
    return f"memory:{uuid.uuid4().hex}"


def open_private(path: Path, flags: int) -> int:
    """Open (creating if need be) ``path`` without following a symlink at its last
    component, and make it owner-only whatever the umask.

    A file we do not own is left as it is: ``fchmod`` would fail, and it is its owner's
    to protect.
    """
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE)
    try:
        info = os.fstat(fd)
        if stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid == os.geteuid():
            os.fchmod(fd, stat.S_IMODE(info.st_mode) & PRIVATE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class StoreLock:
    """What keeps a checkpoint to one controller: two exclusive ``flock``-s, taken
    without waiting.

    One is on ``<resolved path>.lock``, so every name that resolves to the same path
    (symlinked files and directories, relative paths) meets the same lock. The other is
    on the checkpoint file's inode itself, so two hard links to one file, whose resolved
    paths differ, meet there. ``flock`` (unlike POSIX record locks) conflicts between two
    opens in the same process too, so two controllers in one host also exclude each other.
    """

    def __init__(self, resolved: Path, owner: str) -> None:
        self.lock_path = Path(f"{resolved}.lock")
        self.owner = owner
        self._lock_fd: int | None = None
        # The checkpoint's inode when the store was opened, and the one saved last (a
        # FileStore save puts a new inode under the name). Both stay locked while the
        # store is open: a hard link made before a save still names the old inode.
        self._opened_fd: int | None = None
        self._current_fd: int | None = None

    @property
    def held(self) -> bool:
        return self._lock_fd is not None

    @property
    def inode_fd(self) -> int | None:
        return self._opened_fd

    def acquire(self, inode_fd: Callable[[], int | None]) -> None:
        """Take both locks; ``inode_fd`` opens the checkpoint file (``None`` if it does
        not exist yet) and is called only once the path lock is ours."""
        if self._lock_fd is not None:
            return
        fd = open_private(self.lock_path, os.O_RDWR)
        if not _try_flock(fd):
            os.close(fd)
            raise StoreLocked(self.owner)
        try:
            data_fd = inode_fd()
        except BaseException:
            os.close(fd)
            raise
        if data_fd is not None and not _try_flock(data_fd):
            os.close(data_fd)
            os.close(fd)
            raise StoreLocked(self.owner)
        self._lock_fd, self._opened_fd = fd, data_fd

    def lock_new(self, fd: int) -> None:
        """Lock ``fd``, a file about to replace the checkpoint, so that the file under
        the checkpoint's name is locked from the moment it gets there."""
        if not _try_flock(fd):
            raise StoreLocked(self.owner)

    def keep_new(self, fd: int) -> None:
        """``fd`` (locked by :meth:`lock_new`) now is the checkpoint: keep it, and drop
        the one saved before it."""
        old, self._current_fd = self._current_fd, fd
        if old is not None:
            os.close(old)

    def release(self) -> None:
        for fd in (self._current_fd, self._opened_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)  # closing drops the flock
        self._lock_fd = self._opened_fd = self._current_fd = None


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve(path: str | os.PathLike[str]) -> Path:
    # Resolved once, when the store is made: the store's identity (its lock and its
    # store_id) must not change under it if the working directory or a symlink does.
    return Path(os.path.realpath(os.fspath(path)))


def unwritable(where: str, exc: OSError, path: Path) -> StoreUnwritable:
    """``exc``, met while creating or opening a store's files, as the typed error naming
    the path it was about (the one the OS names, else ``path``)."""
    named = exc.filename if exc.filename is not None else path
    return StoreUnwritable(where, os.fsdecode(named), exc.strerror or str(exc))


def prepare_directory(where: str, resolved: Path) -> None:
    """Create the directory a store's files go in; a typed error naming the path if it
    cannot be (a regular file in the way, no permission)."""
    try:
        resolved.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(where, exc, resolved.parent) from exc
    if not resolved.parent.is_dir():  # mkdir(exist_ok=True) accepts no such thing quietly
        raise StoreUnwritable(where, str(resolved.parent), "it is not a directory")
