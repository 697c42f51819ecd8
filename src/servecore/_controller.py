"""The controller: the imperative shell around the pure core, on trio.

It is the only place that sequences I/O, always in this order::

    step(state, message) -> save(checkpoint) -> adopt new state -> carry out effects
                                                                     │
          events (started, failed, stopped, died) <──────────────────┘

The lock covers step + save + dispatch only. Starting and stopping replicas run as
tasks outside it, so a slow constructor never blocks another command, and ``ctl.state``
never blocks at all. Each command waits for the effects it caused (and the events they
fed back) to settle before it returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from servecore import _lifecycle
from servecore._checkpoint import decode, encode
from servecore._core import (
    BackendConfig,
    BackendStatus,
    Command,
    CreateBackend,
    CreateEndpoint,
    DeleteBackend,
    DeleteEndpoint,
    Event,
    Message,
    Recover,
    ReplicaStarted,
    ReplicaStartFailed,
    ReplicaStopped,
    RoutingTable,
    SetBackendConfig,
    SetShadowTraffic,
    SetTraffic,
    StartReplica,
    State,
    StopReplica,
    UpdateRouter,
    step,
)
from servecore._errors import BackendStartError, CheckpointError
from servecore._status import Status, live_status
from servecore.router import Handle, Router  # issue 3: serving queries
from servecore.runtimes import Runtime, resolve_runtime
from servecore.stores import Store, as_store

__all__ = ["Controller", "open_controller"]

log = logging.getLogger("servecore.controller")

#: How often saving an event's new state is retried before the waiting command gives up.
_EVENT_SAVE_ATTEMPTS = 5


class _Group:
    """The effect tasks one command caused, including those its events caused in turn."""

    def __init__(self) -> None:
        self.pending = 0
        self.settled = trio.Event()
        self.settled.set()
        self.errors: list[BaseException] = []

    def enter(self) -> None:
        if self.pending == 0:
            self.settled = trio.Event()
        self.pending += 1

    def leave(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.settled.set()


class Controller:
    """A running controller. Get one from :func:`open_controller`; do not construct.

    Every command method returns once the new state is saved and its effects have been
    carried out (replicas RUNNING, or stopped). Invalid commands raise a
    :class:`~servecore.CommandError` and change nothing.
    """

    def __init__(
        self,
        *,
        runtime: Runtime,
        store: Store,
        name: str,
        nursery: trio.Nursery,
        save_in_thread: bool = True,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.name = name
        self._nursery = nursery
        self._state = State()
        self._seq = 0
        self._lock = trio.Lock()
        self._table = RoutingTable()
        self._table_listeners: list[Callable[[RoutingTable], None]] = []
        # A stop for a tag waits for that tag's start still in flight (same tag, one order).
        self._in_flight: dict[str, trio.Event] = {}
        self._background = _Group()
        self._where = str(getattr(store, "where", repr(store)))
        self._save_in_thread = save_in_thread
        self._router: Router | None = None  # made on first get_handle (or use_router)

    # -- queries (never block) ------------------------------------------------------------

    @property
    def state(self) -> State:
        """The last saved state."""
        return self._state

    @property
    def seq(self) -> int:
        """The sequence number of the last saved checkpoint."""
        return self._seq

    @property
    def routing_table(self) -> RoutingTable:
        """The table last pushed to the router."""
        return self._table

    async def status(self) -> Status:
        """What ``servecore status`` shows: endpoints, backends, replicas (with pids
        where the runtime has them) and the router's load, as one frozen value."""
        return live_status(self)

    def add_table_listener(self, listener: Callable[[RoutingTable], None]) -> None:
        """Call ``listener(table)`` now and on every ``UpdateRouter`` (the router does)."""
        self._table_listeners.append(listener)
        listener(self._table)

    # -- commands -------------------------------------------------------------------------

    async def submit(self, command: Command) -> State:
        """Apply any command; return the state once its effects have settled."""
        return await self._submit(lambda _state: command)

    async def _submit(self, make: Callable[[State], Command]) -> State:
        """Apply the command ``make(state)`` builds from the state under the lock (so a
        read-modify-write such as :meth:`update_backend_config` cannot lose a change)."""
        group = _Group()
        command = await self._execute(make, group)
        await group.settled.wait()
        if group.errors:
            raise group.errors[0]
        if isinstance(command, (CreateBackend, SetBackendConfig)):
            backend = self._state.backends.get(command.tag)
            if backend is not None and backend.status is BackendStatus.FAILED:
                raise BackendStartError(command.tag, backend.last_error or "unknown error")
        return self._state

    async def create_endpoint(
        self, name: str, route: str | None = None, methods: Any = ("GET",)
    ) -> State:
        """Register an endpoint, with an optional HTTP route."""
        return await self.submit(CreateEndpoint(name=name, route=route, methods=methods))

    async def delete_endpoint(self, name: str) -> State:
        """Remove an endpoint and its route."""
        return await self.submit(DeleteEndpoint(name=name))

    async def create_backend(
        self,
        tag: str,
        target: Any,
        *,
        init_args: tuple[Any, ...] | list[Any] = (),
        init_kwargs: Mapping[str, Any] | None = None,
        config: BackendConfig | None = None,
        **config_fields: Any,
    ) -> State:
        """Register ``target`` (an import path, or the class/function itself) under
        ``tag`` and start its replicas. Config fields may be given as keywords::

            await ctl.create_backend("echo", "myapp.models:Echo", num_replicas=2)

        Raises :class:`~servecore.BackendStartError` (carrying the replica's own error)
        if replicas cannot start; the backend then stays registered as FAILED.
        """
        cfg = (config or BackendConfig()).evolve(**config_fields)
        return await self.submit(
            CreateBackend(
                tag=tag,
                target=target,
                init_args=tuple(init_args),
                init_kwargs=dict(init_kwargs or {}),
                config=cfg,
            )
        )

    async def delete_backend(self, tag: str) -> State:
        """Stop all replicas of a backend and forget it."""
        return await self.submit(DeleteBackend(tag=tag))

    async def set_backend_config(self, tag: str, config: BackendConfig) -> State:
        """Replace a backend's whole config."""
        return await self.submit(SetBackendConfig(tag=tag, config=config))

    async def update_backend_config(self, tag: str, **changes: Any) -> State:
        """Change some fields of a backend's config: ``update_backend_config("a",
        num_replicas=3)``. Unknown keys raise :class:`~servecore.InvalidConfig`."""

        def command(state: State) -> SetBackendConfig:
            backend = state.backends.get(tag)
            # An unknown tag: the core raises BackendNotFound naming the known ones.
            config = backend.config if backend is not None else BackendConfig()
            return SetBackendConfig(tag=tag, config=config.evolve(**changes))

        return await self._submit(command)

    async def set_traffic(self, endpoint: str, traffic: Mapping[str, float]) -> State:
        """Split ``endpoint``'s traffic by weight; weights are >= 0 and sum to 1."""
        return await self.submit(SetTraffic(endpoint=endpoint, traffic=traffic))

    async def set_shadow_traffic(self, endpoint: str, backend: str, proportion: float) -> State:
        """Copy ``proportion`` of ``endpoint``'s queries to ``backend`` (0 removes it)."""
        return await self.submit(
            SetShadowTraffic(endpoint=endpoint, backend=backend, proportion=proportion)
        )

    # -- the one path every message takes --------------------------------------------------

    async def _execute(
        self, message: Message | Callable[[State], Message], group: _Group
    ) -> Message:
        async with self._lock:
            if callable(message):
                message = message(self._state)
            transition = step(self._state, message)  # CommandError propagates unchanged
            if transition.state is self._state and not transition.effects:
                return message
            data = encode(transition.state, self._seq + 1)
            saving = time.perf_counter()
            try:
                if self._save_in_thread:
                    await trio.to_thread.run_sync(self.store.save, data)
                else:
                    self.store.save(data)
            except Exception as exc:
                raise CheckpointError(
                    f"saving checkpoint {self._seq + 1} to {self._where} failed: {exc!r}; "
                    f"the command was not applied and nothing was started or stopped"
                ) from exc
            _lifecycle.checkpoint_saved(self, time.perf_counter() - saving, len(data))
            self._seq += 1
            self._state = transition.state
            for effect in transition.effects:
                if isinstance(effect, UpdateRouter):
                    self._push_table(effect.table)
                elif isinstance(effect, StopReplica):
                    self._spawn(group, self._stop, effect, group)
                else:
                    self._spawn(group, self._start, effect, group)
            return message

    def _push_table(self, table: RoutingTable) -> None:
        self._table = table
        for listener in self._table_listeners:
            listener(table)

    def _spawn(self, group: _Group, fn: Callable[..., Any], *args: Any) -> None:
        group.enter()

        async def run() -> None:
            try:
                await fn(*args)
            finally:
                group.leave()

        self._nursery.start_soon(run)

    async def _start(self, effect: StartReplica, group: _Group) -> None:
        done = self._in_flight[effect.tag] = trio.Event()
        _lifecycle.starting(self, effect)
        try:
            await self.runtime.start_replica(effect)
        except Exception as exc:
            log.warning("replica %s failed to start: %r", effect.tag, exc)
            event: Event = ReplicaStartFailed(tag=effect.tag, reason=_describe(exc))
            _lifecycle.start_failed(self, effect.tag, _describe(exc))
        else:
            event = ReplicaStarted(tag=effect.tag)
            _lifecycle.ready(self, effect.tag)
        finally:
            done.set()
            if self._in_flight.get(effect.tag) is done:
                del self._in_flight[effect.tag]
        await self._feed(event, group)

    async def _stop(self, effect: StopReplica, group: _Group) -> None:
        starting = self._in_flight.get(effect.tag)
        if starting is not None:
            await starting.wait()
        _lifecycle.stopping(self, effect.tag)
        try:
            await self.runtime.stop_replica(effect.tag, effect.timeout_s)
        except Exception as exc:
            # The replica may linger; recovery will find and stop it as STOPPING/orphan.
            log.warning("replica %s did not stop cleanly: %r", effect.tag, exc)
        _lifecycle.stopped(self, effect.tag)
        await self._feed(ReplicaStopped(tag=effect.tag), group)

    async def _feed(self, event: Event, group: _Group) -> None:
        """Step a runtime's answer through the same path as a command."""
        delay = 0.05
        for attempt in range(_EVENT_SAVE_ATTEMPTS):
            try:
                await self._execute(event, group)
                return
            except CheckpointError as exc:
                if attempt == _EVENT_SAVE_ATTEMPTS - 1:
                    # The checkpoint still says what it said; recovery will reconcile.
                    group.errors.append(exc)
                    return
                log.warning("retrying %r after a failed save: %s", event, exc)
                await trio.sleep(delay)
                delay *= 2

    def _report(self, event: Event) -> None:
        """The callback runtimes report deaths through (called on the trio thread)."""
        _lifecycle.reported(self, event)
        self._spawn(self._background, self._feed, event, self._background)

    # -- life -----------------------------------------------------------------------------

    async def _recover(self) -> None:
        data = await trio.to_thread.run_sync(self.store.load)
        if data is not None:
            self._state, self._seq = decode(data, self._where)
        await self.runtime.open(namespace=self.name, report=self._report)
        live = await self.runtime.list_replicas()
        _lifecycle.recovered(self, self._state, live)
        group = _Group()
        await self._execute(Recover(live=live), group)
        await group.settled.wait()
        if group.errors:
            raise group.errors[0]

    async def settle(self) -> None:
        """Wait until replacements of dead replicas (background work) have settled."""
        await self._background.settled.wait()

    # -- serving queries: the router and handles (issue 3) ---------------------------------
    # One self-contained block: the router is just another listener of this controller's
    # routing table, created on first use in the controller's nursery.

    @property
    def router(self) -> Router:
        """The router behind this controller's handles (made on first use)."""
        if self._router is None:
            return self.use_router(Router(self.runtime))
        return self._router

    def use_router(self, router: Router) -> Router:
        """Serve handles through ``router``, e.g. one with a seeded random source::

            ctl.use_router(servecore.Router(ctl.runtime, rng=random.Random(42)))

        Call it before the first :meth:`get_handle`; a controller has one router.
        """
        if self._router is not None:
            raise RuntimeError("this controller already has a router; call use_router first")
        router.start(self._nursery)
        self.add_table_listener(router.update)
        self._router = router
        return router

    def get_handle(self, endpoint: str) -> Handle:
        """A handle sending queries to ``endpoint``::

            result = await ctl.get_handle("echo").call({"text": "hi"})

        The endpoint is looked up on each call, so a handle may be made before it exists.
        """
        return self.router.handle(endpoint)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@asynccontextmanager
async def open_controller(
    runtime: str | Runtime = "threads",
    store: Store | Callable[[bytes], object] | None = None,
    *,
    name: str = "servecore",
    runtime_options: Mapping[str, Any] | None = None,
    save_in_thread: bool = True,
) -> AsyncIterator[Controller]:
    """Open a controller: load the checkpoint, ask the runtime which replicas are alive,
    step ``Recover(live)``, save, and carry out its effects, then yield it::

        async with servecore.open_controller(
            runtime="threads", store=servecore.SQLiteStore("state.db")
        ) as ctl:
            await ctl.create_backend("echo", "myapp.models:Echo", num_replicas=2)

    ``runtime`` is a name (``"threads"``, ``"subprocess"``, ``"ray"`` or a plugin's) or
    an instance; ``store`` a :class:`~servecore.stores.Store`, a save-only callable, or
    ``None`` for memory. ``name`` is the namespace the runtime keeps replicas under.
    ``save_in_thread=False`` saves on the trio thread: commands are faster (no thread
    hand-off), but the loop, and every async query on it, waits out each fsync.
    On exit, in-process replicas stop; out-of-process ones keep running, to be found
    again by the next controller on the same store.
    """
    rt = resolve_runtime(runtime, **dict(runtime_options or {}))
    st = as_store(store)
    opener = getattr(st, "open", None)
    if opener is not None:
        opener()
    try:
        async with trio.open_nursery() as nursery:
            ctl = Controller(
                runtime=rt, store=st, name=name, nursery=nursery, save_in_thread=save_in_thread
            )
            try:
                await ctl._recover()
                yield ctl
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await rt.close()
    except BaseExceptionGroup as group:
        # One error (the host's own, or a crash) is raised as itself, not wrapped, so
        # `except servecore.CommandError` around the block works as users expect.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise
    finally:
        closer = getattr(st, "close", None)
        if closer is not None:
            closer()
