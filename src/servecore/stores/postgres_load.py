"""Load reports of routers on any host, kept in PostgreSQL beside a checkpoint.

A router in another process (a ``servecore.connect`` client, an ingress worker, a
``servecore ingress``) reports its ongoing queries so the leader's autoscaler counts
them. On the leader's host the control socket carries them; a router on *another* host
cannot reach that Unix socket, so with a PostgreSQL store every client writes its report
into a row of ``servecore_load`` (one per reporter, replaced each time, with a serial
number and the database's own time), and the leader reads the fresh rows twice a
second. The database's clock dates every row, so hosts with skewed clocks agree on what
is fresh; a row a reporter stopped renewing is ignored once stale and deleted later.

Each side holds a connection of its own (not the store's): a report never waits behind
a commit, nor a commit behind a report.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from servecore.stores.postgres import PostgresStore

__all__ = ["LoadRow", "PostgresLoadReports"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS servecore_load (
    checkpoint text NOT NULL,
    reporter text NOT NULL,
    ongoing jsonb NOT NULL,
    wake jsonb NOT NULL,
    serial bigint NOT NULL DEFAULT 1,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (checkpoint, reporter)
)
"""

_WRITE = """
INSERT INTO servecore_load (checkpoint, reporter, ongoing, wake)
VALUES (%(cp)s, %(reporter)s, %(ongoing)s::jsonb, %(wake)s::jsonb)
ON CONFLICT (checkpoint, reporter) DO UPDATE
SET ongoing = EXCLUDED.ongoing, wake = EXCLUDED.wake, at = now(),
    serial = servecore_load.serial + 1
"""

_READ = """
SELECT reporter, ongoing, wake, serial FROM servecore_load
WHERE checkpoint = %(cp)s AND at > now() - make_interval(secs => %(max_age)s)
"""

_FORGET = """
DELETE FROM servecore_load
WHERE checkpoint = %(cp)s AND at < now() - make_interval(secs => %(forget_after)s)
"""

#: Rows older than this are deleted by the reader (a reporter gone for good).
FORGET_AFTER_S = 600.0


@attrs.frozen
class LoadRow:
    """One reporter's last report: its ongoing queries per backend, the backends a
    query waits for with no replica, and a serial that grows with each report."""

    reporter: str
    ongoing: dict[str, int]
    wake: tuple[str, ...]
    serial: int


class PostgresLoadReports:
    """The ``servecore_load`` rows of ``store``'s checkpoint, on a connection of its
    own (opened on first use, replaced when it breaks). Blocking; thread-safe."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._conn: Any = None
        self._reads = 0

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            import psycopg

            conn = self._store.open_connection()
            try:
                conn.execute(_SCHEMA)
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
                pass  # another session created it at the same moment
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _execute(self, sql: str, params: dict[str, Any]) -> Any:
        with self._lock:
            try:
                return self._connection().execute(sql, params)
            except Exception:
                self._close_locked()
                raise

    def write(self, reporter: str, ongoing: Mapping[str, int], wake: Iterable[str] = ()) -> None:
        """Replace ``reporter``'s row with this report."""
        self._execute(
            _WRITE,
            {
                "cp": self._store.checkpoint,
                "reporter": reporter,
                "ongoing": json.dumps(dict(ongoing)),
                "wake": json.dumps(list(wake)),
            },
        )

    def read(self, max_age_s: float) -> list[LoadRow]:
        """The rows renewed within the last ``max_age_s`` seconds (by the database's
        clock); now and then, rows long stale are deleted."""
        params = {"cp": self._store.checkpoint, "max_age": max_age_s}
        rows = self._execute(_READ, params).fetchall()
        self._reads += 1
        if self._reads % 100 == 0:
            self._execute(_FORGET, {"cp": self._store.checkpoint, "forget_after": FORGET_AFTER_S})
        found = []
        for reporter, ongoing, wake, serial in rows:
            # Any process that reaches the database may write a row: one of the wrong
            # shape is skipped, never allowed to stop the others being read.
            if isinstance(ongoing, dict) and isinstance(wake, list):
                found.append(LoadRow(str(reporter), ongoing, tuple(wake), int(serial)))
        return found

    def close(self) -> None:
        """Close the connection (a later call opens another). Never waits for a call in
        flight on another thread: that call fails, as if the connection broke."""
        self._close_locked()

    def _close_locked(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
