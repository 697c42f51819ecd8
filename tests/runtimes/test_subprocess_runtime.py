"""The subprocess runtime against real replica processes (docs/design.md §6).

Through the Runtime protocol directly, through ``servecore.testing.check_runtime``, and
end to end through a controller and handles. Processes are checked in the process table
(psutil), never only in servecore's bookkeeping, and every process a test starts is
killed by pid when it ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
from hypothesis import HealthCheck, settings

import servecore
from servecore import (
    BackendConfig,
    BackendStartError,
    Event,
    InvalidConfig,
    ReplicaDied,
    ReplicaDiedError,
    ReplicaStatus,
    ResultDecodeError,
    SQLiteStore,
    StartReplica,
    Store,
    UnpicklableResult,
)
from servecore._core.values import backend_of
from servecore.runtimes import Query, Runtime, resolve_runtime
from servecore.runtimes.subprocess import (
    RemoteError,
    RemoteTraceback,
    RuntimeDirectoryLocked,
    SubprocessRuntime,
    replica_key,
)
from servecore.testing import CrashConsistencyMachine, check_runtime
from subprocess_helpers import gone, kill_everything_under, replica_processes
from subprocess_targets import CustomError

pytestmark = pytest.mark.slow

#: Bounded waits, so that a broken build fails instead of hanging; never asserted on.
BOUND_S = 30.0
#: What a runtime directory holds once no replica is left (dead ones' logs are in logs/).
EMPTY_DIRECTORY = [".namespace", ".owner.lock", "logs"]


@pytest.fixture
def rt_dir(tmp_path: Path) -> Iterator[Path]:
    """A private runtime directory; every process started under it is killed after."""
    yield tmp_path / "rt"
    kill_everything_under(tmp_path)


@pytest.fixture
async def runtime(rt_dir: Path) -> AsyncIterator[SubprocessRuntime]:
    """An open runtime whose reports land in ``runtime.events`` (a test attribute)."""
    rt = SubprocessRuntime(rt_dir)
    events: list[Event] = []
    rt.events = events  # type: ignore[attr-defined]
    await rt.open(namespace="test", report=events.append)
    try:
        yield rt
    finally:
        await rt.close()


def effect(tag: str, target: str, *args: Any, **config: Any) -> StartReplica:
    return StartReplica(
        tag=tag,
        backend=backend_of(tag),
        target=f"subprocess_targets:{target}",
        init_args=args,
        init_kwargs={},
        config=BackendConfig(**config),
    )


async def call1(rt: SubprocessRuntime, tag: str, *args: Any, **kwargs: Any) -> Any:
    (result,) = await rt.call(tag, [Query(args=args, kwargs=kwargs)])
    return result


async def wait_until(predicate: Any) -> None:
    with trio.fail_after(BOUND_S):
        while not predicate():
            await trio.sleep(0.01)


# -- conformance --------------------------------------------------------------------------


def test_passes_the_runtime_conformance_checks(rt_dir: Path) -> None:
    check_runtime(lambda: SubprocessRuntime(rt_dir), kill=lambda rt, tag: rt.kill(tag))  # type: ignore[attr-defined]
    assert replica_processes(rt_dir) == {}


def test_is_the_builtin_named_subprocess(rt_dir: Path) -> None:
    runtime = resolve_runtime("subprocess", directory=rt_dir)
    assert isinstance(runtime, SubprocessRuntime)
    assert runtime.directory == rt_dir


# -- start, adopt, list -------------------------------------------------------------------


async def test_start_is_idempotent_and_a_new_runtime_adopts_live_replicas(rt_dir: Path) -> None:
    first = SubprocessRuntime(rt_dir)
    await first.open(namespace="test", report=lambda e: None)
    await first.start_replica(effect("echo#1", "Echo", "a:"))
    pid = await call1(first, "echo#1", "pid")
    await first.start_replica(effect("echo#1", "Echo", "a:"))  # adopted, not restarted
    assert await call1(first, "echo#1", "pid") == pid
    assert set(replica_processes(rt_dir)) == {replica_key("echo#1")}
    await first.close()  # detach: the process keeps running
    assert not gone(pid)

    second = SubprocessRuntime(rt_dir)
    await second.open(namespace="test", report=lambda e: None)
    try:
        assert await second.list_replicas() == {"echo#1"}
        assert await call1(second, "echo#1", "x") == "a:x"
        await second.start_replica(effect("echo#1", "Echo", "a:"))
        assert await call1(second, "echo#1", "pid") == pid == second.pid("echo#1")
        await second.stop_replica("echo#1", 5.0)
        assert gone(pid)
        assert await second.list_replicas() == frozenset()
        assert sorted(p.name for p in rt_dir.iterdir()) == EMPTY_DIRECTORY
    finally:
        await second.close()


async def test_runtimes_in_different_directories_never_adopt_each_others(
    tmp_path: Path, rt_dir: Path
) -> None:
    other_dir = tmp_path / "other"
    a, b = SubprocessRuntime(rt_dir), SubprocessRuntime(other_dir)
    await a.open(namespace="a", report=lambda e: None)
    await b.open(namespace="b", report=lambda e: None)
    try:
        await a.start_replica(effect("echo#1", "Echo"))
        assert await b.list_replicas() == frozenset()
        await b.stop_replica("echo#1", 1.0)  # not b's: nothing happens to a's replica
        assert await call1(a, "echo#1", "ok") == "ok"
    finally:
        await a.close()
        await b.close()


async def test_a_directory_belongs_to_one_open_runtime_and_one_namespace(
    runtime: SubprocessRuntime, rt_dir: Path
) -> None:
    with pytest.raises(RuntimeDirectoryLocked, match="in use by another controller"):
        await SubprocessRuntime(rt_dir).open(namespace="test", report=lambda e: None)
    await runtime.close()
    with pytest.raises(ValueError, match="belongs to the controller named 'test'"):
        await SubprocessRuntime(rt_dir).open(namespace="other", report=lambda e: None)


async def test_the_default_directory_is_derived_from_the_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    try:
        rt = SubprocessRuntime()
        await rt.open(namespace="my app", report=lambda e: None)
        assert rt.directory == tmp_path / "servecore" / "my_app"
        await rt.close()
    finally:
        kill_everything_under(tmp_path)


async def test_a_long_directory_path_still_gets_sockets(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(str(deep / "x.sock")) > 108  # longer than sun_path
    rt = SubprocessRuntime(deep)
    await rt.open(namespace="deep", report=lambda e: None)
    try:
        await rt.start_replica(effect("echo#1", "Echo"))
        assert await call1(rt, "echo#1", "deep") == "deep"
    finally:
        await rt.close()
        kill_everything_under(tmp_path)


async def test_files_of_dead_replicas_are_cleaned_up(rt_dir: Path) -> None:
    rt = SubprocessRuntime(rt_dir)
    await rt.open(namespace="test", report=lambda e: None)
    await rt.start_replica(effect("echo#1", "Echo"))
    pid = rt.pid("echo#1")
    assert pid is not None
    await rt.close()
    os.kill(pid, signal.SIGKILL)  # while no runtime watches it
    psutil.Process(pid).wait(timeout=BOUND_S)  # reaps it (it is our child)

    again = SubprocessRuntime(rt_dir)
    await again.open(namespace="test", report=lambda e: None)
    try:
        assert await again.list_replicas() == frozenset()
        assert sorted(p.name for p in rt_dir.iterdir()) == EMPTY_DIRECTORY
    finally:
        await again.close()


async def test_a_reused_pid_is_neither_adopted_nor_signalled(
    runtime: SubprocessRuntime, rt_dir: Path
) -> None:
    # A stranger process holds the lock of "ghost#1" and its record names the stranger's
    # pid, but with another start time: the record is of an earlier process whose pid
    # was reused. The runtime must not adopt it, and must never signal it.
    key = replica_key("ghost#1")
    lock_fd = os.open(rt_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(rt_dir)],
        pass_fds=(lock_fd,),
    )
    os.close(lock_fd)
    try:
        record = {"tag": "ghost#1", "key": key, "pid": stranger.pid, "create_time": 1.0}
        record |= {"phase": "ready", "error": None, "startup_timeout_s": 1.0}
        (rt_dir / f"{key}.json").write_text(json.dumps(record))
        (rt_dir / f"{key}.spec.json").write_text(json.dumps({"tag": "ghost#1"}))
        assert await runtime.list_replicas() == frozenset()
        await runtime.stop_replica("ghost#1", 0.1)
        assert stranger.poll() is None, "a process that is not a replica was signalled"
    finally:
        stranger.kill()
        stranger.wait()


# -- calls and errors ---------------------------------------------------------------------


async def test_batches_and_user_exceptions_cross_the_process_boundary(
    runtime: SubprocessRuntime,
) -> None:
    await runtime.start_replica(effect("echo#1", "Echo", "p:"))
    batch = [Query(args=("a",)), Query(kwargs={"value": "b"})]
    assert await runtime.call("echo#1", batch) == ["p:a", "p:b"]
    await runtime.start_replica(
        StartReplica(
            tag="raise#1",
            backend="raise",
            target="subprocess_targets:raise_custom",
            init_args=(),
            init_kwargs={},
            config=BackendConfig(),
        )
    )
    with pytest.raises(CustomError, match="custom failure 7") as info:
        await call1(runtime, "raise#1", 7)
    assert info.value.code == 7
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_custom" in info.value.__cause__.text  # the replica's own frames
    assert any("raise#1" in note for note in info.value.__notes__)


async def test_an_exception_type_the_host_cannot_rebuild_becomes_a_remote_error(
    runtime: SubprocessRuntime,
) -> None:
    await runtime.start_replica(effect("local#1", "raise_local"))
    with pytest.raises(RemoteError, match="LocalError: from a class defined") as info:
        await call1(runtime, "local#1")
    assert "raise_local" in str(info.value.__cause__)


async def test_unpicklable_arguments_and_results_raise_type_errors(
    runtime: SubprocessRuntime,
) -> None:
    await runtime.start_replica(effect("echo#1", "Echo"))
    with pytest.raises(TypeError, match="cannot be pickled"):
        await call1(runtime, "echo#1", lambda: None)
    await runtime.start_replica(effect("lock#1", "unpicklable_result"))
    with pytest.raises(UnpicklableResult, match="cannot send its result back") as info:
        await call1(runtime, "lock#1")
    assert isinstance(info.value, TypeError)  # what it was before it had a type of its own
    assert info.value.tag == "lock#1"
    assert info.value.type_name == "_thread.lock"
    assert "return plain data" in str(info.value)
    assert await call1(runtime, "echo#1", "still fine") == "still fine"


@pytest.mark.parametrize(
    ("kind", "type_name", "reason"),
    [
        ("exit", "sys.exit", "SystemExit: 3"),
        ("fails", "subprocess_targets.refuse_to_rebuild", "ValueError: this object refuses"),
        ("replica_only", "replica_only_module.Secret", "ModuleNotFoundError"),
    ],
)
async def test_a_result_the_host_cannot_rebuild_is_a_result_decode_error(
    runtime: SubprocessRuntime, kind: str, type_name: str, reason: str
) -> None:
    # Not the user's exception (it would read as if their code raised), and never a
    # BaseException unwinding the host's trio run.
    await runtime.start_replica(effect("hostile#1", "hostile_result"))
    with pytest.raises(ResultDecodeError) as info:
        await call1(runtime, "hostile#1", kind)
    error = info.value
    assert (error.tag, error.backend, error.type_name) == ("hostile#1", "hostile", type_name)
    assert reason in error.reason
    assert "subprocess runtime" in str(error) and "return plain data" in str(error)
    assert not runtime.events  # the replica is fine, and keeps serving
    assert await call1(runtime, "hostile#1", "plain") == "plain"


async def test_calls_run_concurrently_up_to_max_concurrent_queries(
    runtime: SubprocessRuntime,
) -> None:
    # Four calls meet at a barrier in the replica: they pass only if they run at once
    # (serially, the first would wait out the barrier's timeout and break it).
    await runtime.start_replica(effect("meet#1", "Meeting", 4, max_concurrent_queries=4))
    results: list[Any] = []

    async def one() -> None:
        results.append(await call1(runtime, "meet#1"))

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
    assert sorted(results) == [0, 1, 2, 3]


async def test_large_calls_and_many_in_flight_on_one_connection_all_come_back(
    runtime: SubprocessRuntime,
) -> None:
    # Frames that span many reads (megabytes) and frames that arrive many to a read
    # (small calls sent at once), on one connection: every answer is its own call's.
    # Slow calls running beside fast ones pass the reading role between the replica's
    # threads; it was once taken twice, and a call went unanswered.
    await runtime.start_replica(effect("echo#1", "Echo", max_concurrent_queries=8))
    sizes = [0, 1, 1_000, 300_000, 3_000_000, 7] * 4 + [5] * 200

    async def one(results: dict[int, Any], i: int, size: int) -> None:
        results[i] = await call1(runtime, "echo#1", [i, "x" * size])

    for burst in range(4):
        results: dict[int, Any] = {}
        with trio.move_on_after(BOUND_S):
            async with trio.open_nursery() as nursery:
                for i, size in enumerate(sizes):
                    nursery.start_soon(one, results, i, size)
        missing = sorted(set(range(len(sizes))) - set(results))
        assert not missing, f"burst {burst}: calls {missing[:10]} never answered"
        for i, size in enumerate(sizes):
            assert results[i] == str([i, "x" * size])


async def test_user_config_env_and_batch_targets(runtime: SubprocessRuntime) -> None:
    await runtime.start_replica(effect("conf#1", "Configurable", user_config={"k": 1}))
    assert await call1(runtime, "conf#1") == {"k": 1}
    await runtime.start_replica(
        effect("env#1", "read_env", runtime_options={"env": {"SC_TEST_VAR": "yes"}})
    )
    assert await call1(runtime, "env#1", "SC_TEST_VAR") == "yes"
    await runtime.start_replica(effect("len#1", "lengths", max_batch_size=4))
    batch = [Query(args=(s,)) for s in ("a", "bb", "ccc")]
    assert await runtime.call("len#1", batch) == [1, 2, 3]
    with pytest.raises(InvalidConfig, match="max_batch_size"):
        await runtime.start_replica(effect("echo#9", "Echo", max_batch_size=4))
    assert replica_key("echo#9") not in replica_processes(runtime.directory)


# -- start failures -----------------------------------------------------------------------


async def test_start_failures_raise_the_replicas_own_error_and_leave_nothing(
    runtime: SubprocessRuntime, rt_dir: Path
) -> None:
    with pytest.raises(ValueError, match="constructor failed on purpose") as info:
        await runtime.start_replica(effect("bad#1", "FailingInit"))
    assert "subprocess_targets.py" in str(info.value.__cause__)  # the replica's frames
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        await runtime.start_replica(
            StartReplica(
                tag="missing#1",
                backend="missing",
                target="no_such_module:X",
                init_args=(),
                init_kwargs={},
                config=BackendConfig(),
            )
        )
    with pytest.raises(InvalidConfig, match="no_such_option"):
        await runtime.start_replica(
            effect("picky#1", "Echo", runtime_options={"no_such_option": 1})
        )
    with pytest.raises(InvalidConfig, match="startup_timeout_s"):
        await runtime.start_replica(
            effect("picky#2", "Echo", runtime_options={"startup_timeout_s": -1})
        )
    assert await runtime.list_replicas() == frozenset()
    assert replica_processes(rt_dir) == {}
    assert sorted(p.name for p in rt_dir.iterdir()) == EMPTY_DIRECTORY


async def test_a_replica_slower_than_startup_timeout_is_killed(
    runtime: SubprocessRuntime, rt_dir: Path
) -> None:
    slow = effect("slow#1", "SlowInit", 60, runtime_options={"startup_timeout_s": 0.5})
    with pytest.raises(TimeoutError, match=r"not ready after 0\.5s"):
        await runtime.start_replica(slow)
    assert replica_processes(rt_dir) == {}


# -- stop and death -----------------------------------------------------------------------


async def test_stop_drains_calls_in_flight(runtime: SubprocessRuntime, rt_dir: Path) -> None:
    await runtime.start_replica(effect("slow#1", "Slow"))
    pid = runtime.pid("slow#1")
    results: list[Any] = []

    async def slow_call() -> None:
        results.append(await call1(runtime, "slow#1", 0.5))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_call)
        await wait_until(lambda: runtime._replicas["slow#1"].pending)
        await runtime.stop_replica("slow#1", BOUND_S)
    assert results == ["slept 0.5"]
    assert pid is not None and gone(pid)
    assert runtime.events == []  # type: ignore[attr-defined]  # a stop is not a death
    await runtime.stop_replica("slow#1", 1.0)  # idempotent


async def test_stop_kills_a_replica_that_does_not_drain_in_time(
    runtime: SubprocessRuntime,
) -> None:
    await runtime.start_replica(effect("slow#1", "Slow"))
    pid = runtime.pid("slow#1")
    errors: list[BaseException] = []

    async def stuck_call() -> None:
        try:
            await call1(runtime, "slow#1", 600)
        except ReplicaDiedError as exc:
            errors.append(exc)

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stuck_call)
            await wait_until(lambda: runtime._replicas["slow#1"].pending)
            await runtime.stop_replica("slow#1", 0.2)
    assert len(errors) == 1
    assert pid is not None and gone(pid)


async def test_a_replica_killed_from_outside_is_reported_dead(
    runtime: SubprocessRuntime, rt_dir: Path
) -> None:
    await runtime.start_replica(effect("slow#1", "Slow"))
    pid = runtime.pid("slow#1")
    assert pid is not None
    errors: list[BaseException] = []

    async def in_flight() -> None:
        try:
            await call1(runtime, "slow#1", 600)
        except ReplicaDiedError as exc:
            errors.append(exc)

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_flight)
            await wait_until(lambda: runtime._replicas["slow#1"].pending)
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda: runtime.events)  # type: ignore[attr-defined]
    (event,) = runtime.events  # type: ignore[attr-defined]
    assert isinstance(event, ReplicaDied) and event.tag == "slow#1"
    assert "SIGKILL" in event.reason
    assert len(errors) == 1 and "SIGKILL" in str(errors[0])
    assert await runtime.list_replicas() == frozenset()
    with pytest.raises(ReplicaDiedError):
        await call1(runtime, "slow#1", 0)
    assert sorted(p.name for p in rt_dir.iterdir()) == EMPTY_DIRECTORY


async def test_system_exit_in_user_code_ends_the_replica(runtime: SubprocessRuntime) -> None:
    await runtime.start_replica(effect("exit#1", "exit_process"))
    with pytest.raises(ReplicaDiedError, match="SystemExit escaped the user code"):
        await call1(runtime, "exit#1")
    await wait_until(lambda: runtime.events)  # type: ignore[attr-defined]
    (event,) = runtime.events  # type: ignore[attr-defined]
    assert event.tag == "exit#1"
    assert "SystemExit escaped the user code" in event.reason


async def test_a_failing_health_check_ends_the_replica(rt_dir: Path) -> None:
    rt = SubprocessRuntime(rt_dir, health_check_period_s=0.05)
    events: list[Event] = []
    await rt.open(namespace="test", report=events.append)
    try:
        await rt.start_replica(effect("sick#1", "Sickly"))
        assert await call1(rt, "sick#1") == "served"
        await wait_until(lambda: events)
        (event,) = events
        assert isinstance(event, ReplicaDied) and event.tag == "sick#1"
        assert "health check failed: RuntimeError: sick after serving" in event.reason
        assert replica_processes(rt_dir) == {}
    finally:
        await rt.close()


# -- end to end through a controller and handles ------------------------------------------


async def test_a_controller_serves_through_handles_and_replaces_a_killed_replica(
    tmp_path: Path, rt_dir: Path
) -> None:
    runtime = SubprocessRuntime(rt_dir)
    store = SQLiteStore(tmp_path / "state.db")
    with trio.fail_after(BOUND_S * 2):
        async with servecore.open_controller(runtime=runtime, store=store, name="e2e") as ctl:
            await ctl.create_backend("echo", "subprocess_targets:Echo", num_replicas=2)
            await ctl.create_endpoint("echo")
            await ctl.set_traffic("echo", {"echo": 1.0})
            handle = ctl.get_handle("echo")
            assert await handle.call("hi") == "hi"

            await ctl.create_backend("raise", "subprocess_targets:raise_custom")
            await ctl.create_endpoint("raise")
            await ctl.set_traffic("raise", {"raise": 1.0})
            with pytest.raises(CustomError) as info:
                await ctl.get_handle("raise").call(3)
            assert info.value.code == 3

            await ctl.create_backend("len", "subprocess_targets:lengths", max_batch_size=8)
            await ctl.create_endpoint("len")
            await ctl.set_traffic("len", {"len": 1.0})
            async with trio.open_nursery() as nursery:
                for word in ("a", "bb", "ccc"):

                    async def one(word: str = word) -> None:
                        assert await ctl.get_handle("len").call(word) == len(word)

                    nursery.start_soon(one)

            victim = next(t for t, r in ctl.state.replicas.items() if r.backend == "echo")
            victim_pid = runtime.pid(victim)
            assert victim_pid is not None
            os.kill(victim_pid, signal.SIGKILL)
            await wait_until(lambda: victim not in ctl.state.replicas)
            await ctl.settle()
            echo = {t for t, r in ctl.state.replicas.items() if r.backend == "echo"}
            assert len(echo) == 2 and victim not in echo
            assert all(ctl.state.replicas[t].status is ReplicaStatus.RUNNING for t in echo)
            alive = replica_processes(rt_dir)
            assert set(alive) == {replica_key(t) for t in ctl.state.replicas}
            assert await handle.call("after") == "after"

            for name in ("echo", "raise", "len"):
                await ctl.delete_endpoint(name)
                await ctl.delete_backend(name)
            assert replica_processes(rt_dir) == {}


async def test_a_backend_that_cannot_start_fails_with_the_replicas_error(
    tmp_path: Path, rt_dir: Path
) -> None:
    with trio.fail_after(BOUND_S * 2):
        async with servecore.open_controller(
            runtime="subprocess", runtime_options={"directory": rt_dir}, name="fail"
        ) as ctl:
            with pytest.raises(BackendStartError, match="constructor failed on purpose"):
                await ctl.create_backend("bad", "subprocess_targets:FailingInit")
            with pytest.raises(BackendStartError, match="no_such_option"):
                await ctl.create_backend(
                    "picky", "subprocess_targets:Echo", runtime_options={"no_such_option": 1}
                )
            assert replica_processes(rt_dir) == {}


# -- the shipped crash-consistency machine, on real processes ---------------------------


class SubprocessCrashes(CrashConsistencyMachine):
    """servecore.testing's crash machine with replicas in real processes (its crashes
    are simulated in the controller; the replicas and their runtime directory are real)."""

    def make_store(self) -> Store:
        return SQLiteStore(self.tmp / "state.db")

    def make_runtime(self) -> Runtime:
        return SubprocessRuntime(self.tmp / "rt", startup_timeout_s=BOUND_S)

    def teardown(self) -> None:
        kill_everything_under(self.tmp)
        super().teardown()


TestSubprocessCrashes = SubprocessCrashes.TestCase
TestSubprocessCrashes.settings = settings(
    max_examples=10, stateful_step_count=10, deadline=None, suppress_health_check=list(HealthCheck)
)


# -- async targets ------------------------------------------------------------------------


def async_effect(tag: str, target: str, *args: Any, **config: Any) -> StartReplica:
    return StartReplica(
        tag=tag,
        backend=backend_of(tag),
        target=f"async_targets:{target}",
        init_args=args,
        init_kwargs={},
        config=BackendConfig(**config),
    )


async def overlapping(rt: SubprocessRuntime, tag: str, n: int) -> list[tuple[float, float]]:
    answers: list[Any] = []

    async def one(i: int) -> None:
        answers.append(await call1(rt, tag, i))

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    assert sorted(a[0] for a in answers) == list(range(n))
    return [(start, end) for _, start, end in answers]


async def test_async_function_class_and_batch_targets_answer(
    runtime: SubprocessRuntime,
) -> None:
    await runtime.start_replica(async_effect("aecho#1", "async_echo"))
    assert await call1(runtime, "aecho#1", value="hi") == "hi"
    await runtime.start_replica(async_effect("arec#1", "Recorder", 0.0))
    assert (await call1(runtime, "arec#1", 5))[0] == 5
    on_its_loop, thread = await call1(runtime, "arec#1", "where")
    assert on_its_loop and thread.startswith("servecore-loop-")
    await runtime.start_replica(async_effect("abat#1", "async_double_all", max_batch_size=4))
    batch = [Query(args=(v,)) for v in (1, 2, 3)]
    assert await runtime.call("abat#1", batch) == [(2, 3), (4, 3), (6, 3)]


async def test_async_queries_overlap_up_to_max_concurrent_queries(
    runtime: SubprocessRuntime,
) -> None:
    import async_targets

    await runtime.start_replica(async_effect("ov#1", "Recorder", 0.2, max_concurrent_queries=8))
    assert async_targets.peak_overlap(await overlapping(runtime, "ov#1", 8)) == 8
    await runtime.start_replica(async_effect("mc#1", "Recorder", 0.05, max_concurrent_queries=3))
    assert async_targets.peak_overlap(await overlapping(runtime, "mc#1", 8)) == 3


async def test_an_async_target_that_raises_gives_the_users_error(
    runtime: SubprocessRuntime,
) -> None:
    await runtime.start_replica(async_effect("afail#1", "async_fail"))
    with pytest.raises(LookupError, match="no model named 'm'"):
        await call1(runtime, "afail#1", "m")
    assert not runtime.events  # a user error is not a death
    assert await runtime.list_replicas() == {"afail#1"}


async def test_a_cancelled_query_cancels_its_task_in_the_replica(
    runtime: SubprocessRuntime,
) -> None:
    await runtime.start_replica(async_effect("acx#1", "Recorder", 0.0, max_concurrent_queries=4))
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call1, runtime, "acx#1", "hang")
            while not await call1(runtime, "acx#1", "hanging"):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        while await call1(runtime, "acx#1", "cancelled") != ["hang"]:
            await trio.sleep(0.01)
    assert (await call1(runtime, "acx#1", 1))[0] == 1
    assert not runtime.events


async def test_a_handle_timeout_cancels_the_async_task(tmp_path: Path, rt_dir: Path) -> None:
    with trio.fail_after(BOUND_S * 2):
        async with servecore.open_controller(
            runtime="subprocess", runtime_options={"directory": rt_dir}, name="atimeout"
        ) as ctl:
            await ctl.create_backend(
                "rec", "async_targets:Recorder", init_args=(0.0,), max_concurrent_queries=4
            )
            await ctl.create_endpoint("rec")
            await ctl.set_traffic("rec", {"rec": 1.0})
            handle = ctl.get_handle("rec")
            with pytest.raises(TimeoutError):
                await handle.options(timeout_s=0.3).call("hang")
            while await handle.call("cancelled") != ["hang"]:
                await trio.sleep(0.01)
            await ctl.delete_endpoint("rec")
            await ctl.delete_backend("rec")


# -- liveness probed from outside ---------------------------------------------------------


async def test_a_stopped_replica_is_declared_dead_by_its_probe_and_replaced(
    tmp_path: Path, rt_dir: Path
) -> None:
    """SIGSTOP freezes the whole process, its own health-check thread too: only the
    host's probe, unanswered for health_check_timeout_s, finds it; then it is killed,
    reported dead, and the controller starts another."""
    runtime = SubprocessRuntime(rt_dir)
    with trio.fail_after(BOUND_S * 2):
        async with servecore.open_controller(
            runtime=runtime, store=SQLiteStore(tmp_path / "s.db"), name="probe"
        ) as ctl:
            await ctl.create_backend(
                "echo",
                "subprocess_targets:Echo",
                health_check_period_s=0.1,
                health_check_timeout_s=0.5,
                graceful_shutdown_timeout_s=1.0,
            )
            await ctl.create_endpoint("echo")
            await ctl.set_traffic("echo", {"echo": 1.0})
            pid = runtime.pid("echo#0")
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            await wait_until(lambda: "echo#0" not in ctl.state.replicas)
            await wait_until(
                lambda: any(r.status is ReplicaStatus.RUNNING for r in ctl.state.replicas.values())
            )
            assert set(ctl.state.replicas) == {"echo#1"}
            assert gone(pid)
            assert await ctl.get_handle("echo").call("after") == "after"


async def test_a_replica_busy_with_slow_queries_still_answers_its_probe(
    tmp_path: Path, rt_dir: Path
) -> None:
    """The probe has a connection of its own: queries longer than the timeout, filling
    every slot, do not make a healthy replica look dead."""
    runtime = SubprocessRuntime(rt_dir)
    with trio.fail_after(BOUND_S * 2):
        async with servecore.open_controller(
            runtime=runtime, store=SQLiteStore(tmp_path / "s.db"), name="busy"
        ) as ctl:
            await ctl.create_backend(
                "slow",
                "subprocess_targets:Slow",
                max_concurrent_queries=1,
                health_check_period_s=0.1,
                health_check_timeout_s=0.5,
            )
            await ctl.create_endpoint("slow")
            await ctl.set_traffic("slow", {"slow": 1.0})
            await ctl.get_handle("slow").call(2.0)  # four timeouts long
            assert set(ctl.state.replicas) == {"slow#0"}
