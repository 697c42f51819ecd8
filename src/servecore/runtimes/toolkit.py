"""The plugin toolkit: how a runtime turns a ``StartReplica`` into code that serves.

Every runtime that runs user code in Python (the built-in threads, subprocess and Ray
runtimes, and third-party plugins) builds its replicas with these helpers, so that the
rules below hold the same everywhere::

    from servecore.runtimes import toolkit

    async def start_replica(self, effect):
        toolkit.check_runtime_options(effect, known={"cpus"}, runtime="my-runtime")
        replica = toolkit.build_replica(effect)    # import, construct, reconfigure
        ...                                         # keep it; later:
        results = replica.run(batch)                # one result per query, in order
        if replica.check_health is not None:
            replica.check_health()                  # raises if the replica is sick

What a built replica follows:

* **Loading.** ``effect.target`` is ``"package.module:attribute"`` (the attribute may be
  dotted); :func:`import_target` imports it. A class is constructed with
  ``init_args``/``init_kwargs``; a function is used as is and takes no init arguments
  (:func:`instantiate`).
* **Async targets.** A target whose call is ``async def`` (a coroutine function, or a
  class whose ``__call__`` is one; batch targets too) runs on an asyncio event loop the
  replica owns (:class:`ReplicaLoop`, a thread of its own), up to
  ``max_concurrent_queries`` queries at once on that loop. Its constructor, an async
  ``reconfigure`` and an async ``check_health`` run on that loop too, so they may use
  ``asyncio.get_running_loop()``. A runtime opts in with ``allow_async=True`` (it then
  calls :attr:`ReplicaCode.run_async`, or the blocking :attr:`ReplicaCode.run`, and
  :meth:`ReplicaCode.close` when the replica ends); without it an async target is
  refused with ``TypeError``.
* **Streams.** A generator target (``def`` or ``async def`` with ``yield``, or a class
  whose ``__call__`` is one) streams: a runtime that serves async targets opens each
  stream with :meth:`ReplicaCode.open_stream` (a :class:`StreamRun`: items against
  credit, cancellable); its ``run`` refuses a query asking for one answer with
  :class:`~servecore.StreamMismatch`. Without ``allow_async`` (``allow_stream``) a
  generator is refused with ``TypeError``; a ``@batch`` generator always is.
* **Trio.** Trio code runs inside an asyncio target through ``trio-asyncio``, or as a
  plain ``def`` target that calls ``trio.run`` (each replica thread may run its own).
* **Batching.** A target marked with :func:`batch` receives a *list* (one element per
  query) and must return a list of the same length, in the same order
  (:class:`BatchSizeError` otherwise). A backend may set ``max_batch_size`` only for
  such a target (:func:`is_batch` tells); the router then groups queries that arrive
  within ``batch_wait_timeout_s`` of each other into one call. Each query to a batch
  target carries exactly one positional argument and no keywords
  (:func:`batch_argument`): ``handle.call({"text": "hi"})`` from three callers at once
  becomes one call ``target([{"text": "hi"}, ..., ...])``.
* **User config.** If the backend config sets ``user_config`` and the object has a
  ``reconfigure(user_config)`` method, it is called once, right after construction
  (:func:`apply_user_config`). A changed ``user_config`` rolls the backend onto new
  replicas, so a runtime never reconfigures a live one.
* **Health.** If the object has a ``check_health()`` method, the runtime calls it now
  and then (between queries, when idle; how often is the runtime's own option) and
  declares the replica dead, reporting ``ReplicaDied``, when it raises
  (:func:`find_health_check`).
* **Options.** ``BackendConfig.runtime_options`` is for the runtime; a runtime refuses
  keys it does not know (:func:`check_runtime_options`), naming them.

This module imports neither trio nor the controller, so a replica process pays only
for what it uses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import inspect
import threading
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import attrs

from servecore._calls import Composer, enter_stream, leave, wrap_async_runner, wrap_runner
from servecore._core.errors import InvalidConfig, ServecoreError, StreamMismatch
from servecore._core.transitions import StartReplica
from servecore.runtimes._protocol import Query

__all__ = [
    "BATCH_MARKER",
    "DEFAULT_STREAM_WINDOW",
    "BatchSizeError",
    "ReplicaCode",
    "ReplicaLoop",
    "StreamRun",
    "UserCodeEscaped",
    "apply_user_config",
    "batch",
    "batch_argument",
    "build_replica",
    "check_runtime_options",
    "find_health_check",
    "import_target",
    "instantiate",
    "is_async",
    "is_async_generator",
    "is_batch",
    "is_stream",
    "make_async_runner",
    "make_runner",
    "prepare_replica",
    "prepare_replica_code",
    "run_health_check",
]

#: The attribute :func:`batch` sets on what it marks.
BATCH_MARKER = "__servecore_batch__"

T = TypeVar("T")


def batch(target: T) -> T:
    """Mark a function, a class, or a class's ``__call__`` as batch-capable.

    The object is returned *unchanged* apart from a marker attribute, so its
    ``__module__`` and ``__qualname__`` still name it and its import path resolves after
    a crash::

        @servecore.batch
        def shout(texts: list[str]) -> list[str]:
            return [t.upper() for t in texts]

        class Model:
            @servecore.batch
            def __call__(self, texts: list[str]) -> list[str]:
                return [len(t) for t in texts]

    The target receives a list with one element per query (each query's single
    positional argument) and must return a list of the same length, or every caller in
    the batch gets a :class:`BatchSizeError`.
    """
    try:
        setattr(target, BATCH_MARKER, True)
    except (AttributeError, TypeError) as exc:
        raise TypeError(
            f"@servecore.batch marks a function, a class or a method; {target!r} "
            f"cannot carry the marker ({exc})"
        ) from None
    return target


def is_batch(obj: Any) -> bool:
    """Whether ``obj`` (a function, a class, or an instance) was marked with :func:`batch`."""
    if getattr(obj, BATCH_MARKER, False) is True:
        return True
    # A marked __call__ lives on the class, whether we are given the class or an instance.
    owner = obj if isinstance(obj, type) else type(obj)
    call = inspect.getattr_static(owner, "__call__", None)
    return getattr(call, BATCH_MARKER, False) is True


class BatchSizeError(ServecoreError, TypeError):
    """A batch target returned something other than a list as long as its input."""

    def __init__(self, target: str, expected: int, got: Any) -> None:
        self.target = target
        self.expected = expected
        self.got = got
        what = f"a list of {len(got)}" if isinstance(got, list) else type(got).__name__
        super().__init__(
            f"batch target {target} was given {expected} queries and returned {what}; a "
            f"@servecore.batch target must return a list with one result per input, in order"
        )


def batch_argument(query: Query, where: str) -> Any:
    """The one positional argument a query to a batch target must carry.

    ``where`` names what batches (``"endpoint 'x'"``) for the ``TypeError`` message.
    """
    if len(query.args) != 1 or query.kwargs:
        raise TypeError(
            f"{where} batches its queries, so each call takes exactly one "
            f"positional argument and no keywords; got {len(query.args)} positional and "
            f"keywords {sorted(query.kwargs)}"
        )
    return query.args[0]


def import_target(path: str) -> Any:
    """Import ``"package.module:attribute"`` (the attribute may be dotted)."""
    module_name, _, attr = path.partition(":")
    found: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        found = getattr(found, part)
    return found


def _call_of(obj: Any) -> Any:
    """What a call of ``obj`` runs: a class's ``__call__`` (not the metaclass's), else
    the object itself (a function, or an instance's bound ``__call__``)."""
    if isinstance(obj, type):
        return inspect.getattr_static(obj, "__call__", None)
    if inspect.isfunction(obj) or inspect.ismethod(obj) or not callable(obj):
        return obj
    return inspect.getattr_static(type(obj), "__call__", obj)


def is_async(obj: Any) -> bool:
    """Whether calling ``obj`` (a function, a class, or an instance) gives a coroutine:
    an ``async def`` function, or a class whose ``__call__`` is ``async def``."""
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(_call_of(obj))


def is_async_generator(obj: Any) -> bool:
    """Whether calling ``obj`` gives an async generator (a stream, served item by item
    on the replica's asyncio loop)."""
    return inspect.isasyncgenfunction(obj) or inspect.isasyncgenfunction(_call_of(obj))


def is_stream(obj: Any) -> bool:
    """Whether ``obj`` streams its answer: calling it gives a generator or an async
    generator (a function, or a class whose ``__call__`` is one)."""
    call = _call_of(obj)
    return (
        inspect.isgeneratorfunction(obj)
        or inspect.isgeneratorfunction(call)
        or is_async_generator(obj)
    )


def _name_of(obj: Any) -> str:
    return str(getattr(obj, "__qualname__", obj))


def instantiate(
    target: Any,
    init_args: Sequence[Any],
    init_kwargs: dict[str, Any],
    *,
    allow_async: bool = False,
    allow_stream: bool | None = None,
) -> Any:
    """The replica object: ``target(*init_args, **init_kwargs)`` for a class, the
    function itself otherwise. A streaming target (a generator) is refused
    (``TypeError``) unless the runtime streams (``allow_stream``, which defaults to
    ``allow_async``), and so is any async target unless the runtime serves them
    (``allow_async=True``)."""
    if allow_stream is None:
        allow_stream = allow_async
    if not isinstance(target, type) and not callable(target):
        raise TypeError(f"{target!r} is neither a class nor a function")
    if is_stream(target) and not allow_stream:
        raise TypeError(
            f"{_name_of(target)!r} is a generator, which streams its answer, and this "
            f"runtime does not stream yet; serve it with the 'threads' or 'subprocess' "
            f"runtime, or return the whole result (a list, say)"
        )
    if is_stream(target) and is_batch(target):
        raise TypeError(
            f"{_name_of(target)!r} is both @servecore.batch and a generator; a batch "
            f"has one answer per query, so a batch target cannot stream"
        )
    if is_async(target) and not allow_async:
        raise TypeError(
            f"{_name_of(target)!r} is async, and this runtime calls targets "
            f"synchronously; serve it with the 'threads' or 'subprocess' runtime, or "
            f"define it with plain 'def'"
        )
    if isinstance(target, type):
        obj = target(*init_args, **init_kwargs)
        if not callable(obj):
            raise TypeError(f"{target.__qualname__} instances are not callable; define __call__")
        return obj
    if init_args or init_kwargs:
        raise TypeError(
            f"{_name_of(target)!r} is a function, so it takes no "
            f"init_args/init_kwargs; use a class to hold state"
        )
    return target


class UserCodeEscaped(Exception):
    """A ``BaseException`` that is not an ``Exception`` (``SystemExit``,
    ``KeyboardInterrupt``) escaped an async target: the replica must end, as a thread
    or process would. ``exc`` is what escaped; the runtime reports the replica dead."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        super().__init__(f"{type(exc).__name__} escaped the user code: {exc}")


class ReplicaLoop:
    """An asyncio event loop on a thread of its own, owned by one replica.

    Async targets run here, at most ``max_concurrent`` coroutines of user code at once
    (more wait their turn in order). Every method but the loop's own callbacks may be
    called from any thread::

        loop = ReplicaLoop(name="replica-a#1", max_concurrent=8)
        future = loop.submit(lambda: target(1))   # a concurrent.futures.Future
        future.cancel()                           # cancels the task on the loop
        loop.close()                              # cancels what is left, ends the thread
    """

    def __init__(self, *, name: str, max_concurrent: int) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent={max_concurrent!r} must be at least 1")
        self.loop = asyncio.new_event_loop()
        self.max_concurrent = max_concurrent
        self._semaphore = asyncio.Semaphore(max_concurrent)
        self._closed = False
        running = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(running,), name=f"servecore-loop-{name}", daemon=True
        )
        self._thread.start()
        running.wait()

    def _run(self, running: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(running.set)
        try:
            self.loop.run_forever()
            # Closed: cancel what is left (abandoned queries) and let it unwind.
            left = asyncio.all_tasks(self.loop)
            for task in left:
                task.cancel()
            if left:
                self.loop.run_until_complete(asyncio.wait(left, timeout=5.0))
                # One more turn: the tasks' done callbacks answer their futures.
                self.loop.run_until_complete(asyncio.sleep(0))
        finally:
            self.loop.close()

    @property
    def thread(self) -> threading.Thread:
        """The loop's thread."""
        return self._thread

    def submit(
        self, make: Callable[[], Awaitable[T]], *, bounded: bool = True
    ) -> concurrent.futures.Future[T]:
        """Run ``await make()`` on the loop, within the concurrency bound (outside it
        with ``bounded=False``: a health check must not queue behind queries).

        Cancelling the returned future cancels the task (the user's code sees
        ``asyncio.CancelledError``). A ``BaseException`` other than an ``Exception`` or
        a cancellation comes out as :class:`UserCodeEscaped`.
        """
        if bounded:
            return asyncio.run_coroutine_threadsafe(self._bounded(make), self.loop)
        return asyncio.run_coroutine_threadsafe(self._guarded(make), self.loop)

    async def _bounded(self, make: Callable[[], Awaitable[T]]) -> T:
        async with self._semaphore:
            return await self._guarded(make)

    async def _guarded(self, make: Callable[[], Awaitable[T]]) -> T:
        try:
            return await make()
        except (Exception, asyncio.CancelledError):
            raise
        except BaseException as exc:
            # SystemExit & co. would stop the loop (and every other query on it).
            raise UserCodeEscaped(exc) from exc

    def run(self, make: Callable[[], Awaitable[T]], *, bounded: bool = True) -> T:
        """Blocking :meth:`submit`: wait for the answer on the calling thread (never
        the loop's own)."""
        return self.submit(make, bounded=bounded).result()

    def call(self, fn: Callable[[], T]) -> T:
        """Run plain ``fn()`` on the loop's thread (so it sees the running loop) and
        wait for it: how an async target's constructor runs."""

        async def call_fn() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call_fn(), self.loop).result()

    def close(self) -> None:
        """Stop the loop: tasks still running are cancelled. Returns at once;
        idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):  # the loop closed already
            self.loop.call_soon_threadsafe(self.loop.stop)


def make_runner(obj: Any, name: str) -> Callable[[Sequence[Query]], list[Any]]:
    """Return ``run(batch) -> results`` for a replica object.

    A plain target is called once per query with the query's own arguments. A batch
    target is called once with the list of each query's single argument, and its result
    is checked to be a list of the same length (:class:`BatchSizeError` otherwise).
    """
    if is_batch(obj):

        def run_batch(queries: Sequence[Query]) -> list[Any]:
            inputs = [batch_argument(q, f"batch target {name}") for q in queries]
            results = obj(inputs)
            if not isinstance(results, list) or len(results) != len(inputs):
                raise BatchSizeError(name, len(inputs), results)
            return results

        return run_batch

    def run_each(queries: Sequence[Query]) -> list[Any]:
        if len(queries) == 1:
            q = queries[0]
            return [obj(*q.args, **q.kwargs)]
        return [obj(*q.args, **q.kwargs) for q in queries]

    return run_each


def make_async_runner(obj: Any, name: str) -> Callable[[Sequence[Query]], Awaitable[list[Any]]]:
    """:func:`make_runner` for an async target: ``await run(batch) -> results``.

    A plain target's queries of one batch run one after another (the router sends a
    plain target one query per call; concurrency comes from concurrent calls).
    """
    if is_batch(obj):

        async def run_batch(queries: Sequence[Query]) -> list[Any]:
            inputs = [batch_argument(q, f"batch target {name}") for q in queries]
            results = await obj(inputs)
            if not isinstance(results, list) or len(results) != len(inputs):
                raise BatchSizeError(name, len(inputs), results)
            return results

        return run_batch

    async def run_each(queries: Sequence[Query]) -> list[Any]:
        return [await obj(*q.args, **q.kwargs) for q in queries]

    return run_each


def find_health_check(obj: Any) -> Callable[[], object] | None:
    """The replica object's ``check_health()`` method, or ``None`` if it has none.

    A runtime calls it now and then; when it raises, the replica is dead (report
    ``ReplicaDied`` with the error as the reason).
    """
    check = getattr(obj, "check_health", None)
    return check if callable(check) else None


def run_health_check(check: Callable[[], object], timeout_s: float | None, tag: str) -> None:
    """Call ``check`` (a replica object's ``check_health()``) and wait for it at most
    ``timeout_s`` (the backend's ``health_check_timeout_s``; ``None``: for ever).

    A check that raises fails with its own exception; one that does not return in time
    raises ``TimeoutError``: the replica is taken for hung, as one that does not answer
    its health probe is, and the runtime ends it. The check runs on a thread of its own,
    which is left behind if it hangs (the replica is about to end anyway).
    """
    if timeout_s is None or not timeout_s > 0:
        check()
        return
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            check()
        except BaseException as exc:  # handed to the waiting thread, raised there
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name=f"check_health {tag}", daemon=True).start()
    if not done.wait(timeout_s):
        raise TimeoutError(
            f"check_health() of replica {tag} did not return within {timeout_s:g}s "
            f"(health_check_timeout_s), so the replica is taken for hung; make "
            f"check_health() return sooner, or raise the backend's health_check_timeout_s"
        )
    if failure:
        raise failure[0]


def apply_user_config(obj: Any, user_config: Any) -> None:
    """Call ``obj.reconfigure(user_config)`` if a ``user_config`` is set and the object
    has that method (errors propagate: the start fails with the user's own error)."""
    reconfigure = getattr(obj, "reconfigure", None)
    if user_config is not None and callable(reconfigure):
        reconfigure(user_config)


def prepare_replica(
    target: str,
    init_args: Sequence[Any],
    init_kwargs: dict[str, Any],
    *,
    backend: str,
    max_batch_size: int | None,
    user_config: Any,
) -> tuple[Callable[[Sequence[Query]], list[Any]], Callable[[], object] | None]:
    """Build a replica the way every Python runtime does: import and construct the
    target, refuse ``max_batch_size`` for a target not marked :func:`batch`, call
    ``reconfigure(user_config)`` if it has one, and return ``(run, check_health)``
    (``check_health`` is ``None`` when the object has none).

    The arguments are plain values, so a runtime may ship them to another process as
    they are; in-process, :func:`build_replica` takes the effect itself. Async targets
    are refused here (``TypeError``); a runtime that serves them calls
    :func:`prepare_replica_code` with ``allow_async=True``.
    """
    code = _build(target, init_args, init_kwargs, backend, max_batch_size, user_config)
    return code.run, code.check_health


def prepare_replica_code(
    target: str,
    init_args: Sequence[Any],
    init_kwargs: dict[str, Any],
    *,
    backend: str,
    max_batch_size: int | None,
    user_config: Any,
    allow_async: bool = False,
    max_concurrent_queries: int = 1,
    composer: Callable[[], Composer | None] | None = None,
) -> ReplicaCode:
    """:func:`prepare_replica`, returning the whole :class:`ReplicaCode`.

    With ``allow_async=True`` an async target is built on a :class:`ReplicaLoop` of its
    own that runs up to ``max_concurrent_queries`` of its queries at once; the caller
    owns the code and calls :meth:`ReplicaCode.close` when the replica ends.
    ``composer`` returns how user code reaches other endpoints (``servecore.get_handle``;
    see ``servecore._calls``), or ``None`` where it cannot.
    """
    return _build(
        target,
        init_args,
        init_kwargs,
        backend,
        max_batch_size,
        user_config,
        allow_async=allow_async,
        max_concurrent_queries=max_concurrent_queries,
        composer=composer,
    )


@attrs.frozen(kw_only=True)
class ReplicaCode:
    """A built replica: the user's ``obj``, ``run(batch) -> results``, and its
    ``check_health`` (``None`` when the object has none).

    For an async target (built with ``allow_async=True``) ``loop`` is the replica's
    :class:`ReplicaLoop`, ``run_async(batch)`` the coroutine function to submit to it,
    and ``run`` a blocking call of it from any thread but the loop's; ``check_health``
    is a plain callable either way (an async one runs on the loop).
    """

    obj: Any
    run: Callable[[Sequence[Query]], list[Any]]
    check_health: Callable[[], object] | None
    run_async: Callable[[Sequence[Query]], Awaitable[list[Any]]] | None = None
    loop: ReplicaLoop | None = None
    #: The target streams (a generator): queries go through :meth:`open_stream`, and
    #: ``run`` refuses them with :class:`~servecore.StreamMismatch`.
    streams: bool = False
    #: The import path of the target, for messages.
    target: str = ""

    def close(self) -> None:
        """End the replica's loop, if it has one (cancelling what still runs there)."""
        if self.loop is not None:
            self.loop.close()

    def open_stream(
        self,
        query: Query,
        *,
        window: int,
        emit: Callable[[Any], object],
        finish: Callable[[BaseException | None, bool], object],
    ) -> StreamRun:
        """Prepare one stream of a streaming target (call :meth:`StreamRun.start`).

        Raises :class:`~servecore.StreamMismatch` at once for a target that does not
        stream. See :class:`StreamRun` for ``window``, ``emit`` and ``finish``.
        """
        if not self.streams:
            raise StreamMismatch(self.target, streams=False)
        return StreamRun(self, query, window=window, emit=emit, finish=finish)


#: Items a stream's producer may run ahead of its consumer (the credit a host grants
#: first): a slow consumer holds the generator at most this many items ahead. Not
#: smaller: a fast stream waits for credit's round trip once a window, and at 16 that
#: wait, not the work per item, bounded one from a subprocess replica.
DEFAULT_STREAM_WINDOW = 32


class StreamRun:
    """One stream being produced in a replica, with credit-based backpressure.

    The generator runs on a thread of its own (a sync generator) or as a task on the
    replica's :class:`ReplicaLoop` (an async generator, within the loop's concurrency
    bound). It takes the next item only while it holds credit: ``window`` items at
    first, and one more for each :meth:`grant`, so a slow consumer slows the producer
    and no buffer grows past ``window``. ``emit(item)`` is called for each item (on the
    producer's thread); ``finish(error, cancelled)`` once at the end: ``error`` is the
    user's exception (:class:`UserCodeEscaped` for ``SystemExit`` and the like), or
    ``None``. :meth:`cancel` (from any thread) stops the generator: an async one is
    cancelled where it awaits, or closed at its ``yield``; a sync one is closed
    (``GeneratorExit`` at its ``yield``) before it is asked for another item.
    """

    def __init__(
        self,
        code: ReplicaCode,
        query: Query,
        *,
        window: int,
        emit: Callable[[Any], object],
        finish: Callable[[BaseException | None, bool], object],
    ) -> None:
        if window < 1:
            raise ValueError(f"window={window!r} must be at least 1")
        self._code = code
        self._query = query
        self._emit = emit
        self._finish = finish
        self._credit = window
        self._cancelled = False
        self._cond = threading.Condition()
        self._more: asyncio.Event | None = None
        self._future: concurrent.futures.Future[None] | None = None
        #: Items emitted so far.
        self.emitted = 0

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled

    def start(self) -> None:
        """Begin producing (returns at once)."""
        loop = self._code.loop
        if loop is not None and is_async_generator(self._code.obj):
            self._more = asyncio.Event()
            future = loop.submit(self._produce_async)
            self._future = future
            future.add_done_callback(self._async_done)
            if self._cancelled:
                future.cancel()
            return
        threading.Thread(target=self._produce_sync, name="servecore-stream", daemon=True).start()

    def grant(self, n: int) -> None:
        """Let the producer take ``n`` more items (any thread)."""
        with self._cond:
            self._credit += n
            self._cond.notify_all()
        more, loop = self._more, self._code.loop
        if more is not None and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed already
                loop.loop.call_soon_threadsafe(more.set)

    def cancel(self) -> None:
        """Stop the generator (any thread; idempotent)."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()
        if self._future is not None:
            self._future.cancel()

    def _take_credit(self) -> bool:
        with self._cond:
            while self._credit <= 0 and not self._cancelled:
                self._cond.wait()
            if self._cancelled:
                return False
            self._credit -= 1
            return True

    def _produce_sync(self) -> None:
        error: BaseException | None = None
        q = self._query
        kwargs, token = enter_stream(q.kwargs)  # this thread's context, for every item
        try:
            gen = self._code.obj(*q.args, **kwargs)
            try:
                while self._take_credit():
                    try:
                        item = next(gen)
                    except StopIteration:
                        break
                    self._emit(item)
                    self.emitted += 1
            finally:
                gen.close()  # GeneratorExit at its yield when it was stopped early
        except Exception as exc:
            error = exc
        except BaseException as exc:
            error = UserCodeEscaped(exc)
        finally:
            if token is not None:
                leave(token)
        self._finish(error, self._cancelled and error is None)

    async def _produce_async(self) -> None:
        more = self._more
        assert more is not None
        q = self._query
        kwargs, _ = enter_stream(q.kwargs)  # in this task's own context, left with it
        agen = self._code.obj(*q.args, **kwargs)
        try:
            while True:
                while True:
                    with self._cond:
                        if self._credit > 0:
                            self._credit -= 1
                            break
                        # Cleared under the lock: a grant after this sets it again.
                        more.clear()
                    await more.wait()
                try:
                    item = await agen.__anext__()
                except StopAsyncIteration:
                    return
                self._emit(item)
                self.emitted += 1
        finally:
            await agen.aclose()

    def _async_done(self, future: concurrent.futures.Future[None]) -> None:
        if future.cancelled():
            self._finish(None, True)
            return
        error = future.exception()
        self._finish(error, False)


def build_replica(effect: StartReplica, *, allow_async: bool = False) -> ReplicaCode:
    """Import, construct and configure the replica ``effect`` asks for.

    Raises the user's own exception when the import or constructor fails,
    :class:`~servecore.InvalidConfig` for ``max_batch_size`` on a target not marked
    :func:`batch`, and ``TypeError`` for a target that cannot be a replica (an async
    one too, unless ``allow_async``: see :func:`prepare_replica_code`). Blocking:
    call it off the trio thread (``trio.to_thread.run_sync``) or in the replica's own
    process, never on the loop.
    """
    config = effect.config
    return _build(
        effect.target,
        effect.init_args,
        effect.init_kwargs,
        effect.backend,
        config.max_batch_size,
        config.user_config,
        allow_async=allow_async,
        max_concurrent_queries=config.max_concurrent_queries,
    )


def _build(
    target: str,
    init_args: Sequence[Any],
    init_kwargs: dict[str, Any],
    backend: str,
    max_batch_size: int | None,
    user_config: Any,
    *,
    allow_async: bool = False,
    max_concurrent_queries: int = 1,
    composer: Callable[[], Composer | None] | None = None,
) -> ReplicaCode:
    found = import_target(target)
    compose = composer or _no_composer
    streams = allow_async and is_stream(found)
    if not (allow_async and (is_async(found) or is_async_generator(found))):
        obj = instantiate(found, init_args, init_kwargs, allow_stream=allow_async)
        _check_batching(obj, target, backend, max_batch_size)
        apply_user_config(obj, user_config)
        run = (
            _refuse_call(target)
            if streams
            else wrap_runner(make_runner(obj, target), backend, compose, _make_query)
        )
        return ReplicaCode(
            obj=obj,
            run=run,
            check_health=find_health_check(obj),
            streams=streams,
            target=target,
        )
    loop = ReplicaLoop(name=backend, max_concurrent=max_concurrent_queries)
    try:

        def construct() -> Any:
            return instantiate(found, init_args, init_kwargs, allow_async=True)

        # On the loop's thread, so a constructor may use the running loop.
        obj = loop.call(construct)
        _check_batching(obj, target, backend, max_batch_size)
        reconfigure = getattr(obj, "reconfigure", None)
        if user_config is not None and callable(reconfigure):
            if inspect.iscoroutinefunction(reconfigure):
                loop.run(lambda: reconfigure(user_config), bounded=False)
            else:
                loop.call(lambda: reconfigure(user_config))
        run_async = wrap_async_runner(make_async_runner(obj, target), backend, compose, _make_query)
        check = find_health_check(obj)
        if check is not None and inspect.iscoroutinefunction(check):
            async_check = check

            def check_on_loop() -> object:
                return loop.run(async_check, bounded=False)

            check = check_on_loop
    except BaseException:
        loop.close()
        raise

    def run_on_loop(queries: Sequence[Query]) -> list[Any]:
        return loop.run(lambda: run_async(queries))

    run = run_on_loop
    if streams:
        run = _refuse_call(target)

        async def refuse_async(queries: Sequence[Query]) -> list[Any]:
            raise StreamMismatch(target, streams=True)

        run_async = refuse_async
    return ReplicaCode(
        obj=obj,
        run=run,
        check_health=check,
        run_async=run_async,
        loop=loop,
        streams=streams,
        target=target,
    )


def _no_composer() -> Composer | None:
    return None


def _make_query(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Query:
    return Query(args=args, kwargs=kwargs)


def _refuse_call(target: str) -> Callable[[Sequence[Query]], list[Any]]:
    """``run`` for a streaming target: a query asking for one answer is refused."""

    def refuse(queries: Sequence[Query]) -> list[Any]:
        raise StreamMismatch(target, streams=True)

    return refuse


def _check_batching(obj: Any, target: str, backend: str, max_batch_size: int | None) -> None:
    if max_batch_size is not None and not is_batch(obj):
        raise InvalidConfig(
            "max_batch_size",
            max_batch_size,
            f"target {target} is not marked @servecore.batch, so it cannot take batches; "
            f"mark it or leave max_batch_size unset",
            backend=backend,
        )


def check_runtime_options(effect: StartReplica, *, known: Collection[str], runtime: str) -> None:
    """Refuse ``runtime_options`` keys this runtime does not know, naming them.

    Raises :class:`~servecore.InvalidConfig` (field ``runtime_options``) listing the
    unknown keys and the known ones; call it first thing in ``start_replica``.
    """
    unknown = sorted(set(effect.config.runtime_options) - set(known))
    if unknown:
        raise InvalidConfig(
            "runtime_options",
            effect.config.runtime_options,
            f"the {runtime} runtime does not know {unknown} "
            f"(known: {sorted(known) or 'none'}); remove them",
            backend=effect.backend,
        )
