"""Host threads reach subprocess replicas directly: ``SyncHandle.call`` sends a query
over the calling thread's own connection, without a detour through the controller's
trio thread, and falls back to trio only when it must."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio

from servecore import ReplicaDiedError, SyncController, start
from servecore.runtimes.subprocess import SubprocessRuntime

ECHO = "subprocess_targets:Echo"


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[SyncController]:
    runtime = SubprocessRuntime(tmp_path / "replicas")
    with start(runtime, None, resync_interval_s=None) as ctl:
        try:
            yield ctl
        finally:
            for tag in list(ctl.state.backends):
                for endpoint, ep in ctl.state.endpoints.items():
                    if tag in ep.traffic:
                        ctl.delete_endpoint(endpoint)
                ctl.delete_backend(tag)


def _serve(ctl: SyncController, n: int = 1) -> None:
    ctl.create_backend("echo", ECHO, num_replicas=n)
    ctl.create_endpoint("echo")
    ctl.set_traffic("echo", {"echo": 1.0})


def test_a_host_thread_queries_a_replica_while_the_trio_thread_is_busy(
    ctl: SyncController,
) -> None:
    """With the controller's loop blocked, a query from a host thread still gets its
    answer: it never entered trio."""
    _serve(ctl)
    handle = ctl.get_handle("echo")
    assert handle.call("warm") == "warm"  # the thread's connection is made
    go, blocking, release = threading.Event(), threading.Event(), threading.Event()
    released: list[bool] = []

    async def block_the_loop(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while not go.is_set():  # let run_in_background's answer reach the host thread
            await trio.sleep(0.01)
        blocking.set()
        released.append(release.wait(20))  # blocks trio itself, on purpose

    ctl.run_in_background(block_the_loop)
    go.set()
    assert blocking.wait(20)
    try:
        answer = handle.call("while blocked")
    finally:
        release.set()
    ctl.settle()  # the loop runs again
    assert answer == "while blocked"
    assert released == [True], "the query waited for the trio thread"


def test_many_host_threads_each_get_their_answers(ctl: SyncController) -> None:
    _serve(ctl, n=2)
    handle = ctl.get_handle("echo")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(handle.call, range(400)))
    assert answers == [str(i) for i in range(400)]
    stats = ctl.router_statistics()
    assert stats is not None
    assert stats.queries[("echo", "echo", "ok")] == 400


def test_user_errors_keep_their_type_on_the_direct_path(ctl: SyncController) -> None:
    ctl.create_backend("fail", "subprocess_targets:raise_custom")
    ctl.create_endpoint("fail")
    ctl.set_traffic("fail", {"fail": 1.0})
    import subprocess_targets

    with pytest.raises(subprocess_targets.CustomError):
        ctl.get_handle("fail").call(7)


def test_a_replaced_replica_is_reached_again(ctl: SyncController) -> None:
    """A replica that dies is replaced; the thread's old connection is dropped and the
    next query reaches the new process."""
    _serve(ctl)
    handle = ctl.get_handle("echo")
    assert handle.call(1) == "1"
    (tag,) = ctl.state.replicas
    runtime = ctl.runtime
    assert isinstance(runtime, SubprocessRuntime)
    ctl.run_in_background(_kill, runtime, tag)
    ctl.settle()
    for attempt in range(50):
        try:
            assert handle.call(2) == "2"
            break
        except ReplicaDiedError:
            assert attempt < 49
    assert set(ctl.state.replicas) != {tag}


async def _kill(runtime: SubprocessRuntime, tag: str, task_status: Any) -> None:
    runtime.kill(tag)
    task_status.started()
