"""Deadlines reach replicas of every runtime: threads, subprocess and Ray
(docs/design.md §5).

Each test runs on every runtime, straight through the Runtime protocol (Ray on the
session's private cluster, in a namespace of the test's own). No wall-clock
thresholds: a deadline a minute away is "some time left", one a second ago "passed".
"""

from __future__ import annotations

import pickle
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from deadline_targets import ran
from servecore import BackendConfig, DeadlineExceeded, StartReplica
from servecore._core.values import backend_of
from servecore.runtimes import Query
from servecore.runtimes.subprocess import SubprocessRuntime
from servecore.runtimes.subprocess.wire import DEADLINES_MAGIC, decode_call, dumps, encode_call
from servecore.runtimes.threads import ThreadRuntime
from subprocess_helpers import kill_everything_under

BOUND_S = 30.0  # only ever a guard against hanging
MINUTE = 60.0


def _ray_runtime(request: pytest.FixtureRequest) -> Any:
    pytest.importorskip("ray", reason="the Ray runtime needs the 'ray' extra")
    from servecore.runtimes.ray import RayRuntime

    cluster = request.getfixturevalue("cluster")
    namespace = request.getfixturevalue("namespace")  # whatever is left in it is killed
    return RayRuntime(address=cluster.address, namespace=namespace, start_timeout_s=BOUND_S)


@pytest.fixture(params=["threads", "subprocess", pytest.param("ray", marks=pytest.mark.ray)])
async def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    rt: Any
    if request.param == "threads":
        rt = ThreadRuntime()
    elif request.param == "subprocess":
        rt = SubprocessRuntime(tmp_path / "rt")
    else:
        rt = _ray_runtime(request)
    rt.events = []
    await rt.open(namespace="deadlines", report=rt.events.append)
    try:
        yield rt
    finally:
        with trio.CancelScope(shield=True):
            await rt.close()
        kill_everything_under(tmp_path)


async def start(rt: Any, tag: str, target: str, *init_args: Any, **config: Any) -> str:
    if type(rt).__name__ == "RayRuntime":
        config.setdefault("runtime_options", {"num_cpus": 0})  # the cluster has 2 CPUs
    await rt.start_replica(
        StartReplica(
            tag=tag,
            backend=backend_of(tag),
            target=f"deadline_targets:{target}",
            init_args=init_args,
            init_kwargs={},
            config=BackendConfig(**config),
        )
    )
    return tag


async def call(rt: Any, tag: str, *queries: Query) -> list[Any]:
    with trio.fail_after(BOUND_S):
        result: list[Any] = await rt.call(tag, list(queries))
        return result


@pytest.mark.parametrize("target", ["remaining", "async_remaining"])
async def test_user_code_reads_the_time_left_of_its_query(runtime: Any, target: str) -> None:
    tag = await start(runtime, "left#0", target)
    (left,) = await call(runtime, tag, Query(deadline=time.time() + MINUTE))
    assert left is not None and 0 < left <= MINUTE
    (none,) = await call(runtime, tag, Query())
    assert none is None  # no deadline: no limit


async def test_a_batch_runs_under_the_earliest_deadline_of_its_queries(runtime: Any) -> None:
    tag = await start(runtime, "batch#0", "batch_remaining", max_batch_size=4)
    now = time.time()
    lefts = await call(
        runtime, tag, Query(args=(1,), deadline=now + MINUTE), Query(args=(2,), deadline=now + 5)
    )
    assert lefts[0] == lefts[1] and 0 < lefts[0] <= 5


async def test_a_query_past_its_deadline_is_dropped_unrun(runtime: Any, tmp_path: Path) -> None:
    ran_file, gate = tmp_path / "ran", tmp_path / "gate"
    tag = await start(runtime, "held#0", "Held", str(ran_file), str(gate))
    with pytest.raises(DeadlineExceeded, match="dropped without running") as caught:
        await call(runtime, tag, Query(args=("late",), deadline=time.time() - 1))
    assert isinstance(caught.value, TimeoutError)
    assert await call(runtime, tag, Query(args=("ontime",), deadline=time.time() + MINUTE)) == [
        "ontime"
    ]
    assert ran(ran_file) == ["ontime"]  # "late" never began


async def test_a_query_whose_deadline_passes_while_it_waits_in_the_replica_is_dropped(
    runtime: Any, tmp_path: Path
) -> None:
    """One slot: the second query waits behind the first inside the replica (the
    subprocess replica's socket, the threads replica's inbox) and its deadline passes
    there; when its turn comes it is dropped, not run."""
    ran_file, gate = tmp_path / "ran", tmp_path / "gate"
    tag = await start(
        runtime, "queue#0", "Held", str(ran_file), str(gate), max_concurrent_queries=1
    )
    outcome: list[BaseException] = []

    async def late_one() -> None:
        try:
            await call(runtime, tag, Query(args=("late",), deadline=time.time() + 0.2))
        except DeadlineExceeded as exc:
            outcome.append(exc)

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, runtime, tag, Query(args=("hold",)))
            while ran(ran_file) != ["hold"]:
                await trio.sleep(0.01)
            nursery.start_soon(late_one)
            await trio.sleep(0.4)  # past the second query's deadline (not a threshold)
            gate.touch()
    assert len(outcome) == 1
    assert ran(ran_file) == ["hold"]


def test_the_deadline_trailer_is_invisible_to_a_replica_that_predates_it() -> None:
    """An older replica reads a CALL body with ``pickle.loads``: the trailer after the
    pickle is ignored, so it runs the queries as before. A body from an older host has
    no trailer, and reads as queries without deadlines."""
    queries = [Query(args=(1,), kwargs={"k": "v"}, deadline=123.5), Query(args=(2,))]
    body = encode_call(queries)
    assert body.endswith(DEADLINES_MAGIC)
    assert pickle.loads(body) == [((1,), {"k": "v"}), ((2,), {})]  # an older replica
    assert decode_call(body) == [((1,), {"k": "v"}, 123.5), ((2,), {}, None)]
    old_body = dumps([((1,), {}), ((2,), {})])  # an older host
    assert decode_call(old_body) == [((1,), {}, None), ((2,), {}, None)]
    assert encode_call([Query(args=(1,))]) == dumps([((1,), {})])  # no deadline: no trailer
