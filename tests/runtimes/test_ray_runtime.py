"""The Ray runtime on a real Ray cluster: a private head node on loopback.

One head node serves the whole session (:class:`LocalRayCluster`: free ports on
127.0.0.1, a fresh temporary directory, and at the end exactly its own processes are
stopped -- never ``ray stop``). Each test works in a Ray namespace of its own and kills
what it leaves there. Targets live in ``tests/support/ray_driver.py``, which Ray workers import
as ``ray_driver`` (the session puts ``tests/support/``, and the directory this servecore is
imported from, on their ``PYTHONPATH``).

Waits are bounded only so that a bug fails a test instead of hanging it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

ray = pytest.importorskip(
    "ray", reason="the Ray runtime tests need the 'ray' extra: pip install 'servecore[ray]'"
)

import ray_driver  # noqa: E402
import servecore  # noqa: E402
from async_targets import peak_overlap  # noqa: E402
from opened_runtime import Opened  # noqa: E402
from ray_helpers import (  # noqa: E402
    NO_CPU,
    TESTS,
    WAIT,
    alive_in,
    effect,
    pid_of,
    q,
    running,
)
from servecore._core.errors import (  # noqa: E402
    BackendStartError,
    InvalidConfig,
    RemoteError,
    ReplicaDiedError,
    ResultDecodeError,
    UnpicklableResult,
)
from servecore._core.transitions import BackendConfig, ReplicaStatus, StartReplica  # noqa: E402
from servecore._core.values import backend_of  # noqa: E402
from servecore.runtimes import Query  # noqa: E402
from servecore.runtimes.ray import (  # noqa: E402
    RUNTIME_OPTIONS,
    LocalRayCluster,
    RayRuntime,
    actor_options,
)
from servecore.runtimes.ray.actor import PROTOCOL  # noqa: E402
from servecore.testing import check_runtime  # noqa: E402

pytestmark = pytest.mark.ray


# ---------------------------------------------------------------------------------------
# Fixtures (the cluster and namespace fixtures are in conftest.py)


@pytest.fixture
async def rt(cluster: LocalRayCluster, namespace: str) -> AsyncIterator[Opened]:
    opened = Opened(RayRuntime(address=cluster.address, start_timeout_s=WAIT))
    await opened.runtime.open(namespace=namespace, report=opened.events.append)
    try:
        yield opened
    finally:
        await opened.runtime.close()


# ---------------------------------------------------------------------------------------
# Without a cluster


def test_unknown_runtime_option_names_the_key_and_the_known_ones() -> None:
    bad = effect("a#0", "Echo", runtime_options={"num_cpus": 1, "bogus_key": 2})
    with pytest.raises(InvalidConfig) as info:
        actor_options(bad)
    assert "bogus_key" in str(info.value)
    for known in RUNTIME_OPTIONS:
        assert known in str(info.value)
    with pytest.raises(InvalidConfig, match="num_gpus"):
        actor_options(effect("a#0", "Echo", runtime_options={"num_gpus": -1}))
    with pytest.raises(InvalidConfig, match="resources"):
        actor_options(effect("a#0", "Echo", runtime_options={"resources": {"x": "lots"}}))
    options = {"num_cpus": 0.5, "resources": {"disk": 1}, "scheduling_strategy": "SPREAD"}
    assert actor_options(effect("a#0", "Echo", runtime_options=options)) == options


def test_exception_text_from_a_replica_is_encodable() -> None:
    from servecore.runtimes.ray.errors import carry, rebuild

    for original in [
        FileNotFoundError(f"no model at {ray_driver.NOT_UTF8_PATH}"),
        ray_driver.NotUTF8Error(ray_driver.NOT_UTF8_PATH),
        InvalidConfig("init_kwargs", ray_driver.NOT_UTF8_PATH, "is odd", backend="b"),
    ]:
        info = carry(original).info
        assert isinstance(info["message"], str)
        info["message"].encode("utf-8")
        info["traceback"].encode("utf-8")
        rebuilt = rebuild(info, "b#0")
        assert type(rebuilt) is type(original)
        assert "caf\\udce9" in str(rebuilt)
        "\n".join([str(rebuilt), *rebuilt.__notes__]).encode("utf-8")


def test_exceptions_are_rebuilt_as_their_own_type() -> None:
    from servecore.runtimes.ray.errors import carry as _carry
    from servecore.runtimes.ray.errors import rebuild as _rebuild

    # Pickle cannot call InvalidConfig(field, value, why) again with its args: rebuilt.
    original = InvalidConfig("max_batch_size", 3, "is odd", backend="b")
    rebuilt = _rebuild(_carry(original).info, "b#0")
    assert type(rebuilt) is InvalidConfig
    assert str(rebuilt) == str(original) and rebuilt.field == "max_batch_size"
    assert any("b#0" in note for note in rebuilt.__notes__)

    # A type the caller cannot import is named, not lost.
    info = dict(_carry(KeyError("k")).info, pickled=None, module="no_such_module_xyz")
    unknown = _rebuild(info, "b#0")
    assert isinstance(unknown, RemoteError) and "no_such_module_xyz.KeyError" in str(unknown)


# ---------------------------------------------------------------------------------------
# The runtime on its own


def test_conformance(cluster: LocalRayCluster) -> None:
    check_runtime(
        lambda: RayRuntime(address=cluster.address),
        kill=lambda runtime, tag: runtime.kill(tag),  # type: ignore[attr-defined]
        timeout_s=WAIT,
    )


async def test_start_is_get_or_create_and_listing_is_this_namespace_only(
    rt: Opened, namespace: str
) -> None:
    await rt.runtime.start_replica(effect("echo#0", "Echo", "a:"))
    # A second runtime (a restarted controller) starting the same tag gets the same actor.
    other = RayRuntime(address=rt.runtime.address)
    await other.open(namespace=namespace, report=lambda _e: None)
    try:
        await other.start_replica(effect("echo#0", "Echo", "a:"))
        assert await other.call("echo#0", [q("__identity__")]) == await rt.runtime.call(
            "echo#0", [q("__identity__")]
        )
    finally:
        await other.close()

    # Another namespace sees nothing of it; a named actor that is not a replica is ignored.
    elsewhere = RayRuntime(address=rt.runtime.address)
    await elsewhere.open(namespace=namespace + "-other", report=lambda _e: None)
    try:
        assert await elsewhere.list_replicas() == frozenset()
    finally:
        await elsewhere.close()
    helper = ray.remote(ray_driver.Pid).options(
        name="not-a-replica", namespace=namespace, lifetime="detached", num_cpus=0
    )
    helper.remote()
    assert await rt.runtime.list_replicas() == {"echo#0"}
    assert await alive_in(namespace) == {"echo#0", "not-a-replica"}


async def test_batches_user_errors_and_user_config(rt: Opened) -> None:
    await rt.runtime.start_replica(effect("b#0", "BatchSizes", max_batch_size=4))
    assert await rt.runtime.call("b#0", [q("x"), q("y"), q("z")]) == [
        ["x", 3],
        ["y", 3],
        ["z", 3],
    ]
    await rt.runtime.start_replica(effect("r#0", "Raises"))
    with pytest.raises(ray_driver.Boom) as info:
        await rt.runtime.call("r#0", [q("bad")])
    assert type(info.value) is ray_driver.Boom
    assert info.value.args == ("bad",)
    assert any("r#0" in note for note in getattr(info.value, "__notes__", []))

    await rt.runtime.start_replica(effect("c#0", "Configurable", user_config={"k": 1}))
    assert await rt.runtime.call("c#0", [q()]) == [{"k": 1}]

    # max_batch_size on a target that takes no batches is the user's error, said at start.
    with pytest.raises(InvalidConfig, match="max_batch_size"):
        await rt.runtime.start_replica(effect("e#0", "Echo", max_batch_size=2))
    assert "e#0" not in await rt.runtime.list_replicas()


async def test_concurrent_and_cancelled_calls(rt: Opened) -> None:
    await rt.runtime.start_replica(effect("echo#0", "Echo", "e:"))
    await rt.runtime.start_replica(effect("slow#1", "Slow"))
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        (results[i],) = await rt.runtime.call("echo#0", [q(i)])

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(one, i)
    assert results == {i: f"e:{i}" for i in range(50)}

    # A caller that gives up, alone or among others, leaves the runtime working.
    with trio.move_on_after(0.3) as alone:
        await rt.runtime.call("slow#1", [q(1.0)])
    assert alone.cancelled_caught
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.runtime.call, "slow#1", [q(0.5)])
        await trio.sleep(0.05)  # that call waits now, so the next one waits among others
        with trio.move_on_after(0.3) as among:
            await rt.runtime.call("slow#1", [q(0.5)])
    assert among.cancelled_caught
    assert await rt.runtime.call("slow#1", [q(0.01)]) == [0.01]
    assert await rt.runtime.call("echo#0", [q("x"), q("y")]) == ["e:x", "e:y"]


async def test_death_is_reported_without_a_query_and_fails_calls_in_flight(
    rt: Opened, namespace: str
) -> None:
    await rt.runtime.start_replica(effect("slow#0", "Slow"))
    pid = await trio.to_thread.run_sync(pid_of, namespace, "slow#0")
    outcome: list[BaseException] = []

    async def query() -> None:
        try:
            await rt.runtime.call("slow#0", [q(600)])
        except BaseException as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(query)
        await trio.sleep(0.5)  # let the call reach the replica
        os.kill(pid, signal.SIGKILL)
        died = await rt.died("slow#0")
    assert "slow#0" in died.tag
    assert len(outcome) == 1 and isinstance(outcome[0], ReplicaDiedError), outcome
    assert "slow#0" not in await rt.runtime.list_replicas()
    with pytest.raises(ReplicaDiedError):
        await rt.runtime.call("slow#0", [q(0)])

    # Deaths are reported promptly even when nobody queries.
    await rt.runtime.start_replica(effect("idle#0", "Echo"))
    pid = await trio.to_thread.run_sync(pid_of, namespace, "idle#0")
    os.kill(pid, signal.SIGKILL)
    await rt.died("idle#0")  # reported with no query in flight (bounded wait inside)


async def test_failing_health_check_is_a_death(cluster: LocalRayCluster, namespace: str) -> None:
    opened = Opened(RayRuntime(address=cluster.address, health_check_period_s=0.2))
    await opened.runtime.open(namespace=namespace, report=opened.events.append)
    try:
        await opened.runtime.start_replica(effect("sick#0", "Unhealthy"))
        assert await opened.runtime.call("sick#0", [q("fine")]) == ["fine"]
        await trio.sleep(1.0)  # several health checks pass
        assert not opened.events
        assert await opened.runtime.call("sick#0", [q("poison")]) == ["poison"]
        died = await opened.died("sick#0")
        assert "health check failed" in died.reason and "poisoned on purpose" in died.reason
        assert "sick#0" not in await opened.runtime.list_replicas()
    finally:
        await opened.runtime.close()


async def test_stop_drains_then_kills(rt: Opened, namespace: str) -> None:
    await rt.runtime.start_replica(effect("slow#0", "Slow"))
    results: list[Any] = []

    async def query(seconds: float) -> None:
        try:
            results.append(await rt.runtime.call("slow#0", [q(seconds)]))
        except BaseException as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(query, 1.0)
        await trio.sleep(0.3)
        await rt.runtime.stop_replica("slow#0", timeout_s=WAIT)  # waits for the query
        assert results == [[1.0]]
    assert "slow#0" not in await alive_in(namespace)
    assert not rt.events, "a stop was reported as a death"
    await rt.runtime.stop_replica("slow#0", timeout_s=1.0)  # idempotent

    # A query that outlasts the timeout is cut off: it fails, and the stop does not hang.
    await rt.runtime.start_replica(effect("slow#1", "Slow"))
    results.clear()

    async def long_query() -> None:
        try:
            results.append(await rt.runtime.call("slow#1", [q(600)]))
        except BaseException as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_query)
        await trio.sleep(0.3)
        with trio.fail_after(WAIT):
            await rt.runtime.stop_replica("slow#1", timeout_s=0.5)
    assert len(results) == 1 and isinstance(results[0], ReplicaDiedError), results
    assert "slow#1" not in await alive_in(namespace)
    assert not rt.events


async def test_unschedulable_replica_times_out_and_is_killed(
    cluster: LocalRayCluster, namespace: str
) -> None:
    runtime = RayRuntime(address=cluster.address, start_timeout_s=3.0)
    await runtime.open(namespace=namespace, report=lambda _e: None)
    try:
        with pytest.raises(TimeoutError, match="no_such_resource"):
            await runtime.start_replica(
                effect("big#0", "Echo", runtime_options={"resources": {"no_such_resource": 1}})
            )
        assert "big#0" not in await alive_in(namespace)
    finally:
        await runtime.close()


async def test_a_stop_overtakes_a_hung_start(rt: Opened, namespace: str) -> None:
    # A constructor that does not return: the stop kills the actor once its own timeout
    # is up, and the start raises instead of waiting for the constructor.
    outcome: list[BaseException | None] = []

    async def start() -> None:
        try:
            await rt.runtime.start_replica(effect("hung#0", "SlowInit", 600.0))
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    with trio.fail_after(WAIT):  # the start ends with the stop, not with its constructor
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            while "hung#0" not in await alive_in(namespace):
                await trio.sleep(0.05)
            await rt.runtime.stop_replica("hung#0", timeout_s=0.5)
    assert len(outcome) == 1 and isinstance(outcome[0], ReplicaDiedError), outcome
    assert "stopped while it started" in str(outcome[0])
    assert "hung#0" not in await alive_in(namespace)
    assert "hung#0" not in await rt.runtime.list_replicas()
    assert not rt.events, "a stop was reported as a death"
    # The tag is free again: a new start of it works.
    await rt.runtime.start_replica(effect("hung#0", "Echo"))
    assert await rt.runtime.call("hung#0", [q("x")]) == ["x"]


async def test_replica_error_text_is_encodable_utf8(rt: Opened) -> None:
    # A message with a lone surrogate (a non-UTF-8 file name) comes back encodable, both
    # as plain args and through a computed __str__, traceback notes included.
    for custom, kind in [(False, FileNotFoundError), (True, ray_driver.NotUTF8Error)]:
        with pytest.raises(kind) as info:
            await rt.runtime.start_replica(effect("bad#0", "FailsWithNotUTF8", custom))
        text = "\n".join([str(info.value), *getattr(info.value, "__notes__", [])])
        text.encode("utf-8")
        assert "/data/caf\\udce9.bin" in str(info.value)


#: What each hostile result of ``ray_driver.HostileResults`` becomes: the type named, and
#: what rebuilding it raised in the host.
HOSTILE = [
    ("exit", "sys.exit", "SystemExit: 3"),
    ("fails", "ray_driver.refuse_to_rebuild", "ValueError: this object refuses"),
    ("replica_only", "replica_only_module.Secret", "ModuleNotFoundError"),
]


async def test_results_the_host_cannot_rebuild_or_the_replica_cannot_pickle_are_typed(
    rt: Opened,
) -> None:
    await rt.runtime.start_replica(effect("hostile#0", "HostileResults"))
    for kind, type_name, reason in HOSTILE:
        # Never a BaseException unwinding trio, nor a call left waiting on Ray's thread.
        with trio.fail_after(WAIT), pytest.raises(ResultDecodeError) as info:
            await rt.runtime.call("hostile#0", [q(kind)])
        error = info.value
        assert (error.tag, error.backend, error.type_name) == ("hostile#0", "hostile", type_name)
        assert reason in error.reason, kind
        assert "ray runtime" in str(error) and "return plain data" in str(error)

    with pytest.raises(UnpicklableResult, match="cannot send its result back") as unpicklable:
        await rt.runtime.call("hostile#0", [q("plain"), q("lock")])
    assert isinstance(unpicklable.value, TypeError)  # what a bare pickle error was
    assert unpicklable.value.tag == "hostile#0"
    assert unpicklable.value.type_name == "_thread.lock"  # the culprit, not the list

    assert not rt.events  # the replica is fine, and keeps serving
    assert await rt.runtime.call("hostile#0", [q("plain"), q(2)]) == ["plain", 2]


async def test_actors_of_other_servecore_versions_when_adopted(rt: Opened, namespace: str) -> None:
    # This version's actors say which protocol they speak.
    await rt.runtime.start_replica(effect("new#0", "Echo", "n:"))
    ready = await trio.to_thread.run_sync(
        lambda: ray.get(ray.get_actor("new#0", namespace=namespace).ready.remote(), timeout=WAIT)
    )
    assert ready["protocol"] == PROTOCOL

    def older_and_newer() -> None:
        for tag, protocol in [("old#1", None), ("newer#2", PROTOCOL + 1)]:
            ray.remote(ray_driver.ReplicaOfProtocol).options(
                name=tag, namespace=namespace, lifetime="detached", num_cpus=0, max_concurrency=3
            ).remote(protocol)
        ray.remote(ray_driver.ReplicaOfProtocol4).options(
            name="four#3", namespace=namespace, lifetime="detached", num_cpus=0
        ).remote()

    await trio.to_thread.run_sync(older_and_newer)
    # An actor of an earlier servecore (an upgrade) is adopted and serves on as it did;
    # one of a newer servecore (a downgrade) speaks what this one does not: it is killed,
    # and the controller replaces it.
    assert await rt.runtime.list_replicas() == {"new#0", "old#1", "four#3"}
    assert await rt.runtime.call("old#1", [q("x"), q("y")]) == ["old:x", "old:y"]
    assert await rt.runtime.call("new#0", [q("x")]) == ["n:x"]
    # One from before deadlines gets its calls without them (and answers them).
    soon = Query(args=("x",), deadline=time.time() + 60)
    assert await rt.runtime.call("four#3", [soon]) == ["four:x"]
    assert await alive_in(namespace) == {"new#0", "old#1", "four#3"}


# ---------------------------------------------------------------------------------------
# Through the controller and handles


async def test_end_to_end_split_scale_and_replace(cluster: LocalRayCluster, namespace: str) -> None:
    runtime = RayRuntime(address=cluster.address, start_timeout_s=WAIT)
    async with servecore.open_controller(runtime=runtime, name=namespace) as ctl:
        await ctl.create_backend(
            "v1", "ray_driver:Echo", init_args=("v1:",), runtime_options=NO_CPU
        )
        await ctl.create_backend(
            "v2", "ray_driver:Echo", init_args=("v2:",), runtime_options=NO_CPU
        )
        await ctl.create_endpoint("echo")
        await ctl.set_traffic("echo", {"v1": 0.5, "v2": 0.5})
        handle = ctl.get_handle("echo")
        answers = [await handle.call(i) for i in range(60)]
        assert all(a.endswith(f":{i}") for i, a in enumerate(answers))
        assert {a.split(":")[0] for a in answers} == {"v1", "v2"}
        assert await alive_in(namespace) == running(ctl) == {"v1#0", "v2#1"}

        await ctl.set_traffic("echo", {"v2": 1.0})
        assert {(await handle.call("x")) for _ in range(10)} == {"v2:x"}

        # Scale up: the new replicas serve, and Ray runs exactly the RUNNING ones.
        await ctl.update_backend_config("v2", num_replicas=3)
        assert len(running(ctl)) == 4
        assert await alive_in(namespace) == running(ctl)
        identities = {await handle.call("__identity__") for _ in range(12)}
        assert len(identities) == 3

        # A replica killed from outside is reported and replaced, with no query sent.
        victim = sorted(running(ctl) - {"v1#0"})[0]
        os.kill(await trio.to_thread.run_sync(pid_of, namespace, victim), signal.SIGKILL)
        with trio.fail_after(WAIT):
            while victim in ctl.state.replicas or len(running(ctl)) < 4:
                await trio.sleep(0.05)
            await ctl.settle()
        assert await alive_in(namespace) == running(ctl)
        assert victim not in running(ctl)

        # Scale down, and delete a backend: their actors go.
        await ctl.update_backend_config("v2", num_replicas=1)
        await ctl.delete_backend("v1")
        assert len(running(ctl)) == 1
        assert await alive_in(namespace) == running(ctl)

        # The user's exception type comes back through the handle.
        await ctl.create_backend("bad", "ray_driver:Raises", runtime_options=NO_CPU)
        await ctl.create_endpoint("bad")
        await ctl.set_traffic("bad", {"bad": 1.0})
        with pytest.raises(ray_driver.Boom):
            await ctl.get_handle("bad").call("x")

        # A constructor that fails: BackendStartError with the replica's own words.
        with pytest.raises(BackendStartError, match="no_such_module"):
            await ctl.create_backend("broken", "no_such_module:X", runtime_options=NO_CPU)
        assert await alive_in(namespace) == running(ctl)

        # Not even when its words are not UTF-8: the controller stays up and saves them.
        with pytest.raises(BackendStartError, match="udce9"):
            await ctl.create_backend(
                "not_utf8", "ray_driver:FailsWithNotUTF8", runtime_options=NO_CPU
            )
        await ctl.create_backend("after", "ray_driver:Echo", runtime_options=NO_CPU)
        assert "after#" in " ".join(running(ctl))


async def test_a_hostile_result_fails_its_call_and_the_controller_keeps_serving(
    cluster: LocalRayCluster, namespace: str
) -> None:
    runtime = RayRuntime(address=cluster.address, start_timeout_s=WAIT)
    async with servecore.open_controller(runtime=runtime, name=namespace) as ctl:
        await ctl.create_backend("hostile", "ray_driver:HostileResults", runtime_options=NO_CPU)
        await ctl.create_endpoint("hostile")
        await ctl.set_traffic("hostile", {"hostile": 1.0})
        handle = ctl.get_handle("hostile")
        before = running(ctl)
        for kind, type_name, _reason in HOSTILE:
            with trio.fail_after(WAIT), pytest.raises(ResultDecodeError) as info:
                await handle.call(kind)
            assert info.value.type_name == type_name
        with trio.fail_after(WAIT), pytest.raises(UnpicklableResult, match=r"_thread\.lock"):
            await handle.call("lock")
        # The same replica serves on: nothing died, nothing was replaced.
        assert await handle.call("plain") == "plain"
        assert running(ctl) == before == await alive_in(namespace)
        assert ctl.state.backends["hostile"].status.name == "HEALTHY"


async def test_batching_through_handles(cluster: LocalRayCluster, namespace: str) -> None:
    # The runtime chosen by name, configured through the controller.
    async with servecore.open_controller(
        runtime="ray",
        runtime_options={"address": cluster.address, "start_timeout_s": WAIT},
        name=namespace,
    ) as ctl:
        assert isinstance(ctl.runtime, RayRuntime)
        await ctl.create_backend(
            "sizes",
            "ray_driver:BatchSizes",
            max_batch_size=4,
            batch_wait_timeout_s=0.2,
            runtime_options=NO_CPU,
        )
        await ctl.create_endpoint("sizes")
        await ctl.set_traffic("sizes", {"sizes": 1.0})
        handle = ctl.get_handle("sizes")
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            results[i] = await handle.call(i)

        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(one, i)
        assert sorted(results) == list(range(12))
        assert all(value == i for i, (value, _size) in results.items())
        sizes = [size for _value, size in results.values()]
        assert max(sizes) > 1 and max(sizes) <= 4


# ---------------------------------------------------------------------------------------
# A controller crash


def _read_until(proc: subprocess.Popen[str], marker: str) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + WAIT
    for line in proc.stdout:
        if line.strip() == marker:
            return
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"the driver did not print {marker!r} (exit {proc.poll()})")


async def test_controller_killed_mid_scale_up_recovers_exactly(
    cluster: LocalRayCluster, namespace: str, tmp_path: Path
) -> None:
    db = tmp_path / "state.db"
    driver = subprocess.Popen(
        [
            sys.executable,
            str(TESTS / "ray_driver.py"),
            f"--address={cluster.address}",
            f"--namespace={namespace}",
            f"--db={db}",
            "--scale-to=4",
            "--delay=2.0",
        ],
        env={**os.environ, **cluster.env()},
        cwd=tmp_path,  # its workers import ray_driver from the script's directory
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        await trio.to_thread.run_sync(_read_until, driver, "SCALING")
        # Mid scale-up: the new actors exist, their constructors are still running.
        with trio.fail_after(WAIT):
            while len(await alive_in(namespace)) < 3:
                await trio.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        await trio.to_thread.run_sync(driver.wait)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        if driver.stdout is not None:
            driver.stdout.close()

    # An orphan: an actor under a tag that no checkpoint knows.
    stray = RayRuntime(address=cluster.address)
    await stray.open(namespace=namespace, report=lambda _e: None)
    await stray.start_replica(effect("stray#99", "Echo"))
    await stray.close()
    assert "stray#99" in await alive_in(namespace)

    runtime = RayRuntime(address=cluster.address, start_timeout_s=WAIT)
    async with servecore.open_controller(
        runtime=runtime, store=servecore.SQLiteStore(db), name=namespace
    ) as ctl:
        with trio.fail_after(WAIT):
            await ctl.settle()
        backend = ctl.state.backends["slow"]
        assert backend.config.num_replicas == 4
        assert len(running(ctl)) == 4
        assert all(r.status is ReplicaStatus.RUNNING for r in ctl.state.replicas.values())
        assert await alive_in(namespace) == running(ctl)
        handle = ctl.get_handle("slow")
        assert [await handle.call(i) for i in range(4)] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------
# Async targets


def async_effect(tag: str, target: str, *init_args: Any, **config: Any) -> StartReplica:
    config.setdefault("runtime_options", NO_CPU)
    return StartReplica(
        tag=tag,
        backend=backend_of(tag),
        target=f"async_targets:{target}",
        init_args=tuple(init_args),
        init_kwargs={},
        config=BackendConfig(**config),
    )


async def test_async_targets_run_concurrently_and_a_caller_that_gives_up_cancels(
    rt: Opened,
) -> None:
    await rt.runtime.start_replica(async_effect("rec#0", "Recorder", 1.0, max_concurrent_queries=4))
    # Constructed on the replica's own loop; queries run on that loop.
    ((same_loop, thread),) = await rt.runtime.call("rec#0", [q("where")])
    assert same_loop and thread.startswith("servecore-loop-")

    answers: list[Any] = []

    async def one(n: int) -> None:
        answers.extend(await rt.runtime.call("rec#0", [q(n)]))

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(one, n)
    assert sorted(a[0] for a in answers) == [0, 1, 2, 3]
    assert peak_overlap([(start, end) for _n, start, end in answers]) == 4  # at once

    # A caller that gives up cancels the task in the replica: the target sees it.
    with trio.move_on_after(WAIT) as gave_up:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rt.runtime.call, "rec#0", [q("hang")])
            with trio.fail_after(WAIT):
                while not (await rt.runtime.call("rec#0", [q("hanging")]))[0]:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    assert not gave_up.cancelled_caught
    with trio.fail_after(WAIT):
        while (await rt.runtime.call("rec#0", [q("cancelled")]))[0] != ["hang"]:
            await trio.sleep(0.02)
    assert not rt.events

    # Async batches and the user's own errors, as everywhere.
    await rt.runtime.start_replica(async_effect("dbl#0", "async_double_all", max_batch_size=3))
    assert await rt.runtime.call("dbl#0", [q(1), q(2), q(3)]) == [(2, 3), (4, 3), (6, 3)]
    await rt.runtime.start_replica(async_effect("fail#0", "async_fail"))
    with pytest.raises(LookupError, match="no model named 'x'"):
        await rt.runtime.call("fail#0", [q("x")])


async def test_async_backends_through_the_controller(
    cluster: LocalRayCluster, namespace: str
) -> None:
    runtime = RayRuntime(address=cluster.address, start_timeout_s=WAIT)
    async with servecore.open_controller(runtime=runtime, name=namespace) as ctl:
        await ctl.create_backend("echo", "async_targets:async_echo", runtime_options=NO_CPU)
        await ctl.create_endpoint("echo")
        await ctl.set_traffic("echo", {"echo": 1.0})
        handle = ctl.get_handle("echo")
        assert [await handle.call(i) for i in range(5)] == list(range(5))
