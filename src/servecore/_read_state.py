"""Read a checkpoint without owning its store: for status tools and backups.

A running controller holds its store's lock (a second controller gets
:class:`~servecore.StoreLocked`), but reading never needs it: a :class:`FileStore` is
replaced atomically, and a :class:`SQLiteStore` in WAL mode lets a read-only
connection see the last committed transaction while the owner writes.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from servecore._checkpoint import decode
from servecore._core import State
from servecore._errors import CheckpointCorrupt
from servecore.stores import FileStore, SQLiteStore, Store

__all__ = ["load_checkpoint", "load_state", "read_state"]


def _read_sqlite(path: Path) -> bytes | None:
    if not path.exists():
        return None
    with open(path, "rb") as f:
        header = f.read(16)
    if not header:
        return None
    if header != b"SQLite format 3\x00":
        raise CheckpointCorrupt(str(path), "not a SQLite database (bad header)")
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise CheckpointCorrupt(str(path), f"cannot open it read-only ({exc})") from exc
    try:
        row = db.execute("SELECT data FROM checkpoint WHERE id = 1").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None  # created, never saved to
        raise CheckpointCorrupt(str(path), f"cannot read the table ({exc})") from exc
    except sqlite3.DatabaseError as exc:
        raise CheckpointCorrupt(str(path), f"cannot read the table ({exc})") from exc
    finally:
        db.close()
    return None if row is None else bytes(row[0])


def load_checkpoint(store: Store) -> tuple[State, int] | None:
    """``(state, seq)`` of the last checkpoint in ``store``, or ``None`` if it has none.

    Read-only and lock-free for :class:`~servecore.SQLiteStore` and
    :class:`~servecore.FileStore`, so it works while a controller owns the store; any
    other store is asked through its own ``load()``.
    """
    where = str(getattr(store, "where", repr(store)))
    if isinstance(store, SQLiteStore):
        data = _read_sqlite(store.path)
    elif isinstance(store, FileStore):
        data = store.load()
    else:
        data = store.load()
    if data is None:
        return None
    return decode(data, where)


def load_state(store: Store) -> State:
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
            if f.read(16) == b"SQLite format 3\x00":
                return SQLiteStore(p)
    except OSError:
        pass
    return FileStore(p)


def read_state(path: str | os.PathLike[str]) -> State:
    """:func:`load_state` of the store at ``path`` (see :func:`store_at`)."""
    return load_state(store_at(path))
