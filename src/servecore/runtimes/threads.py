"""The ``threads`` runtime: replicas are objects in the host process (docs/design.md §6).

Each replica is the user's object -- the target class instantiated with its
``init_args``/``init_kwargs``, or a plain function -- owned by a worker thread of its
own. The worker builds the object (so a constructor runs on the thread that will serve
it), then serves one batch at a time in arrival order. One slow replica never stalls
another, and the trio thread never runs user code.

How a replica dies (threads cannot be killed, so death is decided, not observed):

* **Health check.** If the object has a ``check_health()`` method, the worker calls it
  between queries, at most every ``health_check_period_s`` (and while idle). If it
  raises, the replica is dead.
* **Crash.** If user code lets a ``BaseException`` that is not an ``Exception`` escape
  (``SystemExit``, ``KeyboardInterrupt``), the worker ends and the replica is dead, as
  a process would be.
* **kill(tag).** An operator (or a test) may declare a replica dead.

On death every query still waiting on that replica fails at once with
:class:`~servecore.ReplicaDiedError` -- including one whose user code is still
running, which is left to finish on its abandoned thread with its result dropped --
and ``ReplicaDied`` is reported to the controller, which replaces the replica.

Stopping is graceful: the replica takes no new query, finishes those already queued
on it, and is abandoned (its queued queries fail with ``ReplicaDiedError``) if that
takes longer than ``timeout_s``. If the object has ``user_config`` set in its backend
config and a ``reconfigure(user_config)`` method, that is called once after
construction. The threads runtime knows no ``runtime_options``; any key is rejected.

Async targets (``async def``, see ``servecore.runtimes.toolkit``) run on an asyncio
loop the replica owns, on a thread of its own (``servecore.runtimes.toolkit.ReplicaLoop``):
the worker thread hands each batch to the loop without waiting for it, so up to
``max_concurrent_queries`` of them run at once. A caller that gives up (a cancelled
query, a handle's timeout) cancels its task on the loop: the target sees
``asyncio.CancelledError``. A stop drains the tasks in flight like queued queries; a
death cancels them.

Round trips: a trio caller waits on a pooled ``eventfd`` (a socket pair off Linux) that
the worker signals, which wakes it straight from trio's I/O manager. A host thread
(a synchronous handle) may skip trio altogether with :meth:`ThreadRuntime.call_blocking`,
an optional extension of the Runtime protocol that the router uses when it can.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import outcome
import trio

from servecore._core.errors import InvalidConfig, ReplicaDiedError
from servecore._core.transitions import ReplicaDied, StartReplica
from servecore.runtimes._protocol import Query, Report
from servecore.runtimes._streams import ItemStream
from servecore.runtimes._waker import Waker
from servecore.runtimes.toolkit import (
    DEFAULT_STREAM_WINDOW,
    ReplicaCode,
    StreamRun,
    UserCodeEscaped,
    prepare_replica_code,
)

__all__ = ["ThreadRuntime"]

log = logging.getLogger("servecore.runtimes.threads")

#: Options this runtime accepts in ``BackendConfig.runtime_options``: none.
KNOWN_RUNTIME_OPTIONS: frozenset[str] = frozenset()


#: At most this many wakers (file descriptors) per runtime; calls beyond that many in
#: flight at once are woken through ``run_sync_soon`` instead (a little slower).
MAX_WAKERS = 128


class _Job:
    """One batch on its way through a replica, and how to wake whoever waits for it."""

    __slots__ = (
        "answered",
        "batch",
        "done",
        "finished",
        "future",
        "lock",
        "outcome",
        "started",
        "task",
        "waker",
    )

    def __init__(self, batch: Sequence[Query], waker: Waker | None) -> None:
        self.batch = batch
        self.waker = waker
        self.task: trio.lowlevel.Task | None = None  # woken by reschedule when no waker
        self.lock: threading.Lock | None = None  # held while a host thread waits (blocking)
        self.outcome: outcome.Outcome[Any] | None = None
        # (trio) the caller was answered or gave up; the worker skips it if not begun.
        self.done = False
        # Someone (the worker, or a death) set `outcome`; under the replica's admit_lock.
        self.answered = False
        # (worker) the worker will not touch this job (nor signal its waker) again.
        self.finished = False
        # (worker) the user code was (about to be) called: not safe to run it elsewhere.
        self.started = False
        # (worker) an async target's task on the replica's loop; cancelled when the
        # caller gives up.
        self.future: concurrent.futures.Future[list[Any]] | None = None

    def give_up(self) -> None:
        """The caller stopped waiting: skip the job if not begun, cancel its task if
        it runs on a loop (the worker checks `done` again after setting `future`)."""
        self.done = True
        future = self.future
        if future is not None:
            future.cancel()


_CHECK_HEALTH = object()  # sentinel: the idle wait ran out, time for a health check


class _Replica:
    """A replica's record. Fields marked (trio) are touched on the trio thread only."""

    def __init__(self, effect: StartReplica) -> None:
        self.effect = effect
        self.tag = effect.tag
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.jobs: set[_Job] = set()  # unanswered jobs (host threads add theirs too)
        self.ready = trio.Event()  # (trio) construction finished, either way
        self.start_error: BaseException | None = None  # (trio)
        self.finished = trio.Event()  # (trio) the worker thread has returned
        # Takes new queries. Written on the trio thread under admit_lock, so that a host
        # thread's check-and-enqueue (call_blocking) never slips in behind a stop. The
        # lock also makes a job's answer (the worker's, or a death's) happen only once.
        self.accepting = False
        self.admit_lock = threading.Lock()
        self.stopping = False  # (trio) a stop was asked for: its death is not news
        # Read by the worker thread; written once, on the trio thread.
        self.dead = False
        self.thread: threading.Thread | None = None
        self.code: ReplicaCode | None = None  # (worker) set once built
        # (trio) streams still open, and their producers (to cancel on a death)
        self.streams: dict[ItemStream, StreamRun] = {}
        self.streams_idle = trio.Event()  # (trio) set whenever no stream is open
        self.streams_idle.set()


class ThreadRuntime:
    """Replicas as objects in this process, each served by its own worker thread.

    ``health_check_period_s`` is how often a replica's optional ``check_health()`` runs
    (between queries, on the replica's own thread). Give it through the controller::

        servecore.open_controller(runtime="threads",
                                  runtime_kwargs={"health_check_period_s": 1.0})
    """

    #: Serves ``async def`` targets (on a loop per replica); the controller refuses
    #: async targets at ``create_backend`` for runtimes that do not say this.
    supports_async_targets = True
    #: Serves generator targets through :meth:`stream`.
    supports_streaming = True

    def __init__(self, *, health_check_period_s: float = 10.0) -> None:
        if not health_check_period_s > 0:
            raise ValueError(
                f"health_check_period_s={health_check_period_s!r} must be a number > 0"
            )
        self.health_check_period_s = float(health_check_period_s)
        self._replicas: dict[str, _Replica] = {}
        self._report: Report | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.namespace: str | None = None
        self._wakers: list[Waker] = []  # (trio) clean, ready to reuse
        self._dirty: list[_Job] = []  # (trio) jobs whose waker a worker may still signal
        self._n_wakers = 0
        #: What replica code reaches other endpoints through (``servecore.get_handle``):
        #: the controller's router, attached when it makes one.
        self._composer: _RouterComposer | None = None

    def attach_router(self, router: Any) -> None:
        """Let replica code call endpoints through ``router`` (the controller's)."""
        self._composer = _RouterComposer(router)

    # -- the Runtime protocol -------------------------------------------------------------

    async def open(self, *, namespace: str, report: Report) -> None:
        """Attach to a controller; deaths are reported to ``report`` on this trio thread."""
        self.namespace = namespace
        self._report = report
        self._token = trio.lowlevel.current_trio_token()

    async def close(self) -> None:
        """Stop every replica (each drains within its backend's graceful timeout)."""
        self._report = None
        async with trio.open_nursery() as nursery:
            for rep in list(self._replicas.values()):
                nursery.start_soon(
                    self.stop_replica, rep.tag, rep.effect.config.graceful_shutdown_timeout_s
                )
        # Pooled wakers are idle and no worker can signal them: give their fds back.
        # (A waker whose job an abandoned thread still holds stays open, on purpose.)
        self._new_waker_reclaim()
        for waker in self._wakers:
            trio.lowlevel.notify_closing(waker.fileno)
            waker.close()
        self._n_wakers -= len(self._wakers)
        self._wakers.clear()

    async def start_replica(self, effect: StartReplica) -> None:
        """Build the replica on its own thread; return when it is ready to serve.

        Idempotent by tag. A constructor (or import) failure is raised as the user's own
        exception; unknown ``runtime_options`` and ``max_batch_size`` on a target not
        marked ``@servecore.batch`` raise :class:`~servecore.InvalidConfig`.
        """
        unknown = sorted(set(effect.config.runtime_options) - KNOWN_RUNTIME_OPTIONS)
        if unknown:
            raise InvalidConfig(
                "runtime_options",
                effect.config.runtime_options,
                f"the threads runtime knows no runtime options "
                f"(known: {sorted(KNOWN_RUNTIME_OPTIONS) or 'none'}); remove {unknown}",
                backend=effect.backend,
            )
        rep = self._replicas.get(effect.tag)
        if rep is not None and (rep.dead or rep.start_error is not None):
            del self._replicas[effect.tag]  # a failed or dead attempt: start afresh
            rep = None
        if rep is None:
            if self._token is None:
                raise RuntimeError("ThreadRuntime.start_replica() called before open()")
            rep = self._replicas[effect.tag] = _Replica(effect)
            rep.thread = threading.Thread(
                target=self._serve,
                args=(rep, self._token),
                name=f"servecore-replica-{effect.tag}",
                daemon=True,  # a stuck user call must not keep the host alive
            )
            rep.thread.start()
        await rep.ready.wait()
        if rep.start_error is not None:
            raise rep.start_error
        if rep.dead:
            raise ReplicaDiedError(rep.tag, "it died as it started")

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        """Take no new query, drain those queued, then stop; abandon after ``timeout_s``."""
        rep = self._replicas.get(tag)
        if rep is None:
            return
        with trio.move_on_after(timeout_s):
            if not rep.stopping:
                rep.stopping = True
                with rep.admit_lock:
                    rep.accepting = False
                # Streams drain first: the worker's end closes an async replica's loop.
                await rep.streams_idle.wait()
                rep.inbox.put(None)  # after every query already queued: FIFO drains them
            await rep.finished.wait()
        if not rep.finished.is_set():
            log.warning(
                "replica %s did not drain within %ss; abandoning its thread", tag, timeout_s
            )
            self._fail(rep, f"stopped: it did not finish its queries within {timeout_s}s")
        if self._replicas.get(tag) is rep:
            del self._replicas[tag]

    async def list_replicas(self) -> frozenset[str]:
        """Tags of replicas started here and not yet dead or stopped."""
        return frozenset(
            tag
            for tag, rep in self._replicas.items()
            if not rep.dead and rep.start_error is None and rep.ready.is_set()
        )

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        """Run ``batch`` on replica ``tag``'s thread; one result per query, in order."""
        rep = self._replicas.get(tag)
        if rep is None or not rep.accepting:
            why = "it is stopping" if rep is not None and rep.stopping else "it is not alive"
            raise _not_run(tag, f"the threads runtime cannot serve it: {why}")
        waker = self._wakers.pop() if self._wakers else self._new_waker()
        job = _Job(batch, waker)
        rep.jobs.add(job)
        if waker is None:
            job.task = trio.lowlevel.current_task()
            rep.inbox.put(job)

            def abort(_: Any) -> trio.lowlevel.Abort:
                # The caller gave up (timeout or cancel). The worker skips the job if it
                # has not begun; otherwise its result is dropped when it arrives.
                job.give_up()
                rep.jobs.discard(job)
                return trio.lowlevel.Abort.SUCCEEDED

            result: list[Any] = await trio.lowlevel.wait_task_rescheduled(abort)
            return result
        rep.inbox.put(job)
        try:
            await trio.lowlevel.wait_readable(waker.fileno)
        except BaseException:
            job.give_up()  # the caller gave up; its result, if any, is dropped
            rep.jobs.discard(job)
            self._dirty.append(job)
            raise
        job.done = True
        rep.jobs.discard(job)
        waker.drain()
        self._wakers.append(waker)  # answered once, signalled once: clean again
        assert job.outcome is not None
        answer: list[Any] = job.outcome.unwrap()
        return answer

    async def stream(
        self, tag: str, query: Query, window: int = DEFAULT_STREAM_WINDOW
    ) -> ItemStream:
        """Open a stream of a generator target on replica ``tag``: its items, as the
        generator yields them, at most ``window`` ahead of the consumer."""
        rep = self._replicas.get(tag)
        if rep is None or not rep.accepting or rep.code is None or self._token is None:
            why = "it is stopping" if rep is not None and rep.stopping else "it is not alive"
            raise _not_run(tag, f"the threads runtime cannot serve it: {why}")
        token = self._token

        def post(fn: Callable[..., object], *args: Any) -> None:
            try:  # noqa: SIM105
                token.run_sync_soon(fn, *args)
            except trio.RunFinishedError:
                pass

        run: StreamRun | None = None

        def grant(n: int) -> None:
            if run is not None:
                run.grant(n)

        def cancel() -> None:
            if run is not None:
                run.cancel()

        items = ItemStream(tag=tag, grant=grant, cancel=cancel)

        def finish(error: BaseException | None, cancelled: bool) -> None:
            post(self._stream_ended, rep, items, error)

        # Raises StreamMismatch at once for a target that does not stream.
        run = rep.code.open_stream(
            query, window=window, emit=lambda item: post(items.push, item), finish=finish
        )
        rep.streams[items] = run
        rep.streams_idle = trio.Event()
        run.start()
        return items

    def _stream_ended(self, rep: _Replica, items: ItemStream, error: BaseException | None) -> None:
        if rep.streams.pop(items, None) is None:
            return  # a death ended it already
        if not rep.streams:
            rep.streams_idle.set()
        if isinstance(error, UserCodeEscaped):
            items.end(ReplicaDiedError(rep.tag, str(error)))
            self._died(rep, str(error))
            return
        items.end(error)

    def _new_waker_reclaim(self) -> None:
        """Put back in the pool the wakers of abandoned jobs no worker can signal now."""
        still: list[_Job] = []
        for job in self._dirty:
            if job.finished and job.waker is not None:
                job.waker.drain()
                self._wakers.append(job.waker)
            else:
                still.append(job)
        self._dirty = still

    def _new_waker(self) -> Waker | None:
        if self._dirty:
            self._new_waker_reclaim()
            if self._wakers:
                return self._wakers.pop()
        if self._n_wakers >= MAX_WAKERS:
            return None
        self._n_wakers += 1
        return Waker()

    def call_blocking(
        self, tag: str, batch: Sequence[Query], timeout_s: float | None = None
    ) -> list[Any] | None:
        """Run ``batch`` on replica ``tag`` from a host thread (not the trio thread),
        blocking until it is done: the round trip of a thread pool, without trio.

        An optional extension of the Runtime protocol, which the router uses to serve
        synchronous handles directly. Returns ``None`` without running anything if the
        replica takes no queries (any more), so the caller may route the query again;
        raises ``TimeoutError`` after ``timeout_s``, and ``ReplicaDiedError`` if the
        replica dies with the query.
        """
        rep = self._replicas.get(tag)
        if rep is None:
            return None
        lock = threading.Lock()
        lock.acquire()
        job = _Job(batch, None)
        job.lock = lock
        with rep.admit_lock:
            if not rep.accepting:
                return None
            rep.jobs.add(job)
            rep.inbox.put(job)
        if not lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
            job.give_up()  # the worker skips it if it has not begun
            rep.jobs.discard(job)
            raise TimeoutError(f"replica {tag!r} gave no answer within {timeout_s}s")
        job.done = True
        rep.jobs.discard(job)
        assert job.outcome is not None
        answer: list[Any] = job.outcome.unwrap()
        return answer

    # -- operations -----------------------------------------------------------------------

    def kill(self, tag: str, reason: str = "killed") -> None:
        """Declare replica ``tag`` dead now (call on the trio thread).

        Its waiting queries fail with :class:`~servecore.ReplicaDiedError` at once, and
        ``ReplicaDied`` is reported so the controller replaces it. User code already
        running finishes on the abandoned thread; its result is dropped.
        """
        rep = self._replicas.get(tag)
        if rep is not None and not rep.dead:
            self._died(rep, reason)

    # -- trio-thread side -----------------------------------------------------------------

    def _deliver(self, rep: _Replica, job: _Job) -> None:
        """Wake a caller that waits without a waker (posted by the worker)."""
        if job.done or job.task is None:
            return
        job.done = True
        rep.jobs.discard(job)
        assert job.outcome is not None
        trio.lowlevel.reschedule(job.task, job.outcome)

    def _fail(self, rep: _Replica, reason: str) -> None:
        """Declare ``rep`` dead and answer every query it has not answered yet."""
        to_wake: list[_Job] = []
        with rep.admit_lock:
            rep.dead = True
            rep.accepting = False
            rep.inbox.put(None)  # wake an idle worker so its thread ends
            for job in list(rep.jobs):
                if job.done or job.answered:
                    continue
                # Marked dead first, then `started` read: see _serve_inbox.
                if job.started:
                    error = ReplicaDiedError(rep.tag, reason)
                else:
                    error = _not_run(rep.tag, reason)
                job.outcome = outcome.Error(error)
                job.answered = True
                to_wake.append(job)
        rep.jobs.clear()
        streams, rep.streams = rep.streams, {}
        for items, run in streams.items():
            run.cancel()
            items.end(ReplicaDiedError(rep.tag, reason))
        rep.streams_idle.set()
        code = rep.code
        if code is not None:
            code.close()  # cancels what still runs on an async replica's loop
        for job in to_wake:
            if job.waker is not None:
                job.waker.signal()
            elif job.lock is not None:
                _unlock(job.lock)
            else:
                self._deliver(rep, job)

    def _died(self, rep: _Replica, reason: str) -> None:
        if rep.dead:
            return
        news = not rep.stopping
        self._fail(rep, reason)
        if self._replicas.get(rep.tag) is rep and not rep.stopping:
            del self._replicas[rep.tag]
        if news and rep.ready.is_set() and self._report is not None:
            # The controller logs each death once (servecore.lifecycle, WARNING).
            log.debug("replica %s died: %s", rep.tag, reason)
            self._report(ReplicaDied(tag=rep.tag, reason=reason))

    def _on_started(self, rep: _Replica, error: BaseException | None) -> None:
        rep.start_error = error
        with rep.admit_lock:
            rep.accepting = error is None and not rep.stopping and not rep.dead
        rep.ready.set()

    def _on_finished(self, rep: _Replica, death: str | None) -> None:
        if death is not None:
            self._died(rep, death)
        if not rep.ready.is_set():
            rep.ready.set()
        rep.finished.set()

    # -- worker-thread side ---------------------------------------------------------------

    def _serve(self, rep: _Replica, token: trio.lowlevel.TrioToken) -> None:
        """The body of a replica's thread: build the object, then serve its inbox."""

        def post(fn: Callable[..., object], *args: Any) -> None:
            try:  # noqa: SIM105 - the hot path; contextlib.suppress costs more
                token.run_sync_soon(fn, *args)
            except trio.RunFinishedError:
                pass  # the controller's trio run is over; nobody is waiting

        death: str | None = None
        try:
            effect = rep.effect
            try:
                code = prepare_replica_code(
                    effect.target,
                    effect.init_args,
                    effect.init_kwargs,
                    backend=effect.backend,
                    max_batch_size=effect.config.max_batch_size,
                    user_config=effect.config.user_config,
                    allow_async=True,
                    max_concurrent_queries=effect.config.max_concurrent_queries,
                    composer=lambda: self._composer,
                )
            except Exception as exc:
                post(self._on_started, rep, exc)
                return
            except BaseException as exc:
                # SystemExit & co. must not unwind the controller's trio thread.
                error = RuntimeError(f"{type(exc).__name__} escaped the constructor: {exc}")
                post(self._on_started, rep, error)
                return
            rep.code = code
            post(self._on_started, rep, None)
            death = self._serve_inbox(rep, code, post)
        finally:
            if rep.code is not None:
                rep.code.close()
            # Queries left behind are failed by the trio side; this thread will not
            # signal their wakers, so those may be reused.
            while True:
                try:
                    left = rep.inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(left, _Job):
                    left.finished = True
            post(self._on_finished, rep, death)

    def _serve_inbox(
        self, rep: _Replica, code: ReplicaCode, post: Callable[..., None]
    ) -> str | None:
        """Serve jobs until the stop sentinel; return why the replica died, if it did."""
        run = code.run
        check_health = code.check_health
        run_async = code.run_async
        in_flight: set[concurrent.futures.Future[list[Any]]] = set()
        get = rep.inbox.get
        admit_lock = rep.admit_lock
        period = self.health_check_period_s
        next_check = time.monotonic() + period
        while True:
            if check_health is None:
                job = get()
            else:
                try:
                    job = get(timeout=max(0.0, next_check - time.monotonic()))
                except queue.Empty:
                    job = _CHECK_HEALTH
                if job is not None and time.monotonic() >= next_check:
                    try:
                        check_health()
                    except BaseException as exc:
                        if isinstance(job, _Job):
                            job.finished = True
                        return f"health check failed: {type(exc).__name__}: {exc}"
                    next_check = time.monotonic() + period
                if job is _CHECK_HEALTH:
                    continue
            if job is None:
                if in_flight:  # a stop drains the async tasks too (a death cancels them)
                    concurrent.futures.wait(list(in_flight))
                return None
            if job.done:
                job.finished = True  # its caller gave up before it began
                continue
            # Mark it begun, *then* look for a death; _fail marks the death, *then* looks
            # at `started`. So a query _fail calls safe to retry never runs here.
            job.started = True
            if rep.dead:
                job.finished = True
                return None
            if run_async is not None and code.loop is not None:
                self._submit(rep, job, code, in_flight, post)
                continue
            try:
                result: outcome.Outcome[Any] = outcome.Value(run(job.batch))
            except Exception as exc:
                result = outcome.Error(exc)
            except BaseException as exc:
                job.finished = True
                return f"{type(exc).__name__} escaped the user code: {exc}"
            self._answer(rep, job, result, admit_lock, post)

    def _submit(
        self,
        rep: _Replica,
        job: _Job,
        code: ReplicaCode,
        in_flight: set[concurrent.futures.Future[list[Any]]],
        post: Callable[..., None],
    ) -> None:
        """Hand an async target's batch to the replica's loop; answer when it ends."""
        assert code.loop is not None and code.run_async is not None
        run_async = code.run_async
        batch = job.batch
        future = code.loop.submit(lambda: run_async(batch))
        in_flight.add(future)
        job.future = future
        if job.done:  # the caller gave up while we submitted (see _Job.give_up)
            future.cancel()

        def done(future: concurrent.futures.Future[list[Any]]) -> None:
            in_flight.discard(future)
            result: outcome.Outcome[Any]
            if future.cancelled():
                result = outcome.Error(_not_run(rep.tag, "its query was cancelled"))
            else:
                exc = future.exception()
                if isinstance(exc, UserCodeEscaped):
                    job.finished = True
                    post(self._died, rep, str(exc))
                    return
                result = outcome.Value(future.result()) if exc is None else outcome.Error(exc)
            self._answer(rep, job, result, rep.admit_lock, post)

        future.add_done_callback(done)

    def _answer(
        self,
        rep: _Replica,
        job: _Job,
        result: outcome.Outcome[Any],
        admit_lock: threading.Lock,
        post: Callable[..., None],
    ) -> None:
        """Give ``job`` its answer and wake its caller (on a worker or loop thread)."""
        # Exactly one answer per job, and one wake-up: a death (_fail) may have
        # answered first, and then this late result is dropped.
        with admit_lock:
            late = job.answered
            if not late:
                job.outcome = result
                job.answered = True
        if late:
            job.finished = True
            return
        waker = job.waker
        if waker is not None:
            waker.signal()
            job.finished = True  # after the signal: now its waker may be reused
        elif job.lock is not None:
            job.finished = True
            _unlock(job.lock)
        else:
            job.finished = True
            post(self._deliver, rep, job)


class _RouterComposer:
    """Composition through a router in this process (see ``servecore._calls``)."""

    def __init__(self, router: Any) -> None:
        self.router = router

    def backends_of(self, endpoint: str) -> Sequence[str]:
        backends: Sequence[str] = self.router.backends_of(endpoint)
        return backends

    def call(
        self,
        endpoint: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None = None,
    ) -> Any:
        query = Query(args=args, kwargs=kwargs, deadline=deadline)
        timeout_s = None if deadline is None else max(0.0, deadline - time.time())
        return self.router.call_blocking(endpoint, query, timeout_s)


def _unlock(lock: threading.Lock) -> None:
    """Wake the host thread waiting on ``lock`` (a death and a late answer may both try)."""
    try:  # noqa: SIM105 - the hot path; contextlib.suppress costs more
        lock.release()
    except RuntimeError:
        pass


def _not_run(tag: str, reason: str) -> ReplicaDiedError:
    """A death error for a query the replica never began: the router may send it to
    another replica (see ``servecore.router``, "retry_safe")."""
    error = ReplicaDiedError(tag, reason)
    error.retry_safe = True  # type: ignore[attr-defined]
    return error
