"""The routing table from PostgreSQL: a client of a controller on a PostgreSQL store
follows the committed checkpoint itself (docs/design.md §5, "The data plane").

Every write of a :class:`~servecore.PostgresStore` NOTIFYs on
:data:`~servecore.stores.postgres.COMMIT_CHANNEL` in its own statement, so a
notification means a commit. The client LISTENs, and reads the committed records
(one snapshot: the lease's epoch, the sequence number, every record) and derives the
routing table from them, as recovery does:

* once when it starts,
* on each notification for its checkpoint,
* on every (re)connection of its listening connection (notifications sent while it
  was down are lost),
* and at least every :data:`POLL_S` whatever happened: the level-triggered safety
  net, should a notification be lost anyway.

Each table is offered to the client with its version ``(seq, epoch)``; the client
never takes an older one (:meth:`VersionedTable.newer_than`). A standby's commits
(the next epoch, the next sequence numbers) arrive the same way, so the client needs
no controller at all: only the database.

The feed runs in a thread of its own, which owns its connections (psycopg is
blocking; a connection is never touched by two threads), and hands each table to the
client's trio loop. Stopping it is a flag, seen within :data:`SLICE_S`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from math import inf
from typing import Any

import trio

from servecore._core.errors import ServecoreError
from servecore._core.records import decode_blob, load_records, read_runtime
from servecore._serving.table_feed import VersionedTable

__all__ = ["POLL_S", "SLICE_S", "PostgresFeed", "read_table"]

log = logging.getLogger("servecore.connect")

#: The checkpoint is read at least this often, notified or not.
POLL_S = 5.0
#: How long one wait for a notification lasts (and so how soon a stop is seen).
SLICE_S = 0.5
#: The longest pause between two attempts to reach the database while it is away.
RETRY_S = 1.0


def read_table(store: Any) -> tuple[VersionedTable, str | None]:
    """The routing table committed in ``store`` now (a
    :class:`~servecore.PostgresStore`), and the runtime its checkpoint names (``None``
    if it names none). Blocking; raises the store's errors and
    :class:`~servecore.CheckpointCorrupt`."""
    committed = store.load_committed()
    seq, records = committed.seq, committed.records
    if set(records) == {"checkpoint"}:  # a whole-state checkpoint (BlobAdapter)
        seq, records = decode_blob(records["checkpoint"], store.where)
    state = load_records(seq, records, store.where)
    table = VersionedTable(seq=seq, epoch=committed.epoch, table=state.routing_table())
    return table, read_runtime(records, store.where)


class PostgresFeed:
    """Follows ``store``'s committed routing table from a thread (see the module):
    ``offer(table)`` and ``connected(bool)`` are called on the trio loop of ``token``."""

    def __init__(
        self,
        store: Any,
        *,
        offer: Callable[[VersionedTable], object],
        connected: Callable[[bool], object],
        token: trio.lowlevel.TrioToken,
    ) -> None:
        self.store = store
        self._offer = offer
        self._connected = connected
        self._token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="servecore-pg-feed", daemon=True)
        #: Tables read (for tests and diagnostics).
        self.reads = 0

    def start(self) -> None:
        """Start following."""
        self._thread.start()

    def stop(self) -> None:
        """Stop following (within :data:`SLICE_S`); the thread closes its connections."""
        self._stop.set()

    def _to_trio(self, fn: Callable[..., object], *args: Any) -> bool:
        try:
            trio.from_thread.run_sync(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            self._stop.set()
            return False
        return True

    def _run(self) -> None:
        listener = self.store.listen_for_commits()
        last_read = -inf
        pause = 0.05
        down = False
        try:
            while not self._stop.is_set():
                try:
                    notified = listener.wait(SLICE_S)
                    if not notified and time.monotonic() - last_read < POLL_S:
                        continue
                    versioned, _ = read_table(self.store)
                except ServecoreError as exc:
                    if self._stop.is_set():
                        return
                    if not down:
                        log.warning("the routing-table feed from %s failed: %s", self.store, exc)
                        self._to_trio(self._connected, False)
                    down = True
                    self._stop.wait(pause)
                    pause = min(pause * 2, RETRY_S)
                    continue
                last_read, pause = time.monotonic(), 0.05
                self.reads += 1
                if down:
                    log.info("the routing-table feed from %s is back", self.store)
                    down = False
                    self._to_trio(self._connected, True)
                self._to_trio(self._offer, versioned)
        finally:
            listener.close()
            self.store.close()
