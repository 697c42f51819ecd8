"""Checkpoint stores: where the controller writes its state before acting on it.

A store is anything with ``save(data: bytes) -> None`` and ``load() -> bytes | None``
(:class:`Store`). Stores that must belong to one controller at a time also have
``open()`` and ``close()``; the controller calls them around its life. ``save`` must
not return before the bytes are durable: the controller acts on a state only after
``save`` returned.

Built-ins: :class:`MemoryStore` (tests, throwaway hosts), :class:`FileStore` (atomic
replace with fsyncs), :class:`SQLiteStore` (WAL, ``synchronous=FULL``). A plain callable
is accepted as a save-only callback (:class:`CallbackStore`).

Every built-in store has a ``store_id``: a string naming what it stores, the same for
every store object on the same checkpoint and different otherwise. File stores use
their resolved path (``"file:/abs/state.json"``, ``"sqlite:/abs/state.db"``); in-memory
stores a fresh ``"memory:<32 hex digits>"`` per object.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import stat
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from servecore._errors import CheckpointCorrupt, CheckpointVersionError, StoreLocked

__all__ = [
    "CallbackStore",
    "FileStore",
    "MemoryStore",
    "SQLiteStore",
    "Store",
    "as_store",
]

# Files that hold the checkpoint (or guard it) are readable by their owner only: a
# checkpoint holds init arguments, which may hold secrets.
_PRIVATE = 0o600


@runtime_checkable
class Store(Protocol):
    """What the controller needs of a checkpoint store."""

    def save(self, data: bytes) -> None:
        """Make ``data`` the durable checkpoint, or raise. Atomic: all or nothing."""

    def load(self) -> bytes | None:
        """Return the last saved checkpoint, or ``None`` if there never was one."""


def _memory_id() -> str:
    return f"memory:{uuid.uuid4().hex}"


class MemoryStore:
    """Keeps the last checkpoint in memory. Survives a controller, not the process."""

    def __init__(self, data: bytes | None = None) -> None:
        self.data = data
        self.where = "memory"
        self._store_id = _memory_id()

    @property
    def store_id(self) -> str:
        """``"memory:<32 hex digits>"``, unique to this object."""
        return self._store_id

    def save(self, data: bytes) -> None:
        self.data = data

    def load(self) -> bytes | None:
        return self.data

    def __repr__(self) -> str:
        return f"MemoryStore({len(self.data or b'')} bytes)"


class CallbackStore:
    """Wraps a plain callable as a save-only store: ``load`` always returns ``None``."""

    def __init__(self, callback: Callable[[bytes], object]) -> None:
        self.callback = callback
        self.where = f"callback {getattr(callback, '__qualname__', callback)!r}"
        self._store_id = _memory_id()

    @property
    def store_id(self) -> str:
        """``"memory:<32 hex digits>"``, unique to this object (nothing is loaded back)."""
        return self._store_id

    def save(self, data: bytes) -> None:
        self.callback(data)

    def load(self) -> bytes | None:
        return None


def as_store(store: Store | Callable[[bytes], object] | None) -> Store:
    """Return ``store`` as a :class:`Store`: ``None`` gives a :class:`MemoryStore`, a
    plain callable a :class:`CallbackStore`."""
    if store is None:
        return MemoryStore()
    if isinstance(store, Store):
        return store
    if callable(store):
        return CallbackStore(store)
    raise TypeError(f"store must have save()/load() or be a callable, not {store!r}")


def _open_private(path: Path, flags: int) -> int:
    """Open (creating if need be) ``path`` without following a symlink at its last
    component, and make it owner-only whatever the umask.

    A file we do not own is left as it is: ``fchmod`` would fail, and it is its owner's
    to protect.
    """
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _PRIVATE)
    try:
        info = os.fstat(fd)
        if stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid == os.geteuid():
            os.fchmod(fd, stat.S_IMODE(info.st_mode) & _PRIVATE)
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


class _StoreLock:
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
        fd = _open_private(self.lock_path, os.O_RDWR)
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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _resolve(path: str | os.PathLike[str]) -> Path:
    # Resolved once, when the store is made: the store's identity (its lock and its
    # store_id) must not change under it if the working directory or a symlink does.
    return Path(os.path.realpath(os.fspath(path)))


class FileStore:
    """One file, replaced atomically on every save.

    Save writes a temporary file in the same directory, flushes and fsyncs it,
    ``os.replace``-s it over the checkpoint and fsyncs the directory, so after a crash
    the file holds either the old or the new checkpoint, never a mix. The path is
    resolved (symlinks, relative paths) when the store is made, and the store reads and
    writes the resolved file. While a controller has it open, ``<resolved>.lock`` and
    the checkpoint file itself are ``flock``-ed; a second controller, through any name
    for the same file, gets :class:`~servecore.StoreLocked` at once. Files are created
    owner-only (0600).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.resolved = _resolve(path)
        self.where = str(self.path)
        self._lock = _StoreLock(self.resolved, self.where)

    @property
    def store_id(self) -> str:
        """``"file:"`` followed by the resolved absolute path."""
        return f"file:{self.resolved}"

    def open(self) -> None:
        self.resolved.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire(self._open_checkpoint)

    def _open_checkpoint(self) -> int | None:
        try:
            return os.open(self.resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None

    def close(self) -> None:
        self._lock.release()

    def save(self, data: bytes) -> None:
        tmp = self.resolved.with_name(f".{self.resolved.name}.{os.getpid()}.tmp")
        fd = _open_private(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            if self._lock.held:
                self._lock.lock_new(fd)
            os.replace(tmp, self.resolved)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self._lock.held:
            self._lock.keep_new(fd)  # open, and locked, until the next save replaces it
        else:
            os.close(fd)
        _fsync_dir(self.resolved.parent)

    def load(self) -> bytes | None:
        try:
            return self.resolved.read_bytes()
        except FileNotFoundError:
            return None

    def __repr__(self) -> str:
        return f"FileStore({self.where!r})"


_SQLITE_HEADER = b"SQLite format 3\x00"


class SQLiteStore:
    """A SQLite database in WAL mode with ``synchronous=FULL``, one transaction per save.

    (``NORMAL`` may drop the last commit on power loss, which would break "persist, then
    act".) The schema version lives in ``PRAGMA user_version``; a newer one raises
    :class:`~servecore.CheckpointVersionError`. Resolved and locked like
    :class:`FileStore`. The database is created 0600 before SQLite opens it, and SQLite
    gives its ``-wal`` and ``-shm`` files the database's mode.
    """

    SCHEMA_VERSION = 1

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.resolved = _resolve(path)
        self.where = str(self.path)
        self._lock = _StoreLock(self.resolved, self.where)
        self._db: sqlite3.Connection | None = None
        self._mutex = threading.Lock()  # saves may come from worker threads

    @property
    def store_id(self) -> str:
        """``"sqlite:"`` followed by the resolved absolute path."""
        return f"sqlite:{self.resolved}"

    def open(self) -> None:
        self.resolved.parent.mkdir(parents=True, exist_ok=True)
        # The database file itself is the inode lock. It is opened before SQLite and
        # closed after it: closing any descriptor of a file drops the process's POSIX
        # locks on it, which SQLite relies on. (An opener locked out through a hard
        # link closes its descriptor; the flock still keeps it from writing.)
        self._lock.acquire(lambda: _open_private(self.resolved, os.O_RDWR))
        try:
            self._connect()
        except BaseException:
            self._lock.release()
            raise

    def _check_header(self) -> None:
        # SQLite takes a short or empty file for an empty database and would write a
        # fresh schema over a damaged one: check the header of a non-empty file first.
        fd = self._lock.inode_fd
        if fd is not None:
            header = os.pread(fd, 16, 0)
        else:
            try:
                with open(self.resolved, "rb") as f:
                    header = f.read(16)
            except FileNotFoundError:
                header = b""
        if header and header != _SQLITE_HEADER:
            raise CheckpointCorrupt(self.where, "not a SQLite database (bad header)")

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        self._check_header()
        if self._lock.inode_fd is None:
            os.close(_open_private(self.resolved, os.O_RDWR))  # owner-only before SQLite
        try:
            db = sqlite3.connect(self.resolved, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            (version,) = db.execute("PRAGMA user_version").fetchone()
        except sqlite3.DatabaseError as exc:
            raise CheckpointCorrupt(self.where, f"not a readable SQLite database ({exc})") from exc
        if version > self.SCHEMA_VERSION:
            db.close()
            raise CheckpointVersionError(self.where, version, self.SCHEMA_VERSION)
        if version == 0:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "CREATE TABLE IF NOT EXISTS checkpoint ("
                " id INTEGER PRIMARY KEY CHECK (id = 1), data BLOB NOT NULL)"
            )
            db.execute(f"PRAGMA user_version={self.SCHEMA_VERSION}")
            db.execute("COMMIT")
        self._db = db
        return db

    def close(self) -> None:
        with self._mutex:
            if self._db is not None:
                self._db.close()
                self._db = None
        self._lock.release()

    def save(self, data: bytes) -> None:
        with self._mutex:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT OR REPLACE INTO checkpoint (id, data) VALUES (1, ?)", (data,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def load(self) -> bytes | None:
        with self._mutex:
            if self._db is None and not self.resolved.exists():
                return None
            db = self._connect()
            try:
                row = db.execute("SELECT data FROM checkpoint WHERE id = 1").fetchone()
            except sqlite3.DatabaseError as exc:
                raise CheckpointCorrupt(self.where, f"cannot read the table ({exc})") from exc
            return None if row is None else bytes(row[0])

    def __repr__(self) -> str:
        return f"SQLiteStore({self.where!r})"


def __getattr__(name: str) -> object:
    # PostgresStore lives in its own module so that psycopg is imported only when used.
    if name in ("PostgresStore", "PostgresRecords"):
        from servecore import stores_postgres

        return getattr(stores_postgres, name)
    raise AttributeError(f"module 'servecore.stores' has no attribute {name!r}")
