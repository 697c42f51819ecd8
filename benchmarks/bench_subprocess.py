"""Round trips and start time of the subprocess runtime, beside raw baselines.

Rows, all measured in the same run:

* ``raw unix-socket echo`` -- a trio host sends a length-prefixed frame over a Unix
  socket to a child Python process that echoes it back from a plain blocking loop: the
  floor any out-of-process replica pays. The target is ``runtime.call`` within 2x.
* ``runtime.call`` -- ``SubprocessRuntime.call`` on one replica of a trivial target
  (``bench_targets:echo``): pickling, framing, the replica's threads, the host's reader.
* ``handle.call`` -- the same through a controller, the router and a handle.

Latency is sequential (one query at a time; p50/p99 of single round trips).
Throughput is sequential too (``seq qps``), and with ``CONCURRENCY`` queries in flight
(``conc qps``): pipelined frames for the raw echo, concurrent tasks otherwise. The three
rows are measured in interleaved rounds (load from elsewhere on the machine then weighs
on all alike); each figure is the median over rounds, and ``p50/raw`` the median of the
per-round ratios.

Host threads (``host_threads.py``): ``SyncHandle.call`` from a ``servecore.start``'s
host threads beside a bare Unix-socket echo with a connection per thread -- one
caller's p50/p99, and the throughput of 1 and of 16 calling threads.

Start time: ``python -c pass`` (spawn and exit), ``python -c "import servecore"``, and
``start_replica`` of a fresh replica (spawn, import, construct, connect), each the
median of ``starts`` runs.

Every replica the run starts is stopped before it exits, on error too (replicas outlive
their runtime, so leftovers are stopped from a fresh one on each directory).
Results print as a table and go to ``benchmarks/results/bench_subprocess.json``.
Run: ``.venv/bin/python benchmarks/bench_subprocess.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
# Replicas import targets with the host's sys.path, so this is enough for them too.
sys.path.insert(0, str(HERE))

import host_threads  # noqa: E402

import servecore  # noqa: E402
from servecore import BackendConfig, StartReplica  # noqa: E402
from servecore.runtimes import Query  # noqa: E402
from servecore.runtimes.subprocess import SubprocessRuntime  # noqa: E402

CONCURRENCY = 8

#: The raw echo child: accept one connection, echo length-prefixed frames back.
ECHO_SERVER = r"""
import socket, struct, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(1)
print("ready", flush=True)
conn, _ = listener.accept()
rfile = conn.makefile("rb")
while True:
    header = rfile.read(4)
    if len(header) < 4:
        break
    body = rfile.read(struct.unpack("!I", header)[0])
    conn.sendall(header + body)
"""


class Settings:
    """How many rounds, queries per round, and starts each measurement runs."""

    def __init__(self, quick: bool) -> None:
        self.rounds = 3 if quick else 7
        self.warmup = 200 if quick else 500
        self.latency_n = 500 if quick else 1500
        self.throughput_n = 1000 if quick else 4000
        self.starts = 3 if quick else 7


async def _sequential(fn: Any, n: int) -> tuple[list[int], float]:
    latencies: list[int] = []
    clock = time.perf_counter_ns
    start = clock()
    for i in range(n):
        t0 = clock()
        await fn(i)
        latencies.append(clock() - t0)
    return latencies, n / ((clock() - start) / 1e9)


async def _concurrent(fn: Any, n: int, concurrency: int) -> float:
    per_task = n // concurrency

    async def worker() -> None:
        for i in range(per_task):
            await fn(i)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return per_task * concurrency / (time.perf_counter() - start)


class Subject:
    """One row: a sequential ``call(i)`` and a ``CONCURRENCY``-wide ``throughput(n)``."""

    def __init__(self, name: str, call: Any, throughput: Any) -> None:
        self.name = name
        self.call = call
        self.throughput = throughput
        self.p50_us: list[float] = []
        self.p99_us: list[float] = []
        self.seq_qps: list[float] = []
        self.conc_qps: list[float] = []

    async def measure(self, settings: Settings) -> None:
        latencies, seq_qps = await _sequential(self.call, settings.latency_n)
        lat = sorted(latencies)
        self.p50_us.append(statistics.median(lat) / 1000)
        self.p99_us.append(lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000)
        self.seq_qps.append(seq_qps)
        self.conc_qps.append(await self.throughput(settings.throughput_n))

    def row(self, raw: Subject) -> dict[str, Any]:
        ratios = [mine / base for mine, base in zip(self.p50_us, raw.p50_us, strict=True)]
        return {
            "name": self.name,
            "p50_us": statistics.median(self.p50_us),
            "p99_us": statistics.median(self.p99_us),
            "seq_qps": statistics.median(self.seq_qps),
            "conc_qps": statistics.median(self.conc_qps),
            "p50_vs_raw": statistics.median(ratios),
            "p50_us_per_round": self.p50_us,
        }


# -- raw echo -------------------------------------------------------------------------


class RawEcho:
    """A child echoing length-prefixed frames, and a trio client for it."""

    def __init__(self, workdir: Path) -> None:
        self.path = str(workdir / "echo.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ECHO_SERVER, self.path], stdout=subprocess.PIPE, text=True
        )
        self.buffer = bytearray()

    async def connect(self) -> None:
        assert self.proc.stdout is not None
        await trio.to_thread.run_sync(self.proc.stdout.readline)
        self.stream = await trio.open_unix_socket(self.path)

    async def read_frame(self) -> bytes:
        while True:
            if len(self.buffer) >= 4:
                end = 4 + int.from_bytes(self.buffer[:4], "big")
                if len(self.buffer) >= end:
                    body = bytes(self.buffer[4:end])
                    del self.buffer[:end]
                    return body
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError("echo server closed")
            self.buffer += data

    async def echo(self, i: int) -> None:
        body = str(i).encode()
        await self.stream.send_all(len(body).to_bytes(4, "big") + body)
        await self.read_frame()

    async def pipelined(self, n: int) -> float:
        """Keep CONCURRENCY frames in flight on the one connection."""
        window = trio.Semaphore(CONCURRENCY)
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                for _ in range(n):
                    await self.read_frame()
                    window.release()

            nursery.start_soon(reader)
            for i in range(n):
                await window.acquire()
                body = str(i).encode()
                await self.stream.send_all(len(body).to_bytes(4, "big") + body)
        return n / (time.perf_counter() - start)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# -- the runtime ----------------------------------------------------------------------


def _effect(tag: str) -> StartReplica:
    return StartReplica(
        tag=tag,
        backend=tag.split("#")[0],
        target="bench_targets:echo",
        init_args=(),
        init_kwargs={},
        config=BackendConfig(max_concurrent_queries=CONCURRENCY),
    )


async def bench_round_trips(settings: Settings, workdir: Path) -> list[dict[str, Any]]:
    """Raw echo, runtime.call and handle.call, measured in interleaved rounds so that
    load from elsewhere on the machine weighs on all three alike."""
    raw_echo = RawEcho(workdir)
    runtime = SubprocessRuntime(workdir / "runtime")
    try:
        await raw_echo.connect()
        await runtime.open(namespace="bench", report=lambda event: None)
        await runtime.start_replica(_effect("echo#1"))

        async def runtime_call(i: int) -> None:
            await runtime.call("echo#1", [Query(args=(i,))])

        async with servecore.open_controller(
            runtime=SubprocessRuntime(workdir / "runtime-handle"), name="bench-handle"
        ) as ctl:
            await ctl.create_backend(
                "echo", "bench_targets:echo", max_concurrent_queries=CONCURRENCY
            )
            await ctl.create_endpoint("echo")
            await ctl.set_traffic("echo", {"echo": 1.0})
            handle = ctl.get_handle("echo")

            async def handle_call(i: int) -> None:
                await handle.call(i)

            subjects = [
                Subject("raw unix-socket echo", raw_echo.echo, raw_echo.pipelined),
                Subject(
                    "runtime.call",
                    runtime_call,
                    lambda n: _concurrent(runtime_call, n, CONCURRENCY),
                ),
                Subject(
                    "handle.call", handle_call, lambda n: _concurrent(handle_call, n, CONCURRENCY)
                ),
            ]
            for subject in subjects:  # warm up
                for i in range(settings.warmup):
                    await subject.call(i)
            for _ in range(settings.rounds):
                for subject in subjects:
                    await subject.measure(settings)
            await ctl.delete_endpoint("echo")
            await ctl.delete_backend("echo")
        await runtime.stop_replica("echo#1", 5.0)
        return [subject.row(subjects[0]) for subject in subjects]
    finally:
        raw_echo.close()
        await runtime.close()


async def bench_start(settings: Settings, workdir: Path) -> float:
    runtime = SubprocessRuntime(workdir / "runtime-start")
    await runtime.open(namespace="bench-start", report=lambda event: None)
    try:
        starts: list[float] = []
        for n in range(settings.starts):
            tag = f"fresh#{n}"
            t0 = time.perf_counter()
            await runtime.start_replica(_effect(tag))
            starts.append(time.perf_counter() - t0)
            await runtime.stop_replica(tag, 5.0)
        return statistics.median(starts) * 1000
    finally:
        await runtime.close()


async def bench_spawn(settings: Settings, code: str) -> float:
    times: list[float] = []
    for _ in range(settings.starts):
        t0 = time.perf_counter()
        await trio.run_process([sys.executable, "-c", code])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


async def stop_replicas_left_in(directory: Path) -> None:
    """Stop every replica still running in runtime directory ``directory``."""
    namespace = directory / ".namespace"
    if not namespace.exists():
        return
    with trio.CancelScope(shield=True):
        runtime = SubprocessRuntime(directory)
        await runtime.open(namespace=namespace.read_text(), report=lambda event: None)
        try:
            for tag in await runtime.list_replicas():
                await runtime.stop_replica(tag, 5.0)
        finally:
            await runtime.close()


def bench_host_threads(settings: Settings, workdir: Path) -> list[dict[str, Any]]:
    """``SyncHandle.call`` from host threads (the direct path: each thread's own
    connection to the replica) beside a bare Unix-socket echo with a connection per
    thread; see ``host_threads.py``."""
    echo = host_threads.SocketEcho(workdir)
    ctl = servecore.start(SubprocessRuntime(workdir / "runtime-sync"), None, name="bench-sync")
    try:
        ctl.create_backend(
            "echo", "bench_targets:echo", max_concurrent_queries=host_threads.CALLERS
        )
        ctl.create_endpoint("echo")
        ctl.set_traffic("echo", {"echo": 1.0})
        bare = "bare Unix-socket echo (a connection per thread)"
        rows = {bare: (echo.call, None), "SyncHandle.call": (ctl.get_handle("echo").call, bare)}
        results = host_threads.measure(rows, n=settings.latency_n, rounds=settings.rounds)
        ctl.delete_endpoint("echo")
        ctl.delete_backend("echo")
        return results
    finally:
        ctl.close()
        echo.close()


async def main(quick: bool) -> dict[str, Any]:
    settings = Settings(quick)
    with tempfile.TemporaryDirectory(prefix="bench-subprocess-") as tmp:
        workdir = Path(tmp)
        try:
            round_trips = await bench_round_trips(settings, workdir)
            threads = await trio.to_thread.run_sync(bench_host_threads, settings, workdir)
            start_ms = await bench_start(settings, workdir)
        finally:
            for directory in ("runtime", "runtime-handle", "runtime-start", "runtime-sync"):
                await stop_replicas_left_in(workdir / directory)
    bare_ms = await bench_spawn(settings, "pass")
    import_ms = await bench_spawn(settings, "import servecore")
    return {
        "benchmark": "bench_subprocess",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "concurrency": CONCURRENCY,
        "rounds": settings.rounds,
        "round_trips": round_trips,
        "host_threads": threads,
        "start_ms": {
            "python -c pass": bare_ms,
            "python -c 'import servecore'": import_ms,
            "start_replica": start_ms,
        },
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{'round trip':<24}{'p50 us':>9}{'p99 us':>9}{'seq qps':>10}{'conc qps':>10}{'p50/raw':>9}"
    )
    for row in result["round_trips"]:
        print(
            f"{row['name']:<24}{row['p50_us']:>9.1f}{row['p99_us']:>9.1f}"
            f"{row['seq_qps']:>10.0f}{row['conc_qps']:>10.0f}{row['p50_vs_raw']:>8.2f}x"
        )
    print()
    print(host_threads.table(result["host_threads"]))
    print()
    print(f"{'start':<32}{'median ms':>10}")
    for name, ms in result["start_ms"].items():
        print(f"{name:<32}{ms:>10.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer queries and starts")
    args = parser.parse_args()
    result = trio.run(main, args.quick)
    print_table(result)
    out = HERE / "results" / "bench_subprocess.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
