"""Opening a checkpoint store, as the leader or as a standby waiting for the lease.

A store that can wait for its lease (:class:`~servecore.PostgresStore`) has
``open(*, standby: bool, timeout_s: float | None)``. A standby controller calls it in
short bounded waits, each in a worker thread, so that the trio loop stays free and a
cancelled standby never leaves a thread behind that could take the lease after the
controller is gone.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import trio

from servecore._core.errors import InvalidConfig, StoreLocked

__all__ = ["open_store"]

#: Each wait in a thread lasts at most this long; a cancel is heard within it.
_WAIT_SLICE_S = 0.5


def _can_wait(opener: Any) -> bool:
    try:
        params = inspect.signature(opener).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return "standby" in params and "timeout_s" in params


async def open_store(store: Any, *, standby: bool) -> None:
    """Open ``store`` (if it has ``open``). With ``standby``, wait until its lease is
    free and take it; a store that cannot wait raises :class:`~servecore.InvalidConfig`."""
    if not isinstance(standby, bool):
        raise InvalidConfig("standby", standby, "must be True or False")
    opener = getattr(store, "open", None)
    if not standby:
        if opener is not None:
            opener()
        return
    if opener is None or not _can_wait(opener):
        raise InvalidConfig(
            "standby",
            True,
            f"needs a store that can wait for its lease, such as servecore.PostgresStore; "
            f"{type(store).__name__} cannot (open without standby, or use PostgresStore)",
        )
    wait = functools.partial(opener, standby=True, timeout_s=_WAIT_SLICE_S)
    while True:
        try:
            await trio.to_thread.run_sync(wait)
            return
        except StoreLocked:
            await trio.lowlevel.checkpoint()  # a cancel lands here, between two waits
