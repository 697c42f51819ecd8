"""The controller's side of the Ray runtime: :class:`RayRuntime`."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray.exceptions
import ray.util
import trio

from servecore._core.errors import (
    ReplicaDiedError,
    RuntimeUnresponsive,
)
from servecore._core.transitions import StartReplica
from servecore.runtimes._protocol import Query, ReplicaInfo, Report
from servecore.runtimes._streams import ItemStream
from servecore.runtimes.ray.actor import PROTOCOL, ServecoreReplica
from servecore.runtimes.ray.calls import ActorCalls
from servecore.runtimes.ray.connection import connect, disconnect
from servecore.runtimes.ray.errors import short, user_error
from servecore.runtimes.ray.fence import RayFence
from servecore.runtimes.ray.options import actor_options
from servecore.runtimes.ray.placement import AvoidedNodes, steer_away
from servecore.runtimes.ray.results import Results
from servecore.runtimes.ray.watch import Actor, ReplicaWatch
from servecore.runtimes.toolkit import DEFAULT_STREAM_WINDOW

__all__ = ["RayRuntime"]

log = logging.getLogger("servecore.runtimes.ray")

_T = TypeVar("_T")

#: A Ray actor name that is a replica tag: ``"{backend}#{n}"``.
_TAG = re.compile(r"^[^\s#/][^\s#]*#\d+$")

#: How many times a start is retried when the actor dies before it is ready (a dying
#: actor of an earlier attempt may still hold the name for a moment).
_START_ATTEMPTS = 3

#: How long a stop waits for Ray to confirm the actor's death after ``ray.kill``.
_KILL_CONFIRM_S = 15.0


def _unusable(tag: str, info: Mapping[str, Any]) -> str | None:
    """Why the actor ``tag``, whose ``ready()`` said ``info``, cannot serve here, or
    ``None``.

    An actor of an earlier servecore (no ``"protocol"``: its ``run()`` returns the
    results for Ray to decode) serves on, with a warning: Ray decodes its results on a
    Ray thread, where a result whose unpickling raises ``SystemExit`` leaves its call
    waiting for ever. It goes when the replica is next replaced. One of a newer
    servecore (a downgrade) speaks a protocol this one does not know.
    """
    protocol = info.get("protocol", 1) if isinstance(info, Mapping) else None
    if not isinstance(protocol, int):
        return f"its ready() answered {type(info).__name__}, not a servecore replica's dict"
    if protocol > PROTOCOL:
        return (
            f"it speaks actor protocol {protocol}, newer than this servecore's {PROTOCOL} "
            f"(a newer servecore started it)"
        )
    if protocol == 2:
        log.info(
            "replica %s was started by an earlier servecore (actor protocol 2, this one "
            "speaks %d): it serves on, probed with the default health-check settings; an "
            "adopting controller's ready() waits behind its running query",
            tag,
            PROTOCOL,
        )
    elif protocol == 3:
        log.info(
            "replica %s was started by an earlier servecore (actor protocol 3, this one "
            "speaks %d): it serves on; it cannot stream, its code cannot compose, and its "
            "queries carry no deadlines",
            tag,
            PROTOCOL,
        )
    elif protocol == 4:
        log.info(
            "replica %s was started by an earlier servecore (actor protocol 4, this one "
            "speaks %d): it serves on; its queries carry no deadlines "
            "(servecore.time_remaining() is None there, and a late query still runs)",
            tag,
            PROTOCOL,
        )
    elif protocol < PROTOCOL:
        log.warning(
            "replica %s was started by an earlier servecore (actor protocol %d, this one "
            "speaks %d): it keeps serving, but Ray decodes its results, and a result that "
            "fails to decode can leave its call hanging. Roll its backend to replace it "
            "(any change to its definition or config, e.g. update_backend)",
            tag,
            protocol,
            PROTOCOL,
        )
    return None


def _gcs_address() -> str | None:
    """(thread) The GCS address of the cluster this process joined, if Ray says."""
    with contextlib.suppress(Exception):  # Ray Client has no runtime context of this kind
        address = ray.get_runtime_context().gcs_address
        return address if isinstance(address, str) and address else None
    return None


class _Start:
    """A start in progress, so that a stop can overtake it."""

    __slots__ = ("done", "handle", "scope", "stopped")

    def __init__(self) -> None:
        self.handle: Any = None  # the actor, once created
        self.scope = trio.CancelScope()
        self.stopped = False  # a stop came for this tag: the start must not succeed
        self.done = trio.Event()


class RayRuntime(ReplicaWatch):
    """Replicas as named, detached Ray actors; see :mod:`servecore.runtimes.ray`.

    ``address`` is where Ray runs: ``None`` (Ray's default: ``RAY_ADDRESS``, a cluster
    started on this machine, or else a new local instance), ``"auto"``, a GCS address
    ``"host:port"``, or a Ray Client address ``"ray://host:port"``. If this process is
    already connected to Ray, that connection is used as is.

    ``namespace`` overrides the Ray namespace (by default the controller's name).
    ``start_timeout_s`` bounds how long a replica may take to be scheduled, import its
    target and construct it. ``health_check_period_s`` is how often a replica's
    ``check_health()`` (if it has one) runs, and how often the death watch on each
    replica is renewed. ``call_timeout_s`` is the deadline of each of the runtime's own
    control calls to Ray (listing, looking up, creating and killing actors, reading the
    fence): past it the call raises :class:`~servecore.RuntimeUnresponsive`.
    ``init_options`` go to ``ray.init``. ``control_socket`` is the control socket of
    the ``servecore run`` this runtime serves (``servecore run`` passes it): replica
    code calls other endpoints through it (``servecore.get_handle``), so the replicas
    must run where that socket is reachable (this host). Through the controller::

        servecore.open_controller(runtime="ray", runtime_options={"address": "auto"})
    """

    #: ``async def`` targets run on an asyncio loop in the replica (docs/plugins.md).
    supports_async_targets = True
    #: Generator targets stream (docs/design.md §5, "Streams").
    supports_streaming = True

    def __init__(
        self,
        address: str | None = None,
        *,
        namespace: str | None = None,
        start_timeout_s: float = 300.0,
        health_check_period_s: float = 10.0,
        call_timeout_s: float = 30.0,
        init_options: Mapping[str, Any] | None = None,
        control_socket: str | os.PathLike[str] | None = None,
    ) -> None:
        if not start_timeout_s > 0:
            raise ValueError(f"start_timeout_s={start_timeout_s!r} must be a number > 0")
        if not health_check_period_s > 0:
            raise ValueError(
                f"health_check_period_s={health_check_period_s!r} must be a number > 0"
            )
        if not call_timeout_s > 0:
            raise ValueError(f"call_timeout_s={call_timeout_s!r} must be a number > 0")
        self.address = address
        self.namespace_override = namespace
        self.start_timeout_s = float(start_timeout_s)
        self.health_check_period_s = float(health_check_period_s)
        self.call_timeout_s = float(call_timeout_s)
        self.init_options = dict(init_options or {})
        #: The control socket replica code reaches other endpoints through
        #: (``servecore.get_handle``); ``None``: replica code cannot compose.
        self.control_socket = (
            None if control_socket is None else str(Path(control_socket).absolute())
        )
        #: The Ray namespace replicas live in (set by :meth:`open`).
        self.namespace: str | None = None
        #: The Ray cluster's GCS address, as this process joined it (set by :meth:`open`;
        #: ``None`` through Ray Client, which has none).
        self.gcs_address: str | None = None
        #: The store's lease epoch this runtime acts for (``None``: a store without one).
        self.epoch: int | None = None
        self._fence: RayFence | None = None
        self._background: trio.Nursery | None = None
        self._background_scope: trio.CancelScope | None = None
        self._report: Report | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._actors: dict[str, Actor] = {}
        self._results: Results | None = None
        self._actor_calls: ActorCalls | None = None
        self._starting: dict[str, set[_Start]] = {}
        self._condemned = set()
        self._avoided = AvoidedNodes()
        self._connected = False
        self._closed = False

    def __repr__(self) -> str:
        return f"RayRuntime(namespace={self.namespace or self.namespace_override!r})"

    # -- the Runtime protocol -------------------------------------------------------------

    async def open(
        self,
        *,
        namespace: str,
        report: Report,
        store_id: str | None = None,
        epoch: int | None = None,
    ) -> None:
        """Connect to Ray (once per process) and attach to the controller ``namespace``.

        ``store_id`` and ``epoch`` (a store with a lease) make the runtime's ownership
        of the namespace follow the lease: the epoch is recorded in the cluster, and
        from then on a runtime of an older epoch of the same store refuses to start,
        stop, kill or adopt anything (:class:`~servecore.RuntimeFenced`). Opening with
        an epoch older than the recorded one raises it at once.
        """
        if store_id is not None and not isinstance(store_id, str):
            raise TypeError(f"store_id={store_id!r} must be a str or None")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise TypeError(f"epoch={epoch!r} must be an int or None")
        self.namespace = self.namespace_override or namespace
        self._report = report
        self._token = trio.lowlevel.current_trio_token()
        self._results = Results(self._token)
        self._actor_calls = ActorCalls(self._results)
        self._closed = False
        await self._blocking("ray.init", connect, self.address, self.namespace, self.init_options)
        self._connected = True
        self.gcs_address = await self._blocking("the GCS address", _gcs_address)
        self.epoch = epoch
        self._fence = None
        if epoch is not None and store_id is not None:
            fence = RayFence(self.namespace, store_id, epoch)
            try:
                await self._blocking("RayFence.claim", fence.claim)
            except BaseException:
                await self.close()
                raise
            self._fence = fence
        await self._start_background()

    async def _start_background(self) -> None:
        """Open the nursery of the runtime's background work (probes, confirmations of
        deaths) in a system task that lives until :meth:`close`."""
        ready = trio.Event()
        scope = self._background_scope = trio.CancelScope()

        async def background() -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    self._background = nursery
                    ready.set()
                    await trio.sleep_forever()

        trio.lowlevel.spawn_system_task(background)
        await ready.wait()

    async def close(self) -> None:
        """Detach. Replica actors keep running, to be found by the next controller."""
        self._closed = True
        self._report = None
        if self._background_scope is not None:
            self._background_scope.cancel()
        self._background = self._background_scope = None
        self._actors.clear()
        if self._results is not None:
            self._results.close()
        if self._connected:
            self._connected = False
            await trio.to_thread.run_sync(disconnect)

    async def start_replica(self, effect: StartReplica) -> None:
        """Get or create the actor named ``effect.tag``; return once it is ready.

        A failing import or constructor is raised as the user's own exception (the
        actor is killed); unknown ``runtime_options`` raise
        :class:`~servecore.InvalidConfig`; a replica not ready within
        ``start_timeout_s`` (e.g. waiting for resources no node has) raises
        ``TimeoutError`` and is killed. A start that a :meth:`stop_replica` of the same
        tag overtakes raises :class:`~servecore.ReplicaDiedError` (the stop kills it).
        """
        options = steer_away(actor_options(effect), self._avoided.at(trio.current_time()))
        await self._check_fence()
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
            "max_concurrent_queries": effect.config.max_concurrent_queries,
            "health_check_period_s": effect.config.health_check_period_s,
            "health_check_timeout_s": effect.config.health_check_timeout_s,
            "control_socket": self.control_socket,
        }
        start = _Start()
        self._starting.setdefault(effect.tag, set()).add(start)
        try:
            with start.scope:
                handle, value, died = await self._start(start, effect.tag, spec, options)
        finally:
            starts = self._starting.get(effect.tag, set())
            starts.discard(start)
            if not starts:
                self._starting.pop(effect.tag, None)
            start.done.set()
        if start.stopped:
            # Killing it is the stop's job, which waits for this start to end first.
            raise ReplicaDiedError(effect.tag, "it was stopped while it started")
        if isinstance(value, ray.exceptions.RayTaskError):
            await self._kill(handle, effect.tag)
            raise user_error(effect.tag, value)
        if isinstance(value, BaseException):
            await self._kill(handle, effect.tag)
            raise RuntimeError(
                f"replica {effect.tag!r} died as it started: {short(died or value)}"
            ) from value
        unusable = _unusable(effect.tag, value)
        if unusable is not None:  # an actor of a newer servecore held the name
            await self._kill(handle, effect.tag)
            raise RuntimeError(
                f"replica {effect.tag!r} cannot serve: {unusable}; it was killed, and the "
                f"next start makes a new one"
            )
        actor = self._actors[effect.tag] = Actor(effect.tag, handle, value)
        self._watch(actor)

    async def _start(
        self, start: _Start, tag: str, spec: dict[str, Any], options: dict[str, Any]
    ) -> tuple[Any, Any, BaseException | None]:
        """Create the actor and wait until it is ready: ``(handle, ready() value or
        error, the error of an earlier attempt that died)``."""
        died: BaseException | None = None
        for attempt in range(_START_ATTEMPTS):
            if attempt:
                # It died before it was ready. Perhaps a dying actor of an earlier
                # attempt still held the name: try again with a fresh one.
                await trio.sleep(0.2 * attempt)
            handle = start.handle = await self._blocking(
                "ServecoreReplica.remote", self._create, tag, spec, options
            )
            value = await self._ready(tag, handle, options)
            if start.stopped or not isinstance(value, ray.exceptions.RayActorError):
                break
            died = value
        return handle, value, died

    async def _overtake_starts(self, tag: str, deadline: float) -> Any:
        """Make the starts of ``tag`` in progress fail: let them finish until
        ``deadline``, then cancel them. Return the actor one of them made, if any."""
        starts = set(self._starting.get(tag, ()))
        if not starts:
            return None
        for start in starts:
            start.stopped = True
        with trio.move_on_at(deadline):
            for start in starts:
                await start.done.wait()
        hung = [start for start in starts if not start.done.is_set()]
        if hung:
            log.warning(
                "replica %s was still starting when its stop's timeout was up (a "
                "constructor that does not return?); killing it",
                tag,
            )
        for start in hung:
            start.scope.cancel()
        for start in hung:
            await start.done.wait()  # unwinds at once: the cancelled wait is on Ray
        return next((s.handle for s in starts if s.handle is not None), None)

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        """Let the calls in flight finish (up to ``timeout_s``), then ``ray.kill`` the
        actor and wait until Ray confirms its death. Idempotent.

        A start of ``tag`` still in progress gets the same ``timeout_s`` to end; then the
        actor is killed whether its constructor returned or not, and the start raises.
        """
        await self._check_fence()
        deadline = trio.current_time() + timeout_s  # one budget for starts and calls
        made = await self._overtake_starts(tag, deadline)
        actor = self._actors.get(tag)
        if actor is None:
            handle = await self._lookup(tag)
            if handle is None:
                handle = made  # the start's actor, if Ray no longer lists the name
            if handle is None:
                return
            actor = self._actors[tag] = Actor(tag, handle)
        actor.stopping = True
        if actor.outstanding and not actor.dead.is_set():
            actor.idle = trio.Event()
            with trio.move_on_at(deadline):
                await actor.idle.wait()
            if actor.outstanding:
                log.warning(
                    "replica %s still had %d calls after %ss; killing it",
                    tag,
                    actor.outstanding,
                    timeout_s,
                )
        if not actor.dead.is_set():
            await self._check_fence()  # again, just before the kill: a drain may be long
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
        and is watched from then on. A fenced runtime lists nothing and adopts nothing:
        it raises :class:`~servecore.RuntimeFenced`.
        """
        await self._check_fence()
        listed = await self._blocking(
            "ray.util.list_named_actors", ray.util.list_named_actors, True
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
        actor = await self._serving(tag)
        actor.outstanding += 1
        try:
            return await self._calls().run(tag, actor.handle, actor.info, batch)
        finally:
            self._done(actor)

    async def stream(
        self, tag: str, query: Query, window: int = DEFAULT_STREAM_WINDOW
    ) -> ItemStream:
        """Open a stream of the generator target of replica ``tag``: its items as the
        actor yields them, pulled in chunks against credit (see
        :meth:`~servecore.runtimes.ray.calls.ActorCalls.stream`). A stop lets it end
        (within its timeout), as it does a call."""
        actor = await self._serving(tag)
        assert self._background is not None, "the runtime is not open"
        actor.outstanding += 1
        try:
            return await self._calls().stream(
                tag,
                actor.handle,
                actor.info,
                query,
                window,
                self._background,
                on_end=lambda: self._done(actor),
            )
        except BaseException:
            self._done(actor)
            raise

    async def _serving(self, tag: str) -> Actor:
        """The actor of replica ``tag``, if it may take a query now."""
        actor = self._actors.get(tag)
        if actor is None:
            handle = None if tag in self._condemned else await self._lookup(tag)
            if handle is None:
                raise ReplicaDiedError(tag, "no such live actor in the Ray namespace")
            actor = self._actors.get(tag)
            if actor is None:
                actor = self._actors[tag] = Actor(tag, handle)
                self._watch(actor)
        if actor.dead.is_set() or actor.stopping:
            raise ReplicaDiedError(tag, "it is stopping" if actor.stopping else "it died")
        return actor

    @staticmethod
    def _done(actor: Actor) -> None:
        """A call or stream of ``actor`` ended."""
        actor.outstanding -= 1
        if actor.outstanding == 0 and actor.idle is not None:
            actor.idle.set()

    def _calls(self) -> ActorCalls:
        assert self._actor_calls is not None, "the runtime is not open"
        return self._actor_calls

    def reach(self) -> dict[str, Any]:
        """How a process other than the controller's reaches the replicas (the table
        feed's hello): the runtime's name, the Ray namespace and the cluster's address."""
        address = self.gcs_address or self.address
        return {"runtime": "ray", "namespace": self.namespace, "address": address}

    # -- operations -----------------------------------------------------------------------

    def replica_info(self, tag: str) -> ReplicaInfo | None:
        """Where replica ``tag`` runs: its process id, Ray actor id, node id and node
        address, as its ``ready()`` reported them (``None`` if it is not known here)."""
        actor = self._actors.get(tag)
        if actor is None:
            return None
        info = actor.info

        def text(key: str) -> str | None:
            value = info.get(key)
            return value if isinstance(value, str) and value else None

        pid = info.get("pid")
        return ReplicaInfo(
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            actor_id=text("actor_id"),
            node=text("node_id"),
            node_ip=text("node_ip"),
        )

    def kill(self, tag: str) -> None:
        """Kill replica ``tag``'s actor as a crash would (for operators and tests).

        Its death is reported as ``ReplicaDied`` before this returns (the watch's own
        later report of the same death is then a no-op). Call it on the trio thread the
        runtime was opened in. Blocks briefly. A fenced runtime raises
        :class:`~servecore.RuntimeFenced` and kills nothing.
        """
        if self._fence is not None:
            self._fence.check()
        handle = ray.get_actor(tag, namespace=self.namespace)
        ray.kill(handle, no_restart=True)
        actor = self._actors.get(tag)
        if actor is not None:
            self._condemned.add(tag)
            self._died(actor, "killed")

    # -- helpers --------------------------------------------------------------------------

    def _create(self, tag: str, spec: dict[str, Any], options: dict[str, Any]) -> Any:
        """(thread) Get or create the actor named ``tag``."""
        return ServecoreReplica.options(  # type: ignore[attr-defined]
            name=tag,
            namespace=self.namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=0,
            # Plain batches take turns in the replica; async ones run this many at once.
            max_concurrency=max(1, int(spec.get("max_concurrent_queries") or 1)),
            **options,
        ).remote(spec)

    async def _lookup(self, tag: str) -> Any:
        """The handle of the live actor named ``tag``, or ``None``."""

        def get() -> Any:
            try:
                return ray.get_actor(tag, namespace=self.namespace)
            except ValueError:
                return None

        return await self._blocking("ray.get_actor", get)

    async def _adopt(self, tag: str) -> bool:
        """Take over a listed actor: wait until it is ready, then watch it."""
        handle = await self._lookup(tag)
        if handle is None:
            return False
        value: Any = None
        with trio.move_on_after(self.start_timeout_s):
            value = await self._wait(handle.ready.remote())
        if isinstance(value, ray.exceptions.RayActorError):
            return False  # died meanwhile
        if value is None:
            reason = f"not ready in {self.start_timeout_s}s"
        elif isinstance(value, BaseException):
            reason = short(value)
        else:
            unusable = _unusable(tag, value)
            if unusable is None:
                actor = self._actors.get(tag)
                if actor is None or actor.dead.is_set():
                    actor = self._actors[tag] = Actor(tag, handle, value)
                self._watch(actor)
                return True
            reason = unusable
        await self._check_fence()
        log.warning("replica %s found in Ray cannot serve (%s); killing it", tag, reason)
        await self._kill(handle, tag)
        return False

    async def _kill(self, handle: Any, tag: str | None = None) -> None:
        """``ray.kill`` the actor; with ``tag``, also wait (briefly) until its name is free,
        so that a failed start leaves nothing listed."""

        def kill() -> None:
            with contextlib.suppress(Exception):  # already dead or gone
                ray.kill(handle, no_restart=True)

        await self._blocking("ray.kill", kill)
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

    async def _check_fence(self) -> None:
        """Refuse to act for a controller whose epoch is older than the cluster's fence."""
        if self._fence is not None:
            await self._blocking("RayFence.check", self._fence.check)

    async def _blocking(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` on a worker thread, within ``call_timeout_s``; past it the thread
        is abandoned and :class:`~servecore.RuntimeUnresponsive` raised."""
        with trio.move_on_after(self.call_timeout_s):
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
        raise RuntimeUnresponsive(
            repr(self),
            what,
            self.call_timeout_s,
            setting="call_timeout_s",
            set_in="the Ray runtime's options",
        )

    async def _wait(self, ref: Any) -> Any:
        """The value of ``ref``, or the Ray error it failed with (returned, not raised)."""
        assert self._results is not None, "the runtime is not open"
        return await self._results.wait(ref)
