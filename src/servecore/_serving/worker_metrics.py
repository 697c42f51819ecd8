"""``/-/metrics`` of ingress workers: one set of series for all the workers of a server.

Several workers accept on one port, so a scrape reaches one of them, at random. Each
worker therefore answers with the *sum over every worker of its server*, as
prometheus-client's multiprocess mode does for gunicorn: a Kubernetes pod (one scrape
target) shows one ``servecore_queries_total{endpoint,backend,outcome}`` series per
label set whatever worker answered, and its counters only go up while workers come and
go (docs/decisions.md, "Metrics of ingress workers").

How: each worker writes its router's cumulative counts (queries by endpoint, backend
and outcome; the latency histogram; HTTP responses by code) into its own files,
``counter_<pid>.db`` and ``histogram_<pid>.db``, in prometheus-client's multiprocess
format, under ``worker-metrics/`` in the state directory: every
:data:`SYNC_INTERVAL_S` from a thread, at exit, and right before it answers a scrape.
A scrape reads every worker's files with
:class:`prometheus_client.multiprocess.MultiProcessCollector`, which sums them. The
counts are copied, not counted twice: queries are still recorded once, by the router,
and nothing is added to the query path. A worker that died leaves its last files, so
the sums never go down; ``servecore run`` clears the directory when it starts its
workers (a restart of the server resets the counters, as a restarted pod does).

Needs prometheus-client (the ``metrics`` extra, in ``cli``); without it ``/-/metrics``
answers 501 saying what to install.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from servecore._serving.router_stats import QueryStats

__all__ = ["METRICS_DIR", "SYNC_INTERVAL_S", "WorkerMetrics", "clear_worker_metrics"]

#: The directory, in the state directory, of the workers' metric files.
METRICS_DIR = "worker-metrics"

#: How often a worker copies its counts to its files (a scrape copies them first too).
SYNC_INTERVAL_S = 1.0

_QUERIES = (
    "servecore_queries",
    "Queries by endpoint, backend and outcome (ok, error, timed_out, cancelled, "
    "no_replica, backpressure, replica_died).",
)
_LATENCY = (
    "servecore_query_latency_seconds",
    "Query latency in the router, from choosing a backend to the answer.",
)
_RESPONSES = (
    "servecore_http_responses",
    "HTTP responses of the ingress by status code (refusals such as 404 included).",
)


def clear_worker_metrics(state_dir: Path) -> None:
    """Remove the metric files workers of an earlier server left in ``state_dir``."""
    directory = state_dir / METRICS_DIR
    if directory.is_dir():
        for path in directory.glob("*.db"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class WorkerMetrics:
    """One worker's counts, copied to its files in ``directory``; :meth:`exposition`
    is the sum over every worker's files (see the module).

    ``stats`` is the worker's router's :class:`QueryStats`, ``responses()`` its HTTP
    responses by status code. Raises ``ImportError`` (saying what to install) without
    prometheus-client.
    """

    def __init__(
        self,
        directory: Path,
        stats: QueryStats,
        responses: Callable[[], Mapping[int, int]],
        *,
        interval_s: float = SYNC_INTERVAL_S,
    ) -> None:
        try:
            from prometheus_client.mmap_dict import MmapedDict, mmap_key
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "/-/metrics needs prometheus-client; install it with: "
                "pip install 'servecore[metrics]'"
            ) from exc
        self.directory = directory
        self._stats = stats
        self._responses = responses
        self._interval_s = interval_s
        self._key = mmap_key
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        pid = os.getpid()
        # prometheus-client's file format, written by its own code: it reads them back.
        self._counters = MmapedDict(str(directory / f"counter_{pid}.db"))  # type: ignore[no-untyped-call]
        self._histograms = MmapedDict(str(directory / f"histogram_{pid}.db"))  # type: ignore[no-untyped-call]
        # What was last written, by key: only what changed is written again.
        self._written: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Copy the counts every ``interval_s`` from a daemon thread until :meth:`close`."""
        self.sync()
        self._thread = threading.Thread(target=self._run, name="servecore-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sync()

    def sync(self) -> None:
        """Copy this worker's counts to its files now."""
        outcomes, histograms = self._stats.snapshot()
        responses = self._responses()
        with self._lock:
            if self._counters is None:
                return  # closed
            name, doc = _QUERIES
            for (endpoint, backend, outcome), n in outcomes.items():
                key = self._key(
                    name,
                    f"{name}_total",
                    ["endpoint", "backend", "outcome"],
                    [endpoint, backend, outcome],
                    doc,
                )
                self._write(self._counters, key, n)
            name, doc = _RESPONSES
            for code, n in responses.items():
                self._write(
                    self._counters, self._key(name, f"{name}_total", ["code"], [str(code)], doc), n
                )
            name, doc = _LATENCY
            for (endpoint, backend), (cumulative, total) in histograms.items():
                # The files hold each bucket's own count; the collector accumulates.
                below = 0
                for bound, running in cumulative:
                    key = self._key(
                        name,
                        f"{name}_bucket",
                        ["endpoint", "backend", "le"],
                        [endpoint, backend, bound],
                        doc,
                    )
                    self._write(self._histograms, key, running - below)
                    below = running
                key = self._key(
                    name, f"{name}_sum", ["endpoint", "backend"], [endpoint, backend], doc
                )
                self._write(self._histograms, key, total)

    def _write(self, target: Any, key: str, value: float) -> None:
        if self._written.get(key) != value:
            target.write_value(key, float(value), 0.0)
            self._written[key] = value

    def exposition(self) -> bytes:
        """Every worker's counts, summed, in the Prometheus text format (this worker's
        copied first, so a scrape sees its own queries up to now)."""
        from prometheus_client import CollectorRegistry, generate_latest

        self.sync()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Summed(_merge(self.directory)))
        return generate_latest(registry)

    def close(self) -> None:
        """A last copy of the counts (they stay for the others to sum), then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sync()
        with self._lock:
            for files in (self._counters, self._histograms):
                if files is not None:
                    files.close()  # type: ignore[no-untyped-call]
            self._counters = self._histograms = None  # type: ignore[assignment]


def _merge(directory: Path) -> list[Any]:
    """The metric families of every worker's files in ``directory``, summed."""
    from prometheus_client.multiprocess import MultiProcessCollector

    for attempt in range(3):
        # A file of a worker that is starting may not be sized yet (or one killed
        # then never will be): it holds nothing to read.
        files = [str(p) for p in directory.glob("*.db") if _size(p) >= 8]
        try:
            return list(MultiProcessCollector.merge(files, accumulate=True))  # type: ignore[no-untyped-call]
        except (FileNotFoundError, struct.error):
            # A new server cleared the directory between the listing and the reading
            # (it is taking over), or a file was caught being sized: list them again.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class _Summed:
    """A collector of families already merged (prometheus-client's ``Collector``)."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> list[Any]:
        return self._families
