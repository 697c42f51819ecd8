"""A replica's own ``check_health()`` is bounded by its backend's
``health_check_timeout_s`` on the subprocess and Ray runtimes: one that does not return
in time is a failed check -- the replica is killed and reported dead (the controller
then replaces it, as for any death). Its wait for its turn behind a long query (Ray
runs it between batches) does not count.

Each test runs on both runtimes, straight through the Runtime protocol (Ray on the
session's private cluster, in a namespace of the test's own).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from opened_runtime import Opened
from servecore import BackendConfig, ReplicaDied, StartReplica
from servecore._core.values import backend_of
from servecore.runtimes import Query
from servecore.runtimes.subprocess import SubprocessRuntime
from subprocess_helpers import kill_everything_under

BOUND_S = 60.0  # only ever a guard against hanging
CHECK_EVERY_S = 0.1  # the runtime's health_check_period_s: checks come often
TIMEOUT_S = 0.5  # the backend's health_check_timeout_s


@pytest.fixture(params=["subprocess", pytest.param("ray", marks=pytest.mark.ray)])
async def opened(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opened]:
    rt: Any
    if request.param == "subprocess":
        rt = SubprocessRuntime(tmp_path / "rt", health_check_period_s=CHECK_EVERY_S)
    else:
        pytest.importorskip("ray", reason="the Ray runtime needs the 'ray' extra")
        from servecore.runtimes.ray import RayRuntime

        cluster = request.getfixturevalue("cluster")
        namespace = request.getfixturevalue("namespace")  # what is left in it is killed
        rt = RayRuntime(
            address=cluster.address,
            namespace=namespace,
            start_timeout_s=BOUND_S,
            health_check_period_s=CHECK_EVERY_S,
        )
    opened = Opened(rt, wait_s=BOUND_S)
    await rt.open(namespace="health", report=opened.events.append)
    try:
        yield opened
    finally:
        with trio.CancelScope(shield=True):
            await rt.close()
        kill_everything_under(tmp_path)


async def start(rt: Any, tag: str) -> None:
    config: dict[str, Any] = {"health_check_timeout_s": TIMEOUT_S}
    if type(rt).__name__ == "RayRuntime":
        config["runtime_options"] = {"num_cpus": 0}  # the cluster has 2 CPUs
    await rt.start_replica(
        StartReplica(
            tag=tag,
            backend=backend_of(tag),
            target="health_targets:HangsInCheck",
            init_args=(),
            init_kwargs={},
            config=BackendConfig(**config),
        )
    )


async def call(rt: Any, tag: str, *args: Any) -> Any:
    with trio.fail_after(BOUND_S):
        (result,) = await rt.call(tag, [Query(args=args)])
        return result


async def test_a_check_health_that_never_returns_is_a_failed_check(opened: Opened) -> None:
    rt = opened.runtime
    await start(rt, "hung#0")
    # A query that holds the replica for several timeouts: checks that wait behind it
    # (or run beside it) and return are not failures.
    assert await call(rt, "hung#0", "sleep", 4 * TIMEOUT_S) == "sleep"
    assert await call(rt, "hung#0", "fine") == "fine"
    assert not opened.events

    assert await call(rt, "hung#0", "hang") == "hang"
    died = await opened.died("hung#0")
    assert isinstance(died, ReplicaDied)
    assert "health check failed" in died.reason and "check_health()" in died.reason
    assert f"did not return within {TIMEOUT_S:g}s" in died.reason
    assert "health_check_timeout_s" in died.reason
    with trio.fail_after(BOUND_S):
        while "hung#0" in await rt.list_replicas():
            await trio.sleep(0.05)
    assert [e.tag for e in opened.events] == ["hung#0"]  # type: ignore[attr-defined]
