"""The router: where a query goes, when, and with whom (docs/design.md §5).

The router is fed only by ``UpdateRouter`` tables (it is a table listener of the
controller) and sends queries through the runtime's ``call(tag, batch)``. Everything
runs on the controller's trio thread, so no locks are needed. For each query:

1. **Backend** -- chosen by the endpoint's traffic weights with the injected
   ``random.Random`` (seed it for a reproducible split). An endpoint with one backend
   draws no random number. Each shadow backend then gets a copy with its proportion's
   probability; a copy's result and error are dropped, and it never delays the caller.
2. **Replica** -- the RUNNING replica with the fewest outstanding queries (ties go round
   robin). A replica takes at most ``max_concurrent_queries`` at once; a query that finds
   every replica full waits in the backend's FIFO queue, and past
   ``max_queued_queries`` waiting queries (default :data:`DEFAULT_MAX_QUEUED_QUERIES`)
   the call fails at once with :class:`~servecore.BackpressureError`.
3. **Batching** -- for a backend with ``max_batch_size`` set, queries queue up and are
   sent as one ``call(tag, batch)``. As in Ray Serve's original router, each replica
   runs one batch at a time: a free replica takes up to
   ``min(max_batch_size, max_concurrent_queries)`` waiting queries, as soon as that many
   wait or the oldest has waited ``batch_wait_timeout_s``. Under load batches grow by
   themselves while the replica is busy. Each query to a batching backend takes exactly
   one positional argument (see :mod:`servecore.runtimes.toolkit`).

Failing fast: a query to an endpoint with no traffic, or to a backend with no RUNNING
replica, raises :class:`~servecore.NoReplicaError` at once (and so do queued queries
when the last replica leaves the table) -- except for an autoscaling backend that may
scale to zero (``min_replicas=0``): there the query waits in the bounded queue and the
router's demand listeners are told at once, so the controller starts a replica without
waiting for its next load report. An unknown endpoint raises
:class:`~servecore.EndpointNotFound`. A replica removed from the table receives no new
query, while the queries it already has run to the end (the runtime drains it). A
replica that answers with :class:`~servecore.ReplicaDiedError` is skipped at once,
before the controller's new table arrives. A query the dying replica never began (the
runtime sets ``retry_safe = True`` on the error) is sent to another replica, up to
:data:`MAX_RESENDS` times; a query that may have run is never sent twice, and its
caller gets the ``ReplicaDiedError``.

Host threads: :meth:`Router.call_blocking` (behind :class:`~servecore.SyncHandle`)
sends a query from the calling thread straight to a free replica when the runtime
offers ``call_blocking`` (the threads and subprocess runtimes do), and through trio
otherwise. It is built on the direct-path methods (:meth:`Router.direct_route`,
:meth:`Router.claim_direct`, :meth:`Router.release_direct`,
:meth:`Router.lost_direct`), which an ingress worker's asyncio query path uses too
(``servecore._serving.asyncio_queries``): the backend chosen and the replica slots
counted here, the query sent by the caller's own means.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from servecore._calls import MODEL_KEY
from servecore._core.errors import (
    BackpressureError,
    ControllerClosed,
    DeadlineExceeded,
    EndpointNotFound,
    NoReplicaError,
    ReplicaDiedError,
    StreamMismatch,
)
from servecore._core.maps import Map
from servecore._core.transitions import RoutingTable
from servecore._serving.backend_routes import (
    BackendState,
    EndpointRoute,
    Waiter,
    no_replica_why,
    waits_for_replicas,
)
from servecore._serving.router_stats import (
    BackendLoad,
    QueryStats,
    RouterStatistics,
    outcome_of,
    timed_outcome,
)
from servecore.handle import Handle
from servecore.router_streams import HandleStream, RouterStream
from servecore.runtimes._protocol import Query, Runtime
from servecore.runtimes.toolkit import batch_argument

__all__ = [
    "DEFAULT_MAX_QUEUED_QUERIES",
    "MAX_RESENDS",
    "Handle",
    "HandleStream",
    "Router",
    "model_of",
    "never_ran",
]

log = logging.getLogger("servecore.router")

#: How often a query that a dying replica never began is sent to another replica. (A
#: runtime marks such an error with ``retry_safe = True``; any other query that met a
#: death is never sent twice, since it may have run.)
MAX_RESENDS = 3

#: Queries that may wait per backend (for a free replica, or to be batched) before
#: :class:`~servecore.BackpressureError`. Generous enough for bursts of a few hundred
#: callers, small enough that an overloaded backend pushes back within a few batches.
DEFAULT_MAX_QUEUED_QUERIES = 256

# Looked up once: the host-thread path calls them on every query.
_perf_counter = time.perf_counter
_get_ident = threading.get_ident


class Router:
    """Routes queries to replicas through a runtime; fed by the controller's tables.

    The controller makes one on first :meth:`~servecore.Controller.get_handle`; to
    inject a seeded random source or another queue bound, give it your own first::

        ctl.use_router(Router(ctl.runtime, rng=random.Random(42), max_queued_queries=64))
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        rng: random.Random | None = None,
        max_queued_queries: int = DEFAULT_MAX_QUEUED_QUERIES,
    ) -> None:
        if isinstance(max_queued_queries, bool) or not isinstance(max_queued_queries, int):
            raise TypeError(f"max_queued_queries={max_queued_queries!r} must be an integer")
        if max_queued_queries < 0:
            raise ValueError(f"max_queued_queries={max_queued_queries!r} must be >= 0")
        self.runtime = runtime
        self.rng = rng if rng is not None else random.Random()
        self.max_queued_queries = max_queued_queries
        self._endpoints: dict[str, EndpointRoute] = {}
        self._backends: dict[str, BackendState] = {}
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        # A runtime may run queries for host threads without trio (optional extension).
        self._direct: Callable[[str, Sequence[Query], float | None], list[Any] | None] | None
        self._direct = getattr(runtime, "call_blocking", None)
        self._closed = False
        # Set once the controller stepped down: every query raises what it makes.
        self._refusal: Callable[[], BaseException] | None = None
        #: Shadow copies sent, and how many of them failed (their errors are dropped).
        self.shadow_sent = 0
        self.shadow_failed = 0
        #: Queries by (endpoint, backend, outcome) and their latencies (for metrics).
        self.stats = QueryStats()
        self._demand_listeners: list[Callable[[str], None]] = []

    # -- wiring ---------------------------------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        """Run batches and shadow copies in ``nursery``; when it is cancelled (the
        controller closes), every waiting query fails instead of hanging."""
        self._nursery = nursery
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        nursery.start_soon(self._watch_close)

    async def _watch_close(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.close()

    def close(self) -> None:
        """Fail every waiting query and refuse new ones."""
        self._closed = True
        for b in self._backends.values():
            self._fail_waiting(b, "the controller is closed")

    def refuse(self, error: Callable[[], BaseException]) -> None:
        """Refuse every query from now on with ``error()``, and fail the queued ones
        with it: the controller stepped down, and its table may be stale. Queries
        already running on a replica finish."""
        self._refusal = error
        for b in self._backends.values():
            while b.waiting:
                w = b.waiting.popleft()
                if not w.done:
                    w.finish(error=error())
            b.n_waiting = 0

    def update(self, table: RoutingTable) -> None:
        """Adopt a routing table (the controller calls this on every ``UpdateRouter``)."""
        if self._refusal is not None:
            return  # stepped down: the table stays frozen, and refused
        endpoints: dict[str, EndpointRoute] = {}
        for name, ep in table.endpoints.items():
            old = self._endpoints.get(name)
            endpoints[name] = old if old is not None and old.endpoint is ep else EndpointRoute(ep)
        self._endpoints = endpoints
        backends: dict[str, BackendState] = {}
        for tag, route in table.backends.items():
            b = self._backends.get(tag)
            if b is None:
                b = BackendState(route)
            elif b.route is not route:
                b.set_route(route)
            backends[tag] = b
        for tag, b in self._backends.items():
            if tag not in backends:
                b.set_route(None)
                self._fail_waiting(b, f"backend {tag!r} was deleted")
        self._backends = backends
        for b in backends.values():
            if b.n_waiting:
                if b.live:
                    self._pump(b)
                elif not waits_for_replicas(b):
                    self._fail_waiting(b, no_replica_why(b))

    # -- load, for the autoscaler ---------------------------------------------------------

    def ongoing_queries(self) -> dict[str, int]:
        """Queries running on or queued for each backend now (what autoscaling samples)."""
        out: dict[str, int] = {}
        for tag, b in self._backends.items():
            with b.lock:
                running = sum(b.outstanding.values())
            out[tag] = running + b.n_waiting
        return out

    def add_demand_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(backend)`` (on the trio thread) whenever a query starts to wait
        for a backend that has no replica and may scale from zero."""
        self._demand_listeners.append(listener)

    def _wake(self, b: BackendState) -> None:
        for listener in self._demand_listeners:
            try:
                listener(b.tag)
            except Exception:
                log.exception("a demand listener failed; the query keeps waiting")

    def backends_of(self, endpoint: str) -> tuple[str, ...]:
        """The backends ``endpoint`` sends traffic to now (by its last table), or ``()``
        for an endpoint it does not know. Safe from any thread (a read of a tuple)."""
        ep = self._endpoints.get(endpoint)
        return () if ep is None else ep.tags

    def handle(self, endpoint: str) -> Handle:
        """A :class:`Handle` for ``endpoint`` (the endpoint is looked up per call)."""
        return Handle(self, endpoint)

    def statistics(self) -> RouterStatistics:
        """A frozen picture of the load now: queued and running queries per backend,
        and query totals by endpoint, backend and outcome."""
        loads = {}
        for tag, b in self._backends.items():
            with b.lock:
                running = {t: n for t, n in b.outstanding.items() if n > 0}
                live = tuple(b.live)
            loads[tag] = BackendLoad(
                tag=tag,
                replicas=live,
                queued=b.n_waiting,
                running=sum(running.values()),
                running_by_replica=Map(running),
            )
        return RouterStatistics(
            backends=Map(loads),
            queries=Map(self.stats.snapshot()[0]),
            shadow_sent=self.shadow_sent,
            shadow_failed=self.shadow_failed,
        )

    # -- queries --------------------------------------------------------------------------

    async def call_timed(
        self, endpoint: str, query: Query, timeout_s: float | None, backend: str | None = None
    ) -> Any:
        """:meth:`call` with a timeout (``TimeoutError``); ``backend`` if already chosen."""
        if self._refusal is not None:
            raise self._refusal()
        if timeout_s is None:
            return await self._call_on(endpoint, query, backend, None)
        with trio.move_on_after(timeout_s) as timer:
            return await self._call_on(endpoint, query, backend, timer)
        raise TimeoutError(f"query to endpoint {endpoint!r} got no answer within {timeout_s}s")

    async def _call_on(
        self, endpoint: str, query: Query, backend: str | None, timer: trio.CancelScope | None
    ) -> Any:
        if backend is None:
            return await self.call(endpoint, query, timer=timer)
        b = self._backends.get(backend)
        if b is None:
            raise NoReplicaError(endpoint, f"backend {backend!r} was deleted")
        started = time.perf_counter()
        try:
            result = await self._query(endpoint, b, query)
        except BaseException as exc:
            outcome = timed_outcome(exc, timer)
            self.stats.record(endpoint, backend, outcome, time.perf_counter() - started)
            raise
        self.stats.record(endpoint, backend, "ok", time.perf_counter() - started)
        return result

    async def call(
        self, endpoint: str, query: Query, *, timer: trio.CancelScope | None = None
    ) -> Any:
        """Send one query to ``endpoint``; return its result or raise its error.

        ``timer`` is the cancel scope of the caller's timeout, if it has one: a
        cancellation by it is counted ``timed_out``, any other ``cancelled``.
        """
        if self._refusal is not None:
            raise self._refusal()
        ep = self._endpoints.get(endpoint)
        if ep is None:
            raise EndpointNotFound(endpoint, tuple(sorted(self._endpoints)))
        if not ep.tags:
            raise NoReplicaError(
                endpoint, "it has no traffic; call set_traffic to send it to a backend"
            )
        tag = ep.choose(self.rng)
        for shadow_tag, proportion in ep.shadows:
            if proportion >= 1.0 or self.rng.random() < proportion:
                self._send_shadow(endpoint, shadow_tag, query)
        b = self._backends[tag]
        started = time.perf_counter()
        try:
            result = await self._call_backend(endpoint, b, query)
        except BaseException as exc:
            self.stats.record(
                endpoint, tag, timed_outcome(exc, timer), time.perf_counter() - started
            )
            raise
        self.stats.record(endpoint, tag, "ok", time.perf_counter() - started)
        return result

    async def _call_backend(self, endpoint: str, b: BackendState, query: Query) -> Any:
        # The hot path, inlined (one coroutine fewer): a free replica and no queue.
        route = b.route
        if self._closed or route.max_batch_size is not None or b.n_waiting:
            return await self._query(endpoint, b, query)
        rtag = b.acquire(route.max_concurrent_queries, model_of(query))
        if rtag is None:
            return await self._query(endpoint, b, query)
        try:
            results = await self.runtime.call(rtag, (query,))
        except ReplicaDiedError as exc:
            if exc.tag != rtag:
                raise
            self._lost_replica(b, rtag)
            if not never_ran(exc):
                raise
        else:
            return results[0]
        finally:
            self._release(b, rtag, 1)
        return await self._query(endpoint, b, query, 1)  # it never ran: send it again

    async def _query(self, endpoint: str, b: BackendState, query: Query, resends: int = 0) -> Any:
        if self._closed:
            raise NoReplicaError(endpoint, "the controller is closed")
        if b.route.max_batch_size is not None:
            return await self._query_batched(endpoint, b, query, resends)
        tag = None if b.n_waiting else b.acquire(b.route.max_concurrent_queries, model_of(query))
        if tag is None:
            tag = await self._wait_for_slot(endpoint, b, query)  # its slot comes counted
        return await self._send_one(endpoint, b, tag, query, resends)

    async def _send_one(
        self, endpoint: str, b: BackendState, tag: str, query: Query, resends: int
    ) -> Any:
        """Run ``query`` alone on replica ``tag`` (its slot already counted).

        A query that a dying replica never began goes to another replica, up to
        :data:`MAX_RESENDS` times; one that may have run is never sent twice.
        """
        try:
            results = await self.runtime.call(tag, (query,))
        except ReplicaDiedError as exc:
            if exc.tag != tag:
                raise
            self._lost_replica(b, tag)
            if not never_ran(exc) or resends >= MAX_RESENDS:
                raise
        else:
            return results[0]
        finally:
            self._release(b, tag, 1)
        return await self._query(endpoint, b, query, resends + 1)

    async def _wait_for_slot(self, endpoint: str, b: BackendState, query: Query) -> str:
        self._admit(endpoint, b)
        w = Waiter(endpoint, query, batched=False, arrival=0.0)
        b.waiting.append(w)
        b.n_waiting += 1
        # A host thread may have freed its slot after this task found none and before
        # the count above: it saw no queue, so posted no pump. Look again now.
        self._pump(b)
        try:
            await w.event.wait()
        except BaseException:
            if w.tag is not None:
                self._release(b, w.tag, 1)  # handed a slot it will not use
            elif not w.done:
                w.done = True
                b.n_waiting -= 1
            raise
        if w.error is not None:
            raise w.error
        assert w.tag is not None
        return w.tag

    async def _query_batched(
        self, endpoint: str, b: BackendState, query: Query, resends: int = 0
    ) -> Any:
        batch_argument(query, f"endpoint {endpoint!r}")  # reject a bad shape up front
        self._admit(endpoint, b)
        w = Waiter(endpoint, query, batched=True, arrival=trio.current_time())
        w.resends = resends
        b.waiting.append(w)
        b.n_waiting += 1
        try:
            tag = self._pump(b, own=w)
            if tag is not None:
                # A batch of just this query: run it in this task, like an unbatched one.
                return await self._send_one(endpoint, b, tag, query, resends)
            deadline = w.arrival + b.route.batch_wait_timeout_s
            if not w.dispatched and not w.done and deadline > trio.current_time():
                # Wait for a full batch, but no longer than the batch window: then this
                # query's own task sends whatever has gathered (no timer task needed).
                with trio.move_on_at(deadline):
                    await w.event.wait()
                if not w.dispatched and not w.done:
                    tag = self._pump(b, own=w)
                    if tag is not None:
                        return await self._send_one(endpoint, b, tag, query, resends)
            await w.event.wait()
        except BaseException:
            if not w.done:
                w.done = True
                if not w.dispatched:
                    b.n_waiting -= 1
            raise
        if w.error is not None:
            raise w.error
        return w.result

    def _admit(self, endpoint: str, b: BackendState) -> None:
        if not b.live and not waits_for_replicas(b):
            raise NoReplicaError(endpoint, no_replica_why(b))
        if b.n_waiting >= self.max_queued_queries:
            raise BackpressureError(b.tag, b.n_waiting, self.max_queued_queries)
        if not b.live:
            self._wake(b)

    # -- dispatch -------------------------------------------------------------------------

    def _release(self, b: BackendState, tag: str, n: int) -> None:
        b.add(tag, -n)
        if b.n_waiting:
            self._pump(b)

    def _lost_replica(self, b: BackendState, tag: str) -> None:
        b.mark_dead(tag)
        if not b.live and b.n_waiting and not waits_for_replicas(b):
            self._fail_waiting(b, no_replica_why(b))

    def _fail_waiting(self, b: BackendState, why: str) -> None:
        """Fail every query still queued on ``b`` with :class:`NoReplicaError`."""
        while b.waiting:
            w = b.waiting.popleft()
            if not w.done:
                w.finish(error=NoReplicaError(w.endpoint, why))
        b.n_waiting = 0

    def _pump(self, b: BackendState, own: Waiter | None = None) -> str | None:
        """Hand free replicas to the queries at the head of ``b``'s queue.

        If the batch formed is just ``own`` (the calling task's query), it is not sent:
        its replica tag is returned, slot counted, for the caller to run it itself.
        """
        waiting = b.waiting
        route = b.route
        while waiting:
            head = waiting[0]
            if head.done:
                waiting.popleft()
                continue
            if head.query.deadline is not None and _drop_late(b, head):
                continue
            if not head.batched:
                tag = b.acquire(route.max_concurrent_queries, model_of(head.query))
                if tag is None:
                    return None
                waiting.popleft()
                b.n_waiting -= 1
                head.tag = tag
                head.finish()
                continue
            # A batching replica runs one batch at a time. (Host threads never call a
            # batching backend directly, so picking without the lock is safe here.)
            tag = b.pick(1)
            if tag is None:
                return None
            size = max(1, min(route.max_batch_size or 1, route.max_concurrent_queries))
            if b.n_waiting < size and trio.current_time() < (
                head.arrival + route.batch_wait_timeout_s
            ):
                return None  # the head's own task comes back when its window closes
            batch: list[Waiter] = []
            while waiting and len(batch) < size:
                w = waiting[0]
                if w.done:
                    waiting.popleft()
                    continue
                if w.query.deadline is not None and _drop_late(b, w):
                    continue
                if not w.batched:
                    break
                waiting.popleft()
                w.dispatched = True
                batch.append(w)
            b.n_waiting -= len(batch)
            b.add(tag, len(batch))
            if len(batch) == 1 and batch[0] is own:
                own.done = True
                return tag
            self._spawn_batch(b, tag, batch)
        return None

    def _spawn_batch(self, b: BackendState, tag: str, batch: list[Waiter]) -> None:
        try:
            if self._nursery is None:
                raise RuntimeError("the router was not started")
            self._nursery.start_soon(self._run_batch, b, tag, batch)
        except RuntimeError:
            for w in batch:
                w.finish(error=NoReplicaError(w.endpoint, "the controller is closed"))
            b.add(tag, -len(batch))

    async def _run_batch(self, b: BackendState, tag: str, batch: list[Waiter]) -> None:
        try:
            results = await self.runtime.call(tag, [w.query for w in batch])
        except BaseException as exc:
            died_here = isinstance(exc, ReplicaDiedError) and exc.tag == tag
            if died_here:
                b.mark_dead(tag)
            again: list[Waiter] = []
            for w in batch:
                if died_here and never_ran(exc) and w.resends < MAX_RESENDS and not w.done:
                    w.resends += 1  # the batch never ran: queue it again, at the front
                    w.dispatched = False
                    again.append(w)
                elif isinstance(exc, trio.Cancelled):
                    w.finish(error=NoReplicaError(w.endpoint, "the controller closed mid-batch"))
                else:
                    w.finish(error=exc)
            if again:
                b.waiting.extendleft(reversed(again))
                b.n_waiting += len(again)
            self._release(b, tag, len(batch))
            if died_here:
                self._lost_replica(b, tag)
            if isinstance(exc, Exception):
                return
            raise
        if len(results) != len(batch):
            error = RuntimeError(
                f"runtime returned {len(results)} results for a batch of {len(batch)} "
                f"on replica {tag!r}"
            )
            for w in batch:
                w.finish(error=error)
        else:
            for w, result in zip(batch, results, strict=True):
                w.finish(result=result)
        self._release(b, tag, len(batch))

    # -- streams --------------------------------------------------------------------------

    async def open_stream(
        self, endpoint: str, query: Query, timer: trio.CancelScope | None = None
    ) -> RouterStream:
        """Open a stream on ``endpoint`` (a generator target): a replica slot is taken
        for the stream's whole life, and given back when it ends or is closed.

        Never batched and never shadowed. A replica that refuses it unbegun (draining)
        or cannot be reached passes it to another, as a query; once an item has
        arrived, a death ends the stream with :class:`~servecore.ReplicaDiedError`
        and it is never restarted.
        """
        if self._refusal is not None:
            raise self._refusal()
        ep = self._endpoints.get(endpoint)
        if ep is None:
            raise EndpointNotFound(endpoint, tuple(sorted(self._endpoints)))
        if not ep.tags:
            raise NoReplicaError(
                endpoint, "it has no traffic; call set_traffic to send it to a backend"
            )
        b = self._backends[ep.choose(self.rng)]
        if b.route.max_batch_size is not None:
            raise StreamMismatch(f"of backend {b.tag!r} (it batches its queries)", streams=False)
        if getattr(self.runtime, "stream", None) is None:
            raise StreamMismatch(
                f"of backend {b.tag!r} (its runtime {type(self.runtime).__name__} does not stream)",
                streams=False,
            )
        stream = RouterStream(self, endpoint, b, query)
        await stream.open(timer)
        return stream

    async def open_on_replica(
        self, endpoint: str, b: BackendState, query: Query
    ) -> tuple[str, Any]:
        """Take a slot on a replica of ``b`` and open the stream of ``query`` there;
        resend what a replica never began. Returns the replica's tag (its slot stays
        counted until :meth:`release_slot`) and the runtime's item iterator. Trio
        thread only."""
        resends = 0
        while True:
            if self._closed:
                raise NoReplicaError(endpoint, "the controller is closed")
            model = model_of(query)
            tag = None if b.n_waiting else b.acquire(b.route.max_concurrent_queries, model)
            if tag is None:
                tag = await self._wait_for_slot(endpoint, b, query)  # its slot comes counted
            try:
                items = await self.runtime.stream(tag, query)  # type: ignore[attr-defined]
            except ReplicaDiedError as exc:
                self._release(b, tag, 1)
                if exc.tag != tag:
                    raise
                self._lost_replica(b, tag)
                if not never_ran(exc) or resends >= MAX_RESENDS:
                    raise
                resends += 1
                continue
            except BaseException:
                self._release(b, tag, 1)
                raise
            return tag, items

    def release_slot(self, b: BackendState, replica: str) -> None:
        """Give back one slot counted on ``replica`` of ``b`` (a stream that ended);
        queries queued on ``b`` get it next. Trio thread only."""
        self._release(b, replica, 1)

    def mark_lost(self, b: BackendState, replica: str) -> None:
        """``replica`` of ``b`` answered :class:`~servecore.ReplicaDiedError` on the
        trio thread: skip it at once until the table drops it (and fail the queries
        queued on ``b`` if it was the last replica). Trio thread only."""
        self._lost_replica(b, replica)

    @staticmethod
    def may_resend(error: BaseException, resends: int) -> bool:
        """Whether what met ``error`` may go to another replica, having been resent
        ``resends`` times already: the runtime says it never began, and fewer than
        :data:`MAX_RESENDS` resends were made."""
        return never_ran(error) and resends < MAX_RESENDS

    def run_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the trio thread soon; nothing if the router never
        started or trio has finished. Safe from any thread (and from ``__del__``)."""
        token = self._token
        if token is not None:
            _post(token, fn, *args)

    # -- direct paths: queries sent outside trio ------------------------------------------

    def direct_route(self, endpoint: str, query: Query) -> tuple[str, BackendState | None] | None:
        """Choose the backend of a query sent outside trio (a host thread's, or an ingress
        worker's asyncio path) and post its shadow copies to trio. ``None`` when only
        trio's path can answer it (an unknown endpoint, no traffic, the router closed or
        refusing); the state is ``None`` for a backend no longer in the table. Safe from
        any thread; the backend is chosen once, so a query that then falls back to trio
        goes there with this backend (``call_timed(..., backend)``)."""
        ep = self._endpoints.get(endpoint)
        token = self._token
        if ep is None or not ep.tags or self._closed or self._refusal is not None or token is None:
            return None
        tag = ep.choose(self.rng)
        for shadow_tag, proportion in ep.shadows:
            if proportion >= 1.0 or self.rng.random() < proportion:
                _post(token, self._send_shadow, endpoint, shadow_tag, query)
        return tag, self._backends.get(tag)

    @staticmethod
    def claim_direct(b: BackendState, model: str | None = None) -> str | None:
        """A replica of ``b`` with a free slot, counted, for a query sent outside trio
        (preferring one that served multiplexed ``model`` lately); ``None`` when the
        query has to wait (a queue in trio, batching, or every replica at
        ``max_concurrent_queries``). Safe from any thread."""
        route = b.route
        if route.max_batch_size is not None or b.n_waiting:
            return None
        return b.acquire(route.max_concurrent_queries, model)

    def release_direct(self, b: BackendState, replica: str) -> None:
        """Give back the slot :meth:`claim_direct` counted on ``replica``; queries
        queued in trio get it next. Safe from any thread."""
        b.add(replica, -1)
        if b.n_waiting and self._token is not None:
            _post(self._token, self._pump_waiting, b)

    def lost_direct(self, b: BackendState, replica: str) -> None:
        """``replica`` answered :class:`~servecore.ReplicaDiedError` to a query sent
        outside trio: skip it at once, everywhere, until the table drops it. Safe from
        any thread."""
        b.mark_dead(replica)
        if self._token is not None:
            _post(self._token, self._lost_replica, b, replica)

    def backend_state(self, tag: str) -> BackendState | None:
        """The routing state of backend ``tag`` (its live replicas, their load), or
        ``None`` once it has left the table."""
        return self._backends.get(tag)

    # -- host threads ---------------------------------------------------------------------

    def call_blocking(self, endpoint: str, query: Query, timeout_s: float | None = None) -> Any:
        """Send one query from a host thread (never the trio thread), blocking.

        When the runtime offers ``call_blocking(tag, batch, timeout_s)`` (the threads
        runtime does) and the chosen backend has a free replica, no queue and no
        batching, the query goes from this thread straight to the replica, as with a
        thread pool; trio only hears about it if there is work to hand on (shadow
        copies, queued queries, a dead replica). Otherwise -- or if the runtime answers
        ``None``, meaning the replica took nothing because it is going away -- it enters
        trio and takes the ordinary path. The backend is chosen once either way.
        """
        token = self._token
        if token is None:
            raise RuntimeError("the router was not started; use it through a controller")
        if _get_ident() == self._trio_thread:
            raise RuntimeError("call_blocking() would block trio; use 'await handle.call()'")
        direct = self._direct
        chosen = self.direct_route(endpoint, query) if direct is not None else None
        if chosen is None or direct is None:
            return _from_thread(token, self.call_timed, endpoint, query, timeout_s)
        tag, b = chosen
        kwargs = query.kwargs  # model_of(query), without the call: this path is hot
        rtag = (
            None if b is None else self.claim_direct(b, kwargs.get(MODEL_KEY) if kwargs else None)
        )
        if b is None or rtag is None:
            return _from_thread(token, self.call_timed, endpoint, query, timeout_s, tag)
        started = _perf_counter()
        try:
            results = direct(rtag, (query,), timeout_s)
        except ReplicaDiedError as exc:
            if exc.tag != rtag or not never_ran(exc):
                self.stats.record(endpoint, tag, "replica_died", _perf_counter() - started)
            if exc.tag != rtag:
                raise
            self.lost_direct(b, rtag)
            if not never_ran(exc):
                raise
            results = None  # it never ran: route it again, in trio
        except TimeoutError:
            self.stats.record(endpoint, tag, "timed_out", _perf_counter() - started)
            raise TimeoutError(
                f"query to endpoint {endpoint!r} got no answer within {timeout_s}s"
            ) from None
        except BaseException as exc:
            self.stats.record(endpoint, tag, outcome_of(exc), _perf_counter() - started)
            raise
        finally:
            self.release_direct(b, rtag)
        if results is None:  # the replica is leaving the table: route again, in trio
            return _from_thread(token, self.call_timed, endpoint, query, timeout_s, tag)
        self.stats.record(endpoint, tag, "ok", _perf_counter() - started)
        return results[0]

    def _pump_waiting(self, b: BackendState) -> None:
        if b.n_waiting:
            self._pump(b)

    # -- shadow traffic -------------------------------------------------------------------

    def _send_shadow(self, endpoint: str, tag: str, query: Query) -> None:
        b = self._backends.get(tag)
        if b is None or self._nursery is None or self._closed:
            return
        self.shadow_sent += 1
        try:
            self._nursery.start_soon(self._shadow, endpoint, b, query)
        except RuntimeError:
            self.shadow_failed += 1

    async def _shadow(self, endpoint: str, b: BackendState, query: Query) -> None:
        try:
            await self._query(endpoint, b, query)
        except Exception as exc:
            # A shadow's result and error never reach the caller, by definition.
            self.shadow_failed += 1
            log.debug("shadow copy to backend %r failed: %r", b.tag, exc)


def _post(token: trio.lowlevel.TrioToken, fn: Callable[..., object], *args: Any) -> None:
    """Run ``fn(*args)`` on the trio thread soon, unless trio has already finished."""
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(fn, *args)


def _from_thread(
    token: trio.lowlevel.TrioToken, afn: Callable[..., Awaitable[Any]], *args: Any
) -> Any:
    """Run ``await afn(*args)`` in trio from a host thread and block for it."""
    try:
        return trio.from_thread.run(afn, *args, trio_token=token)
    except trio.RunFinishedError:
        raise ControllerClosed("the query") from None


def model_of(query: Query) -> str | None:
    """The multiplexed model id ``query`` is for, if any (a replica that served it
    recently is preferred; see ``BackendState.acquire``)."""
    kwargs = query.kwargs
    return kwargs.get(MODEL_KEY) if kwargs else None


def _drop_late(b: BackendState, w: Waiter) -> bool:
    """Drop ``w``, at the head of ``b``'s queue, if its deadline has passed: it fails
    with :class:`~servecore.DeadlineExceeded` (counted ``timed_out``) without running."""
    late = time.time() - w.query.deadline  # type: ignore[operator]
    if late < 0:
        return False
    b.waiting.popleft()
    b.n_waiting -= 1
    w.finish(error=DeadlineExceeded(f"the queue of backend {b.tag!r}", late))
    return True


def never_ran(error: BaseException) -> bool:
    """Whether the runtime says the query never began (so it is safe to send again)."""
    return getattr(error, "retry_safe", False) is True
