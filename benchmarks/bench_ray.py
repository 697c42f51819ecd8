"""Round trips and deploy time of the Ray runtime, beside raw Ray and Ray Serve.

One run, on one private local Ray cluster that this script starts (``LocalRayCluster``:
free ports on 127.0.0.1, a fresh temporary directory, exactly its own processes
stopped at the end -- never ``ray stop``). Every row serves the same trivial function,
``bench_targets:echo``, on one replica that needs no CPU slot:

* ``raw actor`` -- a plain Ray actor whose method calls ``echo``; the caller does
  ``ray.get(actor.echo.remote(x))``. The floor for anything built on Ray actors.
* ``raw actor (asyncio)`` -- the same actor awaited from an asyncio loop
  (``await actor.echo.remote(x)``): the floor for any *async* caller, since the result
  must cross from Ray's thread to the caller's event loop.
* ``servecore runtime.call`` -- ``RayRuntime.call`` on a replica (one actor call,
  awaited in trio through the reference's completion callback).
* ``servecore handle.call`` -- the same through a controller, its router and a handle:
  what an application calls. Target: within 1.2x of the raw actor call.
* ``Ray Serve handle`` -- a Serve deployment of the same function (no HTTP proxy), called
  through its ``DeploymentHandle``: ``handle.remote(x).result()``.

Latency is sequential (one query at a time): p50/p99 of single round trips, measured in
interleaved rounds so that the rows share the machine's noise. Ray Serve is started only
after the other rows are measured (its controller and its handle's router thread load
the machine and this process), and measured interleaved with the raw actor once more
(``raw_while_serve_runs`` in the JSON). ``seq qps`` is one over
the mean round trip; ``conc qps`` keeps ``CONCURRENCY`` queries in flight for a fixed
time (``ray.wait`` for the raw actor, trio tasks for servecore, asyncio tasks for Serve).

``deploy 8`` is the time from asking for 8 replicas to all 8 serving: 8 raw actors
created and each answering, ``create_backend(num_replicas=8)``, and ``serve.run`` of a
deployment with ``num_replicas=8``.

Results print as a table and go to ``benchmarks/results/bench_ray.json``.
Run: ``.venv/bin/python benchmarks/bench_ray.py [--quick]`` (needs ``servecore[serve]``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
# Ray workers get the driver script's directory on their path, so they import these too.
sys.path.insert(0, str(HERE))

import bench_targets  # noqa: E402
import ray  # noqa: E402

try:  # Ray Serve is the 'serve' extra; without it the Serve row is left out.
    from ray import serve
except ImportError as missing:  # pragma: no cover - depends on the installed extras
    serve = None  # type: ignore[assignment]
    SERVE_MISSING: str | None = f"{missing} (install 'servecore[serve]')"
else:
    SERVE_MISSING = None

import servecore  # noqa: E402
from servecore.runtimes import Query  # noqa: E402
from servecore.runtimes.ray import LocalRayCluster, RayRuntime  # noqa: E402

CONCURRENCY = 8
TARGET = "bench_targets:echo"
NO_CPU = {"num_cpus": 0}


@ray.remote(num_cpus=0)
class RawEcho:
    """The raw baseline: a plain actor calling the same function."""

    def echo(self, value: Any) -> Any:
        return bench_targets.echo(value)

    def ready(self) -> bool:
        return True


class ServeEcho:
    """The Ray Serve deployment of the same function."""

    def __call__(self, value: Any) -> Any:
        return bench_targets.echo(value)


def summarize(name: str, latencies: list[float], conc_qps: float | None) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "system": name,
        "n": len(ordered),
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
        "seq_qps": 1.0 / statistics.fmean(ordered),
        "conc_qps": conc_qps,
    }


async def bench(args: argparse.Namespace, cluster: LocalRayCluster) -> dict[str, Any]:
    rounds, per_round, duration = (4, 100, 1.0) if args.quick else (10, 300, 3.0)
    warmup = 50 if args.quick else 200

    # -- set up one replica of each kind -------------------------------------------------
    raw = RawEcho.remote()  # type: ignore[attr-defined]
    ray.get(raw.ready.remote())

    runtime = RayRuntime(address=cluster.address)
    rows: list[dict[str, Any]] = []
    deploy: dict[str, float] = {}
    async with servecore.open_controller(runtime=runtime, name="bench") as ctl:
        await ctl.create_backend("echo", TARGET, runtime_options=NO_CPU)
        await ctl.create_endpoint("echo")
        await ctl.set_traffic("echo", {"echo": 1.0})
        handle = ctl.get_handle("echo")
        (tag,) = ctl.state.replicas

        with_serve = serve is not None
        serve_handle: Any = None

        query = Query(args=(1,))

        def raw_call() -> Any:
            return ray.get(raw.echo.remote(1))

        async def runtime_call() -> Any:
            return (await runtime.call(tag, (query,)))[0]

        async def handle_call() -> Any:
            return await handle.call(1)

        def serve_call() -> Any:
            return serve_handle.remote(1).result()

        sync_systems: dict[str, Callable[[], Any]] = {
            "raw actor (ray.get)": raw_call,
            "Ray Serve handle": serve_call,
        }
        async_systems: dict[str, Callable[[], Any]] = {
            "servecore runtime.call": runtime_call,
            "servecore handle.call": handle_call,
        }
        order = [
            "raw actor (ray.get)",
            "raw actor (asyncio)",
            "servecore runtime.call",
            "servecore handle.call",
        ]
        latencies: dict[str, list[float]] = {name: [] for name in [*order, "Ray Serve handle"]}
        control: list[float] = []  # the raw actor again, measured while Serve runs
        clock = time.perf_counter

        def asyncio_round(n: int) -> list[float]:
            """``await actor.echo.remote(x)`` in an asyncio loop: the raw async floor."""

            async def loop() -> list[float]:
                times = []
                for _ in range(n):
                    t0 = clock()
                    assert await raw.echo.remote(1) == 1
                    times.append(clock() - t0)
                return times

            return asyncio.run(loop())

        async def run_round(
            name: str, n: int, record: bool, into: list[float] | None = None
        ) -> None:
            out = latencies[name] if into is None else into
            if name == "raw actor (asyncio)":
                times = await trio.to_thread.run_sync(asyncio_round, n)
                if record:
                    out.extend(times)
            elif name in sync_systems:
                fn = sync_systems[name]
                for _ in range(n):
                    t0 = clock()
                    assert fn() == 1
                    if record:
                        out.append(clock() - t0)
            else:
                afn = async_systems[name]
                for _ in range(n):
                    t0 = clock()
                    assert await afn() == 1
                    if record:
                        out.append(clock() - t0)

        for name in order:
            await run_round(name, warmup, record=False)
        for _ in range(rounds):
            for name in order:
                await run_round(name, per_round, record=True)

        # -- throughput with CONCURRENCY in flight ------------------------------------------
        conc: dict[str, float] = {}

        def raw_concurrent() -> float:
            done = 0
            in_flight = [raw.echo.remote(1) for _ in range(CONCURRENCY)]
            t0 = clock()
            while clock() - t0 < duration:
                ready, in_flight = ray.wait(in_flight, num_returns=1)
                ray.get(ready)
                done += len(ready)
                in_flight.extend(raw.echo.remote(1) for _ in ready)
            elapsed = clock() - t0
            ray.get(in_flight)
            return done / elapsed

        conc["raw actor (ray.get)"] = await trio.to_thread.run_sync(raw_concurrent)

        async def asyncio_concurrent() -> float:
            done = 0
            t0 = clock()

            async def worker() -> None:
                nonlocal done
                while clock() - t0 < duration:
                    await raw.echo.remote(1)
                    done += 1

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            return done / (clock() - t0)

        conc["raw actor (asyncio)"] = await trio.to_thread.run_sync(
            lambda: asyncio.run(asyncio_concurrent())
        )

        async def trio_concurrent(afn: Callable[[], Any]) -> float:
            done = 0
            t0 = clock()

            async def worker() -> None:
                nonlocal done
                while clock() - t0 < duration:
                    await afn()
                    done += 1

            async with trio.open_nursery() as nursery:
                for _ in range(CONCURRENCY):
                    nursery.start_soon(worker)
            return done / (clock() - t0)

        for name, afn in async_systems.items():
            conc[name] = await trio_concurrent(afn)

        # -- Ray Serve, on its own: its controller and its handle's router thread would
        #    otherwise load the machine (and this process) while the other rows run.
        if with_serve:
            # No HTTP proxy: only the handle path is measured, and nothing listens.
            serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})
            deployment = serve.deployment(name="echo", num_replicas=1, ray_actor_options=NO_CPU)(
                ServeEcho
            )
            serve_handle = serve.run(deployment.bind(), name="echo", route_prefix=None)
            await run_round("Ray Serve handle", warmup, record=False)
            for _ in range(rounds):
                await run_round("Ray Serve handle", per_round, record=True)
                await run_round("raw actor (ray.get)", per_round, record=True, into=control)

        async def serve_concurrent() -> float:
            async_handle = serve_handle
            done = 0
            t0 = clock()

            async def worker() -> None:
                nonlocal done
                while clock() - t0 < duration:
                    await async_handle.remote(1)
                    done += 1

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            return done / (clock() - t0)

        if with_serve:
            conc["Ray Serve handle"] = await trio.to_thread.run_sync(
                lambda: asyncio.run(serve_concurrent())
            )
        for name in order:
            rows.append(summarize(name, latencies[name], conc[name]))
        if with_serve:
            rows.append(
                summarize(
                    "Ray Serve handle", latencies["Ray Serve handle"], conc.get("Ray Serve handle")
                )
            )

        # -- deploy 8 replicas with each ----------------------------------------------------
        if not args.skip_deploy:
            t0 = clock()
            await ctl.create_backend("eight", TARGET, num_replicas=8, runtime_options=NO_CPU)
            deploy["servecore handle.call"] = clock() - t0
            deploy["servecore runtime.call"] = deploy["servecore handle.call"]
            await ctl.delete_backend("eight")

            def raw_deploy() -> float:
                t0 = clock()
                actors = [RawEcho.remote() for _ in range(8)]  # type: ignore[attr-defined]
                ray.get([a.ready.remote() for a in actors])
                elapsed = clock() - t0
                for a in actors:
                    ray.kill(a)
                return elapsed

            deploy["raw actor (ray.get)"] = await trio.to_thread.run_sync(raw_deploy)
            deploy["raw actor (asyncio)"] = deploy["raw actor (ray.get)"]

            def serve_deploy() -> float:
                eight = serve.deployment(name="eight", num_replicas=8, ray_actor_options=NO_CPU)(
                    ServeEcho
                )
                t0 = clock()
                serve.run(eight.bind(), name="eight", route_prefix=None)
                elapsed = clock() - t0
                serve.delete("eight")
                return elapsed

            if with_serve:
                deploy["Ray Serve handle"] = await trio.to_thread.run_sync(serve_deploy)
        for row in rows:
            row["deploy8_s"] = deploy.get(row["system"])

        if with_serve:
            serve.shutdown()  # type: ignore[no-untyped-call]
        await ctl.delete_endpoint("echo")
        await ctl.delete_backend("echo")
    result: dict[str, Any] = {"rows": rows}
    if control:
        result["raw_while_serve_runs"] = summarize("raw actor (ray.get)", control, None)
    return result


def ratio(rows: list[dict[str, Any]], a: str, b: str, key: str) -> float | None:
    by = {r["system"]: r for r in rows}
    if a not in by or b not in by:
        return None
    value: float = by[a][key] / by[b][key]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--skip-deploy", action="store_true", help="skip the deploy-8 rows")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_ray.json")
    args = parser.parse_args()

    cluster = LocalRayCluster(num_cpus=2)
    started = time.perf_counter()
    cluster.start()
    try:
        cluster.connect(namespace="bench", log_to_driver=False)
        result = trio.run(bench, args, cluster)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()
    rows = result["rows"]
    raw, handle, serve_row = "raw actor (ray.get)", "servecore handle.call", "Ray Serve handle"
    result["ratios"] = {
        "handle_p50_over_raw": ratio(rows, handle, raw, "p50_ms"),
        "handle_p99_over_raw": ratio(rows, handle, raw, "p99_ms"),
        "handle_p50_over_serve": ratio(rows, handle, serve_row, "p50_ms"),
        "runtime_p50_over_raw": ratio(rows, "servecore runtime.call", raw, "p50_ms"),
        "handle_p50_over_raw_asyncio": ratio(rows, handle, "raw actor (asyncio)", "p50_ms"),
        "handle_conc_qps_over_raw": ratio(rows, handle, raw, "conc_qps"),
        "handle_conc_qps_over_serve": ratio(rows, handle, serve_row, "conc_qps"),
    }
    if "raw_while_serve_runs" in result:
        by = {r["system"]: r for r in rows}
        result["ratios"]["serve_p50_over_raw_same_phase"] = (
            by[serve_row]["p50_ms"] / result["raw_while_serve_runs"]["p50_ms"]
        )
    result["meta"] = {
        "python": platform.python_version(),
        "ray": ray.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "quick": args.quick,
        "serve_missing": SERVE_MISSING,
        "concurrency": CONCURRENCY,
        "wall_s": time.perf_counter() - started,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    header = (
        f"{'system':<24} {'p50 ms':>8} {'p99 ms':>8} {'seq qps':>9} {'conc qps':>9} {'deploy 8':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        deploy = f"{r['deploy8_s']:.2f}s" if r.get("deploy8_s") is not None else "-"
        print(
            f"{r['system']:<24} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
            f"{r['seq_qps']:>9.0f} {r['conc_qps']:>9.0f} {deploy:>9}"
        )
    control = result.get("raw_while_serve_runs")
    if control is not None:
        print(
            f"raw actor while Serve runs: p50 {control['p50_ms']:.3f} ms, "
            f"p99 {control['p99_ms']:.3f} ms"
        )
    for key, value in result["ratios"].items():
        print(f"{key}: {value:.2f}" if value is not None else f"{key}: -")
    if SERVE_MISSING:
        print(f"Ray Serve row left out: {SERVE_MISSING}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
