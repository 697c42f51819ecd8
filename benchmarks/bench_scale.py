"""Cost of the control plane as the fleet grows: it should follow the change, not N.

Sections, all in one run (medians):

* ``deploy`` -- one ``create_backend(num_replicas=N)`` for N = 10, 100, 1,000, 10,000
  on a fresh store, with the in-memory runtime of ``servecore.testing`` and with the
  threads runtime; per store (``MemoryStore``, ``FileStore``, ``SQLiteStore``, and the
  whole-state path: a one-row SQLite blob store through ``BlobAdapter``). Commits and
  bytes handed to the store are counted. Target: cost per replica within 2x from 100
  to 10,000.
* ``set_traffic`` -- latency and bytes written of one ``set_traffic`` at each N (a
  second backend ``b`` of 1 replica; the command alternates two splits), beside a bare
  SQLite ``INSERT OR REPLACE`` of the same records in one transaction (WAL,
  ``synchronous=FULL``). Targets: at 10,000 within 1.5x of at 10; bytes independent of
  N; through ``SQLiteStore`` within 1.3x of the bare insert.
* ``open`` -- opening (recovery: load, check, ``Recover``) a controller on the
  checkpoint of each N, its replicas alive. Target: under 1 s at 10,000.
* ``concurrent`` -- 64 tasks each sending ``set_traffic`` to its own endpoint, through
  one controller on ``SQLiteStore`` (group commit), against sequential bare inserts of
  one command's records. Target: at least 4x the bare rate.
* ``main`` -- with ``--main PATH`` only: the same deploy and ``set_traffic`` with the
  servecore whose ``src`` directory is PATH (an older checkout, e.g. made with
  ``git worktree add /tmp/old <rev>``), in a subprocess, up to ``--main-max`` replicas.

Results print as a table, go to ``benchmarks/results/bench_scale.json`` and, if
matplotlib is installed (the ``bench`` extra), to ``benchmarks/results/bench_scale.png``.
Run: ``.venv/bin/python benchmarks/bench_scale.py [--quick] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import trio

from servecore import BlobAdapter, FileStore, MemoryStore, SQLiteStore, open_controller
from servecore._core.records import load_records
from servecore.testing import InMemoryRuntime

TARGET = "servecore.testing.targets:echo"
RESULTS = Path(__file__).parent / "results"
SIZES = [10, 100, 1_000, 10_000]


# ---------------------------------------------------------------------------------------
# Stores that count what they are handed


class OneRowBlob:
    """The whole-state store of before: one SQLite row, replaced on every save."""

    def __init__(self, path: Path) -> None:
        self.where = str(path)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS c (id INTEGER PRIMARY KEY, data BLOB)")
        self.bytes = 0
        self.commits = 0

    def save(self, data: bytes) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT OR REPLACE INTO c (id, data) VALUES (1, ?)", (data,))
        self.db.execute("COMMIT")
        self.bytes += len(data)
        self.commits += 1

    def load(self) -> bytes | None:
        row = self.db.execute("SELECT data FROM c WHERE id = 1").fetchone()
        return None if row is None else bytes(row[0])


class Counting:
    """Forwards to a key-value store, counting commits and the bytes of change sets."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.where = inner.where
        self.bytes = 0
        self.commits = 0
        self.last: tuple[dict[str, bytes], list[str]] = ({}, [])

    @property
    def store_id(self) -> str:
        return str(self.inner.store_id)

    def open(self) -> None:
        opener = getattr(self.inner, "open", None)
        if opener is not None:
            opener()

    def close(self) -> None:
        closer = getattr(self.inner, "close", None)
        if closer is not None:
            closer()

    def load(self) -> tuple[int, Mapping[str, bytes]]:
        return self.inner.load()  # type: ignore[no-any-return]

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        self.inner.commit(seq, puts, deletes)
        self.bytes += sum(len(k) + len(v) for k, v in puts.items()) + sum(map(len, deletes))
        self.commits += 1
        self.last = (dict(puts), list(deletes))


def make_store(kind: str, directory: Path) -> Any:
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "memory":
        return Counting(MemoryStore())
    if kind == "file":
        return Counting(FileStore(directory / "state.json"))
    if kind == "sqlite":
        return Counting(SQLiteStore(directory / "state.db"))
    return BlobAdapter(OneRowBlob(directory / "blob.db"))


def counted(store: Any) -> tuple[int, int]:
    inner = store.blob if isinstance(store, BlobAdapter) else store
    return inner.commits, inner.bytes


class BareSQLite:
    """The floor: the same records inserted by hand in one transaction."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS r (key TEXT PRIMARY KEY, value BLOB)")

    def insert(self, rows: Mapping[str, bytes]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT OR REPLACE INTO r (key, value) VALUES (?, ?)", rows.items())
        self.db.execute("COMMIT")


# ---------------------------------------------------------------------------------------
# Measurements


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


async def _set_traffic_samples(
    ctl: Any, reps: int, bare: Callable[[], None] | None = None
) -> tuple[list[float], list[float]]:
    """``set_traffic`` latencies, each followed (if ``bare``) by a timed bare insert of
    the same records, so that disk weather hits both alike."""
    splits = [{"a": 1.0}, {"a": 0.5, "b": 0.5}]
    out, floor = [], []
    for i in range(reps):
        t0 = time.perf_counter()
        await ctl.set_traffic("api", splits[i % 2])
        out.append(time.perf_counter() - t0)
        if bare is not None:
            t0 = time.perf_counter()
            bare()
            floor.append(time.perf_counter() - t0)
    return out, floor


def bench_store(kind: str, runtime: str, n: int, directory: Path, reps: int) -> dict[str, Any]:
    store = make_store(kind, directory)
    rt: Any = InMemoryRuntime() if runtime == "memory" else "threads"
    row: dict[str, Any] = {"store": kind, "runtime": runtime, "replicas": n}

    async def first() -> None:
        async with open_controller(runtime=rt, store=store, resync_interval_s=None) as ctl:
            commits0, bytes0 = counted(store)
            t0 = time.perf_counter()
            await ctl.create_backend("a", TARGET, num_replicas=n)
            row["deploy_s"] = time.perf_counter() - t0
            commits1, bytes1 = counted(store)
            row["deploy_commits"] = commits1 - commits0
            row["deploy_bytes"] = bytes1 - bytes0
            await ctl.create_backend("b", TARGET, num_replicas=1)
            await ctl.create_endpoint("api")
            await ctl.set_traffic("api", {"b": 1.0})
            await _set_traffic_samples(ctl, 3)  # warm up
            bare = None
            if isinstance(store, Counting) and kind == "sqlite":
                floor = BareSQLite(directory / "bare.db")
                rows = store.last[0]
                bare = lambda: floor.insert(rows)  # noqa: E731
            c0, b0 = counted(store)
            samples, floors = await _set_traffic_samples(ctl, reps, bare)
            c1, b1 = counted(store)
            row["set_traffic_ms"] = _median_ms(samples)
            row["set_traffic_bytes"] = (b1 - b0) / max(1, c1 - c0)
            if floors:
                row["bare_insert_ms"] = _median_ms(floors)

    trio.run(first)
    row["deploy_per_replica_ms"] = row["deploy_s"] * 1e3 / n
    if runtime == "memory":
        # The in-memory runtime's replicas outlive the controller: reopen on them.
        async def reopen() -> None:
            t0 = time.perf_counter()
            async with open_controller(runtime=rt, store=store, resync_interval_s=None) as ctl:
                row["open_s"] = time.perf_counter() - t0
                assert len(ctl.state.replicas) == n + 1

        trio.run(reopen)
        opener = getattr(store, "open", None)
        if opener is not None:
            opener()
        try:
            t0 = time.perf_counter()
            seq, records = store.load()
            load_records(seq, records, "bench")
            row["load_s"] = time.perf_counter() - t0
        finally:
            closer = getattr(store, "close", None)
            if closer is not None:
                closer()
    return row


def bench_concurrent(directory: Path, tasks: int, per_task: int) -> dict[str, Any]:
    store = Counting(SQLiteStore(directory / "concurrent.db"))
    out: dict[str, Any] = {"tasks": tasks, "commands_per_task": per_task}

    async def main() -> None:
        async with open_controller(
            runtime=InMemoryRuntime(), store=store, resync_interval_s=None
        ) as ctl:
            await ctl.create_backend("a", TARGET, num_replicas=1)
            await ctl.create_backend("b", TARGET, num_replicas=1)
            for i in range(tasks):
                await ctl.create_endpoint(f"e{i}")
                await ctl.set_traffic(f"e{i}", {"a": 1.0})
            one = store.last[0]
            commits0 = store.commits

            async def sender(i: int) -> None:
                splits = [{"a": 0.5, "b": 0.5}, {"a": 1.0}]
                for k in range(per_task):
                    await ctl.set_traffic(f"e{i}", splits[k % 2])

            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(tasks):
                    nursery.start_soon(sender, i)
            elapsed = time.perf_counter() - t0
            out["commands_per_s"] = tasks * per_task / elapsed
            out["commits"] = store.commits - commits0
            out["_one"] = one

    trio.run(main)
    bare = BareSQLite(directory / "concurrent-bare.db")
    count = max(50, tasks * per_task // 4)
    t0 = time.perf_counter()
    for _ in range(count):
        bare.insert(out["_one"])
    out["bare_inserts_per_s"] = count / (time.perf_counter() - t0)
    bare.db.close()
    del out["_one"]
    out["ratio"] = out["commands_per_s"] / out["bare_inserts_per_s"]
    return out


_MAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, trio
    from servecore import SQLiteStore, open_controller
    n, path = int(sys.argv[1]), sys.argv[2]

    async def main():
        async with open_controller(runtime="threads", store=SQLiteStore(path)) as ctl:
            t0 = time.perf_counter()
            await ctl.create_backend("a", "servecore.testing.targets:echo", num_replicas=n)
            deploy = time.perf_counter() - t0
            await ctl.create_backend("b", "servecore.testing.targets:echo")
            await ctl.create_endpoint("api")
            samples = []
            for i in range(23):
                t0 = time.perf_counter()
                await ctl.set_traffic("api", [{"a": 1.0}, {"a": 0.5, "b": 0.5}][i % 2])
                samples.append(time.perf_counter() - t0)
            samples.sort()
            print(json.dumps({"deploy_s": deploy, "set_traffic_ms": samples[13] * 1e3}))

    trio.run(main)
    """
)


def bench_main(src: Path, sizes: list[int], directory: Path) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        path = directory / f"main-{n}.db"
        done = subprocess.run(
            [sys.executable, "-c", _MAIN_SCRIPT, str(n), str(path)],
            env={**os.environ, "PYTHONPATH": str(src)},
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if done.returncode != 0:
            rows.append({"replicas": n, "error": done.stderr.strip().splitlines()[-1:]})
            continue
        found = json.loads(done.stdout.strip().splitlines()[-1])
        found["replicas"] = n
        found["deploy_per_replica_ms"] = found["deploy_s"] * 1e3 / n
        rows.append(found)
    return rows


# ---------------------------------------------------------------------------------------
# Report


def table(results: dict[str, Any]) -> str:
    lines = ["deploy, set_traffic and open, per store and runtime (medians)"]
    lines.append(
        f"{'store':<7} {'rt':<7} {'N':>7} {'deploy s':>9} {'ms/rep':>7} {'commits':>8}"
        f" {'set_traffic ms':>15} {'bytes/cmd':>10} {'open s':>8} {'load s':>8}"
    )
    for r in results["stores"]:
        lines.append(
            f"{r['store']:<7} {r['runtime']:<7} {r['replicas']:>7,} {r['deploy_s']:>9.3f}"
            f" {r['deploy_per_replica_ms']:>7.3f} {r['deploy_commits']:>8,}"
            f" {r['set_traffic_ms']:>15.3f} {r['set_traffic_bytes']:>10,.0f}"
            f" {r.get('open_s', float('nan')):>8.3f} {r.get('load_s', float('nan')):>8.3f}"
        )
    lines.append("")
    lines.append("bare SQLite insert of one set_traffic's records, interleaved with it")
    for r in results["stores"]:
        if "bare_insert_ms" in r:
            lines.append(
                f"  {r['runtime']:<7} N={r['replicas']:>7,}: bare {r['bare_insert_ms']:.3f} ms,"
                f" through the controller {r['set_traffic_ms']:.3f} ms"
                f" ({r['set_traffic_ms'] / r['bare_insert_ms']:.2f}x)"
            )
    c = results["concurrent"]
    lines.append("")
    lines.append(
        f"{c['tasks']} concurrent committers on SQLiteStore: {c['commands_per_s']:,.0f} "
        f"commands/s in {c['commits']:,} commits; sequential bare inserts "
        f"{c['bare_inserts_per_s']:,.0f}/s; ratio {c['ratio']:.1f}x"
    )
    if results["main"]:
        lines.append("")
        lines.append("servecore main (whole-state checkpoint), threads + SQLiteStore")
        for r in results["main"]:
            if "error" in r:
                lines.append(f"  N={r['replicas']:>7,}: failed {r['error']}")
            else:
                lines.append(
                    f"  N={r['replicas']:>7,}: deploy {r['deploy_s']:.3f} s "
                    f"({r['deploy_per_replica_ms']:.3f} ms/replica), set_traffic "
                    f"{r['set_traffic_ms']:.3f} ms"
                )
    lines.append("")
    lines.append("targets")
    for name, t in results["targets"].items():
        lines.append(f"  {name}: {t['value']:.2f} (target {t['target']}) -> {t['met']}")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> dict[str, Any]:
    by = {(r["store"], r["runtime"], r["replicas"]): r for r in results["stores"]}
    big, mid, small = max(results["sizes"]), 100, min(results["sizes"])
    out: dict[str, Any] = {}

    def add(name: str, value: float, target: str, met: bool) -> None:
        out[name] = {"value": value, "target": target, "met": "met" if met else "MISSED"}

    for rt in ("memory", "threads"):
        key_big, key_mid = ("sqlite", rt, big), ("sqlite", rt, mid)
        if key_big in by and key_mid in by:
            ratio = by[key_big]["deploy_per_replica_ms"] / by[key_mid]["deploy_per_replica_ms"]
            add(f"deploy ms/replica, SQLite, {rt}, {big} vs {mid}", ratio, "<= 2", ratio <= 2)
    for kind in ("sqlite", "file"):
        if (kind, "memory", big) in by and (kind, "memory", small) in by:
            ratio = (
                by[(kind, "memory", big)]["set_traffic_ms"]
                / (by[(kind, "memory", small)]["set_traffic_ms"])
            )
            add(f"set_traffic {kind} {big} vs {small}", ratio, "<= 1.5", ratio <= 1.5)
            b_ratio = (
                by[(kind, "memory", big)]["set_traffic_bytes"]
                / (by[(kind, "memory", small)]["set_traffic_bytes"])
            )
            # Only the digits of the counter in the meta record grow with N.
            add(f"bytes/set_traffic {kind} {big} vs {small}", b_ratio, "~ 1", b_ratio < 1.05)
    for n in results["sizes"]:
        row = by.get(("sqlite", "memory", n))
        if row is not None and "bare_insert_ms" in row:
            ratio = row["set_traffic_ms"] / row["bare_insert_ms"]
            add(f"set_traffic SQLiteStore vs bare insert, N={n}", ratio, "<= 1.3", ratio <= 1.3)
    c = results["concurrent"]
    add("64 committers vs sequential bare inserts", c["ratio"], ">= 4", c["ratio"] >= 4)
    for kind in ("sqlite", "file"):
        row = by.get((kind, "memory", big))
        if row is not None:
            add(f"open {kind} at {big} (s)", row["open_s"], "< 1", row["open_s"] < 1)
    return out


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    # One colour per series in every panel, whichever panels it appears in.
    labels = sorted({f"{r['store']}/{r['runtime']}" for r in results["stores"]})
    labels.append("main (whole state)/threads")
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    panels = [
        ("deploy_per_replica_ms", "deploy, ms per replica"),
        ("set_traffic_ms", "set_traffic, ms"),
        ("set_traffic_bytes", "bytes written per set_traffic"),
        ("open_s", "open (recovery), s"),
    ]
    for ax, (field, title) in zip(axes.flat, panels, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in results["stores"]:
            if field in r:
                series.setdefault(f"{r['store']}/{r['runtime']}", []).append(
                    (r["replicas"], r[field])
                )
        if field in ("deploy_per_replica_ms", "set_traffic_ms"):
            main = [(r["replicas"], r[field]) for r in results["main"] if field in r]
            if main:
                series["main (whole state)/threads"] = main
        for label, points in sorted(series.items()):
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=label, color=colours[label])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("replicas")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 1,000, fewer reps")
    parser.add_argument("--dir", type=Path, default=None, help="where the stores write")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument(
        "--main", type=Path, default=None, help="src/ of an older servecore to compare with"
    )
    parser.add_argument("--main-max", type=int, default=1_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = args.sizes or ([10, 100, 1_000] if args.quick else SIZES)
    reps = 9 if args.quick else 31
    base = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.dir))
    results: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "sizes": sizes,
        "stores": [],
    }
    bench_store("memory", "threads", 10, base / "warm-up", 3)  # imports, first threads
    for n in sizes:
        for kind in ("memory", "file", "sqlite", "blob"):
            for rt in ("memory", "threads"):
                if kind == "blob" and n > 1_000 and rt == "threads":
                    continue  # the whole-state path at 10,000 on threads: minutes
                row = bench_store(kind, rt, n, base / f"{kind}-{rt}-{n}", reps)
                results["stores"].append(row)
                print(
                    f"{kind:>6} {rt:>7} N={n:>6}: deploy {row['deploy_s']:.3f}s "
                    f"set_traffic {row['set_traffic_ms']:.3f}ms",
                    flush=True,
                )
    results["concurrent"] = bench_concurrent(base, 64, 8 if args.quick else 30)
    main_sizes = [n for n in sizes if n <= args.main_max]
    results["main"] = (
        bench_main(args.main, main_sizes, base)
        if args.main is not None and args.main.exists()
        else []
    )
    results["targets"] = targets(results)
    print()
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    if plot(results, args.out / "bench_scale.png"):
        print(f"\nwrote {args.out / 'bench_scale.json'} and {args.out / 'bench_scale.png'}")
    else:
        print(f"\nwrote {args.out / 'bench_scale.json'} (pip install servecore[bench] to plot)")


if __name__ == "__main__":
    main()
