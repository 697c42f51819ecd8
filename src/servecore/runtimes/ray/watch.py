"""Watching replica actors: deaths reported the moment Ray knows, and health checks.

For each replica the runtime keeps one long-running ``watch()`` call in flight (renewed
every ``health_check_period_s``); Ray fails it the moment the actor dies, and the death
is reported as :class:`~servecore.ReplicaDied` at once. A replica object with a
``check_health()`` method has it called on each renewal, between batches; if it raises,
the replica is killed and reported dead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import ray
import ray.exceptions
import trio

from servecore._core.errors import RuntimeFenced
from servecore._core.transitions import ReplicaDied
from servecore.runtimes._protocol import Report
from servecore.runtimes.ray.errors import ActorDiedError, short, user_error
from servecore.runtimes.ray.results import on_done

__all__ = ["Actor", "ReplicaWatch"]

log = logging.getLogger("servecore.runtimes.ray")


class Actor:
    """What the runtime knows of one replica actor (trio thread only)."""

    __slots__ = (
        "checking",
        "checks_health",
        "dead",
        "handle",
        "idle",
        "outstanding",
        "protocol",
        "stopping",
        "tag",
        "watching",
    )

    def __init__(self, tag: str, handle: Any, info: Mapping[str, Any] | None = None) -> None:
        self.tag = tag
        self.handle = handle
        self.checks_health = bool(info and info.get("health_check"))
        # The actor protocol its ready() reported (1: it reported none, an actor of an
        # earlier servecore); None when this runtime has not asked (found by a call).
        self.protocol: int | None = None if info is None else int(info.get("protocol", 1))
        self.checking = False
        self.outstanding = 0  # calls in flight through this runtime
        self.idle: trio.Event | None = None  # set when outstanding drops to 0
        self.stopping = False  # its death is not news
        self.watching = False
        self.dead = trio.Event()


class ReplicaWatch:
    """The runtime's death watch and health checks (a base of ``RayRuntime``; trio
    thread only, except where a function says it runs on a Ray thread)."""

    health_check_period_s: float
    _closed: bool
    _token: trio.lowlevel.TrioToken | None
    _report: Report | None
    _actors: dict[str, Actor]
    # Tags killed for a failed health check whose names Ray may still list a moment.
    _condemned: set[str]
    _background: trio.Nursery | None

    async def _check_fence(self) -> None:
        raise NotImplementedError

    async def _kill(self, handle: Any, tag: str | None = None) -> None:
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

    async def _condemn(self, actor: Actor, reason: str) -> None:
        """Kill ``actor`` and report it dead, for ``reason``, unless this runtime is
        fenced (a newer leader owns it and judges it) or it died or is being stopped."""
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
        self._died(actor, reason)
        await self._kill(actor.handle)

    def _watch(self, actor: Actor) -> None:
        """Keep one ``watch()`` call in flight on ``actor``; its failure is a death."""
        if actor.watching or self._closed or self._token is None:
            return
        actor.watching = True
        token = self._token

        def completed(value: Any) -> None:  # on a Ray thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._watched, actor, value)

        on_done(actor.handle.watch.remote(self.health_check_period_s), completed)

    def _watched(self, actor: Actor, value: Any) -> None:
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
        if not isinstance(value, ActorDiedError):
            # Unreachable but not known dead: make sure, so it cannot linger unseen.
            self._spawn(self._condemn, actor, short(value))
            return
        self._died(actor, short(value))

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
        # A RayActorError here is a death, which the watch reports.

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
