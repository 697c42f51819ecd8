"""An in-memory store with a lease and fencing, for the "old leader wakes up" fault.

:class:`~servecore.PostgresStore` holds a lease and fences every write by its epoch;
this store does the same in memory, so that a test can run a leader and its successor
on one trio loop, without a database.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from servecore._core.errors import LeaseLost
from servecore.stores import MemoryStore

__all__ = ["LeasedMemoryStore"]


class _Lease:
    """What every handle on one leased store shares: the records and the lease."""

    def __init__(self) -> None:
        self.records = MemoryStore()
        self.epoch = 1
        self.holder = "leader-1"


class LeasedMemoryStore:
    """A keyed in-memory store holding a lease at :attr:`epoch`.

    :meth:`take_over` gives a second handle on the same records that holds the next
    epoch, as a standby takes the lease of a leader paused past it. From then on the
    first handle is fenced: its commits raise :class:`~servecore.LeaseLost` and write
    nothing, and :meth:`lease_lost` says so (a controller steps down on it)::

        old = LeasedMemoryStore()
        async with servecore.open_controller(runtime=rt, store=old) as leader:
            new = old.take_over()
            async with servecore.open_controller(runtime=rt.view(), store=new) as standby:
                ...
    """

    lease_s = 30.0

    def __init__(self, *, _lease: _Lease | None = None) -> None:
        self._lease = _lease or _Lease()
        self.epoch = self._lease.epoch
        self.holder = self._lease.holder
        self.where = f"leased memory ({self.holder})"

    @property
    def store_id(self) -> str:
        """The identity every handle on these records shares."""
        return self._lease.records.store_id

    def take_over(self) -> LeasedMemoryStore:
        """A handle holding the next epoch; this one (and any older) is fenced."""
        self._lease.epoch += 1
        self._lease.holder = f"leader-{self._lease.epoch}"
        return LeasedMemoryStore(_lease=self._lease)

    def lease_lost(self) -> LeaseLost | None:
        """Why this handle lost the lease, or ``None`` while it holds it."""
        if self._lease.epoch == self.epoch:
            return None
        return LeaseLost(self.where, self.holder, self.epoch, self._lease.holder, self._lease.epoch)

    def heartbeat(self) -> None:
        """Nothing to renew in memory: the lease is lost only by :meth:`take_over`."""

    def load(self) -> tuple[int, dict[str, bytes]]:
        """The records and sequence number of the last commit (a copy)."""
        return self._lease.records.load()

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        """Apply one change set, if this handle still holds the lease."""
        lost = self.lease_lost()
        if lost is not None:
            raise lost
        self._lease.records.commit(seq, puts, deletes)

    def __repr__(self) -> str:
        return f"LeasedMemoryStore(epoch {self.epoch})"
