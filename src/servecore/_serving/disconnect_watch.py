"""Cancelling an HTTP request's query when its client disconnects, on an asyncio loop.

A client that leaves before its answer should cancel its query (counted
``cancelled``, and an async target's task cancelled in its replica). Noticing that
takes a task reading the ASGI ``receive`` channel beside the query, and two tasks per
request (the query's and the watcher's) cost an ingress worker about a fifth of its
requests per second -- for requests that nearly all answer in a millisecond, long
before anybody could leave.

So a request runs its query in its own task, and :class:`DisconnectWatches` starts a
watcher only for requests still waiting after one to two :data:`WATCH_AFTER_S`: one
timer for all of them, a set to join and leave per request. A watcher that reads the
disconnect cancels the request's task and takes the cancellation back (as
``asyncio.timeout`` does), so the request ends quietly with :data:`GONE`. A client
that leaves sooner than that is noticed when its answer is written (the server drops
it), as a request with a shorter life needs nothing cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["GONE", "WATCH_AFTER_S", "DisconnectWatches", "Gone"]

#: How long a request waits before its client's connection is watched (seconds).
WATCH_AFTER_S = 0.05


class Gone:
    """The client disconnected before its answer (its query was cancelled)."""

    __slots__ = ()


GONE = Gone()


class _Watch:
    """One waiting request: its task, its ``receive``, and the watcher once started."""

    __slots__ = ("gone", "old", "receive", "task", "watcher")

    def __init__(self, task: asyncio.Task[Any] | None, receive: Callable[[], Awaitable[Any]]):
        self.task = task
        self.receive = receive
        self.old = False  # seen by one sweep: the next one starts its watcher
        self.gone = False
        self.watcher: asyncio.Task[None] | None = None

    async def watch(self) -> None:
        # Once the body is read, an ASGI server's next message is the disconnect;
        # anything else (or an error) means there is none to wait for.
        try:
            message = await self.receive()
        except Exception:
            return
        if message.get("type") == "http.disconnect" and self.task is not None:
            self.gone = True
            self.task.cancel()


class DisconnectWatches:
    """The requests of one asyncio loop that wait for their answers (see the module)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Kept: asyncio.get_running_loop() makes a getpid() system call each time.
        self._loop = loop
        self._waiting: set[_Watch] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def unless_gone(
        self,
        receive: Callable[[], Awaitable[Any]],
        call: Callable[[Any], Awaitable[Any]],
        arg: Any,
    ) -> Any:
        """``await call(arg)`` in the current task, or :data:`GONE` once the client
        disconnects (having cancelled it)."""
        task = asyncio.current_task(self._loop)
        watch = _Watch(task, receive)
        self._waiting.add(watch)
        if self._timer is None:
            self._timer = self._loop.call_later(WATCH_AFTER_S, self._sweep)
        try:
            return await call(arg)
        except asyncio.CancelledError:
            # Ours only if the watcher cancelled it and nobody else did as well.
            if watch.gone and task is not None and task.uncancel() == 0:
                return GONE
            raise
        finally:
            self._waiting.discard(watch)
            if watch.watcher is not None:
                watch.watcher.cancel()

    def _sweep(self) -> None:
        self._timer = None
        for watch in self._waiting:
            if watch.old:
                if watch.watcher is None:
                    watch.watcher = self._loop.create_task(watch.watch())
            else:
                watch.old = True
        if self._waiting:
            self._timer = self._loop.call_later(WATCH_AFTER_S, self._sweep)
