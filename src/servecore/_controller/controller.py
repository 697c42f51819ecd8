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
  two agree nothing is written (that, and recovery at open, is
  :mod:`servecore._controller.recovery`);
* nothing user code or a caller sends can kill it: bad arguments are typed errors,
  text is made encodable before it reaches the state, and a failure in an effect task
  is raised to the command that caused it, never into the controller's nursery.

On a store with a lease (:class:`~servecore.PostgresStore`) it heartbeats from its own
loop, so the lease is renewed only while that loop runs, and it *steps down* once the
lease is lost (taken by another, or not renewed before it expired): no more effects,
commits, resyncs or autoscaling; handles and the HTTP ingress refuse queries with
:class:`~servecore.SteppedDown` rather than route by a table that may be stale; and the
host's ``on_step_down`` is called once (docs/design.md §3).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, get_args

import trio

from servecore._controller.autoscaler import AUTOSCALE_INTERVAL_S, Autoscaler, check_report_time
from servecore._controller.committer import Committer
from servecore._controller.effects import EffectGroup, EffectRunner
from servecore._controller.recovery import Recovery
from servecore._controller.remote_load import RemoteLoad, check_load_report
from servecore._controller.replica_lifecycle import (
    LifecycleCounts,
    LifecycleEvent,
    ReplicaLifecycle,
)
from servecore._controller.standby import open_store
from servecore._controller.status import Status, live_status
from servecore._controller.target_checks import refuse_unservable_target
from servecore._controller.writer import Writer
from servecore._core.errors import (
    BackendStartError,
    InvalidCommand,
    InvalidConfig,
    LeaseLost,
    RuntimeFenced,
    SteppedDown,
)
from servecore._core.limits import Limits
from servecore._core.transitions import (
    BackendConfig,
    BackendStatus,
    Command,
    CreateBackend,
    CreateEndpoint,
    DeleteBackend,
    DeleteEndpoint,
    LoadReport,
    Message,
    RetryBackend,
    RoutingTable,
    SetBackendConfig,
    SetShadowTraffic,
    SetTraffic,
    State,
    UpdateBackend,
    UpdateEndpoint,
)
from servecore._core.validation import check_name, check_namespace
from servecore._serving.router_stats import RouterStatistics
from servecore.router import Handle, Router
from servecore.runtimes import (
    Runtime,
    check_runtime_methods,
    resolve_runtime,
    runtime_name,
)
from servecore.stores import BlobStore, MemoryStore, Store, as_store

__all__ = ["Controller", "open_controller"]

log = logging.getLogger("servecore.controller")

_COMMANDS = get_args(Command)
#: The default interval of the level-triggered resync with the runtime.
RESYNC_INTERVAL_S = 10.0
#: How long the controller waits for a runtime's control calls (``list_replicas``,
#: ``open``; a stop waits this long past its own drain timeout) before giving up on them.
RUNTIME_CALL_TIMEOUT_S = 30.0
#: How long the controller waits for a store call on its writer thread (a ``load``, a
#: ``commit``) before it fails the messages waiting on it with ``StoreUnresponsive``:
#: well above an fsync on a slow disk, and above a ``PostgresStore``'s own deadlines
#: (so that the store's exact answer comes first).
STORE_CALL_TIMEOUT_S = 60.0
#: The longest wait between two heartbeats to a leased store (shorter for short leases).
HEARTBEAT_MAX_S = 1.0


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
        on_step_down: Callable[[SteppedDown], object] | None = None,
        runtime_name: str | None = None,
        runtime_call_timeout_s: float = RUNTIME_CALL_TIMEOUT_S,
        store_call_timeout_s: float = STORE_CALL_TIMEOUT_S,
    ) -> None:
        self.runtime = runtime
        #: The runtime's registered name, recorded in the checkpoint (None: not known).
        self.runtime_name = runtime_name
        self.runtime_call_timeout_s = runtime_call_timeout_s
        self.store = store
        self.name = name
        self.limits = limits or Limits()
        self.resync_interval_s = resync_interval_s
        self._nursery = nursery
        # Its events are dated by the controller's clock, set below.
        self._lifecycle = ReplicaLifecycle(runtime, clock=lambda: self._clock())
        self._table = RoutingTable()
        self._table_listeners: list[Callable[[RoutingTable], None]] = []
        self._on_step_down = on_step_down
        self._stepped_down: SteppedDown | None = None
        self._announced_step_down: SteppedDown | None = None
        # The periodic loops (resync, autoscaling): cancelled when the controller steps down.
        self._loop_scopes: list[trio.CancelScope] = []
        self._effects = EffectRunner(
            runtime=runtime,
            nursery=nursery,
            execute=self._execute,
            lifecycle=self._lifecycle,
            push_table=self._push_table,
            report_load=self._report_load,
            on_fenced=self._runtime_fenced,
            call_timeout_s=runtime_call_timeout_s,
        )
        # An in-memory store has nothing to wait for: its commits run inline.
        in_memory = isinstance(store, MemoryStore)
        self._writer = Writer(name) if save_in_thread and not in_memory else None
        self._committer = Committer(
            store=store,
            where=str(getattr(store, "where", repr(store))),
            limits=self.limits,
            dispatch=self._effects.dispatch,
            writer=self._writer,
            on_commit=self._lifecycle.checkpoint_saved,
            call_timeout_s=store_call_timeout_s,
            late_group=self._effects.background,
        )
        self._where = self._committer.where
        self._router: Router | None = None  # made on first get_handle (or use_router)
        self.autoscale_interval_s = autoscale_interval_s
        if clock is None:
            # trio's clock (so tests can mock it), anchored to the wall clock, so the
            # times in a checkpoint mean the same to the next process.
            epoch = time.time() - trio.current_time()

            def clock() -> float:
                return epoch + trio.current_time()

        self._clock: Callable[[], float] = clock
        self._remote_load = RemoteLoad(clock=self._clock)
        self._autoscaler = Autoscaler(
            state=lambda: self._committer.state,
            clock=self._clock,
            ongoing=self._ongoing_queries,
            remote=self._remote_load.ongoing,
            report=self._report_load,
            background=self._effects.background,
            start_soon=nursery.start_soon,
        )
        self._recovery = Recovery(
            runtime=runtime,
            runtime_name=runtime_name,
            namespace=name,
            store=store,
            committer=self._committer,
            effects=self._effects,
            lifecycle=self._lifecycle,
            execute=self._execute,
            on_fenced=self._runtime_fenced,
            stepped_down=lambda: self._stepped_down is not None,
            start_soon=nursery.start_soon,
            call_timeout_s=runtime_call_timeout_s,
        )

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

    @property
    def stepped_down(self) -> SteppedDown | None:
        """Why this controller stepped down (it lost its store's lease), or ``None``
        while it leads. Once stepped down it orders no effects, commits nothing, and
        its handles raise this error; close it (docs/design.md §3). It is published
        only after ``on_step_down`` has returned, so a host that sees it has been told."""
        return self._announced_step_down

    @property
    def queued(self) -> int:
        """Messages waiting for the committer now (for tests that build a group commit)."""
        return self._committer.queued

    @property
    def lifecycle_counts(self) -> LifecycleCounts:
        """What this controller has done to replicas since it opened, by backend
        (starts, ready, failures, stops, deaths) and its commits: what metrics export."""
        return self._lifecycle.counts

    @property
    def unrecorded_deaths(self) -> dict[str, str]:
        """Replicas the runtime reported dead whose death is not saved yet (the store
        does not answer), with why they died: status shows them ``DIED`` and
        readiness counts them out before the checkpoint says so."""
        return {
            tag: event.reason or "the replica died"
            for tag, event in self._effects.unrecorded_deaths().items()
        }

    def recent_events(self) -> tuple[LifecycleEvent, ...]:
        """The last lifecycle events of this controller's replicas, oldest first
        (starting, ready, failed, stopping, stopped, dead, and one ``recovered`` at
        start-up), at most :data:`~servecore._controller.replica_lifecycle.RECENT_EVENTS`:
        what the dashboard's "recent events" shows. Kept in memory only; the
        ``servecore.lifecycle`` log has them all."""
        return self._lifecycle.recent()

    @property
    def active_router(self) -> Router | None:
        """The router behind this controller's handles, or ``None`` before the first
        handle (unlike :attr:`router`, it never makes one)."""
        return self._router

    def router_statistics(self) -> RouterStatistics | None:
        """The router's query counts and load, or ``None`` if no handle was ever made."""
        return self._router.statistics() if self._router is not None else None

    async def run_in_background(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Start ``fn(*args, task_status=...)`` in the controller's nursery (it stops with
        the controller) and return what it passes to ``task_status.started()``."""
        return await self._nursery.start(fn, *args)

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
        if isinstance(command, (CreateBackend, UpdateBackend)):
            refuse_unservable_target(command.tag, command.target, self.runtime)
        return await self._submit(lambda _state: command)

    async def _submit(self, make: Callable[[State], Command]) -> State:
        """Apply the command ``make(state)`` builds from the state under the lock (so a
        read-modify-write such as :meth:`update_backend_config` cannot lose a change)."""
        group = EffectGroup()
        command = await self._execute(make, group)
        await group.wait()
        if isinstance(command, (CreateBackend, SetBackendConfig, UpdateBackend, RetryBackend)):
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
        self,
        name: str,
        route: str | None = None,
        methods: Any = ("GET",),
        *,
        http_request: bool = False,
    ) -> State:
        """Register an endpoint, with an optional HTTP route. With ``http_request`` the
        HTTP ingress passes its target a :class:`~servecore.Request` for every request
        (JSON ones too), as Ray Serve passes a Starlette request."""
        return await self.submit(
            CreateEndpoint(name=name, route=route, methods=methods, http_request=http_request)
        )

    async def update_endpoint(
        self,
        name: str,
        route: str | None = None,
        methods: Any = ("GET",),
        *,
        http_request: bool = False,
    ) -> State:
        """Give endpoint ``name`` a new route, methods or ``http_request`` in place: its
        traffic and its handles stay, and queries meet no gap. ``route=None`` takes
        its route away."""
        return await self.submit(
            UpdateEndpoint(name=name, route=route, methods=methods, http_request=http_request)
        )

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

    async def update_backend(
        self,
        tag: str,
        target: Any,
        *,
        init_args: tuple[Any, ...] | list[Any] = (),
        init_kwargs: Mapping[str, Any] | None = None,
        config: BackendConfig | None = None,
        **config_fields: Any,
    ) -> State:
        """Give backend ``tag`` a new definition (target, init arguments, config) in
        place: its replicas roll, old ones serving until new ones run, and the
        endpoints routing to it keep answering throughout::

            await ctl.update_backend("echo", "myapp.models:Echo", init_kwargs={"v": 2})

        Restating the current definition does nothing. Raises
        :class:`~servecore.BackendStartError` if the new replicas cannot start (the
        backend is then FAILED; replicas of the old definition that were still
        running keep serving until they are replaced).
        """
        if config is not None and not isinstance(config, BackendConfig):
            raise InvalidConfig(
                "config",
                config,
                "must be a servecore.BackendConfig; or pass its fields as keywords, e.g. "
                "update_backend(tag, target, num_replicas=2)",
                backend=tag if isinstance(tag, str) else None,
            )
        cfg = (config or BackendConfig()).evolve(**config_fields)
        return await self.submit(
            UpdateBackend(
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
        group = EffectGroup()
        await self._report_load(report, group)
        await group.wait()
        return self._state

    def report_router_load(
        self, reporter: str, ongoing: Mapping[str, int], wake: Iterable[str] = ()
    ) -> None:
        """Count the load of a router in another process (a ``servecore.connect``
        client: the control socket's ``load`` op) in autoscaling decisions.

        ``ongoing`` is that router's queries running or queued per backend now; it
        replaces ``reporter``'s last report, and is added to this controller's own
        router's load at each sample until ``reporter`` has not reported for
        :data:`~servecore._controller.remote_load.STALE_AFTER_S` (then it is aged out).
        Backends this controller does not know are ignored (the client's table may be a
        step behind). Each backend in ``wake`` has a query waiting for it with no
        replica to take it: one scaled to zero starts a replica at once, as for a query
        waiting in this process. A malformed report raises ``InvalidConfig`` and counts
        for nothing."""
        reporter, counts, woken = check_load_report(reporter, ongoing, wake)
        self._remote_load.report(reporter, counts)
        for tag in woken:
            if tag in self._state.backends:
                self._autoscaler.on_demand(tag)

    def remote_load(self) -> dict[str, dict[str, int]]:
        """The last load report of each router in another process still counted
        (not aged out), by reporter: what :meth:`report_router_load` keeps."""
        return self._remote_load.reporters()

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
        self, message: Message | Callable[[State], Message | None], group: EffectGroup
    ) -> Message | None:
        """Step, commit, adopt, dispatch (:class:`~servecore._controller.committer.Committer`),
        the effects going to ``group``. ``message`` may be built from the state it is
        stepped on; a builder that returns None skips the step."""
        if self._stepped_down is not None:
            raise self._stepped_down.lease_lost.with_outcome(
                "this controller stepped down: it was not applied, and nothing was written"
            )
        try:
            return await self._committer.run(message, group)
        except LeaseLost as exc:
            self._step_down(exc)
            raise

    async def _report_load(
        self, report: LoadReport | Callable[[State], LoadReport | None], group: EffectGroup
    ) -> None:
        """Step a load report; it is committed only if it changed a decision (the commit
        path adopts a report that only refreshed ``observations`` without writing)."""
        await self._execute(report, group)

    def _ongoing_queries(self) -> dict[str, int]:
        return self._router.ongoing_queries() if self._router is not None else {}

    def _push_table(self, table: RoutingTable) -> None:
        self._table = table
        for listener in self._table_listeners:
            try:
                listener(table)
            except Exception:
                log.exception("a routing-table listener failed; the controller carries on")

    # -- convergence ------------------------------------------------------------------------

    async def resync(self) -> bool:
        """Compare the runtime's live replicas with the state now and correct the state
        (what the periodic resync does); return whether anything changed. A controller
        that stepped down does nothing (its successor resyncs)."""
        return await self._recovery.resync()

    # -- the lease: heartbeats and stepping down -----------------------------------------

    async def _keep_lease(self, heartbeat: Callable[[], None], lost: Callable[[], Any]) -> None:
        """Heartbeat to the store from this loop (its renewer renews only while they
        come) and step down once it says the lease is lost."""
        lease_s = getattr(self.store, "lease_s", None)
        interval = HEARTBEAT_MAX_S
        if isinstance(lease_s, (int, float)) and lease_s > 0:
            interval = min(interval, lease_s / 10)
        while self._stepped_down is None:
            heartbeat()
            loss = lost()
            if isinstance(loss, LeaseLost):
                self._step_down(loss)
                return
            await trio.sleep(interval)

    def _runtime_fenced(self, fenced: RuntimeFenced) -> None:
        """The runtime refused to act: a newer leader took it over. Step down, with the
        store's own word on the lease if it has one yet."""
        lost = getattr(self.store, "lease_lost", None)
        loss = lost() if callable(lost) else None
        if not isinstance(loss, LeaseLost):
            loss = LeaseLost(
                self._where,
                str(getattr(self.store, "holder", self.name)),
                fenced.epoch,
                f"the controller that took runtime {fenced.where} over",
                fenced.newer_epoch,
                "the runtime refused to act for this controller",
            )
        self._step_down(loss)

    def _step_down(self, loss: LeaseLost) -> None:
        """Stop acting on a lease this controller no longer holds (once)."""
        if self._stepped_down is not None:
            return
        self._stepped_down = stepped = SteppedDown(loss)
        log.error("%s", stepped)
        for scope in self._loop_scopes:
            scope.cancel()
        self._effects.refusing = True
        if self._router is not None:
            self._router.refuse(lambda: SteppedDown(loss))
        if self._on_step_down is not None:
            try:
                self._on_step_down(stepped)
            except Exception:
                log.exception("the on_step_down callback failed; the controller stays down")
        self._announced_step_down = stepped

    async def _periodic(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run a periodic loop until the controller closes or steps down."""
        with trio.CancelScope() as scope:
            self._loop_scopes.append(scope)
            if self._stepped_down is not None:
                return
            await fn(*args)

    # -- life -----------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Keep the store's lease (if it has one), recover (:mod:`.recovery`), then start
        the periodic loops."""
        heartbeat = getattr(self.store, "heartbeat", None)
        lost = getattr(self.store, "lease_lost", None)
        if callable(heartbeat) and callable(lost):
            self._nursery.start_soon(self._keep_lease, heartbeat, lost)
        await self._recovery.recover()
        if self.resync_interval_s is not None:
            self._nursery.start_soon(
                self._periodic, self._recovery.resync_forever, self.resync_interval_s
            )
        if self.autoscale_interval_s is not None:
            self._nursery.start_soon(
                self._periodic, self._autoscaler.run, self.autoscale_interval_s
            )

    async def settle(self) -> None:
        """Wait until background work (replacements of dead replicas, retries of
        events whose save failed) has settled."""
        await self._effects.background.settled.wait()

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
        attach = getattr(self.runtime, "attach_router", None)
        if attach is not None:  # replica code in this process calls endpoints through it
            attach(router)
        stepped = self._stepped_down
        if stepped is not None:
            router.refuse(lambda: SteppedDown(stepped.lease_lost))
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
    on_step_down: Callable[[SteppedDown], object] | None = None,
    runtime_call_timeout_s: float = RUNTIME_CALL_TIMEOUT_S,
    store_call_timeout_s: float = STORE_CALL_TIMEOUT_S,
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
    On such a store the controller heartbeats from its trio loop (the lease is renewed
    only while the loop runs) and steps down once the lease is lost: taken by another,
    or not renewed before it expired (a loop blocked, the database out of reach). Then
    it orders no effects and commits nothing, its handles and the HTTP ingress refuse
    queries with :class:`~servecore.SteppedDown`, ``/-/healthz`` answers 503,
    :attr:`Controller.stepped_down` says why, and ``on_step_down(error)`` is called once
    on the trio thread (a host usually exits, or closes this controller).
    The runtime is opened with the lease's epoch too: a standby takes over the
    runtime of a leader frozen past its lease, and the old leader's runtime refuses
    to act (:class:`~servecore.RuntimeFenced`), whereupon it steps down as well.
    ``runtime_call_timeout_s`` bounds the runtime's control calls: a ``list_replicas``
    (or ``open``) not answered within it fails recovery with
    :class:`~servecore.RuntimeUnresponsive` and skips a resync (logged); a stop is
    given up on that long after its own drain timeout (the resync finds what lingers).
    ``store_call_timeout_s`` (default 60 s) bounds each store call (``load``,
    ``commit``) on the writer thread: one not answered within it fails the commands
    waiting on it with :class:`~servecore.StoreUnresponsive` (a
    :class:`~servecore.CheckpointOutcomeUnknown`: the commit may still land, and is
    then adopted and carried out), and frees the controller; commands that come while
    the call is unanswered wait for it at most as long, then fail without being sent.
    Keep it above the store's own deadlines (a ``PostgresStore``'s ``call_timeout_s``),
    so the store's exact answer comes first. With ``save_in_thread=False`` the store
    is called on the trio thread, where no deadline can interrupt it.
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
    if (
        isinstance(runtime_call_timeout_s, bool)
        or not isinstance(runtime_call_timeout_s, (int, float))
        or not 0 < runtime_call_timeout_s < math.inf
    ):
        raise InvalidConfig(
            "runtime_call_timeout_s",
            runtime_call_timeout_s,
            "must be a positive, finite number of seconds",
        )
    if (
        isinstance(store_call_timeout_s, bool)
        or not isinstance(store_call_timeout_s, (int, float))
        or not 0 < store_call_timeout_s < math.inf
    ):
        raise InvalidConfig(
            "store_call_timeout_s",
            store_call_timeout_s,
            "must be a positive, finite number of seconds",
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
    if on_step_down is not None and not callable(on_step_down):
        raise InvalidConfig(
            "on_step_down", on_step_down, "must be a function taking the SteppedDown error"
        )
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
    store_closed = False
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
                on_step_down=on_step_down,
                runtime_name=runtime_name(runtime),
                runtime_call_timeout_s=runtime_call_timeout_s,
                store_call_timeout_s=store_call_timeout_s,
            )
            try:
                await ctl._recover()
                yield ctl
            finally:
                nursery.cancel_scope.cancel()
                store_closer = getattr(st, "close", None)
                if store_closer is not None and ctl._committer.after_unanswered(store_closer):
                    # The store is closed once the call in progress returns: until then
                    # it stays locked, so no other controller writes beside that call.
                    log.warning(
                        "closing the controller while the store has not answered %s: the "
                        "store is closed once it answers",
                        ctl._committer.unanswered,
                    )
                    store_closed = True
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
        if closer is not None and not store_closed:
            closer()
