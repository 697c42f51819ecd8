"""Queries during a failover: a leader SIGKILLed with a standby waiting, on PostgreSQL.

A private PostgreSQL server (``servecore.testing.postgres``), and for each round a
checkpoint of its own: a leader ``servecore run --runtime subprocess --store
postgresql://...?lease_s=2`` with two replicas of ``bench_targets:echo``, and a
``servecore run --standby`` on the same host and state directory (so the same runtime
directory and port). Traffic runs paced (each sender sends every :data:`PACE_S`, on
a new HTTP connection per request); after :data:`BEFORE_KILL_S` the leader is
SIGKILLed; the round ends once the standby serves and :data:`AFTER_SERVING_S` more
have passed. Two setups, rounds interleaved:

* ``before`` -- ``--workers 0``: HTTP is served by the controller's own ingress, which
  dies with it; the standby binds the port once it holds the lease.
* ``after`` -- ``--workers 1``: HTTP is served by ingress workers, and a
  ``servecore.connect`` client in this process queries too. Both follow the routing
  table in PostgreSQL; the standby takes the workers' listening socket, starts its own
  workers on it, and only then stops the old ones.

Per setup: queries sent and failed (HTTP, and the client's), the longest time without
a successful HTTP answer, and latency p50/p99/max over the queries that started in
the failover window (from the kill until the standby serves, plus a second). Medians
over rounds. Every process it starts is stopped by pid, on error too. Results print
as a table and go to ``benchmarks/results/bench_failover.json``.
Run: ``.venv/bin/python benchmarks/bench_failover.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

import servecore  # noqa: E402
from servecore.testing.postgres import PostgresServer  # noqa: E402

APP = """
[backends.echo]
target = "bench_targets:echo"
num_replicas = 2

[endpoints.echo]
route = "/echo"
methods = ["POST"]
traffic = { echo = 1.0 }
"""

#: Each sender sends one query every PACE_S (so failures count time, not retry speed).
PACE_S = 0.01
HTTP_SENDERS = 2
BEFORE_KILL_S = 2.0
AFTER_SERVING_S = 2.0
LEASE_S = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sample:
    __slots__ = ("kind", "ok", "started", "taken")

    def __init__(self, kind: str, started: float, taken: float, ok: bool) -> None:
        self.kind, self.started, self.taken, self.ok = kind, started, taken, ok


class Traffic:
    """Paced senders over HTTP (and through a connected client), until stopped."""

    def __init__(self, port: int, client: Any | None) -> None:
        self.port = port
        self.client = client
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        kinds = ["http"] * HTTP_SENDERS + (["client"] if client is not None else [])
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in kinds]
        for thread in self._threads:
            thread.start()

    def _http(self, body: str) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", "/echo", body=json.dumps(body).encode())
            response = conn.getresponse()
            return response.status == 200 and json.loads(response.read()) == body
        finally:
            conn.close()

    def _run(self, kind: str) -> None:
        i = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            i += 1
            body = f"{kind}-{i}"
            started = time.monotonic()
            try:
                if kind == "http":
                    ok = self._http(body)
                else:
                    assert self.client is not None
                    ok = self.client.get_handle("echo").call(body) == body
            except Exception:
                ok = False
            self.samples.append(Sample(kind, started, time.monotonic() - started, ok))
            next_at = max(next_at + PACE_S, time.monotonic())
            time.sleep(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


class Round:
    """One leader, one standby, one checkpoint, one state directory."""

    def __init__(self, base: Path, dsn: str, workers: int) -> None:
        self.directory = base / f"r-{uuid.uuid4().hex[:6]}"
        self.directory.mkdir(mode=0o700)
        (self.directory / "app.toml").write_text(APP)
        checkpoint = f"bench-{uuid.uuid4().hex[:10]}"
        self.store = f"{dsn}{'&' if '?' in dsn else '?'}checkpoint={checkpoint}&lease_s={LEASE_S}"
        self.state_dir = self.directory / "st"
        self.port = _free_port()
        self.workers = workers
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self, *extra: str) -> tuple[subprocess.Popen[str], threading.Event, list[str]]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(HERE)])
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "servecore", "run", "app.toml", "--runtime", "subprocess"),
                *("--store", self.store, "--state-dir", "st", "--port", str(self.port)),
                *("--workers", str(self.workers), "--log-level", "warning", *extra),
            ],
            cwd=self.directory,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.procs.append(proc)
        serving, lines = threading.Event(), []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("servecore: serving"):
                    serving.set()

        threading.Thread(target=read, daemon=True).start()
        return proc, serving, lines

    def stop_everything(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        marker = str(self.directory).encode()
        for entry in Path("/proc").iterdir():  # workers and replicas, by their paths
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)


def _wait(event: threading.Event, proc: subprocess.Popen[str], lines: list[str]) -> None:
    deadline = time.monotonic() + 120
    while not event.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("servecore run did not serve:\n" + "".join(lines[-20:]))


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_round(base: Path, dsn: str, setup: str) -> dict[str, Any]:
    workers = 1 if setup == "after" else 0
    r = Round(base, dsn, workers)
    try:
        leader, serving, lines = r.spawn()
        _wait(serving, leader, lines)
        standby, standby_serving, standby_lines = r.spawn("--standby")
        deadline = time.monotonic() + 60
        while not any("waiting for the lease" in line for line in standby_lines):
            if time.monotonic() > deadline or standby.poll() is not None:
                raise SystemExit("the standby did not wait:\n" + "".join(standby_lines))
            time.sleep(0.05)
        with contextlib.ExitStack() as stack:
            client = None
            if setup == "after":
                client = stack.enter_context(servecore.connect(r.store, state_dir=r.state_dir))
            traffic = Traffic(r.port, client)
            time.sleep(BEFORE_KILL_S)
            killed = time.monotonic()
            leader.kill()
            leader.wait(timeout=30)
            _wait(standby_serving, standby, standby_lines)
            served = time.monotonic()
            time.sleep(AFTER_SERVING_S)
            traffic.stop()
    finally:
        r.stop_everything()
    row: dict[str, Any] = {"setup": setup, "standby_serves_after_s": served - killed}
    window = [s for s in traffic.samples if killed <= s.started <= served + 1.0]
    for kind in ("http", "client"):
        mine = [s for s in traffic.samples if s.kind == kind]
        if not mine:
            continue
        in_window = [s.taken for s in window if s.kind == kind and s.ok]
        row[kind] = {
            "sent": len(mine),
            "failed": sum(not s.ok for s in mine),
            "p50_ms": _percentile(in_window, 0.5) * 1e3,
            "p99_ms": _percentile(in_window, 0.99) * 1e3,
            "max_ms": max(in_window, default=float("nan")) * 1e3,
        }
    answered = sorted(s.started + s.taken for s in traffic.samples if s.kind == "http" and s.ok)
    gaps = [b - a for a, b in itertools.pairwise(answered)]
    row["http"]["longest_gap_s"] = max(gaps, default=float("nan"))
    return row


def main(quick: bool) -> dict[str, Any]:
    rounds = 1 if quick else 2
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bf-") as tmp, PostgresServer(fsync=False) as pg:
        base = Path(tmp)
        os.chmod(base, 0o700)
        for _ in range(rounds):
            for setup in ("before", "after"):
                rows.append(run_round(base, pg.dsn, setup))
                print(f"  {setup}: {json.dumps(rows[-1])}", flush=True)
    summary = {}
    for setup in ("before", "after"):
        mine = [row for row in rows if row["setup"] == setup]
        found: dict[str, Any] = {
            "standby_serves_after_s": statistics.median(r["standby_serves_after_s"] for r in mine)
        }
        for kind in ("http", "client"):
            if kind in mine[0]:
                found[kind] = {
                    key: statistics.median(r[kind][key] for r in mine) for key in mine[0][kind]
                }
        summary[setup] = found
    return {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "rounds": rounds,
        "lease_s": LEASE_S,
        "pace_s": PACE_S,
        "http_senders": HTTP_SENDERS,
        "summary": summary,
        "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    head = f"{'setup':<8}{'queries':<8}{'sent':>7}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}"
    print(f"{head}{'max ms':>9}{'gap s':>8}{'standby s':>11}")
    for setup, found in result["summary"].items():
        for kind in ("http", "client"):
            if kind not in found:
                continue
            row = found[kind]
            gap = row.get("longest_gap_s")
            print(
                f"{setup:<8}{kind:<8}{row['sent']:>7.0f}{row['failed']:>8.0f}"
                f"{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['max_ms']:>9.1f}"
                f"{'' if gap is None else f'{gap:.2f}':>8}"
                f"{found['standby_serves_after_s']:>11.2f}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of each")
    args = parser.parse_args()
    result = main(args.quick)
    print_table(result)
    out = HERE / "results" / "bench_failover.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
