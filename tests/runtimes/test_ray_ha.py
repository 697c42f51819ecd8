"""High availability on the Ray runtime, on a real (private, loopback) Ray cluster:
fencing by the store's lease epoch, deaths confirmed before they are declared, health
probes from outside, where replicas run, placement after a node loss, and deadlines.

The cluster is the session's (``conftest.py``); each test works in a Ray namespace of
its own. Waits are bounded only so that a bug fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

ray = pytest.importorskip(
    "ray", reason="the Ray runtime tests need the 'ray' extra: pip install 'servecore[ray]'"
)

import servecore  # noqa: E402
from opened_runtime import Opened  # noqa: E402
from ray_helpers import NO_CPU, WAIT, alive_in, effect, pid_of, q, running  # noqa: E402
from servecore import LeaseLost, MemoryStore, RuntimeFenced, SteppedDown  # noqa: E402
from servecore.runtimes.ray import LocalRayCluster, RayRuntime  # noqa: E402
from servecore.runtimes.ray import watch as ray_watch  # noqa: E402
from servecore.runtimes.ray.placement import AvoidedNodes, steer_away  # noqa: E402

pytestmark = pytest.mark.ray

STORE = "postgres:db:5432/servecore#prod"


async def open_runtime(
    cluster: LocalRayCluster,
    namespace: str,
    epoch: int | None,
    store_id: str | None = STORE,
    **options: object,
) -> Opened:
    opened = Opened(RayRuntime(address=cluster.address, start_timeout_s=WAIT, **options))  # type: ignore[arg-type]
    await opened.runtime.open(
        namespace=namespace, report=opened.events.append, store_id=store_id, epoch=epoch
    )
    return opened


@pytest.fixture
async def rt(cluster: LocalRayCluster, namespace: str) -> AsyncIterator[Opened]:
    opened = await open_runtime(cluster, namespace, epoch=None, store_id=None)
    try:
        yield opened
    finally:
        await opened.runtime.close()


# ---------------------------------------------------------------------------------------
# Fencing


async def test_an_older_epoch_can_neither_stop_kill_start_nor_adopt(
    cluster: LocalRayCluster, namespace: str
) -> None:
    old = await open_runtime(cluster, namespace, epoch=1)
    new: Opened | None = None
    try:
        await old.runtime.start_replica(effect("echo#1", "Echo"))
        # The old leader is still open (frozen past its lease, say) when the new one comes.
        new = await open_runtime(cluster, namespace, epoch=2)
        assert await new.runtime.list_replicas() == {"echo#1"}  # adopted, not restarted
        await new.runtime.start_replica(effect("echo#2", "Echo", "n:"))

        with pytest.raises(RuntimeFenced) as info:
            await old.runtime.stop_replica("echo#2", 1.0)
        assert info.value.epoch == 1 and info.value.newer_epoch == 2
        assert namespace in str(info.value) and "close this controller" in str(info.value)
        with pytest.raises(RuntimeFenced):
            await old.runtime.stop_replica("echo#1", 1.0)
        with pytest.raises(RuntimeFenced):
            old.runtime.kill("echo#2")
        with pytest.raises(RuntimeFenced):
            await old.runtime.list_replicas()
        with pytest.raises(RuntimeFenced):
            await old.runtime.start_replica(effect("echo#3", "Echo"))
        assert await alive_in(namespace) == {"echo#1", "echo#2"}
        assert await new.runtime.call("echo#2", [q("x")]) == ["n:x"]
        assert await new.runtime.call("echo#1", [q("y")]) == ["y"]
        assert not new.events

        # A stale leader opening late is refused at once; another store's epochs do not
        # fence this one; a store without a lease is not fenced at all.
        with pytest.raises(RuntimeFenced):
            await open_runtime(cluster, namespace, epoch=1)
        other = await open_runtime(cluster, namespace, epoch=1, store_id="postgres:other/x")
        await other.runtime.close()
        unleased = await open_runtime(cluster, namespace, epoch=None, store_id=None)
        try:
            assert await unleased.runtime.list_replicas() == {"echo#1", "echo#2"}
        finally:
            await unleased.runtime.close()

        await old.runtime.close()  # the frozen leader goes; the new one carries on
        await new.runtime.stop_replica("echo#1", 5.0)
        assert await alive_in(namespace) == {"echo#2"}
    finally:
        await old.runtime.close()
        if new is not None:
            await new.runtime.close()
    # Closed: the cluster still remembers epoch 2, so a stale leader stays out.
    with pytest.raises(RuntimeFenced):
        await open_runtime(cluster, namespace, epoch=1)
    again = await open_runtime(cluster, namespace, epoch=3)
    await again.runtime.close()


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


async def test_a_controller_whose_ray_namespace_was_taken_over_steps_down(
    cluster: LocalRayCluster, namespace: str
) -> None:
    told: list[SteppedDown] = []
    async with servecore.open_controller(
        runtime=RayRuntime(address=cluster.address, start_timeout_s=WAIT),
        store=LeasedStore(epoch=1),
        name=namespace,
        on_step_down=told.append,
        resync_interval_s=None,
        autoscale_interval_s=None,
    ) as ctl:
        await ctl.create_backend(
            "echo", "ray_driver:Echo", num_replicas=1, runtime_options={"num_cpus": 0}
        )
        newer = await open_runtime(cluster, namespace, epoch=2)
        try:
            assert await newer.runtime.list_replicas() == {"echo#0"}
            with pytest.raises(RuntimeFenced):
                await ctl.set_backend_config(
                    "echo",
                    servecore.BackendConfig(num_replicas=0, runtime_options={"num_cpus": 0}),
                )
            stepped = ctl.stepped_down
            assert stepped is not None and told == [stepped]
            assert stepped.lease_lost.new_epoch == 2
            assert await ctl.resync() is False
            assert await alive_in(namespace) == {"echo#0"}
            assert await newer.runtime.call("echo#0", [q("still")]) == ["still"]
        finally:
            await newer.runtime.stop_replica("echo#0", 5.0)
            await newer.runtime.close()


# ---------------------------------------------------------------------------------------
# "Unavailable" is not dead


class _Unavailable:
    """An object reference whose call fails as one on an unreachable node's actor does
    (Ray's ``ActorUnavailableError``): what a network partition looks like."""

    def _on_completed(self, callback: Any) -> None:
        callback(ray.exceptions.ActorUnavailableError("injected: its node is unreachable", None))


async def test_an_unavailable_replica_is_confirmed_before_it_is_declared_dead(
    cluster: LocalRayCluster, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_renew = ray_watch.renew
    renewals: list[str] = []

    def renew(handle: Any, period_s: float) -> Any:
        renewals.append("x")
        if len(renewals) == 1:
            return _Unavailable()  # the first watch fails as a partition would
        return real_renew(handle, period_s)

    monkeypatch.setattr(ray_watch, "renew", renew)
    opened = await open_runtime(
        cluster, namespace, epoch=None, store_id=None, health_check_period_s=600.0
    )
    try:
        # Reachable again (its pings answer): not dead, watched again, serving.
        await opened.runtime.start_replica(effect("flaky#0", "Echo", health_check_timeout_s=5))
        with trio.fail_after(WAIT):
            while len(renewals) < 2:  # confirmed alive: the watch is renewed
                await trio.sleep(0.01)
        assert not opened.events
        assert await opened.runtime.call("flaky#0", [q("x")]) == ["x"]
        assert await opened.runtime.list_replicas() == {"flaky#0"}

        await opened.runtime.stop_replica("flaky#0", 5.0)

        # Unreachable for good (its pings fail too): after health_check_timeout_s it is
        # killed and reported dead, saying why.
        monkeypatch.setattr(ray_watch, "ping", lambda handle: _Unavailable())
        renewals.clear()
        await opened.runtime.start_replica(effect("gone#0", "Echo", health_check_timeout_s=1))
        died = await opened.died("gone#0")
        assert "unreachable" in died.reason and "health_check_timeout_s" in died.reason
        with trio.fail_after(WAIT):
            while "gone#0" in await alive_in(namespace):
                await trio.sleep(0.05)
        assert [e.tag for e in opened.events] == ["gone#0"]  # type: ignore[attr-defined]
    finally:
        await opened.runtime.close()


# ---------------------------------------------------------------------------------------
# Health probes from outside


async def test_a_frozen_replica_is_killed_and_replaced_and_a_busy_one_is_not(
    cluster: LocalRayCluster, namespace: str
) -> None:
    probe = {"health_check_period_s": 0.2, "health_check_timeout_s": 1.0, "runtime_options": NO_CPU}
    runtime = RayRuntime(address=cluster.address, start_timeout_s=WAIT)
    frozen: list[int] = []
    try:
        async with servecore.open_controller(
            runtime=runtime, name=namespace, autoscale_interval_s=None
        ) as ctl:
            await ctl.create_backend("slow", "ray_driver:Slow", num_replicas=1, **probe)
            await ctl.create_endpoint("slow")
            await ctl.set_traffic("slow", {"slow": 1.0})
            (busy,) = running(ctl)
            # A query that outlasts the probe's timeout many times: the replica still
            # answers its probes on its control threads, so it is not killed.
            assert await ctl.get_handle("slow").call(3.0) == 3.0
            assert running(ctl) == {busy}

            # A frozen process (SIGSTOP) answers nothing: it is killed and replaced.
            pid = await trio.to_thread.run_sync(pid_of, namespace, busy)
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)
            with trio.fail_after(WAIT):
                while busy in ctl.state.replicas or len(running(ctl)) < 1:
                    await trio.sleep(0.05)
                await ctl.settle()
            assert busy not in await alive_in(namespace)
            assert await ctl.get_handle("slow").call(0.01) == 0.01
            assert await alive_in(namespace) == running(ctl)
    finally:
        for pid in frozen:  # only if Ray left it: a worker of this test's own cluster
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_adoption_does_not_wait_behind_a_running_query(
    cluster: LocalRayCluster, rt: Opened, namespace: str
) -> None:
    await rt.runtime.start_replica(effect("slow#0", "Slow"))
    finished: list[object] = []

    async def long_query() -> None:
        finished.append(await rt.runtime.call("slow#0", [q(600.0)]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_query)
        await trio.sleep(0.5)  # let the query reach the replica
        adopter = await open_runtime(cluster, namespace, epoch=None, store_id=None)
        try:
            with trio.fail_after(WAIT):
                assert await adopter.runtime.list_replicas() == {"slow#0"}
            assert not finished  # adopted while the query still runs
            assert adopter.runtime.replica_info("slow#0") == rt.runtime.replica_info("slow#0")
        finally:
            await adopter.runtime.close()
        nursery.cancel_scope.cancel()
    await rt.runtime.stop_replica("slow#0", 0.1)


# ---------------------------------------------------------------------------------------
# Where replicas run


async def test_status_shows_the_pid_actor_and_node_of_each_replica(
    cluster: LocalRayCluster, namespace: str
) -> None:
    runtime = RayRuntime(address=cluster.address, start_timeout_s=WAIT)
    async with servecore.open_controller(runtime=runtime, name=namespace) as ctl:
        await ctl.create_backend("echo", "ray_driver:Echo", num_replicas=2, runtime_options=NO_CPU)
        status = (await ctl.status()).as_dict()
        (backend,) = status["backends"]
        node_ids = {n["NodeID"] for n in await trio.to_thread.run_sync(ray.nodes)}
        actors = {}
        for replica in backend["replicas"]:
            tag = replica["tag"]
            assert replica["pid"] == await trio.to_thread.run_sync(pid_of, namespace, tag)
            handle = await trio.to_thread.run_sync(
                lambda tag=tag: ray.get_actor(tag, namespace=namespace)
            )
            assert replica["actor_id"] == handle._actor_id.hex()
            assert replica["node"] in node_ids
            assert replica["node_ip"] == "127.0.0.1"
            actors[tag] = replica["actor_id"]
        assert len(set(actors.values())) == 2


# ---------------------------------------------------------------------------------------
# Placement after a node loss


def test_replacements_prefer_nodes_other_than_the_ones_just_lost() -> None:
    avoided = AvoidedNodes(avoid_for_s=100.0)
    avoided.add("n1", now=0.0)
    avoided.add("n2", now=50.0)
    assert avoided.at(10.0) == {"n1", "n2"}
    assert avoided.at(120.0) == {"n2"}  # n1's time is up: it is forgotten
    assert avoided.at(200.0) == frozenset()

    options = {"num_cpus": 0.5, "label_selector": {"zone": "a"}}
    steered = steer_away(options, frozenset({"n2", "n1"}))
    # The lost nodes are excluded, the backend's own selector kept, and falling back to
    # that selector alone makes it a preference: a start is never refused for it.
    assert steered == {
        "num_cpus": 0.5,
        "label_selector": {"zone": "a", "ray.io/node-id": "!in(n1,n2)"},
        "fallback_strategy": [{"label_selector": {"zone": "a"}}],
    }
    assert options == {"num_cpus": 0.5, "label_selector": {"zone": "a"}}  # not changed
    assert steer_away({"num_cpus": 1}, frozenset()) == {"num_cpus": 1}
    # A backend that places its replicas by node id itself is left alone.
    pinned = {"label_selector": {"ray.io/node-id": "abc"}}
    assert steer_away(pinned, frozenset({"n1"})) == pinned


async def test_a_replica_lost_with_the_only_node_is_still_replaced_there(
    cluster: LocalRayCluster, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The node of a frozen replica is avoided, but only as a preference: with no other
    # node, the replacement starts on the same one. (That it goes elsewhere when it can
    # is Ray's label selection, checked above as the options it is given.)
    node = (await trio.to_thread.run_sync(ray.nodes))[0]["NodeID"]
    opened = await open_runtime(cluster, namespace, epoch=None, store_id=None)
    try:
        probe = {"health_check_period_s": 0.2, "health_check_timeout_s": 1.0}
        await opened.runtime.start_replica(effect("frozen#0", "Echo", **probe))
        pid = await trio.to_thread.run_sync(pid_of, namespace, "frozen#0")
        os.kill(pid, signal.SIGSTOP)
        try:
            died = await opened.died("frozen#0")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert "health probe" in died.reason
        assert f"lost with its node {node}" in caplog.text  # avoided from now on
        with trio.fail_after(WAIT):
            await opened.runtime.start_replica(effect("frozen#1", "Echo", **probe))
        assert await opened.runtime.call("frozen#1", [q("x")]) == ["x"]
        info = opened.runtime.replica_info("frozen#1")
        assert info is not None and info.node == node
    finally:
        await opened.runtime.close()


# ---------------------------------------------------------------------------------------
# Deadlines


async def test_a_ray_call_that_never_answers_fails_within_call_timeout_s(
    rt: Opened, cluster: LocalRayCluster, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rt.runtime.start_replica(effect("echo#0", "Echo"))
    release = threading.Event()  # lets the abandoned threads go at the end

    def hangs(*_args: Any, **_kwargs: Any) -> Any:
        release.wait(WAIT)
        raise RuntimeError("released")

    runtime = RayRuntime(address=cluster.address, start_timeout_s=WAIT, call_timeout_s=0.5)
    await runtime.open(namespace=namespace, report=lambda _e: None)
    try:
        # A lost GCS, say: the listing and a stop's look-up never answer.
        monkeypatch.setattr(ray.util, "list_named_actors", hangs)
        monkeypatch.setattr(ray, "get_actor", hangs)
        with trio.fail_after(WAIT), pytest.raises(servecore.RuntimeUnresponsive) as info:
            await runtime.list_replicas()
        assert "list_named_actors" in str(info.value) and "call_timeout_s" in str(info.value)
        with trio.fail_after(WAIT), pytest.raises(servecore.RuntimeUnresponsive, match="get_actor"):
            await runtime.stop_replica("echo#0", 1.0)
        monkeypatch.undo()
        assert await runtime.list_replicas() == {"echo#0"}  # answered again: all is well
    finally:
        release.set()
        await runtime.close()
    with pytest.raises(ValueError, match="call_timeout_s"):
        RayRuntime(call_timeout_s=0)
