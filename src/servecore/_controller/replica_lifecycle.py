"""Lifecycle records and counters of a controller: what an operator wants to see.

The controller owns one :class:`ReplicaLifecycle` and calls it at each point of a
replica's life (starting, ready, start failed, stopping, stopped, dead), once after
recovery, and once per saved checkpoint. Each logs a record (INFO; a death, WARNING,
once: runtimes log theirs at DEBUG) on the ``servecore.lifecycle`` logger with
structured fields in ``extra`` (``event``, ``replica``, ``backend``, ``pid``,
``log_path``, ``reason``), counts what happened,
so that :mod:`servecore.metrics` can export the counts, and keeps the last
:data:`RECENT_EVENTS` of them as :class:`LifecycleEvent` values
(``ctl.recent_events()``, the dashboard's "recent events"), so that an operator sees
what just happened without reading the log.

Nothing here may raise into the controller: a failing log handler is the logging
module's business, and the counters are plain integers.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from servecore._core.transitions import ReplicaDied, ReplicaStatus, StartReplica, State
from servecore._core.values import backend_of
from servecore._histogram import Histogram
from servecore.runtimes._protocol import ReplicaInfo

__all__ = [
    "CHECKPOINT_SECONDS_BUCKETS",
    "RECENT_EVENTS",
    "LifecycleCounts",
    "LifecycleEvent",
    "ReplicaLifecycle",
    "replica_info",
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


#: Lifecycle events a controller keeps in memory (the oldest are dropped): enough for a
#: few rolling updates of a large backend, a few kilobytes.
RECENT_EVENTS = 200


@attrs.frozen(kw_only=True)
class LifecycleEvent:
    """One point of a replica's life (or one recovery), as the controller saw it."""

    #: When it happened (the controller's clock, in seconds since the epoch).
    at: float
    #: ``starting``, ``ready``, ``failed``, ``stopping``, ``stopped``, ``dead`` or
    #: ``recovered``.
    event: str
    #: The replica's tag (``None`` for ``recovered``).
    replica: str | None = None
    #: Its backend's tag (``None`` for ``recovered``).
    backend: str | None = None
    #: What else the log record says: the target being started, where a ready replica
    #: runs, why a start failed or a replica died, what recovery found.
    detail: str | None = None


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


class ReplicaLifecycle:
    """Logs each point of a replica's life and counts it, for one controller.

    The controller owns one and calls it as things happen; :mod:`servecore.metrics`
    reads :attr:`counts`. ``runtime`` is asked (through the optional
    :class:`~servecore.runtimes.Introspection` protocol) where a replica runs, for the
    "ready" record. ``clock`` (the controller's, seconds since the epoch; default the
    wall clock) dates the events kept for :meth:`recent`.
    """

    def __init__(self, runtime: Any, clock: Callable[[], float] | None = None) -> None:
        self.runtime = runtime
        self.counts = LifecycleCounts()
        self._clock = clock if clock is not None else time.time
        self._recent: deque[LifecycleEvent] = deque(maxlen=RECENT_EVENTS)

    def recent(self) -> tuple[LifecycleEvent, ...]:
        """The last :data:`RECENT_EVENTS` events, oldest first."""
        return tuple(self._recent)

    def _keep(self, event: str, tag: str | None, detail: str | None = None) -> None:
        try:
            at = self._clock()
        except Exception:  # an operator's view must not fail the controller
            at = time.time()
        backend = backend_of(tag) if tag is not None else None
        self._recent.append(
            LifecycleEvent(at=at, event=event, replica=tag, backend=backend, detail=detail)
        )

    def starting(self, effect: StartReplica) -> None:
        """Replica ``effect.tag`` is about to be started."""
        self.counts.starts[effect.backend] += 1
        self._keep("starting", effect.tag, effect.target)
        log.info(
            "replica %s starting (%s)",
            effect.tag,
            effect.target,
            extra=_fields("starting", effect.tag, target=effect.target),
        )

    def ready(self, tag: str) -> None:
        """Replica ``tag`` started and serves."""
        info = replica_info(self.runtime, tag)
        self.counts.ready[backend_of(tag)] += 1
        where = "".join(
            [
                f" pid={info.pid}" if info.pid is not None else "",
                f" actor={info.actor_id}" if info.actor_id is not None else "",
                f" node={info.node}" if info.node is not None else "",
                f" node_ip={info.node_ip}" if info.node_ip is not None else "",
                f" log={info.log_path}" if info.log_path is not None else "",
            ]
        )
        self._keep("ready", tag, where.strip() or None)
        log.info(
            "replica %s ready%s",
            tag,
            where,
            extra=_fields(
                "ready",
                tag,
                pid=info.pid,
                actor_id=info.actor_id,
                node=info.node,
                node_ip=info.node_ip,
                log_path=info.log_path,
            ),
        )

    def start_failed(self, tag: str, reason: str) -> None:
        """Replica ``tag`` could not start."""
        self.counts.start_failures[backend_of(tag)] += 1
        self._keep("failed", tag, reason)
        log.info("replica %s failed to start: %s", tag, reason, extra=_fields("failed", tag))

    def stopping(self, tag: str) -> None:
        """Replica ``tag`` is being drained and stopped."""
        self._keep("stopping", tag)
        log.info("replica %s stopping", tag, extra=_fields("stopping", tag))

    def stopped(self, tag: str) -> None:
        """Replica ``tag`` has stopped."""
        self.counts.stops[backend_of(tag)] += 1
        self._keep("stopped", tag)
        log.info("replica %s stopped", tag, extra=_fields("stopped", tag))

    def dead(self, event: ReplicaDied) -> None:
        """Replica ``event.tag`` died on its own (a runtime reported it)."""
        self.counts.deaths[backend_of(event.tag)] += 1
        reason = event.reason or "the replica died"
        self._keep("dead", event.tag, reason)
        log.warning(
            "replica %s dead: %s",
            event.tag,
            reason,
            extra=_fields("dead", event.tag, reason=reason),
        )

    def recovered(self, before: State, live: Iterable[str]) -> None:
        """One line after start-up: what recovery found and what it does about it."""
        alive = frozenset(live)
        adopted = sorted(t for t in before.replicas if t in alive)
        lost = sorted(
            t
            for t, r in before.replicas.items()
            if t not in alive and r.status is not ReplicaStatus.STOPPING
        )
        orphans = sorted(t for t in alive if t not in before.replicas)
        summary = (
            f"recovered {len(before.endpoints)} endpoint(s), {len(before.backends)} "
            f"backend(s): {len(adopted)} replica(s) adopted, {len(lost)} restarted, "
            f"{len(orphans)} orphan(s) stopped"
        )
        self._keep("recovered", None, summary)
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

    def checkpoint_saved(self, seconds: float, size: int) -> None:
        """A commit writing ``size`` bytes of records was made durable in ``seconds``."""
        c = self.counts
        c.checkpoint_seconds.observe(seconds)
        c.checkpoint_bytes = size
        c.checkpoints += 1


def replica_info(runtime: Any, tag: str) -> ReplicaInfo:
    """Where replica ``tag`` runs, as far as ``runtime`` says: its
    ``replica_info(tag)`` if it has one (:class:`~servecore.runtimes.Introspection`),
    else its older ``pid(tag)``; an empty :class:`ReplicaInfo` when it says nothing or
    fails (an operator's view must not fail on a runtime's hiccup)."""
    try:
        introspect = getattr(runtime, "replica_info", None)
        if callable(introspect):
            found = introspect(tag)
            return found if isinstance(found, ReplicaInfo) else ReplicaInfo()
        pid = getattr(runtime, "pid", None)
        value = pid(tag) if callable(pid) else None
        return ReplicaInfo(pid=value if isinstance(value, int) else None)
    except Exception:
        return ReplicaInfo()


def _fields(event: str, tag: str, **more: Any) -> dict[str, Any]:
    return {"event": event, "replica": tag, "backend": backend_of(tag), **more}
