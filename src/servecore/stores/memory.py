"""The in-memory store: tests and throwaway hosts."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from servecore.stores._locking import memory_id

__all__ = ["MemoryStore"]


class MemoryStore:
    """Keeps the records in memory. Survives a controller, not the process.

    ``MemoryStore(records, seq)`` starts from a copy of existing records (a test, or a
    copy of another store's ``load()``).
    """

    def __init__(self, records: Mapping[str, bytes] | None = None, seq: int = 0) -> None:
        self.records: dict[str, bytes] = dict(records or {})
        self.seq = seq
        self.where = "memory"
        self._store_id = memory_id()
        #: Called (if set) where a commit has written part of its change set and none of
        #: it is visible yet: the crash kit's *midway* crash point (``FaultyStore``).
        self.midway_hook: Callable[[], None] | None = None

    @property
    def store_id(self) -> str:
        """``"memory:<32 hex digits>"``, unique to this object."""
        return self._store_id

    def load(self) -> tuple[int, dict[str, bytes]]:
        """The records and sequence number of the last commit (a copy)."""
        return self.seq, dict(self.records)

    def committed_seq(self) -> int:
        """The sequence number of the last commit."""
        return self.seq

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        """Apply one change set; nothing can fail half-way in memory."""
        if self.midway_hook is not None:
            self.midway_hook()
        records = self.records
        for key in deletes:
            records.pop(key, None)
        records.update(puts)
        self.seq = seq

    def __repr__(self) -> str:
        return f"MemoryStore({len(self.records)} records, seq {self.seq})"
