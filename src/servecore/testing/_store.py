"""A store wrapper that fails, tears or crashes saves on demand."""

from __future__ import annotations

from servecore.stores import MemoryStore, Store
from servecore.testing._faults import CrashPlan

__all__ = ["FaultyStore", "StoreFault"]


class StoreFault(OSError):
    """The error an injected save failure raises (the disk said no)."""


class FaultyStore:
    """Wraps ``inner`` (a :class:`~servecore.MemoryStore` by default).

    * :meth:`fail_next` — the next ``n`` saves raise :class:`StoreFault` and write nothing;
    * :meth:`tear_next` — the next save writes only a prefix of the bytes, then raises
      (a store without atomic replace, torn by a crash);
    * ``crash_plan`` — crash points just before a save and just after it is durable.
    """

    def __init__(self, inner: Store | None = None, crash_plan: CrashPlan | None = None) -> None:
        self.inner = inner if inner is not None else MemoryStore()
        self.crash_plan = crash_plan or CrashPlan()
        self.where = f"faulty {getattr(self.inner, 'where', self.inner)!s}"
        self._fail = 0
        self._fail_after = 0
        self._tear = False
        self.saves = 0

    def fail_next(self, n: int = 1, *, after: int = 0) -> None:
        """Make ``n`` saves fail without writing: the next ones, or those that come
        after ``after`` more saves succeed (an outage that begins once a command's own
        save is done, and so hits the events that follow it)."""
        self._fail = n
        self._fail_after = after

    def tear_next(self) -> None:
        """Make the next save write a torn prefix, then fail."""
        self._tear = True

    def open(self) -> None:
        opener = getattr(self.inner, "open", None)
        if opener is not None:
            opener()

    def close(self) -> None:
        closer = getattr(self.inner, "close", None)
        if closer is not None:
            closer()

    def save(self, data: bytes) -> None:
        self.crash_plan.point("before save")
        if self._fail and self._fail_after:
            self._fail_after -= 1
        elif self._fail:
            self._fail -= 1
            raise StoreFault("injected save failure")
        if self._tear:
            self._tear = False
            self.inner.save(data[: len(data) // 2])
            raise StoreFault("injected torn write")
        self.inner.save(data)
        self.saves += 1
        self.crash_plan.point("after save")

    def load(self) -> bytes | None:
        return self.inner.load()
