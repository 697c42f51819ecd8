"""The controller: the imperative shell around the pure core, on trio.

It is the only place that sequences I/O, always in this order::

    step(state, message) -> commit(change set) -> adopt new state -> carry out effects
                                                                        │
          events (started, failed, stopped, died) <─────────────────────┘

The commit path (:mod:`servecore._controller.committer`) steps every message, commits only what it
changed, and commits messages that arrive while a commit is in flight together, in
one commit (group commit). Starting and stopping replicas run as tasks outside it, so
a slow constructor never blocks another command, and ``ctl.state`` never blocks at
all. Each command waits for the effects it caused (and the events they fed back) to
settle before it returns.

It converges whatever it loses, the way Kubernetes controllers do (level-triggered):

* an event whose save fails is never dropped: it is retried with capped backoff until
  the store takes it (the command waiting on it is told exactly what was applied);
* every ``resync_interval_s`` the runtime's live replicas are compared with the state
  (:class:`~servecore.Resync`), correcting whatever a lost event left behind; when the
  two agree nothing is written;
* nothing user code or a caller sends can kill it: bad arguments are typed errors,
  text is made encodable before it reaches the state, and a failure in an effect task
  is raised to the command that caused it, never into the controller's nursery.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, get_args

import attrs
import trio

from servecore._controller import lifecycle as _lifecycle
from servecore._controller.autoscaler import AUTOSCALE_INTERVAL_S, Autoscaler, check_report_time
from servecore._controller.committer import Committer, Writer, what
from servecore._controller.standby import open_store
from servecore._controller.status import Status, live_status
from servecore._core.errors import (
    BackendStartError,
    CheckpointError,
    InvalidCommand,
    InvalidConfig,
    LeaseLost,
)
from servecore._core.limits import Limits
from servecore._core.records import load_records
from servecore._core.transitions import (
    EARLY_DEATH_S,
    BackendConfig,
    BackendStatus,
    Command,
    CreateBackend,
    CreateEndpoint,
    DeleteBackend,
    DeleteEndpoint,
    Event,
    LoadReport,
    Message,
    Recover,
    ReplicaDied,
    ReplicaStarted,
    ReplicaStartFailed,
    ReplicaStopped,
    Resync,
    RetryBackend,
    RoutingTable,
    SetBackendConfig,
    SetShadowTraffic,
    SetTraffic,
    StartReplica,
    State,
    StopReplica,
    UpdateRouter,
    same_checkpoint,
)
from servecore._core.validation import check_name, check_namespace, reason_text
from servecore.router import Handle, Router
from servecore.runtimes import Runtime, check_runtime_methods, resolve_runtime
from servecore.stores import BlobStore, MemoryStore, Store, as_store

__all__ = ["Controller", "open_controller"]

log = logging.getLogger("servecore.controller")

_COMMANDS = get_args(Command)
_EVENTS = get_args(Event)
#: Retries of an event whose save failed start here and double up to the cap.
_RETRY_FIRST_S = 0.01
_RETRY_CAP_S = 2.0
#: The default interval of the level-triggered resync with the runtime.
RESYNC_INTERVAL_S = 10.0


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


class _Start:
    """A start in flight: when it is done, and how to cancel it (a stop of the same
    tag does, once the stop's own timeout has passed)."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.scope = trio.CancelScope()


class Controller:
    """A running controller. Get one from :func:`open_controller`; do not construct.

    Every command method returns once the commit holding its change is durable and its
    effects have been carried out (replicas RUNNING, or stopped). Invalid commands raise a
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
        limits: Limits | None = None,
        resync_interval_s: float | None = RESYNC_INTERVAL_S,
        autoscale_interval_s: float | None = AUTOSCALE_INTERVAL_S,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.name = name
        self.limits = limits or Limits()
        self.resync_interval_s = resync_interval_s
        self._nursery = nursery
        # An in-memory store has nothing to wait for: its commits run inline.
        in_memory = isinstance(store, MemoryStore)
        self._writer = Writer(name) if save_in_thread and not in_memory else None
        self._committer = Committer(
            store=store,
            where=str(getattr(store, "where", repr(store))),
            limits=self.limits,
            dispatch=self._dispatch,
            writer=self._writer,
            on_commit=lambda seconds, size: _lifecycle.checkpoint_saved(self, seconds, size),
        )
        self._table = RoutingTable()
        self._table_listeners: list[Callable[[RoutingTable], None]] = []
        # A stop for a tag waits (up to its timeout) for that tag's start still in flight.
        self._starts: dict[str, _Start] = {}
        # Tags with a start, a stop or an unsaved event in flight: a resync leaves them be.
        self._busy: Counter[str] = Counter()
        # When each replica was seen to start (trio time), to tell a crash loop.
        self._started_at: dict[str, float] = {}
        self._background = _Group()
        self._where = self._committer.where
        self._router: Router | None = None  # made on first get_handle (or use_router)
        self.autoscale_interval_s = autoscale_interval_s
        self._autoscaler = Autoscaler(self)
        if clock is None:
            # trio's clock (so tests can mock it), anchored to the wall clock, so the
            # times in a checkpoint mean the same to the next process.
            epoch = time.time() - trio.current_time()

            def clock() -> float:
                return epoch + trio.current_time()

        self._clock: Callable[[], float] = clock

    # -- queries (never block) ------------------------------------------------------------

    @property
    def state(self) -> State:
        """The last committed state."""
        return self._committer.state

    @property
    def seq(self) -> int:
        """The sequence number of the last commit."""
        return self._committer.seq

    @property
    def _state(self) -> State:
        return self._committer.state

    @property
    def _seq(self) -> int:
        return self._committer.seq

    @property
    def routing_table(self) -> RoutingTable:
        """The table last pushed to the router."""
        return self._table

    async def status(self) -> Status:
        """What ``servecore status`` shows: endpoints, backends, replicas (with pids
        where the runtime has them) and the router's load, as one frozen value."""
        return live_status(self)

    def clock(self) -> float:
        """The time autoscaling decisions are taken at, in seconds (see
        ``open_controller(clock=...)``)."""
        return self._clock()

    def add_table_listener(self, listener: Callable[[RoutingTable], None]) -> None:
        """Call ``listener(table)`` now and on every ``UpdateRouter`` (the router does)."""
        self._table_listeners.append(listener)
        listener(self._table)

    # -- commands -------------------------------------------------------------------------

    async def submit(self, command: Command) -> State:
        """Apply any command; return the state once its effects have settled."""
        if not isinstance(command, _COMMANDS):
            raise InvalidCommand(command)
        return await self._submit(lambda _state: command)

    async def _submit(self, make: Callable[[State], Command]) -> State:
        """Apply the command ``make(state)`` builds from the state under the lock (so a
        read-modify-write such as :meth:`update_backend_config` cannot lose a change)."""
        group = _Group()
        command = await self._execute(make, group)
        if group.pending:  # (waiting on a set event would cost a scheduling round)
            await group.settled.wait()
        if group.errors:
            raise group.errors[0]
        if isinstance(command, (CreateBackend, SetBackendConfig, RetryBackend)):
            backend = self._state.backends.get(command.tag)
            if backend is not None and backend.status is BackendStatus.FAILED:
                raise BackendStartError(command.tag, backend.last_error or "unknown error")
        if isinstance(command, SetTraffic):
            self._warn_failed(command)
        return self._state

    def _warn_failed(self, command: SetTraffic) -> None:
        for tag in command.traffic:
            b = self._state.backends.get(tag)
            if b is not None and b.status is BackendStatus.FAILED:
                text = (
                    f"endpoint {command.endpoint!r} now sends traffic to backend {tag!r}, "
                    f"which is FAILED ({b.last_error}); its queries fail with NoReplicaError "
                    f"until retry_backend({tag!r}) or a new config starts it"
                )
                log.warning("%s", text)
                warnings.warn(text, RuntimeWarning, stacklevel=4)

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
        if config is not None and not isinstance(config, BackendConfig):
            raise InvalidConfig(
                "config",
                config,
                "must be a servecore.BackendConfig; or pass its fields as keywords, e.g. "
                "create_backend(tag, target, num_replicas=2)",
                backend=tag if isinstance(tag, str) else None,
            )
        cfg = (config or BackendConfig()).evolve(**config_fields)
        return await self.submit(
            CreateBackend(
                tag=tag,
                target=target,
                init_args=init_args,
                init_kwargs={} if init_kwargs is None else init_kwargs,
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
        check_name("backend", tag)
        BackendConfig().evolve(**changes)  # refuse bad fields before taking the lock

        def command(state: State) -> SetBackendConfig:
            backend = state.backends.get(tag)
            # An unknown tag: the core raises BackendNotFound naming the known ones.
            config = backend.config if backend is not None else BackendConfig()
            fields = changes
            if (
                backend is not None
                and changes.get("autoscaling", ...) is None
                and "num_replicas" not in changes
            ):
                # Autoscaling off: keep the count it runs now as the fixed count.
                fields = {**changes, "num_replicas": backend.wanted_replicas}
            return SetBackendConfig(tag=tag, config=config.evolve(**fields))

        return await self._submit(command)

    async def report_load(self, backend: str, ongoing: float, now: float | None = None) -> State:
        """Report a backend's load to its autoscaler: ``ongoing`` queries running or
        queued (a mean over its look-back window), at ``now`` (default
        :meth:`clock`). Returns once any decision it caused is saved and carried out.
        The controller reports the router's load by itself every
        ``autoscale_interval_s``; this is for hosts that measure load elsewhere, and for
        tests. A report that changes no decision writes nothing. ``now`` must be within
        :data:`~servecore._controller.autoscaler.MAX_REPORT_SKEW_S` of :meth:`clock`
        (``InvalidConfig`` otherwise), and ``backend`` must exist (``BackendNotFound``)."""
        report = LoadReport(
            backend=backend, ongoing=ongoing, now=check_report_time(now, self.clock())
        )
        group = _Group()
        await self._autoscaler.report(report, group)
        await group.settled.wait()
        if group.errors:
            raise group.errors[0]
        return self._state

    async def retry_backend(self, tag: str) -> State:
        """Start a FAILED backend again with the same definition and config (after
        fixing what made it fail: a file, a service it needs). A no-op otherwise."""
        return await self.submit(RetryBackend(tag=tag))

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
        self, message: Message | Callable[[State], Message | None], group: _Group
    ) -> Message | None:
        """Step, commit, adopt, dispatch (:class:`~servecore._controller.committer.Committer`), the
        effects going to ``group``. ``message`` may be built from the state it is
        stepped on; a builder that returns None skips the step."""
        return await self._committer.run(message, group)

    def _dispatch(self, effect: Any, group: _Group) -> None:
        if isinstance(effect, UpdateRouter):
            self._push_table(effect.table)
        elif isinstance(effect, StopReplica):
            self._spawn(group, self._stop, effect, group)
        elif isinstance(effect, StartReplica):
            # Registered now, not when the task runs: a stop dispatched right after
            # (in the same batch) must find the start it has to wait for.
            self._starts[effect.tag] = start = _Start()
            self._spawn(group, self._start, effect, group, start)
        else:  # an effect this shell does not know is a bug: say so loudly
            raise TypeError(f"the controller cannot carry out {effect!r}")

    def _push_table(self, table: RoutingTable) -> None:
        self._table = table
        for listener in self._table_listeners:
            try:
                listener(table)
            except Exception:
                log.exception("a routing-table listener failed; the controller carries on")

    def _spawn(self, group: _Group, fn: Callable[..., Any], *args: Any) -> None:
        group.enter()

        async def run() -> None:
            try:
                await fn(*args)
            except Exception as exc:
                # Never into the nursery: the command that caused it hears of it.
                log.exception("controller task %s failed", getattr(fn, "__name__", fn))
                group.errors.append(exc)
            finally:
                group.leave()

        self._nursery.start_soon(run)

    async def _start(self, effect: StartReplica, group: _Group, start: _Start) -> None:
        tag = effect.tag
        self._busy[tag] += 1
        event: Event | None = None
        _lifecycle.starting(self, effect)
        try:
            with start.scope:
                if effect.delay_s > 0:
                    log.info("replica %s starts in %.2gs (backing off)", tag, effect.delay_s)
                    await trio.sleep(effect.delay_s)
                await self.runtime.start_replica(effect)
                event = ReplicaStarted(tag=tag)
                _lifecycle.ready(self, tag)
            if start.scope.cancelled_caught:
                log.warning("replica %s was stopped while it was still starting", tag)
        except Exception as exc:
            log.warning("replica %s failed to start: %s", tag, _describe(exc))
            event = ReplicaStartFailed(tag=tag, reason=_describe(exc))
            _lifecycle.start_failed(self, tag, event.reason)
        finally:
            start.done.set()
            if self._starts.get(tag) is start:
                del self._starts[tag]
        try:
            if event is not None:
                if isinstance(event, ReplicaStarted):
                    self._started_at[tag] = trio.current_time()
                await self._feed(event, group)
        finally:
            self._unbusy(tag)

    async def _stop(self, effect: StopReplica, group: _Group) -> None:
        tag = effect.tag
        self._busy[tag] += 1
        try:
            deadline = trio.current_time() + effect.timeout_s
            start = self._starts.get(tag)
            if start is not None:
                # Never wait on a hung start longer than the stop's own timeout.
                with trio.move_on_at(deadline):
                    await start.done.wait()
                if not start.done.is_set():
                    start.scope.cancel()
                    with trio.move_on_after(1.0):
                        await start.done.wait()
            remaining = max(0.0, deadline - trio.current_time())
            _lifecycle.stopping(self, tag)
            try:
                await self.runtime.stop_replica(tag, remaining)
            except Exception as exc:
                # The replica may linger; the resync or recovery finds and stops it.
                log.warning("replica %s did not stop cleanly: %s", tag, _describe(exc))
            self._started_at.pop(tag, None)
            _lifecycle.stopped(self, tag)
            await self._feed(ReplicaStopped(tag=tag), group)
        finally:
            self._unbusy(tag)

    def _unbusy(self, tag: str) -> None:
        self._busy[tag] -= 1
        if self._busy[tag] <= 0:
            del self._busy[tag]

    async def _feed(self, event: Event, group: _Group) -> None:
        """Step a runtime's answer through the same path as a command. If its save
        fails, the event is kept and retried (never dropped), and the waiting command
        is told what was and was not recorded."""
        try:
            await self._execute(event, group)
            return
        except LeaseLost as exc:
            # Fenced out: another controller owns the store now; retrying cannot help.
            group.errors.append(exc)
            return
        except CheckpointError as exc:
            group.errors.append(
                CheckpointError(
                    f"the command was saved and its effects were carried out, but {exc}; "
                    f"the controller keeps retrying in the background (await ctl.settle() "
                    f"to wait for it)"
                )
            )
            log.warning("%s; retrying", exc)
        tag = getattr(event, "tag", None)
        if tag is not None:
            self._busy[tag] += 1
        self._spawn(self._background, self._retry, event, tag)

    async def _retry(self, event: Event, tag: str | None) -> None:
        delay = _RETRY_FIRST_S
        try:
            while True:
                await trio.sleep(delay)
                try:
                    await self._execute(event, self._background)
                    log.info("%s recorded after the store recovered", what(event))
                    return
                except LeaseLost as exc:
                    log.error("%s; giving up on %s (this controller is fenced)", exc, what(event))
                    return
                except CheckpointError as exc:
                    delay = min(_RETRY_CAP_S, delay * 2)
                    log.warning("%s; retrying in %.2gs", exc, delay)
        finally:
            if tag is not None:
                self._unbusy(tag)

    def _report(self, event: Event) -> None:
        """The callback runtimes report deaths through (called on the trio thread)."""
        if not isinstance(event, _EVENTS):
            log.error("the runtime reported %r, which is not a servecore event; ignored", event)
            return
        if isinstance(event, LoadReport):  # a runtime that measures load itself
            self._spawn(self._background, self._autoscaler.report, event, self._background)
            return
        if isinstance(event, ReplicaDied) and event.uptime_s is None:
            started = self._started_at.pop(event.tag, None)
            if started is not None:
                event = attrs.evolve(event, uptime_s=max(0.0, trio.current_time() - started))
        _lifecycle.reported(self, event)
        self._spawn(self._background, self._feed, event, self._background)

    # -- convergence ------------------------------------------------------------------------

    async def resync(self) -> bool:
        """Compare the runtime's live replicas with the state now and correct the state
        (what the periodic resync does); return whether anything changed."""
        seq = self._seq
        live = await self.runtime.list_replicas()
        now = trio.current_time()

        listed = self._state

        def message(state: State) -> Resync | None:
            # (Only what is checkpointed counts: load reports refresh observations all
            # the time, and must not keep a slow listing from ever being used.)
            if self._seq != seq or not same_checkpoint(listed, state):
                return None  # the state moved while we listed: the next round decides
            proven: frozenset[str] = frozenset()
            if any(b.early_deaths for b in state.backends.values()):
                proven = frozenset(
                    t for t, at in self._started_at.items() if now - at >= EARLY_DEATH_S
                )
            return Resync(live=live, busy=frozenset(self._busy), proven=proven)

        await self._execute(message, self._background)
        return self._seq != seq

    async def _resync_forever(self, interval_s: float) -> None:
        while True:
            await trio.sleep(interval_s)
            try:
                await self.resync()
            except Exception as exc:
                log.warning("resync with the runtime failed (next try in %gs): %r", interval_s, exc)

    # -- life -----------------------------------------------------------------------------

    async def _recover(self) -> None:
        seq, records = await self._committer.call(self.store.load)
        self._committer.adopt_loaded(load_records(seq, records, self._where), seq)
        self._nursery.start_soon(self._committer.serve)
        opener = getattr(self.runtime, "open", None)
        if opener is not None:
            await opener(
                **_open_kwargs(
                    opener, namespace=self.name, report=self._report, store_id=_store_id(self.store)
                )
            )
        live = await self.runtime.list_replicas()
        _lifecycle.recovered(self, self._state, live)
        group = _Group()
        await self._execute(Recover(live=live), group)
        # Replicas found alive have been running for an unknown while: not a crash loop.
        self._started_at.update(dict.fromkeys(live, -math.inf))
        await group.settled.wait()
        if group.errors:
            raise group.errors[0]
        if self.resync_interval_s is not None:
            self._nursery.start_soon(self._resync_forever, self.resync_interval_s)
        if self.autoscale_interval_s is not None:
            self._nursery.start_soon(self._autoscaler.run, self.autoscale_interval_s)

    async def settle(self) -> None:
        """Wait until background work (replacements of dead replicas, retries of
        events whose save failed) has settled."""
        await self._background.settled.wait()

    # -- serving queries: the router and handles ------------------------------------------
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
        router.add_demand_listener(self._autoscaler.on_demand)
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
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    # Runtimes attach what the replica printed before failing as notes.
    notes = [n for n in getattr(exc, "__notes__", ()) if isinstance(n, str)]
    return reason_text("\n".join([described, *notes]))


def _store_id(store: Store) -> str | None:
    """What identifies ``store`` to a runtime, so replicas are adopted only by a
    controller on the same store; ``None`` for a store that cannot say (nothing is
    checked then)."""
    found = getattr(store, "store_id", None)
    return found if isinstance(found, str) else None


def _open_kwargs(opener: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """The keywords ``opener`` accepts: newer ones (``store_id``) only if it takes them,
    so plugins written against an older protocol keep working."""
    try:
        params = inspect.signature(opener).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params or k in ("namespace", "report")}


@asynccontextmanager
async def open_controller(
    runtime: str | Runtime = "threads",
    store: Store | BlobStore | Callable[[bytes], object] | None = None,
    *,
    name: str = "servecore",
    runtime_kwargs: Mapping[str, Any] | None = None,
    runtime_options: Mapping[str, Any] | None = None,
    save_in_thread: bool = True,
    limits: Limits | None = None,
    resync_interval_s: float | None = RESYNC_INTERVAL_S,
    standby: bool = False,
    autoscale_interval_s: float | None = AUTOSCALE_INTERVAL_S,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[Controller]:
    """Open a controller: load the checkpoint, ask the runtime which replicas are alive,
    step ``Recover(live)``, commit, and carry out its effects, then yield it::

        async with servecore.open_controller(
            runtime="threads", store=servecore.SQLiteStore("state.db")
        ) as ctl:
            await ctl.create_backend("echo", "myapp.models:Echo", num_replicas=2)

    ``runtime`` is a name (``"threads"``, ``"subprocess"``, ``"ray"`` or a plugin's) or
    an instance; ``runtime_kwargs`` go to a named runtime's constructor
    (``runtime_options`` is the old name of the same). ``store`` is a key-value
    :class:`~servecore.stores.Store`, a whole-blob store (``save``/``load``), a
    save-only callable, or ``None`` for memory.
    ``name`` is the namespace the runtime keeps replicas under. ``limits`` caps what a
    command may ask for (:class:`~servecore.Limits`). Every ``resync_interval_s``
    (``None``: never) the runtime's live replicas are compared with the state and the
    state corrected, so no lost event leaves it wrong for long.
    Every ``autoscale_interval_s`` (``None``: never) the router's load is reported to
    each autoscaling backend's policy, at the time ``clock()`` gives (default: trio's
    clock anchored to the wall clock, so a checkpointed countdown survives a restart).
    Commits run on one writer thread; ``save_in_thread=False`` commits on the trio
    thread instead: commands are a little faster (no hand-off), but the loop, and every
    async query on it, waits out each fsync.
    On exit, in-process replicas stop; out-of-process ones keep running, to be found
    again by the next controller on the same store.
    ``standby=True`` (with a store that has a lease, :class:`~servecore.PostgresStore`)
    waits until the controller holding the store is gone, then takes over: it recovers,
    adopting the replicas still alive, and serves.
    """
    check_namespace(name)
    if limits is not None and not isinstance(limits, Limits):
        raise InvalidConfig("limits", limits, "must be a servecore.Limits")
    if resync_interval_s is not None and (
        isinstance(resync_interval_s, bool)
        or not isinstance(resync_interval_s, (int, float))
        or not 0 < resync_interval_s < math.inf
    ):
        raise InvalidConfig(
            "resync_interval_s", resync_interval_s, "must be a positive number of seconds or None"
        )
    for field, interval in (("autoscale_interval_s", autoscale_interval_s),):
        if interval is not None and (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not 0 < interval < math.inf
        ):
            raise InvalidConfig(field, interval, "must be a positive number of seconds or None")
    if clock is not None and not callable(clock):
        raise InvalidConfig("clock", clock, "must be a function returning seconds, or None")
    if runtime_options is not None:
        if runtime_kwargs is not None:
            raise InvalidConfig(
                "runtime_options",
                runtime_options,
                "give runtime_kwargs or runtime_options, not both",
            )
        runtime_kwargs = runtime_options
    rt = resolve_runtime(runtime, **dict(runtime_kwargs or {}))
    check_runtime_methods(rt)
    st = as_store(store)
    await open_store(st, standby=standby)
    try:
        async with trio.open_nursery() as nursery:
            ctl = Controller(
                runtime=rt,
                store=st,
                name=name,
                nursery=nursery,
                save_in_thread=save_in_thread,
                limits=limits,
                resync_interval_s=resync_interval_s,
                autoscale_interval_s=autoscale_interval_s,
                clock=clock,
            )
            try:
                await ctl._recover()
                yield ctl
            finally:
                nursery.cancel_scope.cancel()
                if ctl._writer is not None:
                    ctl._writer.stop()
                closer = getattr(rt, "close", None)
                if closer is not None:
                    with trio.CancelScope(shield=True):
                        await closer()
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
