"""Round-trip latency and throughput of a trivial query through servecore's router.

Rows, all measured in the same run:

* ``bare ThreadPoolExecutor`` -- ``submit(echo, x).result()`` on a one-worker pool: the
  cost of handing work to another thread and back, which any in-process threaded
  server pays. The target is a handle round trip within 1.5x of this.
* ``bare trio memory channel`` -- a trio task sends to a server task and receives the
  reply over memory channels: the cost of trio scheduling alone.
* per runtime (``RUNTIMES``): ``runtime.call`` (the runtime alone, no router),
  ``handle.call`` (trio), ``SyncHandle.call`` (from host threads, via
  ``servecore.start``) and ``handle.call`` on a batching backend.

Latency is sequential (one query at a time: p50/p99 of single round trips).
Throughput keeps ``CONCURRENCY`` queries in flight (``BATCH_CONCURRENCY`` with
batching) against one replica. Results print as a table and go to
``benchmarks/results/bench_router.json``.

Another runtime is one more entry in ``RUNTIMES`` (name -> what ``open_controller``
takes as ``runtime``), e.g. ``RUNTIMES["subprocess"] = lambda: "subprocess"``.
Run: ``.venv/bin/python benchmarks/bench_router.py [--quick] [--runtimes threads,...]``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
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

import servecore  # noqa: E402
from servecore._sync import start  # noqa: E402
from servecore.runtimes import Query, Runtime  # noqa: E402

#: Runtimes to measure: name -> a factory of what open_controller takes as ``runtime``.
RUNTIMES: dict[str, Callable[[], str | Runtime]] = {
    "threads": lambda: "threads",
}

CONCURRENCY = 32
BATCH_CONCURRENCY = 64
MAX_BATCH_SIZE = 16


class Settings:
    """How many queries each measurement runs."""

    def __init__(self, quick: bool) -> None:
        self.warmup = 200 if quick else 500
        self.latency_n = 1000 if quick else 4000
        self.throughput_n = 4000 if quick else 20000


def _row(name: str, latencies_ns: list[int], queries: int, seconds: float) -> dict[str, Any]:
    lat = sorted(latencies_ns)
    return {
        "name": name,
        "p50_us": statistics.median(lat) / 1000,
        "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000,
        "throughput_qps": queries / seconds,
    }


# -- baselines ----------------------------------------------------------------------------


def bench_threadpool(s: Settings) -> dict[str, Any]:
    """A one-worker ThreadPoolExecutor: submit + result."""
    echo = bench_targets.echo
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        for i in range(s.warmup):
            pool.submit(echo, i).result()
        lat = []
        for i in range(s.latency_n):
            t0 = time.perf_counter_ns()
            pool.submit(echo, i).result()
            lat.append(time.perf_counter_ns() - t0)
        in_flight: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        began = time.perf_counter()
        for i in range(s.throughput_n):
            in_flight.append(pool.submit(echo, i))
            if len(in_flight) >= CONCURRENCY:
                in_flight.popleft().result()
        while in_flight:
            in_flight.popleft().result()
        seconds = time.perf_counter() - began
    return _row("bare ThreadPoolExecutor", lat, s.throughput_n, seconds)


async def _trio_channel(s: Settings) -> dict[str, Any]:
    echo = bench_targets.echo
    requests_send, requests_recv = trio.open_memory_channel[Any](CONCURRENCY)

    async def server() -> None:
        async for value, reply in requests_recv:
            await reply.send(echo(value))

    async def round_trip(value: Any, reply_send: Any, reply_recv: Any) -> Any:
        await requests_send.send((value, reply_send))
        return await reply_recv.receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        reply_send, reply_recv = trio.open_memory_channel[Any](1)
        for i in range(s.warmup):
            await round_trip(i, reply_send, reply_recv)
        lat = []
        for i in range(s.latency_n):
            t0 = time.perf_counter_ns()
            await round_trip(i, reply_send, reply_recv)
            lat.append(time.perf_counter_ns() - t0)

        async def client(n: int) -> None:
            send, recv = trio.open_memory_channel[Any](1)
            for i in range(n):
                await round_trip(i, send, recv)

        seconds = await _concurrently(client, s.throughput_n, CONCURRENCY)
        nursery.cancel_scope.cancel()
    return _row("bare trio memory channel", lat, s.throughput_n, seconds)


async def _concurrently(client: Callable[[int], Awaitable[None]], total: int, n: int) -> float:
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(n):
            nursery.start_soon(client, total // n + (k < total % n))
    return time.perf_counter() - t0


# -- servecore ----------------------------------------------------------------------------


async def _measure_async(
    name: str, call: Callable[[int], Awaitable[Any]], s: Settings, concurrency: int
) -> dict[str, Any]:
    for i in range(s.warmup):
        await call(i)
    lat = []
    for i in range(s.latency_n):
        t0 = time.perf_counter_ns()
        await call(i)
        lat.append(time.perf_counter_ns() - t0)

    async def client(n: int) -> None:
        for i in range(n):
            await call(i)

    seconds = await _concurrently(client, s.throughput_n, concurrency)
    return _row(name, lat, s.throughput_n, seconds)


async def _servecore_async(runtime: str | Runtime, label: str, s: Settings) -> list[dict[str, Any]]:
    rows = []
    async with servecore.open_controller(runtime=runtime, name=f"bench-{label}") as ctl:
        await ctl.create_backend(
            "echo", "bench_targets:echo", max_concurrent_queries=BATCH_CONCURRENCY
        )
        await ctl.create_backend(
            "echo_batch",
            "bench_targets:echo_batch",
            max_batch_size=MAX_BATCH_SIZE,
            max_concurrent_queries=BATCH_CONCURRENCY,
        )
        for ep in ("echo", "echo_batch"):
            await ctl.create_endpoint(ep)
            await ctl.set_traffic(ep, {ep: 1.0})
        (tag,) = ctl.routing_table.backends["echo"].replicas
        rt = ctl.runtime

        async def raw(i: int) -> Any:
            return (await rt.call(tag, (Query(args=(i,)),)))[0]

        rows.append(await _measure_async(f"{label}: runtime.call", raw, s, CONCURRENCY))
        handle = ctl.get_handle("echo")
        rows.append(await _measure_async(f"{label}: handle.call", handle.call, s, CONCURRENCY))
        batched = ctl.get_handle("echo_batch")
        rows.append(
            await _measure_async(
                f"{label}: handle.call, batching {MAX_BATCH_SIZE}",
                batched.call,
                s,
                BATCH_CONCURRENCY,
            )
        )
    return rows


def _servecore_sync(runtime: str | Runtime, label: str, s: Settings) -> dict[str, Any]:
    with start(runtime=runtime, name=f"bench-sync-{label}") as ctl:
        ctl.create_backend("echo", "bench_targets:echo", max_concurrent_queries=CONCURRENCY)
        ctl.create_endpoint("echo")
        ctl.set_traffic("echo", {"echo": 1.0})
        handle = ctl.get_handle("echo")
        for i in range(s.warmup):
            handle.call(i)
        lat = []
        for i in range(s.latency_n):
            t0 = time.perf_counter_ns()
            handle.call(i)
            lat.append(time.perf_counter_ns() - t0)

        def client(n: int) -> None:
            for i in range(n):
                handle.call(i)

        threads = [
            threading.Thread(target=client, args=(s.throughput_n // CONCURRENCY,))
            for _ in range(CONCURRENCY)
        ]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - began
    done = (s.throughput_n // CONCURRENCY) * CONCURRENCY
    return _row(f"{label}: SyncHandle.call (host threads)", lat, done, seconds)


# -- report -------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]], baseline: float) -> str:
    head = f"{'':<44}{'p50 us':>10}{'p99 us':>10}{'x pool p50':>12}{'queries/s':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name']:<44}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}"
            f"{r['p50_us'] / baseline:>12.2f}{r['throughput_qps']:>12,.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run every row, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer queries (a smoke run)")
    parser.add_argument(
        "--runtimes", default=",".join(RUNTIMES), help=f"comma-separated, of {list(RUNTIMES)}"
    )
    parser.add_argument("--out", default=str(HERE / "results" / "bench_router.json"))
    args = parser.parse_args(argv)
    s = Settings(args.quick)
    began = time.perf_counter()
    rows = [bench_threadpool(s), trio.run(_trio_channel, s)]
    for label in [r for r in args.runtimes.split(",") if r]:
        if label not in RUNTIMES:
            parser.error(f"unknown runtime {label!r}; known: {list(RUNTIMES)}")
        factory = RUNTIMES[label]
        rows.extend(trio.run(_servecore_async, factory(), label, s))
        rows.append(_servecore_sync(factory(), label, s))
    baseline = rows[0]["p50_us"]
    for r in rows:
        r["p50_vs_threadpool"] = r["p50_us"] / baseline
    print(_table(rows, baseline))
    print(
        f"({time.perf_counter() - began:.0f} s; {os.cpu_count()} CPUs; "
        f"concurrency {CONCURRENCY}, {BATCH_CONCURRENCY} with batching)"
    )
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
                    "latency_n": s.latency_n,
                    "throughput_n": s.throughput_n,
                    "concurrency": CONCURRENCY,
                    "batch_concurrency": BATCH_CONCURRENCY,
                    "max_batch_size": MAX_BATCH_SIZE,
                },
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
