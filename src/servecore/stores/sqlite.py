"""The SQLite store: one row per record, one transaction per commit."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from servecore._core.errors import (
    CheckpointCorrupt,
    CheckpointLocked,
    CheckpointVersionError,
    ServecoreError,
    StoreLocked,
    StoreUnwritable,
)
from servecore._core.records import decode_blob
from servecore.stores._locking import (
    StoreLock,
    open_private,
    prepare_directory,
    resolve,
    unwritable,
)

__all__ = ["SQLiteStore"]

_SQLITE_HEADER = b"SQLite format 3\x00"
#: SQLite's answers that mean "someone else holds a lock", not "the file is bad".
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class SQLiteStore:
    """A SQLite database in WAL mode with ``synchronous=FULL``, one transaction per commit.

    (``NORMAL`` may drop the last commit on power loss, which would break "persist, then
    act".) Schema version 2, in ``PRAGMA user_version``::

        records (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID
        meta    (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL)

    A commit is ``BEGIN IMMEDIATE``, the puts and deletes and the new ``seq``,
    ``COMMIT``: SQLite's journal makes it all or nothing, so a crash half-way leaves the
    previous commit. A version 1 database (one row holding the whole checkpoint) is
    upgraded in place, in one transaction, when it is opened; a newer version raises
    :class:`~servecore.CheckpointVersionError`. Resolved and locked like
    :class:`~servecore.FileStore`. The database is created 0600 before SQLite opens it,
    and SQLite gives its ``-wal`` and ``-shm`` files the database's mode.

    A lock another process holds on the database (a backup tool, a ``sqlite3`` shell in
    exclusive mode) is waited for ``busy_timeout_s``, then raises
    :class:`~servecore.StoreLocked`: the database is intact, never called corrupt. Met
    during a commit, it is :class:`~servecore.CheckpointLocked` (a ``CheckpointError``
    and a ``StoreLocked``): that commit wrote nothing, and may be retried.
    """

    SCHEMA_VERSION = 2

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.resolved = resolve(path)
        self.where = str(self.path)
        self._lock = StoreLock(self.resolved, self.where)
        self._db: sqlite3.Connection | None = None
        self._mutex = threading.Lock()  # commits come from the controller's writer thread
        #: Called (if set) where a commit has written part of its change set and none of
        #: it is visible yet: the crash kit's *midway* crash point (``FaultyStore``).
        self.midway_hook: Callable[[], None] | None = None

    @property
    def store_id(self) -> str:
        """``"sqlite:"`` followed by the resolved absolute path."""
        return f"sqlite:{self.resolved}"

    def open(self) -> None:
        prepare_directory(self.where, self.resolved)
        # The database file itself is the inode lock. It is opened before SQLite and
        # closed after it: closing any descriptor of a file drops the process's POSIX
        # locks on it, which SQLite relies on. (An opener locked out through a hard
        # link closes its descriptor; the flock still keeps it from writing.)
        try:
            self._lock.acquire(lambda: open_private(self.resolved, os.O_RDWR))
        except OSError as exc:
            raise unwritable(self.where, exc, self.resolved) from exc
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
            try:
                os.close(open_private(self.resolved, os.O_RDWR))  # owner-only before SQLite
            except OSError as exc:
                raise unwritable(self.where, exc, self.resolved) from exc
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(
                self.resolved,
                isolation_level=None,
                check_same_thread=False,
                timeout=self.busy_timeout_s,
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > self.SCHEMA_VERSION:
                raise CheckpointVersionError(self.where, version, self.SCHEMA_VERSION)
            if version < self.SCHEMA_VERSION:
                self._upgrade(db, version)
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            raise self._failure(exc, "not a readable SQLite database") from exc
        except BaseException:
            if db is not None:
                db.close()
            raise
        self._db = db
        return db

    def _failure(self, exc: sqlite3.Error, what: str) -> ServecoreError:
        """A SQLite error as what it means: a lock held elsewhere, a file that cannot be
        opened, or (only then) damage."""
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _BUSY:
            return StoreLocked(
                self.where,
                f"SQLite says: {exc}, after waiting {self.busy_timeout_s:g}s",
                by="another process's lock on the database (a backup tool, a sqlite3 shell)",
                way_out="the checkpoint is intact: let that process finish or close it, "
                "then open the store again",
            )
        if code is not None and code & 0xFF == sqlite3.SQLITE_CANTOPEN:
            return StoreUnwritable(self.where, str(self.resolved), str(exc))
        return CheckpointCorrupt(self.where, f"{what} ({exc})")

    def _upgrade(self, db: sqlite3.Connection, version: int) -> None:
        """Create the schema, or move a version 1 checkpoint row into records."""
        db.execute("BEGIN IMMEDIATE")
        try:
            seq, records = 0, dict[str, bytes]()
            if version == 1:
                try:
                    row = db.execute("SELECT data FROM checkpoint WHERE id = 1").fetchone()
                except sqlite3.DatabaseError as exc:
                    raise CheckpointCorrupt(self.where, f"cannot read the table ({exc})") from exc
                if row is not None:
                    seq, records = decode_blob(bytes(row[0]), self.where)
            db.execute(
                "CREATE TABLE records (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"
            )
            db.execute(
                "CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL)"
            )
            db.execute("INSERT INTO meta (id, seq) VALUES (1, ?)", (seq,))
            db.executemany("INSERT INTO records (key, value) VALUES (?, ?)", records.items())
            db.execute("DROP TABLE IF EXISTS checkpoint")
            db.execute(f"PRAGMA user_version={self.SCHEMA_VERSION}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        with self._mutex:
            if self._db is not None:
                self._db.close()
                self._db = None
        self._lock.release()

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        """One transaction: the puts, the deletes, the new ``seq``."""
        with self._mutex:
            db = self._connect()
            items = list(puts.items())
            half = len(items) // 2
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise self._commit_failure(exc, seq) from exc
            try:
                upsert = "INSERT OR REPLACE INTO records (key, value) VALUES (?, ?)"
                db.executemany(upsert, items[:half])
                if self.midway_hook is not None:
                    self.midway_hook()
                db.executemany(upsert, items[half:])
                db.executemany("DELETE FROM records WHERE key = ?", ((k,) for k in deletes))
                db.execute("UPDATE meta SET seq = ? WHERE id = 1", (seq,))
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise self._commit_failure(exc, seq) from exc
                raise

    def _commit_failure(self, exc: sqlite3.OperationalError, seq: int) -> Exception:
        """A lock met during a commit (``BEGIN IMMEDIATE`` or ``COMMIT`` waited
        ``busy_timeout_s`` for another process) is :class:`~servecore.CheckpointLocked`:
        the transaction was rolled back, nothing was written, and it may be retried."""
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _BUSY:
            return CheckpointLocked(
                self.where,
                f"SQLite says: {exc}, after waiting {self.busy_timeout_s:g}s for "
                f"{self.resolved}; checkpoint {seq} was rolled back",
            )
        return exc

    def load(self) -> tuple[int, dict[str, bytes]]:
        with self._mutex:
            if self._db is None and not self.resolved.exists():
                return 0, {}
            db = self._connect()
            try:
                (seq,) = db.execute("SELECT seq FROM meta WHERE id = 1").fetchone()
                rows = db.execute("SELECT key, value FROM records").fetchall()
            except sqlite3.DatabaseError as exc:
                raise self._failure(exc, "cannot read the tables") from exc
            except TypeError as exc:
                raise CheckpointCorrupt(self.where, f"cannot read the tables ({exc})") from exc
            return seq, {key: bytes(value) for key, value in rows}

    def committed_seq(self) -> int:
        """The sequence number of the last commit, read from the database."""
        with self._mutex:
            if self._db is None and not self.resolved.exists():
                return 0
            db = self._connect()
            try:
                (seq,) = db.execute("SELECT seq FROM meta WHERE id = 1").fetchone()
            except sqlite3.DatabaseError as exc:
                raise self._failure(exc, "cannot read the tables") from exc
            except TypeError as exc:
                raise CheckpointCorrupt(self.where, f"cannot read the tables ({exc})") from exc
            return int(seq)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.where!r})"
