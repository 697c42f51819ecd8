"""The router and handles, end to end through the controller and the threads runtime.

No wall-clock thresholds: tests wait on gates and events, with generous bounded waits
only so that a bug fails the test instead of hanging it.
"""

from __future__ import annotations

import collections
import functools
import math
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

import targets
from servecore._controller.controller import Controller, open_controller
from servecore._core.errors import (
    BackpressureError,
    EndpointNotFound,
    NoReplicaError,
    ReplicaDiedError,
)
from servecore._core.transitions import ReplicaStatus
from servecore.router import DEFAULT_MAX_QUEUED_QUERIES, Handle, Router
from servecore.runtimes.threads import ThreadRuntime
from servecore.runtimes.toolkit import BatchSizeError

WAIT = 10.0  # seconds; only ever a guard against hanging


@pytest.fixture
async def ctl() -> AsyncIterator[Controller]:
    runtime = ThreadRuntime(health_check_period_s=0.01)
    async with open_controller(runtime=runtime, name="router-tests") as controller:
        controller.use_router(Router(runtime, rng=random.Random(1234)))
        yield controller


async def serve(ctl: Controller, endpoint: str, traffic: dict[str, float]) -> Handle:
    await ctl.create_endpoint(endpoint)
    await ctl.set_traffic(endpoint, traffic)
    return ctl.get_handle(endpoint)


async def wait_entered(gate: targets.Gate, n: int = 1) -> None:
    for _ in range(n):
        ok = await trio.to_thread.run_sync(gate.entered.acquire, True, WAIT)
        assert ok, "the replica never received the query"


async def eventually(predicate: Any) -> None:
    with trio.fail_after(WAIT):
        while not predicate():
            await trio.sleep(0.005)


# -- traffic ------------------------------------------------------------------------------


async def test_traffic_split_follows_the_weights(ctl: Controller) -> None:
    await ctl.create_backend("v1", targets.Named, init_args=["v1"])
    await ctl.create_backend("v2", targets.Named, init_args=["v2"])
    handle = await serve(ctl, "split", {"v1": 0.9, "v2": 0.1})
    n = 4000
    counts = collections.Counter([(await handle.call(i))[0] for i in range(n)])
    # Binomial(n, 0.1): sd = sqrt(n * 0.1 * 0.9) ~ 19; allow 5 sd (fixed seed anyway).
    sd = math.sqrt(n * 0.1 * 0.9)
    assert abs(counts["v2"] - n * 0.1) < 5 * sd, counts
    assert counts["v1"] + counts["v2"] == n


async def test_a_seeded_router_replays_the_same_split() -> None:
    async def run(seed: int) -> list[str]:
        runtime = ThreadRuntime()
        async with open_controller(runtime=runtime, name=f"seed-{seed}") as c:
            c.use_router(Router(runtime, rng=random.Random(seed)))
            await c.create_backend("a", targets.Named, init_args=["a"])
            await c.create_backend("b", targets.Named, init_args=["b"])
            h = await serve(c, "e", {"a": 0.5, "b": 0.5})
            return [(await h.call(i))[0] for i in range(200)]

    first, second, other = await run(7), await run(7), await run(8)
    assert first == second
    assert first != other


async def test_no_traffic_and_unknown_endpoints_fail_fast(ctl: Controller) -> None:
    await ctl.create_endpoint("idle")
    with pytest.raises(NoReplicaError, match="no traffic"):
        await ctl.get_handle("idle").call(1)
    with pytest.raises(EndpointNotFound, match="'nowhere'"):
        await ctl.get_handle("nowhere").call(1)


# -- shadows ------------------------------------------------------------------------------


async def test_shadow_copies_arrive_and_their_results_are_dropped(ctl: Controller) -> None:
    await ctl.create_backend("live", targets.Named, init_args=["live"])
    await ctl.create_backend("copy", targets.Recorder, init_args=["shadow-all"])
    handle = await serve(ctl, "sh", {"live": 1.0})
    await ctl.set_shadow_traffic("sh", "copy", 1.0)
    for i in range(50):
        assert await handle.call(i) == ("live", i)
    await eventually(lambda: len(targets.records("shadow-all")) == 50)
    assert sorted(targets.records("shadow-all")) == list(range(50))


async def test_shadow_errors_never_reach_the_caller(ctl: Controller) -> None:
    await ctl.create_backend("live", targets.Named, init_args=["live"])
    await ctl.create_backend(
        "bad", targets.Recorder, init_args=["shadow-fail"], init_kwargs={"fail": True}
    )
    handle = await serve(ctl, "shf", {"live": 1.0})
    await ctl.set_shadow_traffic("shf", "bad", 1.0)
    for i in range(30):
        assert await handle.call(i) == ("live", i)
    await eventually(lambda: ctl.router.shadow_failed == 30)
    assert len(targets.records("shadow-fail")) == 30


async def test_a_shadow_proportion_copies_that_share(ctl: Controller) -> None:
    await ctl.create_backend("live", targets.Named, init_args=["live"])
    await ctl.create_backend("copy", targets.Recorder, init_args=["shadow-part"])
    handle = await serve(ctl, "shp", {"live": 1.0})
    await ctl.set_shadow_traffic("shp", "copy", 0.25)
    n = 2000
    for i in range(n):
        await handle.call(i)
    sent = ctl.router.shadow_sent
    await eventually(lambda: len(targets.records("shadow-part")) == sent)
    assert abs(sent - n * 0.25) < 5 * math.sqrt(n * 0.25 * 0.75)


# -- replicas, concurrency, backpressure --------------------------------------------------


async def test_least_outstanding_replica_is_chosen(ctl: Controller) -> None:
    gate = targets.Gate.named("least")
    await ctl.create_backend("g", targets.Gated, init_args=["least"], num_replicas=2)
    handle = await serve(ctl, "least", {"g": 1.0})
    results: list[Any] = []

    async def query(i: int) -> None:
        results.append(await handle.call(i))

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(query, i)
        await wait_entered(gate, 2)  # each replica holds one, the others queue behind
        gate.release.set()
    by_replica = collections.Counter(ordinal for ordinal, _ in results)
    assert sorted(by_replica.values()) == [2, 2]


async def test_backpressure_past_the_queue_bound(ctl: Controller) -> None:
    ctl_router = Router(ctl.runtime, max_queued_queries=2)
    assert Router(ctl.runtime).max_queued_queries == DEFAULT_MAX_QUEUED_QUERIES
    gate = targets.Gate.named("backpressure")
    await ctl.create_backend(
        "g", targets.Gated, init_args=["backpressure"], max_concurrent_queries=1
    )
    await ctl.create_endpoint("bp")
    await ctl.set_traffic("bp", {"g": 1.0})
    # A second router on the same controller's table, with a small queue bound.
    ctl_router.start(ctl._nursery)
    ctl.add_table_listener(ctl_router.update)
    handle = ctl_router.handle("bp")
    results: list[Any] = []

    async def query(i: int) -> None:
        results.append(await handle.call(i))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(query, 0)
            await wait_entered(gate)  # one in flight: the replica is full
            nursery.start_soon(query, 1)
            nursery.start_soon(query, 2)
            await trio.testing.wait_all_tasks_blocked()  # two wait in the queue
            with pytest.raises(BackpressureError) as info:
                await handle.call(3)
            assert (info.value.backend, info.value.queued, info.value.limit) == ("g", 2, 2)
            gate.release.set()
    finally:
        gate.release.set()
    assert sorted(v for _, v in results) == [0, 1, 2]


async def test_max_concurrent_queries_is_respected(ctl: Controller) -> None:
    gate = targets.Gate.named("concurrency")
    await ctl.create_backend(
        "g", targets.Gated, init_args=["concurrency"], max_concurrent_queries=2
    )
    handle = await serve(ctl, "mc", {"g": 1.0})
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(handle.call, i)
        await wait_entered(gate)
        await trio.testing.wait_all_tasks_blocked()
        b = ctl.router._backends["g"]
        assert sum(b.outstanding.values()) == 2
        assert b.n_waiting == 3
        gate.release.set()


# -- errors -------------------------------------------------------------------------------


async def test_user_exceptions_come_back_with_their_type(ctl: Controller) -> None:
    await ctl.create_backend("r", targets.Raiser)
    handle = await serve(ctl, "err", {"r": 1.0})
    with pytest.raises(targets.CustomError, match="no such thing: 'x'"):
        await handle.call("x")
    with pytest.raises(targets.CustomError):
        await handle.options(timeout_s=WAIT).call("y")


async def test_a_timeout_is_honoured(ctl: Controller) -> None:
    gate = targets.Gate.named("timeout")
    await ctl.create_backend("g", targets.Gated, init_args=["timeout"])
    handle = await serve(ctl, "slow", {"g": 1.0})
    try:
        with pytest.raises(TimeoutError, match=r"'slow' got no answer within 0\.05s"):
            await handle.options(timeout_s=0.05).call(1)
    finally:
        gate.release.set()
    assert (await handle.call(2))[1] == 2
    with pytest.raises(ValueError, match="timeout_s"):
        handle.options(timeout_s=-1)


async def test_a_replica_dying_mid_query_gives_replica_died(ctl: Controller) -> None:
    await ctl.create_backend("m", targets.Mortal, num_replicas=1)
    handle = await serve(ctl, "mortal", {"m": 1.0})
    (before,) = ctl.routing_table.backends["m"].replicas
    with pytest.raises(ReplicaDiedError, match="SystemExit"):
        await handle.call("exit")
    await eventually(lambda: ctl.routing_table.backends["m"].replicas not in ((), (before,)))
    await ctl.settle()
    for i in range(20):
        assert (await handle.call(i))[1] == i


async def test_a_dead_replica_is_replaced_and_queries_keep_succeeding(ctl: Controller) -> None:
    await ctl.create_backend("m", targets.Mortal, num_replicas=2)
    handle = await serve(ctl, "heal", {"m": 1.0})
    before = set(ctl.routing_table.backends["m"].replicas)
    await handle.call("sicken")  # that replica fails its next health check
    await eventually(lambda: len(set(ctl.routing_table.backends["m"].replicas) - before) == 1)
    await ctl.settle()
    after = ctl.routing_table.backends["m"].replicas
    assert len(after) == 2 and len(set(after) & before) == 1
    assert all(r.status is ReplicaStatus.RUNNING for r in ctl.state.replicas.values())
    results = [await handle.call(i) for i in range(100)]
    assert [v for _, v in results] == list(range(100))


async def test_queries_keep_succeeding_while_a_replica_dies(ctl: Controller) -> None:
    """A health-check death under load: queries queued on the dying replica never ran,
    so they go to the other one; nobody sees an error, and the dead one is replaced."""
    await ctl.create_backend("m", targets.Mortal, num_replicas=2)
    handle = await serve(ctl, "busy", {"m": 1.0})
    before = set(ctl.routing_table.backends["m"].replicas)
    replaced = trio.Event()
    answered = 0
    sickened = False

    async def client(k: int) -> None:
        nonlocal answered, sickened
        i = 0
        while not replaced.is_set() or i < 20:
            if k == 0 and i == 5 and not sickened:
                sickened = True
                await handle.call("sicken")
            else:
                assert (await handle.call((k, i)))[1] == (k, i)
            answered += 1
            i += 1

    async def watch() -> None:
        await eventually(lambda: len(set(ctl.routing_table.backends["m"].replicas) - before) == 1)
        replaced.set()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for k in range(8):
                nursery.start_soon(client, k)
    assert answered >= 8 * 20


async def test_queued_queries_of_a_killed_replica_go_elsewhere(ctl: Controller) -> None:
    gate = targets.Gate.named("resend")
    await ctl.create_backend(
        "g", targets.Gated, init_args=["resend"], num_replicas=2, max_concurrent_queries=4
    )
    handle = await serve(ctl, "resend", {"g": 1.0})
    outcomes: list[Any] = []

    async def query(i: int) -> None:
        try:
            outcomes.append(await handle.call(i))
        except ReplicaDiedError as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(query, i)
        await wait_entered(gate, 2)  # one running on each replica, three queued behind
        await trio.testing.wait_all_tasks_blocked()
        victim = ctl.routing_table.backends["g"].replicas[0]
        assert isinstance(ctl.runtime, ThreadRuntime)
        ctl.runtime.kill(victim, "test")
        await eventually(lambda: len(outcomes) == 1)  # the running one: it may have run
        gate.release.set()
    died = [o for o in outcomes if isinstance(o, ReplicaDiedError)]
    assert len(died) == 1 and died[0].tag == victim
    answers = {o[1] for o in outcomes if not isinstance(o, ReplicaDiedError)}
    assert len(outcomes) == 8 and len(answers) == 7 and answers < set(range(8))


# -- batching -----------------------------------------------------------------------------


async def test_batches_form_under_concurrency_and_respect_the_size(ctl: Controller) -> None:
    await ctl.create_backend(
        "b",
        targets.BatchRecorder,
        init_args=["router-batches"],
        max_batch_size=8,
        batch_wait_timeout_s=0.05,
        max_concurrent_queries=8,
    )
    handle = await serve(ctl, "batched", {"b": 1.0})
    results: dict[int, Any] = {}

    async def query(i: int) -> None:
        results[i] = await handle.call(i)

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(query, i)
    assert results == {i: 2 * i for i in range(50)}
    sizes = targets.BATCH_SIZES["router-batches"]
    assert sum(sizes) == 50
    assert max(sizes) > 1
    assert max(sizes) <= 8


async def test_a_broken_batch_fails_every_caller_clearly(ctl: Controller) -> None:
    await ctl.create_backend("s", targets.ShortBatch, max_batch_size=4, batch_wait_timeout_s=0.05)
    handle = await serve(ctl, "short", {"s": 1.0})
    errors: list[BaseException] = []

    async def query(i: int) -> None:
        try:
            await handle.call(i)
        except BatchSizeError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(query, i)
    assert len(errors) == 4
    assert "must return a list with one result per input" in str(errors[0])


async def test_batched_queries_take_one_argument(ctl: Controller) -> None:
    await ctl.create_backend("d", targets.double_all, max_batch_size=4)
    handle = await serve(ctl, "dbl", {"d": 1.0})
    assert await handle.call(21) == 42
    with pytest.raises(TypeError, match="exactly one positional argument"):
        await handle.call(1, 2)
    with pytest.raises(TypeError, match="exactly one positional argument"):
        await handle.call(1, x=2)


async def test_a_slow_batch_window_is_cut_short_by_a_full_batch(ctl: Controller) -> None:
    """With a huge window, a full batch still goes at once (no waiting for the clock)."""
    await ctl.create_backend(
        "b",
        targets.BatchRecorder,
        init_args=["full-batch"],
        max_batch_size=4,
        batch_wait_timeout_s=3600.0,
    )
    handle = await serve(ctl, "full", {"b": 1.0})
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(handle.call, i)
    assert targets.BATCH_SIZES["full-batch"] == [4]


# -- scale down and delete while queries run ------------------------------------------------


async def test_scale_to_zero_while_queries_run(ctl: Controller) -> None:
    gate = targets.Gate.named("scale0")
    await ctl.create_backend("g", targets.Gated, init_args=["scale0"])
    handle = await serve(ctl, "s0", {"g": 1.0})
    results: list[Any] = []
    scaled = trio.Event()

    async def query(i: int) -> None:
        results.append((await handle.call(i))[1])

    async def scale() -> None:
        await ctl.update_backend_config("g", num_replicas=0)
        scaled.set()

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(query, i)
        await wait_entered(gate)
        nursery.start_soon(scale)
        await eventually(lambda: ctl.routing_table.backends["g"].replicas == ())
        with pytest.raises(NoReplicaError, match="no running replica"):
            await handle.call("new")  # fails fast; does not wait
        assert not scaled.is_set()  # the stop is draining the queries in flight
        gate.release.set()
    assert sorted(results) == [0, 1, 2]
    assert scaled.is_set()
    assert ctl.state.backends["g"].config.num_replicas == 0


async def test_delete_a_backend_while_queries_run(ctl: Controller) -> None:
    gate = targets.Gate.named("delete")
    await ctl.create_backend("old", targets.Gated, init_args=["delete"])
    await ctl.create_backend("new", targets.Named, init_args=["new"])
    handle = await serve(ctl, "del", {"old": 1.0})
    results: list[Any] = []

    async def query(i: int) -> None:
        results.append((await handle.call(i))[1])

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(query, i)
        await wait_entered(gate)
        await ctl.set_traffic("del", {"new": 1.0})
        nursery.start_soon(ctl.delete_backend, "old")
        await eventually(lambda: "old" not in ctl.routing_table.backends)
        assert await handle.call("after") == ("new", "after")
        gate.release.set()
    assert sorted(results) == [0, 1, 2]
    assert "old" not in ctl.state.backends


async def test_a_removed_replica_gets_no_new_query(ctl: Controller) -> None:
    await ctl.create_backend("i", targets.Identity, num_replicas=2)
    handle = await serve(ctl, "rm", {"i": 1.0})
    seen = {(await handle.call(k))[0] for k in range(20)}
    assert len(seen) == 2
    await ctl.update_backend_config("i", num_replicas=1)
    remaining = {(await handle.call(k))[0] for k in range(50)}
    assert len(remaining) == 1 and remaining < seen


async def test_delete_an_endpoint_then_calls_fail_fast(ctl: Controller) -> None:
    await ctl.create_backend("n", targets.Named, init_args=["n"])
    handle = await serve(ctl, "gone", {"n": 1.0})
    assert await handle.call(1) == ("n", 1)
    await ctl.delete_endpoint("gone")
    with pytest.raises(EndpointNotFound):
        await handle.call(2)


async def test_queued_queries_fail_when_the_last_replica_leaves(ctl: Controller) -> None:
    gate = targets.Gate.named("last")
    await ctl.create_backend("g", targets.Gated, init_args=["last"], max_concurrent_queries=1)
    handle = await serve(ctl, "last", {"g": 1.0})
    outcomes: list[Any] = []

    async def query(i: int) -> None:
        try:
            outcomes.append((await handle.call(i))[1])
        except NoReplicaError as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(query, 0)
        await wait_entered(gate)
        nursery.start_soon(query, 1)  # waits in the router's queue
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(functools.partial(ctl.update_backend_config, "g", num_replicas=0))
        await eventually(lambda: len(outcomes) == 1)
        assert isinstance(outcomes[0], NoReplicaError)
        gate.release.set()
    assert outcomes[1] == 0


async def test_closing_the_controller_fails_waiting_queries() -> None:
    """Queries still waiting when the controller closes fail; none hangs."""
    gate = targets.Gate.named("closing")
    outcomes: list[BaseException] = []

    async def query(handle: Handle, value: Any) -> None:
        try:
            await handle.call(value)
        except (NoReplicaError, ReplicaDiedError) as exc:
            outcomes.append(exc)

    try:
        with trio.fail_after(WAIT):
            async with (
                trio.open_nursery() as outer,
                open_controller(runtime=ThreadRuntime(), name="closing") as ctl,
            ):
                await ctl.create_backend(
                    "b", targets.double_all, max_batch_size=8, batch_wait_timeout_s=3600.0
                )
                await ctl.create_backend(
                    "g",
                    targets.Gated,
                    init_args=["closing"],
                    graceful_shutdown_timeout_s=0.05,
                )
                batched = await serve(ctl, "batched", {"b": 1.0})
                gated = await serve(ctl, "gated", {"g": 1.0})
                outer.start_soon(query, batched, 1)  # waits for a batch that never fills
                outer.start_soon(query, gated, 2)  # stuck in user code
                await wait_entered(gate)
                await trio.testing.wait_all_tasks_blocked()
    finally:
        gate.release.set()
    assert sorted(type(e).__name__ for e in outcomes) == ["NoReplicaError", "ReplicaDiedError"]
    assert any("the controller is closed" in str(e) for e in outcomes)
