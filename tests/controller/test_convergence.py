"""The controller converges after faults outside the crash kit's model: a store that
fails for a while, events that never arrive, user code that hangs or crash-loops."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import servecore
from servecore import (
    BackendStartError,
    BackendStatus,
    CheckpointError,
    MemoryStore,
    NoReplicaError,
    ReplicaStatus,
    open_controller,
)
from servecore._serving.ops_http import readyz
from servecore.testing import InMemoryRuntime

ECHO = "servecore.testing.targets:Echo"


class OutageStore(MemoryStore):
    """A memory store whose commits fail while ``down`` (a full disk, a locked file)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.failed = 0

    def commit(self, seq: int, puts: Any, deletes: Any) -> None:
        if self.down:
            self.failed += 1
            raise OSError(28, "No space left on device")
        super().commit(seq, puts, deletes)


def assert_converged(ctl: servecore.Controller, runtime: InMemoryRuntime) -> None:
    """The runtime's live replicas are exactly the RUNNING ones, each backend runs
    num_replicas, and the routing table names only RUNNING replicas."""
    state = ctl.state
    running = {t for t, r in state.replicas.items() if r.status is ReplicaStatus.RUNNING}
    assert set(runtime.live) == running == set(state.replicas)
    for tag, b in state.backends.items():
        assert len(state.replicas_of(tag)) == b.config.num_replicas
        assert set(ctl.routing_table.backends[tag].replicas) <= running
    servecore.validate_state(state)


class DelayedStartRuntime(InMemoryRuntime):
    """Starts wait for ``proceed``, so the test can break the store in between."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = trio.Event()
        self.proceed = trio.Event()

    async def start_replica(self, effect: servecore.StartReplica) -> None:
        self.entered.set()
        await self.proceed.wait()
        await super().start_replica(effect)


async def test_a_start_whose_save_fails_is_recorded_once_the_store_recovers() -> None:
    store, runtime = OutageStore(), DelayedStartRuntime()
    async with open_controller(runtime=runtime, store=store, resync_interval_s=None) as ctl:
        async with trio.open_nursery() as nursery:
            outcome: list[BaseException | None] = []

            async def create() -> None:
                try:
                    await ctl.create_backend("a", ECHO)
                    outcome.append(None)
                except CheckpointError as exc:
                    outcome.append(exc)

            nursery.start_soon(create)
            await runtime.entered.wait()
            store.down = True  # the command's own save is done; the start's is not
            runtime.proceed.set()
        [error] = outcome
        assert isinstance(error, CheckpointError)
        # It says what happened: the command landed; recording the start did not (yet).
        assert "the command was saved" in str(error) and "a#0 started" in str(error)
        assert "retrying" in str(error)
        assert ctl.state.replicas["a#0"].status is ReplicaStatus.STARTING
        await trio.sleep(0.5)  # many retries while the store is down: none dropped
        assert store.failed > 3
        store.down = False
        with trio.fail_after(10):
            await ctl.settle()
        assert ctl.state.replicas["a#0"].status is ReplicaStatus.RUNNING
        assert ctl.state.backends["a"].status is BackendStatus.HEALTHY
        assert_converged(ctl, runtime)
        await ctl.create_endpoint("e")
        await ctl.set_traffic("e", {"a": 1.0})
        assert await ctl.get_handle("e").call("hi") == "hi"


async def test_a_death_whose_save_fails_is_replaced_once_the_store_recovers() -> None:
    store, runtime = OutageStore(), InMemoryRuntime()
    async with open_controller(runtime=runtime, store=store, resync_interval_s=None) as ctl:
        await ctl.create_backend("a", ECHO, num_replicas=2)
        store.down = True
        runtime.kill("a#0")
        await trio.sleep(0.3)
        assert ctl.state.replicas["a#0"].status is ReplicaStatus.RUNNING  # not saved yet
        store.down = False
        with trio.fail_after(10):
            await ctl.settle()
        assert "a#0" not in ctl.state.replicas
        assert_converged(ctl, runtime)


class SilentRuntime(InMemoryRuntime):
    """Loses death reports: replicas die without a word (a watcher that crashed)."""

    def silently_kill(self, tag: str) -> None:
        self.live.pop(tag, None)
        self._instances.pop(tag, None)


async def test_resync_replaces_a_replica_whose_death_was_never_reported() -> None:
    runtime = SilentRuntime()
    async with open_controller(runtime=runtime, resync_interval_s=0.05) as ctl:
        await ctl.create_backend("a", ECHO, num_replicas=2)
        runtime.silently_kill("a#1")
        with trio.fail_after(10):
            while "a#1" in ctl.state.replicas or len(runtime.live) < 2:
                await trio.sleep(0.02)
            await ctl.settle()
        assert_converged(ctl, runtime)


async def test_resync_stops_an_orphan_and_writes_nothing_when_all_agree() -> None:
    runtime = InMemoryRuntime()
    async with open_controller(runtime=runtime, resync_interval_s=None) as ctl:
        await ctl.create_backend("a", ECHO)
        seq = ctl.seq
        assert await ctl.resync() is False
        assert ctl.seq == seq  # nothing changed: nothing saved
        runtime.live["ghost#99"] = object()  # alive, but no checkpoint names it
        assert await ctl.resync() is True
        await ctl.settle()
        assert "ghost#99" not in runtime.live
        assert_converged(ctl, runtime)


async def test_resync_marks_running_a_start_whose_answer_was_lost() -> None:
    runtime = InMemoryRuntime()
    async with open_controller(runtime=runtime, resync_interval_s=None) as ctl:
        await ctl.create_backend("a", ECHO)
        # Forge what a lost ReplicaStarted leaves: the state says STARTING, the
        # runtime has it running, and no start is in flight.
        state = ctl.state
        r = state.replicas["a#0"]
        import attrs

        rebuilt = servecore.State.rebuild(
            endpoints=state.endpoints,
            backends=state.backends,
            replicas={"a#0": attrs.evolve(r, status=ReplicaStatus.STARTING)},
            replica_counter=state.replica_counter,
        )
        ctl._committer.state = rebuilt
        assert await ctl.resync() is True
        assert ctl.state.replicas["a#0"].status is ReplicaStatus.RUNNING
        assert_converged(ctl, runtime)


class HangingRuntime(InMemoryRuntime):
    """A backend named ``hang`` never finishes starting."""

    async def start_replica(self, effect: servecore.StartReplica) -> None:
        if effect.backend == "hang":
            await trio.sleep_forever()
        await super().start_replica(effect)


async def test_a_stop_never_waits_on_a_hung_start_longer_than_its_timeout() -> None:
    runtime = HangingRuntime()
    async with open_controller(runtime=runtime, resync_interval_s=None) as ctl:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: ctl.create_backend("hang", ECHO, graceful_shutdown_timeout_s=0.2)
            )
            await trio.sleep(0.05)
            with trio.fail_after(5):
                await ctl.delete_backend("hang")
        assert "hang" not in ctl.state.backends
        assert not ctl.state.replicas
        assert not runtime.live


async def test_a_runtime_with_only_the_four_methods_works() -> None:
    class Bare:
        def __init__(self) -> None:
            self.inner = InMemoryRuntime()

        async def start_replica(self, effect: servecore.StartReplica) -> None:
            await self.inner.start_replica(effect)

        async def stop_replica(self, tag: str, timeout_s: float) -> None:
            await self.inner.stop_replica(tag, timeout_s)

        async def list_replicas(self) -> frozenset[str]:
            return await self.inner.list_replicas()

        async def call(self, tag: str, batch: list[servecore.Query]) -> list[object]:
            return await self.inner.call(tag, batch)

    async with open_controller(runtime=Bare()) as ctl:  # type: ignore[arg-type]
        await ctl.create_backend("a", ECHO)
        await ctl.create_endpoint("e")
        await ctl.set_traffic("e", {"a": 1.0})
        assert await ctl.get_handle("e").call(3) == 3


async def test_a_runtime_missing_a_method_is_refused_with_one_clear_error() -> None:
    class Broken:
        async def start_replica(self, effect: servecore.StartReplica) -> None:
            pass

    with pytest.raises(servecore.InvalidRuntime, match="has no stop_replica, list_replicas, call"):
        async with open_controller(runtime=Broken()):  # type: ignore[arg-type]
            pass


class CrashLoopRuntime(InMemoryRuntime):
    """Replicas of ``loop`` start, then die at once (a failing health check)."""

    async def start_replica(self, effect: servecore.StartReplica) -> None:
        await super().start_replica(effect)
        if effect.backend == "loop":
            trio.lowlevel.current_trio_token().run_sync_soon(
                self.kill, effect.tag, "health check failed: the model's GPU is gone"
            )


async def test_a_crash_loop_backs_off_shows_unhealthy_then_failed(
    autojump_clock: trio.abc.Clock,
) -> None:
    runtime = CrashLoopRuntime()
    async with open_controller(runtime=runtime, resync_interval_s=None) as ctl:
        await ctl.create_backend("loop", ECHO)
        await trio.sleep(0.01)
        b = ctl.state.backends["loop"]
        assert b.status is BackendStatus.UNHEALTHY
        assert b.early_deaths == 1 and "GPU is gone" in (b.last_error or "")
        started = trio.current_time()
        with trio.fail_after(600):
            while ctl.state.backends["loop"].status is not BackendStatus.FAILED:
                await trio.sleep(0.01)
        # Two backed-off replacements (0.5 s, then 1 s) before the budget ran out.
        base = servecore._core.transitions.BACKOFF_BASE_S
        assert trio.current_time() - started >= base + 2 * base - 0.02
        assert len(runtime.started) == 3
        await ctl.create_endpoint("e")
        with pytest.warns(RuntimeWarning, match="FAILED"):
            await ctl.set_traffic("e", {"loop": 1.0})
        with pytest.raises(NoReplicaError, match=r"FAILED: .*GPU is gone"):
            await ctl.get_handle("e").call(1)
        # Restating the definition changes nothing and says how to retry.
        with pytest.raises(BackendStartError, match=r"retry_backend\('loop'\)"):
            await ctl.create_backend("loop", ECHO)


async def test_retry_backend_starts_a_failed_backend_with_the_same_config() -> None:
    runtime = InMemoryRuntime()
    runtime.fail_starts("a")
    async with open_controller(runtime=runtime, resync_interval_s=None) as ctl:
        with pytest.raises(BackendStartError):
            await ctl.create_backend("a", ECHO)
        assert ctl.state.backends["a"].status is BackendStatus.FAILED
        config = ctl.state.backends["a"].config
        runtime.heal("a")
        await ctl.retry_backend("a")
        b = ctl.state.backends["a"]
        assert b.status is BackendStatus.HEALTHY and b.config == config
        seq = ctl.seq
        await ctl.retry_backend("a")  # not FAILED: a no-op
        assert ctl.seq == seq


async def test_load_reports_during_a_slow_listing_do_not_void_the_resync() -> None:
    """Load reports refresh the state's observations all the time; a resync whose
    listing overlapped one still corrects the state (only checkpointed change voids it)."""
    runtime = InMemoryRuntime()
    async with open_controller(
        runtime=runtime, resync_interval_s=None, autoscale_interval_s=None
    ) as ctl:
        await ctl.create_backend("a", ECHO, autoscaling={"min_replicas": 1, "max_replicas": 2})
        (tag,) = ctl.state.replicas
        listed = runtime.list_replicas

        async def slow_listing() -> frozenset[str]:
            live = await listed()
            seq = ctl.seq
            await ctl.report_load("a", 1.0)  # changes no decision: observations only
            assert ctl.seq == seq and "a" in ctl.state.observations
            return live

        runtime.list_replicas = slow_listing  # type: ignore[method-assign]
        del runtime.live[tag]  # gone, and nobody said so
        assert await ctl.resync() is True
        runtime.list_replicas = listed  # type: ignore[method-assign]
        await ctl.settle()
        assert tag not in ctl.state.replicas and len(runtime.live) == 1


class EchoingRuntime(InMemoryRuntime):
    """Reports each death twice, as a watcher and a resync both seeing it would."""

    async def open(self, *, namespace: str, report: Any, **kwargs: Any) -> None:
        self.report_twice = report
        await super().open(namespace=namespace, report=report, **kwargs)


async def test_a_death_the_store_cannot_save_shows_in_status_and_readiness_once() -> None:
    store, runtime = OutageStore(), EchoingRuntime()
    async with open_controller(runtime=runtime, store=store, resync_interval_s=None) as ctl:
        await ctl.create_backend("a", ECHO, num_replicas=1)
        await ctl.create_endpoint("e", route="/e")
        await ctl.set_traffic("e", {"a": 1.0})
        assert readyz(ctl)[0] == 200
        store.down = True
        runtime.kill("a#0", reason="segfault")
        runtime.report_twice(servecore.ReplicaDied(tag="a#0", reason="segfault"))
        await trio.sleep(0.3)
        # The checkpoint still says RUNNING; status tells what the runtime saw.
        assert ctl.state.replicas["a#0"].status is ReplicaStatus.RUNNING
        assert ctl.unrecorded_deaths == {"a#0": "segfault"}
        status = await ctl.status()
        [backend] = status.backends
        [replica] = backend.replicas
        assert (replica.status, replica.death) == ("DIED", "segfault")
        assert backend.status == "UNHEALTHY" and backend.running_replicas == 0
        assert not status.healthy
        assert status.note is not None and "a#0" in status.note and "not saved" in status.note
        code, body = readyz(ctl)
        assert code == 503 and "no RUNNING replica" in body["reasons"][0]
        assert ctl.lifecycle_counts.deaths["a"] == 1  # reported twice, counted once
        store.down = False
        with trio.fail_after(10):
            await ctl.settle()
        assert ctl.unrecorded_deaths == {}
        assert (await ctl.status()).note is None
        assert ctl.lifecycle_counts.deaths["a"] == 1
        assert_converged(ctl, runtime)
        assert readyz(ctl)[0] == 200
