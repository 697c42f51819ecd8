"""A commit whose answer was lost (CheckpointOutcomeUnknown from the store itself): the
controller asks the store before its next commit whether it landed, adopts and carries
it out if it did, forgets it if not, and never reuses its sequence number
(docs/design.md §3)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import pytest
import trio

from servecore import (
    CheckpointError,
    CheckpointOutcomeUnknown,
    MemoryStore,
    StoreUnresponsive,
    open_controller,
)
from servecore.testing import InMemoryRuntime

ECHO = "servecore.testing.targets:Echo"
QUIET = {"resync_interval_s": None, "autoscale_interval_s": None}
#: A guard against hanging for ever, not a timing.
GUARD_S = 60


class LosingStore:
    """A memory store whose next commit loses its answer: it lands (or not), then raises
    CheckpointOutcomeUnknown, as a database whose connection broke after the write. A
    store that checks sequence numbers, like PostgreSQL, refuses a commit that does not
    follow the one it holds."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.where = "losing memory"
        self.lose: bool | None = None  # None: answer; True: land and lose; False: lose
        self.unsure = 0  # how many committed_seq() calls raise first
        self.asked = 0

    def load(self) -> tuple[int, Mapping[str, bytes]]:
        return self.inner.load()

    def committed_seq(self) -> int:
        self.asked += 1
        if self.unsure:
            self.unsure -= 1
            raise CheckpointError(f"{self.where} cannot be reached")
        return self.inner.seq

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        if seq != self.inner.seq + 1:
            raise CheckpointError(
                f"commit {seq} refused: the store is at {self.inner.seq}; close and reopen"
            )
        lose, self.lose = self.lose, None
        if lose is not False:
            self.inner.commit(seq, puts, deletes)
        if lose is not None:
            raise CheckpointOutcomeUnknown(self.where, seq, "the connection broke")


class LoadOnly:
    """The same, without committed_seq: the controller falls back to load()."""

    def __init__(self) -> None:
        self.losing = LosingStore()
        self.where = self.losing.where
        self.loads = 0

    def load(self) -> tuple[int, Mapping[str, bytes]]:
        self.loads += 1
        return self.losing.load()

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        self.losing.commit(seq, puts, deletes)


async def _lose_a_deploy(ctl, store: LosingStore, runtime: InMemoryRuntime, land: bool) -> None:
    await ctl.create_endpoint("e")
    state, seq = ctl.state, ctl.seq
    store.lose = land
    with trio.fail_after(GUARD_S), pytest.raises(CheckpointOutcomeUnknown) as info:
        await ctl.create_backend("a", ECHO, num_replicas=2)
    assert not isinstance(info.value, StoreUnresponsive)
    assert "asks the store before its next commit" in str(info.value)
    # Nothing is adopted or carried out until the store says.
    assert ctl.state is state and ctl.seq == seq and runtime.started == []


@pytest.mark.parametrize("save_in_thread", [True, False])
async def test_a_lost_commit_that_landed_is_adopted_and_carried_out_once(
    save_in_thread: bool,
) -> None:
    store, runtime = LosingStore(), InMemoryRuntime()
    async with open_controller(
        runtime=runtime, store=store, save_in_thread=save_in_thread, **QUIET
    ) as ctl:
        await _lose_a_deploy(ctl, store, runtime, land=True)
        with trio.fail_after(GUARD_S):
            await ctl.create_endpoint("f")  # asks first, adopts, then commits after it
            await ctl.settle()
        assert store.asked == 1
        assert set(ctl.state.backends) == {"a"} and set(ctl.state.endpoints) == {"e", "f"}
        assert sorted(runtime.started) == ["a#0", "a#1"]  # its effects ran, once
        assert sorted(runtime.live) == ["a#0", "a#1"]
        assert {r.status.name for r in ctl.state.replicas.values()} == {"RUNNING"}
        assert ctl.seq == store.inner.seq
        await ctl.create_endpoint("g")
        assert sorted(runtime.started) == ["a#0", "a#1"]
    async with open_controller(runtime=runtime, store=store, **QUIET) as again:
        assert set(again.state.backends) == {"a"}
        assert set(again.state.endpoints) == {"e", "f", "g"}


async def test_a_lost_commit_that_did_not_land_is_forgotten() -> None:
    store, runtime = LosingStore(), InMemoryRuntime()
    async with open_controller(runtime=runtime, store=store, **QUIET) as ctl:
        await _lose_a_deploy(ctl, store, runtime, land=False)
        with trio.fail_after(GUARD_S):
            await ctl.create_endpoint("f")
            await ctl.settle()
        assert "a" not in ctl.state.backends and set(ctl.state.endpoints) == {"e", "f"}
        assert runtime.started == [] and ctl.seq == store.inner.seq
        await ctl.create_backend("a", ECHO, num_replicas=1)  # sent again, it works
        assert sorted(runtime.live) == ["a#0"]
    async with open_controller(runtime=runtime, store=store, **QUIET) as again:
        assert set(again.state.endpoints) == {"e", "f"}
        assert again.state.backends["a"].config.num_replicas == 1


async def test_while_the_store_cannot_say_commands_fail_unsent_then_work() -> None:
    store, runtime = LosingStore(), InMemoryRuntime()
    async with open_controller(runtime=runtime, store=store, **QUIET) as ctl:
        await _lose_a_deploy(ctl, store, runtime, land=True)
        store.unsure = 1
        seq = store.inner.seq
        with trio.fail_after(GUARD_S), pytest.raises(CheckpointError) as info:
            await ctl.create_endpoint("f")
        assert not isinstance(info.value, CheckpointOutcomeUnknown)  # never sent
        text = str(info.value)
        assert "could not say whether checkpoint" in text and "cannot be reached" in text
        assert "was not applied" in text and store.where in text
        assert store.inner.seq == seq and runtime.started == []
        with trio.fail_after(GUARD_S):
            await ctl.create_endpoint("f")  # asks again: it landed
            await ctl.settle()
        assert set(ctl.state.backends) == {"a"} and set(ctl.state.endpoints) == {"e", "f"}
        assert sorted(runtime.started) == ["a#0", "a#1"]


async def test_the_periodic_resync_heals_it_without_a_command() -> None:
    store, runtime = LosingStore(), InMemoryRuntime()
    async with open_controller(
        runtime=runtime, store=store, resync_interval_s=0.05, autoscale_interval_s=None
    ) as ctl:
        await _lose_a_deploy(ctl, store, runtime, land=True)
        with trio.fail_after(GUARD_S):
            while "a" not in ctl.state.backends:
                await trio.sleep(0.02)
            await ctl.settle()
        assert sorted(runtime.live) == ["a#0", "a#1"] and ctl.seq == store.inner.seq


@pytest.mark.parametrize("land", [True, False])
async def test_a_store_without_committed_seq_is_asked_by_a_load(land: bool) -> None:
    store, runtime = LoadOnly(), InMemoryRuntime()
    async with open_controller(runtime=runtime, store=store, **QUIET) as ctl:
        await _lose_a_deploy(ctl, store.losing, runtime, land=land)
        loads = store.loads
        with trio.fail_after(GUARD_S):
            await ctl.create_endpoint("f")
            await ctl.settle()
        assert store.loads == loads + 1
        assert ("a" in ctl.state.backends) is land
        assert len(runtime.started) == (2 if land else 0)
        assert ctl.seq == store.losing.inner.seq


async def test_a_store_that_moved_on_elsewhere_is_not_built_upon() -> None:
    store, runtime = LosingStore(), InMemoryRuntime()
    async with open_controller(runtime=runtime, store=store, **QUIET) as ctl:
        await _lose_a_deploy(ctl, store, runtime, land=True)
        store.inner.commit(store.inner.seq + 1, {}, [])  # another writer
        with trio.fail_after(GUARD_S), pytest.raises(CheckpointError) as info:
            await ctl.create_endpoint("f")
        text = str(info.value)
        assert "something else writes to it" in text and "reopen" in text
        assert "a" not in ctl.state.backends and runtime.started == []
