"""Node loss on a real two-node Ray cluster: a private head and a worker node (a
raylet of its own) on loopback, both on this machine.

The cluster is this module's own, made slow to declare a lost node dead (minutes), so
that what the tests see is servecore's doing, not Ray's verdict. This process's driver
connection moves to it for the module and back to the session's cluster after.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import trio

ray = pytest.importorskip(
    "ray", reason="the Ray runtime tests need the 'ray' extra: pip install 'servecore[ray]'"
)

import servecore  # noqa: E402
from ray_helpers import WAIT, connect_driver, running  # noqa: E402
from servecore.runtimes.ray import LocalRayCluster, LocalRayNode, RayRuntime  # noqa: E402

pytestmark = pytest.mark.ray

#: Ray's own health checks of nodes: a node that stops answering is declared dead only
#: after 120 failed checks 5 s apart (10 minutes), far beyond any wait of these tests.
SLOW_NODE_DEATH = {"health_check_period_ms": 5000, "health_check_failure_threshold": 120}


@pytest.fixture(scope="module")
def two_nodes(cluster: LocalRayCluster) -> Iterator[tuple[LocalRayCluster, LocalRayNode]]:
    """A head and one worker node; this process is their driver for the module."""
    ray.shutdown()
    head = LocalRayCluster(num_cpus=1, system_config=SLOW_NODE_DEATH)
    try:
        head.start()
        worker = head.add_node(num_cpus=1)
        connect_driver(head)
        yield head, worker
    finally:
        ray.shutdown()
        head.stop()
        connect_driver(cluster)
    assert not head.pids(), "processes of the two-node cluster survived its stop"


def node_alive(node_id: str) -> bool:
    """Whether Ray's GCS still counts node ``node_id`` alive."""
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def replica_nodes(status: dict[str, Any]) -> dict[str, str]:
    """Each replica's node id, as ``status`` shows it."""
    return {r["tag"]: r["node"] for b in status["backends"] for r in b["replicas"]}


async def test_a_worker_node_joins_the_private_head_on_loopback(
    two_nodes: tuple[LocalRayCluster, LocalRayNode],
) -> None:
    head, worker = two_nodes
    nodes = {n["NodeID"]: n for n in await trio.to_thread.run_sync(ray.nodes)}
    assert worker.node_id in nodes and nodes[worker.node_id]["Alive"]
    assert nodes[worker.node_id]["NodeManagerAddress"] == "127.0.0.1"  # loopback kept
    assert len(nodes) == 2
    assert worker.raylet_pid() in worker.pids()
    # The cluster's stop ends the node too; the node's own stop ends it alone.
    assert set(worker.pids()) < set(head.pids())


@ray.remote(num_cpus=1)
class Placeholder:
    """Holds the head's only CPU, so that replicas start on the worker node."""

    def ready(self) -> bool:
        return True


async def test_replicas_lost_with_a_node_are_replaced_on_another_before_ray_says_it_died(
    two_nodes: tuple[LocalRayCluster, LocalRayNode], caplog: pytest.LogCaptureFixture
) -> None:
    head, worker = two_nodes
    nodes = await trio.to_thread.run_sync(ray.nodes)
    (head_id,) = [n["NodeID"] for n in nodes if n["NodeID"] != worker.node_id]
    on_head = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(head_id, soft=False)
    placeholder = Placeholder.options(scheduling_strategy=on_head).remote()  # type: ignore[attr-defined]
    await trio.to_thread.run_sync(lambda: ray.get(placeholder.ready.remote(), timeout=WAIT))
    runtime = RayRuntime(address=head.address, start_timeout_s=WAIT)
    async with servecore.open_controller(
        runtime=runtime, name="two-nodes", autoscale_interval_s=None
    ) as ctl:
        await ctl.create_backend(
            "echo",
            "ray_driver:Echo",
            num_replicas=2,
            health_check_period_s=0.2,
            health_check_timeout_s=1.0,
            runtime_options={"num_cpus": 0.1, "scheduling_strategy": "SPREAD"},
        )
        await ctl.create_endpoint("echo")
        await ctl.set_traffic("echo", {"echo": 1.0})
        # Status shows where each replica runs: on the worker node (the head is full).
        lost = replica_nodes((await ctl.status()).as_dict())
        assert set(lost.values()) == {worker.node_id}
        await trio.to_thread.run_sync(ray.kill, placeholder)  # room on the head again

        # The worker node's raylet is killed (its workers go with it): a machine gone.
        await trio.to_thread.run_sync(worker.kill_raylet)
        with trio.fail_after(WAIT):
            while set(lost) & set(ctl.state.replicas) or len(running(ctl)) < 2:
                await trio.sleep(0.05)
            await ctl.settle()

        # The replacements run on the surviving node, while Ray still counts the lost
        # one alive: servecore did not wait for Ray's verdict, and steered away from it.
        placed = replica_nodes((await ctl.status()).as_dict())
        assert not set(placed) & set(lost) and len(placed) == 2
        assert set(placed.values()) == {head_id}
        assert await trio.to_thread.run_sync(node_alive, worker.node_id)
        assert f"lost with its node {worker.node_id}" in caplog.text
        for i in range(4):
            assert await ctl.get_handle("echo").call(i) == str(i)


async def test_a_worker_node_stops_alone(two_nodes: tuple[LocalRayCluster, LocalRayNode]) -> None:
    head, _worker = two_nodes
    extra = await trio.to_thread.run_sync(lambda: head.add_node(num_cpus=1))
    assert extra.pids() and set(extra.pids()) < set(head.pids())
    daemons = {
        pid: psutil.Process(pid).name()
        for pid in set(head.pids()) - set(extra.pids())
        if psutil.Process(pid).name() in ("raylet", "gcs_server")
    }
    assert {"raylet", "gcs_server"} <= set(daemons.values())  # the head's
    await trio.to_thread.run_sync(extra.stop)
    assert not extra.pids()
    assert set(daemons) <= set(head.pids())  # the rest of the cluster goes on
    nodes = await trio.to_thread.run_sync(ray.nodes)  # the GCS still answers
    assert extra.node_id in {n["NodeID"] for n in nodes}
