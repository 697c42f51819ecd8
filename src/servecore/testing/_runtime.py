"""A deterministic in-memory runtime with fault injection.

Its replicas live in the runtime object, not in a controller, so they outlive a
simulated controller crash exactly as subprocess or Ray replicas outlive a real one:
open a new controller on the same runtime and store to "restart".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from servecore._core.errors import ReplicaDiedError, RuntimeFenced
from servecore._core.transitions import Event, ReplicaDied, StartReplica
from servecore.runtimes import Query, Report
from servecore.runtimes.toolkit import ReplicaCode, build_replica, check_runtime_options
from servecore.testing._faults import CrashPlan, InjectedFailure

__all__ = ["InMemoryRuntime"]


class _World:
    """What every view of one in-memory runtime shares: its replicas and its faults."""

    def __init__(self) -> None:
        self.live: dict[str, StartReplica] = {}
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.failures: dict[str, tuple[str, int | None]] = {}
        self.instances: dict[str, ReplicaCode] = {}
        #: The newest lease epoch any view was opened with.
        self.newest_epoch: int | None = None


class InMemoryRuntime:
    """A runtime whose replicas are records in memory. For tests, not for serving.

    Fault injection:

    * :meth:`fail_starts` makes starts of a backend fail (``times`` times, or always)
      with :class:`InjectedFailure`;
    * :meth:`kill` kills a live replica and reports ``ReplicaDied``;
    * ``crash_plan`` (a :class:`CrashPlan`) crashes the controller before or after any
      start or stop;
    * *the old leader wakes up*: :meth:`view` gives a second runtime on the same
      replicas, for a second controller; opened with a lease epoch (the controller
      passes its store's, e.g. :class:`LeasedMemoryStore`'s), each view refuses to
      start, stop or list once a view of a newer epoch was opened
      (:class:`~servecore.RuntimeFenced`), as the subprocess runtime does; setting
      ``paused`` (a ``trio.Event``) holds this view's starts and stops until it is set,
      as a frozen host holds the effects it had begun.

    A start builds the target in-process with :func:`servecore.runtimes.toolkit.build_replica`
    (a failing constructor fails the start, batching rules apply); ``call`` runs it, so
    the router can be tested against it too.
    """

    def __init__(
        self, crash_plan: CrashPlan | None = None, *, _world: _World | None = None
    ) -> None:
        self.crash_plan = crash_plan or CrashPlan()
        world = _world or _World()
        self._world = world
        #: tag -> the effect that started it, for every replica alive now.
        self.live: dict[str, StartReplica] = world.live
        #: Every tag ever started, in order (to check tags are never reused).
        self.started: list[str] = world.started
        #: Every tag ever stopped, in order.
        self.stopped: list[str] = world.stopped
        self._failures = world.failures
        self._instances = world.instances
        self._report: Report | None = None
        self.namespace: str | None = None
        self.opened = 0
        #: The lease epoch this view acts for (``None``: a store without a lease).
        self.epoch: int | None = None
        #: When set to an unset event, starts and stops wait for it (a paused host).
        self.paused: trio.Event | None = None

    def view(self) -> InMemoryRuntime:
        """Another runtime on the same replicas (and faults), for a second controller:
        a standby taking over from a leader that may only be paused."""
        return InMemoryRuntime(self.crash_plan, _world=self._world)

    # -- fault injection ------------------------------------------------------------------

    @property
    def injected_failures(self) -> dict[str, tuple[str, int | None]]:
        """The start failures still to come, by backend: ``(reason, times)`` as given
        to :meth:`fail_starts` (``times`` left, ``None`` for always). A copy: to copy
        them to another runtime, call its :meth:`fail_starts` with each."""
        return dict(self._failures)

    def fail_starts(
        self, backend: str, reason: str = "injected failure", times: int | None = None
    ) -> None:
        """Make the next ``times`` starts of ``backend`` fail (every one if ``None``)."""
        self._failures[backend] = (reason, times)

    def heal(self, backend: str) -> None:
        """Let starts of ``backend`` succeed again."""
        self._failures.pop(backend, None)

    def kill(self, tag: str, reason: str = "killed by the test") -> None:
        """Kill a live replica and report its death, as a crashed process would."""
        if self.live.pop(tag, None) is not None:
            self._instances.pop(tag, None)
            if self._report is not None:
                self._report(ReplicaDied(tag=tag, reason=reason))

    # -- the Runtime protocol -------------------------------------------------------------

    async def open(
        self,
        *,
        namespace: str,
        report: Report,
        store_id: str | None = None,
        epoch: int | None = None,
    ) -> None:
        self.namespace = namespace
        self._report = report
        self.opened += 1
        self.epoch = epoch
        if epoch is not None:
            newest = self._world.newest_epoch
            if newest is not None and epoch < newest:
                raise RuntimeFenced("in-memory", str(store_id), epoch, newest)
            self._world.newest_epoch = epoch

    def _check_fence(self) -> None:
        newest = self._world.newest_epoch
        if self.epoch is not None and newest is not None and self.epoch < newest:
            raise RuntimeFenced("in-memory", "the in-memory world", self.epoch, newest)

    async def _wait_if_paused(self) -> None:
        if self.paused is not None:
            await self.paused.wait()

    async def close(self) -> None:
        self._report = None

    async def start_replica(self, effect: StartReplica) -> None:
        self.crash_plan.point(f"before start {effect.tag}")
        await trio.lowlevel.checkpoint()
        await self._wait_if_paused()
        self._check_fence()
        if effect.tag in self.live:
            return
        check_runtime_options(effect, known=(), runtime="in-memory")
        failure = self._failures.get(effect.backend)
        if failure is not None:
            reason, times = failure
            if times is not None:
                if times <= 1:
                    del self._failures[effect.backend]
                else:
                    self._failures[effect.backend] = (reason, times - 1)
            raise InjectedFailure(reason)
        self._instances[effect.tag] = build_replica(effect)
        self.live[effect.tag] = effect
        self.started.append(effect.tag)
        self.crash_plan.point(f"after start {effect.tag}")

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        self.crash_plan.point(f"before stop {tag}")
        await trio.lowlevel.checkpoint()
        await self._wait_if_paused()
        self._check_fence()
        if self.live.pop(tag, None) is not None:
            self._instances.pop(tag, None)
            self.stopped.append(tag)
        self.crash_plan.point(f"after stop {tag}")

    async def list_replicas(self) -> frozenset[str]:
        self._check_fence()
        return frozenset(self.live)

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        effect = self.live.get(tag)
        if effect is None:
            raise ReplicaDiedError(tag, "not alive in the in-memory runtime")
        code = self._instances[tag]
        await trio.lowlevel.checkpoint()
        return code.run(batch)

    def report(self, event: Event) -> None:
        """Report any event to the attached controller (for tests of odd orderings)."""
        if self._report is not None:
            self._report(event)
