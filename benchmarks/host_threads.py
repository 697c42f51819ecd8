"""Blocking calls from host threads, for ``bench_router.py`` and ``bench_subprocess.py``:
``SyncHandle.call`` beside the bare transport of each runtime, measured alike.

Each row is a blocking ``call(i)`` usable from any thread. A round measures its
latency (one caller, sequential: p50 and p99) and its throughput with 1 and with
``CALLERS`` host threads calling at once. Rows are visited in turn, round after round
(ABBA order), so load from elsewhere on the machine weighs on all alike; figures are
medians over rounds, and each ratio the median of per-round ratios to its baseline.

The bare transports:

* ``bare ThreadPoolExecutor(4)`` -- ``pool.submit(echo, i).result()``: the floor of the
  threads runtime, whose replicas are threads.
* ``bare Unix-socket echo`` -- a child process echoing length-prefixed frames, one
  thread per connection, and one connection per calling thread: the floor of the
  subprocess runtime's direct path (each host thread's own connection to a replica).
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

#: Host threads calling at once in the throughput probe.
CALLERS = 16

#: A child that echoes length-prefixed frames, a thread per connection.
ECHO_SERVER = r"""
import socket, struct, sys, threading
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(64)
print("ready", flush=True)
def serve(conn):
    rfile = conn.makefile("rb")
    while True:
        header = rfile.read(4)
        if len(header) < 4:
            return
        body = rfile.read(struct.unpack("!I", header)[0])
        conn.sendall(header + body)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class SocketEcho:
    """The bare Unix-socket echo: a child process, and a connection per calling thread."""

    def __init__(self, workdir: Path) -> None:
        self.path = str(workdir / "host-threads-echo.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ECHO_SERVER, self.path], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()
        self._local = threading.local()

    def call(self, i: int) -> bytes:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._local.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.path)
            self._local.inbox = bytearray()
        body = str(i).encode()
        sock.sendall(struct.pack("!I", len(body)) + body)
        inbox = self._local.inbox
        while True:
            if len(inbox) >= 4:
                end = 4 + struct.unpack_from("!I", inbox)[0]
                if len(inbox) >= end:
                    answer = bytes(inbox[4:end])
                    del inbox[:end]
                    return answer
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise EOFError("the echo server closed the connection")
            inbox += chunk

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def thread_pool_call(echo: Callable[[Any], Any]) -> tuple[Callable[[int], Any], Callable[[], None]]:
    """The bare thread pool's ``call`` and its ``close``."""
    pool = ThreadPoolExecutor(4)
    return (lambda i: pool.submit(echo, i).result()), pool.shutdown


def latency(call: Callable[[int], Any], n: int) -> tuple[float, float]:
    """p50 and p99 (seconds) of ``n`` sequential calls from this thread."""
    samples = []
    for i in range(n):
        began = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - began)
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(0.99 * len(samples)))]


#: The calling threads, by how many call at once: kept for the whole run, as a host's
#: own threads are (each keeps its connections; a new thread would make new ones).
_CALLERS: dict[int, ThreadPoolExecutor] = {}


def throughput(call: Callable[[int], Any], n: int, callers: int) -> float:
    """Calls per second with ``callers`` threads making ``n`` calls in all."""
    per = max(1, n // callers)
    pool = _CALLERS.get(callers)
    if pool is None:
        pool = _CALLERS[callers] = ThreadPoolExecutor(callers)
    start = threading.Barrier(callers + 1)

    def worker() -> None:
        start.wait()
        for i in range(per):
            call(i)

    running = [pool.submit(worker) for _ in range(callers)]
    start.wait()
    began = time.perf_counter()
    for future in running:
        future.result()
    return per * callers / (time.perf_counter() - began)


def close_callers() -> None:
    """Stop the calling threads (at the end of a run)."""
    for pool in _CALLERS.values():
        pool.shutdown()
    _CALLERS.clear()


def measure(
    rows: dict[str, tuple[Callable[[int], Any], str | None]],
    *,
    n: int,
    rounds: int,
    callers: int = CALLERS,
) -> list[dict[str, Any]]:
    """Measure ``rows`` (name -> ``(call, baseline name or None)``) in interleaved rounds;
    return one result per row, with ratios to its baseline."""
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in rows}
    for call, _ in rows.values():  # warm-up: connections made, code paths hot
        latency(call, 200)
        throughput(call, 400, callers)
    for r in range(rounds):
        order = list(rows.items()) if r % 2 == 0 else list(rows.items())[::-1]
        for name, (call, _) in order:
            p50, p99 = latency(call, n)
            per_round[name].append(
                {
                    "p50": p50,
                    "p99": p99,
                    "qps_1": throughput(call, n, 1),
                    "qps_n": throughput(call, n * 2, callers),
                }
            )
    close_callers()
    results = []
    for name, (_, base) in rows.items():
        mine = per_round[name]
        result: dict[str, Any] = {
            "name": name,
            "p50_us": statistics.median(m["p50"] for m in mine) * 1e6,
            "p99_us": statistics.median(m["p99"] for m in mine) * 1e6,
            "qps_1_caller": statistics.median(m["qps_1"] for m in mine),
            f"qps_{callers}_callers": statistics.median(m["qps_n"] for m in mine),
            "baseline": base,
        }
        if base is not None:
            theirs = per_round[base]
            result["p50_vs_bare"] = statistics.median(
                m["p50"] / t["p50"] for m, t in zip(mine, theirs, strict=True)
            )
            result[f"bare_qps_{callers}_over_this"] = statistics.median(
                t["qps_n"] / m["qps_n"] for m, t in zip(mine, theirs, strict=True)
            )
        results.append(result)
    return results


def table(results: list[dict[str, Any]], callers: int = CALLERS) -> str:
    """The results as a text table."""
    head = (
        f"{'host threads':<50}{'p50 us':>9}{'p99 us':>9}{'qps, 1':>10}"
        f"{f'qps, {callers}':>10}{'p50/bare':>10}{'bare qps/this':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        p50_ratio = f"{r['p50_vs_bare']:.2f}" if "p50_vs_bare" in r else "1.00"
        qps_ratio = r.get(f"bare_qps_{callers}_over_this")
        lines.append(
            f"{r['name']:<50}{r['p50_us']:>9.1f}{r['p99_us']:>9.1f}{r['qps_1_caller']:>10,.0f}"
            f"{r[f'qps_{callers}_callers']:>10,.0f}{p50_ratio:>10}"
            f"{(f'{qps_ratio:.2f}' if qps_ratio is not None else '1.00'):>15}"
        )
    lines.append(
        f"(1 caller for p50/p99 and 'qps, 1'; {callers} host threads for 'qps, {callers}'; "
        f"ratios: medians of per-round ratios; {os.cpu_count()} CPUs)"
    )
    return "\n".join(lines)
