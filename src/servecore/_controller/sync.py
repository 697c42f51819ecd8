"""The synchronous facade: the trio controller in a background thread (docs/design.md §4).

``servecore.start(...)`` opens a controller exactly as :func:`~servecore.open_controller`
does, but in a thread of its own running ``trio.run``; every command method blocks
until the async one returns, and raises what it raises::

    with servecore.start(runtime="threads", store=servecore.SQLiteStore("s.db")) as ctl:
        ctl.create_backend("echo", "myapp.models:Echo", num_replicas=2)
        ctl.create_endpoint("echo")
        ctl.set_traffic("echo", {"echo": 1.0})
        print(ctl.get_handle("echo").call({"text": "hi"}))

Handles are thread-safe: any host thread may call them at the same time. A query that
finds a free replica of the threads runtime goes from the calling thread straight to
the replica's thread; anything else crosses into trio with ``trio.from_thread.run``.
Do not call these blocking methods from a thread that runs a trio loop (the
controller's own, or your own trio program's): trio refuses, with ``RuntimeError``,
rather than deadlock. From trio code, use :func:`~servecore.open_controller`, or
``trio.to_thread.run_sync`` around the blocking call. ``close()`` works anywhere.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from servecore._controller.controller import Controller, open_controller
from servecore._controller.replica_lifecycle import LifecycleCounts, LifecycleEvent
from servecore._controller.status import Status
from servecore._core.errors import ControllerClosed, SteppedDown
from servecore._core.transitions import BackendConfig, Command, RoutingTable, State
from servecore._serving.router_stats import RouterStatistics
from servecore.router import Handle, HandleStream, Router
from servecore.runtimes import Runtime
from servecore.stores import Store

if TYPE_CHECKING:
    from servecore.app import App, Applied

__all__ = ["SyncController", "SyncHandle", "SyncStream", "start"]

T = TypeVar("T")


class SyncHandle:
    """A blocking, thread-safe :class:`~servecore.router.Handle`.

    ``call(*args, **kwargs)`` passes every argument to the target; options such as a
    timeout are set with :meth:`options` (``handle.options(timeout_s=2).call(x)``).
    """

    __slots__ = ("_handle", "_token")

    def __init__(self, handle: Handle, token: trio.lowlevel.TrioToken) -> None:
        self._handle = handle
        self._token = token

    @property
    def endpoint(self) -> str:
        """The endpoint this handle queries."""
        return self._handle.endpoint

    def options(
        self, *, timeout_s: float | None = None, multiplexed_model_id: str | None = None
    ) -> SyncHandle:
        """A copy with ``timeout_s`` (``TimeoutError`` past it; None waits as needed)
        and, if given, ``multiplexed_model_id`` (see
        :meth:`servecore.router.Handle.options`)."""
        handle = self._handle.options(
            timeout_s=timeout_s, multiplexed_model_id=multiplexed_model_id
        )
        return SyncHandle(handle, self._token)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """Run one query on the endpoint from any thread; block for its result.

        With the threads runtime, a query that finds a free replica goes straight from
        this thread to the replica's thread, without a detour through trio.
        """
        return self._handle.call_blocking(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> SyncStream:
        """Stream the items a generator target yields for one query, from any thread::

            with handle.stream("once upon a time") as tokens:
                for token in tokens:
                    print(token, end="")

        Leaving the ``with`` block (or :meth:`SyncStream.close`, or dropping the
        iterator) before the end cancels the generator in the replica. See
        :class:`~servecore.router.HandleStream`.
        """
        return SyncStream(self._handle.stream(*args, **kwargs), self._token)

    def __repr__(self) -> str:
        return f"SyncHandle(endpoint={self.endpoint!r}, timeout_s={self._handle.timeout_s!r})"


class SyncStream:
    """A blocking iterator over a streamed query's items (see :meth:`SyncHandle.stream`)."""

    __slots__ = ("_closed", "_stream", "_token")

    def __init__(self, stream: HandleStream, token: trio.lowlevel.TrioToken) -> None:
        self._stream = stream
        self._token = token
        self._closed = False

    def __iter__(self) -> SyncStream:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        try:
            return trio.from_thread.run(self._stream.__anext__, trio_token=self._token)
        except StopAsyncIteration:
            self._closed = True
            raise StopIteration from None
        except trio.RunFinishedError:
            self._closed = True
            raise ControllerClosed() from None

    def close(self) -> None:
        """Stop reading; the generator in the replica is cancelled if still running."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._stream.close, trio_token=self._token)

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _enter(token: trio.lowlevel.TrioToken, afn: Callable[[], Awaitable[T]]) -> T:
    try:
        return trio.from_thread.run(afn, trio_token=token)
    except trio.RunFinishedError:
        raise ControllerClosed() from None


class SyncController:
    """A controller running in a background thread; every method blocks. Get one from
    :func:`start`. Use it as a context manager, or call :meth:`close` when done."""

    def __init__(
        self,
        runtime: str | Runtime,
        store: Store | Callable[[bytes], object] | None,
        *,
        name: str = "servecore",
        **options: Any,
    ) -> None:
        self._open_args: dict[str, Any] = {
            "runtime": runtime,
            "store": store,
            "name": name,
            **options,
        }
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._ctl: Controller | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closing: trio.Event | None = None
        self._close_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(
            target=self._thread_main, name=f"servecore-controller-{name}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._ctl is None:
            self._thread.join()
            assert self._error is not None
            raise self._error
        atexit.register(self.close)

    # -- the background thread ------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        async with open_controller(**self._open_args) as ctl:
            self._closing = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._ctl = ctl
            self._ready.set()
            await self._closing.wait()

    def _run(self, afn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        if self._closed or self._token is None:
            raise ControllerClosed()
        return _enter(self._token, functools.partial(afn, *args, **kwargs))

    def _run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed or self._token is None:
            raise ControllerClosed()
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise ControllerClosed() from None

    @property
    def controller(self) -> Controller:
        """The async :class:`~servecore.Controller` (touch it only from its trio thread)."""
        assert self._ctl is not None
        return self._ctl

    # -- queries (never block) ------------------------------------------------------------

    @property
    def state(self) -> State:
        """The last saved state (an immutable value; safe to read from any thread)."""
        return self.controller.state

    @property
    def seq(self) -> int:
        """The sequence number of the last saved checkpoint."""
        return self.controller.seq

    @property
    def routing_table(self) -> RoutingTable:
        """The table last pushed to the router."""
        return self.controller.routing_table

    @property
    def runtime(self) -> Runtime:
        """The runtime carrying out effects."""
        return self.controller.runtime

    @property
    def stepped_down(self) -> SteppedDown | None:
        """See :attr:`Controller.stepped_down`."""
        return self.controller.stepped_down

    @property
    def queued(self) -> int:
        """Messages waiting for the committer now."""
        return self.controller.queued

    @property
    def lifecycle_counts(self) -> LifecycleCounts:
        """See :attr:`servecore.Controller.lifecycle_counts`."""
        return self.controller.lifecycle_counts

    @property
    def unrecorded_deaths(self) -> dict[str, str]:
        """See :attr:`servecore.Controller.unrecorded_deaths`."""
        return self.controller.unrecorded_deaths

    def recent_events(self) -> tuple[LifecycleEvent, ...]:
        """See :meth:`servecore.Controller.recent_events`."""
        return self._run_sync(self.controller.recent_events)

    @property
    def active_router(self) -> Router | None:
        """The router behind the handles, or ``None`` before the first handle."""
        return self.controller.active_router

    @property
    def router(self) -> Router:
        """The router behind the handles (made on first use, on the trio thread)."""
        return self._run_sync(lambda: self.controller.router)

    def router_statistics(self) -> RouterStatistics | None:
        """The router's query counts and load, or ``None`` if no handle was ever made."""
        return self._run_sync(self.controller.router_statistics)

    def add_table_listener(self, listener: Callable[[RoutingTable], None]) -> None:
        """Call ``listener(table)`` now and on every routing-table change; it runs on the
        controller's trio thread, so it must return quickly and not block."""
        self._run_sync(self.controller.add_table_listener, listener)

    def run_in_background(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Start the async ``fn(*args, task_status=...)`` in the controller's nursery
        (it stops with the controller); return what it passes to ``task_status.started``."""
        return self._run(self.controller.run_in_background, fn, *args)

    # -- commands (block until saved and carried out) -------------------------------------

    def submit(self, command: Command) -> State:
        """Apply any command; see :meth:`servecore.Controller.submit`."""
        return self._run(self.controller.submit, command)

    def create_endpoint(
        self,
        name: str,
        route: str | None = None,
        methods: Any = ("GET",),
        *,
        http_request: bool = False,
    ) -> State:
        """Register an endpoint, with an optional HTTP route; see
        :meth:`servecore.Controller.create_endpoint`."""
        return self._run(
            self.controller.create_endpoint, name, route, methods, http_request=http_request
        )

    def update_endpoint(
        self,
        name: str,
        route: str | None = None,
        methods: Any = ("GET",),
        *,
        http_request: bool = False,
    ) -> State:
        """Give an endpoint a new route, methods or ``http_request`` in place; see
        :meth:`servecore.Controller.update_endpoint`."""
        return self._run(
            self.controller.update_endpoint, name, route, methods, http_request=http_request
        )

    def delete_endpoint(self, name: str) -> State:
        """Remove an endpoint and its route."""
        return self._run(self.controller.delete_endpoint, name)

    def create_backend(
        self,
        tag: str,
        target: Any,
        *,
        init_args: tuple[Any, ...] | list[Any] = (),
        init_kwargs: Mapping[str, Any] | None = None,
        config: BackendConfig | None = None,
        **config_fields: Any,
    ) -> State:
        """Register ``target`` under ``tag`` and start its replicas (see the async
        :meth:`servecore.Controller.create_backend`)."""
        return self._run(
            self.controller.create_backend,
            tag,
            target,
            init_args=init_args,
            init_kwargs=init_kwargs,
            config=config,
            **config_fields,
        )

    def delete_backend(self, tag: str) -> State:
        """Stop all replicas of a backend and forget it."""
        return self._run(self.controller.delete_backend, tag)

    def update_backend(
        self,
        tag: str,
        target: Any,
        *,
        init_args: tuple[Any, ...] | list[Any] = (),
        init_kwargs: Mapping[str, Any] | None = None,
        config: BackendConfig | None = None,
        **config_fields: Any,
    ) -> State:
        """Give a backend a new definition in place, rolling its replicas (see the
        async :meth:`servecore.Controller.update_backend`)."""
        return self._run(
            self.controller.update_backend,
            tag,
            target,
            init_args=init_args,
            init_kwargs=init_kwargs,
            config=config,
            **config_fields,
        )

    def set_backend_config(self, tag: str, config: BackendConfig) -> State:
        """Replace a backend's whole config."""
        return self._run(self.controller.set_backend_config, tag, config)

    def update_backend_config(self, tag: str, **changes: Any) -> State:
        """Change some fields of a backend's config."""
        return self._run(self.controller.update_backend_config, tag, **changes)

    def set_traffic(self, endpoint: str, traffic: Mapping[str, float]) -> State:
        """Split ``endpoint``'s traffic by weight; weights are >= 0 and sum to 1."""
        return self._run(self.controller.set_traffic, endpoint, traffic)

    def set_shadow_traffic(self, endpoint: str, backend: str, proportion: float) -> State:
        """Copy ``proportion`` of ``endpoint``'s queries to ``backend`` (0 removes it)."""
        return self._run(self.controller.set_shadow_traffic, endpoint, backend, proportion)

    def retry_backend(self, tag: str) -> State:
        """Start a FAILED backend again with the same config (see the async
        :meth:`servecore.Controller.retry_backend`)."""
        return self._run(self.controller.retry_backend, tag)

    def clock(self) -> float:
        """The controller's autoscaling clock now (see :meth:`servecore.Controller.clock`)."""
        return self._run_sync(self.controller.clock)

    def report_load(self, backend: str, ongoing: float, now: float | None = None) -> State:
        """Report a backend's load to its autoscaler (see the async
        :meth:`servecore.Controller.report_load`)."""
        return self._run(self.controller.report_load, backend, ongoing, now)

    def report_router_load(
        self, reporter: str, ongoing: Mapping[str, int], wake: Iterable[str] = ()
    ) -> None:
        """Count a router's load from another process (see
        :meth:`servecore.Controller.report_router_load`)."""
        self._run_sync(self.controller.report_router_load, reporter, ongoing, wake)

    def remote_load(self) -> dict[str, dict[str, int]]:
        """See :meth:`servecore.Controller.remote_load`."""
        return self._run_sync(self.controller.remote_load)

    def settle(self) -> None:
        """Wait until replacements of dead replicas and retried saves have settled."""
        self._run(self.controller.settle)

    def resync(self) -> bool:
        """Correct the state against the runtime's live replicas now; see
        :meth:`servecore.Controller.resync`."""
        return self._run(self.controller.resync)

    def status(self) -> Status:
        """See :meth:`servecore.Controller.status`."""
        return self._run(self.controller.status)

    def apply(self, app: App | str | os.PathLike[str]) -> Applied:
        """Make the controller match an app file; see :func:`servecore.apply`."""
        from servecore.app import apply

        return self._run(apply, self.controller, app)

    # -- handles --------------------------------------------------------------------------

    def use_router(self, router: Router) -> Router:
        """Serve handles through ``router`` (e.g. with a seeded ``random.Random``)."""
        return self._run_sync(self.controller.use_router, router)

    def get_handle(self, endpoint: str) -> SyncHandle:
        """A blocking handle for ``endpoint``, callable from any thread."""
        handle = self._run_sync(self.controller.get_handle, endpoint)
        assert self._token is not None
        return SyncHandle(handle, self._token)

    def serve_http(
        self, bind: str = "127.0.0.1:8000", *, timeout_s: float | None = 30.0, max_depth: int = 100
    ) -> str:
        """Serve the endpoints' routes over HTTP in the background (see
        :mod:`servecore.http`; needs ``servecore[http]``) until :meth:`close`.
        ``max_depth`` bounds how deeply a JSON body may nest (400 past it).

        Returns the URL it listens on (``bind`` may use port 0)."""
        from servecore.http import serve_http

        async def start() -> list[str]:
            binds: list[str] = await self.controller.run_in_background(
                functools.partial(
                    serve_http, self.controller, bind, timeout_s=timeout_s, max_depth=max_depth
                )
            )
            return binds

        binds = self._run(start)
        return next((b for b in binds if b.startswith("http://")), binds[0])

    # -- life -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the controller (replicas of in-process runtimes stop) and its thread.

        Idempotent; re-raises an error the controller hit while closing.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        if self._closing is not None and self._token is not None:
            # If the run already ended, it kept its error (if any) for us.
            # run_sync_soon, not from_thread: close() must work from any thread, even
            # one that runs another trio loop.
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._closing.set)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> SyncController:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start(
    runtime: str | Runtime = "threads",
    store: Store | Callable[[bytes], object] | None = None,
    *,
    name: str = "servecore",
    **options: Any,
) -> SyncController:
    """Open a controller for a synchronous host: trio runs in a background thread.

    Takes the arguments of :func:`~servecore.open_controller` (``runtime_kwargs``,
    ``limits``, ``resync_interval_s``, ``save_in_thread``...); returns once recovery
    is done, or raises what opening raised (e.g. :class:`~servecore.StoreLocked`)::

        with servecore.start(store=servecore.SQLiteStore(".servecore/state.db")) as ctl:
            ...
    """
    return SyncController(runtime, store, name=name, **options)
