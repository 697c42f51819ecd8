"""Ownership of a subprocess runtime directory follows the store's lease epoch.

A runtime opened with a newer epoch of the same store takes the directory over even
while the old owner still holds its lock (a leader frozen past its lease), adopts the
replicas, and the old runtime refuses from then on to start, stop, kill or adopt
anything (``RuntimeFenced``); its controller steps down. Both runtimes live in this
process here (a lock held by one open file is held against the other); the same
with real processes and PostgreSQL is tests/stores/test_postgres_failover.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import servecore
from servecore import (
    LeaseLost,
    MemoryStore,
    RuntimeDirectoryLocked,
    RuntimeFenced,
    SteppedDown,
)
from servecore.runtimes import Query
from servecore.runtimes.subprocess import SubprocessRuntime
from servecore.testing import InMemoryRuntime
from subprocess_helpers import gone, kill_everything_under, replica_effect

pytestmark = pytest.mark.slow

STORE = "postgres:db:5432/servecore#prod"


@pytest.fixture
def rt_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "rt"
    kill_everything_under(tmp_path)


async def open_runtime(
    directory: Path, epoch: int | None, store_id: str | None = STORE
) -> SubprocessRuntime:
    rt = SubprocessRuntime(directory)
    await rt.open(namespace="test", report=lambda event: None, store_id=store_id, epoch=epoch)
    return rt


async def test_a_newer_epoch_takes_over_and_the_old_runtime_can_neither_stop_kill_nor_adopt(
    rt_dir: Path,
) -> None:
    old = await open_runtime(rt_dir, epoch=1)
    new: SubprocessRuntime | None = None
    try:
        await old.start_replica(replica_effect("echo#1", "Echo"))
        pid = old.pid("echo#1")
        assert pid is not None
        # The old owner is still open, holding the directory's lock: frozen, say.
        new = await open_runtime(rt_dir, epoch=2)
        assert await new.list_replicas() == {"echo#1"}
        assert new.pid("echo#1") == pid  # adopted, not restarted

        with pytest.raises(RuntimeFenced) as info:
            await old.stop_replica("echo#1", 1.0)
        assert info.value.epoch == 1 and info.value.newer_epoch == 2
        assert "epoch 2" in str(info.value) and "close this controller" in str(info.value)
        with pytest.raises(RuntimeFenced):
            old.kill("echo#1")
        with pytest.raises(RuntimeFenced):
            await old.list_replicas()
        with pytest.raises(RuntimeFenced):
            await old.start_replica(replica_effect("echo#2", "Echo"))
        with pytest.raises(RuntimeFenced):
            await old.start_replica(replica_effect("echo#1", "Echo"))  # its own, adopted
        assert not gone(pid)
        assert await new.call("echo#1", [Query(args=("still here",), kwargs={})]) == ["still here"]
        await old.close()  # the frozen owner goes; the new one carries on
        assert await new.list_replicas() == {"echo#1"}
        await new.stop_replica("echo#1", 5.0)
        assert gone(pid)
    finally:
        await old.close()
        if new is not None:
            await new.close()


async def test_an_older_epoch_is_refused_and_the_newest_owner_keeps_others_out(
    rt_dir: Path,
) -> None:
    first = await open_runtime(rt_dir, epoch=3)
    try:
        for epoch in (1, 2):  # a stale leader opening late
            with pytest.raises(RuntimeFenced):
                await open_runtime(rt_dir, epoch=epoch)
        with pytest.raises(RuntimeDirectoryLocked):  # the same epoch is the owner's
            await open_runtime(rt_dir, epoch=3)
        with pytest.raises(RuntimeDirectoryLocked):  # no lease: as before, locked
            await open_runtime(rt_dir, epoch=None)
        with pytest.raises(RuntimeDirectoryLocked):  # another store's epochs mean nothing
            await open_runtime(rt_dir, epoch=9, store_id="postgres:other:5432/x#prod")
    finally:
        await first.close()
    # Closed: the fence still remembers epoch 3, so a stale leader stays out.
    with pytest.raises(RuntimeFenced):
        await open_runtime(rt_dir, epoch=2)
    again = await open_runtime(rt_dir, epoch=4)
    await again.close()


class LeasedStore(MemoryStore):
    """A memory store that says it holds a lease at ``epoch`` (the controller passes
    it to the runtime), with the hooks a controller looks for."""

    lease_s = 30.0

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch
        self.holder = f"leader-{epoch}"

    @property
    def store_id(self) -> str:
        return STORE

    def heartbeat(self) -> None:
        pass

    def lease_lost(self) -> LeaseLost | None:
        return None  # it has not noticed yet: the runtime is the first to say


async def test_a_controller_whose_runtime_was_taken_over_steps_down(rt_dir: Path) -> None:
    told: list[SteppedDown] = []
    async with servecore.open_controller(
        runtime=SubprocessRuntime(rt_dir),
        store=LeasedStore(epoch=1),
        name="test",
        on_step_down=told.append,
        resync_interval_s=None,
        autoscale_interval_s=None,
    ) as ctl:
        await ctl.create_backend("echo", "subprocess_targets:Echo", num_replicas=1)
        (pid,) = [ctl.runtime.pid(t) for t in ctl.state.replicas]  # type: ignore[attr-defined]
        newer = await open_runtime(rt_dir, epoch=2, store_id=STORE)
        try:
            assert await newer.list_replicas() == {"echo#0"}
            with pytest.raises(RuntimeFenced):
                await ctl.set_backend_config("echo", servecore.BackendConfig(num_replicas=0))
            stepped = ctl.stepped_down
            assert stepped is not None and told == [stepped]
            assert stepped.lease_lost.new_epoch == 2
            assert await ctl.resync() is False
            assert newer.pid("echo#0") == pid and not gone(pid)
        finally:
            await newer.stop_replica("echo#0", 5.0)
            await newer.close()


class HangingListRuntime(InMemoryRuntime):
    """A runtime whose listing never answers once ``hang`` is set (a lost node)."""

    hang = False

    async def list_replicas(self) -> frozenset[str]:
        if self.hang:
            await trio.sleep_forever()
        return await super().list_replicas()


async def test_a_listing_that_never_answers_fails_recovery_and_skips_a_resync() -> None:
    runtime = HangingListRuntime()
    runtime.hang = True
    with trio.fail_after(30), pytest.raises(servecore.RuntimeUnresponsive) as info:
        async with servecore.open_controller(runtime=runtime, runtime_call_timeout_s=0.2):
            pass
    assert "list_replicas" in str(info.value) and "recovery" in str(info.value)
    assert "runtime_call_timeout_s" in str(info.value)

    runtime = HangingListRuntime()
    async with servecore.open_controller(
        runtime=runtime, runtime_call_timeout_s=0.2, resync_interval_s=None
    ) as ctl:
        runtime.hang = True
        with trio.fail_after(30):
            assert await ctl.resync() is False
        await ctl.create_endpoint("still-serving")


def test_runtime_call_timeout_s_must_be_a_positive_number() -> None:
    for bad in (0, -1.0, float("inf"), "30", True):
        with pytest.raises(servecore.InvalidConfig, match="runtime_call_timeout_s"):
            servecore.start(runtime_call_timeout_s=bad)
