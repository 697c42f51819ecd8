"""Autoscaling under a load profile, beside fixed replica counts, in one run.

A load profile -- low, a step up, a spike, a ramp down -- is sent open-loop (queries
arrive on a schedule, whatever the answers do) through the real router and the threads
runtime to a target with a fixed service time (``bench_targets.service``: one replica
serves ``1 / SERVICE_S`` queries per second). Each row runs the same profile:

* ``autoscale`` -- ``AutoscalingConfig`` with fast delays (below), reports every
  ``INTERVAL_S``;
* ``fixed N`` -- ``num_replicas=N`` for the step level and for the spike.

The replicas the load needs at time ``t`` are ``ceil(rate(t) * SERVICE_S /
TARGET_ONGOING)`` (Little's law: queries in service at the target concurrency).
Printed per row: reaction time to the step (step -> first new replica RUNNING -> as
many RUNNING as the step needs), over- and under-provisioned replica-seconds (running
minus needed, integrated over time, each sign apart), p50/p99 latency of answered
queries, queries refused by backpressure, scale decisions, direction reversals while
the step's load is constant (oscillations), and checkpoint writes. The goal: reaction
within one upscale delay plus one replica start (plus one report interval), and zero
oscillations on the step.

Results go to ``benchmarks/results/bench_autoscale.json`` and, with matplotlib (the
``bench`` extra), a plot of load and replicas over time to ``bench_autoscale.png``. If
Ray Serve is importable, the same profile and parameters run on it too; otherwise the
row is skipped with a note. Run: ``.venv/bin/python benchmarks/bench_autoscale.py
[--quick]`` (about 50 s; ``--quick`` halves the profile).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_targets  # noqa: E402

import servecore  # noqa: E402

SERVICE_S = bench_targets.SERVICE_S
TARGET_ONGOING = 1.0
INTERVAL_S = 0.1
SAMPLE_S = 0.05
SCALING = servecore.AutoscalingConfig(
    min_replicas=1,
    max_replicas=8,
    target_ongoing_requests=TARGET_ONGOING,
    look_back_period_s=1.0,
    upscale_delay_s=1.0,
    downscale_delay_s=3.0,
)

#: (start s, end s, rate at start qps, rate at end qps, phase): linear within a phase.
PROFILE: list[tuple[float, float, float, float, str]] = [
    (0.0, 3.0, 30.0, 30.0, "low"),
    (3.0, 9.0, 120.0, 120.0, "step"),
    (9.0, 11.0, 280.0, 280.0, "spike"),
    (11.0, 16.0, 120.0, 20.0, "ramp down"),
    (16.0, 18.0, 20.0, 20.0, "tail"),
]


def rate_at(profile: list[tuple[float, float, float, float, str]], t: float) -> float:
    for start, end, r0, r1, _ in profile:
        if start <= t < end:
            return r0 + (r1 - r0) * (t - start) / (end - start)
    return 0.0


def needed(rate: float) -> int:
    return max(1, math.ceil(rate * SERVICE_S / TARGET_ONGOING - 1e-9))


def scaled(
    profile: list[tuple[float, float, float, float, str]], k: float
) -> list[tuple[float, float, float, float, str]]:
    return [(a * k, b * k, r0, r1, name) for a, b, r0, r1, name in profile]


async def run_row(
    name: str, profile: list[tuple[float, float, float, float, str]], **config: Any
) -> dict[str, Any]:
    """Send ``profile`` to a backend made with ``config``; return the row's figures."""
    end = profile[-1][1]
    latencies: list[float] = []
    refused = [0]
    timeline: list[tuple[float, float, int, int]] = []  # (t, rate, running, wanted)
    async with servecore.open_controller(
        runtime="threads", autoscale_interval_s=INTERVAL_S, resync_interval_s=None
    ) as ctl:
        await ctl.create_backend("m", "bench_targets:service", max_concurrent_queries=2, **config)
        await ctl.create_endpoint("m")
        await ctl.set_traffic("m", {"m": 1.0})
        handle = ctl.get_handle("m")
        seq0 = ctl.seq
        t0 = trio.current_time()

        async def one() -> None:
            sent = trio.current_time()
            try:
                await handle.call(1)
            except servecore.BackpressureError:
                refused[0] += 1
                return
            latencies.append(trio.current_time() - sent)

        async def monitor() -> None:
            while True:
                t = trio.current_time() - t0
                running = sum(
                    r.status is servecore.ReplicaStatus.RUNNING and r.backend == "m"
                    for r in ctl.state.replicas.values()
                )
                wanted = ctl.state.backends["m"].wanted_replicas
                timeline.append((t, rate_at(profile, t), running, wanted))
                await trio.sleep(SAMPLE_S)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor)
            async with trio.open_nursery() as queries:
                t = 0.0
                while t < end:
                    rate = rate_at(profile, t)
                    await trio.sleep_until(t0 + t)
                    queries.start_soon(one)
                    t += 1.0 / rate
            nursery.cancel_scope.cancel()
        auto = ctl.state.backends["m"].autoscale
        decisions = auto.decisions if auto is not None else 0
        writes = ctl.seq - seq0
    return summarize(name, profile, timeline, latencies, refused[0], decisions, writes)


def summarize(
    name: str,
    profile: list[tuple[float, float, float, float, str]],
    timeline: list[tuple[float, float, int, int]],
    latencies: list[float],
    refused: int,
    decisions: int,
    writes: int,
) -> dict[str, Any]:
    over = under = 0.0
    for (t, rate, running, _), (t_next, *_rest) in itertools.pairwise(timeline):
        gap = running - needed(rate)
        dt = t_next - t
        over += max(0, gap) * dt
        under += max(0, -gap) * dt
    step_start, step_end = next((a, b) for a, b, _, _, n in profile if n == "step")
    step_need = needed(rate_at(profile, step_start))
    before = next(r for t, _, r, _ in timeline if t >= step_start)
    first_new = next(
        (t - step_start for t, _, r, _ in timeline if t >= step_start and r > before), None
    )
    enough = next(
        (t - step_start for t, _, r, _ in timeline if t >= step_start and r >= step_need), None
    )
    # Oscillations: reversals of the wanted count while the step's load is constant.
    wanted = [w for t, _, _, w in timeline if step_start <= t < step_end]
    moves = [b - a for a, b in itertools.pairwise(wanted) if b != a]
    reversals = sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))
    latencies.sort()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3

    return {
        "row": name,
        "reaction_first_replica_s": first_new,
        "reaction_enough_replicas_s": enough,
        "overprovisioned_replica_s": round(over, 2),
        "underprovisioned_replica_s": round(under, 2),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "answered": len(latencies),
        "refused": refused,
        "decisions": decisions,
        "step_reversals": reversals,
        "checkpoint_writes": writes,
        "replica_seconds": round(
            sum(r * (b[0] - a[0]) for a, b in itertools.pairwise(timeline) for r in [a[2]]),
            2,
        ),
        "timeline": timeline,
    }


def ray_serve_row(profile: list[tuple[float, float, float, float, str]]) -> dict[str, Any] | str:
    """The same profile on Ray Serve, or why it was skipped."""
    try:
        import ray.serve  # noqa: F401
    except Exception as exc:
        return (
            f"skipped: Ray Serve is not importable ({type(exc).__name__}: {exc}); "
            f"`make bench-ray` installs it"
        )
    return (
        "skipped: Ray Serve is importable, but this script has no Ray Serve row yet "
        "(benchmarks/bench_ray.py compares latency with it)"
    )


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}{unit}"
    return f"{v}{unit}"


def plot(rows: list[dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot"
    fig, ax = plt.subplots(figsize=(9, 4.5))
    first = rows[0]["timeline"]
    ax.plot([t for t, *_ in first], [needed(r) for _, r, _, _ in first], "k:", label="needed")
    for row in rows:
        ax.step(
            [t for t, *_ in row["timeline"]],
            [r for _, _, r, _ in row["timeline"]],
            where="post",
            label=f"{row['row']} (running)",
        )
    ax.set_xlabel("time (s)")
    ax.set_ylabel("replicas")
    load = ax.twinx()
    load.plot([t for t, *_ in first], [r for _, r, _, _ in first], color="tab:gray", alpha=0.4)
    load.set_ylabel("offered load (queries/s)", color="tab:gray")
    ax.legend(loc="upper left")
    ax.set_title("servecore autoscaling: replicas following a load profile")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="half the profile's length")
    args = parser.parse_args()
    profile = scaled(PROFILE, 0.5) if args.quick else PROFILE
    step_need = needed(rate_at(profile, next(a for a, _, _, _, n in profile if n == "step")))
    spike_need = needed(rate_at(profile, next(a for a, _, _, _, n in profile if n == "spike")))
    rows_spec: list[tuple[str, dict[str, Any]]] = [
        ("autoscale", {"autoscaling": SCALING}),
        (f"fixed {step_need}", {"num_replicas": step_need}),
        (f"fixed {spike_need}", {"num_replicas": spike_need}),
    ]
    rows: list[dict[str, Any]] = []
    for name, config in rows_spec:
        rows.append(trio.run(functools.partial(run_row, name, profile, **config)))
    ray_note = ray_serve_row(profile)

    cols: list[tuple[str, str, Callable[[Any], str]]] = [
        ("row", "row", str),
        ("first new (s)", "reaction_first_replica_s", fmt),
        ("enough (s)", "reaction_enough_replicas_s", fmt),
        ("over (r·s)", "overprovisioned_replica_s", fmt),
        ("under (r·s)", "underprovisioned_replica_s", fmt),
        ("replica·s", "replica_seconds", fmt),
        ("p50 ms", "p50_ms", fmt),
        ("p99 ms", "p99_ms", fmt),
        ("refused", "refused", fmt),
        ("decisions", "decisions", fmt),
        ("reversals", "step_reversals", fmt),
        ("writes", "checkpoint_writes", fmt),
    ]
    table = [[f(row[key]) for _, key, f in cols] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, (h, _, _) in enumerate(cols)]
    print(" | ".join(h.ljust(w) for (h, _, _), w in zip(cols, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in table:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    goal = SCALING.upscale_delay_s + INTERVAL_S + SCALING.look_back_period_s
    print(
        f"\nstep needs {step_need} replicas, spike {spike_need}; service {SERVICE_S * 1e3:g} ms; "
        f"upscale_delay_s={SCALING.upscale_delay_s:g}, downscale_delay_s="
        f"{SCALING.downscale_delay_s:g}, look_back_period_s={SCALING.look_back_period_s:g}, "
        f"reports every {INTERVAL_S:g} s"
    )
    print(f"goal: first new replica within ~{goal:g} s + one replica start; 0 reversals")
    print(f"Ray Serve: {ray_note if isinstance(ray_note, str) else 'see JSON'}")

    out = HERE / "results"
    out.mkdir(exist_ok=True)
    note = plot(rows, out / "bench_autoscale.png")
    if note:
        print(note)
    else:
        print(f"plot: {out / 'bench_autoscale.png'}")
    payload = {
        "benchmark": "bench_autoscale",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "profile": profile,
        "service_s": SERVICE_S,
        "config": attrs.asdict(SCALING),
        "interval_s": INTERVAL_S,
        "rows": rows,
        "ray_serve": ray_note,
    }
    (out / "bench_autoscale.json").write_text(json.dumps(payload, indent=1, default=str))
    print(f"json: {out / 'bench_autoscale.json'}")


if __name__ == "__main__":
    main()
