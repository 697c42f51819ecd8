"""The checkpoint records the runtime its replicas run on, and refuses another one.

A controller opened on a checkpoint whose replicas live in another runtime would not
find them: it would start them again beside the old ones, which then run for ever.
So ``open_controller`` refuses, before it touches a replica, with ``RuntimeMismatch``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import servecore
from servecore import MemoryStore, RuntimeMismatch, SQLiteStore
from servecore._core.records import RUNTIME_KEY, read_runtime, records_of, runtime_record
from servecore._core.transitions import BackendConfig, CreateBackend, State, step
from subprocess_helpers import kill_everything_under, replica_processes

BOUND_S = 60


def _recorded(store: MemoryStore) -> str | None:
    return read_runtime(store.load()[1], "test")


def _state_with_replica() -> State:
    command = CreateBackend(tag="echo", target="targets:Echo", config=BackendConfig(num_replicas=1))
    return step(State(), command).state


async def test_a_new_checkpoint_records_its_runtime_with_its_first_commit() -> None:
    store = MemoryStore()
    async with servecore.open_controller("threads", store) as ctl:
        await ctl.create_endpoint("e")
    assert _recorded(store) == "threads"


async def test_a_checkpoint_written_before_the_record_gets_it_when_opened() -> None:
    store = MemoryStore(records_of(_state_with_replica(), 3), seq=3)
    async with servecore.open_controller("threads", store) as ctl:
        assert set(ctl.state.backends) == {"echo"}
    assert _recorded(store) == "threads"


async def test_another_runtime_is_refused_and_the_checkpoint_is_left_as_it_was() -> None:
    records = records_of(_state_with_replica(), 3)
    records[RUNTIME_KEY] = runtime_record("subprocess")
    store = MemoryStore(records, seq=3)
    with pytest.raises(RuntimeMismatch) as caught:
        async with servecore.open_controller("threads", store):
            pytest.fail("opened")  # pragma: no cover
    error = caught.value
    assert (error.recorded, error.given, error.replicas) == ("subprocess", "threads", 1)
    assert isinstance(error, servecore.CommandError)
    message = str(error)
    assert "'subprocess'" in message and "'threads'" in message
    assert "--runtime subprocess" in message and "delete its backends" in message
    assert store.load() == (3, records)


async def test_a_checkpoint_without_replicas_may_switch_runtimes() -> None:
    state = step(
        State(), CreateBackend(tag="z", target="targets:Echo", config=BackendConfig(num_replicas=0))
    ).state
    records = records_of(state, 2)
    records[RUNTIME_KEY] = runtime_record("subprocess")
    store = MemoryStore(records, seq=2)
    async with servecore.open_controller("threads", store):
        pass
    assert _recorded(store) == "threads"


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    kill_everything_under(tmp_path)


@pytest.mark.slow
async def test_subprocess_replicas_are_left_alone_when_reopened_with_threads(
    project: Path,
) -> None:
    db = project / "state.db"
    replicas_dir = project / "state.db.replicas" / "servecore"
    with trio.fail_after(BOUND_S):
        async with servecore.open_controller("subprocess", SQLiteStore(db)) as ctl:
            await ctl.create_backend("echo", "subprocess_targets:Echo")
            # The default runtime directory is beside the store.
            assert ctl.runtime.directory == replicas_dir
        before = {k: p.pid for k, p in replica_processes(replicas_dir).items()}
        assert len(before) == 1
        with pytest.raises(RuntimeMismatch, match="'subprocess'"):
            async with servecore.open_controller("threads", SQLiteStore(db)):
                pytest.fail("opened")  # pragma: no cover
        assert {k: p.pid for k, p in replica_processes(replicas_dir).items()} == before
        async with servecore.open_controller("subprocess", SQLiteStore(db)) as ctl:
            # Adopted: the same process, found again, nothing started.
            assert sum(ctl.lifecycle_counts.starts.values()) == 0
            assert {k: p.pid for k, p in replica_processes(replicas_dir).items()} == before
            await ctl.delete_backend("echo")
        assert replica_processes(replicas_dir) == {}


@pytest.mark.slow
async def test_two_projects_get_their_own_replica_directories(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    try:
        with trio.fail_after(BOUND_S):
            async with (
                servecore.open_controller("subprocess", SQLiteStore(one / "state.db")) as a,
                servecore.open_controller("subprocess", SQLiteStore(two / "state.db")) as b,
            ):
                assert a.runtime.directory != b.runtime.directory
                await a.create_backend("echo", "subprocess_targets:Echo")
                await b.create_backend("echo", "subprocess_targets:Echo")
                assert len(replica_processes(a.runtime.directory)) == 1
                assert len(replica_processes(b.runtime.directory)) == 1
                await a.delete_backend("echo")
                await b.delete_backend("echo")
    finally:
        kill_everything_under(tmp_path)
