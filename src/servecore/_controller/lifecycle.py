"""Lifecycle records and counters of a controller: what an operator wants to see.

The controller calls one function here at each point of a replica's life (starting,
ready, start failed, stopping, stopped, dead), once after recovery, and once per saved
checkpoint. Each logs an INFO record on the ``servecore.lifecycle`` logger with
structured fields in ``extra`` (``event``, ``replica``, ``backend``, ``pid``,
``log_path``, ``reason``), and counts what happened, so that :mod:`servecore.metrics`
can export the counts without depending on when it was attached.

Nothing here may raise into the controller: a failing log handler is the logging
module's business, and the counters are plain integers.
"""

from __future__ import annotations

import bisect
import logging
import weakref
from collections import Counter
from collections.abc import Iterable
from typing import Any

from servecore._core.transitions import ReplicaDied, ReplicaStatus, StartReplica, State
from servecore._core.values import backend_of

__all__ = [
    "CHECKPOINT_SECONDS_BUCKETS",
    "Histogram",
    "LifecycleCounts",
    "checkpoint_saved",
    "counts",
    "dead",
    "ready",
    "recovered",
    "replica_log_path",
    "replica_pid",
    "reported",
    "start_failed",
    "starting",
    "stopped",
    "stopping",
]

log = logging.getLogger("servecore.lifecycle")

#: Upper bounds (seconds) of the checkpoint commit latency histogram: an fsync on a
#: laptop SSD takes 0.1-5 ms, on a network disk 10-100 ms.
CHECKPOINT_SECONDS_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class Histogram:
    """Cumulative-bucket histogram in the Prometheus shape, with no dependency."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(upper bound as text, observations <= it), ..., ("+Inf", count)]``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class LifecycleCounts:
    """What one controller has done to replicas since it opened, by backend."""

    def __init__(self) -> None:
        self.starts: Counter[str] = Counter()
        self.ready: Counter[str] = Counter()
        self.start_failures: Counter[str] = Counter()
        self.stops: Counter[str] = Counter()
        self.deaths: Counter[str] = Counter()
        self.checkpoint_seconds = Histogram(CHECKPOINT_SECONDS_BUCKETS)
        self.checkpoint_bytes = 0
        self.checkpoints = 0


_COUNTS: weakref.WeakKeyDictionary[Any, LifecycleCounts] = weakref.WeakKeyDictionary()


def counts(controller: Any) -> LifecycleCounts:
    """The counters of ``controller`` (made on first use)."""
    found = _COUNTS.get(controller)
    if found is None:
        found = _COUNTS[controller] = LifecycleCounts()
    return found


def replica_pid(runtime: Any, tag: str) -> int | None:
    """The process id of replica ``tag``, if the runtime runs replicas in processes."""
    pid = getattr(runtime, "pid", None)
    if not callable(pid):
        return None
    try:
        value = pid(tag)
    except Exception:  # an operator's view must not fail on a runtime's hiccup
        return None
    return value if isinstance(value, int) else None


def replica_actor_id(runtime: Any, tag: str) -> str | None:
    """The actor id of replica ``tag``, if the runtime has actors (Ray) and says."""
    actor_id = getattr(runtime, "actor_id", None)
    if not callable(actor_id):
        return None
    try:
        value = actor_id(tag)
    except Exception:
        return None
    return None if value is None else str(value)


def replica_log_path(runtime: Any, tag: str) -> str | None:
    """Where replica ``tag`` writes its output, if the runtime keeps a log file."""
    log_path = getattr(runtime, "log_path", None)
    try:
        if callable(log_path):
            value = log_path(tag)
        else:
            # The subprocess runtime keeps one log per replica under its directory.
            files = getattr(runtime, "_files", None)
            value = files(tag).log if callable(files) else None
    except Exception:
        return None
    return None if value is None else str(value)


def _fields(event: str, tag: str, **more: Any) -> dict[str, Any]:
    return {"event": event, "replica": tag, "backend": backend_of(tag), **more}


def starting(controller: Any, effect: StartReplica) -> None:
    """Replica ``effect.tag`` is about to be started."""
    counts(controller).starts[effect.backend] += 1
    log.info(
        "replica %s starting (%s)",
        effect.tag,
        effect.target,
        extra=_fields("starting", effect.tag, target=effect.target),
    )


def ready(controller: Any, tag: str) -> None:
    """Replica ``tag`` started and serves."""
    runtime = controller.runtime
    pid = replica_pid(runtime, tag)
    actor = replica_actor_id(runtime, tag)
    path = replica_log_path(runtime, tag)
    counts(controller).ready[backend_of(tag)] += 1
    where = "".join(
        [
            f" pid={pid}" if pid is not None else "",
            f" actor={actor}" if actor is not None else "",
            f" log={path}" if path is not None else "",
        ]
    )
    log.info(
        "replica %s ready%s",
        tag,
        where,
        extra=_fields("ready", tag, pid=pid, actor_id=actor, log_path=path),
    )


def start_failed(controller: Any, tag: str, reason: str) -> None:
    """Replica ``tag`` could not start."""
    counts(controller).start_failures[backend_of(tag)] += 1
    log.info("replica %s failed to start: %s", tag, reason, extra=_fields("failed", tag))


def stopping(controller: Any, tag: str) -> None:
    """Replica ``tag`` is being drained and stopped."""
    log.info("replica %s stopping", tag, extra=_fields("stopping", tag))


def stopped(controller: Any, tag: str) -> None:
    """Replica ``tag`` has stopped."""
    counts(controller).stops[backend_of(tag)] += 1
    log.info("replica %s stopped", tag, extra=_fields("stopped", tag))


def dead(controller: Any, event: ReplicaDied) -> None:
    """Replica ``event.tag`` died on its own."""
    counts(controller).deaths[backend_of(event.tag)] += 1
    reason = event.reason or "the replica died"
    log.info(
        "replica %s dead: %s", event.tag, reason, extra=_fields("dead", event.tag, reason=reason)
    )


def reported(controller: Any, event: Any) -> None:
    """A runtime reported ``event`` outside any command (deaths come this way)."""
    if isinstance(event, ReplicaDied):
        dead(controller, event)


def recovered(controller: Any, before: State, live: Iterable[str]) -> None:
    """One line after start-up: what recovery found and what it does about it."""
    alive = frozenset(live)
    adopted = sorted(t for t in before.replicas if t in alive)
    lost = sorted(
        t
        for t, r in before.replicas.items()
        if t not in alive and r.status is not ReplicaStatus.STOPPING
    )
    orphans = sorted(t for t in alive if t not in before.replicas)
    log.info(
        "recovered %d endpoint(s), %d backend(s): %d replica(s) adopted, %d restarted, "
        "%d orphan(s) stopped",
        len(before.endpoints),
        len(before.backends),
        len(adopted),
        len(lost),
        len(orphans),
        extra={
            "event": "recovered",
            "adopted": adopted,
            "restarted": lost,
            "orphans": orphans,
        },
    )


def checkpoint_saved(controller: Any, seconds: float, size: int) -> None:
    """A commit writing ``size`` bytes of records was made durable in ``seconds``."""
    c = counts(controller)
    c.checkpoint_seconds.observe(seconds)
    c.checkpoint_bytes = size
    c.checkpoints += 1
