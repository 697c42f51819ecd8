"""Autoscaling through the controller and the router, on trio's mock clock with the
in-memory runtime: replicas follow load, scale from zero, survive crashes mid-countdown,
and steady load writes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

import servecore
from servecore import (
    AutoscalingConfig,
    BackendNotFound,
    CreateBackend,
    InvalidConfig,
    LoadReport,
    ReplicaStatus,
    ScaleDirection,
    open_controller,
)
from servecore._controller.autoscaler import MAX_REPORT_SKEW_S
from servecore._controller.remote_load import STALE_AFTER_S
from servecore.runtimes import Query
from servecore.testing import CrashWorld, InMemoryRuntime

ECHO = "servecore.testing.targets:Echo"
INTERVAL_S = 0.5
START_S = 1.0


class SlowRuntime(InMemoryRuntime):
    """In-memory replicas that take ``START_S`` to start and ``service_s`` per query
    (in trio's time, so a mock clock runs through them)."""

    def __init__(self, service_s: float = 0.5) -> None:
        super().__init__()
        self.service_s = service_s

    async def start_replica(self, effect: servecore.StartReplica) -> None:
        await trio.sleep(START_S)
        await super().start_replica(effect)

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        results = await super().call(tag, batch)
        await trio.sleep(self.service_s)
        return results


def config(**kw: Any) -> AutoscalingConfig:
    base: dict[str, Any] = {
        "min_replicas": 1,
        "max_replicas": 8,
        "target_ongoing_requests": 2.0,
        "look_back_period_s": 2.0,
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 20.0,
    }
    base.update(kw)
    return AutoscalingConfig(**base)


@asynccontextmanager
async def opened(
    runtime: InMemoryRuntime | None = None, **kw: Any
) -> AsyncIterator[servecore.Controller]:
    options: dict[str, Any] = {
        "clock": trio.current_time,
        "save_in_thread": False,  # a thread would let the mock clock jump mid-save
        "resync_interval_s": None,
        "autoscale_interval_s": INTERVAL_S,
        **kw,
    }
    async with open_controller(runtime=runtime or SlowRuntime(), **options) as ctl:
        yield ctl


async def serve(ctl: servecore.Controller, c: AutoscalingConfig) -> None:
    await ctl.create_backend("a", ECHO, autoscaling=c)
    await ctl.create_endpoint("a")
    await ctl.set_traffic("a", {"a": 1.0})


class Load:
    """``clients`` closed-loop callers: ``clients`` queries are always running or
    queued. Set ``clients`` to change the load."""

    def __init__(self, ctl: servecore.Controller, nursery: trio.Nursery) -> None:
        self.handle = ctl.get_handle("a")
        self.nursery = nursery
        self.scopes: list[trio.CancelScope] = []
        self.errors: list[BaseException] = []

    def set(self, clients: int) -> None:
        while len(self.scopes) > clients:
            self.scopes.pop().cancel()
        while len(self.scopes) < clients:
            scope = trio.CancelScope()
            self.scopes.append(scope)
            self.nursery.start_soon(self._client, scope)

    async def _client(self, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    await self.handle.call(1)
                except Exception as exc:
                    self.errors.append(exc)
                    await trio.sleep(0.1)


def wanted(ctl: servecore.Controller) -> int:
    return ctl.state.backends["a"].wanted_replicas


def running(ctl: servecore.Controller) -> int:
    return sum(r.status is ReplicaStatus.RUNNING for r in ctl.state.replicas.values())


async def when(predicate: Any, limit_s: float = 300.0) -> float:
    """Wait (mock time) until ``predicate()``; return the time it first held."""
    with trio.fail_after(limit_s):
        while not predicate():
            await trio.sleep(0.05)
    return trio.current_time()


async def test_a_load_step_scales_up_after_the_upscale_delay_and_down_after_the_downscale_delay(
    autojump_clock: trio.abc.Clock,
) -> None:
    c = config()
    async with opened() as ctl, trio.open_nursery() as nursery:
        await serve(ctl, c)
        assert wanted(ctl) == 1 and running(ctl) == 1
        load = Load(ctl, nursery)
        step_up = trio.current_time()
        load.set(8)  # needs 8 / 2 = 4 replicas: two doublings
        first = await when(lambda: wanted(ctl) > 1)
        assert first >= step_up + c.upscale_delay_s  # not before the delay
        assert first <= step_up + c.upscale_delay_s + c.look_back_period_s + 2 * INTERVAL_S
        await when(lambda: running(ctl) == 4)
        assert wanted(ctl) == 4
        await trio.sleep(30)  # steady: no more decisions
        assert wanted(ctl) == 4 and ctl.state.backends["a"].autoscale.decisions == 2  # type: ignore[union-attr]

        drop = trio.current_time()
        load.set(2)  # needs 1
        down = await when(lambda: wanted(ctl) < 4)
        assert down >= drop + c.downscale_delay_s
        assert down <= drop + c.downscale_delay_s + c.look_back_period_s + 2 * INTERVAL_S
        await when(lambda: running(ctl) == 1 and len(ctl.state.replicas) == 1)
        assert wanted(ctl) == 1
        assert not load.errors
        nursery.cancel_scope.cancel()


async def test_min_and_max_are_respected_end_to_end(autojump_clock: trio.abc.Clock) -> None:
    c = config(min_replicas=2, max_replicas=3, upscale_delay_s=1, downscale_delay_s=1)
    async with opened() as ctl, trio.open_nursery() as nursery:
        await serve(ctl, c)
        assert running(ctl) == 2
        load = Load(ctl, nursery)
        load.set(40)
        await when(lambda: running(ctl) == 3)
        await trio.sleep(20)
        assert wanted(ctl) == 3 and len(ctl.state.replicas) == 3
        load.set(0)
        await when(lambda: len(ctl.state.replicas) == 2)
        await trio.sleep(20)
        assert wanted(ctl) == 2
        nursery.cancel_scope.cancel()


async def test_scale_to_zero_and_a_query_brings_it_back_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    c = config(
        min_replicas=0, initial_replicas=1, upscale_delay_s=100.0, downscale_to_zero_delay_s=5.0
    )
    async with opened() as ctl:
        await serve(ctl, c)
        assert running(ctl) == 1
        await when(lambda: not ctl.state.replicas)
        assert wanted(ctl) == 0
        # A query finds no replica: it waits (no NoReplicaError) and starts one now,
        # long before the upscale delay.
        sent = trio.current_time()
        assert await ctl.get_handle("a").call("hi") == "hi"
        assert trio.current_time() - sent <= START_S + INTERVAL_S
        assert wanted(ctl) == 1
        # And back to zero once idle.
        await when(lambda: wanted(ctl) == 0 and not ctl.state.replicas)


async def test_queries_waiting_at_zero_respect_the_queue_bound(
    autojump_clock: trio.abc.Clock,
) -> None:
    c = config(min_replicas=0)
    async with opened() as ctl:
        ctl.use_router(servecore.Router(ctl.runtime, max_queued_queries=2))
        await serve(ctl, c)
        assert not ctl.state.replicas
        results: list[Any] = []
        errors: list[BaseException] = []

        async def one(i: int) -> None:
            try:
                results.append(await ctl.get_handle("a").call(i))
            except servecore.BackpressureError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
        assert len(results) == 2 and len(errors) == 1  # two waited, the third was refused


async def test_a_failed_backend_at_zero_fails_waiting_queries(
    autojump_clock: trio.abc.Clock,
) -> None:
    runtime = SlowRuntime()
    runtime.fail_starts("a", "no GPU")
    async with opened(runtime) as ctl:
        await serve(ctl, config(min_replicas=0))
        with pytest.raises(servecore.NoReplicaError, match="no GPU"):
            await ctl.get_handle("a").call(1)


async def test_constant_load_after_a_scale_up_does_not_oscillate(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Per-replica load halves after the scale-up; total load is what counts here."""
    c = config(upscale_delay_s=3, downscale_delay_s=3, look_back_period_s=5)
    async with opened() as ctl, trio.open_nursery() as nursery:
        await serve(ctl, c)
        load = Load(ctl, nursery)
        load.set(4)  # needs 2
        counts = set()
        end = trio.current_time() + 200
        while trio.current_time() < end:
            await trio.sleep(0.5)
            counts.add(wanted(ctl))
        assert counts == {1, 2}
        assert ctl.state.backends["a"].autoscale.decisions == 1  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_steady_load_writes_nothing_and_status_shows_the_decision(
    autojump_clock: trio.abc.Clock,
) -> None:
    c = config(upscale_delay_s=50)
    async with opened() as ctl, trio.open_nursery() as nursery:
        await serve(ctl, c)
        seq = ctl.seq
        await trio.sleep(10)  # idle at min: reports, but nothing to write
        assert ctl.seq == seq
        seen = ctl.state.observations["a"]
        assert seen.ongoing == 0 and seen.desired == 1
        load = Load(ctl, nursery)
        load.set(8)
        await when(lambda: ctl.state.backends["a"].autoscale.pending is not None)  # type: ignore[union-attr]
        seq = ctl.seq
        pending = ctl.state.backends["a"].autoscale.pending  # type: ignore[union-attr]
        assert pending is not None and pending.direction is ScaleDirection.UP
        await trio.sleep(c.look_back_period_s + 1)  # the window fills: the proposal settles
        seq = ctl.seq
        await trio.sleep(20)
        assert ctl.seq == seq  # pending, counting down, nothing written
        assert ctl.state.observations["a"].ongoing == 8
        assert ctl.state.observations["a"].desired == 2  # one doubling
        assert ctl.state.backends["a"].autoscale.pending.since == pending.since  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_report_load_api_and_mode_switches(autojump_clock: trio.abc.Clock) -> None:
    async with opened(InMemoryRuntime(), autoscale_interval_s=None) as ctl:
        with pytest.raises(InvalidConfig, match="num_replicas"):
            await ctl.create_backend("a", ECHO, num_replicas=2, autoscaling=config())
        await ctl.create_backend("a", ECHO, num_replicas=3)
        state = await ctl.update_backend_config("a", autoscaling=config(upscale_delay_s=0))
        assert state.backends["a"].wanted_replicas == 3  # switched on from the count it runs
        state = await ctl.report_load("a", 12.0, now=1.0)
        assert len(state.replicas_of("a")) == 6 and running(ctl) == 6
        state = await ctl.update_backend_config("a", autoscaling=None)
        assert state.backends["a"].config.num_replicas == 6  # switched off: keeps the count
        assert state.backends["a"].autoscale is None
        seq = ctl.seq
        await ctl.report_load("a", 100.0)  # a fixed backend ignores load
        with pytest.raises(BackendNotFound, match="'nope' does not exist"):
            await ctl.report_load("nope", 1.0)
        assert ctl.seq == seq and len(ctl.state.replicas) == 6
        with pytest.raises(InvalidConfig, match="ongoing"):
            await ctl.report_load("a", -1.0)
        with pytest.raises(InvalidConfig, match="autoscale_interval_s"):
            async with open_controller(runtime=InMemoryRuntime(), autoscale_interval_s=0):
                pass


def test_limits_cap_the_autoscaling_maximum() -> None:
    limits = servecore.Limits(max_replicas=5)
    with pytest.raises(InvalidConfig, match=r"autoscaling\.max_replicas"):
        limits.check(
            CreateBackend(
                tag="a", target=ECHO, config=servecore.BackendConfig(autoscaling=config())
            )
        )


# -- crashes --------------------------------------------------------------------------------

CRASH_CONFIG = config(max_replicas=5, initial_replicas=2, upscale_delay_s=10.0)
SCRIPT: list[Any] = [
    CreateBackend(tag="a", target=ECHO, config=servecore.BackendConfig(autoscaling=CRASH_CONFIG)),
    LoadReport(backend="a", ongoing=8.0, now=100.0),  # a proposal begins: saved
    LoadReport(backend="a", ongoing=8.0, now=105.0),  # counting down: nothing saved
    LoadReport(backend="a", ongoing=8.0, now=110.0),  # fires: saved, two starts
    LoadReport(backend="a", ongoing=8.0, now=111.0),  # settled
]
# The script's times are trio's (mock) clock: the controller refuses report times far
# from its own clock, and its default clock is anchored to the wall clock.
OPTIONS = {"autoscale_interval_s": None, "resync_interval_s": None, "clock": trio.current_time}


def world() -> CrashWorld:
    return CrashWorld(controller_options=OPTIONS)


def run_ok(w: CrashWorld, actions: Sequence[Any]) -> servecore.State:
    state = None
    for action in actions:
        outcome = w.run(action)
        assert outcome.crashed is None and outcome.error is None, outcome
        state = outcome.state
    assert state is not None
    return state


def test_a_crash_at_every_point_of_a_scale_decision_recovers_the_same_countdown() -> None:
    reference = world()
    decisions = [run_ok(reference, [action]).backends["a"].autoscale for action in SCRIPT]
    final = decisions[-1]
    assert final is not None and final.replicas == 4 and final.decided_at == 110.0
    assert decisions[1] is not None and decisions[1].pending is not None
    assert decisions[1].pending.since == 100.0

    checked = 0
    for i in range(1, len(SCRIPT)):
        probe = world()
        run_ok(probe, SCRIPT[:i])
        points = probe.count_points(SCRIPT[i])
        for k in range(points):
            w = world()
            run_ok(w, SCRIPT[:i])
            outcome = w.run(SCRIPT[i], crash_at=k)
            assert outcome.crashed is not None, (i, k)
            recovered = w.run(None)
            assert recovered.error is None and recovered.state is not None, recovered
            w.check_settled(recovered.state)
            got = recovered.state.backends["a"].autoscale
            # All or nothing: the decision state before the report, or after it.
            assert got in (decisions[i - 1], decisions[i]), (i, k, got)
            if got is not None and got.pending is not None:
                assert got.pending.since == 100.0  # the same countdown, not a new one
            # Replaying the rest of the script gives exactly the uncrashed outcome.
            end = run_ok(w, SCRIPT[i:])
            assert end.backends["a"].autoscale == final
            w.check_settled(end)
            checked += 1
    assert checked >= 8


def test_a_restart_mid_delay_continues_the_countdown() -> None:
    w = world()
    run_ok(w, SCRIPT[:2])  # a proposal since 100
    # A new controller, 9.9 s into the delay: not yet; at 10 s: fires.
    state = run_ok(w, [LoadReport(backend="a", ongoing=8.0, now=109.9)])
    assert state.backends["a"].wanted_replicas == 2
    state = run_ok(w, [LoadReport(backend="a", ongoing=8.0, now=110.0)])
    assert state.backends["a"].wanted_replicas == 4 and len(w.live()) == 4


def test_the_default_clock_is_wall_anchored() -> None:
    seen: list[float] = []

    async def main() -> None:
        async with open_controller(runtime=InMemoryRuntime()) as ctl:
            seen.append(ctl.clock())

    import time

    before = time.time()
    trio.run(main)
    assert before - 1 <= seen[0] <= time.time() + 1


async def test_a_burst_at_zero_wakes_the_backend_once(autojump_clock: trio.abc.Clock) -> None:
    async with opened(autoscale_interval_s=None) as ctl:
        await serve(ctl, config(min_replicas=0, max_replicas=4))
        results: list[Any] = []

        async def one(i: int) -> None:
            results.append(await ctl.get_handle("a").call(i))

        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(one, i)
        assert sorted(results) == list(range(12))
        auto = ctl.state.backends["a"].autoscale
        assert auto is not None and auto.decisions == 1
        assert auto.replicas == 4  # 12 waiting / 2 per replica, clamped to max


async def test_hostile_load_reports_change_nothing(autojump_clock: trio.abc.Clock) -> None:
    async with opened(InMemoryRuntime(), autoscale_interval_s=None) as ctl:
        await serve(ctl, config())
        seq, state = ctl.seq, ctl.state
        for backend, ongoing, now in [
            (["a"], 1.0, 0.0),
            ("a b", 1.0, 0.0),
            ("a", float("inf"), 0.0),
            ("a", 1e300, 0.0),
            ("a", "many", 0.0),
            ("a", 1.0, float("nan")),
            ("a", 1.0, True),
        ]:
            with pytest.raises(InvalidConfig):
                await ctl.report_load(backend, ongoing, now)  # type: ignore[arg-type]
        assert ctl.seq == seq and ctl.state == state


async def test_a_report_time_far_from_the_clock_is_refused(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Milliseconds passed for seconds: checkpointed, such a time would make every
    # honest report after it stale, and the backend would never scale down again.
    async with opened(InMemoryRuntime(), autoscale_interval_s=None) as ctl:
        await serve(ctl, config(upscale_delay_s=0, downscale_delay_s=0))
        seq, state = ctl.seq, ctl.state
        now_ms = ctl.clock() * 1000 + 10_000_000
        for now in (now_ms, ctl.clock() - 2 * MAX_REPORT_SKEW_S):
            with pytest.raises(InvalidConfig, match="within 3600s of the controller's clock"):
                await ctl.report_load("a", 12.0, now=now)
        assert ctl.seq == seq and ctl.state == state
        honest = ctl.clock() + 1.0  # within the bound: taken as it is
        await ctl.report_load("a", 12.0, now=honest)
        assert ctl.state.observations["a"].at == honest


# -- load from routers in other processes ------------------------------------------------


def observed(ctl: servecore.Controller) -> float | None:
    """The windowed load the policy last read for backend ``a``."""
    o = ctl.state.observations.get("a")
    return None if o is None else o.ongoing


async def test_every_live_reporters_load_is_summed_and_a_silent_one_ages_out(
    autojump_clock: trio.abc.Clock,
) -> None:
    c = config(look_back_period_s=1.0, upscale_delay_s=1000.0)
    async with opened() as ctl, trio.open_nursery() as nursery:
        await serve(ctl, c)

        async def steady() -> None:  # a client that keeps reporting
            while True:
                ctl.report_router_load("steady", {"a": 3})
                await trio.sleep(STALE_AFTER_S / 3)

        nursery.start_soon(steady)
        # One report, then silence (a client that exited), naming a backend the
        # controller no longer has (its table was a step behind): ignored.
        ctl.report_router_load("gone", {"a": 4, "deleted": 9})
        silent_since = trio.current_time()
        await when(lambda: observed(ctl) == 7.0)  # 3 + 4: both count
        assert ctl.remote_load() == {"gone": {"a": 4, "deleted": 9}, "steady": {"a": 3}}

        # Past the bound "gone" no longer counts, and the window forgets it.
        aged = await when(lambda: "gone" not in ctl.remote_load())
        assert silent_since + STALE_AFTER_S <= aged <= silent_since + STALE_AFTER_S + 0.1
        await when(lambda: observed(ctl) == 3.0)
        assert ctl.remote_load() == {"steady": {"a": 3}}
        assert wanted(ctl) == 1  # the upscale delay is far off: nothing decided
        nursery.cancel_scope.cancel()


async def test_a_remote_query_waiting_at_zero_wakes_the_backend_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    c = config(
        min_replicas=0, initial_replicas=0, upscale_delay_s=100.0, downscale_to_zero_delay_s=5.0
    )
    async with opened() as ctl:
        await serve(ctl, c)
        assert wanted(ctl) == 0
        asked = trio.current_time()
        ctl.report_router_load("client", {"a": 1}, wake=["a", "unknown"])
        woke = await when(lambda: wanted(ctl) == 1)
        assert woke - asked < INTERVAL_S / 2  # before the next periodic report
        await when(lambda: running(ctl) == 1)


@pytest.mark.parametrize(
    ("reporter", "ongoing", "wake"),
    [
        ("", {"a": 1}, ()),
        (["x"], {"a": 1}, ()),
        ("r", {"a": -1}, ()),
        ("r", {"a": True}, ()),
        ("r", {"a": 1.5}, ()),
        ("r", [("a", 1)], ()),
        ("r", {"a": 1}, "a"),
    ],
)
async def test_a_malformed_router_load_report_is_refused_and_counts_for_nothing(
    reporter: Any, ongoing: Any, wake: Any
) -> None:
    async with opened(autoscale_interval_s=None) as ctl:
        await serve(ctl, config())
        seq = ctl.seq
        with pytest.raises(InvalidConfig):
            ctl.report_router_load(reporter, ongoing, wake)
        assert ctl.remote_load() == {} and ctl.seq == seq


def test_the_sync_facade_reports_router_load() -> None:
    with servecore.start(runtime=SlowRuntime(service_s=0.0)) as ctl:
        ctl.create_backend("a", ECHO, autoscaling=config())
        ctl.report_router_load("sync", {"a": 2})
        assert ctl.remote_load() == {"sync": {"a": 2}}
