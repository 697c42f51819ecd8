"""Checkpoint stores: where the controller writes its state before acting on it.

A store is anything with ``save(data: bytes) -> None`` and ``load() -> bytes | None``
(:class:`Store`). Stores that must belong to one controller at a time also have
``open()`` and ``close()``; the controller calls them around its life. ``save`` must
not return before the bytes are durable: the controller acts on a state only after
``save`` returned.

Built-ins: :class:`MemoryStore` (tests, throwaway hosts), :class:`FileStore` (atomic
replace with fsyncs), :class:`SQLiteStore` (WAL, ``synchronous=FULL``). A plain callable
is accepted as a save-only callback (:class:`CallbackStore`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
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


@runtime_checkable
class Store(Protocol):
    """What the controller needs of a checkpoint store."""

    def save(self, data: bytes) -> None:
        """Make ``data`` the durable checkpoint, or raise. Atomic: all or nothing."""

    def load(self) -> bytes | None:
        """Return the last saved checkpoint, or ``None`` if there never was one."""


class MemoryStore:
    """Keeps the last checkpoint in memory. Survives a controller, not the process."""

    def __init__(self, data: bytes | None = None) -> None:
        self.data = data
        self.where = "memory"

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


class _FileLock:
    """An exclusive ``flock`` on ``path``, taken without waiting.

    ``flock`` (unlike POSIX record locks) conflicts between two opens in the same
    process too, so two controllers in one host also exclude each other.
    """

    def __init__(self, path: Path, owner: str) -> None:
        self.path = path
        self.owner = owner
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(self.owner) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """One file, replaced atomically on every save.

    Save writes a temporary file in the same directory, flushes and fsyncs it,
    ``os.replace``-s it over the checkpoint and fsyncs the directory, so after a crash
    the file holds either the old or the new checkpoint, never a mix. While a
    controller has it open, ``<path>.lock`` is ``flock``-ed; a second controller gets
    :class:`~servecore.StoreLocked` at once.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self._lock = _FileLock(Path(f"{self.path}.lock"), self.where)

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()

    def close(self) -> None:
        self._lock.release()

    def save(self, data: bytes) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def __repr__(self) -> str:
        return f"FileStore({self.where!r})"


class SQLiteStore:
    """A SQLite database in WAL mode with ``synchronous=FULL``, one transaction per save.

    (``NORMAL`` may drop the last commit on power loss, which would break "persist, then
    act".) The schema version lives in ``PRAGMA user_version``; a newer one raises
    :class:`~servecore.CheckpointVersionError`. Locked like :class:`FileStore`.
    """

    SCHEMA_VERSION = 1

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self._lock = _FileLock(Path(f"{self.path}.lock"), self.where)
        self._db: sqlite3.Connection | None = None
        self._mutex = threading.Lock()  # saves may come from worker threads

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self._connect()
        except BaseException:
            self._lock.release()
            raise

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        # SQLite takes a short or empty file for an empty database and would write a
        # fresh schema over a damaged one: check the header of a non-empty file first.
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            header = f.read(16)
            if header and header != b"SQLite format 3\x00":
                raise CheckpointCorrupt(self.where, "not a SQLite database (bad header)")
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
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
            if self._db is None and not self.path.exists():
                return None
            db = self._connect()
            try:
                row = db.execute("SELECT data FROM checkpoint WHERE id = 1").fetchone()
            except sqlite3.DatabaseError as exc:
                raise CheckpointCorrupt(self.where, f"cannot read the table ({exc})") from exc
            return None if row is None else bytes(row[0])

    def __repr__(self) -> str:
        return f"SQLiteStore({self.where!r})"
