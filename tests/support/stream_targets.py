"""Streaming targets for the runtime and serving tests (``stream_targets:...``).

What they record travels back in their items (times on the replica's monotonic clock,
which on Linux is the host's too), so the same targets serve tests of in-process and
out-of-process replicas alike.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any


class Counter:
    """A sync generator target. ``n`` (or ``[n, delay]``) yields ``(i, produced_at)``
    for ``i < n``, sleeping ``delay`` seconds before each; ``"stats"`` yields one dict:
    how many items it has produced in all, and for each stream stopped early, how far
    it had got."""

    def __init__(self) -> None:
        self.produced = 0
        self.stopped: list[int] = []

    def __call__(self, n: Any, delay: float = 0.0) -> Any:
        if n == "stats":
            yield {"produced": self.produced, "stopped": list(self.stopped)}
            return
        if isinstance(n, list):  # over HTTP: one JSON argument, [n, delay]
            n, delay = n
        i = 0
        try:
            for i in range(n):
                if delay:
                    time.sleep(delay)
                self.produced += 1
                yield i, time.monotonic()
        except GeneratorExit:
            self.stopped.append(i)
            raise


class AsyncCounter:
    """:class:`Counter` as an async generator; a stream stopped early records how far
    it had got, whether it was closed at a ``yield`` or cancelled where it awaited."""

    def __init__(self) -> None:
        self.produced = 0
        self.stopped: list[int] = []

    async def __call__(self, n: Any, delay: float = 0.0) -> Any:
        if n == "stats":
            yield {"produced": self.produced, "stopped": list(self.stopped)}
            return
        if isinstance(n, list):  # over HTTP: one JSON argument, [n, delay]
            n, delay = n
        i = 0
        try:
            for i in range(n):
                await asyncio.sleep(delay)
                self.produced += 1
                yield i, time.monotonic()
        except (GeneratorExit, asyncio.CancelledError):
            self.stopped.append(i)
            raise


def failing(n: int) -> Any:
    """Yields ``n`` items, then raises the user's own error."""
    yield from range(n)
    raise LookupError(f"no more after {n}")


async def dies_after(n: int) -> Any:
    """Yields ``n`` items, then waits for ever (the test kills the replica)."""
    for i in range(n):
        yield i
    await asyncio.Event().wait()


def pid_then_wait(n: int) -> Any:
    """Yields its process id ``n`` times, then waits for ever."""
    for _ in range(n):
        yield os.getpid()
    while True:
        time.sleep(1)


def plain(value: Any) -> Any:
    """Not a stream: answers once."""
    return value


def not_json_after(n: int) -> Any:
    """Yields ``n`` integers, then a set (picklable, but not JSON), then one more."""
    yield from range(n)
    yield {1, 2}
    yield n
