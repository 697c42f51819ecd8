"""The trio controller: persist first, lock only around step+save+dispatch, recover."""

from __future__ import annotations

import pytest
import trio

import servecore
from servecore import (
    BackendStartError,
    BackendStatus,
    CheckpointError,
    InvalidConfig,
    MemoryStore,
    ReplicaStatus,
    SQLiteStore,
    StartReplica,
    StoreLocked,
    open_controller,
)
from servecore.testing import FaultyStore, InMemoryRuntime

ECHO = "servecore.testing.targets:Echo"


class GatedRuntime(InMemoryRuntime):
    """Starts of backend ``slow`` wait until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.waiting = trio.Event()

    async def start_replica(self, effect: StartReplica) -> None:
        if effect.backend == "slow":
            self.waiting.set()
            await self.gate.wait()
        await super().start_replica(effect)


async def test_a_slow_start_blocks_no_other_command() -> None:
    runtime = GatedRuntime()
    async with open_controller(runtime=runtime, store=MemoryStore()) as ctl:
        done = trio.Event()

        async def create_slow() -> None:
            await ctl.create_backend("slow", ECHO)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create_slow)
            await runtime.waiting.wait()
            # The slow constructor is running; other commands and queries go on.
            assert ctl.state.replicas["slow#0"].status is ReplicaStatus.STARTING
            await ctl.create_backend("fast", ECHO, num_replicas=2)
            await ctl.create_endpoint("api", route="/api")
            assert ctl.state.backends["fast"].status is BackendStatus.HEALTHY
            assert not done.is_set()
            runtime.gate.set()
        assert ctl.state.backends["slow"].status is BackendStatus.HEALTHY


async def test_commands_return_once_replicas_run_and_stop() -> None:
    runtime = InMemoryRuntime()
    async with open_controller(runtime=runtime) as ctl:
        state = await ctl.create_backend("a", ECHO, num_replicas=3)
        assert {r.status for r in state.replicas.values()} == {ReplicaStatus.RUNNING}
        assert set(runtime.live) == {"a#0", "a#1", "a#2"}
        state = await ctl.update_backend_config("a", num_replicas=1)
        assert set(state.replicas) == {"a#0"} and set(runtime.live) == {"a#0"}
        assert ctl.routing_table.backends["a"].replicas == ("a#0",)


async def test_backend_start_error_carries_the_replicas_own_error() -> None:
    runtime = InMemoryRuntime()
    async with open_controller(runtime=runtime) as ctl:
        with pytest.raises(BackendStartError) as info:
            await ctl.create_backend("bad", "servecore.testing.targets:FailingInit")
        assert "constructor failed on purpose" in str(info.value)
        assert info.value.tag == "bad"
        backend = ctl.state.backends["bad"]
        assert backend.status is BackendStatus.FAILED
        assert "constructor failed on purpose" in (backend.last_error or "")
        assert not runtime.live
        # Fixing the config retries; deleting works too.
        runtime.fail_starts("bad", times=None)
        runtime.heal("bad")
        with pytest.raises(BackendStartError):
            await ctl.update_backend_config("bad", num_replicas=2)
        await ctl.delete_backend("bad")
        assert "bad" not in ctl.state.backends


async def test_transient_start_failures_are_retried_with_new_tags() -> None:
    runtime = InMemoryRuntime()
    runtime.fail_starts("a", "flaky", times=2)
    async with open_controller(runtime=runtime) as ctl:
        state = await ctl.create_backend("a", ECHO)
        assert state.backends["a"].status is BackendStatus.HEALTHY
        assert list(state.replicas) == ["a#2"]  # a#0, a#1 failed; tags never reused


async def test_a_dead_replica_is_replaced_through_a_saved_event() -> None:
    runtime = InMemoryRuntime()
    async with open_controller(runtime=runtime) as ctl:
        await ctl.create_backend("a", ECHO, num_replicas=2)
        seq = ctl.seq
        runtime.kill("a#0")
        await ctl.settle()
        assert set(ctl.state.replicas) == {"a#1", "a#2"}
        assert set(runtime.live) == {"a#1", "a#2"}
        assert ctl.seq > seq  # the death and the replacement were checkpointed


async def test_a_failed_save_changes_nothing_and_starts_nothing() -> None:
    runtime = InMemoryRuntime()
    store = FaultyStore()
    async with open_controller(runtime=runtime, store=store) as ctl:
        before, seq, table = ctl.state, ctl.seq, ctl.routing_table
        store.fail_next()
        with pytest.raises(CheckpointError, match="not applied"):
            await ctl.create_backend("a", ECHO, num_replicas=2)
        assert ctl.state is before and ctl.seq == seq and ctl.routing_table is table
        assert not runtime.live and not runtime.started
        await ctl.create_backend("a", ECHO, num_replicas=2)  # the retry lands
        assert len(runtime.live) == 2


async def test_invalid_update_raises_and_changes_nothing() -> None:
    async with open_controller(runtime=InMemoryRuntime()) as ctl:
        await ctl.create_backend("a", ECHO)
        before = ctl.state
        with pytest.raises(InvalidConfig, match="num_replica"):
            await ctl.update_backend_config("a", num_replica=2)
        with pytest.raises(InvalidConfig, match="max_batch_size"):
            await ctl.update_backend_config("a", max_batch_size=0)
        assert ctl.state is before


async def test_command_errors_escape_the_block_unwrapped() -> None:
    with pytest.raises(servecore.BackendNotFound):
        async with open_controller(runtime=InMemoryRuntime()) as ctl:
            await ctl.delete_backend("nope")


async def test_reopen_finds_live_replicas_and_replaces_lost_ones(tmp_path) -> None:
    runtime = InMemoryRuntime()
    store = SQLiteStore(tmp_path / "state.db")
    async with open_controller(runtime=runtime, store=store) as ctl:
        await ctl.create_backend("a", ECHO, num_replicas=2)
        await ctl.create_endpoint("api")
        await ctl.set_traffic("api", {"a": 1.0})
        seq = ctl.seq
    runtime.live.pop("a#1")  # lost while no controller ran
    async with open_controller(runtime=runtime, store=store) as ctl:
        assert ctl.seq > seq
        assert set(ctl.state.replicas) == {"a#0", "a#2"}
        assert set(ctl.routing_table.backends["a"].replicas) == {"a#0", "a#2"}
        assert dict(ctl.state.endpoints["api"].traffic) == {"a": 1.0}


async def test_a_second_controller_on_the_same_store_fails_at_once(tmp_path) -> None:
    path = tmp_path / "state.db"
    async with open_controller(runtime=InMemoryRuntime(), store=SQLiteStore(path)):
        with pytest.raises(StoreLocked) as info:
            async with open_controller(runtime=InMemoryRuntime(), store=SQLiteStore(path)):
                pass  # pragma: no cover
        assert str(path) in str(info.value)
    async with open_controller(runtime=InMemoryRuntime(), store=SQLiteStore(path)):
        pass  # released on close


async def test_a_callable_is_a_save_only_checkpoint_callback() -> None:
    saved: list[bytes] = []
    async with open_controller(runtime=InMemoryRuntime(), store=saved.append) as ctl:
        await ctl.create_endpoint("api")
    assert saved and b'"api"' in saved[-1]


async def test_saving_on_the_trio_thread_keeps_the_same_promises() -> None:
    runtime = InMemoryRuntime()
    store = FaultyStore()
    async with open_controller(runtime=runtime, store=store, save_in_thread=False) as ctl:
        await ctl.create_backend("a", ECHO, num_replicas=2)
        before, seq = ctl.state, ctl.seq
        store.fail_next()
        with pytest.raises(CheckpointError):
            await ctl.update_backend_config("a", num_replicas=3)
        assert ctl.state is before and ctl.seq == seq and len(runtime.live) == 2
        await ctl.update_backend_config("a", num_replicas=3)
        assert len(runtime.live) == 3


async def test_a_new_user_config_rolls_onto_new_replicas() -> None:
    runtime = InMemoryRuntime()
    async with open_controller(runtime=runtime) as ctl:
        await ctl.create_backend("a", ECHO, num_replicas=2, user_config={"v": 1})
        state = await ctl.update_backend_config("a", user_config={"v": 2})
        assert set(state.replicas) == {"a#2", "a#3"} == set(runtime.live)
        assert {e.config.user_config["v"] for e in runtime.live.values()} == {2}
        assert state.backends["a"].status is BackendStatus.HEALTHY
        # Scaling alone keeps the replicas it has.
        state = await ctl.update_backend_config("a", num_replicas=3)
        assert {"a#2", "a#3"} < set(state.replicas)


async def test_concurrent_partial_updates_lose_no_change() -> None:
    async with open_controller(runtime=InMemoryRuntime()) as ctl:
        await ctl.create_backend("a", ECHO)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: ctl.update_backend_config("a", num_replicas=3))
            nursery.start_soon(lambda: ctl.update_backend_config("a", max_concurrent_queries=2))
        config = ctl.state.backends["a"].config
        assert (config.num_replicas, config.max_concurrent_queries) == (3, 2)
