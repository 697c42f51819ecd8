"""The autoscaling policy: how many replicas a backend should run, as a pure function.

The rules of :mod:`servecore._core.transitions` hold here: no I/O, no clock, no randomness, no
imports from the shell. Time and load come in as values (a :class:`~servecore.LoadReport`
carries both); the decision that matters across a crash -- the current target and a
pending proposal with the time it began -- is a value kept on the backend and
checkpointed with it.

The decision
============

Inputs: the backend's :class:`AutoscalingConfig` ``c``; its durable
:class:`AutoscaleState` ``s`` (``s.replicas`` is the current target ``n``, ``s.pending``
a proposal or ``None``); ``ongoing``, the mean number of queries running on or queued
for the backend over the last ``c.look_back_period_s`` (aggregated by the shell, all
replicas together); and ``now`` in seconds. Output: the new state (the same object if
nothing changed, so nothing is written).

1. **Need.** ``need = ongoing / c.target_ongoing_requests``: the replicas that would
   carry this load at the target concurrency.
2. **Recommendation** (:func:`recommend`), with ``ratio = need / n``:

   * ``n == 0``: ``max(1, ceil(need))`` if ``need > 0``, else ``0``;
   * ``|ratio - 1| <= TOLERANCE`` (and ``need > 0``): ``n`` (the HPA's tolerance);
   * ``ratio > 1``: ``min(ceil(n + (need - n) * c.upscaling_factor), MAX_STEP_UP * n)``,
     which is at least ``n + 1``: one step at most doubles the count;
   * ``ratio < 1``: ``max(ceil(need), min(n - 1, ceil(n - (n - need) *
     c.downscaling_factor)))``: at least one replica fewer (so a small factor still
     moves), but never fewer than ``ceil(need)``, the count at which the same load
     would *not* call for a scale-up again;

   then clamped to ``[c.min_replicas, c.max_replicas]``. (``ceil`` forgives float
   noise of ``1e-9``.)
3. **Delay.** A recommendation ``d`` different from ``n`` becomes a proposal
   ``(direction, d, since)``; ``since`` is kept while observations keep calling for the
   same direction (``d`` follows the latest one), and reset to ``now`` when the
   direction flips; a recommendation equal to ``n`` cancels it. The proposal fires --
   ``n := d`` -- at the first observation with ``now - since >= delay``, where the delay
   is ``c.upscale_delay_s`` up, ``c.downscale_delay_s`` down, and
   ``c.downscale_to_zero_delay_s`` (default ``downscale_delay_s``) for the last step,
   ``1 -> 0``. A scale-down to zero from more than one replica goes to 1 first (after
   ``downscale_delay_s``), then to 0 (after the to-zero delay counted from that step).
4. **Scale from zero** (``n == 0`` and ``ongoing > 0``) fires at once, without the
   upscale delay: a query is waiting and nothing can serve it.
5. **Stale reports** (``now`` before the last decision) are ignored, so a report that
   was delayed cannot undo a fresher decision.
6. **A fresh window.** After a decision no proposal begins until the window holds only
   load measured after it: ``now >= decided_at + c.look_back_period_s`` (except at zero
   replicas, where step 4 applies).

Where it differs from its models, and why
=========================================

Ray Serve's ``autoscaling_policy.py`` computes ``error_ratio = total_requests /
(target * running_replicas)`` and ``ceil(running * (1 + (error_ratio - 1) * factor))``,
and counts control-loop ticks in a counter that lives in the controller's memory. The
Kubernetes HPA computes ``ceil(current * metric / target)``, skips changes within a
tolerance of 0.1, and scales down to the highest recommendation of a 300 s
stabilization window. Here:

* The ratio is taken against the **target** ``n``, not the replicas running now. A
  policy that compares load with running replicas while new ones are still starting
  sees the same overload again and scales up twice; with ``n`` the load is judged by
  the count that will be there once the starts finish.
* The load is **total** ongoing queries of the backend, averaged over the window, not
  an average per replica, so scaling up cannot by itself halve the metric and call
  for a scale-down (the scenario behind Ray Serve users' reports of repeating scale
  up / scale down: after a scale-up, per-replica load halves).
* A scale-down never goes below ``ceil(need)``, so every decision lands where the same
  load calls for no change at all (no limit cycle between ``k`` and ``k + 1``); to reach
  zero the whole window must be idle, so a late sample cannot bounce a backend that has
  just reached zero straight back to one.
* One scale-up at most doubles the count (the HPA's default scale-up policy of 100%
  per period; Ray Serve goes straight to the clamp). While replicas are saturated the
  queue grows without bound, so the mean of running + queued queries says only "more
  than we can serve", not how much more: doubling reaches any need in a logarithmic
  number of delays, each step adding no more replicas than were saturated, where a
  jump to the backlog's size goes straight to ``max_replicas`` and must be walked back
  after a downscale delay. (A backlog that outlasts a step can still carry the count
  past the need; the downscale delay then walks it back once.)
* The next decision waits for a window measured entirely after the last one (step 6).
  Ray Serve decides again as soon as its delay has passed, on a window that may still
  be mostly load from before its last decision -- its users report thrashing when
  ``delay_s < look_back_period_s``.
* The HPA's tolerance (:data:`TOLERANCE`) is kept, Ray Serve has none: a load within
  10% of the target changes nothing, so noise around a boundary does not write a
  proposal on every report.
* The delay is measured in time (``now - since``), not in control-loop ticks, and
  ``since`` is **checkpointed**: a controller that restarts mid-delay continues the
  same countdown (Ray Serve's counter starts again from zero). The time is the
  controller's clock, anchored to the wall clock, so a checkpoint written by another
  process means the same thing.
* Factors are plain gains defaulting to 1.0 (Ray Serve's ``None``, meaning its
  ``smoothing_factor`` of 1.0); an ``upscaling_factor`` above 1 trades one overshoot,
  corrected after a downscale delay, for a faster reaction.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from servecore._core.errors import InvalidConfig
from servecore._core.validation import MAX_REPLICAS, int_between, positive_number, seconds

__all__ = [
    "MAX_FACTOR",
    "MAX_ONGOING",
    "MAX_STEP_UP",
    "TOLERANCE",
    "AutoscaleState",
    "AutoscalingConfig",
    "LoadObservation",
    "ScaleDirection",
    "ScaleProposal",
    "autoscaling_config",
    "begin",
    "decide",
    "delay_of",
    "recommend",
    "reconfigure",
]

#: A load within this fraction of the target changes nothing (the Kubernetes HPA's
#: default ``--horizontal-pod-autoscaler-tolerance``).
TOLERANCE = 0.1
#: One scale-up multiplies the count by at most this (see the module docstring).
MAX_STEP_UP = 2
#: The largest gain a factor may have.
MAX_FACTOR = 100.0
#: The largest ongoing-query count a report may carry (a sanity bound, as in _checks).
MAX_ONGOING = 1e12
_EPS = 1e-9


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)


def _upscale_delay(value: Any) -> float:
    return seconds("autoscaling.upscale_delay_s", value)


def _downscale_delay(value: Any) -> float:
    return seconds("autoscaling.downscale_delay_s", value)


def _to_zero_delay(value: Any) -> float | None:
    return None if value is None else seconds("autoscaling.downscale_to_zero_delay_s", value)


def _upscaling_factor(value: Any) -> float:
    return positive_number("autoscaling.upscaling_factor", value, MAX_FACTOR)


def _downscaling_factor(value: Any) -> float:
    return positive_number("autoscaling.downscaling_factor", value, MAX_FACTOR)


def _target_ongoing(value: Any) -> float:
    return positive_number("autoscaling.target_ongoing_requests", value, float(MAX_REPLICAS))


def _look_back(value: Any) -> float:
    s = seconds("autoscaling.look_back_period_s", value)
    if s <= 0:
        raise InvalidConfig("autoscaling.look_back_period_s", value, "must be above 0 seconds")
    return s


@attrs.frozen(kw_only=True)
class AutoscalingConfig:
    """How a backend scales with its load, in Ray Serve's terms::

        BackendConfig(autoscaling=AutoscalingConfig(min_replicas=0, max_replicas=8))

    The backend keeps between ``min_replicas`` and ``max_replicas`` replicas (Ray Serve's
    ``num_replicas="auto"`` defaults: 1 and 100), starting with ``initial_replicas``
    (default ``min_replicas``), so that each carries about ``target_ongoing_requests``
    running or queued queries (default 2.0), judged on the mean over
    ``look_back_period_s`` (30 s). A change must be called for continuously for
    ``upscale_delay_s`` (30 s) up, ``downscale_delay_s`` (600 s) down, or
    ``downscale_to_zero_delay_s`` (default: ``downscale_delay_s``) from 1 to 0.
    ``upscaling_factor`` and ``downscaling_factor`` (default 1.0) are gains on each
    step: below 1 a step closes only part of the gap. The algorithm is specified in
    :mod:`servecore._core.autoscaling`. A query to a backend at zero replicas waits in the
    router's queue and starts one at once, without the upscale delay.
    """

    min_replicas: int = attrs.field(
        default=1, validator=int_between("autoscaling.min_replicas", 0, MAX_REPLICAS)
    )
    max_replicas: int = attrs.field(
        default=100, validator=int_between("autoscaling.max_replicas", 1, MAX_REPLICAS)
    )
    initial_replicas: int | None = attrs.field(
        default=None,
        validator=int_between("autoscaling.initial_replicas", 0, MAX_REPLICAS, optional=True),
    )
    target_ongoing_requests: float = attrs.field(default=2.0, converter=_target_ongoing)
    look_back_period_s: float = attrs.field(default=30.0, converter=_look_back)
    upscale_delay_s: float = attrs.field(default=30.0, converter=_upscale_delay)
    downscale_delay_s: float = attrs.field(default=600.0, converter=_downscale_delay)
    downscale_to_zero_delay_s: float | None = attrs.field(default=None, converter=_to_zero_delay)
    upscaling_factor: float = attrs.field(default=1.0, converter=_upscaling_factor)
    downscaling_factor: float = attrs.field(default=1.0, converter=_downscaling_factor)

    def __attrs_post_init__(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise InvalidConfig(
                "autoscaling.min_replicas",
                self.min_replicas,
                f"is above max_replicas={self.max_replicas}; lower it or raise max_replicas",
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise InvalidConfig(
                "autoscaling.initial_replicas",
                self.initial_replicas,
                f"must lie between min_replicas={self.min_replicas} and "
                f"max_replicas={self.max_replicas}",
            )

    def clamp(self, n: int) -> int:
        """``n`` brought into ``[min_replicas, max_replicas]``."""
        return min(max(n, self.min_replicas), self.max_replicas)


def autoscaling_config(value: Any) -> AutoscalingConfig | None:
    """``None``, an :class:`AutoscalingConfig`, or a mapping of its fields (Ray Serve's
    ``autoscaling_config`` dict); unknown keys raise :class:`~servecore.InvalidConfig`."""
    if value is None or isinstance(value, AutoscalingConfig):
        return value
    if isinstance(value, Mapping):
        known = {a.name for a in attrs.fields(AutoscalingConfig)}
        for key in value:
            if key not in known:
                raise InvalidConfig(
                    f"autoscaling.{key}", value[key], f"unknown field; known: {sorted(known)}"
                )
        return AutoscalingConfig(**value)
    raise InvalidConfig(
        "autoscaling",
        value,
        "must be None, a servecore.AutoscalingConfig or a mapping of its fields",
    )


class ScaleDirection(enum.Enum):
    """Which way a pending proposal would move the replica count."""

    UP = "UP"
    DOWN = "DOWN"


def _finite(field: str) -> Callable[[Any, Any, Any], None]:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidConfig(field, value, "must be a finite number")
        if not math.isfinite(value):
            raise InvalidConfig(field, value, "must be a finite number")

    return check


@attrs.frozen(kw_only=True)
class ScaleProposal:
    """A change the load has called for since ``since``, waiting out its delay."""

    direction: ScaleDirection
    #: The replica count it would set (the latest recommendation in its direction).
    replicas: int = attrs.field(validator=int_between("replicas", 0, MAX_REPLICAS))
    #: When observations began to call for this direction (the controller's clock).
    since: float = attrs.field(validator=_finite("since"))


@attrs.frozen(kw_only=True)
class AutoscaleState:
    """The durable decision state of an autoscaling backend (checkpointed with it)."""

    #: The replica count the backend runs now: the last decision.
    replicas: int = attrs.field(validator=int_between("replicas", 0, MAX_REPLICAS))
    #: The change waiting out its delay, if any.
    pending: ScaleProposal | None = None
    #: How many scale decisions have fired (scale-from-zero and config clamps included).
    decisions: int = 0
    #: When the last decision fired (the controller's clock), if any has.
    decided_at: float | None = None


@attrs.frozen(kw_only=True)
class LoadObservation:
    """The last load report of a backend, as the policy read it (not checkpointed)."""

    #: Mean running + queued queries over the look-back window.
    ongoing: float
    #: When it was reported (the controller's clock).
    at: float
    #: The count the policy recommended for this load before any delay (step 2).
    desired: int


def begin(config: AutoscalingConfig, current: int | None = None) -> AutoscaleState:
    """The decision state of a backend that starts autoscaling: ``initial_replicas`` if
    given, else ``current`` (the replicas it runs, when switched from a fixed count)
    clamped to the range, else ``min_replicas``."""
    if config.initial_replicas is not None:
        n = config.initial_replicas
    elif current is not None:
        n = config.clamp(current)
    else:
        n = config.min_replicas
    return AutoscaleState(replicas=n)


def reconfigure(
    old: AutoscalingConfig, new: AutoscalingConfig, state: AutoscaleState
) -> AutoscaleState:
    """The decision state after the autoscaling config changes from ``old`` to ``new``:
    unchanged if the config is; otherwise the target is clamped into the new range at
    once and a pending proposal is dropped (new parameters, new countdown)."""
    if old == new:
        return state
    n = new.clamp(state.replicas)
    if n == state.replicas and state.pending is None:
        return state
    return attrs.evolve(
        state,
        replicas=n,
        pending=None,
        decisions=state.decisions + (n != state.replicas),
    )


def recommend(config: AutoscalingConfig, current: int, ongoing: float) -> int:
    """Step 2 of the module docstring: the count this load calls for, before delays."""
    need = ongoing / config.target_ongoing_requests
    if current <= 0:
        return config.clamp(max(1, _ceil(need)) if need > 0 else 0)
    ratio = need / current
    if need > 0 and abs(ratio - 1) <= TOLERANCE + _EPS:
        return config.clamp(current)
    if ratio > 1:
        d = min(_ceil(current + (need - current) * config.upscaling_factor), MAX_STEP_UP * current)
    else:
        shrunk = _ceil(current - (current - need) * config.downscaling_factor)
        d = max(_ceil(need), min(current - 1, shrunk))
    return config.clamp(d)


def delay_of(config: AutoscalingConfig, current: int, proposal: int) -> float:
    """How long a move from ``current`` to ``proposal`` replicas must be called for."""
    if proposal > current:
        return 0.0 if current == 0 else config.upscale_delay_s
    if proposal == 0 and current == 1 and config.downscale_to_zero_delay_s is not None:
        return config.downscale_to_zero_delay_s
    return config.downscale_delay_s


def decide(
    config: AutoscalingConfig, state: AutoscaleState, ongoing: float, now: float
) -> AutoscaleState:
    """One report of load: the new decision state (``state`` itself if nothing changed).

    ``state.replicas`` is the current replica count, ``ongoing`` the mean running +
    queued queries over the look-back window, ``now`` the time of the report; the new
    target is the result's ``replicas``. See the module docstring for the algorithm.
    """
    n = state.replicas
    if state.decided_at is not None and now < state.decided_at:
        return state  # stale: taken before the last decision
    if config.clamp(n) != n:  # only after a config change slipped past reconfigure()
        return _fire(state, config.clamp(n), now)
    fresh_from = None if state.decided_at is None else state.decided_at + config.look_back_period_s
    if n > 0 and fresh_from is not None and now < fresh_from:
        return state  # the window still holds load from before the last decision
    d = recommend(config, n, ongoing)
    if d == n:
        return state if state.pending is None else attrs.evolve(state, pending=None)
    if d < n and d == 0 and n > 1:
        d = 1  # to zero in two steps: the last one waits the to-zero delay
    direction = ScaleDirection.UP if d > n else ScaleDirection.DOWN
    pending = state.pending
    since = pending.since if pending is not None and pending.direction is direction else now
    if now - since >= delay_of(config, n, d):
        return _fire(state, d, now)
    proposal = ScaleProposal(direction=direction, replicas=d, since=since)
    if proposal == pending:
        return state
    return attrs.evolve(state, pending=proposal)


def _fire(state: AutoscaleState, replicas: int, now: float) -> AutoscaleState:
    return AutoscaleState(
        replicas=replicas, pending=None, decisions=state.decisions + 1, decided_at=now
    )
