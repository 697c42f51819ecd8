"""The lease a :class:`~servecore.stores.postgres.PostgresStore` holds on its checkpoint.

One row of ``servecore_leases`` per checkpoint names the holder, an *epoch* that only
grows (bumped by every new holder) and an expiry computed by the database's clock. This
module holds what that lease is on its own:

* the statements that take (:data:`ACQUIRE`), read (:data:`LEASE_ROW`) and give back
  (:data:`RELEASE`) the lease, and the *fence* every write begins with
  (:func:`fence_sql`), which lets the write through only while the writer holds it;
* :class:`Lease`, one holding of it: its epoch, the holder's heartbeats, the thread
  that renews it every ``lease_s / 3`` while they come, and whether it was lost (taken
  by another, or not renewed before it expired: final either way);
* :func:`locked_error`, what a second opener is told.

The store takes and releases the lease on its own connection, under its own mutex; the
renewer uses a connection of its own (made by the ``connect`` it is given), so a
renewal never queues behind a write.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from servecore._core.errors import LeaseLost, ServecoreError, StoreLocked

if TYPE_CHECKING:
    import psycopg

__all__ = ["ACQUIRE", "LEASE_ROW", "RELEASE", "Lease", "fence_sql", "locked_error"]

# The store's logger: what the lease logs is the store's to say, under one name.
log = logging.getLogger("servecore.stores.postgres")

#: Take the lease if nobody holds it, or its holder let it expire: the epoch grows by one.
ACQUIRE = """
INSERT INTO servecore_leases AS l (checkpoint, holder, epoch, expires_at, seq)
VALUES (%(cp)s, %(holder)s, 1, now() + %(lease_s)s * interval '1 second', 0)
ON CONFLICT (checkpoint) DO UPDATE
    SET holder = EXCLUDED.holder, epoch = l.epoch + 1, expires_at = EXCLUDED.expires_at
    WHERE l.holder IS NULL OR l.expires_at <= now()
RETURNING l.epoch, l.seq
"""

_RENEW = """
UPDATE servecore_leases SET expires_at = now() + %(lease_s)s * interval '1 second'
WHERE checkpoint = %(cp)s AND holder = %(holder)s AND epoch = %(epoch)s
RETURNING 1
"""

#: Released, not deleted: the epoch (and the sequence number) must keep growing.
RELEASE = """
UPDATE servecore_leases SET holder = NULL, expires_at = now()
WHERE checkpoint = %(cp)s AND holder = %(holder)s AND epoch = %(epoch)s
"""

#: The lease row: holder, epoch, sequence number, seconds left (by the database's clock).
LEASE_ROW = """
SELECT holder, epoch, seq, extract(epoch FROM expires_at - now())::float8
FROM servecore_leases WHERE checkpoint = %(cp)s
"""

# The fence: the first part of every write. It yields the checkpoint's name only if the
# write may go ahead, and the rest of the statement joins on it, so a refused fence
# writes nothing. The holder's fence checks its epoch; an unleased write (a store used
# without open()) is a lease taken and given back within the statement: it goes ahead
# only if nobody holds the lease, and bumps the epoch, so a holder that let its lease
# expire while paused is fenced out by it too.
_FENCE_HELD = """
UPDATE servecore_leases SET seq = {seq}
WHERE checkpoint = %(cp)s AND holder = %(holder)s AND epoch = %(epoch)s {seq_check}
RETURNING checkpoint, seq
"""
_FENCE_FREE = """
INSERT INTO servecore_leases AS l (checkpoint, holder, epoch, expires_at, seq)
VALUES (%(cp)s, NULL, 1, now(), {first_seq})
ON CONFLICT (checkpoint) DO UPDATE
    SET holder = NULL, epoch = l.epoch + 1, expires_at = now(), seq = {seq}
    WHERE (l.holder IS NULL OR l.expires_at <= now()) {seq_check}
RETURNING checkpoint, seq
"""


def fence_sql(*, held: bool, keyed: bool) -> str:
    """The fence of a write (``RETURNING checkpoint, seq``, or no row if refused): the
    holder's (``held``) or an unleased store's. A blob save bumps the sequence number
    by one; a keyed commit sets it to ``%(seq)s``, and only forwards."""
    if held:
        seq = "%(seq)s" if keyed else "seq + 1"
        check = "AND seq < %(seq)s" if keyed else ""
        return _FENCE_HELD.format(seq=seq, seq_check=check)
    seq = "%(seq)s" if keyed else "l.seq + 1"
    check = "AND l.seq < %(seq)s" if keyed else ""
    first = "%(seq)s" if keyed else "1"
    return _FENCE_FREE.format(seq=seq, seq_check=check, first_seq=first)


def locked_error(where: str, held: tuple[Any, ...] | None) -> StoreLocked:
    """What an opener is told when the lease row ``held`` (:data:`LEASE_ROW`'s, as last
    seen) keeps it out."""
    if held is None or held[0] is None:
        return StoreLocked(where, "its lease was just taken")
    return StoreLocked(
        where,
        f"lease held by {held[0]!r}, epoch {held[1]}, {max(0.0, float(held[3])):.1f}s "
        f"left unless renewed; open_controller(..., standby=True) waits for it instead",
    )


class Lease:
    """One holding of the lease: its epoch, its renewer, and whether it was lost.

    ``sent`` is the :func:`time.monotonic` at which the statement that took it was
    sent; ``where`` and ``holder`` name the store and this holder in its errors.
    """

    def __init__(self, epoch: int, *, where: str, holder: str, lease_s: float, sent: float) -> None:
        self.epoch = epoch
        self.where = where
        self.holder = holder
        self.lease_s = lease_s
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        # Set by the renewer (or a refused write) once another holder took the lease.
        self.lost_to: tuple[str | None, int] | None = None
        # time.monotonic() past which the lease may have expired unless renewed: counted
        # from when the last acquire or renewal was *sent*, so it is never later than
        # the expiry the database computed.
        self.valid_until = sent + lease_s
        # time.monotonic() of the holder's last heartbeat; None: no heartbeats (a store
        # used without a controller), and the lease is renewed unconditionally.
        self._heartbeat: float | None = None

    # -- what is known of it ----------------------------------------------------------------

    def heartbeat(self) -> None:
        """The holder's own loop is alive: once called, renewals need heartbeats."""
        self._heartbeat = time.monotonic()

    def stalled_s(self, max_age_s: float) -> float | None:
        """Seconds since the holder's last heartbeat, if more than ``max_age_s``."""
        beat = self._heartbeat
        if beat is None:
            return None
        age = time.monotonic() - beat
        return age if age > max_age_s else None

    def lost(self) -> LeaseLost | None:
        """Why this holding is over (taken by another, or expired unrenewed), or ``None``
        while it lasts."""
        if self.lost_to is not None:
            return self.lost_error()
        if time.monotonic() >= self.valid_until:
            return LeaseLost(self.where, self.holder, self.epoch, None, self.epoch, expired=True)
        return None

    def lose(self, held: tuple[Any, ...] | None) -> None:
        """Record that the lease row ``held`` (``None``: gone) no longer names this
        holding; logged once."""
        if self.lost_to is None:
            self.lost_to = (None, self.epoch) if held is None else (held[0], int(held[1]))
            log.error("%s", self.lost_error())

    def lost_error(self) -> LeaseLost:
        """The :class:`~servecore.LeaseLost` for this holding, taken by another."""
        holder, epoch = self.lost_to or (None, self.epoch)
        return LeaseLost(self.where, self.holder, self.epoch, holder, epoch)

    # -- renewing it --------------------------------------------------------------------------

    def start_renewing(
        self,
        *,
        connect: Callable[[], psycopg.Connection[Any]],
        params: Mapping[str, Any],
        heartbeat_max_age_s: Callable[[], float],
        name: str,
    ) -> None:
        """Start the renewer thread ``name``: it renews on connections made by
        ``connect``, with the statement parameters ``params`` (checkpoint, holder,
        lease_s, epoch), while heartbeats are at most ``heartbeat_max_age_s()`` old."""
        self.thread = threading.Thread(
            target=self._renew_forever,
            args=(connect, dict(params), heartbeat_max_age_s),
            name=name,
            daemon=True,
        )
        self.thread.start()

    def stop_renewing(self, timeout_s: float) -> None:
        """Stop the renewer and wait for it (at most ``timeout_s``), so that no renewal
        lands after a release."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=timeout_s)

    def _renew_forever(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        params: dict[str, Any],
        heartbeat_max_age_s: Callable[[], float],
    ) -> None:
        """Renew every third of the lease, on a connection of its own (so a renewal
        never queues behind a write), while the holder's heartbeats come. A failure to
        reach the database is retried: the lease may still be ours when it is back.
        Seeing it taken, or letting it expire, is final."""
        import psycopg as pg

        conn: psycopg.Connection[Any] | None = None
        failing = False
        stalled = False
        try:
            while not self.stop.wait(self.lease_s / 3):
                if time.monotonic() >= self.valid_until:
                    log.error("%s", self.lost())
                    return  # expired: another may hold it now; never renew it again
                max_age_s = heartbeat_max_age_s()
                age = self.stalled_s(max_age_s)
                if age is not None:
                    if not stalled:
                        log.warning(
                            "not renewing the lease on %s: its holder's loop has not ticked "
                            "for %.1fs (more than %.1fs); it expires unless the loop recovers",
                            self.where,
                            age,
                            max_age_s,
                        )
                    stalled = True
                    continue
                stalled = False
                try:
                    if conn is None:
                        conn = connect()
                    sent = time.monotonic()
                    row = conn.execute(_RENEW, params).fetchone()
                    if row is None:
                        if self.stop.is_set():
                            return  # released by close() meanwhile: not lost
                        held = conn.execute(LEASE_ROW, params).fetchone()
                        self.lose(held)
                        return
                    self.valid_until = sent + self.lease_s
                    if failing:
                        log.info("renewed the lease on %s again", self.where)
                    failing = False
                except (pg.Error, ServecoreError) as exc:
                    if not failing:
                        log.warning("cannot renew the lease on %s (retrying): %s", self.where, exc)
                    failing = True
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.close()
                    conn = None
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
