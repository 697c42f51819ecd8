"""The host's end of a stream: items as a replica sends them, read on trio or asyncio.

A runtime that streams (``stream(tag, query)``, see ``servecore.runtimes._protocol``)
returns an :class:`ItemStream`. The replica produces only against credit (see
``servecore.runtimes.toolkit.StreamRun``): the host grants ``window`` items when it
opens the stream and gives credit back as its consumer takes items, so the buffer
here never holds more than ``window`` items, and a slow consumer slows the producer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["ItemStream"]


class ItemStream:
    """The items of one stream, in order, then its end (on the loop that reads it:
    trio by default, asyncio with ``event=asyncio.Event``).

    The runtime calls :meth:`push` for each item and :meth:`end` once (with the error
    that ends it, if any); the consumer iterates (``async for item in stream``) and
    calls :meth:`close` if it stops early, which cancels the generator in the replica.
    Items already delivered are read before the error that ended the stream is raised.
    """

    def __init__(
        self,
        *,
        tag: str,
        grant: Callable[[int], object],
        cancel: Callable[[], object],
        grant_every: int = 1,
        event: Callable[[], Any] = trio.Event,
    ) -> None:
        self.tag = tag
        self._grant = grant
        self._cancel = cancel
        self._grant_every = max(1, grant_every)
        self._items: deque[Any] = deque()
        # trio's Event on trio; asyncio's (the same set/wait) on an asyncio loop.
        self._event = event
        self._wake = event()
        self._ended = False
        self._error: BaseException | None = None
        self._closed = False
        self._taken = 0  # consumed since the last grant
        #: Items the consumer has taken so far.
        self.delivered = 0

    @property
    def ended(self) -> bool:
        """Whether the replica ended the stream (or it was closed here)."""
        return self._ended or self._closed

    # -- the runtime's side -----------------------------------------------------------

    def push(self, item: Any) -> None:
        """One more item from the replica."""
        if self._ended or self._closed:
            return
        self._items.append(item)
        self._wake.set()

    def end(self, error: BaseException | None = None) -> None:
        """The stream ended: normally (``None``) or with ``error``. Idempotent."""
        if self._ended:
            return
        self._ended = True
        self._error = error
        self._wake.set()

    # -- the consumer's side ----------------------------------------------------------

    def __aiter__(self) -> ItemStream:
        return self

    async def __anext__(self) -> Any:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._items:
                item = self._items.popleft()
                self.delivered += 1
                if not self._ended:
                    self._taken += 1
                    if self._taken >= self._grant_every:
                        taken, self._taken = self._taken, 0
                        self._grant(taken)
                return item
            if self._ended:
                if self._error is not None:
                    error, self._error = self._error, None
                    self._closed = True
                    raise error
                raise StopAsyncIteration
            self._wake = self._event()
            await self._wake.wait()

    def take_buffered(self) -> list[Any]:
        """The items already here, without waiting (and credit given back for them)."""
        if self._closed or not self._items:
            return []
        items = list(self._items)
        self._items.clear()
        self.delivered += len(items)
        if not self._ended:
            self._taken += len(items)
            if self._taken >= self._grant_every:
                taken, self._taken = self._taken, 0
                self._grant(taken)
        return items

    def close(self) -> None:
        """Stop reading: a stream still running is cancelled in the replica."""
        if self._closed:
            return
        self._closed = True
        self._items.clear()
        if not self._ended:
            self._ended = True
            self._cancel()

    async def aclose(self) -> None:
        """:meth:`close`, for ``async with`` and ``contextlib.aclosing``."""
        self.close()
