"""The replica actor: what runs in a Ray worker process.

Ray imports this module in its workers by the actor class's path, so it imports only
what a replica needs.

The actor sends each batch's results back pickled by itself (``bytes``, with the
subprocess replica's :func:`~servecore.runtimes.subprocess.wire.encode_results`), and
the host unpickles them on its trio thread with ``decode_reply``. Left to Ray, the
results would be unpickled on one of Ray's threads, where whatever unpickling raises is
out of the caller's reach: a ``SystemExit`` there ends that thread and the call never
completes. Bytes are all Ray has to decode, and that cannot fail.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import ray

from servecore._calls import Composer, ConnectComposer
from servecore._core.errors import DeadlineExceeded
from servecore.runtimes._protocol import Query
from servecore.runtimes.ray.errors import carry
from servecore.runtimes.subprocess.wire import encode_results
from servecore.runtimes.toolkit import (
    ReplicaCode,
    ReplicaLoop,
    StreamRun,
    prepare_replica_code,
    run_health_check,
)

__all__ = ["PROTOCOL", "ServecoreReplica"]

#: What this actor speaks, reported by ``ready()`` as ``"protocol"``. 5: ``run()``
#: takes each query's deadline (``run(batch, request_id, deadlines)``): user code reads
#: the time left (``servecore.time_remaining()``), and a batch whose every deadline has
#: passed when its turn comes is dropped unrun (:class:`~servecore.DeadlineExceeded`).
#: 4: a generator
#: target streams (``stream_open``, ``stream_credit`` and ``stream_cancel`` on the
#: control threads, ``stream_next`` on the default group's), and ``ready()`` says whether the
#: target streams and whether it may compose. 3: ``ready()``
#: and ``watch()`` run in the ``control`` concurrency group (never behind a query), and
#: ``ready()`` reports the replica's health-probe settings, where it runs and whether
#: its target is async (``run(batch, request_id)``, ``cancel(request_id)``). 2:
#: ``run()`` returns the batch's results pickled (``bytes``). Actors started by a
#: servecore before versions existed (1: ``run()`` returns the list itself, for Ray to
#: pickle) report none. Detached actors outlive an upgrade of the controller, which may
#: adopt them.
PROTOCOL = 5

#: The concurrency group of the runtime's own calls, and its threads: the long
#: ``watch()``, a ``watch(0)`` probe, an adoption's ``ready()`` and a spare.
CONTROL_GROUP = "control"
CONTROL_THREADS = 4


#: How many cancellations of calls not (yet) running a replica remembers.
_EARLY_CANCELS = 1024


class _Turns:
    """A lock taken in the order it was asked for: plain batches, one at a time, in the
    order Ray handed them to the replica's threads."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket whose turn it is

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc_info: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class _Running:
    """The async calls running in a replica, by request id, so that a caller who gave
    up can cancel one; a cancel that comes before its call is remembered (a few)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[str, concurrent.futures.Future[Any]] = {}
        self._cancelled: set[str] = set()  # running ones whose caller cancelled them
        self._early: collections.OrderedDict[str, None] = collections.OrderedDict()

    def add(self, request_id: str | None, future: concurrent.futures.Future[Any]) -> None:
        if request_id is None:
            return
        with self._lock:
            early = request_id in self._early
            if early:
                del self._early[request_id]
            else:
                self._futures[request_id] = future
        if early:
            with self._lock:
                self._cancelled.add(request_id)
            future.cancel()

    def remove(self, request_id: str | None) -> bool:
        """Forget call ``request_id``; return whether its caller cancelled it."""
        if request_id is None:
            return False
        with self._lock:
            self._futures.pop(request_id, None)
            if request_id in self._cancelled:
                self._cancelled.discard(request_id)
                return True
            return False

    def cancel(self, request_id: str) -> None:
        with self._lock:
            future = self._futures.pop(request_id, None)
            if future is not None:
                self._cancelled.add(request_id)
            else:
                self._early[request_id] = None
                while len(self._early) > _EARLY_CANCELS:
                    self._early.popitem(last=False)
        if future is not None:
            future.cancel()


class _Stream:
    """One stream being produced in this replica: the items pickled and waiting to be
    pulled (never more than the credit the caller granted), and how it ended."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: list[bytes] = []
        self.ended = False
        self.error: BaseException | None = None
        self.run: StreamRun | None = None

    def emit(self, blob: bytes) -> None:
        with self.cond:
            self.items.append(blob)
            self.cond.notify_all()

    def finish(self, error: BaseException | None, cancelled: bool) -> None:
        with self.cond:
            self.ended = True
            self.error = error
            self.cond.notify_all()

    def take(self, wait_s: float) -> tuple[list[bytes], bool]:
        """The items produced so far (waiting up to ``wait_s`` for one), and whether
        the stream is over; raises the error it ended with once its items are taken."""
        with self.cond:
            self.cond.wait_for(lambda: self.items or self.ended, timeout=wait_s)
            items, self.items = self.items, []
            if items or not self.ended:
                return items, False
            if self.error is not None:
                raise self.error
            return [], True


@ray.remote(concurrency_groups={CONTROL_GROUP: CONTROL_THREADS})  # type: ignore[call-overload]
class ServecoreReplica:
    """One replica: builds the user's object once, then runs batches on it.

    Batches (and the object's ``check_health()``) run in the default concurrency group,
    whose threads number the backend's ``max_concurrent_queries``: a plain target's
    batches take turns, one at a time in the order they came; an ``async def`` target's
    run concurrently on the replica's own asyncio loop (``toolkit.ReplicaLoop``), up to
    ``max_concurrent_queries`` at once, and ``cancel(request_id)`` cancels one's task.
    The runtime's own calls (``ready``, ``watch``, ``cancel``) run in the ``control``
    group, on threads of their own, so that a replica busy with a long query still
    answers its health probe and an adopting controller at once.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self._spec = spec
        self._lock = threading.Lock()
        self._compose: ConnectComposer | None = None
        self._compose_lock = threading.Lock()
        self._code: ReplicaCode | None = None
        self._error: BaseException | None = None
        self._turns = _Turns()
        self._running = _Running()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._late = 0  # batches dropped unrun, their deadline past

    def _build(self) -> ReplicaCode:
        with self._lock:
            if self._code is not None:
                return self._code
            if self._error is not None:
                raise self._error
            spec = self._spec
            try:
                self._code = prepare_replica_code(
                    spec["target"],
                    spec["init_args"],
                    spec["init_kwargs"],
                    backend=spec["backend"],
                    max_batch_size=spec["max_batch_size"],
                    user_config=spec["user_config"],
                    allow_async=True,
                    max_concurrent_queries=max(1, int(spec.get("max_concurrent_queries") or 1)),
                    composer=self._composer,
                )
            except Exception as exc:
                self._error = exc
                raise
            return self._code

    def _composer(self) -> Composer | None:
        """How replica code reaches other endpoints: a ``servecore.connect`` client of
        the controller's control socket, opened on the first nested call."""
        where = self._spec.get("control_socket")
        if not isinstance(where, str):
            return None
        with self._compose_lock:
            if self._compose is None:
                self._compose = ConnectComposer(where)
            return self._compose

    @ray.method(concurrency_group=CONTROL_GROUP)
    def ready(self) -> dict[str, Any]:
        """Build the replica object (once); return where it runs, whether it has a
        ``check_health()``, and its health-probe settings."""
        try:
            self._build()
        except Exception as exc:
            raise carry(exc) from None
        context = ray.get_runtime_context()
        return {
            "protocol": PROTOCOL,
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
            "actor_id": context.get_actor_id(),
            "health_check": self._code is not None and self._code.check_health is not None,
            "async": self._code is not None and self._code.loop is not None,
            "streams": self._code is not None and self._code.streams,
            "composes": isinstance(self._spec.get("control_socket"), str),
            "health_check_period_s": self._spec.get("health_check_period_s"),
            "health_check_timeout_s": self._spec.get("health_check_timeout_s"),
        }

    def check_health(self) -> bool:
        """Run the object's ``check_health()``: between batches, like a batch (an async
        one on the replica's loop), for at most the backend's ``health_check_timeout_s``
        once it has begun (its wait for its turn not counted): one that does not return
        by then raises ``TimeoutError``, a failed check."""
        code = self._code
        check = None if code is None else code.check_health
        if check is None:
            return False
        timeout = self._spec.get("health_check_timeout_s")
        bound = float(timeout) if isinstance(timeout, (int, float)) else None
        tag = self._spec["tag"]
        try:
            if code is not None and code.loop is not None:
                run_health_check(check, bound, tag)
            else:
                with self._turns:
                    run_health_check(check, bound, tag)
        except Exception as exc:
            raise carry(exc) from None
        return True

    def run(
        self,
        batch: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
        request_id: str | None = None,
        deadlines: Sequence[float | None] | None = None,
    ) -> bytes:
        """Run one batch of ``(args, kwargs)`` pairs; one result per query, in order,
        pickled (see the module docstring). A result pickle refuses raises
        :class:`~servecore.UnpicklableResult` naming its type. ``request_id`` names
        the call for :meth:`cancel` (async targets). ``deadlines`` (one per query,
        wall-clock seconds or ``None``; ``None``: no query has one) are checked when
        the batch's turn comes: a batch whose every deadline has passed raises
        :class:`~servecore.DeadlineExceeded` without running.

        Pairs, not :class:`Query` objects, cross the wire: Ray serializes plain tuples
        faster than objects it has to pickle.
        """
        try:
            code = self._code
            if code is None:
                code = self._build()
            if deadlines is None:
                queries = [Query(args=args, kwargs=kwargs) for args, kwargs in batch]
            else:
                queries = [
                    Query(args=args, kwargs=kwargs, deadline=deadline)
                    for (args, kwargs), deadline in zip(batch, deadlines, strict=True)
                ]
            if code.loop is not None and code.run_async is not None:
                results = self._run_async(code.loop, code.run_async, queries, request_id)
                if results is None:
                    return b""  # cancelled: its caller no longer waits for an answer
            else:
                with self._turns:
                    results = code.run(queries)
            return encode_results(self._spec["tag"], results, "ray")
        except DeadlineExceeded as exc:
            self._dropped_late(exc)
            raise carry(exc) from None
        except Exception as exc:
            raise carry(exc) from None

    def _dropped_late(self, exc: DeadlineExceeded) -> None:
        """Count (and log, in the worker's log) a batch whose deadline passed before it
        could begin."""
        with self._lock:
            self._late += 1
            n = self._late
        print(f"replica {self._spec['tag']} dropped a call: {exc} ({n} so far)", flush=True)

    def _run_async(
        self,
        loop: ReplicaLoop,
        run_async: Callable[[Sequence[Query]], Awaitable[list[Any]]],
        queries: list[Query],
        request_id: str | None,
    ) -> list[Any] | None:
        """Run an async target's batch as a task on the replica's loop; wait for it.
        ``None``: it was cancelled (:meth:`cancel`)."""
        future = loop.submit(lambda: run_async(queries))
        self._running.add(request_id, future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._running.remove(request_id):
                return None
            # The user's own code cancelled its task: that is its answer.
            raise RuntimeError("the query's task was cancelled inside the replica") from None
        finally:
            self._running.remove(request_id)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def cancel(self, request_id: str) -> None:
        """Cancel the task of call ``request_id`` (its caller gave up): the target sees
        ``asyncio.CancelledError``. One that has not begun yet is cancelled as it
        begins; one that ended is left alone."""
        self._running.cancel(request_id)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def stream_open(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], request_id: str, window: int
    ) -> bool:
        """Begin stream ``request_id`` of a generator target: it produces up to
        ``window`` items ahead of what the caller has taken (:meth:`stream_credit`
        gives more). Raises :class:`~servecore.StreamMismatch` for a target that does
        not stream. Returns at once (the generator runs on a thread of its own, or as
        a task on the replica's loop)."""
        try:
            code = self._code
            if code is None:
                code = self._build()
            stream = _Stream()
            tag = self._spec["tag"]

            def emit(item: Any) -> None:
                stream.emit(encode_results(tag, item, "ray"))

            run = code.open_stream(
                Query(args=args, kwargs=kwargs),
                window=window,
                emit=emit,
                finish=stream.finish,
            )
        except Exception as exc:
            raise carry(exc) from None
        stream.run = run
        with self._streams_lock:
            self._streams[request_id] = stream
        run.start()
        return True

    def stream_next(self, request_id: str, wait_s: float) -> tuple[list[bytes], bool]:
        """The items of stream ``request_id`` produced since the last call, each
        pickled (waiting up to ``wait_s`` for one), and whether the stream is over.
        Once its items are taken, a stream the user's code ended with an exception
        raises it here. An unknown (cancelled) stream is over.

        On the default group's threads: a generator target takes no batches, and each
        open stream holds one of its backend's ``max_concurrent_queries`` slots (the
        group's size) with at most one ``stream_next`` waiting, for ``wait_s`` at most.
        """
        with self._streams_lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return [], True
        try:
            items, done = stream.take(wait_s)
        except Exception as exc:
            self._forget_stream(request_id)
            raise carry(exc) from None
        except BaseException as exc:  # UserCodeEscaped is an Exception; this is not ours
            self._forget_stream(request_id)
            raise carry(RuntimeError(repr(exc))) from None
        if done:
            self._forget_stream(request_id)
        return items, done

    @ray.method(concurrency_group=CONTROL_GROUP)
    def stream_credit(self, request_id: str, n: int) -> None:
        """The caller took ``n`` more items of stream ``request_id``: produce as many."""
        with self._streams_lock:
            stream = self._streams.get(request_id)
        if stream is not None and stream.run is not None:
            stream.run.grant(n)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def stream_cancel(self, request_id: str) -> None:
        """The caller left stream ``request_id``: stop its generator and forget it."""
        stream = self._forget_stream(request_id)
        if stream is not None and stream.run is not None:
            stream.run.cancel()
            stream.finish(None, True)

    def _forget_stream(self, request_id: str) -> _Stream | None:
        with self._streams_lock:
            return self._streams.pop(request_id, None)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def watch(self, period_s: float) -> bool:
        """Return after ``period_s``; Ray fails the call if the actor dies first.
        ``watch(0)`` is the health probe: it answers at once if the process can."""
        time.sleep(period_s)
        return True
