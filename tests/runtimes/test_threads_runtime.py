"""The threads runtime on its own: the Runtime protocol, stopping, and dying.

No wall-clock thresholds: tests wait on gates and events, with generous bounded waits
only so that a bug fails the test instead of hanging it.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

import async_targets
import servecore
import stream_targets
import targets
from opened_runtime import Opened
from servecore._core.errors import InvalidConfig, InvalidTarget, ReplicaDiedError
from servecore._core.transitions import BackendConfig, StartReplica, target_path
from servecore._core.values import backend_of
from servecore.runtimes import Query, Runtime, resolve_runtime
from servecore.runtimes.threads import ThreadRuntime
from servecore.runtimes.toolkit import BatchSizeError, batch, is_batch
from servecore.testing import check_runtime

WAIT = 10.0  # seconds; only ever a guard against hanging


def effect(tag: str, target: Any, *init_args: Any, **config: Any) -> StartReplica:
    return StartReplica(
        tag=tag,
        backend=backend_of(tag),
        target=target_path(target),
        init_args=tuple(init_args),
        init_kwargs={},
        config=BackendConfig(**config),
    )


def q(*args: Any, **kwargs: Any) -> Query:
    return Query(args=args, kwargs=kwargs)


@pytest.fixture
async def rt() -> AsyncIterator[Opened]:
    runtime = ThreadRuntime(health_check_period_s=0.01)
    opened = Opened(runtime, wait_s=WAIT)
    await runtime.open(namespace="t", report=opened.events.append)
    try:
        yield opened
    finally:
        with trio.CancelScope(shield=True):
            await runtime.close()


async def wait_entered(gate: targets.Gate, n: int = 1) -> None:
    for _ in range(n):
        ok = await trio.to_thread.run_sync(gate.entered.acquire, True, WAIT)
        assert ok, "the replica never received the query"


# -- protocol ---------------------------------------------------------------------------


def test_conforms_to_the_runtime_protocol() -> None:
    check_runtime(ThreadRuntime, kill=lambda runtime, tag: runtime.kill(tag, "test"))


def test_registered_under_threads() -> None:
    runtime = resolve_runtime("threads", health_check_period_s=1.0)
    assert isinstance(runtime, ThreadRuntime)
    assert isinstance(runtime, Runtime)
    with pytest.raises(ValueError, match="health_check_period_s"):
        ThreadRuntime(health_check_period_s=0)


async def test_start_is_idempotent_and_listed(rt: Opened) -> None:
    e = effect("id#0", targets.Identity)
    await rt.runtime.start_replica(e)
    (first,) = await rt.runtime.call("id#0", [q("x")])
    await rt.runtime.start_replica(e)
    (again,) = await rt.runtime.call("id#0", [q("x")])
    assert first == again  # the same instance: not started twice
    assert await rt.runtime.list_replicas() == {"id#0"}
    await rt.runtime.stop_replica("id#0", 1.0)
    assert await rt.runtime.list_replicas() == frozenset()
    await rt.runtime.stop_replica("id#0", 1.0)  # idempotent
    await rt.runtime.stop_replica("never#1", 1.0)


async def test_concurrent_starts_of_one_tag_build_one_instance(rt: Opened) -> None:
    e = effect("id#1", targets.Identity)
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(rt.runtime.start_replica, e)
    answers = {(await rt.runtime.call("id#1", [q(i)]))[0][0] for i in range(5)}
    assert len(answers) == 1


async def test_each_replica_has_its_own_thread(rt: Opened) -> None:
    """A replica stuck in a slow query does not stall another replica."""
    gate = targets.Gate.named("own-thread")
    await rt.runtime.start_replica(effect("slow#0", targets.Gated, "own-thread"))
    await rt.runtime.start_replica(effect("fast#0", targets.Named, "fast"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.runtime.call, "slow#0", [q(1)])
        await wait_entered(gate)
        assert await rt.runtime.call("fast#0", [q(2)]) == [("fast", 2)]
        gate.release.set()


async def test_function_targets_and_keyword_arguments(rt: Opened) -> None:
    await rt.runtime.start_replica(effect("plain#0", targets.plain))
    assert await rt.runtime.call("plain#0", [q(value=5)]) == [5]


async def test_user_exception_keeps_its_type(rt: Opened) -> None:
    await rt.runtime.start_replica(effect("raiser#0", targets.Raiser))
    with pytest.raises(targets.CustomError, match="no such thing: 'k'"):
        await rt.runtime.call("raiser#0", [q("k")])
    # The replica survives its user's exceptions.
    assert "raiser#0" in await rt.runtime.list_replicas()


async def test_user_config_reaches_reconfigure(rt: Opened) -> None:
    await rt.runtime.start_replica(
        effect("conf#0", targets.Configurable, user_config={"threshold": 0.5})
    )
    assert await rt.runtime.call("conf#0", [q()]) == [{"threshold": 0.5}]


# -- start failures -----------------------------------------------------------------------


async def test_constructor_failure_raises_the_users_error(rt: Opened) -> None:
    with pytest.raises(ValueError, match="model weights not found at /nowhere"):
        await rt.runtime.start_replica(effect("broken#0", targets.FailingInit))
    assert await rt.runtime.list_replicas() == frozenset()
    assert not rt.events  # a failed start is the start's answer, not a death


async def test_import_failure_raises(rt: Opened) -> None:
    bad = effect("imp#0", targets.plain)
    bad = StartReplica(
        tag=bad.tag,
        backend=bad.backend,
        target="no_such_module_xyz:thing",
        init_args=(),
        init_kwargs={},
        config=bad.config,
    )
    with pytest.raises(ModuleNotFoundError, match="no_such_module_xyz"):
        await rt.runtime.start_replica(bad)


async def test_unknown_runtime_options_are_rejected(rt: Opened) -> None:
    with pytest.raises(InvalidConfig, match="num_gpus"):
        await rt.runtime.start_replica(
            effect("opt#0", targets.plain, runtime_options={"num_gpus": 1})
        )


async def test_batching_needs_a_batch_target(rt: Opened) -> None:
    with pytest.raises(InvalidConfig, match=r"not marked @servecore\.batch"):
        await rt.runtime.start_replica(effect("nb#0", targets.plain, max_batch_size=4))
    await rt.runtime.start_replica(effect("b#0", targets.double_all, max_batch_size=4))


async def test_function_with_init_args_is_rejected_and_async_generators_stream(
    rt: Opened,
) -> None:
    with pytest.raises(TypeError, match="takes no init_args"):
        await rt.runtime.start_replica(effect("fa#0", targets.plain, 1))
    await rt.runtime.start_replica(effect("ag#0", async_targets.async_stream))
    assert [x async for x in await rt.runtime.stream("ag#0", q(5))] == [5]


# -- async targets ------------------------------------------------------------------------


async def test_async_function_and_async_class_answer(rt: Opened) -> None:
    await rt.runtime.start_replica(effect("af#0", targets.async_target))
    assert await rt.runtime.call("af#0", [q(41)]) == [41]
    await rt.runtime.start_replica(effect("ae#0", async_targets.async_echo))
    assert await rt.runtime.call("ae#0", [q(value="hi")]) == ["hi"]
    await rt.runtime.start_replica(effect("ac#0", async_targets.Recorder, 0.0))
    ((value, start, end),) = await rt.runtime.call("ac#0", [q(7)])
    assert value == 7 and start <= end
    # The constructor and the queries share the replica's one loop, on its own thread.
    (where,) = await rt.runtime.call("ac#0", [q("where")])
    assert where[0] is True and where[1].startswith("servecore-loop-")


async def _overlap(rt: Opened, tag: str, n: int) -> list[tuple[float, float]]:
    answers: list[Any] = []

    async def one(i: int) -> None:
        answers.extend(await rt.runtime.call(tag, [q(i)]))

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    assert sorted(a[0] for a in answers) == list(range(n))
    return [(start, end) for _, start, end in answers]


async def test_async_queries_overlap_on_one_replica(rt: Opened) -> None:
    await rt.runtime.start_replica(
        effect("ov#0", async_targets.Recorder, 0.2, max_concurrent_queries=8)
    )
    intervals = await _overlap(rt, "ov#0", 8)
    # All eight were awaiting asyncio.sleep at once, as the target's own clock says.
    assert async_targets.peak_overlap(intervals) == 8


async def test_max_concurrent_queries_bounds_the_overlap(rt: Opened) -> None:
    await rt.runtime.start_replica(
        effect("mc#0", async_targets.Recorder, 0.05, max_concurrent_queries=3)
    )
    intervals = await _overlap(rt, "mc#0", 8)
    assert async_targets.peak_overlap(intervals) == 3


async def test_async_batch_target(rt: Opened) -> None:
    await rt.runtime.start_replica(effect("ab#0", async_targets.async_double_all, max_batch_size=4))
    assert await rt.runtime.call("ab#0", [q(1), q(2), q(3)]) == [(2, 3), (4, 3), (6, 3)]


async def test_async_target_raises_the_users_error(rt: Opened) -> None:
    await rt.runtime.start_replica(effect("ax#0", async_targets.async_fail))
    with pytest.raises(LookupError, match="no model named 'm'"):
        await rt.runtime.call("ax#0", [q("m")])
    assert await rt.runtime.list_replicas() == {"ax#0"}  # an error is not a death


async def _cancel_a_hang(call_hang: Any, ask: Any) -> None:
    """Start a query that hangs, wait until the target runs it, cancel the caller, and
    wait until the target recorded its CancelledError."""
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_hang)
            while not await ask("hanging"):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        while await ask("cancelled") != ["hang"]:
            await trio.sleep(0.01)


async def test_a_cancelled_query_cancels_its_task(rt: Opened) -> None:
    await rt.runtime.start_replica(
        effect("cx#0", async_targets.Recorder, 0.0, max_concurrent_queries=4)
    )

    async def ask(what: str) -> Any:
        (answer,) = await rt.runtime.call("cx#0", [q(what)])
        return answer

    async def call_hang() -> None:
        await rt.runtime.call("cx#0", [q("hang")])

    await _cancel_a_hang(call_hang, ask)
    assert (await ask(1))[0] == 1  # the replica serves on after a cancellation


async def test_a_blocking_caller_that_times_out_cancels_its_task(rt: Opened) -> None:
    runtime = rt.runtime
    assert isinstance(runtime, ThreadRuntime)
    await runtime.start_replica(
        effect("bt#0", async_targets.Recorder, 0.0, max_concurrent_queries=4)
    )

    def blocking_hang() -> None:
        with pytest.raises(TimeoutError):
            runtime.call_blocking("bt#0", [q("hang")], timeout_s=0.2)

    await trio.to_thread.run_sync(blocking_hang)
    with trio.fail_after(WAIT):
        while await runtime.call("bt#0", [q("cancelled")]) != [["hang"]]:
            await trio.sleep(0.01)


async def test_stopping_an_async_replica_drains_its_tasks(rt: Opened) -> None:
    await rt.runtime.start_replica(
        effect("sd#0", async_targets.Recorder, 0.05, max_concurrent_queries=4)
    )
    answers: list[Any] = []

    async def one(i: int) -> None:
        answers.extend(await rt.runtime.call("sd#0", [q(i)]))

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)
            await trio.sleep(0)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(rt.runtime.stop_replica, "sd#0", WAIT)
    assert sorted(a[0] for a in answers) == [0, 1, 2, 3]
    assert await rt.runtime.list_replicas() == frozenset()


async def test_killing_an_async_replica_cancels_its_tasks(rt: Opened) -> None:
    runtime = rt.runtime
    assert isinstance(runtime, ThreadRuntime)
    await runtime.start_replica(
        effect("kx#0", async_targets.Recorder, 0.0, max_concurrent_queries=4)
    )
    failed: list[BaseException] = []

    async def call_hang() -> None:
        try:
            await runtime.call("kx#0", [q("hang")])
        except ReplicaDiedError as exc:
            failed.append(exc)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_hang)
            while await runtime.call("kx#0", [q("hanging")]) != [True]:
                await trio.sleep(0.01)
            runtime.kill("kx#0", "test")
    assert len(failed) == 1


# -- batches ------------------------------------------------------------------------------


def test_batch_keeps_the_import_path() -> None:
    assert target_path(targets.double_all) == "targets:double_all"
    assert target_path(targets.BatchRecorder) == "targets:BatchRecorder"
    assert is_batch(targets.double_all)
    assert is_batch(targets.BatchRecorder)
    assert is_batch(targets.BatchRecorder("x"))
    assert is_batch(targets.ShortBatch)
    assert is_batch(targets.ShortBatch())
    assert not is_batch(targets.plain)
    assert not is_batch(targets.Named)
    with pytest.raises(TypeError, match="cannot carry the marker"):
        batch(3)


async def test_a_batch_target_gets_a_list(rt: Opened) -> None:
    await rt.runtime.start_replica(effect("br#0", targets.BatchRecorder, "rt-list"))
    assert await rt.runtime.call("br#0", [q(1), q(2), q(3)]) == [2, 4, 6]
    assert targets.BATCH_SIZES["rt-list"] == [3]


async def test_a_short_batch_fails_with_a_clear_error(rt: Opened) -> None:
    await rt.runtime.start_replica(effect("short#0", targets.ShortBatch))
    with pytest.raises(BatchSizeError, match="was given 3 queries and returned a list of 2"):
        await rt.runtime.call("short#0", [q(1), q(2), q(3)])


# -- stopping -----------------------------------------------------------------------------


async def test_stop_drains_queries_already_queued(rt: Opened) -> None:
    gate = targets.Gate.named("drain")
    await rt.runtime.start_replica(effect("drain#0", targets.Gated, "drain"))
    results: list[Any] = []
    stopped = trio.Event()

    async def query(i: int) -> None:
        results.append((await rt.runtime.call("drain#0", [q(i)]))[0][1])

    async def stop() -> None:
        await rt.runtime.stop_replica("drain#0", WAIT)
        stopped.set()

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(query, i)
        await wait_entered(gate)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(stop)
        await trio.testing.wait_all_tasks_blocked()
        assert not stopped.is_set()  # still draining
        with pytest.raises(ReplicaDiedError, match="stopping"):
            await rt.runtime.call("drain#0", [q("late")])  # no new query once stopping
        gate.release.set()
    assert sorted(results) == [0, 1, 2]
    assert stopped.is_set()
    assert not rt.events  # a stop is not a death


async def test_stop_gives_up_after_the_timeout(rt: Opened) -> None:
    gate = targets.Gate.named("stuck")
    await rt.runtime.start_replica(effect("stuck#0", targets.Gated, "stuck"))
    errors: list[BaseException] = []

    async def query(i: int) -> None:
        try:
            await rt.runtime.call("stuck#0", [q(i)])
        except ReplicaDiedError as exc:
            errors.append(exc)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(query, i)
            await wait_entered(gate)
            with trio.fail_after(WAIT):
                await rt.runtime.stop_replica("stuck#0", 0.05)
        assert len(errors) == 2  # the running and the queued query were abandoned
        assert "did not finish its queries within 0.05s" in str(errors[0])
        assert await rt.runtime.list_replicas() == frozenset()
    finally:
        gate.release.set()


# -- dying --------------------------------------------------------------------------------


async def test_a_failed_health_check_is_a_death(rt: Opened) -> None:
    await rt.runtime.start_replica(effect("mortal#0", targets.Mortal))
    await rt.runtime.call("mortal#0", [q("sicken")])
    died = await rt.died("mortal#0")
    assert "health check failed" in died.reason and "is sick" in died.reason
    assert "mortal#0" not in await rt.runtime.list_replicas()
    with pytest.raises(ReplicaDiedError):
        await rt.runtime.call("mortal#0", [q("after")])


async def test_a_crash_mid_query_gives_replica_died(rt: Opened) -> None:
    await rt.runtime.start_replica(effect("mortal#1", targets.Mortal))
    with pytest.raises(ReplicaDiedError, match="SystemExit"):
        await rt.runtime.call("mortal#1", [q("exit")])
    await rt.died("mortal#1")
    assert "mortal#1" not in await rt.runtime.list_replicas()


async def test_kill_fails_running_and_queued_queries(rt: Opened) -> None:
    gate = targets.Gate.named("kill")
    await rt.runtime.start_replica(effect("k#0", targets.Gated, "kill"))
    errors: list[BaseException] = []

    async def query(i: int) -> None:
        with pytest.raises(ReplicaDiedError) as info:
            await rt.runtime.call("k#0", [q(i)])
        errors.append(info.value)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(query, i)
            await wait_entered(gate)
            rt.runtime.kill("k#0", "pulled the plug")
        assert len(errors) == 3
        assert (await rt.died("k#0")).reason == "pulled the plug"
        # The router may send a query elsewhere only if it never began.
        never_ran = [getattr(e, "retry_safe", False) for e in errors]
        assert sorted(never_ran) == [False, True, True]
    finally:
        gate.release.set()
    # Tags are never reused by the core, but a restart of the same tag must work.
    await rt.runtime.start_replica(effect("k#0", targets.Named, "again"))
    assert await rt.runtime.call("k#0", [q(1)]) == [("again", 1)]


async def test_cancelled_calls_leave_the_runtime_usable(rt: Opened) -> None:
    """Callers that give up (timeouts) must not break later calls (wakers are reused)."""
    gate = targets.Gate.named("cancel")
    await rt.runtime.start_replica(effect("c#0", targets.Gated, "cancel"))
    await rt.runtime.start_replica(effect("n#0", targets.Named, "n"))
    with trio.move_on_after(0.01):
        await rt.runtime.call("c#0", [q("abandoned")])
    gate.release.set()
    for i in range(300):  # more calls than wakers in flight, through reclaimed wakers
        assert await rt.runtime.call("n#0", [q(i)]) == [("n", i)]
    assert (await rt.runtime.call("c#0", [q("later")]))[0][1] == "later"


async def test_many_concurrent_calls_beyond_the_waker_pool(rt: Opened) -> None:
    await rt.runtime.start_replica(effect("many#0", targets.Named, "m"))
    results: list[Any] = []

    async def query(i: int) -> None:
        results.append(await rt.runtime.call("many#0", [q(i)]))

    async with trio.open_nursery() as nursery:
        for i in range(400):
            nursery.start_soon(query, i)
    assert sorted(r[0][1] for r in results) == list(range(400))


async def test_close_stops_every_replica() -> None:
    runtime = ThreadRuntime()
    await runtime.open(namespace="close", report=lambda e: None)
    await runtime.start_replica(effect("a#0", targets.Named, "a"))
    threads = {t.name for t in threading.enumerate()}
    assert "servecore-replica-a#0" in threads
    await runtime.close()
    assert await runtime.list_replicas() == frozenset()
    with pytest.raises(ReplicaDiedError):
        await runtime.call("a#0", [q(1)])


async def test_call_blocking_from_a_host_thread(rt: Opened) -> None:
    """The optional extension sync handles use: no trio on the way."""
    gate = targets.Gate.named("blocking")
    await rt.runtime.start_replica(effect("hb#0", targets.Named, "hb"))
    await rt.runtime.start_replica(effect("hg#0", targets.Gated, "blocking"))
    call = rt.runtime.call_blocking
    assert await trio.to_thread.run_sync(call, "hb#0", [q(1)]) == [("hb", 1)]
    with pytest.raises(targets.CustomError):
        await rt.runtime.start_replica(effect("hr#0", targets.Raiser))
        await trio.to_thread.run_sync(call, "hr#0", [q(1)])
    try:
        with pytest.raises(TimeoutError, match="'hg#0' gave no answer"):
            await trio.to_thread.run_sync(call, "hg#0", [q(1)], 0.01)
    finally:
        gate.release.set()
    await rt.runtime.stop_replica("hb#0", 1.0)
    # A replica that takes no queries runs nothing and says so with None.
    assert await trio.to_thread.run_sync(call, "hb#0", [q(2)]) is None
    assert await trio.to_thread.run_sync(call, "never#0", [q(2)]) is None


# -- async targets through a controller ---------------------------------------------------


async def test_a_controller_serves_an_async_backend_through_handles() -> None:
    async with servecore.open_controller(runtime="threads", name="async-e2e") as ctl:
        await ctl.create_backend("rec", async_targets.Recorder, init_args=(0.0,))
        await ctl.create_endpoint("rec")
        await ctl.set_traffic("rec", {"rec": 1.0})
        handle = ctl.get_handle("rec")
        assert (await handle.call(3))[0] == 3
        with pytest.raises(TimeoutError):
            await handle.options(timeout_s=0.2).call("hang")
        with trio.fail_after(WAIT):
            while await handle.call("cancelled") != ["hang"]:
                await trio.sleep(0.01)


class _SyncOnlyRuntime(ThreadRuntime):
    supports_async_targets = False
    supports_streaming = False


async def test_create_backend_refuses_what_cannot_run() -> None:
    async with servecore.open_controller(runtime=_SyncOnlyRuntime(), name="refuse") as ctl:
        seq = ctl.seq
        with pytest.raises(InvalidTarget, match="streaming is not yet supported"):
            await ctl.create_backend("s", async_targets.async_stream)
        with pytest.raises(InvalidTarget, match="streaming is not yet supported"):
            await ctl.create_backend("s", stream_targets.Counter)
        with pytest.raises(InvalidTarget, match="'threads' or 'subprocess' runtime"):
            await ctl.create_backend("a", async_targets.async_echo)
        with pytest.raises(InvalidTarget, match="is async"):
            await ctl.create_backend("a", "async_targets:Recorder")
        assert ctl.seq == seq and not ctl.state.backends
        await ctl.create_backend("p", targets.plain)  # a plain target still runs
