"""Prometheus metrics of a controller, its router and its checkpoints.

One custom collector reads what the controller already keeps (its state, the router's
:class:`~servecore.router.Router.statistics` and query counters, the lifecycle counts
of :mod:`servecore._controller.replica_lifecycle`) at scrape time, so nothing is counted twice and
attaching it late loses nothing. The HTTP ingress serves it at ``/-/metrics``; an
embedding host registers it on its own registry::

    from prometheus_client import REGISTRY, start_http_server
    servecore.metrics.register(ctl, REGISTRY)   # ctl: a Controller or SyncController
    start_http_server(9100)

Families (all prefixed ``servecore_``): ``queries_total{endpoint,backend,outcome}``,
``query_latency_seconds{endpoint,backend}`` (histogram),
``queued_queries{backend}``, ``running_queries{backend}``,
``replicas{backend,status}``, ``backend_target_replicas{backend}``,
``backend_status{backend,status}``, ``replica_starts_total{backend}``,
``replica_start_failures_total{backend}``, ``replica_deaths_total{backend}``,
``replica_stops_total{backend}``, ``checkpoint_commit_seconds`` (histogram),
``checkpoint_bytes``, ``checkpoint_seq``, ``shadow_queries_total{outcome}``,
``http_responses_total{code}`` (every response of the HTTP ingress, 404, 405 and 400
included).

Needs prometheus-client: ``pip install 'servecore[metrics]'``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from servecore._core.transitions import BackendStatus, ReplicaStatus
from servecore._histogram import Histogram
from servecore._serving.ops_http import http_responses

try:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "servecore.metrics needs prometheus-client; install it with: "
        "pip install 'servecore[metrics]'"
    ) from exc

__all__ = ["CONTENT_TYPE_LATEST", "ControllerCollector", "exposition", "register", "registry_for"]


def _controller(ctl: Any) -> Any:
    # A SyncController wraps the async one; read the async one's state directly (plain
    # attribute reads of immutable values are safe from any thread).
    inner = getattr(ctl, "controller", None)
    return inner if inner is not None and hasattr(inner, "_state") else ctl


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    return [(bound, float(n)) for bound, n in h.cumulative()]


class ControllerCollector(Collector):
    """Collects one controller's metrics at each scrape. Register it on any
    :class:`prometheus_client.CollectorRegistry` (a controller may have several)."""

    def __init__(self, controller: Any, *, prefix: str = "servecore") -> None:
        self._ref = weakref.ref(_controller(controller))
        self.prefix = prefix

    def describe(self) -> list[Any]:
        # Families depend on the state; an empty description lets the registry accept
        # this collector without calling collect() at registration.
        return []

    def collect(self) -> Iterator[Any]:
        ctl = self._ref()
        if ctl is None:  # the controller is gone
            return
        p = self.prefix
        state = ctl.state
        lc = ctl.lifecycle_counts

        replicas = GaugeMetricFamily(
            f"{p}_replicas", "Replicas by backend and status.", labels=["backend", "status"]
        )
        target = GaugeMetricFamily(
            f"{p}_backend_target_replicas", "Replicas each backend should run.", labels=["backend"]
        )
        status = GaugeMetricFamily(
            f"{p}_backend_status",
            "1 for the status each backend is in, 0 for the others.",
            labels=["backend", "status"],
        )
        by_status: dict[tuple[str, str], int] = {}
        for r in state.replicas.values():
            key = (r.backend, r.status.value)
            by_status[key] = by_status.get(key, 0) + 1
        for tag, b in sorted(state.backends.items()):
            target.add_metric([tag], b.wanted_replicas)
            for s in ReplicaStatus:
                replicas.add_metric([tag, s.value], by_status.get((tag, s.value), 0))
            for bs in BackendStatus:
                status.add_metric([tag, bs.value], 1.0 if b.status is bs else 0.0)
        yield replicas
        yield target
        yield status

        for name, counter, doc in (
            ("replica_starts_total", lc.starts, "Replica starts begun."),
            ("replica_start_failures_total", lc.start_failures, "Replica starts that failed."),
            ("replica_deaths_total", lc.deaths, "Replicas that died on their own."),
            ("replica_stops_total", lc.stops, "Replicas stopped by the controller."),
        ):
            family = CounterMetricFamily(
                f"{p}_{name.removesuffix('_total')}", doc, labels=["backend"]
            )
            for tag in sorted(set(counter) | set(state.backends)):
                family.add_metric([tag], counter.get(tag, 0))
            yield family

        commits = HistogramMetricFamily(
            f"{p}_checkpoint_commit_seconds", "Time to make a checkpoint durable."
        )
        h = lc.checkpoint_seconds
        commits.add_metric([], _buckets(h), h.sum)
        yield commits
        yield GaugeMetricFamily(
            f"{p}_checkpoint_bytes",
            "Bytes of records the last commit wrote.",
            value=lc.checkpoint_bytes,
        )
        yield GaugeMetricFamily(f"{p}_checkpoint_seq", "Last checkpoint number.", value=ctl.seq)

        router = ctl.active_router  # None until a handle was made
        queries = CounterMetricFamily(
            f"{p}_queries",
            "Queries by endpoint, backend and outcome (ok, error, timed_out, cancelled, "
            "no_replica, backpressure, replica_died).",
            labels=["endpoint", "backend", "outcome"],
        )
        latency = HistogramMetricFamily(
            f"{p}_query_latency_seconds",
            "Query latency in the router, from choosing a backend to the answer.",
            labels=["endpoint", "backend"],
        )
        queued = GaugeMetricFamily(
            f"{p}_queued_queries", "Queries waiting for a replica or a batch.", labels=["backend"]
        )
        running = GaugeMetricFamily(
            f"{p}_running_queries",
            "Queries sent to replicas, not yet answered.",
            labels=["backend"],
        )
        shadow = CounterMetricFamily(
            f"{p}_shadow_queries", "Shadow copies sent, and failed.", labels=["outcome"]
        )
        if router is not None:
            stats = router.statistics()
            for (endpoint, backend, outcome), n in sorted(stats.queries.items()):
                queries.add_metric([endpoint, backend, outcome], n)
            _, histograms = router.stats.snapshot()
            for (endpoint, backend), (buckets, total) in sorted(histograms.items()):
                latency.add_metric([endpoint, backend], [(b, float(n)) for b, n in buckets], total)
            for tag, load in sorted(stats.backends.items()):
                queued.add_metric([tag], load.queued)
                running.add_metric([tag], load.running)
            shadow.add_metric(["sent"], stats.shadow_sent)
            shadow.add_metric(["failed"], stats.shadow_failed)
        else:
            for tag in sorted(state.backends):
                queued.add_metric([tag], 0)
                running.add_metric([tag], 0)
        responses = CounterMetricFamily(
            f"{p}_http_responses",
            "HTTP responses of the ingress by status code (refusals such as 404 included).",
            labels=["code"],
        )
        for code, n in http_responses(ctl).items():
            responses.add_metric([str(code)], n)
        yield responses
        yield queries
        yield latency
        yield queued
        yield running
        yield shadow


_REGISTRIES: weakref.WeakKeyDictionary[Any, CollectorRegistry] = weakref.WeakKeyDictionary()


def register(controller: Any, registry: CollectorRegistry) -> ControllerCollector:
    """Register ``controller``'s collector on ``registry`` (e.g. prometheus_client's
    global ``REGISTRY``) and return it (``registry.unregister(it)`` removes it)."""
    collector = ControllerCollector(controller)
    registry.register(collector)
    return collector


def registry_for(controller: Any) -> CollectorRegistry:
    """A registry holding only ``controller``'s collector (what ``/-/metrics`` serves)."""
    ctl = _controller(controller)
    found = _REGISTRIES.get(ctl)
    if found is None:
        found = CollectorRegistry(auto_describe=False)
        register(ctl, found)
        _REGISTRIES[ctl] = found
    return found


def exposition(controller: Any) -> bytes:
    """``controller``'s metrics in the Prometheus text format."""
    return generate_latest(registry_for(controller))
