"""Crash consistency, proven by enumeration (docs/design.md §7).

The Hypothesis machine runs against each built-in store and the blob adapter; the
scripted scenarios crash at *every* crash point of every step, commits included (part
of a change set written: a torn log tail, an uncommitted SQLite transaction).
"""

from __future__ import annotations

from typing import Any

import pytest

from checkpoints import MemoryBlob
from crash_script import SCRIPT, config
from servecore import (
    MAX_START_FAILURES,
    BackendStartError,
    BackendStatus,
    CreateBackend,
    CreateEndpoint,
    FileStore,
    MemoryStore,
    RetryBackend,
    SQLiteStore,
    Store,
)
from servecore.testing import (
    CrashConsistencyMachine,
    CrashWorld,
    InMemoryRuntime,
    check_runtime,
    enumerate_crashes,
)

ECHO = "servecore.testing.targets:Echo"


class MemoryCrashes(CrashConsistencyMachine):
    def make_store(self) -> Store:
        return MemoryStore()


class FileCrashes(CrashConsistencyMachine):
    def make_store(self) -> Store:
        return FileStore(self.tmp / "state.json")


class SQLiteCrashes(CrashConsistencyMachine):
    def make_store(self) -> Store:
        return SQLiteStore(self.tmp / "state.db")


class BlobCrashes(CrashConsistencyMachine):
    """A user's whole-blob store, through the adapter."""

    def make_store(self) -> MemoryBlob:
        return MemoryBlob()


class CompactingFileCrashes(CrashConsistencyMachine):
    """A file store that compacts on every commit: crashes land in compactions too."""

    def make_store(self) -> Store:
        return FileStore(self.tmp / "state.json", compact_min_bytes=0)


TestMemoryCrashes = MemoryCrashes.TestCase
TestFileCrashes = FileCrashes.TestCase
TestSQLiteCrashes = SQLiteCrashes.TestCase
TestBlobCrashes = BlobCrashes.TestCase
TestCompactingFileCrashes = CompactingFileCrashes.TestCase


@pytest.mark.parametrize("kind", ["memory", "file", "compacting-file", "sqlite", "blob"])
def test_every_crash_point_of_a_script_recovers(kind: str, tmp_path) -> None:
    counter = iter(range(10_000))

    def make_world() -> CrashWorld:
        d = tmp_path / str(next(counter))
        d.mkdir()
        store: Any = {
            "memory": lambda: MemoryStore(),
            "file": lambda: FileStore(d / "state.json"),
            "compacting-file": lambda: FileStore(d / "state.json", compact_min_bytes=0),
            "sqlite": lambda: SQLiteStore(d / "state.db"),
            "blob": lambda: MemoryBlob(),
        }[kind]()
        return CrashWorld(store)

    checked = enumerate_crashes(make_world, SCRIPT)
    # Every step has at least the recovery commit's three points; most have many more.
    assert checked >= 6 * len(SCRIPT)


def test_crash_points_are_counted_exactly() -> None:
    world = CrashWorld()
    cmd = CreateBackend(tag="a", target=ECHO, config=config(2))
    total = world.count_points(cmd)
    # open: before/midway/after the Recover commit (3); the command's commit (3); two
    # starts (2 each); one commit for both ReplicaStarted events (3) = 13.
    assert total == 13
    outcome = world.run(cmd, crash_at=total)  # one past the last point: no crash
    assert outcome.crashed is None and outcome.points == total
    assert world.plan.labels[-3:] == ["before commit", "midway commit", "after commit"]
    assert world.plan.labels.count("before commit") == 3


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_a_crash_midway_through_a_commit_recovers_the_previous_one(kind: str, tmp_path) -> None:
    """Part of the change set is on disk (a torn log tail; an open SQLite transaction)
    when the controller dies: recovery finds the commit before it, whole."""
    store = FileStore(tmp_path / "s.json") if kind == "file" else SQLiteStore(tmp_path / "s.db")
    world = CrashWorld(store)
    world.run(CreateEndpoint(name="e"))
    cmd = CreateBackend(tag="a", target=ECHO, config=config(3))
    probe = world.clone()
    probe.run(cmd)
    midway = [i for i, label in enumerate(probe.plan.labels) if label == "midway commit"]
    outcome = world.run(cmd, crash_at=midway[1])  # the command's own commit
    assert outcome.crashed == "midway commit"
    if kind == "file":
        assert (tmp_path / "s.json.log").stat().st_size > 0
    recovered = world.run(None)
    assert recovered.state is not None and dict(recovered.state.backends) == {}
    assert set(recovered.state.endpoints) == {"e"}
    world.check_settled(recovered.state)
    again = world.run(cmd)
    assert again.state is not None and len(again.state.replicas) == 3


def test_the_in_memory_runtime_conforms() -> None:
    check_runtime(InMemoryRuntime, kill=lambda rt, tag: rt.kill(tag))  # type: ignore[attr-defined]


def test_a_failed_backend_restated_then_retried_at_every_crash_point() -> None:
    """Starts fail until the backend is FAILED; restating its definition changes
    nothing; RetryBackend starts it again. Every crash point of the retry recovers to
    all or nothing, and only the injected failures ever fail."""
    create = CreateBackend(tag="a", target=ECHO, config=config(2))

    def make_world() -> CrashWorld:
        runtime = InMemoryRuntime()
        runtime.fail_starts("a", "injected failure of a", times=MAX_START_FAILURES)
        return CrashWorld(runtime=runtime)

    world = make_world()
    assert isinstance(world.run(create).error, BackendStartError)
    again = world.run(create)
    assert isinstance(again.error, BackendStartError) and again.action_log == ()
    assert again.state is not None and again.state.backends["a"].status is BackendStatus.FAILED
    retried = world.run(RetryBackend(tag="a"))
    assert retried.error is None and retried.state is not None
    assert retried.state.backends["a"].status is BackendStatus.HEALTHY

    # The retry's crash points (the failing starts' are covered above, and back off).
    script = [create, create, RetryBackend(tag="a")]
    assert enumerate_crashes(make_world, script, crash_step=2) > 0
