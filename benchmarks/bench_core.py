"""Cost of the pure core, of checkpoints, of each store, and of a command end to end.

Sections, all measured in the same run (medians; p99 where a tail matters):

* ``step`` -- ``SetTraffic``, scale-up by 1 and scale-down by 1 on states of 10, 100,
  1,000 and 10,000 RUNNING replicas, in two layouts built directly with
  ``State.rebuild`` (no replay):

  - ``one``: backend ``a`` holds all N replicas; backend ``b`` has 1; endpoint ``api``
    sends traffic to ``a``. Scaling touches the one big backend.
  - ``many``: N/10 backends of 10 replicas each (2 of 5 at N=10), one endpoint per
    backend. Scaling touches one small backend of a big state.

  SetTraffic alternates between two splits so that no step is a no-op. Target: SetTraffic
  on 10,000 replicas within 3x of on 10.
* ``checkpoint`` -- ``encode`` and ``decode`` time and size at the same sizes (``one``).
* ``save`` -- one save of a real checkpoint through ``MemoryStore``, ``FileStore`` and
  ``SQLiteStore``, beside the floors they are built on: a bare temp-file write + fsync +
  ``os.replace`` + directory fsync, and a bare SQLite ``INSERT OR REPLACE`` (WAL,
  ``synchronous=FULL``, one transaction).
* ``controller`` -- latency of a command through ``open_controller`` with the in-memory
  runtime and ``SQLiteStore`` (alternating ``set_traffic``; the command changes no
  replica, so it is step + encode + save + router push), beside the bare SQLite insert
  of a checkpoint of the same size. Target: within 1.5x.

Results print as a table and go to ``benchmarks/results/bench_core.json``.
Run: ``.venv/bin/python benchmarks/bench_core.py [--quick] [--dir DIR]``; ``--dir``
chooses the file system the stores write to (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from servecore import (
    Backend,
    BackendConfig,
    BackendStatus,
    Endpoint,
    FileStore,
    MemoryStore,
    Replica,
    ReplicaStatus,
    SetBackendConfig,
    SetTraffic,
    SQLiteStore,
    State,
    open_controller,
    step,
)
from servecore._core.records import decode, encode, encode_changes, meta_record, records_of
from servecore.testing import InMemoryRuntime

HERE = Path(__file__).resolve().parent
SIZES = (10, 100, 1_000, 10_000)
TARGET = "servecore.testing.targets:Echo"


def _ns_stats(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "median_us": statistics.median(ordered) / 1e3,
        "p99_us": p99 / 1e3,
        "n": len(ordered),
    }


def _time(fn: Callable[[], object], repeat: int, budget_s: float) -> dict[str, float]:
    """Time ``fn()`` call by call: at most ``repeat`` calls or ``budget_s`` seconds."""
    fn()  # warm up
    samples: list[int] = []
    deadline = time.perf_counter() + budget_s
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
        if time.perf_counter() > deadline and len(samples) >= 5:
            break
    return _ns_stats(samples)


# ---------------------------------------------------------------------------------------
# States


def _backend(tag: str, n: int) -> Backend:
    return Backend(
        tag=tag,
        target=TARGET,
        config=BackendConfig(num_replicas=n),
        status=BackendStatus.HEALTHY,
    )


def state_one(n: int) -> State:
    """Backend ``a`` with ``n`` RUNNING replicas, ``b`` with 1; ``api`` -> ``a``."""
    replicas = {
        f"a#{i}": Replica(tag=f"a#{i}", backend="a", status=ReplicaStatus.RUNNING) for i in range(n)
    }
    replicas[f"b#{n}"] = Replica(tag=f"b#{n}", backend="b", status=ReplicaStatus.RUNNING)
    return State.rebuild(
        endpoints={"api": Endpoint(name="api", route="/api", traffic={"a": 1.0})},
        backends={"a": _backend("a", n), "b": _backend("b", 1)},
        replicas=replicas,
        replica_counter=n + 1,
    )


def state_many(n: int) -> State:
    """``n / 10`` backends of 10 RUNNING replicas (2 of 5 when ``n`` is 10), one
    endpoint each (``ep{k}`` -> ``b{k}``)."""
    backends, replicas, endpoints = {}, {}, {}
    counter = 0
    count = max(2, n // 10)
    per_backend = n // count
    for k in range(count):
        tag = f"b{k}"
        backends[tag] = _backend(tag, per_backend)
        endpoints[f"ep{k}"] = Endpoint(name=f"ep{k}", route=f"/ep{k}", traffic={tag: 1.0})
        for _ in range(per_backend):
            rtag = f"{tag}#{counter}"
            replicas[rtag] = Replica(tag=rtag, backend=tag, status=ReplicaStatus.RUNNING)
            counter += 1
    return State.rebuild(
        endpoints=endpoints, backends=backends, replicas=replicas, replica_counter=counter
    )


def _step_cases(state: State, layout: str) -> dict[str, Callable[[], object]]:
    if layout == "one":
        endpoint, big, small = "api", "a", "b"
    else:
        endpoint, big, small = "ep0", "b0", "b1"
    splits = [
        SetTraffic(endpoint=endpoint, traffic={big: 0.5, small: 0.5}),
        SetTraffic(endpoint=endpoint, traffic={big: 0.25, small: 0.75}),
    ]
    flip = [0]

    def set_traffic() -> object:
        flip[0] ^= 1
        return step(state, splits[flip[0]])

    config = state.backends[big].config
    up = SetBackendConfig(tag=big, config=config.evolve(num_replicas=config.num_replicas + 1))
    down = SetBackendConfig(tag=big, config=config.evolve(num_replicas=config.num_replicas - 1))
    return {
        "SetTraffic": set_traffic,
        "scale up by 1": lambda: step(state, up),
        "scale down by 1": lambda: step(state, down),
    }


def bench_step(quick: bool) -> list[dict[str, Any]]:
    """Sizes are interleaved call by call, so that warm-up and machine noise hit every
    size alike (the targets compare sizes)."""
    rows = []
    rounds = 300 if quick else 2000
    budget_s = 1.0 if quick else 3.0
    for layout, build in (("one", state_one), ("many", state_many)):
        cases = {n: _step_cases(build(n), layout) for n in SIZES}
        for case in cases[SIZES[0]]:
            fns = {n: cases[n][case] for n in SIZES}
            samples: dict[int, list[int]] = {n: [] for n in SIZES}
            for fn in fns.values():
                fn()  # warm up
            deadline = time.perf_counter() + budget_s
            for i in range(rounds):
                for n, fn in fns.items():
                    t0 = time.perf_counter_ns()
                    fn()
                    samples[n].append(time.perf_counter_ns() - t0)
                if i >= 30 and time.perf_counter() > deadline:
                    break
            for n in SIZES:
                rows.append(
                    {"layout": layout, "replicas": n, "message": case, **_ns_stats(samples[n])}
                )
    return rows


def bench_checkpoint(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for n in SIZES:
        state = state_one(n)
        data = encode(state, 1)
        assert decode(data, "bench")[0] == state
        budget = 0.5 if quick else 2.0
        enc = _time(lambda state=state: encode(state, 1), repeat=200, budget_s=budget)
        dec = _time(lambda data=data: decode(data, "bench"), repeat=200, budget_s=budget)
        rows.append(
            {
                "replicas": n,
                "bytes": len(data),
                "encode_median_us": enc["median_us"],
                "decode_median_us": dec["median_us"],
                "encode_decode_median_us": enc["median_us"] + dec["median_us"],
                "n": min(enc["n"], dec["n"]),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------
# Saves


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bare_replace(path: Path) -> Callable[[bytes], None]:
    """Temp file in the same directory, write, fsync, os.replace, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")

    def save(data: bytes) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    return save


def bare_sqlite(path: Path) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    """One INSERT OR REPLACE per transaction, WAL, synchronous=FULL."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")

    def save(data: bytes) -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT OR REPLACE INTO t (id, data) VALUES (1, ?)", (data,))
        db.execute("COMMIT")

    return save, db.close


def _whole(store: Any, records: dict[str, bytes]) -> Callable[[bytes], None]:
    """A commit of every record of a state, timed like a save of its blob."""

    def commit(_data: bytes) -> None:
        store.commit(1, records, ())

    return commit


def bench_saves(directory: Path, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for n in (100, 10_000):
        data = encode(state_one(n), 1)
        records = records_of(state_one(n), 1)
        sub = directory / f"saves-{n}"
        sub.mkdir()
        memory = MemoryStore()
        file_store = FileStore(sub / "state.json")
        sqlite_store = SQLiteStore(sub / "state.db")
        file_store.open()
        sqlite_store.open()
        sqlite_save, sqlite_close = bare_sqlite(sub / "bare.db")
        savers: dict[str, Callable[[bytes], None]] = {
            # Each store commits the whole state (every record), the old cost of a save.
            "MemoryStore.commit": _whole(memory, records),
            "FileStore.commit": _whole(file_store, records),
            "SQLiteStore.commit": _whole(sqlite_store, records),
            "bare os.replace+fsync": bare_replace(sub / "bare.json"),
            "bare SQLite insert": sqlite_save,
        }
        try:
            # Interleave rounds so that disk weather hits every row alike.
            samples: dict[str, list[int]] = {name: [] for name in savers}
            rounds = 40 if quick else 200
            deadline = time.perf_counter() + (4.0 if quick else 12.0)
            for save in savers.values():
                save(data)  # warm up
            for _ in range(rounds):
                for name, save in savers.items():
                    t0 = time.perf_counter_ns()
                    save(data)
                    samples[name].append(time.perf_counter_ns() - t0)
                if time.perf_counter() > deadline and len(samples["MemoryStore.commit"]) >= 10:
                    break
        finally:
            file_store.close()
            sqlite_store.close()
            sqlite_close()
        for name, s in samples.items():
            rows.append({"replicas": n, "bytes": len(data), "save": name, **_ns_stats(s)})
    return rows


# ---------------------------------------------------------------------------------------
# Commands through the controller


async def _controller(directory: Path, commands: int) -> dict[str, list[int] | int]:
    path = directory / "controller.db"
    runtime = InMemoryRuntime()
    store = SQLiteStore(path)
    samples: dict[str, list[int]] = {
        "command": [],
        "inline": [],
        "bare": [],
        "step": [],
        "encode": [],
        "save": [],
        "bare alongside": [],
        "hop": [],
    }
    # A second controller saves on the trio thread (save_in_thread=False); the two are
    # measured in the same loop as the bare insert, so disk weather hits all alike.
    inline_store = SQLiteStore(directory / "controller-inline.db")
    async with (
        open_controller(runtime=runtime, store=store) as ctl,
        open_controller(
            runtime=InMemoryRuntime(), store=inline_store, name="inline", save_in_thread=False
        ) as inline,
    ):
        splits = [{"a": 1.0}, {"b": 1.0}]
        for c in (ctl, inline):
            await c.create_backend("a", TARGET, num_replicas=2)
            await c.create_backend("b", TARGET, num_replicas=2)
            await c.create_endpoint("api", route="/api")
            await c.set_traffic("api", splits[1])
        payload = encode(ctl.state, ctl.seq)
        bare_save, bare_close = bare_sqlite(directory / "controller-bare.db")
        bare_save(payload)
        try:
            for i in range(commands):
                t0 = time.perf_counter_ns()
                await ctl.set_traffic("api", splits[i % 2])
                samples["command"].append(time.perf_counter_ns() - t0)
                t0 = time.perf_counter_ns()
                await inline.set_traffic("api", splits[i % 2])
                samples["inline"].append(time.perf_counter_ns() - t0)
                # The floor, interleaved: a bare insert of a checkpoint of that size.
                t0 = time.perf_counter_ns()
                bare_save(payload)
                samples["bare"].append(time.perf_counter_ns() - t0)
            # Where a command's time goes: its parts, one by one, on the same state.
            state = ctl.state
            message = SetTraffic(endpoint="api", traffic=splits[commands % 2])
            for _ in range(commands):
                t0 = time.perf_counter_ns()
                transition = step(state, message)
                samples["step"].append(time.perf_counter_ns() - t0)
                t0 = time.perf_counter_ns()
                encode_changes(transition.changes)
                meta_record(ctl.seq + 1, state.replica_counter)
                samples["encode"].append(time.perf_counter_ns() - t0)
                t0 = time.perf_counter_ns()
                await trio.to_thread.run_sync(lambda: None)
                samples["hop"].append(time.perf_counter_ns() - t0)
        except BaseException:
            bare_close()
            raise
    # The store alone, called directly (no thread), after the controller let it go,
    # interleaved with the bare insert again (disk weather changes within a run).
    change = {
        k: v for k, v in encode_changes(step(ctl.state, message).changes).items() if v is not None
    }
    store.open()
    try:
        seq, _ = store.load()
        for i in range(commands):
            t0 = time.perf_counter_ns()
            store.commit(seq + 1 + i, {**change, "meta": meta_record(seq + 1 + i, 0)}, ())
            samples["save"].append(time.perf_counter_ns() - t0)
            t0 = time.perf_counter_ns()
            bare_save(payload)
            samples["bare alongside"].append(time.perf_counter_ns() - t0)
    finally:
        store.close()
        bare_close()
    return {**samples, "bytes": len(payload)}


def bench_controller(directory: Path, quick: bool) -> list[dict[str, Any]]:
    samples = trio.run(_controller, directory, 60 if quick else 300)
    size = samples.pop("bytes")
    labels = {
        "command": "controller set_traffic (SQLiteStore)",
        "inline": "controller, save_in_thread=False",
        "bare": "bare SQLite insert",
        "step": "  part: step(SetTraffic)",
        "encode": "  part: encode the change set",
        "save": "  part: SQLiteStore.commit of it, direct",
        "bare alongside": "  (bare SQLite insert beside it)",
        "hop": "  part: trio.to_thread.run_sync(no-op)",
    }
    return [
        {"what": labels[key], "bytes": size, **_ns_stats(values)}  # type: ignore[arg-type]
        for key, values in samples.items()
    ]


# ---------------------------------------------------------------------------------------
# Report


def _fmt_us(us: float) -> str:
    return f"{us:,.1f}" if us < 10_000 else f"{us:,.0f}"


def report(results: dict[str, Any]) -> str:
    lines = []
    lines.append("step (median us; p99 in brackets)")
    lines.append(f"{'layout':<6} {'message':<16}" + "".join(f"{n:>20,}" for n in SIZES))
    for layout in ("one", "many"):
        for case in ("SetTraffic", "scale up by 1", "scale down by 1"):
            cells = []
            for n in SIZES:
                (row,) = [
                    r
                    for r in results["step"]
                    if (r["layout"], r["message"], r["replicas"]) == (layout, case, n)
                ]
                cells.append(f"{_fmt_us(row['median_us'])} [{_fmt_us(row['p99_us'])}]")
            lines.append(f"{layout:<6} {case:<16}" + "".join(f"{c:>20}" for c in cells))
    lines.append("")
    lines.append("checkpoint (layout one)")
    lines.append(
        f"{'replicas':>9} {'bytes':>11} {'encode us':>11} {'decode us':>11} {'sum us':>11}"
    )
    for r in results["checkpoint"]:
        lines.append(
            f"{r['replicas']:>9,} {r['bytes']:>11,} {_fmt_us(r['encode_median_us']):>11}"
            f" {_fmt_us(r['decode_median_us']):>11} {_fmt_us(r['encode_decode_median_us']):>11}"
        )
    lines.append("")
    lines.append("save of one checkpoint (interleaved rounds)")
    lines.append(f"{'replicas':>9} {'bytes':>10}  {'save':<24} {'median us':>11} {'p99 us':>11}")
    for r in results["save"]:
        lines.append(
            f"{r['replicas']:>9,} {r['bytes']:>10,}  {r['save']:<24}"
            f" {_fmt_us(r['median_us']):>11} {_fmt_us(r['p99_us']):>11}"
        )
    lines.append("")
    lines.append("command latency through the controller (and its parts, measured alone)")
    for r in results["controller"]:
        lines.append(
            f"{r['what']:<40} {r['bytes']:>7,} B  median {_fmt_us(r['median_us']):>9} us"
            f"  p99 {_fmt_us(r['p99_us']):>9} us"
        )
    lines.append("")
    for name, target in results["targets"].items():
        verdict = "met" if target["met"] else "MISSED"
        lines.append(
            f"target {name}: {target['ratio']:.2f}x (limit {target['limit']}x) -> {verdict}"
        )
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> dict[str, Any]:
    def step_median(n: int) -> float:
        (row,) = [
            r
            for r in results["step"]
            if (r["layout"], r["message"], r["replicas"]) == ("one", "SetTraffic", n)
        ]
        return float(row["median_us"])

    traffic_ratio = step_median(SIZES[-1]) / step_median(SIZES[0])
    rows = {r["what"]: r["median_us"] for r in results["controller"]}
    bare = rows["bare SQLite insert"]
    command_ratio = rows["controller set_traffic (SQLiteStore)"] / bare
    inline_ratio = rows["controller, save_in_thread=False"] / bare
    return {
        "SetTraffic 10,000 vs 10 replicas": {
            "ratio": traffic_ratio,
            "limit": 3.0,
            "met": traffic_ratio <= 3.0,
        },
        "controller command vs bare SQLite insert": {
            "ratio": command_ratio,
            "limit": 1.5,
            "met": command_ratio <= 1.5,
        },
        "controller command, save_in_thread=False, vs bare SQLite insert": {
            "ratio": inline_ratio,
            "limit": 1.5,
            "met": inline_ratio <= 1.5,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--dir", help="directory the stores write to (default: a temp dir)")
    parser.add_argument("--out", default=str(HERE / "results" / "bench_core.json"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_core-", dir=args.dir) as tmp:
        directory = Path(tmp)
        results: dict[str, Any] = {
            "step": bench_step(args.quick),
            "checkpoint": bench_checkpoint(args.quick),
            "save": bench_saves(directory, args.quick),
            "controller": bench_controller(directory, args.quick),
        }
    results["targets"] = targets(results)
    results["meta"] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
        "layouts": {
            "one": "1 backend with N RUNNING replicas + backend b (1) + endpoint api -> a",
            "many": "N/10 backends of 10 RUNNING replicas (2 of 5 at N=10), one endpoint each",
        },
    }
    print(report(results))
    print(f"\n({results['meta']['seconds']} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
