"""Queries from asyncio straight to subprocess replicas: an ingress worker's query path.

An ingress worker (:mod:`servecore._serving.worker`) serves HTTP on asyncio, with the
client of the controller (:mod:`servecore._serving.connect`: the table feed, load
reports, a :class:`~servecore.router.Router`) on trio as a guest of the same loop.
Entering trio costs a guest tick per query, which is most of a trivial query's cost;
so the common case stays on asyncio:

1. the backend is chosen by the client's router, from its current table
   (:meth:`~servecore.router.Router.direct_route`, which posts shadow copies to trio);
2. a replica slot is taken from the same per-backend counts the router keeps
   (:meth:`~servecore.router.Router.claim_direct`), so ``max_concurrent_queries``
   holds across both paths and the load reports count these queries too; a query
   naming a multiplexed model prefers a replica that served it lately;
3. the query goes over this loop's own connection to the replica
   (:mod:`servecore._serving.replica_links`).

When every replica of the backend is busy, the query waits in this module's FIFO queue
for the backend (bounded, with the router's, by ``max_queued_queries``:
:class:`~servecore.BackpressureError` past it) and takes the next slot given back: the
answer's own callback sends the next waiting query's frame, so a slot passes on
within the turn of the loop the answer came in. A timeout (a
:class:`~servecore._serving.asyncio_deadlines.Deadlines` timer) sends ``CANCEL`` and
frees the slot, or takes the query out of the queue. A
replica that refuses a query unbegun (draining), drains with it queued, or cannot be
reached is skipped and the query sent to another, up to
:data:`~servecore.router.MAX_RESENDS` times; a replica that dies mid-query gives
:class:`~servecore.ReplicaDiedError`, as on trio. Everything else -- an unknown
endpoint, no traffic, a backend with no replica (failing at once, or waking one from
zero), batching -- runs on trio through the router, unchanged: its answers and errors
are the router's own. Streams take the same path, holding their slot while they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from servecore._calls import MODEL_KEY
from servecore._core.errors import (
    BackpressureError,
    NoReplicaError,
    ReplicaDiedError,
    StreamMismatch,
)
from servecore._core.transitions import RoutingTable
from servecore._serving.asyncio_deadlines import Deadlines
from servecore._serving.backend_routes import BackendState, no_replica_why, waits_for_replicas
from servecore._serving.replica_links import ReplicaLink, ReplicaLinks
from servecore._serving.router_stats import outcome_of
from servecore.router import MAX_RESENDS, Router, model_of, never_ran
from servecore.runtimes._protocol import Query
from servecore.runtimes._streams import ItemStream

__all__ = ["AsyncioHandle", "AsyncioQueries", "AsyncioStream", "TrioRunner"]


class TrioRunner(Protocol):
    """Runs a trio function from asyncio and awaits its result (the worker's guest)."""

    async def run(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> Any: ...


#: What a waiter's future holds when the query must take trio's path instead (the
#: backend lost its last replica and may wake one from zero).
_TO_TRIO: Any = object()
#: What it holds when the waiter was handed a slot (``replica``) but its query was not
#: sent for it: a stream, or a replica with no connection open yet.
_GRANTED: Any = object()


class _Waiter:
    """One query (or stream, with no ``query``) on the asyncio path. Its ``future``
    gets the query's answer: sent by the waiter itself when it found a free slot, or,
    when it had to queue, sent for it by whoever gave the slot back (so a slot passes
    from one query to the next within the turn of the loop the answer came in)."""

    __slots__ = ("endpoint", "future", "last", "link", "model", "query", "replica", "request_id")

    def __init__(
        self,
        endpoint: str,
        query: Query | None,
        future: asyncio.Future[Any],
        model: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.query = query
        self.future = future
        #: The multiplexed model it is for: a replica that served it lately is preferred.
        self.model = model
        self.replica: str | None = None  # the slot it holds (counted), if any
        self.last: str | None = None  # the replica it was last handed
        self.link: ReplicaLink | None = None  # where its query went, if it went
        self.request_id = 0


class AsyncioQueries:
    """The asyncio query path of one client (see the module). ``router`` is the
    client's, ``links`` this loop's connections to the replicas, ``trio`` runs the
    router's own path for everything else. Call :meth:`on_table` after the router
    adopts each table, and count :meth:`waiting` in the client's load.

    ``direct=False`` sends every query and stream through trio's router: for replicas
    this loop cannot connect to (Ray actors, reached by the client's Ray driver)."""

    def __init__(
        self,
        router: Router,
        links: ReplicaLinks,
        trio: TrioRunner,
        loop: asyncio.AbstractEventLoop,
        *,
        direct: bool = True,
    ) -> None:
        self.direct = direct
        self.router = router
        self.loop = loop
        self.links = links
        self.trio = trio
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._deadlines = Deadlines(loop)

    # -- load and table changes --------------------------------------------------------

    def waiting(self) -> Mapping[str, int]:
        """Queries waiting here for a replica slot, by backend."""
        return {tag: len(q) for tag, q in self._waiting.items() if q}

    def on_table(self, table: RoutingTable) -> None:
        """The router adopted ``table``: hand new slots to waiting queries; fail (or
        pass to trio, for a backend that wakes from zero) those whose backend has no
        replica left."""
        for tag in list(self._waiting):
            self._pump(tag)

    def _pump(self, tag: str) -> None:
        queue = self._waiting.get(tag)
        if not queue:
            return
        b = self.router.backend_state(tag)
        if b is None or not b.live:
            while queue:
                w = queue.popleft()
                if w.future.done():
                    continue
                if b is not None and waits_for_replicas(b):
                    w.future.set_result(_TO_TRIO)
                else:
                    why = no_replica_why(b) if b is not None else f"backend {tag!r} was deleted"
                    w.future.set_exception(NoReplicaError(w.endpoint, why))
            return
        while queue:
            if queue[0].future.done():
                queue.popleft()
                continue
            replica = self.router.claim_direct(b, queue[0].model)
            if replica is None:
                return
            self._dispatch(b, queue.popleft(), replica)

    def _dispatch(self, b: BackendState, w: _Waiter, replica: str) -> None:
        """Hand ``replica``'s slot to waiter ``w``, sending its query if a connection
        is open (else ``w`` opens one itself when it wakes)."""
        w.replica = w.last = replica
        link = self.links.get(replica) if w.query is not None else None
        if link is None:
            w.future.set_result(_GRANTED)
            return
        try:
            self._send(b, w, link)
        except BaseException as exc:
            w.future.set_exception(exc)

    def _send(self, b: BackendState, w: _Waiter, link: ReplicaLink) -> None:
        """Send ``w``'s query on ``link`` (its slot taken); the slot is given back when
        the answer comes, or at once if it cannot be sent."""
        replica = w.replica
        assert replica is not None and w.query is not None
        try:
            w.request_id = link.send_call(
                w.query, w.future, functools.partial(self.release, b, replica)
            )
        except BaseException:
            w.replica = None
            self.release(b, replica)
            raise
        w.link = link

    def _abandon(self, b: BackendState, w: _Waiter) -> None:
        """``w``'s caller gave up (timeout, a client that left): its query is
        forgotten (``CANCEL``), its slot given back, or it leaves the queue."""
        if w.link is not None:
            w.link.forget_call(w.request_id)  # gives the slot back if still running
        elif w.replica is not None:
            replica, w.replica = w.replica, None
            self.release(b, replica)  # handed a slot it will not use
        else:
            w.future.cancel()
            queue = self._waiting.get(b.tag)
            if queue is not None:
                with contextlib.suppress(ValueError):
                    queue.remove(w)

    def _enqueue(self, b: BackendState, w: _Waiter) -> None:
        queue = self._waiting.setdefault(b.tag, deque())
        queued = len(queue) + b.n_waiting
        if queued >= self.router.max_queued_queries:
            raise BackpressureError(b.tag, queued, self.router.max_queued_queries)
        queue.append(w)

    def release(self, b: BackendState, replica: str) -> None:
        """Give back a replica slot; the next waiting query takes it."""
        self.router.release_direct(b, replica)
        if self._waiting.get(b.tag):
            self._pump(b.tag)

    async def take_slot(
        self, endpoint: str, b: BackendState, model: str | None = None
    ) -> str | None:
        """A replica slot of ``b`` (counted; one that served multiplexed ``model``
        lately if it has one free), waiting for one if need be; ``None`` when the
        stream must take trio's path."""
        replica = self.router.claim_direct(b, model)
        if replica is not None:
            return replica
        if not b.live or b.route.max_batch_size is not None or b.n_waiting:
            return None  # no replica (fail, or wake), batching, or trio's queue first
        w = _Waiter(endpoint, None, self.loop.create_future(), model)
        self._enqueue(b, w)
        try:
            answer = await w.future
        except BaseException:
            self._abandon(b, w)
            raise
        return None if answer is _TO_TRIO else w.replica

    def lost(self, b: BackendState, replica: str) -> None:
        """``replica`` died or refused a query: skip it from now on."""
        self.router.lost_direct(b, replica)
        if not b.live:
            self._pump(b.tag)

    # -- queries -----------------------------------------------------------------------

    def call(self, endpoint: str, query: Query, timeout_s: float | None = None) -> Awaitable[Any]:
        """Run one query on ``endpoint`` (await the result); ``TimeoutError`` past
        ``timeout_s``."""
        if not self.direct:  # the router times it out itself (counted timed_out)
            return self.trio.run(self.router.call_timed, endpoint, query, timeout_s)
        return self._call(endpoint, query, timeout_s)

    async def _call(self, endpoint: str, query: Query, timeout_s: float | None) -> Any:
        # One coroutine from the handle to the reply's future: each level of await
        # costs every query a frame to resume.
        deadline = None if timeout_s is None else self._deadlines.after(timeout_s)
        expired: bool | None = None  # asked once: Deadline.expired takes the cancel back
        router = self.router
        try:
            chosen = router.direct_route(endpoint, query)
            if chosen is None:
                return await self.trio.run(router.call_timed, endpoint, query, _left(query))
            tag, b = chosen
            if b is None:
                return await self.trio.run(router.call_timed, endpoint, query, _left(query), tag)
            started = time.perf_counter()
            resends = 0
            model = model_of(query)
            try:
                while True:
                    w = _Waiter(endpoint, query, self.loop.create_future(), model)
                    replica = router.claim_direct(b, model)
                    if replica is None:
                        if not b.live or b.route.max_batch_size is not None or b.n_waiting:
                            break  # no replica (fail, or wake), batching, or trio's queue first
                        self._enqueue(b, w)
                    else:
                        # Sent at once when a connection is open: no wake-up between.
                        self._dispatch(b, w, replica)
                    try:
                        answer = await w.future
                        while answer is _GRANTED:  # a slot, and no connection yet: open one
                            w.future = self.loop.create_future()
                            await self._open_and_send(b, w)
                            answer = await w.future
                    except ReplicaDiedError as exc:
                        if exc.tag != w.last:
                            raise
                        self.lost(b, exc.tag)
                        if not never_ran(exc) or resends >= MAX_RESENDS:
                            raise
                        resends += 1
                        continue
                    except BaseException:
                        self._abandon(b, w)
                        raise
                    if answer is _TO_TRIO:
                        break
                    router.stats.record(endpoint, tag, "ok", time.perf_counter() - started)
                    return answer
            except BaseException as exc:
                # Cancelled by its own timeout: timed_out, as on trio's path.
                expired = deadline is not None and deadline.expired()
                outcome = "timed_out" if expired else outcome_of(exc)
                router.stats.record(endpoint, tag, outcome, time.perf_counter() - started)
                raise
            return await self.trio.run(router.call_timed, endpoint, query, _left(query), tag)
        except asyncio.CancelledError:
            if expired is None:
                expired = deadline is not None and deadline.expired()
            if expired:
                raise TimeoutError(
                    f"query to endpoint {endpoint!r} got no answer within {timeout_s}s"
                ) from None
            raise
        finally:
            if deadline is not None:
                deadline.done()

    async def _open_and_send(self, b: BackendState, w: _Waiter) -> None:
        replica = w.replica
        assert replica is not None
        try:
            link = self.links.get(replica) or await self.links.open(replica)
        except BaseException:
            w.replica = None
            self.release(b, replica)
            raise
        self._send(b, w, link)

    async def open_stream(self, endpoint: str, query: Query) -> Any:
        """Open a stream on ``endpoint`` (a generator target); its items are read with
        ``__anext__``, and ``aclose`` stops it (see :class:`AsyncioStream`)."""
        router = self.router
        chosen = router.direct_route(endpoint, query) if self.direct else None
        b = chosen[1] if chosen is not None else None
        if chosen is not None and b is not None:
            if b.route.max_batch_size is not None:
                raise StreamMismatch(
                    f"of backend {b.tag!r} (it batches its queries)", streams=False
                )
            stream = AsyncioStream(self, endpoint, b, query)
            if await stream.open():
                return stream
        # Trio's path: the router's own stream, each item fetched through the guest.
        items = await self.trio.run(router.open_stream, endpoint, query)
        return _TrioStream(self.trio, items)


class AsyncioStream:
    """A stream on the asyncio path: its replica slot for its whole life, resent
    elsewhere if its replica refuses it before the first item."""

    def __init__(self, queries: AsyncioQueries, endpoint: str, b: BackendState, query: Query):
        self._queries = queries
        self._endpoint = endpoint
        self._backend = b
        self._query = query
        self._replica: str | None = None
        self._items: ItemStream | None = None
        self._resends = 0
        self._finished = False
        self._started = time.perf_counter()

    async def open(self) -> bool:
        """Take a slot and open the stream there; ``False`` if it must take trio's path."""
        queries, b = self._queries, self._backend
        while True:
            replica: str | None = None
            try:
                replica = await queries.take_slot(self._endpoint, b, model_of(self._query))
                if replica is None:
                    return False
                try:
                    link = queries.links.get(replica) or await queries.links.open(replica)
                    self._items = link.stream(self._query)
                except BaseException:
                    queries.release(b, replica)
                    raise
            except ReplicaDiedError as exc:
                if exc.tag == replica:
                    queries.lost(b, replica)
                    if never_ran(exc) and self._resends < MAX_RESENDS:
                        self._resends += 1
                        continue
                self._finish(outcome_of(exc))
                raise
            except BaseException as exc:
                self._finish(outcome_of(exc))
                raise
            self._replica = replica
            return True

    def _finish(self, outcome: str) -> None:
        if self._finished:
            return
        self._finished = True
        if self._replica is not None:
            self._queries.release(self._backend, self._replica)
            self._replica = None
        stats = self._queries.router.stats
        stats.record(
            self._endpoint, self._backend.tag, outcome, time.perf_counter() - self._started
        )

    def __aiter__(self) -> AsyncioStream:
        return self

    async def __anext__(self) -> Any:
        while True:
            if self._finished or self._items is None:
                raise StopAsyncIteration
            items = self._items
            try:
                return await items.__anext__()
            except StopAsyncIteration:
                self._finish("ok")
                raise
            except ReplicaDiedError as exc:
                replica = self._replica
                if exc.tag == replica and replica is not None:
                    self._queries.lost(self._backend, replica)
                    if never_ran(exc) and items.delivered == 0 and self._resends < MAX_RESENDS:
                        # Refused unbegun (a draining replica): open it elsewhere.
                        self._resends += 1
                        self._queries.release(self._backend, replica)
                        self._replica = None
                        if not await self.open():
                            self._finish("replica_died")
                            raise  # no replica left here to take it
                        continue
                self._finish("replica_died")
                raise
            except BaseException as exc:
                self.close(outcome_of(exc))
                raise

    def take_buffered(self) -> list[Any]:
        """The items that have already arrived, without waiting."""
        if self._finished or self._items is None:
            return []
        return self._items.take_buffered()

    def close(self, outcome: str = "cancelled") -> None:
        """Stop reading; a stream still running is cancelled in its replica."""
        if self._finished:
            return
        if self._items is not None:
            self._items.close()
        self._finish(outcome)

    async def aclose(self) -> None:
        """:meth:`close`, awaitable."""
        self.close()


class _TrioStream:
    """A router stream on trio, read from asyncio through the guest."""

    def __init__(self, trio: TrioRunner, items: Any) -> None:
        self._trio = trio
        self._items = items

    def __aiter__(self) -> _TrioStream:
        return self

    async def __anext__(self) -> Any:
        return await self._trio.run(self._items.next)

    async def aclose(self) -> None:
        await self._trio.run(_close, self._items)


def _left(query: Query) -> float | None:
    """The time left before ``query``'s deadline, for a query handed to trio's router:
    its own timer then fires first, so it counts ``timed_out`` (not ``cancelled``)."""
    deadline = query.deadline
    return None if deadline is None else max(0.0, deadline - time.time())


async def _close(items: Any) -> None:
    items.close()


class AsyncioHandle:
    """A handle on the asyncio path, as :class:`~servecore.router.Handle` is on trio:
    ``call``, ``stream`` and ``options(timeout_s=..., multiplexed_model_id=...)``."""

    __slots__ = ("_queries", "endpoint", "multiplexed_model_id", "timeout_s")

    def __init__(
        self,
        queries: AsyncioQueries,
        endpoint: str,
        *,
        timeout_s: float | None = None,
        multiplexed_model_id: str = "",
    ) -> None:
        if not isinstance(multiplexed_model_id, str):
            raise ValueError(
                f"multiplexed_model_id={multiplexed_model_id!r} must be a string (a model "
                f'id; "" for none)'
            )
        self._queries = queries
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.multiplexed_model_id = multiplexed_model_id

    @property
    def queries(self) -> AsyncioQueries:
        """The query path this handle sends through."""
        return self._queries

    def options(
        self, *, timeout_s: float | None = None, multiplexed_model_id: str | None = None
    ) -> AsyncioHandle:
        """A copy with ``timeout_s`` (``TimeoutError`` past it) and, if given,
        ``multiplexed_model_id``: the model its queries are for (kept from this handle
        when not given), as :meth:`servecore.router.Handle.options`."""
        model = self.multiplexed_model_id if multiplexed_model_id is None else multiplexed_model_id
        return AsyncioHandle(
            self._queries, self.endpoint, timeout_s=timeout_s, multiplexed_model_id=model
        )

    def call(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        """Run one query on the endpoint: ``await handle.call(x)`` is its result."""
        if self.multiplexed_model_id:
            # Carried as the controller's handle carries it: the runner strips it.
            kwargs[MODEL_KEY] = self.multiplexed_model_id
        timeout_s = self.timeout_s
        # The deadline travels with the query (the replica drops it unrun once past).
        deadline = None if timeout_s is None else time.time() + timeout_s
        return self._queries.call(
            self.endpoint, Query(args=args, kwargs=kwargs, deadline=deadline), timeout_s
        )

    def stream(self, *args: Any, **kwargs: Any) -> _HandleStream:
        """The items a generator target yields for one query (opened on the first
        item asked for; with ``timeout_s``, each item must come within it)."""
        if self.multiplexed_model_id:
            kwargs[MODEL_KEY] = self.multiplexed_model_id
        return _HandleStream(self, Query(args=args, kwargs=kwargs))


class _HandleStream:
    def __init__(self, handle: AsyncioHandle, query: Query) -> None:
        self._handle = handle
        self._query = query
        self._stream: Any = None
        self._closed = False

    def __aiter__(self) -> _HandleStream:
        return self

    async def __anext__(self) -> Any:
        timeout_s = self._handle.timeout_s
        if timeout_s is None:
            return await self._next()
        try:
            async with asyncio.timeout(timeout_s):
                return await self._next()
        except TimeoutError:
            await self.aclose("timed_out")
            raise TimeoutError(
                f"stream from endpoint {self._handle.endpoint!r} gave no item within {timeout_s}s"
            ) from None

    async def _next(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        if self._stream is None:
            handle = self._handle
            self._stream = await handle.queries.open_stream(handle.endpoint, self._query)
        return await self._stream.__anext__()

    def take_buffered(self) -> list[Any]:
        """The items that have already arrived, without waiting (none on trio's path)."""
        take = getattr(self._stream, "take_buffered", None)
        return [] if take is None or self._closed else take()

    async def aclose(self, outcome: str = "cancelled") -> None:
        """Stop reading: the generator in the replica is cancelled if still running
        (counted as ``outcome`` on the asyncio path)."""
        self._closed = True
        stream, self._stream = self._stream, None
        if isinstance(stream, AsyncioStream):
            stream.close(outcome)
        elif stream is not None:
            await stream.aclose()
