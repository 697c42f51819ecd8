"""A host process for the subprocess-runtime crash tests; it SIGKILLs itself on cue.

Usage::

    python tests/support/subprocess_host.py STORE RUNTIME_DIR CHECKPOINT_DIR [CRASH_AT]

It opens a controller (``SubprocessRuntime(RUNTIME_DIR)``, ``SQLiteStore(STORE)``) and
runs :data:`SCENARIO`: create an endpoint and a backend of 2 replicas, route traffic,
query, scale to 3, then down to 1. Every *crash point* it passes -- before and after
each checkpoint save, each replica start and each replica stop -- is numbered and
printed as ``POINT <n> <label>``; with ``CRASH_AT=n`` the host sends itself SIGKILL at
point ``n`` (no cleanup, no ``finally``: a real crash). Each checkpoint saved is also
copied to ``CHECKPOINT_DIR/<seq>.bin`` so tests can recover from a superseded one.
Without ``CRASH_AT`` the host runs to the end, prints ``DONE`` and exits, leaving its
replicas running for the next controller to find. With ``mid-start`` in its place, it
creates a backend of slow-to-construct replicas and dies while they are starting.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Collection, Mapping
from pathlib import Path

import trio

import servecore
from servecore import SQLiteStore, StartReplica
from servecore._core.records import encode_blob
from servecore.runtimes.subprocess import SubprocessRuntime

TARGET = "subprocess_targets:Echo"
BACKEND = "echo"
#: num_replicas after each scaling step, in order; the last one is what a run ends with.
SCALE_STEPS = (2, 3, 1)
MID_START_REPLICAS = 2


class CrashPoints:
    """Numbers the points it passes and SIGKILLs this process at ``crash_at``."""

    def __init__(self, crash_at: int | None) -> None:
        self.crash_at = crash_at
        self.count = 0
        self.lock = threading.Lock()  # saves run in a worker thread

    def point(self, label: str) -> None:
        with self.lock:
            index = self.count
            self.count += 1
        print(f"POINT {index} {label}", flush=True)
        if index == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)


class CrashingStore:
    """An SQLiteStore with crash points around each commit; keeps each checkpoint too
    (as a whole-state blob, :func:`servecore._core.records.encode_blob`)."""

    def __init__(self, path: str, checkpoints: Path, points: CrashPoints) -> None:
        self.inner = SQLiteStore(path)
        self.where = self.inner.where
        self.checkpoints = checkpoints
        self.points = points
        self.saves = 0

    @property
    def store_id(self) -> str | None:
        """The inner store's: the recovering controller opens that store directly."""
        found = getattr(self.inner, "store_id", None)
        return found if isinstance(found, str) else None

    def open(self) -> None:
        self.inner.open()

    def close(self) -> None:
        self.inner.close()

    def load(self) -> tuple[int, Mapping[str, bytes]]:
        return self.inner.load()

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        self.saves += 1
        self.points.point(f"before save {self.saves}")
        self.inner.commit(seq, puts, deletes)
        blob = encode_blob(*self.inner.load())
        (self.checkpoints / f"{self.saves:04d}.bin").write_bytes(blob)
        self.points.point(f"after save {self.saves}")


class CrashingRuntime(SubprocessRuntime):
    """A SubprocessRuntime with crash points around each replica start and stop."""

    def __init__(self, directory: str, points: CrashPoints) -> None:
        super().__init__(directory)
        self.points = points

    async def start_replica(self, effect: StartReplica) -> None:
        self.points.point(f"before start {effect.tag}")
        await super().start_replica(effect)
        self.points.point(f"after start {effect.tag}")

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        self.points.point(f"before stop {tag}")
        await super().stop_replica(tag, timeout_s)
        self.points.point(f"after stop {tag}")


async def scenario(
    store_path: str, runtime_dir: str, checkpoints: Path, points: CrashPoints
) -> None:
    store = CrashingStore(store_path, checkpoints, points)
    runtime = CrashingRuntime(runtime_dir, points)
    async with servecore.open_controller(runtime=runtime, store=store, name="crash") as ctl:
        await ctl.create_endpoint(BACKEND)
        first, *rest = SCALE_STEPS
        await ctl.create_backend(
            BACKEND, TARGET, num_replicas=first, graceful_shutdown_timeout_s=5.0
        )
        await ctl.set_traffic(BACKEND, {BACKEND: 1.0})
        answer = await ctl.get_handle(BACKEND).call("hello")
        assert answer == "hello", answer
        for n in rest:
            await ctl.update_backend_config(BACKEND, num_replicas=n)
    print("DONE", flush=True)


async def mid_start(store_path: str, runtime_dir: str, checkpoints: Path) -> None:
    """Create a backend of slow-to-construct replicas and SIGKILL this host while they
    are still starting: spawned, their records written, their constructors running."""

    def crash_once_starting() -> None:
        while True:
            records = [p for p in Path(runtime_dir).glob("*.json") if ".spec." not in p.name]
            if len(records) == MID_START_REPLICAS and all(
                '"starting"' in p.read_text() for p in records
            ):
                print("CRASH mid-start", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.005)

    threading.Thread(target=crash_once_starting, daemon=True).start()
    points = CrashPoints(None)
    store = CrashingStore(store_path, checkpoints, points)
    runtime = CrashingRuntime(runtime_dir, points)
    async with servecore.open_controller(runtime=runtime, store=store, name="crash") as ctl:
        await ctl.create_backend(
            BACKEND, "subprocess_targets:SlowEcho", init_args=(2.0,),
            num_replicas=MID_START_REPLICAS,
        )  # fmt: skip
    print("DONE", flush=True)  # not reached: the thread crashes the host first


def main() -> None:
    store_path, runtime_dir, checkpoint_dir = sys.argv[1:4]
    checkpoints = Path(checkpoint_dir)
    checkpoints.mkdir(parents=True, exist_ok=True)
    if len(sys.argv) > 4 and sys.argv[4] == "mid-start":
        trio.run(mid_start, store_path, runtime_dir, checkpoints)
        return
    crash_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    trio.run(scenario, store_path, runtime_dir, checkpoints, CrashPoints(crash_at))


if __name__ == "__main__":
    main()
