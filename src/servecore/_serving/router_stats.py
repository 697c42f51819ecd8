"""What the router has done and is doing: query counters, latencies, and load.

:class:`QueryStats` is what the router feeds on every query (one dictionary update and
one bisect, on the trio thread); :class:`RouterStatistics` is the frozen picture
:meth:`servecore.Router.statistics` hands out. Neither imports prometheus-client:
:mod:`servecore.metrics` turns them into Prometheus families when it is scraped.
"""

from __future__ import annotations

import threading
from typing import Any

import attrs
import trio

from servecore._core.errors import (
    BackpressureError,
    NoReplicaError,
    RemoteError,
    ReplicaDiedError,
)
from servecore._core.maps import Map
from servecore._histogram import Histogram

__all__ = [
    "QUERY_SECONDS_BUCKETS",
    "BackendLoad",
    "QueryStats",
    "RouterStatistics",
    "outcome_of",
    "timed_outcome",
]

#: Upper bounds (seconds) of the query latency histogram, as Ray Serve's are roughly:
#: from a sub-millisecond function to a minute-long generation.
QUERY_SECONDS_BUCKETS: tuple[float, ...] = (
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
    5.0,
    10.0,
    30.0,
    60.0,
)


def outcome_of(error: BaseException | None) -> str:
    """The ``outcome`` label of a query that ended with ``error`` (None: it succeeded)."""
    if error is None:
        return "ok"
    if isinstance(error, BackpressureError):
        return "backpressure"
    if isinstance(error, NoReplicaError):
        return "no_replica"
    if isinstance(error, ReplicaDiedError):
        return "replica_died"
    if isinstance(error, TimeoutError):
        return "timed_out"  # the caller's timeout, or a deadline that passed in a queue
    if isinstance(error, (Exception, RemoteError)):
        return "error"
    return "cancelled"  # trio.Cancelled and other BaseExceptions: the caller gave up


def timed_outcome(error: BaseException, timer: trio.CancelScope | None) -> str:
    """The outcome label of a query that ended with ``error``: a cancellation by the
    caller's own timeout (``timer``) is ``timed_out``, not ``cancelled``."""
    if timer is not None and timer.cancel_called and isinstance(error, trio.Cancelled):
        return "timed_out"
    return outcome_of(error)


class QueryStats:
    """Counters and latency histograms of queries, by (endpoint, backend).

    Recorded on the trio thread and, for synchronous handles served directly, on host
    threads: an uncontended lock keeps the counts exact at tens of nanoseconds a query.
    """

    __slots__ = ("_lock", "latency", "outcomes")

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str, str], int] = {}
        self.latency: dict[tuple[str, str], Histogram] = {}
        self._lock = threading.Lock()

    def record(self, endpoint: str, backend: str, outcome: str, seconds: float) -> None:
        key = (endpoint, backend, outcome)
        with self._lock:
            self.outcomes[key] = self.outcomes.get(key, 0) + 1
            hist = self.latency.get((endpoint, backend))
            if hist is None:
                hist = self.latency[(endpoint, backend)] = Histogram(QUERY_SECONDS_BUCKETS)
            hist.observe(seconds)

    def snapshot(self) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str], Any]]:
        """Copies of the counters and of the histograms' (cumulative buckets, sum)."""
        with self._lock:
            return dict(self.outcomes), {
                key: (h.cumulative(), h.sum) for key, h in self.latency.items()
            }


@attrs.frozen(kw_only=True)
class BackendLoad:
    """One backend's load as the router sees it, at one moment."""

    tag: str
    #: RUNNING replicas the router sends to (without those it saw die).
    replicas: tuple[str, ...]
    #: Queries waiting for a replica slot or for their batch.
    queued: int
    #: Queries sent to a replica and not yet answered.
    running: int
    #: ``running`` by replica tag.
    running_by_replica: Map[str, int] = attrs.field(factory=Map)


@attrs.frozen(kw_only=True)
class RouterStatistics:
    """A frozen picture of the router: load per backend and query totals."""

    backends: Map[str, BackendLoad]
    #: ``(endpoint, backend, outcome) -> queries`` since the router was made.
    queries: Map[tuple[str, str, str], int]
    shadow_sent: int = 0
    shadow_failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return {
            "backends": {
                tag: {
                    "replicas": list(b.replicas),
                    "queued": b.queued,
                    "running": b.running,
                    "running_by_replica": dict(b.running_by_replica),
                }
                for tag, b in sorted(self.backends.items())
            },
            "queries": [
                {"endpoint": e, "backend": b, "outcome": o, "count": n}
                for (e, b, o), n in sorted(self.queries.items())
            ],
            "shadow_sent": self.shadow_sent,
            "shadow_failed": self.shadow_failed,
        }
