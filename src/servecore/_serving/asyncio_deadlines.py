"""Query timeouts on an asyncio loop, for thousands of queries a second.

``asyncio.timeout`` schedules a timer per query, and a timer cancelled early (nearly
all of them: queries answer long before their timeout) stays in the loop's heap,
whose every push and pop compares timers in Python. :class:`Deadlines` shares one
timer among all the deadlines that fall in the same :data:`GRAIN` of time: a query
adds itself to a set, and removes itself when done. A deadline fires at most
:data:`GRAIN` seconds late.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

__all__ = ["GRAIN", "Deadline", "Deadlines"]

#: How finely deadlines are told apart (seconds): a timeout fires at most this late.
GRAIN = 0.01


class Deadline:
    """One task's deadline: ask :meth:`expired` on ``CancelledError``, and call
    :meth:`done` when the task no longer needs it."""

    __slots__ = ("_bucket", "_fired", "_task")

    def __init__(self, task: asyncio.Task[Any] | None, bucket: set[Deadline]) -> None:
        self._task = task
        self._bucket = bucket
        self._fired = False

    def done(self) -> None:
        """The task no longer needs this deadline (it finished, one way or another)."""
        self._bucket.discard(self)

    def fire(self) -> None:
        """Cancel the task (the deadline passed)."""
        task = self._task
        if task is not None and not task.done():
            self._fired = True
            task.cancel()

    def expired(self) -> bool:
        """Whether this deadline (not the caller's own cancellation) cancelled the task;
        if so, the cancellation is taken back, so the task goes on to raise
        ``TimeoutError`` (as ``asyncio.timeout`` does)."""
        if not self._fired or self._task is None:
            return False
        return self._task.uncancel() == 0


class Deadlines:
    """The deadlines of one loop, one timer per :data:`GRAIN` they fall in."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Kept: asyncio.get_running_loop() makes a getpid() system call each time.
        self._loop = loop
        self._buckets: dict[int, set[Deadline]] = {}

    def after(self, seconds: float) -> Deadline:
        """A deadline ``seconds`` from now for the current task: on ``CancelledError``
        ask ``d.expired()``; call ``d.done()`` when finished, either way."""
        loop = self._loop
        key = math.ceil((loop.time() + seconds) / GRAIN)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            loop.call_at(key * GRAIN, self._fire, key)
        deadline = Deadline(asyncio.current_task(loop), bucket)
        bucket.add(deadline)
        return deadline

    def _fire(self, key: int) -> None:
        for deadline in self._buckets.pop(key, ()):
            deadline.fire()
