"""A store wrapper that fails, tears or crashes commits on demand."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from servecore.stores import BlobStore, MemoryStore, Store, as_store
from servecore.testing._faults import CrashPlan

__all__ = ["FaultyStore", "StoreFault"]


class StoreFault(OSError):
    """The error an injected commit failure raises (the disk said no)."""


class FaultyStore:
    """Wraps ``inner`` (a :class:`~servecore.MemoryStore` by default; a whole-blob
    store or a callable is wrapped as the controller would, in a
    :class:`~servecore.BlobAdapter`).

    * :meth:`fail_next` — the next ``n`` commits raise :class:`StoreFault` and write
      nothing;
    * :meth:`tear_next` — the next commit writes part of its change set, then raises
      (the store must keep none of it);
    * ``crash_plan`` — three crash points per commit: before it, *midway* (part of the
      change set written, none of it durable: the built-in stores call back from
      inside their commit; other stores get the point just before theirs) and after it
      is durable.
    """

    def __init__(
        self,
        inner: Store | BlobStore | Callable[[bytes], object] | None = None,
        crash_plan: CrashPlan | None = None,
    ) -> None:
        self.inner: Store = as_store(inner if inner is not None else MemoryStore())
        self.crash_plan = crash_plan or CrashPlan()
        self.where = f"faulty {getattr(self.inner, 'where', self.inner)!s}"
        self._fail = 0
        self._fail_after = 0
        self._tear = False
        self.commits = 0
        # The built-in stores call a hook from inside their commit (``midway_hook``).
        self._hooked = hasattr(self.inner, "midway_hook")
        if self._hooked:
            self.inner.midway_hook = self._midway  # type: ignore[attr-defined]

    @property
    def saves(self) -> int:
        """The old name of :attr:`commits`."""
        return self.commits

    @property
    def store_id(self) -> Any:
        return getattr(self.inner, "store_id", None)

    def fail_next(self, n: int = 1, *, after: int = 0) -> None:
        """Make ``n`` commits fail without writing: the next ones, or those that come
        after ``after`` more commits succeed (an outage that begins once a command's
        own commit is done, and so hits the events that follow it)."""
        self._fail = n
        self._fail_after = after

    def tear_next(self, on: bool = True) -> None:
        """Make the next commit fail half-way, after writing part of its change set
        (``False`` takes it back)."""
        self._tear = on

    def open(self) -> None:
        opener = getattr(self.inner, "open", None)
        if opener is not None:
            opener()

    def close(self) -> None:
        closer = getattr(self.inner, "close", None)
        if closer is not None:
            closer()

    def _midway(self) -> None:
        self.crash_plan.point("midway commit")
        if self._tear:
            self._tear = False
            raise StoreFault("injected torn commit")

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        self.crash_plan.point("before commit")
        if self._fail and self._fail_after:
            self._fail_after -= 1
        elif self._fail:
            self._fail -= 1
            raise StoreFault("injected commit failure")
        if not self._hooked:
            self._midway()
        self.inner.commit(seq, puts, deletes)
        self.commits += 1
        self.crash_plan.point("after commit")

    def load(self) -> tuple[int, Mapping[str, bytes]]:
        return self.inner.load()
