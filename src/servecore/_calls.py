"""Composition: replica code calling other endpoints (docs/design.md §5, "Composition").

Standard library only: replica processes import it through the toolkit, without trio.

Each query a replica runs may carry its *call chain*, the backends of the replicas
waiting on it, outermost first, under the reserved keyword :data:`CHAIN_KEY`. The
runner strips it before calling user code and, while user code runs, keeps a
:class:`CallContext` (the chain plus this replica's own backend, and how to reach
other endpoints from here) in a context variable. :func:`servecore.get_handle` reads
it; its handle refuses a call whose endpoint routes to a backend already on the chain
(:class:`~servecore.CallCycle`: every replica on a cycle may be waiting on the next,
holding the slot the cycle needs) or that would nest past :data:`MAX_CALL_DEPTH`
(:class:`~servecore.CallDepthExceeded`), and sends the rest with the longer chain.

Each query may also carry a *deadline* (``Query.deadline``, wall-clock seconds): the
runner drops a batch whose every deadline has passed before user code sees it
(:class:`~servecore.DeadlineExceeded`: it reached the front of the replica's queue too
late), keeps the earliest one in the call context for :func:`time_remaining`, and a
nested call sends it on (its handle waits no longer than the time left).

A query sent with ``handle.options(multiplexed_model_id=...)`` carries the model id
under the reserved keyword :data:`MODEL_KEY`; the runner strips it too, and
:func:`get_multiplexed_model_id` reads it (see ``servecore._multiplex``).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from servecore._core.errors import (
    CallCycle,
    CallDepthExceeded,
    DeadlineExceeded,
    ServecoreError,
)

__all__ = [
    "CHAIN_KEY",
    "MAX_CALL_DEPTH",
    "MODEL_KEY",
    "CallContext",
    "Composer",
    "NotInReplica",
    "ReplicaHandle",
    "get_handle",
    "get_multiplexed_model_id",
    "running",
    "strip_chain",
    "time_remaining",
]

#: The reserved keyword a nested query carries its call chain in (never seen by user code).
CHAIN_KEY = "__servecore_call_chain__"
#: The reserved keyword a query carries its multiplexed model id in (never seen by
#: user code; ``servecore.get_multiplexed_model_id()`` reads it).
MODEL_KEY = "__servecore_model_id__"
#: How many replicas deep a chain of nested calls may go.
MAX_CALL_DEPTH = 16


class Composer(Protocol):
    """How replica code reaches other endpoints from where it runs (a runtime's part)."""

    def backends_of(self, endpoint: str) -> Sequence[str]:
        """The backends ``endpoint`` may route to now (its traffic split)."""

    def call(
        self,
        endpoint: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None = None,
    ) -> Any:
        """Send one query to ``endpoint`` and block for its answer, giving up at
        ``deadline`` (wall-clock seconds; ``TimeoutError``) if there is one."""


class CallContext:
    """What user code runs inside: the call chain (this replica's backend last), the
    composer (``None`` where the runtime offers none), the query's deadline
    (wall-clock seconds, the earliest of a batch's; ``None``: none) and its
    multiplexed model id (``""``: none)."""

    __slots__ = ("chain", "composer", "deadline", "model_id")

    def __init__(
        self,
        chain: tuple[str, ...],
        composer: Composer | None,
        deadline: float | None = None,
        model_id: str = "",
    ) -> None:
        self.chain = chain
        self.composer = composer
        self.deadline = deadline
        self.model_id = model_id


_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "servecore_call_context", default=None
)


def strip_chain(kwargs: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``kwargs`` without the reserved key, and the chain it carried (a copy, so a
    query shared with shadows or retries is never changed)."""
    if CHAIN_KEY not in kwargs:
        return kwargs, ()
    rest = {k: v for k, v in kwargs.items() if k != CHAIN_KEY}
    chain = kwargs[CHAIN_KEY]
    return rest, tuple(str(b) for b in chain) if isinstance(chain, (list, tuple)) else ()


def running(
    chain: tuple[str, ...],
    backend: str,
    composer: Composer | None,
    deadline: float | None = None,
    model_id: str = "",
) -> contextvars.Token[CallContext | None]:
    """Enter user code of ``backend`` for a query that carried ``chain`` (and
    ``deadline``, ``model_id``); reset the returned token when it returns."""
    return _current.set(CallContext((*chain, backend), composer, deadline, model_id))


def enter_stream(
    kwargs: dict[str, Any],
) -> tuple[dict[str, Any], contextvars.Token[CallContext | None] | None]:
    """For a stream (a generator target, which the runner does not wrap): ``kwargs``
    without the reserved keywords and, when it carried a model id, a token of the
    context entered for :func:`get_multiplexed_model_id` (reset it with :func:`leave`)."""
    if CHAIN_KEY not in kwargs and MODEL_KEY not in kwargs:
        return kwargs, None
    rest = {k: v for k, v in kwargs.items() if k not in (CHAIN_KEY, MODEL_KEY)}
    model = str(kwargs.get(MODEL_KEY) or "")
    if not model:
        return rest, None
    return rest, _current.set(CallContext((), None, None, model))


def get_multiplexed_model_id() -> str:
    """The model id the query running now was sent for
    (``handle.options(multiplexed_model_id="m")``, or the HTTP header
    ``serve_multiplexed_model_id``), or ``""`` when it names none or outside replica
    code; as Ray Serve's ``serve.get_multiplexed_model_id()``. In a batch, the id its
    queries share (``""`` if they differ). Pass it to a :func:`servecore.multiplexed`
    loader::

        model = await self.get_model(servecore.get_multiplexed_model_id())
    """
    context = _current.get()
    return "" if context is None else context.model_id


def time_remaining() -> float | None:
    """Seconds left before the caller of the query running now stops waiting, or
    ``None`` when it has no deadline (its handle has no ``timeout_s``) or when called
    outside replica code. Never negative: ``0.0`` once the deadline has passed.

    A handle's ``timeout_s`` (the HTTP ingress's ``timeout_s`` for HTTP requests)
    becomes the query's deadline, which travels with it to the replica, so a target
    can cut its work short (fewer tokens, a cheaper model) instead of finishing an
    answer nobody waits for::

        def generate(prompt):
            left = servecore.time_remaining()
            steps = 50 if left is None else max(1, min(50, int(left / 0.02)))
            ...

    In a batch, the earliest deadline of its queries (none if one of them has none).
    A nested call
    (``servecore.get_handle(...).call``) waits at most this long. Works on the
    threads, subprocess and Ray runtimes (not in a Ray replica started by a servecore
    before deadlines reached Ray); not carried into generator (streaming) targets,
    where it is ``None``.
    """
    context = _current.get()
    if context is None or context.deadline is None:
        return None
    return max(0.0, context.deadline - time.time())


def leave(token: contextvars.Token[CallContext | None]) -> None:
    """Leave the user code :func:`running` entered."""
    _current.reset(token)


class NotInReplica(ServecoreError, RuntimeError):
    """:func:`servecore.get_handle` was called outside replica code, or in a runtime
    that offers no composition."""

    def __init__(self, endpoint: str, why: str) -> None:
        self.endpoint = endpoint
        self.why = why
        super().__init__(
            f"servecore.get_handle({endpoint!r}) works inside replica code only ({why}); "
            f"from elsewhere use ctl.get_handle or servecore.connect"
        )


class ReplicaHandle:
    """A blocking handle to an endpoint, for replica code (from :func:`get_handle`)."""

    def __init__(self, endpoint: str, context: CallContext) -> None:
        self.endpoint = endpoint
        self._context = context

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """Send one query to the endpoint and block for its answer. Raises
        :class:`~servecore.CallCycle` or :class:`~servecore.CallDepthExceeded` before
        sending anything when the call would come back to a backend on the chain or
        nest too deep; otherwise what the endpoint's handle raises."""
        # The chain of the query running *now* in this context (a handle kept across
        # queries must not carry an old one); the one it was made in on other threads.
        context = _current.get() or self._context
        composer = context.composer
        if composer is None:
            raise NotInReplica(self.endpoint, "this runtime offers no handles to replicas")
        chain = context.chain
        for backend in composer.backends_of(self.endpoint):
            if backend in chain:
                raise CallCycle(self.endpoint, backend, chain)
        if len(chain) >= MAX_CALL_DEPTH:
            raise CallDepthExceeded(self.endpoint, chain, MAX_CALL_DEPTH)
        kwargs = {**kwargs, CHAIN_KEY: list(chain)}
        if context.deadline is None:
            return composer.call(self.endpoint, args, kwargs)
        return composer.call(self.endpoint, args, kwargs, context.deadline)

    async def call_async(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`call` for an ``async def`` target: the blocking call runs on a worker
        thread, so the replica's loop keeps serving meanwhile."""
        ctx = contextvars.copy_context()
        return await asyncio.to_thread(ctx.run, self.call, *args, **kwargs)

    def __repr__(self) -> str:
        return f"ReplicaHandle({self.endpoint!r}, chain={list(self._context.chain)})"


def get_handle(endpoint: str) -> ReplicaHandle:
    """A handle to ``endpoint`` for replica code: call it from a target to compose
    endpoints (``servecore.get_handle("b").call(x)``; ``await ... .call_async(x)`` in
    an ``async def`` target). Calls nest; one that would come back to a backend
    already waiting on the chain raises :class:`~servecore.CallCycle`, one nesting
    past :data:`MAX_CALL_DEPTH` replicas :class:`~servecore.CallDepthExceeded`.

    Works on the threads runtime (through the controller's router), and the subprocess
    and Ray runtimes under ``servecore run`` (through one :func:`servecore.connect`
    client per replica process, opened on first use). Raises :class:`NotInReplica`
    anywhere else.
    """
    context = _current.get()
    if context is None:
        raise NotInReplica(endpoint, "no replica query is running in this context")
    if context.composer is None:
        raise NotInReplica(endpoint, "this runtime offers no handles to replicas")
    return ReplicaHandle(endpoint, context)


def wrap_runner(
    run: Callable[[Sequence[Any]], list[Any]],
    backend: str,
    composer: Callable[[], Composer | None],
    make_query: Callable[[tuple[Any, ...], dict[str, Any]], Any],
) -> Callable[[Sequence[Any]], list[Any]]:
    """``run(batch)`` with each query's chain stripped and the call context entered
    (a batch runs under the longest chain of its queries)."""

    def run_composed(queries: Sequence[Any]) -> list[Any]:
        deadline = _deadline_of(queries, backend)
        stripped, chain, model_id = _strip_all(queries, make_query)
        token = running(chain, backend, composer(), deadline, model_id)
        try:
            return run(stripped)
        finally:
            leave(token)

    return run_composed


def _deadline_of(queries: Sequence[Any], backend: str) -> float | None:
    """The earliest deadline of a batch's queries (``None`` if one has none); raises
    :class:`~servecore.DeadlineExceeded` when every deadline has passed, so that a
    batch nobody waits for any more is not run. (A query of a runtime that carries no
    deadline has no ``deadline`` attribute.)"""
    earliest: float | None = None
    for q in queries:
        d = getattr(q, "deadline", None)
        if d is None:
            return None
        if earliest is None or d < earliest:
            earliest = d
    if earliest is None:
        return None
    late = time.time() - max(getattr(q, "deadline", 0.0) for q in queries)
    if late >= 0:
        raise DeadlineExceeded(f"a replica of backend {backend!r}", late)
    return earliest


def _strip_all(
    queries: Sequence[Any], make_query: Callable[[tuple[Any, ...], dict[str, Any]], Any]
) -> tuple[Sequence[Any], tuple[str, ...], str]:
    """The queries without their reserved keywords, the longest chain among them, and
    the model id they share (``""`` if none, or if they differ)."""
    longest: tuple[str, ...] = ()
    if not any(CHAIN_KEY in q.kwargs or MODEL_KEY in q.kwargs for q in queries):
        return queries, longest, ""
    out = []
    models: set[str] = set()
    for q in queries:
        kwargs, chain = strip_chain(q.kwargs)
        model = ""
        if MODEL_KEY in kwargs:
            kwargs = dict(kwargs)  # a copy: the query may be shared (shadows, resends)
            model = str(kwargs.pop(MODEL_KEY) or "")
        models.add(model)
        if len(chain) > len(longest):
            longest = chain
        out.append(make_query(q.args, kwargs))
    return out, longest, models.pop() if len(models) == 1 else ""


def wrap_async_runner(
    run: Callable[[Sequence[Any]], Any],
    backend: str,
    composer: Callable[[], Composer | None],
    make_query: Callable[[tuple[Any, ...], dict[str, Any]], Any],
) -> Callable[[Sequence[Any]], Any]:
    """:func:`wrap_runner` for an async runner (the context is the task's own)."""

    async def run_composed(queries: Sequence[Any]) -> list[Any]:
        deadline = _deadline_of(queries, backend)
        stripped, chain, model_id = _strip_all(queries, make_query)
        token = running(chain, backend, composer(), deadline, model_id)
        try:
            result: list[Any] = await run(stripped)
            return result
        finally:
            leave(token)

    return run_composed


class ConnectComposer:
    """Composition from a replica process of the subprocess or Ray runtime: one
    :func:`servecore.connect` client per process, opened on first use (so a replica
    that never composes never imports trio nor holds a subscription)."""

    def __init__(self, control_socket: str) -> None:
        self.control_socket = control_socket
        self._lock = threading.Lock()
        self._client: Any = None

    def _connected(self) -> Any:
        with self._lock:
            if self._client is None:
                from pathlib import Path

                from servecore._serving.connect import connect

                # connect() names a server by a path in its state directory (its store).
                self._client = connect(Path(self.control_socket).parent / "state")
            return self._client

    def backends_of(self, endpoint: str) -> Sequence[str]:
        found = self._connected().routing_table.endpoints.get(endpoint)
        return () if found is None else tuple(found.traffic)

    def call(
        self,
        endpoint: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None = None,
    ) -> Any:
        handle = self._connected().get_handle(endpoint)
        if deadline is not None:
            handle = handle.options(timeout_s=max(0.0, deadline - time.time()))
        return handle.call(*args, **kwargs)
