"""store_call_timeout_s: a store call that hangs fails its commands in time, typed, and
what the store answers later is heeded (docs/design.md §3)."""

from __future__ import annotations

import pytest
import trio

import servecore
from servecore import (
    CheckpointError,
    CheckpointOutcomeUnknown,
    FileStore,
    InvalidConfig,
    StoreLocked,
    StoreUnresponsive,
    open_controller,
)
from servecore.testing import HangingStore, InMemoryRuntime

ECHO = "servecore.testing.targets:Echo"
QUIET = {"resync_interval_s": None, "autoscale_interval_s": None}
#: A guard against hanging for ever, not a timing.
GUARD_S = 60


async def _wait_hanging(store: HangingStore) -> None:
    while not store.hanging:
        await trio.sleep(0.01)


async def test_a_hung_commit_fails_typed_and_changes_nothing() -> None:
    store, runtime = HangingStore(), InMemoryRuntime()
    async with open_controller(
        runtime=runtime, store=store, store_call_timeout_s=0.2, **QUIET
    ) as ctl:
        await ctl.create_endpoint("e")
        state, seq = ctl.state, ctl.seq
        store.hang()
        with trio.fail_after(GUARD_S), pytest.raises(StoreUnresponsive) as info:
            await ctl.create_backend("a", ECHO, num_replicas=2)
        error = info.value
        assert isinstance(error, CheckpointOutcomeUnknown) and isinstance(error, CheckpointError)
        assert (error.where, error.call, error.timeout_s, error.seq) == (
            store.where,
            "commit",
            0.2,
            seq + 1,
        )
        text = str(error)
        assert store.where in text and "store_call_timeout_s" in text and "0.2s" in text
        assert "may still land" in text
        assert ctl.state is state and ctl.seq == seq and runtime.started == []
        store.release(land=False)
        await ctl.create_endpoint("f")  # the store answers again: commands work
        assert set(ctl.state.endpoints) == {"e", "f"} and "a" not in ctl.state.backends


async def test_a_commit_that_lands_late_is_adopted_and_carried_out() -> None:
    store, runtime = HangingStore(), InMemoryRuntime()
    async with open_controller(
        runtime=runtime, store=store, store_call_timeout_s=0.2, **QUIET
    ) as ctl:
        store.hang()
        with trio.fail_after(GUARD_S), pytest.raises(StoreUnresponsive):
            await ctl.create_backend("a", ECHO, num_replicas=2)
        assert "a" not in ctl.state.backends
        store.release(land=True)
        with trio.fail_after(GUARD_S):
            await ctl.create_endpoint("e")  # heeds the late answer first
            await ctl.settle()
        assert "a" in ctl.state.backends
        assert sorted(runtime.live) == ["a#0", "a#1"]
        assert {r.status.name for r in ctl.state.replicas.values()} == {"RUNNING"}
    async with open_controller(runtime=runtime, store=store, **QUIET) as again:
        assert set(again.state.backends) == {"a"} and set(again.state.endpoints) == {"e"}


async def test_commands_during_the_hang_wait_then_fail_unsent() -> None:
    store = HangingStore()
    async with open_controller(
        runtime=InMemoryRuntime(), store=store, store_call_timeout_s=0.2, **QUIET
    ) as ctl:
        store.hang()
        with trio.fail_after(GUARD_S), pytest.raises(StoreUnresponsive):
            await ctl.create_endpoint("e")
        calls = store.calls
        with trio.fail_after(GUARD_S), pytest.raises(CheckpointError) as info:
            await ctl.create_endpoint("f")
        assert not isinstance(info.value, CheckpointOutcomeUnknown)  # it was never sent
        text = str(info.value)
        assert "has still not answered commit of checkpoint" in text
        assert "was not applied" in text and "store_call_timeout_s" in text
        assert store.calls == calls
        store.release(land=False)
        await ctl.create_endpoint("f")
        assert set(ctl.state.endpoints) == {"f"}


async def test_a_hung_load_fails_the_open_and_the_store_is_closed_once_it_answers(
    tmp_path,
) -> None:
    store = HangingStore(FileStore(tmp_path / "state"))
    store.hang()
    with trio.fail_after(GUARD_S), pytest.raises(StoreUnresponsive) as info:
        async with open_controller(store=store, store_call_timeout_s=0.2, **QUIET):
            pass
    assert "did not answer load() within 0.2s" in str(info.value)
    assert "nothing was written" in str(info.value)
    # The hung call still runs: the store stays locked until it returns, then closes.
    with pytest.raises(StoreLocked):
        FileStore(tmp_path / "state").open()
    store.release()
    assert await trio.to_thread.run_sync(store.wait_idle, GUARD_S)
    async with open_controller(store=FileStore(tmp_path / "state"), **QUIET) as ctl:
        await ctl.create_endpoint("e")


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "5", None])
async def test_a_bad_store_call_timeout_is_refused(bad: object) -> None:
    with pytest.raises(InvalidConfig) as info:
        async with open_controller(store_call_timeout_s=bad):  # type: ignore[arg-type]
            pass
    assert info.value.field == "store_call_timeout_s"


def test_the_sync_api_takes_it_too() -> None:
    store = HangingStore()
    with servecore.start(store=store, store_call_timeout_s=0.2, **QUIET) as ctl:
        store.hang()
        with pytest.raises(StoreUnresponsive):
            ctl.create_endpoint("e")
        store.release(land=False)
        ctl.create_endpoint("f")
        assert set(ctl.state.endpoints) == {"f"}
