"""The two shapes of checkpoint store the controller accepts."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol, runtime_checkable

__all__ = ["BlobStore", "Store"]


@runtime_checkable
class Store(Protocol):
    """A key-value checkpoint store: what the controller commits to.

    A checkpoint is a set of records (``str`` keys, ``bytes`` values) and a sequence
    number. The controller calls :meth:`load` once when it opens, then :meth:`commit`
    once per batch of changes. Stores that belong to one controller at a time may also
    have ``open()`` and ``close()``; the controller calls them around its life.

    A store may also have ``committed_seq() -> int``: the sequence number it holds now,
    asked after a commit whose answer was lost
    (:class:`~servecore.CheckpointOutcomeUnknown`) to learn whether that commit landed.
    It should be cheap and must not guess: raise (a
    :class:`~servecore.CheckpointError`) if it cannot say, and answer only once a commit
    in doubt can no longer land. Without it the controller calls :meth:`load`.
    """

    def load(self) -> tuple[int, Mapping[str, bytes]]:
        """Return ``(seq, records)`` of the last commit, ``(0, {})`` if there never was
        one. Raise :class:`~servecore.CheckpointCorrupt` (naming where) for damage
        the store itself detects; never return part of a commit."""
        ...

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        """Atomically make ``seq`` the sequence number, store ``puts`` and remove
        ``deletes`` (keys that may be absent), or raise having changed nothing. Must
        not return before the commit is durable: the controller acts on it once this
        returns."""
        ...


@runtime_checkable
class BlobStore(Protocol):
    """A whole-state store: every commit saves the whole checkpoint as one blob.

    Accepted wherever a :class:`Store` is, through :class:`~servecore.BlobAdapter`,
    at the old cost (each commit writes the whole state).
    """

    def save(self, data: bytes) -> None:
        """Make ``data`` the durable checkpoint, or raise. Atomic: all or nothing."""
        ...

    def load(self) -> bytes | None:
        """Return the last saved checkpoint, or ``None`` if there never was one."""
        ...
