"""Whole-blob stores (``save``/``load``) and save-only callables, as key-value stores."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from servecore._core.records import decode_blob, encode_blob
from servecore.stores._locking import memory_id
from servecore.stores._protocol import BlobStore

__all__ = ["BlobAdapter", "CallbackStore"]


class CallbackStore:
    """Wraps a plain callable as a save-only blob store: ``load`` always returns
    ``None``. Each commit calls it with the whole checkpoint (see
    :func:`servecore._core.records.decode_blob` for the format)."""

    def __init__(self, callback: Callable[[bytes], object]) -> None:
        self.callback = callback
        self.where = f"callback {getattr(callback, '__qualname__', callback)!r}"
        self._store_id = memory_id()

    @property
    def store_id(self) -> str:
        """``"memory:<32 hex digits>"``, unique to this object (nothing is loaded back)."""
        return self._store_id

    def save(self, data: bytes) -> None:
        self.callback(data)

    def load(self) -> bytes | None:
        return None


class BlobAdapter:
    """A :class:`~servecore.Store` over a :class:`~servecore.stores.BlobStore`.

    It keeps the records in memory and saves all of them as one checksummed envelope
    on every commit: the whole state per command, as before keyed checkpoints. A blob
    in the old (version 1) format loads, and the next commit writes the new one.
    """

    def __init__(self, blob: BlobStore) -> None:
        self.blob = blob
        self.where = str(getattr(blob, "where", repr(blob)))
        found = getattr(blob, "store_id", None)
        self._store_id = found if isinstance(found, str) else memory_id()
        self._records: dict[str, bytes] = {}
        #: Called (if set) where a commit has written part of its change set and none of
        #: it is visible yet: the crash kit's *midway* crash point (``FaultyStore``).
        self.midway_hook: Callable[[], None] | None = None

    @property
    def store_id(self) -> str:
        """The blob store's own ``store_id``, or a fresh ``"memory:…"`` one."""
        return self._store_id

    def open(self) -> None:
        opener = getattr(self.blob, "open", None)
        if opener is not None:
            opener()

    def close(self) -> None:
        closer = getattr(self.blob, "close", None)
        if closer is not None:
            closer()

    def load(self) -> tuple[int, dict[str, bytes]]:
        data = self.blob.load()
        if data is None:
            self._records = {}
            return 0, {}
        seq, records = decode_blob(data, self.where)
        self._records = records
        return seq, dict(records)

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        records = dict(self._records)
        for key in deletes:
            records.pop(key, None)
        records.update(puts)
        data = encode_blob(seq, records)
        if self.midway_hook is not None:
            self.midway_hook()  # a blob save is all or nothing: nothing is written yet
        self.blob.save(data)
        self._records = records

    def __repr__(self) -> str:
        return f"BlobAdapter({self.blob!r})"
