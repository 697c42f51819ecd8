"""Crash consistency of the subprocess runtime with real processes.

A host process (``subprocess_host.py``) runs a controller with ``SubprocessRuntime`` and
``SQLiteStore`` through a scenario (create, route, query, scale 2 -> 3 -> 1) and SIGKILLs
itself at crash point ``k``: before or after a checkpoint save, a replica start or a
replica stop. Every point the scenario has is enumerated. Then this process opens a
controller on the same store and runtime directory and checks, from the *process
table* (not from servecore's bookkeeping), that the replicas alive are exactly the
RUNNING ones, that each backend runs ``num_replicas``, that queries succeed, and that
deleting the backend leaves no replica process behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import servecore
from servecore import ReplicaStatus, SQLiteStore
from servecore._core.records import decode_blob, replace_all
from servecore.runtimes import Query
from servecore.runtimes.subprocess import SubprocessRuntime, replica_key
from subprocess_helpers import kill_everything_under, replica_processes

pytestmark = pytest.mark.slow

HOST = Path(__file__).resolve().parents[1] / "support" / "subprocess_host.py"
#: Upper bound on the scenario's crash points; a test below checks it is not exceeded,
#: so that no point goes unvisited.
MAX_POINTS = 34
#: Bounded waits: only so that a broken build fails instead of hanging.
HOST_TIMEOUT_S = 60.0


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A private directory; every process started under it is killed afterwards."""
    yield tmp_path
    kill_everything_under(tmp_path)


def run_host(workdir: Path, crash_at: int | str | None) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        str(HOST),
        str(workdir / "state.db"),
        str(workdir / "rt"),
        str(workdir / "checkpoints"),
    ]
    if crash_at is not None:
        args.append(str(crash_at))
    return subprocess.run(args, capture_output=True, text=True, timeout=HOST_TIMEOUT_S)


def points_of(output: str) -> list[str]:
    return [line.split(" ", 2)[2] for line in output.splitlines() if line.startswith("POINT ")]


async def recover_and_check(workdir: Path, store: SQLiteStore | None = None) -> None:
    """Open a controller on what the host left; check the invariants; delete all."""
    runtime_dir = workdir / "rt"
    store = store or SQLiteStore(workdir / "state.db")
    runtime = SubprocessRuntime(runtime_dir)
    with trio.fail_after(HOST_TIMEOUT_S):
        async with servecore.open_controller(runtime=runtime, store=store, name="crash") as ctl:
            await ctl.settle()
            state = ctl.state
            statuses = {tag: r.status for tag, r in state.replicas.items()}
            assert set(statuses.values()) <= {ReplicaStatus.RUNNING}, statuses
            running = set(statuses)

            # Exactly the RUNNING replicas have a process, and nothing else does.
            alive = replica_processes(runtime_dir)
            assert set(alive) == {replica_key(tag) for tag in running}
            for tag in running:
                assert runtime.pid(tag) == alive[replica_key(tag)].pid

            for backend in state.backends.values():
                mine = [t for t in running if state.replicas[t].backend == backend.tag]
                assert len(mine) == backend.config.num_replicas

            # Every replica answers, and so does the endpoint if it has traffic.
            for tag in running:
                assert await runtime.call(tag, [Query(args=(tag,))]) == [tag]
            endpoint = state.endpoints.get("echo")
            if endpoint is not None and endpoint.traffic:
                assert await ctl.get_handle("echo").call("again") == "again"

            for name in list(state.endpoints):
                await ctl.delete_endpoint(name)
            for tag in list(state.backends):
                await ctl.delete_backend(tag)
            assert not ctl.state.replicas
            assert replica_processes(runtime_dir) == {}
    assert replica_processes(runtime_dir) == {}


def test_the_host_runs_the_whole_scenario(workdir: Path) -> None:
    """Baseline: no crash. Also pins the number of crash points the tests below visit."""
    done = run_host(workdir, None)
    assert done.returncode == 0, done.stderr
    assert "DONE" in done.stdout
    points = points_of(done.stdout)
    assert 0 < len(points) <= MAX_POINTS, points
    labels = " | ".join(points)
    for kind in ("before save", "after save", "before start", "after start", "before stop"):
        assert kind in labels
    # The host is gone; its replicas are not (one left after scaling down to 1).
    assert len(replica_processes(workdir / "rt")) == 1
    trio.run(recover_and_check, workdir)


@pytest.mark.parametrize("crash_at", range(MAX_POINTS))
def test_sigkill_of_the_host_at_every_point(workdir: Path, crash_at: int) -> None:
    crashed = run_host(workdir, crash_at)
    if "DONE" in crashed.stdout:
        points = len(points_of(crashed.stdout))
        assert crash_at >= points, f"point {crash_at} of {points} never crashed the host"
        pytest.skip(f"the scenario has {points} crash points")
    assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr)
    trio.run(recover_and_check, workdir)


def test_replicas_of_a_superseded_checkpoint_are_stopped_as_orphans(workdir: Path) -> None:
    """The host ran to the end; its replicas run. Recovering from an *earlier*
    checkpoint -- one written before the backend existed, which a later one superseded,
    restored into the same store (the runtime directory serves that store only) --
    finds those replicas unknown, and stops them."""
    done = run_host(workdir, None)
    assert done.returncode == 0, done.stderr
    assert replica_processes(workdir / "rt")
    earlier = workdir / "checkpoints" / "0001.bin"  # only the endpoint
    assert b"echo#" not in earlier.read_bytes()
    store = SQLiteStore(workdir / "state.db")  # rolled back in place
    store.open()
    seq, records = decode_blob(earlier.read_bytes(), str(earlier))
    _, now = store.load()
    store.commit(seq, *replace_all(now, records))
    store.close()

    async def recover() -> None:
        async with servecore.open_controller(
            runtime=SubprocessRuntime(workdir / "rt"), store=store, name="crash"
        ) as ctl:
            await ctl.settle()
            assert not ctl.state.replicas
            assert replica_processes(workdir / "rt") == {}

    trio.run(recover)
    assert replica_processes(workdir / "rt") == {}


def test_sigkill_of_the_host_while_replicas_are_starting(workdir: Path) -> None:
    """The host dies after spawning replicas whose constructors still run. The next
    controller waits for them (they are STARTING in the checkpoint), adopts them, and
    starts nothing twice."""
    crashed = run_host(workdir, "mid-start")
    assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr)
    assert "CRASH mid-start" in crashed.stdout
    starting = replica_processes(workdir / "rt")
    assert len(starting) == 2
    pids = {key: proc.pid for key, proc in starting.items()}

    async def recover() -> None:
        async with servecore.open_controller(
            runtime=SubprocessRuntime(workdir / "rt"),
            store=SQLiteStore(workdir / "state.db"),
            name="crash",
        ) as ctl:
            running = ctl.state.replicas
            assert {replica_key(tag) for tag in running} == set(pids)
            assert {r.status for r in running.values()} == {ReplicaStatus.RUNNING}
            # The very processes the crashed host spawned: adopted, not started again.
            assert {key: p.pid for key, p in replica_processes(workdir / "rt").items()} == pids

    trio.run(recover)
    trio.run(recover_and_check, workdir)


def test_a_replica_killed_while_no_host_runs_is_replaced_on_recovery(workdir: Path) -> None:
    done = run_host(workdir, None)
    assert done.returncode == 0, done.stderr
    (survivor,) = replica_processes(workdir / "rt").values()
    survivor.kill()
    survivor.wait(timeout=10)  # its parent, the host, is gone: init reaps it
    trio.run(recover_and_check, workdir)
