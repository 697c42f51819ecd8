"""End to end on the threads runtime, with real queries through the router: replicas
follow a load step up and back down.

No wall-clock thresholds: waits are bounded only so that a bug fails instead of hanging.
"""

from __future__ import annotations

import trio

import servecore
from servecore import AutoscalingConfig, ReplicaStatus, open_controller

WAIT = 60.0  # seconds; only ever a guard against hanging


async def test_replicas_follow_a_load_step_up_and_down() -> None:
    scaling = AutoscalingConfig(
        min_replicas=1,
        max_replicas=4,
        target_ongoing_requests=1.0,
        look_back_period_s=0.5,
        upscale_delay_s=0.3,
        downscale_delay_s=0.6,
    )
    async with open_controller(runtime="threads", autoscale_interval_s=0.1) as ctl:
        await ctl.create_backend(
            "slow", "targets:slow_echo", autoscaling=scaling, max_concurrent_queries=1
        )
        await ctl.create_endpoint("slow")
        await ctl.set_traffic("slow", {"slow": 1.0})
        handle = ctl.get_handle("slow")
        clients: list[trio.CancelScope] = []
        answered = [0]

        async def client(scope: trio.CancelScope) -> None:
            with scope:
                while True:
                    assert await handle.call("x") == "x"
                    answered[0] += 1

        def running() -> int:
            return sum(r.status is ReplicaStatus.RUNNING for r in ctl.state.replicas.values())

        async def until(predicate: object) -> None:
            with trio.fail_after(WAIT):
                while not predicate():  # type: ignore[operator]
                    await trio.sleep(0.02)

        async with trio.open_nursery() as nursery:
            assert running() == 1
            for _ in range(4):  # four callers, always one query each: needs 4 replicas
                clients.append(trio.CancelScope())
                nursery.start_soon(client, clients[-1])
            await until(lambda: running() == 4)
            assert ctl.state.backends["slow"].wanted_replicas == 4
            seen = ctl.state.observations["slow"]
            assert seen.ongoing > 2 and seen.desired == 4
            for scope in clients[1:]:  # down to one caller: needs 1
                scope.cancel()
            await until(lambda: running() == 1 and len(ctl.state.replicas) == 1)
            assert ctl.state.backends["slow"].wanted_replicas == 1
            clients[0].cancel()
        assert answered[0] > 0


def test_a_sync_host_scales_from_zero_and_reports_load() -> None:
    with servecore.start(runtime="threads", autoscale_interval_s=None) as ctl:
        ctl.create_backend(
            "z", "targets:slow_echo", autoscaling={"min_replicas": 0, "max_replicas": 3}
        )
        ctl.create_endpoint("z")
        ctl.set_traffic("z", {"z": 1.0})
        assert not ctl.state.replicas
        # From a host thread: the query waits for the replica it wakes.
        assert ctl.get_handle("z").call("hi") == "hi"
        assert ctl.state.backends["z"].wanted_replicas == 1
        later = ctl.clock() + 1200  # past every default delay and window
        state = ctl.report_load("z", 6.0, now=later)  # needs 3: a proposal begins
        assert state.backends["z"].autoscale.pending is not None  # type: ignore[union-attr]
        state = ctl.report_load("z", 6.0, now=later + 30)  # upscale_delay_s later
        assert state.backends["z"].wanted_replicas == 2 and len(state.replicas) == 2
