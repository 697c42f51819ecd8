"""The effect runner: carries out what the core decided, and feeds back what happened.

As dask's ``BaseWorker`` executes the instructions its pure ``WorkerState`` returns, the
runner executes effects after their commit is durable:

* ``UpdateRouter`` goes to the routing-table listeners at once;
* ``StartReplica`` and ``StopReplica`` each run as a task in the controller's nursery,
  so a slow constructor never blocks another command; a stop of a tag waits (up to
  its own timeout) for that tag's start still in flight, then cancels it;
* every answer (``ReplicaStarted``, ``ReplicaStartFailed``, ``ReplicaStopped``, and the
  deaths a runtime reports) is fed back through the commit path as an event. An event
  whose save fails is never dropped: it is retried with capped backoff until the store
  takes it.

The runner also knows what is in flight (the tags a resync must leave alone) and when
each replica was seen to start (to tell a crash loop from a replica that has proven
itself). Each command's effects, and the events they cause in turn, belong to one
:class:`EffectGroup`, which the command waits on.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, get_args

import attrs
import trio

from servecore._controller.replica_lifecycle import ReplicaLifecycle
from servecore._core.errors import CheckpointError, LeaseLost, RuntimeFenced
from servecore._core.messages import describe
from servecore._core.transitions import (
    EARLY_DEATH_S,
    Event,
    LoadReport,
    Message,
    ReplicaDied,
    ReplicaStarted,
    ReplicaStartFailed,
    ReplicaStopped,
    RoutingTable,
    StartReplica,
    State,
    StopReplica,
    UpdateRouter,
)
from servecore._core.validation import reason_text
from servecore._text import describe_exception
from servecore.runtimes import Runtime

__all__ = ["EffectGroup", "EffectRunner", "StartInFlight", "describe_failure"]

log = logging.getLogger("servecore.controller")

_EVENTS = get_args(Event)
#: Retries of an event whose save failed start here and double up to the cap.
RETRY_FIRST_S = 0.01
RETRY_CAP_S = 2.0

#: Steps a message (or a builder of one) through the commit path, effects to a group.
Execute = Callable[[Any, "EffectGroup"], Awaitable[Message | None]]


class EffectGroup:
    """The effect tasks one command caused, including those its events caused in turn;
    the command returns when the group has settled, and raises its first error."""

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

    async def wait(self) -> None:
        """Wait until every task of the group is done; raise the first error."""
        if self.pending:  # (waiting on a set event would cost a scheduling round)
            await self.settled.wait()
        if self.errors:
            raise self.errors[0]


class StartInFlight:
    """A start in flight: when it is done, and how to cancel it (a stop of the same
    tag does, once the stop's own timeout has passed)."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.scope = trio.CancelScope()


def describe_failure(exc: BaseException) -> str:
    """Why a start or stop failed, bounded and encodable for the checkpoint; runtimes
    attach what the replica printed before failing as notes."""
    return reason_text(describe_exception(exc, notes=True))


class EffectRunner:
    """Carries effects out on ``runtime`` in ``nursery`` (see the module docstring).

    ``execute`` is the commit path (events go back through it); ``push_table`` receives
    every routing table; ``report_load`` receives load reports a runtime measures itself.
    """

    def __init__(
        self,
        *,
        runtime: Runtime,
        nursery: trio.Nursery,
        execute: Execute,
        lifecycle: ReplicaLifecycle,
        push_table: Callable[[RoutingTable], None],
        report_load: Callable[[Any, EffectGroup], Awaitable[None]],
        on_fenced: Callable[[RuntimeFenced], None] | None = None,
        call_timeout_s: float = math.inf,
    ) -> None:
        self.runtime = runtime
        self.nursery = nursery
        self.lifecycle = lifecycle
        self._execute = execute
        self._push_table = push_table
        self._report_load = report_load
        self._on_fenced = on_fenced
        #: How long past its own timeout a stop is waited for (a runtime that hangs).
        self.call_timeout_s = call_timeout_s
        #: Background work (replacements of dead replicas, retried events): no command
        #: waits on it, but ``Controller.settle`` does.
        self.background = EffectGroup()
        # A stop for a tag waits (up to its timeout) for that tag's start still in flight.
        self._starts: dict[str, StartInFlight] = {}
        # Tags with a start, a stop or an unsaved event in flight: a resync leaves them be.
        self._busy: Counter[str] = Counter()
        # When each replica was seen to start (trio time), to tell a crash loop.
        self._started_at: dict[str, float] = {}
        # Deaths reported but not yet saved (the store does not answer): status shows
        # them, and the same death reported again meanwhile is not counted twice.
        self._unrecorded: dict[str, ReplicaDied] = {}
        #: Set when the controller stepped down: no effect is carried out any more
        #: (the controller holding the lease now decides what runs).
        self.refusing = False

    # -- what is in flight ----------------------------------------------------------------

    def busy(self) -> frozenset[str]:
        """Tags with a start, a stop or an unsaved event in flight."""
        return frozenset(self._busy)

    def unrecorded_deaths(self) -> dict[str, ReplicaDied]:
        """Deaths the runtime reported that are not saved yet, by tag."""
        return dict(self._unrecorded)

    def _recorded(self, event: Event) -> None:
        if isinstance(event, ReplicaDied) and self._unrecorded.get(event.tag) is event:
            del self._unrecorded[event.tag]

    def proven(self, state: State, now: float) -> frozenset[str]:
        """Replicas that have run for at least ``EARLY_DEATH_S``: the end of a crash loop
        (only asked when some backend is in one)."""
        if not any(b.early_deaths for b in state.backends.values()):
            return frozenset()
        return frozenset(t for t, at in self._started_at.items() if now - at >= EARLY_DEATH_S)

    def adopted(self, tags: Iterable[str]) -> None:
        """Replicas found alive at recovery have run for an unknown while: not a crash loop."""
        self._started_at.update(dict.fromkeys(tags, -math.inf))

    # -- effects --------------------------------------------------------------------------

    def dispatch(self, effect: Any, group: EffectGroup) -> None:
        """Carry out one effect of a durable commit (the committer calls this in order)."""
        if self.refusing:
            log.warning("stepped down: not carrying out %r", effect)
            return
        if isinstance(effect, UpdateRouter):
            self._push_table(effect.table)
        elif isinstance(effect, StopReplica):
            self.spawn(group, self._stop, effect, group)
        elif isinstance(effect, StartReplica):
            # Registered now, not when the task runs: a stop dispatched right after
            # (in the same batch) must find the start it has to wait for.
            self._starts[effect.tag] = start = StartInFlight()
            self.spawn(group, self._start, effect, group, start)
        else:  # an effect this shell does not know is a bug: say so loudly
            raise TypeError(f"the controller cannot carry out {effect!r}")

    def spawn(self, group: EffectGroup, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` as a task of ``group``; its failure goes to the group."""
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

        self.nursery.start_soon(run)

    async def _start(self, effect: StartReplica, group: EffectGroup, start: StartInFlight) -> None:
        tag = effect.tag
        self._busy[tag] += 1
        event: Event | None = None
        self.lifecycle.starting(effect)
        try:
            with start.scope:
                if effect.delay_s > 0:
                    log.info("replica %s starts in %.2gs (backing off)", tag, effect.delay_s)
                    await trio.sleep(effect.delay_s)
                await self.runtime.start_replica(effect)
                event = ReplicaStarted(tag=tag)
                self.lifecycle.ready(tag)
            if start.scope.cancelled_caught:
                log.warning("replica %s was stopped while it was still starting", tag)
        except RuntimeFenced as exc:
            # Not a failed start (no budget is spent): this controller is not the leader.
            self.fenced(exc, group)
        except Exception as exc:
            reason = describe_failure(exc)
            log.warning("replica %s failed to start: %s", tag, reason)
            event = ReplicaStartFailed(tag=tag, reason=reason)
            self.lifecycle.start_failed(tag, reason)
        finally:
            start.done.set()
            if self._starts.get(tag) is start:
                del self._starts[tag]
        try:
            if event is not None:
                if isinstance(event, ReplicaStarted):
                    self._started_at[tag] = trio.current_time()
                await self.feed(event, group)
        finally:
            self._unbusy(tag)

    async def _stop(self, effect: StopReplica, group: EffectGroup) -> None:
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
            self.lifecycle.stopping(tag)
            try:
                with trio.move_on_after(remaining + self.call_timeout_s) as scope:
                    await self.runtime.stop_replica(tag, remaining)
                if scope.cancelled_caught:
                    log.warning(
                        "replica %s: the runtime did not answer its stop within %gs past "
                        "the drain timeout; a resync stops it if it lingers",
                        tag, self.call_timeout_s,
                    )  # fmt: skip
            except RuntimeFenced as exc:
                self.fenced(exc, group)
                return
            except Exception as exc:
                # The replica may linger; the resync or recovery finds and stops it.
                log.warning("replica %s did not stop cleanly: %s", tag, describe_failure(exc))
            self._started_at.pop(tag, None)
            self.lifecycle.stopped(tag)
            await self.feed(ReplicaStopped(tag=tag), group)
        finally:
            self._unbusy(tag)

    def fenced(self, exc: RuntimeFenced, group: EffectGroup) -> None:
        """The runtime refused an effect: a newer leader owns it. Nothing is recorded
        (that leader decides what runs); the controller steps down."""
        log.error("%s", exc)
        group.errors.append(exc)
        if self._on_fenced is not None:
            self._on_fenced(exc)

    def _unbusy(self, tag: str) -> None:
        self._busy[tag] -= 1
        if self._busy[tag] <= 0:
            del self._busy[tag]

    # -- events ---------------------------------------------------------------------------

    async def feed(self, event: Event, group: EffectGroup) -> None:
        """Step a runtime's answer through the same path as a command. If its save
        fails, the event is kept and retried (never dropped), and the waiting command
        is told what was and was not recorded."""
        try:
            await self._execute(event, group)
            self._recorded(event)
            return
        except LeaseLost as exc:
            # Fenced out: another controller owns the store now; retrying cannot help.
            self._recorded(event)
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
        self.spawn(self.background, self._retry, event, tag)

    async def _retry(self, event: Event, tag: str | None) -> None:
        delay = RETRY_FIRST_S
        try:
            while True:
                await trio.sleep(delay)
                try:
                    await self._execute(event, self.background)
                    self._recorded(event)
                    log.info("that %s was recorded after the store recovered", describe(event))
                    return
                except LeaseLost as exc:
                    self._recorded(event)
                    log.error(
                        "%s; giving up on recording that %s (this controller is fenced)",
                        exc,
                        describe(event),
                    )
                    return
                except CheckpointError as exc:
                    delay = min(RETRY_CAP_S, delay * 2)
                    log.warning("%s; retrying in %.2gs", exc, delay)
        finally:
            if tag is not None:
                self._unbusy(tag)

    def report(self, event: Event) -> None:
        """The callback runtimes report deaths through (called on the trio thread)."""
        if self.refusing:
            return  # stepped down: the controller holding the lease hears of it
        if not isinstance(event, _EVENTS):
            log.error("the runtime reported %r, which is not a servecore event; ignored", event)
            return
        if isinstance(event, LoadReport):  # a runtime that measures load itself
            self.spawn(self.background, self._report_load, event, self.background)
            return
        if isinstance(event, ReplicaDied):
            if event.tag in self._unrecorded:
                # The watcher and a resync both saw it while the store was down.
                log.debug("replica %s: its death was already reported", event.tag)
                return
            if event.uptime_s is None:
                started = self._started_at.pop(event.tag, None)
                if started is not None:
                    uptime = max(0.0, trio.current_time() - started)
                    event = attrs.evolve(event, uptime_s=uptime)
            self.lifecycle.dead(event)
            self._unrecorded[event.tag] = event
        self.spawn(self.background, self.feed, event, self.background)
