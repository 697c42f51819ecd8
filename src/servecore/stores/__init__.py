"""Checkpoint stores: where the controller commits its state before acting on it.

A store (:class:`Store`) is a small key-value store: ``load()`` returns the sequence
number and every record, ``commit(seq, puts, deletes)`` applies one change set
atomically and durably, or raises having changed nothing. The controller commits only
what each batch of messages changed (one record per endpoint, backend and replica,
plus a ``meta`` record; see :mod:`servecore._core.records`), so a command costs what it
changes, not what the state holds. Stores that must belong to one controller at a
time also have ``open()`` and ``close()``; the controller calls them around its life.

Built-ins: :class:`MemoryStore` (tests, throwaway hosts), :class:`FileStore` (an
append-only, fsynced log compacted into a snapshot), :class:`SQLiteStore` (one row per
record, WAL, ``synchronous=FULL``) and ``PostgresStore`` (:mod:`servecore.stores.postgres`,
imported lazily: one row per record, kept to one controller by a fenced lease). A
whole-blob store (``save(bytes)``/``load()``, :class:`BlobStore`) works through
:class:`BlobAdapter`, and a plain callable as a save-only callback
(:class:`CallbackStore`), each commit writing the whole state.

Every built-in store has a ``store_id``: a string naming what it stores, the same for
every store object on the same checkpoint and different otherwise. File stores use
their resolved path (``"file:/abs/state.json"``, ``"sqlite:/abs/state.db"``); in-memory
stores a fresh ``"memory:<32 hex digits>"`` per object.
"""

from __future__ import annotations

from collections.abc import Callable

from servecore.stores._protocol import BlobStore, Store
from servecore.stores.blob import BlobAdapter, CallbackStore
from servecore.stores.file import FileStore
from servecore.stores.memory import MemoryStore
from servecore.stores.sqlite import SQLiteStore

__all__ = [
    "BlobAdapter",
    "BlobStore",
    "CallbackStore",
    "FileStore",
    "MemoryStore",
    "SQLiteStore",
    "Store",
    "as_store",
]

for _cls in (BlobAdapter, BlobStore, CallbackStore, FileStore, MemoryStore, SQLiteStore, Store):
    _cls.__module__ = __name__


def as_store(store: Store | BlobStore | Callable[[bytes], object] | None) -> Store:
    """Return ``store`` as a key-value :class:`Store`: ``None`` gives a
    :class:`MemoryStore`, a store with a key-value ``records`` (such as
    :class:`PostgresStore`) that, a whole-blob store a :class:`BlobAdapter` around it,
    a plain callable a :class:`BlobAdapter` around a :class:`CallbackStore`."""
    if store is None:
        return MemoryStore()
    # A store speaking both protocols (PostgresStore) offers the keyed one as
    # ``records``: commit one row per record rather than the whole blob.
    records = getattr(store, "records", None)
    if records is not None and isinstance(records, Store):
        return records
    if isinstance(store, Store):
        return store
    if isinstance(store, BlobStore):
        return BlobAdapter(store)
    if callable(store):
        return BlobAdapter(CallbackStore(store))
    raise TypeError(
        f"store must have load()/commit(), or save()/load(), or be a callable, not {store!r}"
    )


def __getattr__(name: str) -> object:
    # PostgresStore lives in its own module so that psycopg is imported only when used.
    if name in ("PostgresStore", "PostgresRecords"):
        from servecore.stores import postgres

        return getattr(postgres, name)
    raise AttributeError(f"module 'servecore.stores' has no attribute {name!r}")
