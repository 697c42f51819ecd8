"""The controller's autoscaling loop: sample the routers, report load, wake from zero.

The policy is pure (:mod:`servecore._core.autoscaling`) and its decisions are checkpointed
with the backend; this is the shell around it, owned by one
:class:`~servecore.Controller`, which passes in everything it needs (the state, the
clock, the router's load, the commit path): it imports nothing of the controller.

* every ``interval_s / SAMPLES_PER_REPORT`` it samples the ongoing queries (running +
  queued) of each autoscaling backend into a :class:`LoadSampler`: its own router's,
  plus the latest of every live router in another process (the remote load source,
  :class:`~servecore._controller.remote_load.RemoteLoad`);
* every ``interval_s`` (the bounded rate) it steps one :class:`~servecore.LoadReport`
  per autoscaling backend, carrying the mean over that backend's look-back window.
  A report that changes no decision is adopted without a save (only the state's
  ``observations`` change); one that does is saved first, like any event, and its
  starts and stops are carried out in the background;
* a query that starts to wait for a backend scaled to zero, in this process or in a
  connected client (whose report asks to wake it), wakes it at once: a report of the
  queries waiting now, which the policy answers without the upscale delay.

Time is the controller's clock (``Controller.clock``, passed in): trio's clock anchored to the
wall clock when the controller opened, so a countdown written to the checkpoint by one
process means the same to the next.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from servecore._controller.effects import EffectGroup
from servecore._controller.load_sampler import LoadSampler
from servecore._core.errors import CheckpointError, InvalidConfig
from servecore._core.transitions import LoadReport, State

__all__ = [
    "AUTOSCALE_INTERVAL_S",
    "MAX_REPORT_SKEW_S",
    "SAMPLES_PER_REPORT",
    "Autoscaler",
    "check_report_time",
]

log = logging.getLogger("servecore.autoscaler")

#: Default interval between load reports per autoscaling backend.
AUTOSCALE_INTERVAL_S = 0.5
#: Samples of the router's load taken per report interval.
SAMPLES_PER_REPORT = 5


def _autoscaling(state: State) -> dict[str, float]:
    """Autoscaling backends of ``state`` and their look-back windows."""
    return {
        tag: b.config.autoscaling.look_back_period_s
        for tag, b in state.backends.items()
        if b.config.autoscaling is not None
    }


#: How far a load report's ``now`` may be from the controller's clock. A report time in
#: the far future (milliseconds passed for seconds, say) would be checkpointed as the
#: last decision's time, and every honest report after it would look stale: the backend
#: would never scale down again.
MAX_REPORT_SKEW_S = 3600.0


def check_report_time(now: float | None, clock_now: float) -> float:
    """``now`` (``clock_now`` if None), refused with ``InvalidConfig`` when it is more
    than :data:`MAX_REPORT_SKEW_S` from the controller's clock."""
    if now is None:
        return clock_now
    if isinstance(now, bool) or not isinstance(now, int | float):
        return now  # not a time at all: LoadReport refuses it with its own message
    if not abs(now - clock_now) <= MAX_REPORT_SKEW_S:  # also refuses NaN
        raise InvalidConfig(
            "now",
            now,
            f"a load report's time must be within {MAX_REPORT_SKEW_S:g}s of the "
            f"controller's clock (now {clock_now:g}, seconds); omit now= to use the clock",
        )
    return now


class Autoscaler:
    """Feeds one controller's core with load reports (see the module docstring)."""

    def __init__(
        self,
        *,
        state: Callable[[], State],
        clock: Callable[[], float],
        ongoing: Callable[[], Mapping[str, int]],
        remote: Callable[[], Mapping[str, int]],
        report: Callable[
            [LoadReport | Callable[[State], LoadReport | None], EffectGroup], Awaitable[None]
        ],
        background: EffectGroup,
        start_soon: Callable[..., Any],
    ) -> None:
        """``state()`` is the committed state; ``clock()`` the controller's clock;
        ``ongoing()`` the router's queries running or queued per backend; ``remote()``
        the same, summed over the live routers of other processes; ``report``
        steps a load report through the commit path; ``background`` is the effect group
        no command waits on; ``start_soon`` starts a task in the controller's nursery."""
        self._state = state
        self._clock = clock
        self._local = ongoing
        self._remote = remote
        self.report = report
        self._background = background
        self._start_soon = start_soon
        self.sampler = LoadSampler()
        self._waking: set[str] = set()

    # -- reports --------------------------------------------------------------------------

    def _ongoing(self) -> dict[str, int]:
        """Queries ongoing per backend: this process's router plus the remote ones."""
        total = dict(self._local())
        for tag, n in self._remote().items():
            total[tag] = total.get(tag, 0) + n
        return total

    def sample(self) -> dict[str, float]:
        """Sample the routers once; return the autoscaling backends and their windows."""
        windows = _autoscaling(self._state())
        self.sampler.keep_only(windows)
        if windows:
            counts = self._ongoing()
            self.sampler.add(self._clock(), {tag: counts.get(tag, 0) for tag in windows})
        return windows

    async def report_all(self, windows: dict[str, float]) -> None:
        """Report every autoscaling backend's windowed mean load now."""
        now = self._clock()
        for tag, window_s in sorted(windows.items()):
            if tag not in self._state().backends:
                continue
            ongoing = self.sampler.mean(tag, now, window_s)
            report = LoadReport(backend=tag, ongoing=ongoing, now=now)
            try:
                await self.report(_unless_deleted(report), self._background)
            except CheckpointError as exc:
                # Level-triggered: the next report decides again from fresh load.
                log.warning("load report for backend %r not recorded: %s", tag, exc)

    async def run(self, interval_s: float) -> None:
        """Sample and report forever, at a bounded rate."""
        every = interval_s / SAMPLES_PER_REPORT
        next_report = trio.current_time() + interval_s
        while True:
            await trio.sleep(every)
            windows = self.sample()
            if trio.current_time() >= next_report - every / 2:
                next_report = trio.current_time() + interval_s
                if windows:
                    await self.report_all(windows)

    # -- scale from zero ------------------------------------------------------------------

    def on_demand(self, tag: str) -> None:
        """A router's demand listener: a query waits for ``tag``, which has no replica."""
        if tag in self._waking:
            return
        self._waking.add(tag)
        try:
            self._start_soon(self._wake, tag)
        except RuntimeError:  # the controller is closing
            self._waking.discard(tag)

    async def _wake(self, tag: str) -> None:
        try:
            b = self._state().backends.get(tag)
            if b is None or b.autoscale is None or b.autoscale.replicas != 0:
                return  # not at zero: its replicas are on their way
            waiting = self._ongoing().get(tag, 0)
            if waiting == 0:
                return  # its callers gave up before we got here
            now = self._clock()
            self.sampler.add(now, {tag: waiting})
            log.info("backend %r scales from zero: %d queries wait", tag, waiting)
            await self.report(LoadReport(backend=tag, ongoing=waiting, now=now), self._background)
        except CheckpointError as exc:
            log.warning("could not record scale-from-zero of backend %r: %s", tag, exc)
        finally:
            self._waking.discard(tag)


def _unless_deleted(report: LoadReport) -> Callable[[State], LoadReport | None]:
    """``report``, built at step time: a backend deleted since it was sampled is
    skipped, not refused as unknown (the core refuses reports for unknown backends)."""

    def build(state: State) -> LoadReport | None:
        return report if report.backend in state.backends else None

    return build
