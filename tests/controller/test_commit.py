"""The commit path: group commit, one writer thread, and what each command is told."""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping

import pytest
import trio

from servecore import (
    CheckpointError,
    EndpointNotFound,
    MemoryStore,
    open_controller,
)
from servecore.testing import InMemoryRuntime

ECHO = "servecore.testing.targets:Echo"


class GateStore:
    """A key-value store whose commits can be held at a gate (a slow disk), that fails
    commits on demand, and that records what each commit wrote and on which thread."""

    where = "gate store"

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = 0
        self.commits: list[tuple[int, set[str]]] = []
        self.threads: set[str] = set()

    def load(self) -> tuple[int, Mapping[str, bytes]]:
        return self.inner.load()

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        self.gate.wait(10)
        if self.fail:
            self.fail -= 1
            raise OSError(28, "No space left on device")
        self.inner.commit(seq, puts, deletes)
        self.commits.append((seq, set(puts) | set(deletes)))

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()

    async def wait_entered(self) -> None:
        with trio.fail_after(10):
            while not self.entered.is_set():
                await trio.sleep(0.001)


async def _queue_behind_a_held_commit(
    ctl: object, store: GateStore, first: object, rest: list[object]
) -> list[BaseException | None]:
    """Run ``first`` until its commit is at the gate, queue ``rest`` behind it in
    order, then open the gate; return what each of ``rest`` raised (or None)."""
    errors: list[BaseException | None] = [None] * len(rest)

    async def one(i: int, call: object) -> None:
        try:
            await call()  # type: ignore[operator]
        except Exception as exc:
            errors[i] = exc

    store.hold()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)  # type: ignore[arg-type]
        await store.wait_entered()
        for i, call in enumerate(rest):
            # One at a time, so that they arrive in this order.
            queued = ctl.queued
            nursery.start_soon(one, i, call)
            with trio.fail_after(10):
                while ctl.queued == queued:  # type: ignore[attr-defined]
                    await trio.sleep(0.001)
        store.gate.set()
    return errors


async def test_commands_arriving_during_a_commit_share_the_next_one() -> None:
    store = GateStore()
    async with open_controller(runtime=InMemoryRuntime(), store=store) as ctl:
        before = len(store.commits)
        seq = ctl.seq
        errors = await _queue_behind_a_held_commit(
            ctl,
            store,
            lambda: ctl.create_endpoint("first"),
            [lambda name=name: ctl.create_endpoint(name) for name in ("x", "y", "z")],
        )
        assert errors == [None, None, None]
        # One commit for the first command, one for the three that waited behind it.
        commits = store.commits[before:]
        assert [keys for _, keys in commits] == [
            {"endpoint/first", "meta"},
            {"endpoint/x", "endpoint/y", "endpoint/z", "meta"},
        ]
        assert [s for s, _ in commits] == [seq + 1, seq + 2] and ctl.seq == seq + 2
        assert set(ctl.state.endpoints) == {"first", "x", "y", "z"}


async def test_a_command_rejected_by_step_is_rejected_alone() -> None:
    store = GateStore()
    async with open_controller(runtime=InMemoryRuntime(), store=store) as ctl:
        errors = await _queue_behind_a_held_commit(
            ctl,
            store,
            lambda: ctl.create_endpoint("first"),
            [
                lambda: ctl.create_endpoint("x"),
                lambda: ctl.delete_endpoint("nope"),
                lambda: ctl.create_endpoint("y"),
            ],
        )
        assert errors[0] is None and errors[2] is None
        assert isinstance(errors[1], EndpointNotFound)
        assert store.commits[-1][1] == {"endpoint/x", "endpoint/y", "meta"}
        assert set(ctl.state.endpoints) == {"first", "x", "y"}


async def test_a_later_command_in_a_batch_sees_the_earlier_ones() -> None:
    store = GateStore()
    async with open_controller(runtime=InMemoryRuntime(), store=store) as ctl:
        errors = await _queue_behind_a_held_commit(
            ctl,
            store,
            lambda: ctl.create_endpoint("first"),
            [
                lambda: ctl.create_backend("a", ECHO, num_replicas=2),
                lambda: ctl.create_endpoint("api"),
                lambda: ctl.set_traffic("api", {"a": 1.0}),  # needs both before it
            ],
        )
        assert errors == [None, None, None]
        assert dict(ctl.state.endpoints["api"].traffic) == {"a": 1.0}
        assert set(ctl.routing_table.backends["a"].replicas) == {"a#0", "a#1"}


async def test_a_failed_group_commit_fails_every_command_in_it_and_runs_no_effect() -> None:
    store, runtime = GateStore(), InMemoryRuntime()
    async with open_controller(runtime=runtime, store=store) as ctl:
        seq, table = ctl.seq, ctl.routing_table
        store.fail = 1
        store.hold()
        results: list[BaseException | None] = []

        async def attempt(call: object) -> None:
            try:
                await call()  # type: ignore[operator]
                results.append(None)
            except CheckpointError as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, lambda: ctl.create_backend("b", ECHO, num_replicas=2))
            await store.wait_entered()  # the first batch is at the gate, and will fail
            queued = ctl.queued
            nursery.start_soon(attempt, lambda: ctl.create_backend("c", ECHO, num_replicas=1))
            nursery.start_soon(attempt, lambda: ctl.create_endpoint("z"))
            with trio.fail_after(10):
                while ctl.queued < queued + 2:
                    await trio.sleep(0.001)
            store.fail = 2  # the first batch and the one behind it both fail
            store.gate.set()
        assert len(results) == 3
        assert all(isinstance(r, CheckpointError) for r in results), results
        assert all("not applied" in str(r) for r in results)
        assert ctl.seq == seq and ctl.routing_table is table
        assert dict(ctl.state.backends) == {} and dict(ctl.state.endpoints) == {}
        assert runtime.started == [], "an effect ran after a failed commit"
        await ctl.create_backend("b", ECHO, num_replicas=2)  # the store is back
        assert set(runtime.live) == {"b#0", "b#1"}


async def test_a_restated_command_in_a_failed_group_commit_is_not_acknowledged() -> None:
    """The second copy is a no-op only against the first copy's state, which was never
    committed: acknowledging it would claim a backend that does not exist."""
    store, runtime = GateStore(), InMemoryRuntime()
    async with open_controller(runtime=runtime, store=store) as ctl:
        seq = ctl.seq
        store.fail = 1
        store.hold()
        results: list[BaseException | None] = []

        async def attempt() -> None:
            try:
                await ctl.create_backend("b", ECHO, num_replicas=1)
                results.append(None)
            except CheckpointError as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt)
            await store.wait_entered()
            queued = ctl.queued
            nursery.start_soon(attempt)
            with trio.fail_after(10):
                while ctl.queued < queued + 1:
                    await trio.sleep(0.001)
            store.fail = 2  # the batch at the gate and the one behind it both fail
            store.gate.set()
        assert len(results) == 2
        assert all(isinstance(r, CheckpointError) for r in results), results
        assert ctl.seq == seq and dict(ctl.state.backends) == {}
        assert runtime.started == []


async def test_a_restated_command_batched_with_its_original_fails_with_it() -> None:
    """Both copies queue behind a held commit, so they share the next one; it fails:
    neither copy is acknowledged."""
    store, runtime = GateStore(), InMemoryRuntime()
    async with open_controller(runtime=runtime, store=store) as ctl:
        seq = ctl.seq

        async def first() -> None:
            with pytest.raises(CheckpointError):
                await ctl.create_endpoint("z")

        def create_b() -> object:
            return ctl.create_backend("b", ECHO, num_replicas=1)

        store.fail = 2  # the held batch and the one behind it
        errors = await _queue_behind_a_held_commit(ctl, store, first, [create_b, create_b])
        assert all(isinstance(e, CheckpointError) for e in errors), errors
        assert ctl.seq == seq and dict(ctl.state.backends) == {}
        assert runtime.started == []


async def test_commits_run_on_one_long_lived_writer_thread() -> None:
    store = GateStore()
    async with open_controller(runtime=InMemoryRuntime(), store=store, name="w") as ctl:
        for name in ("a", "b", "c"):
            await ctl.create_endpoint(name)
        await ctl.create_backend("x", ECHO, num_replicas=3)
    assert store.threads == {"servecore-writer-w"}
    assert threading.current_thread().name not in store.threads


async def test_save_in_thread_false_commits_on_the_trio_thread() -> None:
    store = GateStore()
    async with open_controller(runtime=InMemoryRuntime(), store=store, save_in_thread=False) as c:
        await c.create_endpoint("a")
    assert store.threads == {threading.current_thread().name}


@pytest.mark.parametrize("n", [50])
async def test_a_deploy_commits_far_fewer_times_than_it_has_replicas(n: int) -> None:
    store = GateStore()
    async with open_controller(runtime=InMemoryRuntime(), store=store) as ctl:
        before = len(store.commits)
        await ctl.create_backend("a", ECHO, num_replicas=n)
        commits = store.commits[before:]
    # The command's commit, then the starts' events, many to a commit.
    assert len(commits) < n // 2
    assert sum(len(keys) - 1 for _, keys in commits) >= 2 * n  # each replica twice
