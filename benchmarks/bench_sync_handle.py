"""``SyncHandle.call`` from host threads (what most hosts use), beside the bare transport
of each runtime, in the same run.

Rows:

* ``bare Pipe echo`` -- ``multiprocessing.Pipe`` to a child process that echoes: the
  floor for an out-of-process call from a thread.
* ``SyncHandle, subprocess`` -- ``ctl.get_handle(...).call(x)`` from a host thread to
  one subprocess replica of ``bench_targets:echo`` (the direct path: the thread's own
  connection, no trio).
* ``bare ThreadPoolExecutor(4)`` -- ``pool.submit(echo, x).result()``: the floor for the
  threads runtime.
* ``SyncHandle, threads`` -- the same handle on the threads runtime (4 replicas).

Latency: one caller, sequential, p50/p99. Throughput: 16 host threads at once.
Rounds alternate the rows; figures are medians over rounds, and "vs bare" the median
of per-round ratios. Results print as a table
and go to ``benchmarks/results/bench_sync_handle.json``.

Run: ``.venv/bin/python benchmarks/bench_sync_handle.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_targets  # noqa: E402

import servecore  # noqa: E402
from servecore.runtimes.subprocess import SubprocessRuntime  # noqa: E402

CALLERS = 16


def _pipe_child(conn: Connection) -> None:
    while True:
        try:
            conn.send(conn.recv())
        except EOFError:
            return


def _latency(call: Callable[[int], Any], n: int) -> tuple[float, float]:
    samples = []
    for i in range(n):
        began = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - began)
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(0.99 * len(samples)))]


def _throughput(call: Callable[[int], Any], n: int, callers: int) -> float:
    per = n // callers

    def worker() -> None:
        for i in range(per):
            call(i)

    threads = [threading.Thread(target=worker) for _ in range(callers)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return per * callers / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> None:
    """Measure every row in alternating rounds; print and write the results."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "bench_sync_handle.json"))
    args = parser.parse_args(argv)
    n, rounds = (500, 2) if args.quick else (3000, 5)

    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=_pipe_child, args=(child,))
    proc.start()
    pipe_lock = threading.Lock()

    def pipe_call(i: int) -> Any:
        with pipe_lock:  # one pipe: callers take turns, as they would on one connection
            parent.send(i)
            return parent.recv()

    pool = ThreadPoolExecutor(4)
    work = tempfile.mkdtemp(prefix="bench-sync-")
    sub = servecore.start(SubprocessRuntime(Path(work) / "replicas"), None)
    thr = servecore.start("threads", None)
    try:
        for ctl, n_replicas in ((sub, 1), (thr, 4)):
            ctl.create_backend("echo", "bench_targets:echo", num_replicas=n_replicas)
            ctl.create_endpoint("echo")
            ctl.set_traffic("echo", {"echo": 1.0})
        rows: dict[str, Callable[[int], Any]] = {
            "bare Pipe echo": pipe_call,
            "SyncHandle, subprocess": sub.get_handle("echo").call,
            "bare ThreadPoolExecutor(4)": lambda i: pool.submit(bench_targets.echo, i).result(),
            "SyncHandle, threads": thr.get_handle("echo").call,
        }
        results: dict[str, dict[str, list[float]]] = {
            name: {"p50": [], "p99": [], "qps": []} for name in rows
        }
        for call in rows.values():  # warm-up
            _latency(call, 200)
        for r in range(rounds):
            order = list(rows.items()) if r % 2 == 0 else list(rows.items())[::-1]
            for name, call in order:
                p50, p99 = _latency(call, n)
                results[name]["p50"].append(p50)
                results[name]["p99"].append(p99)
                results[name]["qps"].append(_throughput(call, n * 2, CALLERS))
    finally:
        for ctl in (sub, thr):
            ctl.delete_endpoint("echo")
            ctl.delete_backend("echo")
            ctl.close()
        pool.shutdown()
        parent.close()
        proc.join(5)
    table = []
    for name, r in results.items():
        table.append(
            {
                "name": name,
                "p50_us": statistics.median(r["p50"]) * 1e6,
                "p99_us": statistics.median(r["p99"]) * 1e6,
                "qps_16_threads": statistics.median(r["qps"]),
            }
        )
    head = f"{'':<30}{'p50 us':>9}{'p99 us':>9}{'qps, 16 threads':>17}{'vs bare':>9}"
    print(head)
    print("-" * len(head))
    for row in table:
        # The median of per-round ratios: a round's rows ran back to back, under the
        # same load from elsewhere, so their ratio moves less than their medians do.
        mine = results[row["name"]]
        if "subprocess" in row["name"]:
            base = results["bare Pipe echo"]["p50"]
            ratio = statistics.median(x / b for x, b in zip(mine["p50"], base, strict=True))
        elif "threads" in row["name"]:
            base = results["bare ThreadPoolExecutor(4)"]["qps"]
            ratio = statistics.median(b / x for x, b in zip(mine["qps"], base, strict=True))
        else:
            ratio = 1.0
        row["vs_bare"] = ratio
        print(
            f"{row['name']:<30}{row['p50_us']:>9.1f}{row['p99_us']:>9.1f}"
            f"{row['qps_16_threads']:>17,.0f}{ratio:>9.2f}"
        )
    print(
        f"(vs bare, the median of per-round ratios: subprocess p50 / Pipe p50 (target 2x); "
        f"bare pool qps / threads qps (target 1.3x); {rounds} rounds of {n} calls; "
        f"{os.cpu_count()} CPUs)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_sync_handle",
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "rows": table,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
