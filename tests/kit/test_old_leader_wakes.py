"""The kit's "old leader wakes up" fault: a leader paused with a start in flight, a
standby that takes the lease and the runtime over, then the leader resumes.

Its late start must not bring back a replica the new leader already stopped (a
replica nobody's checkpoint knows): the runtime refuses the stale epoch, and the old
leader steps down.
"""

from __future__ import annotations

import pytest
import trio

import servecore
from servecore import RuntimeFenced
from servecore.testing import InMemoryRuntime, LeasedMemoryStore

ECHO = "servecore.testing.targets:Echo"


async def test_a_start_the_old_leader_resumes_is_refused_and_it_steps_down() -> None:
    old_store = LeasedMemoryStore()
    old_runtime = InMemoryRuntime()
    old_runtime.paused = trio.Event()  # it freezes with its effects half done
    quiet = {"resync_interval_s": None, "autoscale_interval_s": None}
    async with servecore.open_controller(runtime=old_runtime, store=old_store, **quiet) as old:
        failures: list[BaseException] = []

        async def create() -> None:
            try:
                await old.create_backend("a", ECHO)
            except Exception as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create)
            while "a#0" not in old.state.replicas:  # committed STARTING, start held
                await trio.sleep(0)

            new_store = old_store.take_over()
            async with servecore.open_controller(
                runtime=old_runtime.view(), store=new_store, **quiet
            ) as new:
                assert new.state.replicas["a#0"].status.name == "RUNNING"  # it started it
                await new.delete_backend("a")
                assert old_runtime.live == {}

                old_runtime.paused.set()  # the old leader wakes up
        assert len(failures) == 1 and isinstance(failures[0], RuntimeFenced)
        assert old_runtime.live == {}, "the old leader brought back a replica nobody knows"
        assert old.stepped_down is not None
        with pytest.raises(servecore.LeaseLost):
            await old.create_endpoint("late")
        with pytest.raises(RuntimeFenced):
            await old_runtime.list_replicas()
    assert old_runtime.started == ["a#0"] and old_runtime.stopped == ["a#0"]


async def test_without_a_lease_the_in_memory_runtime_fences_nothing() -> None:
    runtime = InMemoryRuntime()
    async with servecore.open_controller(runtime=runtime) as first:
        await first.create_backend("a", ECHO)
    async with servecore.open_controller(runtime=runtime.view()) as second:
        assert second.state.replicas == {}  # a new memory store: a#0 is an orphan
    assert runtime.live == {}
