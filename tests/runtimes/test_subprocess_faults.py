"""Faults of user code on the subprocess runtime: hung constructors, crash loops, and
text that is not valid UTF-8. Processes are checked in the process table."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from servecore import Event, ReplicaDied, ReplicaDiedError
from servecore.runtimes import Query
from servecore.runtimes.subprocess import SubprocessRuntime, replica_key
from subprocess_helpers import kill_everything_under, replica_effect, replica_processes

pytestmark = pytest.mark.slow

#: Bounded waits, so that a broken build fails instead of hanging; never asserted on.
BOUND_S = 30.0
#: Longer than any test may take: a stop that waited for the start would hang on it.
FOREVER_S = 3600.0


@pytest.fixture
def rt_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "rt"
    kill_everything_under(tmp_path)


@pytest.fixture
async def runtime(rt_dir: Path) -> AsyncIterator[SubprocessRuntime]:
    """An open runtime whose reports land in ``runtime.events`` (a test attribute)."""
    rt = SubprocessRuntime(rt_dir, startup_timeout_s=FOREVER_S)
    events: list[Event] = []
    rt.events = events  # type: ignore[attr-defined]
    await rt.open(namespace="test", report=events.append)
    try:
        yield rt
    finally:
        await rt.close()


async def wait_until(predicate: Callable[[], Any]) -> None:
    with trio.fail_after(BOUND_S):
        while not predicate():
            await trio.sleep(0.01)


def log_says(rt_dir: Path, tag: str, text: str) -> bool:
    log = rt_dir / f"{replica_key(tag)}.log"
    return log.exists() and text in log.read_text(errors="replace")


# -- a stop never waits on a hung start ---------------------------------------------------


@pytest.mark.parametrize(
    ("target", "constructing"),
    [("HangingInit", "constructing for ever"), ("HangingInitIgnoringTerm", "ignoring SIGTERM")],
)
async def test_a_stop_cuts_a_hung_start_short(
    runtime: SubprocessRuntime, rt_dir: Path, target: str, constructing: str
) -> None:
    errors: list[BaseException] = []

    async def start() -> None:
        try:
            await runtime.start_replica(replica_effect("hung#1", target))
        except ReplicaDiedError as exc:
            errors.append(exc)

    # The bound is far below the start's own timeout (FOREVER_S): reaching the end of
    # this block means the stop did not wait for the start.
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            await wait_until(lambda: log_says(rt_dir, "hung#1", constructing))
            await runtime.stop_replica("hung#1", 0.2)
            assert replica_processes(rt_dir) == {}  # killed by the time stop returns
    (error,) = errors
    assert "stopped it before it was ready" in str(error)
    assert await runtime.list_replicas() == frozenset()
    assert runtime.events == []  # type: ignore[attr-defined]  # a stop is not a death


async def test_a_stop_before_the_start_spawned_anything_wins(
    runtime: SubprocessRuntime, rt_dir: Path
) -> None:
    async with trio.open_nursery() as nursery:
        errors: list[BaseException] = []

        async def start() -> None:
            try:
                await runtime.start_replica(replica_effect("echo#1", "Echo"))
            except ReplicaDiedError as exc:
                errors.append(exc)

        nursery.start_soon(start)
        # The start is in flight, its process not yet spawned (or just spawning).
        await wait_until(lambda: "echo#1" in runtime._starting)
        with trio.fail_after(BOUND_S):
            await runtime.stop_replica("echo#1", 0.2)
    assert len(errors) == 1
    assert replica_processes(rt_dir) == {}


# -- crash loops are visible --------------------------------------------------------------


async def test_a_crash_looping_replicas_log_is_kept_and_quoted(
    runtime: SubprocessRuntime, rt_dir: Path
) -> None:
    events: list[Event] = runtime.events  # type: ignore[attr-defined]
    for n in range(1, 6):
        tag = f"loop#{n}"
        await runtime.start_replica(replica_effect(tag, "CrashSoon", "disk /data is full"))
        await wait_until(lambda n=n: len(events) == n)
        event = events[-1]
        assert isinstance(event, ReplicaDied) and event.tag == tag
        assert "exited with code 3" in event.reason
        assert "crash-loop: disk /data is full" in event.reason  # the stderr saying why
        kept = Path(event.reason.split("kept at ", 1)[1].split(")", 1)[0])
        assert "crash-loop: disk /data is full" in kept.read_text()
    logs = sorted((rt_dir / "logs").iterdir())
    assert len(logs) == 3  # bounded: the last three of the backend
    assert kept in logs
    assert all(p.name.startswith(replica_key("loop")) for p in logs)


async def test_a_start_failure_says_what_the_replica_printed(runtime: SubprocessRuntime) -> None:
    with pytest.raises(FileNotFoundError, match="no weights") as info:
        await runtime.start_replica(replica_effect("weights#1", "PrintsThenFails"))
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "loading weights from /nowhere/model.bin" in notes


# -- text from the replica is always encodable ----------------------------------------------


async def test_a_lone_surrogate_in_a_constructor_error_comes_back_encodable(
    runtime: SubprocessRuntime,
) -> None:
    with pytest.raises(ValueError, match="cannot open") as info:
        await runtime.start_replica(replica_effect("sur#1", "SurrogateInit"))
    text = str(info.value)
    text.encode("utf-8")  # what the controller puts in its checkpoint
    assert "/data/caf\\udce9" in text
    str(info.value.__cause__).encode("utf-8")  # the replica's traceback too
    for note in getattr(info.value, "__notes__", []):
        note.encode("utf-8")


async def test_a_lone_surrogate_in_a_call_error_comes_back_encodable(
    runtime: SubprocessRuntime,
) -> None:
    await runtime.start_replica(replica_effect("sur#1", "raise_surrogate"))
    with pytest.raises(RuntimeError, match="cannot read") as info:
        await runtime.call("sur#1", [Query()])
    str(info.value).encode("utf-8")
    assert "\\udce9" in str(info.value)
