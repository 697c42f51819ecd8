"""Read a checkpoint without owning its store: for status tools and backups.

A running controller holds its store's lock (a second controller gets
:class:`~servecore.StoreLocked`), but reading never needs it: a :class:`FileStore`'s
snapshot is replaced atomically and its log only grows by whole, checksummed frames
(a frame still being written reads as a torn tail, i.e. not yet committed), and a
:class:`SQLiteStore` in WAL mode lets a read-only connection see the last committed
transaction while the owner writes.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from servecore._core.errors import CheckpointCorrupt, CheckpointVersionError
from servecore._core.records import decode_blob, load_records
from servecore._core.transitions import State
from servecore.stores import BlobStore, FileStore, SQLiteStore, Store, as_store

__all__ = ["load_checkpoint", "load_state", "read_state"]

_SQLITE_HEADER = b"SQLite format 3\x00"


def _read_sqlite(path: Path) -> tuple[int, Mapping[str, bytes]]:
    """``(seq, records)`` of a SQLite store's database, opened read-only."""
    where = str(path)
    if not path.exists():
        return 0, {}
    with open(path, "rb") as f:
        header = f.read(16)
    if not header:
        return 0, {}
    if header != _SQLITE_HEADER:
        raise CheckpointCorrupt(where, "not a SQLite database (bad header)")
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise CheckpointCorrupt(where, f"cannot open it read-only ({exc})") from exc
    try:
        # One read transaction: the records and the seq of the same commit.
        db.execute("BEGIN")
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SQLiteStore.SCHEMA_VERSION:
            raise CheckpointVersionError(where, version, SQLiteStore.SCHEMA_VERSION)
        if version == 0:
            return 0, {}  # created, never committed to
        if version == 1:  # the whole checkpoint in one row; upgraded when next opened
            row = db.execute("SELECT data FROM checkpoint WHERE id = 1").fetchone()
            return (0, {}) if row is None else decode_blob(bytes(row[0]), where)
        meta = db.execute("SELECT seq FROM meta WHERE id = 1").fetchone()
        rows = db.execute("SELECT key, value FROM records").fetchall()
    except sqlite3.DatabaseError as exc:
        raise CheckpointCorrupt(where, f"cannot read the tables ({exc})") from exc
    finally:
        db.close()
    if meta is None:
        raise CheckpointCorrupt(where, "the meta table has no row")
    return meta[0], {key: bytes(value) for key, value in rows}


def load_checkpoint(store: Store | BlobStore) -> tuple[State, int] | None:
    """``(state, seq)`` of the last checkpoint in ``store``, or ``None`` if it has none.

    Read-only and lock-free for :class:`~servecore.SQLiteStore` and
    :class:`~servecore.FileStore`, so it works while a controller owns the store; any
    other store is asked through its own ``load()`` (a whole-blob store's bytes are
    decoded as the controller would).
    """
    where = str(getattr(store, "where", repr(store)))
    seq: int
    records: Mapping[str, bytes]
    if isinstance(store, SQLiteStore):
        seq, records = _read_sqlite(store.path)
    elif isinstance(store, FileStore):
        seq, records = store.read()
    else:
        seq, records = as_store(store).load()
    if not records:
        return None
    return load_records(seq, records, where), seq


def load_state(store: Store | BlobStore) -> State:
    """The state of the last checkpoint in ``store`` (empty if it has none), read
    without taking the store's lock::

        state = servecore.load_state(servecore.SQLiteStore(".servecore/state.db"))
    """
    found = load_checkpoint(store)
    return State() if found is None else found[0]


def store_at(path: str | os.PathLike[str]) -> Store:
    """The store a path names: ``.db``/``.sqlite``/``.sqlite3`` files (or any file that
    begins with SQLite's header) are SQLite stores, anything else a file store."""
    p = Path(path)
    if p.suffix in {".db", ".sqlite", ".sqlite3"}:
        return SQLiteStore(p)
    try:
        with open(p, "rb") as f:
            if f.read(16) == _SQLITE_HEADER:
                return SQLiteStore(p)
    except OSError:
        pass
    return FileStore(p)


def read_state(path: str | os.PathLike[str]) -> State:
    """:func:`load_state` of the store at ``path`` (see :func:`store_at`)."""
    return load_state(store_at(path))
