"""Async targets for the threads and subprocess runtime tests (``async_targets:...``).

What they record travels back in their answers (times on the replica's own clock), so
the same targets serve tests of in-process and out-of-process replicas alike.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import servecore


async def async_echo(value: Any) -> Any:
    """An async function target."""
    await asyncio.sleep(0)
    return value


async def async_fail(value: Any) -> Any:
    """Raises the user's own exception after awaiting."""
    await asyncio.sleep(0)
    raise LookupError(f"no model named {value!r}")


@servecore.batch
async def async_double_all(values: list[Any]) -> list[Any]:
    """An async batch target: answers ``[2 * v, ...]`` and remembers its batch sizes."""
    await asyncio.sleep(0)
    return [(v * 2, len(values)) for v in values]


async def async_stream(value: Any) -> Any:  # an async generator: a stream
    yield value


class Recorder:
    """An async class target that records what it does.

    A number ``n`` sleeps ``delay`` seconds and answers ``(n, start, end)`` on the
    replica's monotonic clock. ``"hang"`` waits until cancelled; ``"hanging"`` answers
    whether a hang has begun; ``"cancelled"`` answers the values whose task was
    cancelled (each records ``asyncio.CancelledError``); ``"where"`` answers whether
    the query runs on the loop its constructor ran on, and that thread's name.
    """

    def __init__(self, delay: float = 0.2) -> None:
        self.delay = delay
        self.cancelled: list[Any] = []
        self.hanging = False
        self.loop = asyncio.get_running_loop()  # the constructor runs on the replica's loop

    async def __call__(self, value: Any) -> Any:
        if value == "cancelled":
            return list(self.cancelled)
        if value == "hanging":
            return self.hanging
        if value == "where":
            return asyncio.get_running_loop() is self.loop, threading.current_thread().name
        start = time.monotonic()
        try:
            if value == "hang":
                self.hanging = True
                await asyncio.Event().wait()
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.append(value)
            raise
        return value, start, time.monotonic()


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (one ending as another starts: not both)."""
    points = sorted([(end, -1) for _, end in intervals] + [(start, 1) for start, _ in intervals])
    open_now = peak = 0
    for _, step in points:
        open_now += step
        peak = max(peak, open_now)
    return peak
