"""Crash consistency, proven by enumeration (docs/design.md §7).

The Hypothesis machine runs against each built-in store; the scripted scenarios crash
at *every* crash point of every step.
"""

from __future__ import annotations

import pytest

from servecore import (
    MAX_START_FAILURES,
    BackendConfig,
    BackendStartError,
    BackendStatus,
    CreateBackend,
    CreateEndpoint,
    DeleteBackend,
    FileStore,
    MemoryStore,
    RetryBackend,
    SetBackendConfig,
    SetShadowTraffic,
    SetTraffic,
    SQLiteStore,
    Store,
)
from servecore.testing import (
    CrashConsistencyMachine,
    CrashWorld,
    InMemoryRuntime,
    Kill,
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


TestMemoryCrashes = MemoryCrashes.TestCase
TestFileCrashes = FileCrashes.TestCase
TestSQLiteCrashes = SQLiteCrashes.TestCase


def config(n: int) -> BackendConfig:
    return BackendConfig(num_replicas=n, graceful_shutdown_timeout_s=0.0)


SCRIPT = [
    CreateBackend(tag="a", target=ECHO, config=config(3)),
    CreateEndpoint(name="e", route="/e"),
    SetTraffic(endpoint="e", traffic={"a": 1.0}),
    CreateBackend(tag="b", target=ECHO, config=config(2)),
    SetTraffic(endpoint="e", traffic={"a": 0.5, "b": 0.5}),
    SetShadowTraffic(endpoint="e", backend="b", proportion=0.25),
    SetBackendConfig(tag="a", config=config(1)),
    SetBackendConfig(tag="b", config=config(4)),
    Kill("b#5"),
    # A new user_config rolls b's four replicas onto new ones.
    SetBackendConfig(tag="b", config=config(4).evolve(user_config={"v": 2})),
    SetTraffic(endpoint="e", traffic={"b": 1.0}),
    SetShadowTraffic(endpoint="e", backend="b", proportion=0.0),
    DeleteBackend(tag="a"),
]


@pytest.mark.parametrize("kind", ["memory", "file", "sqlite"])
def test_every_crash_point_of_a_script_recovers(kind: str, tmp_path) -> None:
    counter = iter(range(10_000))

    def make_world() -> CrashWorld:
        d = tmp_path / str(next(counter))
        d.mkdir()
        store: Store = {
            "memory": lambda: MemoryStore(),
            "file": lambda: FileStore(d / "state.json"),
            "sqlite": lambda: SQLiteStore(d / "state.db"),
        }[kind]()
        return CrashWorld(store)

    checked = enumerate_crashes(make_world, SCRIPT)
    # Every step has at least the recovery save's two points; most have many more.
    assert checked >= 4 * len(SCRIPT)


def test_crash_points_are_counted_exactly() -> None:
    world = CrashWorld()
    cmd = CreateBackend(tag="a", target=ECHO, config=config(2))
    total = world.count_points(cmd)
    # open: before/after the Recover save (2); the command's save (2); two starts
    # (2 each); the two ReplicaStarted saves (2 each) = 12.
    assert total == 12
    outcome = world.run(cmd, crash_at=total)  # one past the last point: no crash
    assert outcome.crashed is None and outcome.points == total


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
