"""Streams through the router: the items a generator target yields, as they come.

:meth:`servecore.router.Handle.stream` returns a :class:`HandleStream`, the consumer's
async iterator (with the handle's per-item timeout). Under it, :class:`RouterStream`
holds what the router keeps for one stream on the controller's trio thread: the replica
slot it takes for its whole life (given back when it ends or is closed), its query
statistics, and the resend of a stream that no replica began (docs/design.md §5).

Everything it asks of the router goes through :class:`~servecore.router.Router`'s public
methods. ``servecore.router`` imports this module (and re-exports
:class:`HandleStream`); this module refers to the router only for typing, so there is
no import cycle.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from servecore._core.errors import ReplicaDiedError
from servecore._serving.backend_routes import BackendState
from servecore._serving.router_stats import timed_outcome
from servecore.runtimes._protocol import Query

if TYPE_CHECKING:
    from servecore.handle import Handle
    from servecore.router import Router

__all__ = ["HandleStream", "RouterStream"]


class RouterStream:
    """A stream through the router: its replica slot, its statistics, resends of a
    stream no replica began (trio thread). :meth:`Router.open_stream` makes and opens
    it; :class:`HandleStream` reads it."""

    def __init__(self, router: Router, endpoint: str, b: BackendState, query: Query) -> None:
        self.router = router
        self.endpoint = endpoint
        self.backend = b
        self.query = query
        self.tag: str | None = None
        self.items: Any = None
        self.resends = 0
        self.finished = False
        self.started = time.perf_counter()

    async def open(self, timer: trio.CancelScope | None = None) -> None:
        """Take a replica slot and open the stream there (see :meth:`next` for ``timer``)."""
        try:
            self.tag, self.items = await self.router.open_on_replica(
                self.endpoint, self.backend, self.query
            )
        except BaseException as exc:
            self.finished = True
            self._record(timed_outcome(exc, timer))
            raise

    def _record(self, outcome: str) -> None:
        self.router.stats.record(
            self.endpoint, self.backend.tag, outcome, time.perf_counter() - self.started
        )

    def _finish(self, outcome: str) -> None:
        if self.finished:
            return
        self.finished = True
        if self.tag is not None:
            self.router.release_slot(self.backend, self.tag)
        self._record(outcome)

    async def next(self, timer: trio.CancelScope | None = None) -> Any:
        """The next item; ``StopAsyncIteration`` at the end. ``timer``: the cancel
        scope of the consumer's timeout, if any (see :meth:`Router.call`)."""
        while True:
            if self.finished:
                raise StopAsyncIteration
            try:
                return await self.items.__anext__()
            except StopAsyncIteration:
                self._finish("ok")
                raise
            except ReplicaDiedError as exc:
                tag = self.tag
                if exc.tag == tag and tag is not None:
                    self.router.mark_lost(self.backend, tag)
                    if self.items.delivered == 0 and self.router.may_resend(exc, self.resends):
                        # Refused unbegun (a draining replica): open it elsewhere.
                        self.resends += 1
                        self.router.release_slot(self.backend, tag)
                        self.tag = None
                        await self.open(timer)
                        continue
                self._finish("replica_died")
                raise
            except BaseException as exc:
                # The consumer gave up mid-wait (cancelled): stop the generator too.
                self.close(timed_outcome(exc, timer))
                raise

    def take_buffered(self) -> list[Any]:
        """The items that have already arrived, without waiting (and credit given back
        for them); none once the stream finished. An error that ended the stream is
        raised by the next :meth:`next`, after these."""
        take = getattr(self.items, "take_buffered", None)  # a runtime's own stream may not
        if self.finished or take is None:
            return []
        return take()  # type: ignore[no-any-return]

    def close(self, outcome: str = "cancelled") -> None:
        """Stop reading; a stream still running is cancelled in its replica."""
        if self.finished:
            return
        if self.items is not None:
            self.items.close()
        self._finish(outcome)


class HandleStream:
    """The items of one streamed query, as its replica yields them::

        async with handle.stream("a prompt") as tokens:
            async for token in tokens:
                ...

    The stream is opened on the first item asked for. Leaving the ``async with``
    block (or :meth:`aclose`, or dropping the object) before the end cancels the
    generator in the replica. A replica death mid-stream raises
    :class:`~servecore.ReplicaDiedError` after the items already delivered; a stream
    is never restarted. With ``timeout_s`` on the handle, each item must come within
    it (``TimeoutError``, and the stream is cancelled).
    """

    __slots__ = ("__weakref__", "_handle", "_query", "_stream")

    def __init__(self, handle: Handle, query: Query) -> None:
        self._handle = handle
        self._query = query
        self._stream: RouterStream | None = None

    def __aiter__(self) -> HandleStream:
        return self

    async def __anext__(self) -> Any:
        router = self._handle.router
        timeout_s = self._handle.timeout_s
        if timeout_s is None:
            return await self._next(router, None)
        with trio.move_on_after(timeout_s) as timer:
            return await self._next(router, timer)
        if self._stream is not None:
            self._stream.close("timed_out")
        raise TimeoutError(
            f"stream from endpoint {self._handle.endpoint!r} gave no item within {timeout_s}s"
        )

    async def _next(self, router: Router, timer: trio.CancelScope | None) -> Any:
        if self._stream is None:
            self._stream = await router.open_stream(self._handle.endpoint, self._query, timer)
        return await self._stream.next(timer)

    def take_buffered(self) -> list[Any]:
        """The items that have already arrived, without waiting: a consumer that
        handles several at once (the HTTP ingress writes them as one chunk) takes them
        after each :meth:`__anext__`. They came in time, so no timeout applies to them."""
        stream = self._stream
        return [] if stream is None else stream.take_buffered()

    async def aclose(self) -> None:
        """Stop reading: the generator in the replica is cancelled if still running."""
        self.close()

    def close(self) -> None:
        """:meth:`aclose` for the trio thread, without awaiting."""
        stream = self._stream
        if stream is not None:
            stream.close()

    async def __aenter__(self) -> HandleStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A consumer that broke out of its loop and dropped us: stop the generator.
        stream = self._stream
        if stream is not None and not stream.finished:
            self._handle.router.run_soon(stream.close)
