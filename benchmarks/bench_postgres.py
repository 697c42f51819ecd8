"""PostgresStore: a command's latency against the database's own floor, and takeover time.

Sections, measured in the same run on one private PostgreSQL server (started here as
the tests start theirs: ``servecore.testing.postgres.PostgresServer``, 127.0.0.1, a free
port, ``fsync=on``, ``synchronous_commit=on``):

* ``command`` -- latency of a command through ``open_controller`` on ``PostgresStore``
  (in-memory runtime; alternating ``set_traffic``, which starts and stops nothing, so a
  command is step + encode + one fenced write + router push), with the default thread
  hand-off and with ``save_in_thread=False``; beside it the floor: a bare single-row
  ``INSERT ... ON CONFLICT DO UPDATE`` of a checkpoint of the same size, autocommit, on
  its own connection. Also ``commit_records`` of a one-record change set (the keyed
  protocol). Target: the command within 1.5x of the bare insert.
* ``takeover`` -- a leader and a standby controller in separate processes; the leader
  is SIGKILLed at a random point of its renewal cycle; the time until the standby holds
  the lease (``took``) and until it serves (``serving``, after recovery), per lease
  duration (1, 2 and 5 s by default). A standby cannot take over before the dead
  leader's lease expires: between 2/3 and all of ``lease_s`` after the kill.

Results print as a table and go to ``benchmarks/results/bench_postgres.json``.
Run: ``.venv/bin/python benchmarks/bench_postgres.py [--quick] [--leases 1,2,5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import trio

import servecore
from servecore import PostgresStore
from servecore._core.records import encode
from servecore.testing import InMemoryRuntime
from servecore.testing.postgres import PostgresServer

HERE = Path(__file__).resolve().parent
ECHO = "servecore.testing.targets:Echo"
TARGET_RATIO = 1.5

# The two host processes of a takeover trial. Each prints TOOK <monotonic time> once
# it holds the lease (the system's monotonic clock, shared by every process).
_HOST = """
import sys, time, trio, servecore
dsn, checkpoint, lease_s, role = sys.argv[1:5]
store = servecore.PostgresStore(dsn, checkpoint=checkpoint, lease_s=float(lease_s), holder=role)
opener = store.open
def open_and_tell(**kwargs):
    opener(**kwargs)
    print("TOOK", time.monotonic(), flush=True)
store.open = open_and_tell
async def main():
    print("WAITING", flush=True)
    async with servecore.open_controller(
        runtime="threads", store=store, name="bench", standby=role == "standby"
    ) as ctl:
        if role == "leader":
            await ctl.create_backend("echo", "servecore.testing.targets:Echo", num_replicas=1)
        print("SERVING", time.monotonic(), flush=True)
        await trio.sleep_forever()
trio.run(main)
"""


def _stats(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "median_ms": round(statistics.median(ms), 3),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
        "n": len(ms),
    }


class _Bare:
    """The floor: a bare single-row upsert of ``size`` bytes, autocommit."""

    SQL = (
        "INSERT INTO bench_bare (id, data) VALUES (1, %s) "
        "ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data"
    )

    def __init__(self, dsn: str, size: int) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("CREATE TABLE IF NOT EXISTS bench_bare (id int PRIMARY KEY, data bytea)")
        self.data = os.urandom(size)

    def __call__(self) -> None:
        self.conn.execute(self.SQL, (self.data,), prepare=True)


async def _bench_command(dsn: str, n: int) -> dict[str, Any]:
    """Every path once per round, in turn, so that the load of a shared machine falls on
    all of them alike."""
    splits = [{"a": 1.0}, {"a": 0.5, "b": 0.5}]
    stores = [PostgresStore(dsn, checkpoint=f"bench-{uuid.uuid4().hex[:8]}") for _ in range(2)]
    record_store = PostgresStore(dsn, checkpoint=f"bench-{uuid.uuid4().hex[:8]}")
    record_store.open()
    samples: dict[str, list[float]] = {k: [] for k in ("thread", "inline", "bare", "records")}
    try:
        async with (
            servecore.open_controller(
                runtime=InMemoryRuntime(), store=stores[0], resync_interval_s=None
            ) as threaded,
            servecore.open_controller(
                runtime=InMemoryRuntime(), store=stores[1], resync_interval_s=None,
                save_in_thread=False,
            ) as inline,
        ):  # fmt: skip
            for ctl in (threaded, inline):
                await ctl.create_backend("a", ECHO, num_replicas=1)
                await ctl.create_backend("b", ECHO, num_replicas=1)
                await ctl.create_endpoint("api")
            size = len(encode(threaded.state, threaded.seq))
            bare = _Bare(dsn, size)
            value = os.urandom(200)
            for i in range(-20, n):  # the first 20 warm up: connections, plans, threads
                round_s = {}
                for name, ctl in (("thread", threaded), ("inline", inline)):
                    t = time.perf_counter()
                    await ctl.set_traffic("api", splits[i % 2])
                    round_s[name] = time.perf_counter() - t
                t = time.perf_counter()
                bare()
                round_s["bare"] = time.perf_counter() - t
                t = time.perf_counter()
                record_store.commit_records(i + 21, {"endpoint/api": value}, [])
                round_s["records"] = time.perf_counter() - t
                if i >= 0:
                    for name, took in round_s.items():
                        samples[name].append(took)
            bare.conn.close()
    finally:
        record_store.close()
    floor = statistics.median(samples["bare"])
    return {
        "controller_thread": _stats(samples["thread"]),
        "controller_inline": _stats(samples["inline"]),
        "bare_upsert": {**_stats(samples["bare"]), "bytes": size},
        "commit_records_1": {**_stats(samples["records"]), "bytes": len(value)},
        "ratio_thread": round(statistics.median(samples["thread"]) / floor, 2),
        "ratio_inline": round(statistics.median(samples["inline"]) / floor, 2),
        "ratio_records": round(statistics.median(samples["records"]) / floor, 2),
    }


def bench_command(dsn: str, quick: bool) -> dict[str, Any]:
    return trio.run(_bench_command, dsn, 200 if quick else 1000)


def _spawn(dsn: str, checkpoint: str, lease_s: float, role: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _HOST, dsn, checkpoint, str(lease_s), role],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _expect(proc: subprocess.Popen[str], word: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(word):
            return line[len(word) :].strip()
    raise RuntimeError(f"host {proc.pid} exited before {word}")


def _takeover(dsn: str, lease_s: float, rng: random.Random) -> dict[str, float]:
    checkpoint = f"takeover-{uuid.uuid4().hex[:8]}"
    procs = []
    try:
        leader = _spawn(dsn, checkpoint, lease_s, "leader")
        procs.append(leader)
        _expect(leader, "SERVING")
        standby = _spawn(dsn, checkpoint, lease_s, "standby")
        procs.append(standby)
        _expect(standby, "WAITING")
        time.sleep(lease_s + rng.uniform(0, lease_s / 3))  # a random renewal phase
        leader.kill()
        killed = time.monotonic()
        took = float(_expect(standby, "TOOK"))
        serving = float(_expect(standby, "SERVING"))
        return {"took_s": took - killed, "serving_s": serving - killed}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


def bench_takeover(dsn: str, leases: list[float], quick: bool) -> list[dict[str, Any]]:
    rng = random.Random(1)
    trials = 2 if quick else 4
    out = []
    for lease_s in leases:
        runs = [_takeover(dsn, lease_s, rng) for _ in range(trials)]
        took = [r["took_s"] for r in runs]
        serving = [r["serving_s"] for r in runs]
        out.append(
            {
                "lease_s": lease_s,
                "trials": trials,
                "took_median_s": round(statistics.median(took), 3),
                "took_max_s": round(max(took), 3),
                "serving_median_s": round(statistics.median(serving), 3),
                "serving_max_s": round(max(serving), 3),
            }
        )
    return out


def report(results: dict[str, Any]) -> str:
    c = results["command"]
    lines = [
        "command latency (set_traffic through the controller; floor: a bare upsert)",
        f"{'path':<46}{'median ms':>10}{'p99 ms':>10}{'vs bare':>9}",
    ]
    rows = [
        ("controller, PostgresStore (thread hand-off)", c["controller_thread"], c["ratio_thread"]),
        ("controller, PostgresStore (save_in_thread=False)", c["controller_inline"],
         c["ratio_inline"]),
        (f"bare INSERT ... ON CONFLICT ({c['bare_upsert']['bytes']} B)", c["bare_upsert"], 1.0),
        ("PostgresStore.commit_records (1 record)", c["commit_records_1"], c["ratio_records"]),
    ]  # fmt: skip
    for name, r, ratio in rows:
        lines.append(f"{name:<46}{r['median_ms']:>10.3f}{r['p99_ms']:>10.3f}{ratio:>8.2f}x")
    lines += [
        "",
        "takeover after SIGKILL of the leader (standby holds the lease / serves)",
        f"{'lease s':>8}{'took median':>13}{'took max':>10}{'serving median':>16}{'max':>8}",
    ]
    for r in results["takeover"]:
        lines.append(
            f"{r['lease_s']:>8g}{r['took_median_s']:>13.2f}{r['took_max_s']:>10.2f}"
            f"{r['serving_median_s']:>16.2f}{r['serving_max_s']:>8.2f}"
        )
    t = results["targets"]
    met = "met" if t["command_within_1_5x"] else "MISSED"
    lines += ["", f"target: a command within {TARGET_RATIO}x of a bare upsert: {met}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--leases", default="1,2,5", help="lease durations, in seconds")
    parser.add_argument("--out", default=str(HERE / "results" / "bench_postgres.json"))
    args = parser.parse_args(argv)
    leases = [float(x) for x in args.leases.split(",")]

    started = time.perf_counter()
    with PostgresServer() as server:
        results: dict[str, Any] = {
            "command": bench_command(server.dsn, args.quick),
            "takeover": bench_takeover(server.dsn, leases, args.quick),
        }
        with psycopg.connect(server.dsn) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        version = row[0] if row else "?"
    best = min(results["command"]["ratio_thread"], results["command"]["ratio_inline"])
    results["targets"] = {"command_within_1_5x": best <= TARGET_RATIO}
    results["meta"] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "postgres": version,
        "psycopg": psycopg.__version__,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(report(results))
    print(f"\n({results['meta']['seconds']} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
