"""The "database hangs" fault: a store wrapper whose chosen calls hang until released.

:class:`HangingStore` wraps any store. Armed with :meth:`HangingStore.hang`, the call
it names (counted from then on, loads and commits alike) blocks, as a call to a hung
database, a stuck disk or network file system does, until :meth:`HangingStore.release`;
then it lands or fails, as the test chooses. Given ``freeze``/``thaw`` hooks instead, it
makes the real medium hang (SIGSTOP the database, lock its table from another
session) and calls the store as it is, so the store's own deadlines are what answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any

from servecore.stores import BlobStore, MemoryStore, Store, as_store
from servecore.testing._store import StoreFault

__all__ = ["HangingStore"]

#: Attributes of a leased store (:class:`~servecore.PostgresStore`'s records) that the
#: controller reads; the wrapper passes them through, so the lease works as without it.
_PASSED_THROUGH = frozenset({"store_id", "epoch", "holder", "lease_s", "heartbeat", "lease_lost"})


class HangingStore:
    """Wraps ``inner`` (a :class:`~servecore.MemoryStore` by default; a whole-blob store
    or a callable is wrapped as the controller would, in a :class:`~servecore.BlobAdapter`).

    * :meth:`hang` — the call ``at`` calls from now (``load`` and ``commit`` alike, 0:
      the next one), and the ``count - 1`` after it, block until :meth:`release`;
    * :meth:`release` — the blocked calls (and any armed ones still to come) go on:
      ``land=True`` carries each one out on ``inner`` and returns (the database answered
      late), ``land=False`` raises :class:`StoreFault` having written nothing (it
      answered with an error);
    * ``freeze``/``thaw`` — a *real* hang instead: the armed call runs ``freeze()`` (it
      makes the medium hang: SIGSTOP the database's processes, lock its table from
      another session) and then calls ``inner``, which hangs there until its own
      deadline answers or :meth:`release` runs ``thaw()``; ``land`` is then the
      medium's to decide.

    :attr:`labels` names every call seen (``"load"``, ``"commit 3"``: of checkpoint 3,
    ``"committed_seq"``: the controller asking whether a commit in doubt landed),
    so a test can count the calls of a scenario and then hang each one in turn. A call
    blocked ``max_hang_s`` without a release raises :class:`StoreFault`, so a test that
    forgets to release leaves no thread blocked for ever.
    """

    def __init__(
        self,
        inner: Store | BlobStore | Callable[[bytes], object] | None = None,
        *,
        freeze: Callable[[], object] | None = None,
        thaw: Callable[[], object] | None = None,
        max_hang_s: float = 300.0,
    ) -> None:
        if (freeze is None) != (thaw is None):
            raise TypeError("give HangingStore both freeze and thaw, or neither")
        self.inner: Store = as_store(inner if inner is not None else MemoryStore())
        self.where = f"hanging {getattr(self.inner, 'where', self.inner)!s}"
        self.freeze = freeze
        self.thaw = thaw
        self.max_hang_s = max_hang_s
        #: Every call seen, in order: ``"load"``, ``"commit <seq>"`` or ``"committed_seq"``.
        self.labels: list[str] = []
        #: How many calls have hung so far.
        self.hung = 0
        #: How many calls the store has answered (returned or raised).
        self.answered = 0
        self._lock = threading.Condition()
        self._at: int | None = None
        self._count = 0
        self._land = True
        self._released = threading.Event()
        self._hanging = 0
        self._frozen = False
        self._open = False

    def __getattr__(self, name: str) -> Any:
        if name in _PASSED_THROUGH:
            return getattr(self.inner, name)
        raise AttributeError(name)

    # -- the fault --------------------------------------------------------------------------

    @property
    def calls(self) -> int:
        """How many calls (``load`` and ``commit``) the store has received."""
        return len(self.labels)

    def hang(self, at: int = 0, *, count: int = 1) -> None:
        """Make the call ``at`` calls from now, and the ``count - 1`` after it, hang."""
        if at < 0 or count < 1:
            raise ValueError(f"hang(at={at}, count={count}): at >= 0 and count >= 1")
        with self._lock:
            self._at = self.calls + at
            self._count = count
            self._released.clear()

    def release(self, *, land: bool = True) -> None:
        """Let the hung calls (and armed ones still to come) go on: land, or fail
        having written nothing. With a real hang, ``thaw()`` the medium."""
        with self._lock:
            self._land = land
            self._at = None
            self._released.set()
            frozen, self._frozen = self._frozen, False
        if frozen and self.thaw is not None:
            self.thaw()

    @property
    def hanging(self) -> bool:
        """Whether a call is blocked right now."""
        with self._lock:
            return self._hanging > 0

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no call is in progress and the store is closed (if it can be
        opened); return whether that happened within ``timeout_s``."""
        with self._lock:
            return self._lock.wait_for(
                lambda: self.answered == self.calls and not self._open, timeout_s
            )

    def _enter(self, label: str) -> bool:
        """Count one call; return whether it is to hang."""
        with self._lock:
            index = len(self.labels)
            self.labels.append(label)
            if self._at is None or not self._at <= index < self._at + self._count:
                return False
            self.hung += 1
            self._hanging += 1
            return True

    def _call(self, label: str, fn: Callable[[], Any]) -> Any:
        hang = self._enter(label)
        try:
            if hang and self.freeze is not None:
                with self._lock:
                    self._frozen = True
                self.freeze()
            elif hang:
                released = self._released.wait(self.max_hang_s)
                if not released:
                    raise StoreFault(
                        f"injected hang of {label} on {self.where}: not released within "
                        f"{self.max_hang_s:g}s (call HangingStore.release)"
                    )
                if not self._land:
                    raise StoreFault(f"injected hang of {label}: the store answered with an error")
            return fn()
        finally:
            with self._lock:
                if hang:
                    self._hanging -= 1
                self.answered += 1
                self._lock.notify_all()

    # -- the store ---------------------------------------------------------------------------

    def open(self, **kwargs: Any) -> None:
        opener = getattr(self.inner, "open", None)
        if opener is not None:
            opener(**kwargs)
            with self._lock:
                self._open = True

    def close(self) -> None:
        closer = getattr(self.inner, "close", None)
        if closer is not None:
            try:
                closer()
            finally:
                with self._lock:
                    self._open = False
                    self._lock.notify_all()

    def load(self) -> tuple[int, Mapping[str, bytes]]:
        result: tuple[int, Mapping[str, bytes]] = self._call("load", self.inner.load)
        return result

    def committed_seq(self) -> int:
        """The inner store's ``committed_seq()`` (its ``load()``'s if it has none): a
        store call like the others, counted, and hung when armed."""
        ask = getattr(self.inner, "committed_seq", None)
        result: int = self._call(
            "committed_seq", ask if ask is not None else lambda: self.inner.load()[0]
        )
        return result

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        self._call(f"commit {seq}", lambda: self.inner.commit(seq, puts, deletes))

    def __repr__(self) -> str:
        return f"HangingStore({self.inner!r})"
