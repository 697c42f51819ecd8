"""Streams of generator targets through the threads, subprocess and Ray runtimes.

Each test runs on every runtime (Ray's on the private cluster of
``tests/runtimes/conftest.py``, in a namespace of its own), with a sync and an async
generator where it matters.
No wall-clock thresholds: order is checked with the replica's own timestamps against
the consumer's receipt order, and bounded waits only guard against a hang.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from servecore import BackendConfig, ReplicaDiedError, StartReplica, StreamMismatch
from servecore._core.values import backend_of
from servecore.runtimes import Query
from servecore.runtimes.subprocess import SubprocessRuntime
from servecore.runtimes.threads import ThreadRuntime
from servecore.runtimes.toolkit import DEFAULT_STREAM_WINDOW
from subprocess_helpers import kill_everything_under

BOUND_S = 30.0  # only ever a guard against hanging


@pytest.fixture(params=["threads", "subprocess", pytest.param("ray", marks=pytest.mark.ray)])
async def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    namespace = "stream"
    rt: Any
    if request.param == "threads":
        rt = ThreadRuntime()
    elif request.param == "subprocess":
        rt = SubprocessRuntime(tmp_path / "rt")
    else:
        from servecore.runtimes.ray import RayRuntime

        cluster = request.getfixturevalue("cluster")
        namespace = request.getfixturevalue("namespace")
        rt = RayRuntime(address=cluster.address, start_timeout_s=BOUND_S)
    rt.events = []
    rt.replica_options = {"num_cpus": 0} if request.param == "ray" else {}
    await rt.open(namespace=namespace, report=rt.events.append)
    try:
        yield rt
    finally:
        with trio.CancelScope(shield=True):
            await rt.close()
        kill_everything_under(tmp_path)


async def start(rt: Any, tag: str, target: str) -> str:
    await rt.start_replica(
        StartReplica(
            tag=tag,
            backend=backend_of(tag),
            target=f"stream_targets:{target}",
            init_args=(),
            init_kwargs={},
            # Ray replicas take no CPU slot: the test cluster has 2.
            config=BackendConfig(max_concurrent_queries=4, runtime_options=rt.replica_options),
        )
    )
    return tag


async def collect(rt: Any, tag: str, *args: Any) -> list[Any]:
    with trio.fail_after(BOUND_S):
        return [item async for item in await rt.stream(tag, Query(args=args))]


async def stats(rt: Any, tag: str, want_stopped: bool = True) -> dict[str, Any]:
    """The counter's own record, once it has recorded its stop (a bounded wait)."""
    with trio.fail_after(BOUND_S):
        while True:
            [record] = await collect(rt, tag, "stats")
            if record["stopped"] or not want_stopped:
                return dict(record)
            await trio.sleep(0.01)


@pytest.mark.parametrize("target", ["Counter", "AsyncCounter"])
async def test_items_arrive_one_by_one_as_the_generator_yields_them(
    runtime: Any, target: str
) -> None:
    tag = await start(runtime, "c#1", target)
    received: list[tuple[int, float, float]] = []
    with trio.fail_after(BOUND_S):
        async for i, produced_at in await runtime.stream(tag, Query(args=(4, 0.1))):
            received.append((i, produced_at, time.monotonic()))
    assert [i for i, _, _ in received] == [0, 1, 2, 3]
    # Each item reached the consumer before the generator even made the next one.
    for (_, _, got), (_, next_made, _) in itertools.pairwise(received):
        assert got < next_made


@pytest.mark.parametrize("target", ["Counter", "AsyncCounter"])
async def test_a_slow_consumer_holds_the_producer_within_its_window_and_closing_stops_it(
    runtime: Any, target: str
) -> None:
    tag = await start(runtime, "c#1", target)
    stream = await runtime.stream(tag, Query(args=(1000,)))
    got = []
    with trio.fail_after(BOUND_S):
        async for item in stream:
            got.append(item[0])
            if len(got) == 5:
                break
    await trio.sleep(0.2)  # room to run ahead, were it not held back
    stream.close()
    record = await stats(runtime, tag)
    assert got == [0, 1, 2, 3, 4]
    assert 5 <= record["produced"] <= 5 + DEFAULT_STREAM_WINDOW
    # The generator itself saw the stop (GeneratorExit at its yield, or a cancel).
    assert len(record["stopped"]) == 1 and record["stopped"][0] < 5 + DEFAULT_STREAM_WINDOW


async def test_a_user_error_ends_the_stream_after_its_items(runtime: Any) -> None:
    tag = await start(runtime, "f#1", "failing")
    stream = await runtime.stream(tag, Query(args=(2,)))
    got = []
    with trio.fail_after(BOUND_S), pytest.raises(LookupError, match="no more after 2"):
        async for item in stream:
            got.append(item)
    assert got == [0, 1]


async def test_a_replica_death_mid_stream_raises_after_the_delivered_items(runtime: Any) -> None:
    tag = await start(runtime, "d#1", "dies_after")
    stream = await runtime.stream(tag, Query(args=(3,)))
    got = []
    with trio.fail_after(BOUND_S):
        async for item in stream:
            got.append(item)
            if len(got) == 3:
                break
        runtime.kill(tag)
        with pytest.raises(ReplicaDiedError) as caught:
            await stream.__anext__()
    assert got == [0, 1, 2] and caught.value.tag == tag


async def test_streams_and_calls_are_not_mixed_up(runtime: Any) -> None:
    tag = await start(runtime, "p#1", "plain")
    with trio.fail_after(BOUND_S):
        with pytest.raises(StreamMismatch, match=r"use\s+handle\.call") as caught:
            await collect(runtime, tag, 1)
        assert caught.value.streams is False
        assert await runtime.call(tag, [Query(args=(7,))]) == [7]
        counter = await start(runtime, "c#1", "Counter")
        with pytest.raises(StreamMismatch, match=r"handle\.stream") as caught:
            await runtime.call(counter, [Query(args=(3,))])
        assert caught.value.streams is True
        assert [i for i, _ in await collect(runtime, counter, 3)] == [0, 1, 2]


async def test_a_stop_lets_an_open_stream_finish(runtime: Any) -> None:
    tag = await start(runtime, "c#1", "AsyncCounter")
    stream = await runtime.stream(tag, Query(args=(3, 0.05)))
    got: list[int] = []

    async def consume() -> None:
        async for item in stream:
            got.append(item[0])

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await runtime.stop_replica(tag, 20.0)
    assert got == [0, 1, 2]
