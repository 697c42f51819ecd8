"""Async targets: throughput with 1, 8 and 64 queries in flight, beside bare asyncio.

Every query awaits ``asyncio.sleep(ASYNC_WAIT_S)`` (10 ms; think: a call to another
service) and returns its argument, so the ideal throughput is ``concurrency / 0.01 s``.
Rows, measured in the same run:

* ``bare asyncio server`` -- a child Python process runs ``asyncio.start_unix_server``;
  each request (a length-prefixed frame) becomes a task that sleeps and echoes. A trio
  host keeps ``c`` connections busy, one request at a time each. The floor.
* ``subprocess runtime`` -- ``SubprocessRuntime.call`` on one replica of
  ``bench_targets:async_wait`` with ``max_concurrent_queries=64``, from ``c`` trio tasks.
* ``threads runtime`` -- the same on the threads runtime.

Each figure is the median of ``rounds`` rounds of ``duration`` seconds.
Results print as a table and go to ``benchmarks/results/bench_async.json``.
Run: ``.venv/bin/python benchmarks/bench_async.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # replicas import targets with the host's sys.path

from bench_targets import ASYNC_WAIT_S  # noqa: E402

from servecore import BackendConfig, StartReplica  # noqa: E402
from servecore.runtimes import Query  # noqa: E402
from servecore.runtimes.subprocess import SubprocessRuntime  # noqa: E402
from servecore.runtimes.threads import ThreadRuntime  # noqa: E402

CONCURRENCIES = (1, 8, 64)

ASYNCIO_SERVER = r"""
import asyncio, struct, sys
WAIT = float(sys.argv[2])
async def serve(reader, writer):
    lock = asyncio.Lock()
    async def answer(body):
        await asyncio.sleep(WAIT)
        async with lock:
            writer.write(struct.pack("!I", len(body)) + body)
            await writer.drain()
    while True:
        try:
            header = await reader.readexactly(4)
            body = await reader.readexactly(struct.unpack("!I", header)[0])
        except asyncio.IncompleteReadError:
            return
        asyncio.create_task(answer(body))
async def main():
    server = await asyncio.start_unix_server(serve, sys.argv[1])
    print("ready", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


async def closed_loop(call: Callable[[int], Awaitable[Any]], c: int, duration: float) -> float:
    """Queries per second with ``c`` callers each sending one query after another."""
    done = 0
    deadline = time.perf_counter() + duration

    async def caller(i: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call(i)
            done += 1

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(c):
            nursery.start_soon(caller, i)
    return done / (time.perf_counter() - started)


async def bare_asyncio(directory: str, c: int, duration: float) -> float:
    path = os.path.join(directory, "asyncio.sock")
    child = subprocess.Popen(
        [sys.executable, "-c", ASYNCIO_SERVER, path, str(ASYNC_WAIT_S)], stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        streams = [await trio.open_unix_socket(path) for _ in range(c)]

        async def call(i: int) -> None:
            stream = streams[i]
            await stream.send_all(struct.pack("!I", 2) + b"hi")
            got = b""
            while len(got) < 6:
                got += await stream.receive_some(6 - len(got))

        try:
            return await closed_loop(call, c, duration)
        finally:
            for stream in streams:
                await stream.aclose()
    finally:
        child.kill()
        child.wait()


def start_effect(tag: str) -> StartReplica:
    return StartReplica(
        tag=tag,
        backend=tag.split("#")[0],
        target="bench_targets:async_wait",
        init_args=(),
        init_kwargs={},
        config=BackendConfig(max_concurrent_queries=64),
    )


async def through_runtime(runtime: Any, c: int, duration: float) -> float:
    tag = "wait#1"
    await runtime.start_replica(start_effect(tag))
    batch = [Query(args=("hi",))]
    try:
        return await closed_loop(lambda _i: runtime.call(tag, batch), c, duration)
    finally:
        await runtime.stop_replica(tag, 5.0)


async def measure(rounds: int, duration: float) -> dict[str, dict[int, float]]:
    results: dict[str, dict[int, list[float]]] = {
        name: {c: [] for c in CONCURRENCIES}
        for name in ("bare asyncio server", "subprocess runtime", "threads runtime")
    }
    with tempfile.TemporaryDirectory(prefix="sc-bench-async-") as directory:
        sub = SubprocessRuntime(Path(directory) / "rt")
        await sub.open(namespace="bench-async", report=lambda _event: None)
        threads = ThreadRuntime()
        await threads.open(namespace="bench-async", report=lambda _event: None)
        try:
            for _ in range(rounds):  # interleaved, so noise weighs on every row alike
                for c in CONCURRENCIES:
                    row = results["bare asyncio server"][c]
                    row.append(await bare_asyncio(directory, c, duration))
                    row = results["subprocess runtime"][c]
                    row.append(await through_runtime(sub, c, duration))
                    row = results["threads runtime"][c]
                    row.append(await through_runtime(threads, c, duration))
        finally:
            await sub.close()
            await threads.close()
    return {
        name: {c: statistics.median(v) for c, v in by_c.items()} for name, by_c in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 0.5 s")
    args = parser.parse_args()
    rounds, duration = (1, 0.5) if args.quick else (3, 2.0)
    medians = trio.run(measure, rounds, duration)
    ideal = {c: c / ASYNC_WAIT_S for c in CONCURRENCIES}
    header = "| | " + " | ".join(f"{c} in flight (qps)" for c in CONCURRENCIES) + " |"
    print(header)
    print("|---|" + "---:|" * len(CONCURRENCIES))
    print("| ideal (c / 10 ms) | " + " | ".join(f"{ideal[c]:,.0f}" for c in CONCURRENCIES) + " |")
    for name, by_c in medians.items():
        print(f"| {name} | " + " | ".join(f"{by_c[c]:,.0f}" for c in CONCURRENCIES) + " |")
    out = HERE / "results" / "bench_async.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/bench_async.py" + (" --quick" if args.quick else ""),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "async_wait_s": ASYNC_WAIT_S,
                "rounds": rounds,
                "duration_s": duration,
                "qps": {
                    name: {str(c): v for c, v in by_c.items()} for name, by_c in medians.items()
                },
                "ideal_qps": {str(c): v for c, v in ideal.items()},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
