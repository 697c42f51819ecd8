"""Watching replica actors: deaths reported the moment Ray knows, health probes from
outside, a doubt confirmed before a death is declared, and ``check_health()``.

For each replica the runtime keeps one long-running ``watch()`` call in flight (renewed
every ``health_check_period_s`` of the runtime); Ray fails it the moment the actor
dies, and a confirmed death (``ActorDiedError``) is reported as
:class:`~servecore.ReplicaDied` at once.

Any other failure of the watch (``ActorUnavailableError``: its node unreachable for a
moment, a network partition, a busy raylet) is not a death: the replica is pinged
(``watch(0)``, on its control path) until it answers or its ``health_check_timeout_s``
has passed; only then is it killed and reported dead.

The health probe: every ``health_check_period_s`` of the replica's backend, the
runtime pings it on its control path (threads of their own, never behind a query), and
a replica that has not answered within ``health_check_timeout_s`` (a stopped or frozen
process, code that holds the GIL, a node that is gone but not yet declared dead) is
killed and reported dead. A replica busy with a long query answers its probe: it is not
killed.

A replica object with a ``check_health()`` method has it called on each renewal of the
watch, between batches; if it raises, or does not return within the backend's
``health_check_timeout_s`` of beginning (the actor bounds it, not counting its wait for
a turn), the replica is killed and reported dead.

A fenced runtime (a newer leader owns the namespace) kills nothing: its successor's
probes judge the replicas.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import ray
import ray.exceptions
import trio

from servecore._core.errors import RuntimeFenced
from servecore._core.transitions import ReplicaDied
from servecore._core.values import BackendConfig
from servecore.runtimes._protocol import Report
from servecore.runtimes.ray.errors import ActorDiedError, short, user_error
from servecore.runtimes.ray.placement import AvoidedNodes
from servecore.runtimes.ray.results import on_done

__all__ = ["Actor", "ReplicaWatch", "ping", "renew"]

log = logging.getLogger("servecore.runtimes.ray")

#: Probe settings of a replica that does not report its own (one started by an earlier
#: servecore): the backend defaults.
_DEFAULTS = BackendConfig()

#: How soon a ping that failed (rather than went unanswered) is tried again.
_RETRY_S = 0.5


def renew(handle: Any, period_s: float) -> Any:
    """The long ``watch()`` call on an actor (a seam for tests that inject failures)."""
    return handle.watch.remote(period_s)


def ping(handle: Any) -> Any:
    """A health probe of an actor: ``watch(0)``, answered at once on its control path
    (actors of every protocol have it; a seam for tests that inject failures)."""
    return handle.watch.remote(0.0)


def _seconds(info: Mapping[str, Any] | None, key: str, default: float) -> float:
    value = info.get(key) if info else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default


class Actor:
    """What the runtime knows of one replica actor (trio thread only)."""

    __slots__ = (
        "checking",
        "checks_health",
        "dead",
        "handle",
        "idle",
        "info",
        "outstanding",
        "probe_period_s",
        "probe_timeout_s",
        "probing",
        "protocol",
        "stopping",
        "tag",
        "watching",
    )

    def __init__(self, tag: str, handle: Any, info: Mapping[str, Any] | None = None) -> None:
        self.tag = tag
        self.handle = handle
        #: What its ``ready()`` said (empty when this runtime has not asked).
        self.info: Mapping[str, Any] = dict(info) if isinstance(info, Mapping) else {}
        self.checks_health = bool(info and info.get("health_check"))
        # The actor protocol its ready() reported (1: it reported none, an actor of an
        # earlier servecore); None when this runtime has not asked (found by a call).
        self.protocol: int | None = None if info is None else int(info.get("protocol", 1))
        self.probe_period_s = _seconds(
            info, "health_check_period_s", _DEFAULTS.health_check_period_s
        )
        self.probe_timeout_s = _seconds(
            info, "health_check_timeout_s", _DEFAULTS.health_check_timeout_s
        )
        self.checking = False
        self.outstanding = 0  # calls in flight through this runtime
        self.idle: trio.Event | None = None  # set when outstanding drops to 0
        self.stopping = False  # its death is not news
        self.watching = False
        self.probing = False
        self.dead = trio.Event()


def _node_died(error: BaseException) -> bool:
    """Whether Ray says an actor died because its node did (or was preempted)."""
    if getattr(error, "preempted", False):
        return True
    try:
        text = str(error)
    except Exception:
        return False
    return "its node has died" in text or "node is dead" in text


class _Reach(enum.Enum):
    """What pinging an actor for a while found."""

    ANSWERS = "answers"
    DIED = "died"  # Ray confirmed its death (and it has been reported)
    SILENT = "silent"  # no answer within the time given


class ReplicaWatch:
    """The runtime's death watch, health probes and health checks (a base of
    ``RayRuntime``; trio thread only, except where a function says it runs on a Ray
    thread)."""

    health_check_period_s: float
    _closed: bool
    _token: trio.lowlevel.TrioToken | None
    _report: Report | None
    _actors: dict[str, Actor]
    # Tags killed for a failed health check whose names Ray may still list a moment.
    _condemned: set[str]
    _background: trio.Nursery | None
    # Nodes whose replicas were just lost with them: replacements go elsewhere.
    _avoided: AvoidedNodes

    async def _check_fence(self) -> None:
        raise NotImplementedError

    async def _kill(self, handle: Any, tag: str | None = None) -> None:
        raise NotImplementedError

    async def _wait(self, ref: Any) -> Any:
        raise NotImplementedError

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``fn(*args)`` in the runtime's background nursery (until it closes);
        what it raises is logged, never left to crash the trio run."""
        if self._background is None or self._closed:
            return

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:
                log.exception("the Ray runtime's background task %s failed", fn.__name__)

        self._background.start_soon(guarded)

    # -- the death watch --------------------------------------------------------------------

    def _watch(self, actor: Actor) -> None:
        """Keep one ``watch()`` call in flight on ``actor`` (a failure is a death or a
        doubt), and its health probe running."""
        if self._closed or self._token is None:
            return
        if not actor.probing and not actor.stopping and not actor.dead.is_set():
            actor.probing = True
            self._spawn(self._probe, actor)
        if actor.watching:
            return
        actor.watching = True
        token = self._token

        def completed(value: Any) -> None:  # on a Ray thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._watched, actor, value)

        on_done(renew(actor.handle, self.health_check_period_s), completed)

    def _watched(self, actor: Actor, value: Any) -> None:
        """(trio thread) A ``watch()`` call ended: renew it (and check the replica's
        health), report a confirmed death, or confirm a doubt."""
        actor.watching = False
        if self._closed or actor.dead.is_set():
            return
        if not isinstance(value, BaseException):
            self._watch(actor)
            if actor.checks_health and not actor.checking and not actor.stopping:
                self._check_health(actor)
            return
        if isinstance(value, ActorDiedError):
            if _node_died(value):
                self._avoid_node(actor)
            self._died(actor, short(value))
            return
        # Unreachable, or failed in some other way, but not known dead: find out.
        self._spawn(self._confirm, actor, value)

    async def _confirm(self, actor: Actor, error: BaseException) -> None:
        """The watch of ``actor`` failed with ``error``, which is not a death: ping it
        until it answers (watch it again) or its ``health_check_timeout_s`` has passed
        (kill it, and report it dead)."""
        timeout_s = actor.probe_timeout_s
        log.info("replica %s is unreachable (%s); confirming", actor.tag, short(error))
        reach = await self._reach(actor, timeout_s)
        if reach is _Reach.ANSWERS:
            log.info("replica %s answers again; not dead", actor.tag)
            self._watch(actor)
        elif reach is _Reach.SILENT:
            await self._condemn(
                actor,
                f"it was unreachable ({short(error)}) and did not answer for "
                f"{timeout_s:g}s (health_check_timeout_s), so it was killed",
                lost_node=True,
            )

    async def _reach(self, actor: Actor, within_s: float) -> _Reach:
        """Ping ``actor`` until it answers, Ray says it died, or ``within_s`` passed."""
        deadline = trio.current_time() + within_s
        while not (self._closed or actor.dead.is_set() or actor.stopping):
            value: Any = None
            answered = False
            with trio.move_on_at(deadline):
                value = await self._wait(ping(actor.handle))
                answered = True
            if not answered:
                return _Reach.SILENT
            if not isinstance(value, BaseException):
                return _Reach.ANSWERS
            if isinstance(value, ActorDiedError):
                self._died(actor, short(value))
                return _Reach.DIED
            # Unavailable for now: ask again shortly, until the deadline.
            if trio.current_time() + _RETRY_S >= deadline:
                return _Reach.SILENT
            await trio.sleep(_RETRY_S)
        return _Reach.DIED if actor.dead.is_set() else _Reach.ANSWERS

    # -- the health probe -------------------------------------------------------------------

    async def _probe(self, actor: Actor) -> None:
        """Every ``probe_period_s``, ping ``actor``; one that has not answered within
        ``probe_timeout_s`` is killed and reported dead."""
        try:
            while True:
                await trio.sleep(actor.probe_period_s)
                if self._closed or actor.dead.is_set() or actor.stopping:
                    return
                reach = await self._reach(actor, actor.probe_timeout_s)
                if reach is _Reach.SILENT:
                    await self._condemn(
                        actor,
                        f"it did not answer a health probe within {actor.probe_timeout_s:g}s "
                        f"(health_check_timeout_s; stopped, frozen, hung or unreachable), "
                        f"so it was killed",
                        lost_node=True,
                    )
                if reach is not _Reach.ANSWERS:
                    return
        finally:
            actor.probing = False

    # -- the replica's own check_health() ---------------------------------------------------

    def _check_health(self, actor: Actor) -> None:
        """Queue the replica's ``check_health()`` behind its batches."""
        assert self._token is not None
        actor.checking = True
        token = self._token

        def completed(value: Any) -> None:  # on a Ray thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._health_checked, actor, value)

        on_done(actor.handle.check_health.remote(), completed)

    def _health_checked(self, actor: Actor, value: Any) -> None:
        """(trio thread) A failed health check kills the replica and is its death."""
        actor.checking = False
        if self._closed or actor.dead.is_set() or actor.stopping:
            return
        if isinstance(value, ray.exceptions.RayTaskError):
            error = user_error(actor.tag, value)
            self._spawn(self._condemn, actor, f"health check failed: {short(error)}")
        # A RayActorError here is a death or a doubt, which the watch handles.

    # -- deaths -----------------------------------------------------------------------------

    def _avoid_node(self, actor: Actor) -> None:
        """Place no replacement on ``actor``'s node for a while (see ``placement``)."""
        node = actor.info.get("node_id")
        if isinstance(node, str) and node:
            log.warning(
                "replica %s was lost with its node %s (%s): replacements avoid that node for %gs",
                actor.tag,
                node,
                actor.info.get("node_ip", "address unknown"),
                self._avoided.avoid_for_s,
            )
            self._avoided.add(node, trio.current_time())

    async def _condemn(self, actor: Actor, reason: str, *, lost_node: bool = False) -> None:
        """Kill ``actor`` and report it dead, for ``reason``, unless this runtime is
        fenced (a newer leader owns it and judges it) or it died or is being stopped.
        ``lost_node``: it stopped answering, so its node may be the trouble; its
        replacement avoids that node."""
        if self._closed or actor.dead.is_set() or actor.stopping:
            return
        try:
            await self._check_fence()
        except RuntimeFenced:
            log.warning("replica %s: not killed (%s), this runtime is fenced", actor.tag, reason)
            return
        if actor.dead.is_set() or actor.stopping:
            return
        self._condemned.add(actor.tag)
        log.warning("replica %s: %s", actor.tag, reason)
        if lost_node:
            self._avoid_node(actor)  # before the report: the replacement starts at once
        self._died(actor, reason)
        await self._kill(actor.handle)

    def _died(self, actor: Actor, reason: str) -> None:
        """(trio thread) Record ``actor``'s death; report it unless it was being stopped.
        Once only: a death already recorded (by ``kill``) is not reported again."""
        if actor.dead.is_set():
            return
        actor.dead.set()
        if actor.idle is not None:
            actor.idle.set()
        if self._actors.get(actor.tag) is actor:
            del self._actors[actor.tag]
        if not actor.stopping and self._report is not None:
            # The controller logs each death once (servecore.lifecycle, WARNING).
            log.debug("replica %s died: %s", actor.tag, reason)
            self._report(ReplicaDied(tag=actor.tag, reason=reason))
