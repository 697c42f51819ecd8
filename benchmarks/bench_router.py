"""Round-trip latency and throughput of a trivial query through servecore's router.

Rows, all measured in the same run:

* ``bare ThreadPoolExecutor`` -- ``submit(echo, x).result()`` on a one-worker pool: the
  cost of handing work to another thread and back, which any in-process threaded
  server pays. The target is a handle round trip within 1.5x of this.
* ``bare trio memory channel`` -- a trio task sends to a server task and receives the
  reply over memory channels: the cost of trio scheduling alone.
* per runtime (``RUNTIMES``): ``runtime.call`` (the runtime alone, no router),
  ``handle.call`` (trio), and ``handle.call`` on a batching backend.

A second table (``host_threads.py``): ``SyncHandle.call`` from host threads
(``servecore.start``) beside each runtime's bare transport -- a thread pool for
threads, a Unix-socket echo for subprocess -- one caller's p50/p99 and the throughput
of 1 and of 16 calling threads.

Latency is sequential (one query at a time; p50/p99 of single round trips), measured
in ``ROUNDS`` rounds that visit every row in turn, so that noise from other work on the
machine spreads over all rows alike. Throughput keeps ``CONCURRENCY`` queries in flight
(``BATCH_CONCURRENCY`` with batching) against one replica. Results print as a table and
go to ``benchmarks/results/bench_router.json``.

Another runtime is one more entry in ``RUNTIMES`` (name -> a factory of what
``open_controller`` takes as ``runtime``, given a private directory). Every replica the
run starts is stopped before it exits, on error too: out-of-process replicas outlive
their controller, so they are stopped from a fresh runtime on the same directory.
The subprocess runtime's comparison with a raw Unix-socket echo
lives in ``bench_subprocess.py``.
Run: ``.venv/bin/python benchmarks/bench_router.py [--quick] [--runtimes threads,...]``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
# Targets are imported by path; children of out-of-process runtimes inherit this.
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
)

import bench_targets  # noqa: E402
import host_threads  # noqa: E402

import servecore  # noqa: E402
from servecore.runtimes import Query, Runtime, resolve_runtime  # noqa: E402
from servecore.runtimes.subprocess import SubprocessRuntime  # noqa: E402

#: Runtimes to measure: name -> a factory, given a private directory, of what
#: open_controller takes as ``runtime``.
RUNTIMES: dict[str, Callable[[Path], str | Runtime]] = {
    "threads": lambda directory: "threads",
    "subprocess": lambda directory: SubprocessRuntime(directory),
}

CONCURRENCY = 32
BATCH_CONCURRENCY = 64
MAX_BATCH_SIZE = 16
ROUNDS = 5

#: A latency probe: run ``n`` sequential round trips, return each one's nanoseconds.
Latency = Callable[[int], Awaitable[list[int]]]
#: A throughput probe: run ``n`` queries with many in flight, return the seconds taken.
Throughput = Callable[[int], Awaitable[float]]


class Row:
    """One line of the table: a name and its two probes."""

    def __init__(
        self, name: str, latency: Latency, throughput: Throughput, scale: float = 1.0
    ) -> None:
        self.name = name
        self.latency = latency
        self.throughput = throughput
        self.scale = scale  # share of the usual query counts (for slow targets)
        self.samples: list[int] = []
        self.seconds: list[float] = []

    def result(self, throughput_n: int) -> dict[str, Any]:
        lat = sorted(self.samples)
        return {
            "name": self.name,
            "p50_us": statistics.median(lat) / 1000,
            "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000,
            "throughput_qps": throughput_n / statistics.median(self.seconds),
            "latency_samples": len(lat),
        }


async def _sequential(call: Callable[[int], Awaitable[Any]], n: int) -> list[int]:
    lat = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        await call(i)
        lat.append(time.perf_counter_ns() - t0)
    return lat


async def _concurrently(call: Callable[[int], Awaitable[Any]], total: int, tasks: int) -> float:
    async def client(n: int) -> None:
        for i in range(n):
            await call(i)

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(tasks):
            nursery.start_soon(client, total // tasks + (k < total % tasks))
    return time.perf_counter() - began


# -- baselines ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def threadpool_row() -> AsyncIterator[Row]:
    """A one-worker ThreadPoolExecutor: submit + result, from the calling thread."""
    echo = bench_targets.echo
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:

        async def latency(n: int) -> list[int]:
            lat = []
            for i in range(n):  # blocking the trio thread on purpose: a bare pool round trip
                t0 = time.perf_counter_ns()
                pool.submit(echo, i).result()
                lat.append(time.perf_counter_ns() - t0)
            return lat

        async def throughput(n: int) -> float:
            in_flight: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
            began = time.perf_counter()
            for i in range(n):
                in_flight.append(pool.submit(echo, i))
                if len(in_flight) >= CONCURRENCY:
                    in_flight.popleft().result()
            while in_flight:
                in_flight.popleft().result()
            return time.perf_counter() - began

        yield Row("bare ThreadPoolExecutor", latency, throughput)


@contextlib.asynccontextmanager
async def trio_channel_row() -> AsyncIterator[Row]:
    """A trio task asks a server task over memory channels and awaits the reply."""
    echo = bench_targets.echo
    requests_send, requests_recv = trio.open_memory_channel[Any](CONCURRENCY)

    async def server() -> None:
        async for value, reply in requests_recv:
            await reply.send(echo(value))

    def client() -> Callable[[int], Awaitable[Any]]:
        reply_send, reply_recv = trio.open_memory_channel[Any](1)

        async def round_trip(value: int) -> Any:
            await requests_send.send((value, reply_send))
            return await reply_recv.receive()

        return round_trip

    async def throughput(n: int) -> float:
        clients = [client() for _ in range(CONCURRENCY)]
        count = iter(range(n))

        async def run(round_trip: Callable[[int], Awaitable[Any]]) -> None:
            for i in count:
                await round_trip(i)

        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for round_trip in clients:
                nursery.start_soon(run, round_trip)
        return time.perf_counter() - began

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        one = client()
        yield Row("bare trio memory channel", lambda n: _sequential(one, n), throughput)
        nursery.cancel_scope.cancel()


# -- servecore ----------------------------------------------------------------------------


async def stop_replicas_left_in(
    make: Callable[[Path], str | Runtime], directory: Path, name: str
) -> None:
    """Stop every replica a controller named ``name`` left running (out-of-process
    runtimes keep them when the controller closes), from a fresh runtime."""
    with trio.CancelScope(shield=True):
        runtime = resolve_runtime(make(directory))
        await runtime.open(namespace=name, report=lambda event: None)
        try:
            for tag in await runtime.list_replicas():
                await runtime.stop_replica(tag, 5.0)
        finally:
            await runtime.close()


@contextlib.asynccontextmanager
async def servecore_rows(
    label: str, make: Callable[[Path], str | Runtime], workdir: Path
) -> AsyncIterator[list[Row]]:
    """Rows for one runtime: raw runtime.call, handle.call, and batched."""
    name = f"bench-{label}"
    directory = workdir / name
    try:
        async with _servecore_rows(label, make, directory) as rows:
            yield rows
    finally:
        await stop_replicas_left_in(make, directory, name)


@contextlib.asynccontextmanager
async def _servecore_rows(
    label: str, make: Callable[[Path], str | Runtime], directory: Path
) -> AsyncIterator[list[Row]]:
    runtime = make(directory)
    async with servecore.open_controller(
        runtime=runtime, name=f"bench-{label}", resync_interval_s=RESYNC["interval_s"]
    ) as ctl:
        await ctl.create_backend(
            "echo", "bench_targets:echo", max_concurrent_queries=BATCH_CONCURRENCY
        )
        await ctl.create_backend(
            "echo_batch",
            "bench_targets:echo_batch",
            max_batch_size=MAX_BATCH_SIZE,
            max_concurrent_queries=BATCH_CONCURRENCY,
        )
        await ctl.create_backend(
            "model", "bench_targets:model", max_concurrent_queries=BATCH_CONCURRENCY
        )
        await ctl.create_backend(
            "model_batch",
            "bench_targets:model_batch",
            max_batch_size=MAX_BATCH_SIZE,
            max_concurrent_queries=BATCH_CONCURRENCY,
        )
        for ep in ("echo", "echo_batch", "model", "model_batch"):
            await ctl.create_endpoint(ep)
            await ctl.set_traffic(ep, {ep: 1.0})
        (tag,) = ctl.routing_table.backends["echo"].replicas
        rt = ctl.runtime

        async def raw(i: int) -> Any:
            return (await rt.call(tag, (Query(args=(i,)),)))[0]

        handle = ctl.get_handle("echo").call
        batched = ctl.get_handle("echo_batch").call
        model = ctl.get_handle("model").call
        model_batched = ctl.get_handle("model_batch").call
        cost = f"{bench_targets.FIXED_COST_S * 1e6:.0f} us/call"
        rows = [
            Row(
                f"{label}: runtime.call",
                lambda n: _sequential(raw, n),
                lambda n: _concurrently(raw, n, CONCURRENCY),
            ),
            Row(
                f"{label}: handle.call",
                lambda n: _sequential(handle, n),
                lambda n: _concurrently(handle, n, CONCURRENCY),
            ),
            Row(
                f"{label}: handle.call, batching {MAX_BATCH_SIZE}",
                lambda n: _sequential(batched, n),
                lambda n: _concurrently(batched, n, BATCH_CONCURRENCY),
            ),
            # A target with a fixed cost per call: where batching pays.
            Row(
                f"{label}: handle.call, {cost}",
                lambda n: _sequential(model, n),
                lambda n: _concurrently(model, n, BATCH_CONCURRENCY),
                scale=0.1,
            ),
            Row(
                f"{label}: handle.call, {cost}, batching {MAX_BATCH_SIZE}",
                lambda n: _sequential(model_batched, n),
                lambda n: _concurrently(model_batched, n, BATCH_CONCURRENCY),
                scale=0.1,
            ),
        ]

        yield rows


# -- host threads: SyncHandle beside each runtime's bare transport ------------------------


def _delete_echo(ctl: servecore.SyncController) -> None:
    ctl.delete_endpoint("echo")  # then the backend is no longer in use
    ctl.delete_backend("echo")  # which stops its replicas


def host_thread_rows(labels: list[str], workdir: Path, n: int, rounds: int) -> list[dict[str, Any]]:
    """``SyncHandle.call`` from host threads (``servecore.start``: its own controller and
    trio in a background thread) beside the bare transport of each runtime: a
    ``ThreadPoolExecutor(4)`` for threads (4 replicas, as many as the pool's workers),
    a Unix-socket echo with a connection per thread for subprocess (1 replica)."""
    rows: dict[str, tuple[Callable[[int], Any], str | None]] = {}
    closers: list[Callable[[], None]] = []
    try:
        for label in labels:
            if label == "threads":
                call, close = host_threads.thread_pool_call(bench_targets.echo)
                closers.append(close)
                rows["bare ThreadPoolExecutor(4)"] = (call, None)
                replicas, bare = 4, "bare ThreadPoolExecutor(4)"
            elif label == "subprocess":
                echo = host_threads.SocketEcho(workdir)
                closers.append(echo.close)
                rows["bare Unix-socket echo (a connection per thread)"] = (echo.call, None)
                replicas, bare = 1, "bare Unix-socket echo (a connection per thread)"
            else:
                continue
            ctl = servecore.start(
                runtime=RUNTIMES[label](workdir / f"sync-{label}"),
                name=f"bench-sync-{label}",
                resync_interval_s=RESYNC["interval_s"],
            )
            closers.append(ctl.close)
            ctl.create_backend(
                "echo",
                "bench_targets:echo",
                num_replicas=replicas,
                max_concurrent_queries=host_threads.CALLERS,
            )
            ctl.create_endpoint("echo")
            ctl.set_traffic("echo", {"echo": 1.0})
            closers.append(functools.partial(_delete_echo, ctl))
            name = f"{label}: SyncHandle.call ({replicas} replica{'s' if replicas > 1 else ''})"
            rows[name] = (ctl.get_handle("echo").call, bare)
        return host_threads.measure(rows, n=n, rounds=rounds)
    finally:
        for close in reversed(closers):
            close()


# -- report -------------------------------------------------------------------------------


def _table(results: list[dict[str, Any]]) -> str:
    head = f"{'':<52}{'p50 us':>10}{'p99 us':>10}{'x pool p50':>12}{'queries/s':>12}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['name']:<52}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}"
            f"{r['p50_vs_threadpool']:>12.2f}{r['throughput_qps']:>12,.0f}"
        )
    return "\n".join(lines)


async def _run(labels: list[str], latency_n: int, throughput_n: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        return await _run_in(Path(tmp), labels, latency_n, throughput_n)


async def _run_in(
    workdir: Path, labels: list[str], latency_n: int, throughput_n: int
) -> list[dict[str, Any]]:
    async with contextlib.AsyncExitStack() as stack:
        rows = [
            await stack.enter_async_context(threadpool_row()),
            await stack.enter_async_context(trio_channel_row()),
        ]
        for label in labels:
            rows.extend(
                await stack.enter_async_context(servecore_rows(label, RUNTIMES[label], workdir))
            )
        per_round = max(1, latency_n // ROUNDS)
        for row in rows:  # warm-up, not recorded
            await row.latency(min(per_round, 300))
        for _ in range(ROUNDS):
            for row in rows:
                row.samples.extend(await row.latency(max(1, int(per_round * row.scale))))
                row.seconds.append(await row.throughput(max(1, int(throughput_n * row.scale))))
        return [row.result(max(1, int(throughput_n * row.scale))) for row in rows]


#: The controller's resync interval for this run (``--resync-interval-s``): the
#: periodic reconcile with the runtime must not cost the query path.
RESYNC: dict[str, float | None] = {"interval_s": 10.0}


def _interval(text: str) -> float | None:
    return None if text == "none" else float(text)


def main(argv: list[str] | None = None) -> None:
    """Run every row, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer queries (a smoke run)")
    parser.add_argument(
        "--runtimes", default=",".join(RUNTIMES), help=f"comma-separated, of {list(RUNTIMES)}"
    )
    parser.add_argument("--out", default=str(HERE / "results" / "bench_router.json"))
    parser.add_argument(
        "--resync-interval-s",
        type=_interval,
        default=10.0,
        help="the controllers' resync interval in seconds, or 'none' (default 10)",
    )
    args = parser.parse_args(argv)
    RESYNC["interval_s"] = args.resync_interval_s
    labels = [r for r in args.runtimes.split(",") if r]
    for label in labels:
        if label not in RUNTIMES:
            parser.error(f"unknown runtime {label!r}; known: {list(RUNTIMES)}")
    latency_n, throughput_n = (1000, 2000) if args.quick else (5000, 5000)
    began = time.perf_counter()
    results = trio.run(_run, labels, latency_n, throughput_n)
    baseline = results[0]["p50_us"]
    for r in results:
        r["p50_vs_threadpool"] = r["p50_us"] / baseline
    print(_table(results))
    print(
        f"({time.perf_counter() - began:.0f} s; {os.cpu_count()} CPUs; {ROUNDS} interleaved "
        f"rounds; {CONCURRENCY} in flight for throughput, {BATCH_CONCURRENCY} with batching)"
    )
    with tempfile.TemporaryDirectory(prefix="bench-router-threads-") as tmp:
        threads = host_thread_rows(labels, Path(tmp), latency_n // 2, ROUNDS)
    print()
    print(host_threads.table(threads))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_router",
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "settings": {
                    "quick": args.quick,
                    "resync_interval_s": args.resync_interval_s,
                    "rounds": ROUNDS,
                    "latency_n": latency_n,
                    "throughput_n_per_round": throughput_n,
                    "concurrency": CONCURRENCY,
                    "batch_concurrency": BATCH_CONCURRENCY,
                    "max_batch_size": MAX_BATCH_SIZE,
                },
                "rows": results,
                "host_threads": threads,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
