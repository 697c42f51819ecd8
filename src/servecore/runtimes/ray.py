"""The ``ray`` runtime: each replica is a named, detached Ray actor (DESIGN §6).

Ray is an optional extra (``pip install 'servecore[ray]'``) and this is the only module
that imports it; ``import servecore`` never does::

    runtime = RayRuntime(address="auto")  # or "host:port" of the GCS, or "ray://..."
    store = servecore.SQLiteStore("state.db")
    async with servecore.open_controller(runtime=runtime, store=store) as ctl:
        await ctl.create_backend("echo", "myapp.models:Echo", num_replicas=2,
                                 runtime_options={"num_cpus": 0.5})

How replicas map onto Ray
    A replica is an actor named by its tag (``"echo#3"``) in the Ray namespace of the
    controller (its ``name``, or the runtime's ``namespace=`` override), created with
    ``lifetime="detached"`` so it outlives the controller's process, and with
    ``max_restarts=0``: an actor that dies stays dead, and the controller replaces it
    under a new tag. Starting is get-or-create by name (``get_if_exists=True``), then a
    ``ready()`` call that imports the target and builds the replica object; a failure
    there is raised as the user's own exception, and the broken actor is killed.

    A replica serves one batch at a time, in arrival order, like the threads and
    subprocess runtimes (the same ``servecore._batch`` rules: ``@servecore.batch``
    targets, ``reconfigure(user_config)``; targets must be plain ``def``). Two more
    threads per actor (a Ray concurrency group) serve the runtime's own calls, so a
    busy replica can still be watched.

Finding replicas again
    :meth:`RayRuntime.list_replicas` reads Ray's named-actor listing for this namespace
    only, keeps the names that look like replica tags, and checks that each one is (or
    becomes) ready, so a controller that crashed mid-start finds exactly the replicas
    that can serve.

Deaths
    For each replica the runtime keeps one long-running ``watch()`` call in flight
    (renewed every ``health_check_period_s``); Ray fails it the moment the actor dies,
    and the death is reported as :class:`~servecore.ReplicaDied` at once -- not only
    when a query fails. Calls in flight on a dead actor raise
    :class:`~servecore.ReplicaDiedError`. As in Ray Serve (and the threads runtime), a
    replica object with a ``check_health()`` method has it called every
    ``health_check_period_s``, between batches; if it raises, the replica is killed and
    reported dead.

Calls
    A batch is one Ray actor call. Its result is delivered into trio by a completion
    callback on the object reference (on a Ray thread): a lone call is woken through a
    pooled event file descriptor, and while calls overlap, results that arrive together
    are handed to trio with one ``run_sync_soon``. No thread per call, no polling. A
    user exception is raised as its own type (rebuilt even when its constructor takes
    other arguments than its ``args``), with the replica's traceback as a note.

Targets are imported by the Ray workers, so they must be importable there: installed
in the workers' environment, or shipped with a ``runtime_env``. By default Ray puts the
driver's working directory and script directory on the workers' path.

``runtime_options`` (per backend) are Ray actor options: :data:`RUNTIME_OPTIONS`
(``num_cpus``, ``num_gpus``, ``memory``, ``resources``, ``accelerator_type``,
``runtime_env``, ``scheduling_strategy``, ``label_selector``). Any other key makes the
start fail with :class:`~servecore.InvalidConfig` naming it and the known ones.

:class:`LocalRayCluster` starts a private single-node Ray head on loopback (a free
port, a temporary directory) and stops exactly the processes it started -- for tests,
benchmarks and demos.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import outcome
import ray
import ray.exceptions
import ray.util
import trio

from servecore._batch import prepare_replica
from servecore._core import ReplicaDied, StartReplica
from servecore._errors import InvalidConfig, ReplicaDiedError
from servecore.runtimes._protocol import Query, Report
from servecore.runtimes._remote_errors import rebuild_exception
from servecore.runtimes._waker import Waker

__all__ = ["RUNTIME_OPTIONS", "LocalRayCluster", "RayRuntime", "actor_options"]

log = logging.getLogger("servecore.runtimes.ray")

#: Ray actor options a backend may set in ``BackendConfig.runtime_options``.
RUNTIME_OPTIONS: frozenset[str] = frozenset(
    {
        "num_cpus",
        "num_gpus",
        "memory",
        "resources",
        "accelerator_type",
        "runtime_env",
        "scheduling_strategy",
        "label_selector",
    }
)

#: A Ray actor name that is a replica tag: ``"{backend}#{n}"``.
_TAG = re.compile(r"^[^\s#/][^\s#]*#\d+$")

#: How many times a start is retried when the actor dies before it is ready (a dying
#: actor of an earlier attempt may still hold the name for a moment).
_START_ATTEMPTS = 3

#: How long a stop waits for Ray to confirm the actor's death after ``ray.kill``.
_KILL_CONFIRM_S = 15.0

#: "The actor is dead" (as opposed to "unreachable for now"); older Rays only have the base.
_ActorDiedError: type[BaseException] = getattr(
    ray.exceptions, "ActorDiedError", ray.exceptions.RayActorError
)


# ---------------------------------------------------------------------------------------
# Options


def _number(backend: str, key: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidConfig(
            f"runtime_options[{key!r}]", value, "must be a number >= 0", backend=backend
        )


def actor_options(effect: StartReplica) -> dict[str, Any]:
    """The Ray actor options of ``effect``'s backend, validated.

    Unknown keys raise :class:`~servecore.InvalidConfig` naming the key and the known
    ones; the values of known keys are checked for their shape here, and fully by Ray.
    """
    given = effect.config.runtime_options
    unknown = sorted(set(given) - RUNTIME_OPTIONS)
    if unknown:
        known = sorted(RUNTIME_OPTIONS)
        raise InvalidConfig(
            "runtime_options",
            given,
            f"the ray runtime does not know the key(s) {unknown}; known: {known}",
            backend=effect.backend,
        )
    options = dict(given)
    for key in ("num_cpus", "num_gpus", "memory"):
        if key in options:
            _number(effect.backend, key, options[key])
    resources = options.get("resources")
    if resources is not None:
        if not isinstance(resources, Mapping):
            raise InvalidConfig(
                "runtime_options['resources']",
                resources,
                "must be a mapping of resource name to amount",
                backend=effect.backend,
            )
        for name, amount in resources.items():
            _number(effect.backend, f"resources[{name!r}]", amount)
    strategy = options.get("scheduling_strategy")
    if strategy is not None and strategy not in ("DEFAULT", "SPREAD"):
        raise InvalidConfig(
            "runtime_options['scheduling_strategy']",
            strategy,
            "must be 'DEFAULT' or 'SPREAD' (checkpoints are JSON, so no strategy objects)",
            backend=effect.backend,
        )
    return options


# ---------------------------------------------------------------------------------------
# Exceptions on their way home


class _Carried(Exception):
    """An exception raised in a replica, packed so that it survives the trip home.

    Ray pickles a task's exception, and unpickling calls its constructor with its
    ``args`` -- which fails for types that take other arguments
    (``InvalidConfig(field, value, why)``). So the replica sends the exception's
    pickle, its ``__dict__``, its type's import path, message and traceback text, and
    the caller rebuilds it (:func:`_rebuild`).
    """

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(info)
        self.info = info


def _dumps(obj: Any) -> bytes | None:
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)
    except Exception:
        return None
    return data


def _carry(exc: BaseException) -> _Carried:
    """(replica) Pack ``exc`` for the caller."""
    cls = type(exc)
    return _Carried(
        {
            "pickled": _dumps(exc),
            "state": _dumps(vars(exc)) if hasattr(exc, "__dict__") else None,
            "module": cls.__module__,
            "qualname": cls.__qualname__,
            "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc)),
        }
    )


def _rebuild(info: Mapping[str, Any], tag: str) -> BaseException:
    """(caller) The exception a replica raised, as its own type when it can be imported."""
    exc = rebuild_exception(info)
    exc.add_note(f"(raised in Ray replica {tag!r})\n{info['traceback'].rstrip()}")
    return exc


# ---------------------------------------------------------------------------------------
# The actor (runs in a Ray worker process)


@ray.remote(concurrency_groups={"servecore": 2})  # type: ignore[call-overload]
class ServecoreReplica:
    """One replica: builds the user's object once, then runs batches on it.

    Batches run in the default concurrency group, one at a time (``max_concurrency=1``).
    The runtime's own ``watch`` runs in the ``servecore`` group, on threads of its own.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self._spec = spec
        self._lock = threading.Lock()
        self._run: Callable[[Sequence[Query]], list[Any]] | None = None
        self._check: Callable[[], object] | None = None
        self._error: BaseException | None = None

    def _build(self) -> Callable[[Sequence[Query]], list[Any]]:
        with self._lock:
            if self._run is not None:
                return self._run
            if self._error is not None:
                raise self._error
            spec = self._spec
            try:
                self._run, self._check = prepare_replica(
                    spec["target"],
                    spec["init_args"],
                    spec["init_kwargs"],
                    backend=spec["backend"],
                    max_batch_size=spec["max_batch_size"],
                    user_config=spec["user_config"],
                )
            except Exception as exc:
                self._error = exc
                raise
            return self._run

    def ready(self) -> dict[str, Any]:
        """Build the replica object (once); return where it runs, and whether it has a
        ``check_health()``."""
        try:
            self._build()
        except Exception as exc:
            raise _carry(exc) from None
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "health_check": self._check is not None,
        }

    def check_health(self) -> bool:
        """Run the object's ``check_health()``: between batches, like a batch."""
        check = self._check
        if check is None:
            return False
        try:
            check()
        except Exception as exc:
            raise _carry(exc) from None
        return True

    def run(self, batch: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        """Run one batch of ``(args, kwargs)`` pairs; one result per query, in order.

        Pairs, not :class:`Query` objects, cross the wire: Ray serializes plain tuples
        faster than objects it has to pickle.
        """
        try:
            run = self._run
            if run is None:
                run = self._build()
            return run([Query(args=args, kwargs=kwargs) for args, kwargs in batch])
        except Exception as exc:
            raise _carry(exc) from None

    @ray.method(concurrency_group="servecore")
    def watch(self, period_s: float) -> bool:
        """Return after ``period_s``; Ray fails the call if the actor dies first."""
        time.sleep(period_s)
        return True


# ---------------------------------------------------------------------------------------
# The driver's connection to Ray (one per process, shared by the runtimes in it)

_connection_lock = threading.Lock()
_connection_users = 0
_connection_ours = False


def _is_loopback(address: str | None) -> bool:
    if not address or address == "auto" or "://" in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _keep_loopback() -> None:
    """Make this process's Ray driver keep a loopback address as it is.

    Ray rewrites ``127.0.0.1`` to the machine's outward address, unless it runs in its
    single-machine mode (the one it uses on macOS and Windows), which this selects.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    with contextlib.suppress(ImportError, AttributeError):
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


class _NoSigtermWarning(logging.Filter):
    """Drop Ray's warning that it set no SIGTERM handler off the main thread.

    That is what servecore wants: the host application owns its signals.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SIGTERM handler is not set")


def _connect(address: str | None, namespace: str, init_options: Mapping[str, Any]) -> None:
    """(thread) Connect this process to Ray unless it already is; count the users."""
    global _connection_users, _connection_ours
    with _connection_lock:
        if not ray.is_initialized():
            if _is_loopback(address or os.environ.get("RAY_ADDRESS")):
                _keep_loopback()
            options: dict[str, Any] = {"logging_level": logging.WARNING}
            options.update(init_options)
            quiet = _NoSigtermWarning()
            ray_log = logging.getLogger("ray._private.worker")
            ray_log.addFilter(quiet)
            try:
                ray.init(address=address, namespace=namespace, **options)
            finally:
                ray_log.removeFilter(quiet)
            _connection_ours = True
        _connection_users += 1


def _disconnect() -> None:
    global _connection_users, _connection_ours
    with _connection_lock:
        _connection_users = max(0, _connection_users - 1)
        if _connection_users == 0 and _connection_ours and ray.is_initialized():
            ray.shutdown()
            _connection_ours = False


# ---------------------------------------------------------------------------------------
# Waking trio from Ray's callback thread


class _Pending:
    """One object reference's result, on its way from Ray's thread to a trio task."""

    __slots__ = ("abandoned", "fired", "lock", "value", "waker")

    def __init__(self, waker: Waker) -> None:
        self.waker = waker
        self.value: Any = None
        self.lock = threading.Lock()
        self.fired = False  # the value is in and the waker signalled
        self.abandoned = False  # the waiting task gave up; the waker is not reused

    def complete(self, value: Any) -> None:
        """(Ray's thread) Store the value and wake the waiting task."""
        with self.lock:
            if self.abandoned:
                self.waker.close()
                return
            self.value = value
            self.fired = True
            self.waker.signal()

    def abandon(self) -> None:
        """(trio thread) The task was cancelled: drop the result, close the waker."""
        with self.lock:
            self.abandoned = True
            if self.fired:
                self.waker.close()


class _Waiter:
    """A trio task waiting for one result through :class:`_Deliveries`."""

    __slots__ = ("task",)

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task: trio.lowlevel.Task | None = task  # None once woken or given up


class _Deliveries:
    """Results handed to trio in batches: one ``run_sync_soon`` per batch.

    While many calls are in flight, waking each through its own fd costs a trio I/O
    pass per result; results that arrive together here cost one pass between them.
    """

    __slots__ = ("items", "lock", "scheduled", "token")

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.lock = threading.Lock()
        self.items: list[tuple[_Waiter, Any]] = []
        self.scheduled = False

    def post(self, waiter: _Waiter, value: Any) -> None:
        """(Ray's thread) Queue ``value`` for ``waiter``; wake trio unless it is due."""
        with self.lock:
            self.items.append((waiter, value))
            if self.scheduled:
                return
            self.scheduled = True
        with contextlib.suppress(trio.RunFinishedError):  # nobody is waiting any more
            self.token.run_sync_soon(self.deliver)

    def deliver(self) -> None:
        """(trio thread) Wake every waiter whose result is in."""
        with self.lock:
            items, self.items = self.items, []
            self.scheduled = False
        for waiter, value in items:
            task = waiter.task
            if task is not None:
                waiter.task = None
                trio.lowlevel.reschedule(task, outcome.Value(value))


def _on_done(ref: Any, callback: Callable[[Any], None]) -> None:
    """Call ``callback(value_or_error)`` on a Ray thread once ``ref`` completes."""
    on_completed = getattr(ref, "_on_completed", None)
    if on_completed is not None:
        on_completed(callback)
        return

    # Ray Client references have no _on_completed; their future() works the same way.
    def done(future: Any) -> None:
        error = future.exception()
        callback(error if error is not None else future.result())

    ref.future().add_done_callback(done)


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:400]}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------
# The runtime (the controller's side)


class _Actor:
    """What the runtime knows of one replica actor (trio thread only)."""

    __slots__ = (
        "checking",
        "checks_health",
        "dead",
        "handle",
        "idle",
        "outstanding",
        "stopping",
        "tag",
        "watching",
    )

    def __init__(self, tag: str, handle: Any, info: Mapping[str, Any] | None = None) -> None:
        self.tag = tag
        self.handle = handle
        self.checks_health = bool(info and info.get("health_check"))
        self.checking = False
        self.outstanding = 0  # calls in flight through this runtime
        self.idle: trio.Event | None = None  # set when outstanding drops to 0
        self.stopping = False  # its death is not news
        self.watching = False
        self.dead = trio.Event()


class RayRuntime:
    """Replicas as named, detached Ray actors; see the module docstring.

    ``address`` is where Ray runs: ``None`` (Ray's default: ``RAY_ADDRESS``, a cluster
    started on this machine, or else a new local instance), ``"auto"``, a GCS address
    ``"host:port"``, or a Ray Client address ``"ray://host:port"``. If this process is
    already connected to Ray, that connection is used as is.

    ``namespace`` overrides the Ray namespace (by default the controller's name).
    ``start_timeout_s`` bounds how long a replica may take to be scheduled, import its
    target and construct it. ``health_check_period_s`` is how often a replica's
    ``check_health()`` (if it has one) runs, and how often the death watch on each
    replica is renewed. ``init_options`` go to ``ray.init``. Through the controller::

        servecore.open_controller(runtime="ray", runtime_options={"address": "auto"})
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        namespace: str | None = None,
        start_timeout_s: float = 300.0,
        health_check_period_s: float = 10.0,
        init_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not start_timeout_s > 0:
            raise ValueError(f"start_timeout_s={start_timeout_s!r} must be a number > 0")
        if not health_check_period_s > 0:
            raise ValueError(
                f"health_check_period_s={health_check_period_s!r} must be a number > 0"
            )
        self.address = address
        self.namespace_override = namespace
        self.start_timeout_s = float(start_timeout_s)
        self.health_check_period_s = float(health_check_period_s)
        self.init_options = dict(init_options or {})
        #: The Ray namespace replicas live in (set by :meth:`open`).
        self.namespace: str | None = None
        self._report: Report | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._actors: dict[str, _Actor] = {}
        self._wakers: list[Waker] = []
        self._deliveries: _Deliveries | None = None
        # Tags killed for a failed health check whose names Ray may still list a moment.
        self._condemned: set[str] = set()
        self._waiting = 0  # tasks in _wait
        self._connected = False
        self._closed = False

    # -- the Runtime protocol -------------------------------------------------------------

    async def open(self, *, namespace: str, report: Report) -> None:
        """Connect to Ray (once per process) and attach to the controller ``namespace``."""
        self.namespace = self.namespace_override or namespace
        self._report = report
        self._token = trio.lowlevel.current_trio_token()
        self._deliveries = _Deliveries(self._token)
        self._closed = False
        await trio.to_thread.run_sync(_connect, self.address, self.namespace, self.init_options)
        self._connected = True

    async def close(self) -> None:
        """Detach. Replica actors keep running, to be found by the next controller."""
        self._closed = True
        self._report = None
        self._actors.clear()
        for waker in self._wakers:
            waker.close()
        self._wakers.clear()
        if self._connected:
            self._connected = False
            await trio.to_thread.run_sync(_disconnect)

    async def start_replica(self, effect: StartReplica) -> None:
        """Get or create the actor named ``effect.tag``; return once it is ready.

        A failing import or constructor is raised as the user's own exception (the
        actor is killed); unknown ``runtime_options`` raise
        :class:`~servecore.InvalidConfig`; a replica not ready within
        ``start_timeout_s`` (e.g. waiting for resources no node has) raises
        ``TimeoutError`` and is killed.
        """
        options = actor_options(effect)
        known = self._actors.get(effect.tag)
        if known is not None and not known.dead.is_set() and not known.stopping:
            return
        spec = {
            "tag": effect.tag,
            "backend": effect.backend,
            "target": effect.target,
            "init_args": effect.init_args,
            "init_kwargs": effect.init_kwargs,
            "max_batch_size": effect.config.max_batch_size,
            "user_config": effect.config.user_config,
        }
        died: BaseException | None = None
        for attempt in range(_START_ATTEMPTS):
            if attempt:
                # It died before it was ready. Perhaps a dying actor of an earlier
                # attempt still held the name: try again with a fresh one.
                await trio.sleep(0.2 * attempt)
            handle = await trio.to_thread.run_sync(self._create, effect.tag, spec, options)
            value = await self._ready(effect.tag, handle, options)
            if not isinstance(value, ray.exceptions.RayActorError):
                break
            died = value
        if isinstance(value, ray.exceptions.RayTaskError):
            await self._kill(handle, effect.tag)
            raise self._user_error(effect.tag, value)
        if isinstance(value, BaseException):
            await self._kill(handle, effect.tag)
            raise RuntimeError(
                f"replica {effect.tag!r} died as it started: {_short(died or value)}"
            ) from value
        actor = self._actors[effect.tag] = _Actor(effect.tag, handle, value)
        self._watch(actor)

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        """Let the calls in flight finish (up to ``timeout_s``), then ``ray.kill`` the
        actor and wait until Ray confirms its death. Idempotent."""
        actor = self._actors.get(tag)
        if actor is None:
            handle = await self._lookup(tag)
            if handle is None:
                return
            actor = self._actors[tag] = _Actor(tag, handle)
        actor.stopping = True
        if actor.outstanding and not actor.dead.is_set():
            actor.idle = trio.Event()
            with trio.move_on_after(timeout_s):
                await actor.idle.wait()
            if actor.outstanding:
                log.warning(
                    "replica %s still had %d calls after %ss; killing it",
                    tag,
                    actor.outstanding,
                    timeout_s,
                )
        if not actor.dead.is_set():
            self._watch(actor)  # to learn when Ray has it dead
            await self._kill(actor.handle)
            with trio.move_on_after(_KILL_CONFIRM_S):
                await actor.dead.wait()
            if not actor.dead.is_set():
                log.warning("Ray did not confirm the death of replica %s", tag)
        if self._actors.get(tag) is actor:
            del self._actors[tag]

    async def list_replicas(self) -> frozenset[str]:
        """Replica tags alive in this namespace, per Ray's named-actor listing.

        Actors this runtime has not seen yet (after a controller restart) are adopted:
        each must become ready (one whose constructor fails is killed and left out),
        and is watched from then on.
        """
        listed = await trio.to_thread.run_sync(
            lambda: ray.util.list_named_actors(all_namespaces=True)
        )
        tags = {
            entry["name"]
            for entry in listed
            if entry["namespace"] == self.namespace and _TAG.match(entry["name"])
        }
        self._condemned &= tags
        tags -= self._condemned
        alive: set[str] = set()

        async def check(tag: str) -> None:
            if await self._adopt(tag):
                alive.add(tag)

        async with trio.open_nursery() as nursery:
            for tag in tags:
                known = self._actors.get(tag)
                if known is not None and not known.dead.is_set():
                    alive.add(tag)
                else:
                    nursery.start_soon(check, tag)
        return frozenset(alive)

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        """Run ``batch`` on replica ``tag``: one Ray actor call, awaited without a thread."""
        actor = self._actors.get(tag)
        if actor is None:
            handle = None if tag in self._condemned else await self._lookup(tag)
            if handle is None:
                raise ReplicaDiedError(tag, "no such live actor in the Ray namespace")
            actor = self._actors.get(tag)
            if actor is None:
                actor = self._actors[tag] = _Actor(tag, handle)
                self._watch(actor)
        if actor.dead.is_set() or actor.stopping:
            raise ReplicaDiedError(tag, "it is stopping" if actor.stopping else "it died")
        actor.outstanding += 1
        try:
            value = await self._wait(actor.handle.run.remote([(q.args, q.kwargs) for q in batch]))
        finally:
            actor.outstanding -= 1
            if actor.outstanding == 0 and actor.idle is not None:
                actor.idle.set()
        if isinstance(value, BaseException):
            if isinstance(value, ray.exceptions.RayTaskError):
                raise self._user_error(tag, value)
            if isinstance(value, ray.exceptions.RayActorError):
                raise ReplicaDiedError(tag, _short(value))
            raise value
        result: list[Any] = value
        return result

    # -- operations -----------------------------------------------------------------------

    def kill(self, tag: str) -> None:
        """Kill replica ``tag``'s actor as a crash would (for operators and tests).

        Its death is then reported as ``ReplicaDied`` like any other. Blocks briefly.
        """
        handle = ray.get_actor(tag, namespace=self.namespace)
        ray.kill(handle, no_restart=True)

    # -- helpers --------------------------------------------------------------------------

    def _create(self, tag: str, spec: dict[str, Any], options: dict[str, Any]) -> Any:
        """(thread) Get or create the actor named ``tag``."""
        return ServecoreReplica.options(  # type: ignore[attr-defined]
            name=tag,
            namespace=self.namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=0,
            max_concurrency=1,
            **options,
        ).remote(spec)

    async def _lookup(self, tag: str) -> Any:
        """The handle of the live actor named ``tag``, or ``None``."""

        def get() -> Any:
            try:
                return ray.get_actor(tag, namespace=self.namespace)
            except ValueError:
                return None

        return await trio.to_thread.run_sync(get)

    async def _adopt(self, tag: str) -> bool:
        """Take over a listed actor: wait until it is ready, then watch it."""
        handle = await self._lookup(tag)
        if handle is None:
            return False
        value: Any = None
        with trio.move_on_after(self.start_timeout_s):
            value = await self._wait(handle.ready.remote())
            if not isinstance(value, BaseException):
                actor = self._actors.get(tag)
                if actor is None or actor.dead.is_set():
                    actor = self._actors[tag] = _Actor(tag, handle, value)
                self._watch(actor)
                return True
        if isinstance(value, ray.exceptions.RayActorError):
            return False  # died meanwhile
        log.warning(
            "replica %s found in Ray cannot serve (%s); killing it",
            tag,
            _short(value) if value is not None else f"not ready in {self.start_timeout_s}s",
        )
        await self._kill(handle, tag)
        return False

    async def _kill(self, handle: Any, tag: str | None = None) -> None:
        """``ray.kill`` the actor; with ``tag``, also wait (briefly) until its name is free,
        so that a failed start leaves nothing listed."""

        def kill() -> None:
            with contextlib.suppress(Exception):  # already dead or gone
                ray.kill(handle, no_restart=True)

        await trio.to_thread.run_sync(kill)
        if tag is not None:
            with trio.move_on_after(_KILL_CONFIRM_S):
                while await self._lookup(tag) is not None:
                    await trio.sleep(0.05)

    async def _ready(self, tag: str, handle: Any, options: Mapping[str, Any]) -> Any:
        """``handle.ready()``'s value or error; kill it and raise if it takes too long."""
        with trio.move_on_after(self.start_timeout_s):
            return await self._wait(handle.ready.remote())
        await self._kill(handle, tag)
        raise TimeoutError(
            f"replica {tag!r} was not ready within {self.start_timeout_s}s (waiting for "
            f"resources {dict(options) or '(Ray defaults)'} that no node has free, or a "
            f"slow constructor); it was killed. Check the cluster's free resources "
            f"(`ray status`) or raise the runtime's start_timeout_s"
        )

    async def _wait(self, ref: Any) -> Any:
        """The value of ``ref``, or the Ray error it failed with (returned, not raised).

        The reference's completion callback runs on a Ray thread. A lone call waits on
        an event fd that the callback signals, which wakes this task straight from
        trio's I/O manager; while other calls wait too, results go through
        :class:`_Deliveries`, so that results arriving together wake trio once. If this
        task is cancelled first, the late result is dropped. No thread per call.
        """
        if self._waiting:
            assert self._deliveries is not None
            waiter = _Waiter(trio.lowlevel.current_task())
            post = self._deliveries.post
            _on_done(ref, lambda value: post(waiter, value))

            def abort(_: Any) -> trio.lowlevel.Abort:
                waiter.task = None
                return trio.lowlevel.Abort.SUCCEEDED

            self._waiting += 1
            try:
                return await trio.lowlevel.wait_task_rescheduled(abort)
            finally:
                self._waiting -= 1
        waker = self._wakers.pop() if self._wakers else Waker()
        pending = _Pending(waker)
        _on_done(ref, pending.complete)
        self._waiting += 1
        try:
            await trio.lowlevel.wait_readable(waker.fileno)
        except BaseException:
            pending.abandon()
            raise
        finally:
            self._waiting -= 1
        waker.drain()
        self._wakers.append(waker)
        return pending.value

    def _watch(self, actor: _Actor) -> None:
        """Keep one ``watch()`` call in flight on ``actor``; its failure is a death."""
        if actor.watching or self._closed or self._token is None:
            return
        actor.watching = True
        token = self._token

        def completed(value: Any) -> None:  # on a Ray thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._watched, actor, value)

        _on_done(actor.handle.watch.remote(self.health_check_period_s), completed)

    def _watched(self, actor: _Actor, value: Any) -> None:
        """(trio thread) A ``watch()`` call ended: renew it (and check the replica's
        health), or report the death."""
        actor.watching = False
        if self._closed or actor.dead.is_set():
            return
        if not isinstance(value, BaseException):
            self._watch(actor)
            if actor.checks_health and not actor.checking and not actor.stopping:
                self._check_health(actor)
            return
        if not isinstance(value, _ActorDiedError):
            # Unreachable but not known dead: make sure, so it cannot linger unseen.
            with contextlib.suppress(Exception):
                ray.kill(actor.handle, no_restart=True)
        self._died(actor, _short(value))

    def _check_health(self, actor: _Actor) -> None:
        """Queue the replica's ``check_health()`` behind its batches."""
        assert self._token is not None
        actor.checking = True
        token = self._token

        def completed(value: Any) -> None:  # on a Ray thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._health_checked, actor, value)

        _on_done(actor.handle.check_health.remote(), completed)

    def _health_checked(self, actor: _Actor, value: Any) -> None:
        """(trio thread) A failed health check kills the replica and is its death."""
        actor.checking = False
        if self._closed or actor.dead.is_set() or actor.stopping:
            return
        if isinstance(value, ray.exceptions.RayTaskError):
            error = self._user_error(actor.tag, value)
            # Rare, and ray.kill only sends the request: fine on the trio thread.
            with contextlib.suppress(Exception):
                ray.kill(actor.handle, no_restart=True)
            self._condemned.add(actor.tag)
            self._died(actor, f"health check failed: {_short(error)}")
        # A RayActorError here is a death, which the watch reports.

    def _died(self, actor: _Actor, reason: str) -> None:
        """(trio thread) Record ``actor``'s death; report it unless it was being stopped."""
        actor.dead.set()
        if actor.idle is not None:
            actor.idle.set()
        if self._actors.get(actor.tag) is actor:
            del self._actors[actor.tag]
        if not actor.stopping and self._report is not None:
            log.warning("replica %s died: %s", actor.tag, reason)
            self._report(ReplicaDied(tag=actor.tag, reason=reason))

    @staticmethod
    def _user_error(tag: str, error: Any) -> BaseException:
        """The user's own exception out of a ``RayTaskError``, with the remote traceback."""
        cause = getattr(error, "cause", None)
        if isinstance(cause, _Carried):
            return _rebuild(cause.info, tag)
        if isinstance(cause, ray.exceptions.RayActorError):
            return ReplicaDiedError(tag, _short(cause))
        if isinstance(cause, Exception):
            text = getattr(error, "traceback_str", None) or str(error)
            with contextlib.suppress(Exception):
                cause.add_note(f"(raised in Ray replica {tag!r})\n{text.rstrip()}")
            return cause
        return RuntimeError(_short(error))


# ---------------------------------------------------------------------------------------
# A private local cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalRayCluster:
    """A single-node Ray head on loopback, private to its owner, stopped exactly.

    It listens on free ports of 127.0.0.1 only, keeps its files in a fresh short
    temporary directory (Ray's socket paths must stay short), and marks the processes
    it starts with that directory in their environment. :meth:`stop` terminates exactly
    the processes that carry the mark or name the directory on their command line, and
    their descendants (Ray renames its workers, which can hide their environment) --
    never ``ray stop``, which stops every Ray process on the machine::

        with LocalRayCluster(num_cpus=2) as cluster:
            runtime = RayRuntime(address=cluster.address)

    A driver in this process connects with ``RayRuntime(address=cluster.address)``;
    child processes that should connect get :meth:`env` in their environment.
    """

    MARKER = "SERVECORE_RAY_CLUSTER"

    def __init__(
        self,
        *,
        num_cpus: int = 2,
        object_store_memory: int = 200 * 1024 * 1024,
        resources: Mapping[str, float] | None = None,
        ray_executable: str | os.PathLike[str] | None = None,
    ) -> None:
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self.resources = dict(resources or {})
        self.ray_executable = Path(ray_executable or Path(sys.executable).parent / "ray")
        #: The GCS address, ``"127.0.0.1:PORT"`` (once started).
        self.address: str | None = None
        #: The cluster's temporary directory (once started).
        self.temp_dir: str | None = None

    def env(self) -> dict[str, str]:
        """Environment variables for a child process that drives this cluster."""
        if self.address is None:
            raise RuntimeError("the cluster is not started")
        return {"RAY_ADDRESS": self.address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def connect(self, **init_options: Any) -> None:
        """Connect this process to the cluster as a Ray driver (``ray.init``).

        :class:`RayRuntime` instances in this process then share that connection (and
        leave it open when they close); end it with ``ray.shutdown()``.
        """
        if self.address is None:
            raise RuntimeError("the cluster is not started")
        _keep_loopback()
        init_options.setdefault("logging_level", logging.WARNING)
        ray.init(address=self.address, **init_options)

    def start(self, timeout_s: float = 120.0) -> str:
        """Start the head node; return its address."""
        if self.address is not None:
            return self.address
        # Ray puts Unix socket paths under the temp dir; keep it short.
        self.temp_dir = tempfile.mkdtemp(prefix="rsc-", dir="/tmp" if os.name == "posix" else None)
        port = _free_port()
        env = dict(
            os.environ,
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep 127.0.0.1, do not go outward
            RAY_USAGE_STATS_ENABLED="0",
            AUTOSCALER_METRIC_PORT=str(_free_port()),
            DASHBOARD_METRIC_PORT=str(_free_port()),
        )
        env[self.MARKER] = self.temp_dir
        env.pop("RAY_ADDRESS", None)
        command = [
            str(self.ray_executable),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_memory}",
            "--include-dashboard=false",
            "--include-log-monitor=false",
            "--disable-usage-stats",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
        ]
        if self.resources:
            command.append(f"--resources={json.dumps(self.resources)}")
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except BaseException:
            self.stop()
            raise
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(
                f"`ray start --head` failed (exit {done.returncode}):\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )
        self.address = f"127.0.0.1:{port}"
        return self.address

    def pids(self) -> list[int]:
        """The processes of this cluster: marked ones, and their descendants."""
        import psutil

        if self.temp_dir is None:
            return []
        me = os.getpid()
        found: dict[int, Any] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.pid == me:
                continue
            try:
                hit = self.temp_dir in " ".join(proc.info["cmdline"] or ())
                hit = hit or proc.environ().get(self.MARKER) == self.temp_dir
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if hit:
                found[proc.pid] = proc
        for proc in list(found.values()):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                for child in proc.children(recursive=True):
                    if child.pid != me:
                        found.setdefault(child.pid, child)
        return sorted(found)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Terminate exactly this cluster's processes, SIGKILL those left after
        ``timeout_s`` (a throwaway cluster has nothing to save: Ray's daemons can take
        10 s and more to go on SIGTERM), and remove its directory."""
        import psutil

        procs = []
        for pid in self.pids():
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.append(psutil.Process(pid))
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _gone, alive = psutil.wait_procs(procs, timeout=timeout_s)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=10.0)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.address = None

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
