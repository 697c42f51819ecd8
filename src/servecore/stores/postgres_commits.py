"""Following a PostgreSQL checkpoint's commits from another process: what one snapshot
holds (:class:`Committed`), and a listener (:class:`CommitListener`) that wakes on the
``NOTIFY`` every write sends on :data:`COMMIT_CHANNEL`. A routing-table subscriber
(``servecore._serving.pg_feed``) reads the checkpoint on each wake-up; a store
(:meth:`~servecore.stores.postgres.PostgresStore.listen_for_commits`) makes the
listener, on a connection of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from servecore._core.errors import CheckpointError
from servecore._text import describe_exception

if TYPE_CHECKING:
    import psycopg

__all__ = ["COMMIT_CHANNEL", "CommitListener", "Committed"]

#: The channel every write NOTIFYs on, in its own statement (so only once it commits);
#: the payload is the md5 of the checkpoint's name (a name may be longer than a payload).
COMMIT_CHANNEL = "servecore_commits"


@attrs.frozen(kw_only=True)
class Committed:
    """A checkpoint as committed (:meth:`PostgresStore.load_committed`)."""

    #: The epoch of the lease row (the last holder's); None if no one ever held it.
    epoch: int | None
    seq: int
    records: dict[str, bytes]


class CommitListener:
    """Waits for commits to one checkpoint: ``LISTEN`` on :data:`COMMIT_CHANNEL`, on a
    connection of its own. Blocking (run it in a thread); one thread at a time.

    A notification says only that something committed: the listener's owner reads the
    checkpoint (:meth:`PostgresStore.load_committed`). Notifications sent while the
    connection was down are lost, so every (re)connection counts as one.
    """

    def __init__(
        self, checkpoint: str, where: str, connect: Callable[[], psycopg.Connection[Any]]
    ) -> None:
        self.where = where
        self._connect = connect
        self._payload = hashlib.md5(checkpoint.encode(), usedforsecurity=False).hexdigest()
        self._conn: psycopg.Connection[Any] | None = None
        self._closed = False

    def wait(self, timeout_s: float) -> bool:
        """Block until a commit to the checkpoint is notified (``True``) or ``timeout_s``
        passed (``False``). Listening anew returns ``True`` at once. Raises
        :class:`~servecore.CheckpointError` if the database cannot be reached (the next
        call connects again)."""
        import psycopg as pg

        if self._closed:
            raise CheckpointError(f"the commit listener on {self.where} is closed")
        try:
            if self._conn is None or self._conn.closed:
                conn = self._connect()
                try:
                    conn.execute(f"LISTEN {COMMIT_CHANNEL}")
                except BaseException:
                    conn.close()
                    raise
                self._conn = conn
                return True
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                for notify in self._conn.notifies(timeout=left, stop_after=1):
                    if notify.payload == self._payload:
                        return True
            return False
        except pg.Error as exc:
            self.close(final=False)
            why = describe_exception(exc, one_line=True)
            raise CheckpointError(f"listening for commits on {self.where} failed: {why}") from exc

    def close(self, *, final: bool = True) -> None:
        """Close the connection (``final``: for good)."""
        self._closed = self._closed or final
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
