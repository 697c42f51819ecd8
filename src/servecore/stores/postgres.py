"""A checkpoint store in PostgreSQL, kept to one controller by a fenced lease.

:class:`PostgresStore` keeps a checkpoint as rows, one per record, in three tables it
creates on first use (``servecore_schema``, ``servecore_leases``, ``servecore_records``);
many checkpoints, told apart by ``checkpoint=``, may share one database. It speaks both
store protocols:

* the whole-blob one (``save(data)`` / ``load() -> bytes | None``), the blob being the
  single record :data:`BLOB_KEY`;
* the keyed one (:meth:`PostgresStore.load_records` / :meth:`PostgresStore.commit_records`), also
  offered under the protocol's own names by :attr:`PostgresStore.records`.

**Leases and fencing.** ``open()`` takes the checkpoint's lease: a row naming the holder,
an *epoch* that only grows (bumped by every new holder) and an expiry computed by the
database's clock, so no two hosts' clocks are ever compared. A background thread renews
it every ``lease_s / 3``, but only while its holder's own loop is alive: a controller
calls :meth:`PostgresStore.heartbeat` from its trio loop, and once heartbeats have
begun the renewer refuses to renew when the last one is older than
:attr:`PostgresStore.heartbeat_max_age_s` (half the lease), so a controller whose loop
is blocked loses its lease to a standby instead of keeping it from a side thread. A
lease not renewed before it expires (by this host's monotonic clock, counted from the
moment the last renewal was sent, so never later than the database's expiry) is lost
for good: :meth:`PostgresStore.lease_lost` says so, and the renewer stops.

Every write is one statement whose first part updates the lease
row *only if it still names this holder and epoch*; the rest of the statement writes
through that update's result, so a controller whose lease was taken over (it was paused,
partitioned, or slow) writes nothing and gets :class:`~servecore.LeaseLost`. Once the
renewer has seen the lease taken, every later write fails at once, without a round trip.
A second opener gets :class:`~servecore.StoreLocked`; ``open(standby=True)`` instead
waits for the lease to expire (or be released by ``close()``), takes it with the next
epoch and returns, which is how a standby controller takes over.

The lease itself (its statements, the fence, a holding and its renewer) is
:mod:`servecore.stores.postgres_lease`; following commits from another process is
:mod:`servecore.stores.postgres_commits`. This module is the store: its connections,
taking and giving back the lease, writing and reading.

psycopg 3 is imported only when a store is made: ``pip install 'servecore[postgres]'``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from math import ceil, inf
from typing import TYPE_CHECKING, Any, TypeVar

from servecore._core.errors import (
    CheckpointError,
    CheckpointOutcomeUnknown,
    CheckpointVersionError,
    InvalidConfig,
    LeaseLost,
    StoreAccessDenied,
    StoreLocked,
)
from servecore._core.records import META_KEY, decode_blob, meta_record, read_meta
from servecore._text import describe_exception
from servecore.stores.postgres_commits import COMMIT_CHANNEL, CommitListener, Committed
from servecore.stores.postgres_lease import (
    ACQUIRE,
    LEASE_ROW,
    RELEASE,
    Lease,
    fence_sql,
    locked_error,
)

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "BLOB_KEY",
    "COMMIT_CHANNEL",
    "SCHEMA_VERSION",
    "CommitListener",
    "Committed",
    "PostgresRecords",
    "PostgresStore",
]

log = logging.getLogger("servecore.stores.postgres")

#: The version of the tables this module writes; a database with a newer one is refused.
SCHEMA_VERSION = 1
#: The record a whole-blob checkpoint (``save``/``load``) is kept in.
BLOB_KEY = "checkpoint"
#: How often, at most, a waiting standby asks the database about the lease.
_STANDBY_POLL_S = 0.25
# Any constant: serializes the schema's creation between openers racing on a new database.
_SCHEMA_LOCK_ID = 0x5E7E_C0DE

_SCHEMA = """
CREATE TABLE IF NOT EXISTS servecore_schema (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version integer NOT NULL
);
CREATE TABLE IF NOT EXISTS servecore_leases (
    checkpoint text PRIMARY KEY,
    holder text,
    epoch bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    seq bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS servecore_records (
    checkpoint text NOT NULL,
    key text NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (checkpoint, key)
);
"""

# A write whose answer was lost may still be running in its server process (a frozen
# server resumes and commits it): end that process, and only then read the lease row,
# so that what it says is final. Only a servecore connection of this role is ended.
_END_DOUBTFUL = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
WHERE pid = %(pid)s AND usename = current_user AND application_name = 'servecore'
"""
_RUNNING = "SELECT 1 FROM pg_stat_activity WHERE pid = %(pid)s"
#: How often, at most, the end of a doubtful write's server process is looked for.
_DOUBTFUL_POLL_S = 0.02

# The rest of a write joins on the fence (postgres_lease.fence_sql). Its shape follows
# the change set (one record put, several, none; deletes or not), since the general one
# costs a bare upsert's time again on the commonest write, one record: each shape is its
# own prepared statement.
# The records are written through ``notified``, so the commit's notification is sent
# by the same statement (delivered by PostgreSQL only if it commits) and only when the
# fence let it through: a CTE calling a volatile function is evaluated once, never
# folded into the query.
_NOTIFIED = """,
notified AS (
    SELECT fence.checkpoint, fence.seq, pg_notify(%(channel)s, md5(fence.checkpoint)) FROM fence
)"""
_PUT_ONE = """
INSERT INTO servecore_records (checkpoint, key, value)
SELECT notified.checkpoint, %(key)s::text, %(value)s::bytea FROM notified
ON CONFLICT (checkpoint, key) DO UPDATE SET value = EXCLUDED.value
RETURNING (SELECT seq FROM fence)
"""
_PUT_MANY = """
INSERT INTO servecore_records (checkpoint, key, value)
SELECT notified.checkpoint, p.key, p.value
FROM notified, unnest(%(keys)s::text[], %(values)s::bytea[]) AS p(key, value)
ON CONFLICT (checkpoint, key) DO UPDATE SET value = EXCLUDED.value
RETURNING (SELECT seq FROM fence)
"""
_PUT_NONE = "SELECT seq FROM notified"
_DELETE = """,
gone AS (
    DELETE FROM servecore_records r USING fence
    WHERE r.checkpoint = fence.checkpoint AND r.key = ANY(%(deletes)s::text[])
)"""


@functools.cache
def _write_sql(*, held: bool, keyed: bool, puts: int, deletes: bool) -> str:
    """The one statement of a write, which yields the new sequence number, or no row if
    the fence refused it. A blob save bumps the sequence number by one; a keyed commit
    sets it, and only forwards (see :meth:`PostgresStore.commit_records`). ``puts`` is
    0, 1 or 2 for "several"."""
    fence = fence_sql(held=held, keyed=keyed)
    body = (_PUT_NONE, _PUT_ONE, _PUT_MANY)[puts]
    gone = _DELETE if deletes else ""
    return f"WITH fence AS ({fence.strip()}){gone}{_NOTIFIED}\n{body.strip()}"


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise ImportError(
            "PostgresStore needs psycopg 3: pip install 'servecore[postgres]' "
            "(or pip install 'psycopg[binary]>=3.1')"
        ) from exc
    return psycopg


T = TypeVar("T")

# What libpq says when the server will never let this client in, however long it waits:
# connection errors carry no SQLSTATE, so the message is all there is.
_DENIED = (
    "password authentication failed",
    "no password supplied",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",  # the role or the database
    "permission denied for database",
)


def _denied(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in _DENIED)


@functools.cache
def _deadline_connection() -> Any:
    """A psycopg connection whose every wait on the server ends after ``deadline_s``:
    a database whose processes hang (stopped, swapped out) keeps its sockets open, so
    neither TCP keepalive nor a server-side timeout ever fires; only the client's own
    deadline does. A wait that times out leaves the protocol mid-way, so the
    connection is closed and marked ``timed_out``."""
    pg = _import_psycopg()
    timeout_error = getattr(pg.errors, "_WaitTimeout", pg.errors.OperationalError)

    class DeadlineConnection(pg.Connection):  # type: ignore[misc, name-defined]
        deadline_s: float | None = None
        timed_out = False

        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            try:
                return super().wait(gen, interval, self.deadline_s if timeout is None else timeout)
            except timeout_error:
                if self.closed:
                    raise
                self.timed_out = True
                self.pgconn.finish()
                raise pg.OperationalError(
                    f"no answer from the server within {self.deadline_s:g}s (it may be hung)"
                ) from None

    return DeadlineConnection


def _default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class PostgresStore:
    """A checkpoint in PostgreSQL, one row per record, fenced by a lease (see the module).

    ``dsn`` is a libpq connection string or URI (``"postgresql://user@host/db"``);
    ``checkpoint`` names this checkpoint among those in the database; ``lease_s`` is how
    long a lease lasts unrenewed (a standby takes over at most that long after the
    holder dies); ``holder`` names this opener in the lease row (default: host, pid and
    a random suffix); ``connect_timeout_s`` bounds each connection attempt;
    ``call_timeout_s`` (default half the lease) bounds every call on an open connection,
    on the client (a hung server answers nothing) and on the server
    (``statement_timeout``, ``lock_timeout``), with TCP keepalive besides, so a hung
    database fails a command with :class:`~servecore.CheckpointError` and frees the
    store within it. A connection found dead (the server restarted) is replaced once
    before a call fails. A server that refuses this client (a wrong password, an
    unknown user or database) raises :class:`~servecore.StoreAccessDenied` at once, a
    standby too. The password, if the DSN has one, appears in no message.
    """

    SCHEMA_VERSION = SCHEMA_VERSION

    def __init__(
        self,
        dsn: str,
        *,
        checkpoint: str = "servecore",
        lease_s: float = 10.0,
        holder: str | None = None,
        connect_timeout_s: float = 5.0,
        call_timeout_s: float | None = None,
    ) -> None:
        pg = _import_psycopg()
        if not isinstance(checkpoint, str) or not checkpoint or "\x00" in checkpoint:
            raise InvalidConfig(
                "checkpoint", checkpoint, "must be a non-empty string without NUL characters"
            )
        if call_timeout_s is None and not isinstance(lease_s, bool):
            with contextlib.suppress(TypeError):
                call_timeout_s = lease_s / 2
        for field, value in (
            ("lease_s", lease_s),
            ("connect_timeout_s", connect_timeout_s),
            ("call_timeout_s", call_timeout_s),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 < value < inf
            ):
                raise InvalidConfig(field, value, "must be a positive number of seconds")
        try:
            params = pg.conninfo.conninfo_to_dict(dsn)
        except pg.ProgrammingError as exc:
            raise InvalidConfig("dsn", "<not shown>", f"is not a connection string: {exc}") from exc
        self.dsn = dsn
        self.checkpoint = checkpoint
        self.lease_s = float(lease_s)
        self.holder = holder or _default_holder()
        self.connect_timeout_s = connect_timeout_s
        assert call_timeout_s is not None
        self.call_timeout_s = float(call_timeout_s)
        self._user_options = str(params.get("options") or "")
        host = str(params.get("host") or os.environ.get("PGHOST") or "localhost")
        port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
        user = str(params.get("user") or os.environ.get("PGUSER") or "")
        dbname = str(params.get("dbname") or os.environ.get("PGDATABASE") or user)
        self._address = f"{host}:{port}/{dbname}"
        self.where = f"postgresql://{user + '@' if user else ''}{self._address} ({checkpoint!r})"
        self._mutex = threading.Lock()  # one writer on the connection; saves come from threads
        self._conn: psycopg.Connection[Any] | None = None
        self._lease: Lease | None = None
        self._seq = 0  # the lease row's sequence number after our last write
        # The server process of a write whose answer was lost, until it is known ended.
        self._doubtful_pid: int | None = None
        self._holder_seen: tuple[Any, ...] | None = None  # the lease row that locked us out
        #: A renewal is refused when the holder's last heartbeat is older than this.
        self.heartbeat_max_age_s = self.lease_s / 2
        self._warned_unreachable = False

    # -- identity -------------------------------------------------------------------------

    @property
    def store_id(self) -> str:
        """``"postgres:<host>:<port>/<dbname>#<checkpoint>"``."""
        return f"postgres:{self._address}#{self.checkpoint}"

    @property
    def records(self) -> PostgresRecords:
        """This store under the keyed protocol's own names (``load``, ``commit``)."""
        return PostgresRecords(self)

    @property
    def epoch(self) -> int | None:
        """The epoch of the lease this store holds, or ``None`` when it holds none."""
        lease = self._lease
        return None if lease is None else lease.epoch

    @property
    def holds_lease(self) -> bool:
        """Whether this store holds its lease, not known to be lost (the ingress's
        ``/-/readyz`` reads it: a fenced controller is not ready)."""
        lease = self._lease
        return lease is not None and lease.lost_to is None

    def lease_info(self) -> dict[str, Any] | None:
        """The checkpoint's lease as the database has it now, for status tools:
        ``{"holder": str | None, "epoch": int, "expires_in_s": float}`` (``holder``
        ``None``: released; ``expires_in_s`` at most 0: expired, so free to take), or
        ``None`` if no controller ever held it. Reads only; needs no lease."""
        row = self._call(lambda conn: conn.execute(LEASE_ROW, {"cp": self.checkpoint}).fetchone())
        if row is None:
            return None
        holder, epoch, _seq, left_s = row
        return {"holder": holder, "epoch": int(epoch), "expires_in_s": float(left_s)}

    # -- connections ----------------------------------------------------------------------

    def open_connection(self) -> psycopg.Connection[Any]:
        """A new connection to this store's database with the store's deadlines
        (autocommit), for work beside the checkpoint's own connection; the caller
        closes it."""
        return self._connect()

    def _connect(self, *, deadline: bool = True) -> psycopg.Connection[Any]:
        """A new connection; ``deadline``: every wait on the server is bounded by the
        call timeout (not for a connection that waits for notifications)."""
        pg = _import_psycopg()
        call_ms = max(1, round(self.call_timeout_s * 1000))
        cls = _deadline_connection() if deadline else pg.Connection
        try:
            conn: psycopg.Connection[Any] = cls.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=max(1, ceil(self.connect_timeout_s)),
                application_name="servecore",
                keepalives=1,
                keepalives_idle=max(1, ceil(self.call_timeout_s / 2)),
                keepalives_interval=1,
                keepalives_count=3,
                tcp_user_timeout=call_ms,
                options=(
                    f"{self._user_options} -c statement_timeout={call_ms} -c lock_timeout={call_ms}"
                ).strip(),
            )
        except pg.Error as exc:
            if _denied(exc):
                raise StoreAccessDenied(self.where, _reason(exc)) from exc
            raise CheckpointError(
                f"cannot connect to the checkpoint store {self.where}: {_reason(exc)}; "
                f"nothing was read or written (check that the server is up and reachable)"
            ) from exc
        try:
            self._ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        if deadline:
            conn.deadline_s = self.call_timeout_s  # type: ignore[attr-defined]
        return conn

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        """Create the tables on first use; refuse a database written by a newer servecore."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
            found = conn.execute("SELECT to_regclass('servecore_schema')").fetchone()
            if found is not None and found[0] is not None:
                row = conn.execute("SELECT version FROM servecore_schema").fetchone()
                if row is not None and row[0] > SCHEMA_VERSION:
                    raise CheckpointVersionError(self.where, row[0], SCHEMA_VERSION)
                if row is not None:
                    return
            conn.execute(_SCHEMA)
            conn.execute(
                "INSERT INTO servecore_schema (version) VALUES (%s) ON CONFLICT DO NOTHING",
                (SCHEMA_VERSION,),
            )

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def _call(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``fn`` on the connection (a read, or a write safe to repeat). A connection
        found dead by it (the server restarted since it was opened) is replaced and
        ``fn`` tried once more; a hung server is not asked twice."""
        pg = _import_psycopg()
        reused = self._conn is not None and not self._conn.closed
        conn = self._connection()
        try:
            return fn(conn)
        except pg.Error:
            if not reused or not conn.closed or getattr(conn, "timed_out", False):
                raise
            log.info("the connection to %s was dead (a restart?): reconnecting", self.where)
            self._drop_connection()
        return fn(self._connection())

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _params(self, **more: Any) -> dict[str, Any]:
        return {
            "cp": self.checkpoint,
            "holder": self.holder,
            "lease_s": self.lease_s,
            "channel": COMMIT_CHANNEL,
            **more,
        }

    # -- the lease ------------------------------------------------------------------------

    def open(self, *, standby: bool = False, timeout_s: float | None = None) -> None:
        """Take the lease. Without ``standby``, raise :class:`~servecore.StoreLocked` at
        once if another opener holds it; with it, wait (at most ``timeout_s``, if given,
        then raise ``StoreLocked``) until the holder's lease expires or is released, take
        it with the next epoch and return. Opening an open store does nothing."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            unreachable: CheckpointError | None = None
            with self._mutex:
                if self._lease is not None:
                    return
                try:
                    remaining_s = self._try_acquire()
                except StoreAccessDenied:
                    raise  # waiting cannot fix a wrong password
                except CheckpointError as exc:
                    if not standby:
                        raise
                    # A standby outlasts an outage of the database, as it does the leader.
                    unreachable, remaining_s = exc, _STANDBY_POLL_S
                    if not self._warned_unreachable:
                        log.warning("standby keeps waiting: %s", exc)
                        self._warned_unreachable = True
                if remaining_s is None:
                    self._warned_unreachable = False
                    return
            if not standby or (deadline is not None and time.monotonic() >= deadline):
                if unreachable is not None:
                    raise StoreLocked(self.where, f"cannot be reached: {unreachable}")
                raise self._locked()
            pause = min(_STANDBY_POLL_S, max(0.01, remaining_s + 0.005))
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            time.sleep(pause)

    def _try_acquire(self) -> float | None:
        """Take the lease now (and start renewing it): ``None``; or the seconds left on
        the holder's lease (by the database's clock)."""
        pg = _import_psycopg()
        sent = time.monotonic()
        try:
            # Taking the lease twice is harmless: a second _ACQUIRE finds it ours, unexpired,
            # and returns no row, and LEASE_ROW shows our own holder name; so repeat it.
            row = self._call(lambda conn: conn.execute(ACQUIRE, self._params()).fetchone())
            if row is None:
                held = self._call(lambda conn: conn.execute(LEASE_ROW, self._params()).fetchone())
                self._holder_seen = held
                return 0.0 if held is None else max(0.0, float(held[3]))
        except pg.Error as exc:
            self._drop_connection()
            raise CheckpointError(
                f"cannot take the lease on {self.where}: {_reason(exc)}; nothing was written"
            ) from exc
        epoch, seq = int(row[0]), int(row[1])
        # A new holding: heartbeats (if any) begin again.
        lease = Lease(epoch, where=self.where, holder=self.holder, lease_s=self.lease_s, sent=sent)
        self._lease, self._seq = lease, seq
        lease.start_renewing(
            connect=self._connect,
            params=self._params(epoch=epoch),
            heartbeat_max_age_s=lambda: self.heartbeat_max_age_s,
            name=f"servecore-lease-{self.checkpoint}",
        )
        log.info("took the lease on %s (epoch %d, as %s)", self.where, epoch, self.holder)
        return None

    def _locked(self) -> StoreLocked:
        return locked_error(self.where, self._holder_seen)

    def heartbeat(self) -> None:
        """Say that the holder's own loop is alive (a controller calls this from its
        trio loop, well within :attr:`heartbeat_max_age_s`). Once called, the lease is
        renewed only while the heartbeats keep coming."""
        lease = self._lease
        if lease is not None:
            lease.heartbeat()

    def lease_lost(self) -> LeaseLost | None:
        """Why this store no longer holds its lease, or ``None`` while it does (or
        holds none): another holder took it, or it was not renewed before it expired.
        A loss is final: the lease is never renewed again by this store."""
        lease = self._lease
        return None if lease is None else lease.lost()

    def close(self) -> None:
        """Give the lease back (a standby may take it at once) and disconnect."""
        with self._mutex:
            lease, self._lease = self._lease, None
        if lease is not None:
            # The renewer first, so that no renewal lands after the release.
            lease.stop_renewing(self.connect_timeout_s + 1)
        with self._mutex:
            if lease is not None and lease.lost_to is None:
                try:
                    self._connection().execute(RELEASE, self._params(epoch=lease.epoch))
                except Exception as exc:
                    # It expires by itself; a standby just waits a little longer.
                    log.warning("could not release the lease on %s: %s", self.where, exc)
            self._drop_connection()

    # -- writing --------------------------------------------------------------------------

    def save(self, data: bytes) -> None:
        """Make ``data`` the checkpoint (the record :data:`BLOB_KEY`), in one transaction
        fenced by the lease. Raises :class:`~servecore.LeaseLost` if the lease was taken
        over, :class:`~servecore.CheckpointError` if the database cannot be reached."""
        self._write({BLOB_KEY: bytes(data)}, [], seq=None)

    def commit_records(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        """Apply one change set atomically: write ``puts``, delete ``deletes``, and make
        ``seq`` the sequence number, or raise and change nothing.

        Fenced by the lease like :meth:`save`. ``seq`` must be larger than the stored
        one: a commit whose acknowledgement was lost but which landed would otherwise be
        built upon by a controller that thinks it failed; that case raises
        :class:`~servecore.CheckpointError` asking for a reopen.
        """
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise InvalidConfig("seq", seq, "must be a non-negative integer")
        for key in [*puts, *deletes]:
            if not isinstance(key, str) or "\x00" in key:
                raise InvalidConfig("key", key, "must be a string without NUL characters")
        both = set(puts).intersection(deletes)
        if both:
            raise InvalidConfig(
                "deletes", sorted(both), "names keys that puts writes too; a change set "
                "either writes or deletes a key",
            )  # fmt: skip
        self._write(dict(puts), list(deletes), seq=seq)

    def _write(self, puts: dict[str, bytes], deletes: list[str], *, seq: int | None) -> None:
        pg = _import_psycopg()
        keyed = seq is not None
        with self._mutex:
            lease = self._lease
            if lease is not None and lease.lost_to is not None:
                raise lease.lost_error()  # known lost: fail fast, no round trip
            target = seq if seq is not None else self._seq + 1
            params = self._params(
                epoch=None if lease is None else lease.epoch,
                seq=seq,
                deletes=deletes,
            )
            if len(puts) == 1:
                ((params["key"], params["value"]),) = puts.items()
            else:
                params["keys"], params["values"] = list(puts), list(puts.values())
            sql = _write_sql(
                held=lease is not None, keyed=keyed, puts=min(len(puts), 2), deletes=bool(deletes)
            )
            for attempt in (1, 2):
                reused = self._conn is not None and not self._conn.closed
                conn = self._connection()
                pid = conn.info.backend_pid
                try:
                    row = conn.execute(sql, params, prepare=True).fetchone()
                    break
                except pg.Error as exc:
                    # Read before dropping: dropping closes it, and "the server had
                    # closed it" is what tells a restart from an error it answered.
                    server_closed = conn.closed
                    self._drop_connection()
                    if getattr(exc, "sqlstate", None) is None:
                        self._doubtful_pid = pid  # it may still be running there
                    hung = getattr(conn, "timed_out", False)
                    if lease is None:
                        raise CheckpointError(
                            f"writing to the checkpoint store {self.where} failed: "
                            f"{_reason(exc)}; the database did not confirm the write (if "
                            f"it landed anyway, the next write supersedes it)"
                        ) from exc
                    # An error the server sent (it has a SQLSTATE, as a shutdown's does)
                    # means the statement did not commit; a hung server is not asked
                    # again (the call's deadline is spent); otherwise ask.
                    landed: bool | None
                    if getattr(exc, "sqlstate", None) is not None:
                        landed = False
                    else:
                        landed = None if hung else self._landed(lease, target)
                    if landed:
                        self._seq = target
                        return  # the answer was lost, not the write
                    if landed is None:
                        raise CheckpointOutcomeUnknown(self.where, target, _reason(exc)) from exc
                    if attempt == 1 and reused and server_closed:
                        # A connection the server had closed (a restart): it did not
                        # land, so write again, once, on the new connection.
                        log.info("the connection to %s was dead: writing again", self.where)
                        continue
                    raise CheckpointError(
                        f"writing to the checkpoint store {self.where} failed: "
                        f"{_reason(exc)}; it did not land (the lease row says so): nothing "
                        f"was written"
                    ) from exc
            if row is not None:
                self._seq = int(row[0])
                return
            try:
                self._refused(lease, target)
            except pg.Error as exc:
                self._drop_connection()
                raise CheckpointError(
                    f"the checkpoint store {self.where} refused a write and then could not "
                    f"be asked why: {_reason(exc)}; nothing was written"
                ) from exc

    def _landed(self, lease: Lease, target: int) -> bool | None:
        """After a write whose answer never came: did it land? Asked once, on a new
        connection, once the write's server process has ended; ``None`` if the
        database cannot say."""
        with contextlib.suppress(Exception):
            self._end_doubtful()
            row = self._connection().execute(LEASE_ROW, self._params()).fetchone()
            return (
                row is not None
                and row[0] == self.holder
                and int(row[1]) == lease.epoch
                and int(row[2]) == target
            )
        self._drop_connection()
        return None

    def _end_doubtful(self) -> None:
        """End the server process of a write whose answer was lost, and wait (at most
        ``call_timeout_s``) until it is gone: then the write has landed or never will.
        Raises :class:`~servecore.CheckpointError` if it outlives the wait."""
        pid = self._doubtful_pid
        if pid is None:
            return
        conn = self._connection()
        conn.execute(_END_DOUBTFUL, {"pid": pid})
        deadline = time.monotonic() + self.call_timeout_s
        while conn.execute(_RUNNING, {"pid": pid}).fetchone() is not None:
            if time.monotonic() >= deadline:
                raise CheckpointError(
                    f"the server process {pid} of {self.where} that received a write whose "
                    f"answer was lost is still running {self.call_timeout_s:g}s after it was "
                    f"told to end, so whether the write lands is not known yet"
                )
            time.sleep(_DOUBTFUL_POLL_S)
        self._doubtful_pid = None

    def committed_seq(self) -> int:
        """The sequence number the checkpoint holds now: the lease row's, one read.

        Asked by the controller after a write whose answer was lost
        (:class:`~servecore.CheckpointOutcomeUnknown`): the server process that received
        that write is ended first (a frozen server resumes and commits what it had
        received), so the answer is final. Raises :class:`~servecore.LeaseLost` if
        another holder took the lease, :class:`~servecore.CheckpointError` if the
        database cannot be asked (or the write's process will not end).
        """
        pg = _import_psycopg()
        with self._mutex:
            lease = self._lease
            if lease is not None and lease.lost_to is not None:
                raise lease.lost_error()
            try:
                self._end_doubtful()
                row = self._call(lambda conn: conn.execute(LEASE_ROW, self._params()).fetchone())
            except pg.Error as exc:
                self._drop_connection()
                raise CheckpointError(
                    f"asking {self.where} for its sequence number failed: {_reason(exc)}"
                ) from exc
            if lease is not None and (
                row is None or row[0] != self.holder or int(row[1]) != lease.epoch
            ):
                lease.lose(row)
                raise lease.lost_error()
            seq = 0 if row is None else int(row[2])
            if lease is not None:
                self._seq = seq
            return seq

    def _refused(self, lease: Lease | None, target: int) -> None:
        """The fence refused a write: say why (a newer holder, or a stale sequence)."""
        row = self._connection().execute(LEASE_ROW, self._params()).fetchone()
        if lease is None:
            if row is not None and row[0] is not None and float(row[3]) > 0:
                self._holder_seen = row
                raise self._locked()
        elif row is None or row[0] != self.holder or int(row[1]) != lease.epoch:
            lease.lose(row)
            raise lease.lost_error()
        stored = None if row is None else int(row[2])
        raise CheckpointError(
            f"commit {target} to {self.where} refused: the checkpoint is already at "
            f"sequence number {stored}, so an earlier commit this controller saw fail did "
            f"land; nothing was written; close and reopen the controller to load it"
        )

    # -- reading --------------------------------------------------------------------------

    def load(self) -> bytes | None:
        """The whole-blob checkpoint, or ``None`` if none was ever saved."""
        pg = _import_psycopg()
        with self._mutex:
            try:
                row = self._call(
                    lambda conn: conn.execute(
                        "SELECT value FROM servecore_records WHERE checkpoint = %s AND key = %s",
                        (self.checkpoint, BLOB_KEY),
                    ).fetchone()
                )
            except pg.Error as exc:
                self._drop_connection()
                raise CheckpointError(
                    f"reading the checkpoint from {self.where} failed: {_reason(exc)}"
                ) from exc
        return None if row is None else bytes(row[0])

    def load_records(self) -> tuple[int, dict[str, bytes]]:
        """The sequence number and every record, read from one snapshot; ``(0, {})`` for
        a checkpoint never written."""
        committed = self.load_committed()
        return committed.seq, committed.records

    def load_committed(self) -> Committed:
        """What is committed now, read from one snapshot: the lease's epoch, the
        sequence number and every record. Reads only; needs no lease (a client of the
        controller follows the checkpoint this way)."""
        pg = _import_psycopg()

        def read(conn: psycopg.Connection[Any]) -> tuple[Any, list[Any]]:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                row = conn.execute(LEASE_ROW, self._params()).fetchone()
                rows = conn.execute(
                    "SELECT key, value FROM servecore_records WHERE checkpoint = %s",
                    (self.checkpoint,),
                ).fetchall()
            return row, rows

        with self._mutex:
            try:
                row, rows = self._call(read)
            except pg.Error as exc:
                self._drop_connection()
                raise CheckpointError(
                    f"reading the checkpoint from {self.where} failed: {_reason(exc)}"
                ) from exc
        return Committed(
            epoch=None if row is None else int(row[1]),
            seq=0 if row is None else int(row[2]),
            records={k: bytes(v) for k, v in rows},
        )

    def listen_for_commits(self) -> CommitListener:
        """A :class:`CommitListener` for this checkpoint, on a connection of its own."""
        return CommitListener(
            self.checkpoint, self.where, functools.partial(self._connect, deadline=False)
        )

    def __repr__(self) -> str:
        return f"PostgresStore({self.where!r})"


class PostgresRecords:
    """A :class:`PostgresStore` under the keyed store protocol's names: ``load()`` gives
    ``(seq, records)``, ``commit(seq, puts, deletes)`` applies a change set. Opening,
    closing and the lease are the store's."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.where = store.where
        # Loaded from a whole-blob checkpoint: its records, which the first commit
        # writes (with its own change set) in place of the blob.
        self._upgrade: dict[str, bytes] | None = None

    @property
    def store_id(self) -> str:
        """The store's :attr:`PostgresStore.store_id`."""
        return self.store.store_id

    @property
    def epoch(self) -> int | None:
        """The store's :attr:`PostgresStore.epoch`."""
        return self.store.epoch

    @property
    def holds_lease(self) -> bool:
        """The store's :attr:`PostgresStore.holds_lease`."""
        return self.store.holds_lease

    def lease_s(self) -> float:
        """The store's :attr:`PostgresStore.lease_s`."""
        return self.store.lease_s

    def heartbeat(self) -> None:
        """See :meth:`PostgresStore.heartbeat`."""
        self.store.heartbeat()

    def lease_lost(self) -> LeaseLost | None:
        """See :meth:`PostgresStore.lease_lost`."""
        return self.store.lease_lost()

    def open(self, *, standby: bool = False, timeout_s: float | None = None) -> None:
        """See :meth:`PostgresStore.open`."""
        self.store.open(standby=standby, timeout_s=timeout_s)

    def close(self) -> None:
        """See :meth:`PostgresStore.close`."""
        self.store.close()

    def load(self) -> tuple[int, dict[str, bytes]]:
        """See :meth:`PostgresStore.load_records`. A checkpoint saved whole (through
        :meth:`PostgresStore.save`, as controllers did before keyed checkpoints) is
        read as its records, and the next :meth:`commit` replaces it by them."""
        seq, records = self.store.load_records()
        self._upgrade = None
        if set(records) != {BLOB_KEY}:
            return seq, records
        found, records = decode_blob(records[BLOB_KEY], self.where)
        # Keyed commits must move the stored sequence number forward: go on from the
        # larger of the blob's and the store's.
        seq = max(seq, found)
        records[META_KEY] = meta_record(seq, read_meta(records, found, self.where))
        self._upgrade = dict(records)
        return seq, records

    def committed_seq(self) -> int:
        """See :meth:`PostgresStore.committed_seq`."""
        return self.store.committed_seq()

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        """See :meth:`PostgresStore.commit_records`."""
        upgrade = self._upgrade
        if upgrade is not None:
            gone = set(deletes)
            puts = {**{k: v for k, v in upgrade.items() if k not in gone}, **puts}
            deletes = [BLOB_KEY] if BLOB_KEY not in puts else []
        self.store.commit_records(seq, puts, deletes)
        self._upgrade = None

    def __repr__(self) -> str:
        return f"PostgresRecords({self.where!r})"


def _reason(exc: BaseException) -> str:
    return describe_exception(exc, one_line=True)
