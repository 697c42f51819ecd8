"""servecore in two minutes: serve two versions of a model, split traffic, restart.

Run it with ``make demo`` (or ``python -m examples.demo`` from the checkout). It

1. starts a controller for a synchronous program (``servecore.start``) with a SQLite
   checkpoint under ``.servecore/``;
2. deploys two versions of the sentiment model from :mod:`examples.textapp`: v1 with
   two replicas, v2 batch-capable, and splits the ``sentiment`` endpoint 90/10;
3. sends a few hundred queries from 16 threads and prints per-backend counts and
   latency percentiles;
4. closes the controller, opens a new one on the same checkpoint, shows what it
   recovered, and serves again;
5. serves the endpoint over HTTP at its route and sends it one request.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import servecore
from examples.textapp import SAMPLE_TEXTS

STATE_DIR = Path(".servecore")
CHECKPOINT = STATE_DIR / "demo.db"
CLIENT_THREADS = 16


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def send_queries(ctl: servecore.SyncController, n: int) -> dict[str, Any]:
    """Send ``n`` queries from several threads; return latencies and batch sizes by model."""
    handle = ctl.get_handle("sentiment").options(timeout_s=30)

    def one(i: int) -> tuple[dict[str, Any], float]:
        began = time.perf_counter()
        answer = handle.call({"text": SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]})
        return answer, time.perf_counter() - began

    latencies: defaultdict[str, list[float]] = defaultdict(list)
    batches: list[int] = []
    labels: defaultdict[str, int] = defaultdict(int)
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CLIENT_THREADS) as pool:
        for answer, seconds in pool.map(one, range(n)):
            latencies[answer["model"]].append(seconds)
            labels[answer["label"]] += 1
            if "batch" in answer:
                batches.append(answer["batch"])
    return {
        "latencies": latencies,
        "batches": batches,
        "labels": labels,
        "seconds": time.perf_counter() - began,
        "n": n,
    }


def print_summary(run: dict[str, Any]) -> None:
    """The table a newcomer reads: who served how much, and how fast."""
    n = run["n"]
    print(f"  {'backend':<14}{'queries':>8}{'share':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for model, backend in (("v1", "sentiment-v1"), ("v2", "sentiment-v2")):
        lat = run["latencies"].get(model, [])
        if lat:
            p50 = f"{_percentile(lat, 0.50) * 1000:>9.1f}"
            p99 = f"{_percentile(lat, 0.99) * 1000:>9.1f}"
        else:
            p50 = p99 = f"{'-':>9}"
        print(f"  {backend:<14}{len(lat):>8}{len(lat) / n:>8.0%}{p50}{p99}")
    batches = run["batches"]
    if batches:
        print(
            f"  v2 batches: mean size {statistics.mean(batches):.1f}, largest {max(batches)}"
            " (each v2 query reports the size of the batch it rode in)"
        )
    labels = ", ".join(f"{k} {v}" for k, v in sorted(run["labels"].items()))
    print(f"  {n} queries in {run['seconds']:.2f} s from {CLIENT_THREADS} threads; {labels}")


def describe(ctl: servecore.SyncController) -> None:
    """What the controller knows: checkpoint number, backends and their replicas."""
    state = ctl.state
    print(f"  checkpoint seq {ctl.seq}; endpoints {sorted(state.endpoints)}")
    for tag, backend in sorted(state.backends.items()):
        replicas = sorted(r.tag for r in state.replicas.values() if r.backend == tag)
        print(f"  {tag:<14}{backend.status.value:<9} replicas {replicas}")
    traffic = dict(sorted(state.endpoints["sentiment"].traffic.items()))
    print(f"  traffic of 'sentiment': {traffic}")


def main() -> None:
    """Run the demo end to end."""
    STATE_DIR.mkdir(exist_ok=True)
    for old in STATE_DIR.glob(CHECKPOINT.name + "*"):
        old.unlink()  # a fresh start each run; the restart below is the point

    print(f"1. Start a controller (threads runtime, checkpoint {CHECKPOINT})")
    with servecore.start(runtime="threads", store=servecore.SQLiteStore(CHECKPOINT)) as ctl:
        ctl.create_backend("sentiment-v1", "examples.textapp:SentimentV1", num_replicas=2)
        ctl.create_backend(
            "sentiment-v2",
            "examples.textapp:SentimentV2",
            max_batch_size=16,
            batch_wait_timeout_s=0.005,
            max_concurrent_queries=16,
        )
        ctl.create_endpoint("sentiment", route="/sentiment", methods=["POST"])
        ctl.set_traffic("sentiment", {"sentiment-v1": 0.9, "sentiment-v2": 0.1})
        describe(ctl)
        answer = ctl.get_handle("sentiment").call({"text": "I love it, great coffee"})
        print(f"  one query: {answer}")

        print("\n2. Serve 400 queries, split 90/10")
        print_summary(send_queries(ctl, 400))

    print("\n3. Controller closed. Reopen it from the checkpoint:")
    with servecore.start(runtime="threads", store=servecore.SQLiteStore(CHECKPOINT)) as ctl:
        print("  recovered (in-process replicas died with the old controller, so they")
        print("  were replaced under new tags; out-of-process ones would be found again):")
        describe(ctl)

        print("\n4. Serve again after the restart: 200 queries")
        print_summary(send_queries(ctl, 200))

        print("\n5. The same endpoint over HTTP, at its route")
        url = ctl.serve_http("127.0.0.1:0")
        request = urllib.request.Request(
            f"{url}/sentiment",
            data=json.dumps({"text": "awful, cold coffee"}).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            print(f"  POST {url}/sentiment -> {response.status} {response.read().decode()}")
    print("\nDone. The checkpoint stays in .servecore/ (`make clean` removes it).")


if __name__ == "__main__":
    main()
