"""ctl.status() (async and sync), reading a checkpoint while its store is locked, and the
lifecycle log records."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

import servecore
from servecore.testing import InMemoryRuntime

ECHO = "servecore.testing.targets:echo"


async def test_status_shows_endpoints_backends_replicas_and_load() -> None:
    async with servecore.open_controller(runtime="threads") as ctl:
        await ctl.create_backend("echo", ECHO, num_replicas=2)
        await ctl.create_endpoint("echo", route="/echo", methods=["GET", "POST"])
        await ctl.set_traffic("echo", {"echo": 1.0})
        assert await ctl.get_handle("echo").call(1) == 1
        status = await ctl.status()
    assert status.live and status.healthy and status.seq == ctl.seq
    assert status.runtime == "ThreadRuntime"
    [ep] = status.endpoints
    assert (ep.name, ep.route, ep.methods, ep.traffic) == (
        "echo",
        "/echo",
        ("GET", "POST"),
        {"echo": 1.0},
    )
    [b] = status.backends
    assert (b.tag, b.status, b.num_replicas, b.running_replicas) == ("echo", "HEALTHY", 2, 2)
    assert (b.queued, b.running) == (0, 0)
    assert [r.status for r in b.replicas] == ["RUNNING", "RUNNING"]
    assert all(r.pid is None for r in b.replicas)  # threads have no pid of their own
    data = status.as_dict()
    assert data["healthy"] is True and data["backends"][0]["replicas"][0]["backend"] == "echo"


def test_sync_status_names_the_failed_backend_and_its_error() -> None:
    with servecore.start(runtime="threads") as ctl:
        with pytest.raises(servecore.BackendStartError):
            ctl.create_backend("bad", "servecore.testing.targets:FailingInit")
        status = ctl.status()
    [b] = status.backends
    assert not status.healthy and b.status == "FAILED"
    assert b.last_error is not None and "constructor failed on purpose" in b.last_error


def test_load_state_reads_a_locked_store(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with servecore.start(runtime="threads", store=servecore.SQLiteStore(path)) as ctl:
        ctl.create_backend("echo", ECHO)
        ctl.create_endpoint("echo", route="/echo")
        with pytest.raises(servecore.StoreLocked):
            servecore.SQLiteStore(path).open()  # the owner holds the lock...
        state = servecore.load_state(servecore.SQLiteStore(path))  # ...reading needs none
        assert state == ctl.state
        assert servecore.read_state(path) == ctl.state
    assert servecore.read_state(tmp_path / "missing.db") == servecore.State()


def test_load_state_of_a_file_store(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    with servecore.start(runtime="threads", store=servecore.FileStore(path)) as ctl:
        ctl.create_endpoint("e")
        assert servecore.read_state(path) == ctl.state


def test_load_state_follows_the_file_log_across_compactions(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    # Compacts whenever the log outgrows the live records.
    store = servecore.FileStore(path, compact_min_bytes=0)
    with servecore.start(runtime="threads", store=store) as ctl:
        for n in range(6):
            ctl.create_endpoint(f"e{n}")
            assert servecore.load_state(servecore.FileStore(path)) == ctl.state
        assert store.compactions >= 3
    unlogged = servecore.FileStore(tmp_path / "log.json")  # everything in the log
    with servecore.start(runtime="threads", store=unlogged) as ctl:
        ctl.create_endpoint("e")
        assert Path(f"{tmp_path / 'log.json'}.log").stat().st_size > 0
        assert servecore.read_state(tmp_path / "log.json") == ctl.state


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_load_state_reads_a_version_1_checkpoint_without_upgrading_it(
    tmp_path: Path, kind: str
) -> None:
    from checkpoints import encode_v1, plant_v1

    state = servecore.step(servecore.State(), servecore.CreateEndpoint(name="old")).state
    path = tmp_path / ("state.json" if kind == "file" else "state.db")
    plant_v1(kind, path, encode_v1(state, 4))
    before = path.read_bytes()
    assert servecore.read_state(path) == state
    assert path.read_bytes() == before  # read, not upgraded: that is the owner's business


async def test_lifecycle_records(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="servecore.lifecycle")
    runtime = InMemoryRuntime()
    store = servecore.MemoryStore()
    async with servecore.open_controller(runtime, store) as ctl:
        await ctl.create_backend("echo", ECHO, num_replicas=2)
        runtime.kill("echo#0", reason="out of memory")
        await ctl.settle()
        await ctl.update_backend_config("echo", num_replicas=1)
    async with servecore.open_controller(runtime, store):
        pass
    events = [(r.event, getattr(r, "replica", None)) for r in caplog.records]  # type: ignore[attr-defined]
    assert ("starting", "echo#0") in events and ("ready", "echo#0") in events
    assert ("dead", "echo#0") in events and ("starting", "echo#2") in events
    [stopping] = [tag for event, tag in events if event == "stopping"]
    assert stopping in {"echo#1", "echo#2"} and ("stopped", stopping) in events
    [kept] = {"echo#1", "echo#2"} - {stopping}
    [dead] = [r for r in caplog.records if getattr(r, "event", None) == "dead"]
    assert dead.reason == "out of memory" and "out of memory" in dead.getMessage()  # type: ignore[attr-defined]
    recovered = [r for r in caplog.records if getattr(r, "event", None) == "recovered"]
    assert recovered[-1].adopted == [kept]  # type: ignore[attr-defined]
    assert "1 replica(s) adopted, 0 restarted, 0 orphan(s) stopped" in recovered[-1].getMessage()


async def test_status_of_a_subprocess_replica_has_its_pid(tmp_path: Path) -> None:
    async with servecore.open_controller(
        "subprocess", runtime_options={"directory": str(tmp_path / "replicas")}
    ) as ctl:
        await ctl.create_backend("echo", ECHO)
        try:
            status = await ctl.status()
            [r] = status.backends[0].replicas
            assert r.pid == ctl.runtime.pid("echo#0")  # type: ignore[attr-defined]
            assert r.pid is not None and r.log_path is not None and Path(r.log_path).exists()
        finally:
            await ctl.delete_backend("echo")
            with trio.fail_after(30):
                await ctl.settle()
