"""The scale benchmark runs (at tiny sizes: its figures come from running it by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

import bench_scale


def test_the_scale_benchmark_measures_every_store_at_a_tiny_size(tmp_path: Path) -> None:
    rows = [
        bench_scale.bench_store(kind, "memory", 3, tmp_path / kind, reps=3)
        for kind in ("memory", "file", "sqlite", "blob")
    ]
    for row in rows:
        assert row["deploy_s"] > 0 and row["set_traffic_ms"] > 0 and row["open_s"] > 0
        assert row["deploy_commits"] >= 2
    by = {r["store"]: r for r in rows}
    # A set_traffic writes one endpoint record and the meta record; the whole-state
    # path writes everything.
    assert by["sqlite"]["set_traffic_bytes"] == by["memory"]["set_traffic_bytes"] < 400
    assert by["blob"]["set_traffic_bytes"] > 2 * by["sqlite"]["set_traffic_bytes"]
    assert "bare_insert_ms" in by["sqlite"]
    concurrent = bench_scale.bench_concurrent(tmp_path, tasks=4, per_task=2)
    assert concurrent["commands_per_s"] > 0 and concurrent["commits"] <= 8
