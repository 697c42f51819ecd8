"""apply(): the difference between the state and an app file, as commands.

Properties, on the in-memory runtime: applying A then B declares exactly what B does on
a fresh controller; re-applying plans nothing; no plan ever trips BackendInUse or any
other check; a plan cut short converges when the file is applied again.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import servecore
from servecore.app import (
    App,
    AppFileError,
    BackendSpec,
    EndpointSpec,
    apply,
    check_plan,
    declared,
    plan,
)
from servecore.testing import InMemoryRuntime

TARGETS = ["servecore.testing.targets:echo", "servecore.testing.targets:Echo"]
TAGS = ["a", "b", "c"]
ENDPOINTS = ["e1", "e2"]
ROUTES = ["/x", "/y", None]


@st.composite
def backends(draw: Any, tag: str) -> BackendSpec:
    target = draw(st.sampled_from(TARGETS))
    kwargs = {"prefix": draw(st.sampled_from(["", ">"]))} if target.endswith("Echo") else {}
    config = servecore.BackendConfig(
        num_replicas=draw(st.integers(0, 2)),
        max_concurrent_queries=draw(st.sampled_from([1, 8])),
        user_config=draw(st.sampled_from([None, {"v": 1}])),
    )
    return BackendSpec(tag=tag, target=target, init_kwargs=kwargs, config=config)


def _split(tags: list[str], shape: int) -> dict[str, float]:
    if not tags:
        return {}
    if len(tags) == 1 or shape == 0:
        return {tags[0]: 1.0}
    weights = [0.25, 0.75] if shape == 1 else [0.5, 0.5]
    return dict(zip(tags[:2], weights, strict=True))


@st.composite
def apps(draw: Any) -> App:
    tags = draw(st.lists(st.sampled_from(TAGS), unique=True, max_size=3))
    specs = {tag: draw(backends(tag)) for tag in tags}
    names = draw(st.lists(st.sampled_from(ENDPOINTS), unique=True, max_size=2))
    routes = draw(st.permutations(ROUTES))
    endpoints = {}
    for name, route in zip(names, routes, strict=False):
        used = draw(st.lists(st.sampled_from(tags), unique=True, max_size=2)) if tags else []
        traffic = _split(sorted(used), draw(st.integers(0, 2)))
        shadow_tags = draw(st.lists(st.sampled_from(tags), unique=True, max_size=1)) if tags else []
        shadow = {t: draw(st.sampled_from([0.5, 1.0])) for t in shadow_tags}
        endpoints[name] = EndpointSpec(
            name=name,
            route=route,
            methods=tuple(draw(st.sampled_from([["GET"], ["GET", "POST"]]))),
            http_request=draw(st.booleans()),
            traffic=traffic,
            shadow=shadow,
        )
    return App(backends=specs, endpoints=endpoints)


async def _declared_after(*steps: App) -> tuple[App, servecore.State]:
    async with servecore.open_controller(InMemoryRuntime()) as ctl:
        for app in steps:
            await apply(ctl, app)
            servecore.validate_state(ctl.state)
        return declared(ctl.state), ctl.state


@given(apps(), apps())
def test_apply_a_then_b_declares_what_b_declares_on_a_fresh_state(a: App, b: App) -> None:
    after_both, _ = trio.run(_declared_after, a, b)
    fresh, _ = trio.run(_declared_after, b)
    assert after_both == fresh == b


@given(apps(), apps())
def test_reapplying_plans_nothing_and_changes_nothing(a: App, b: App) -> None:
    async def main() -> None:
        async with servecore.open_controller(InMemoryRuntime()) as ctl:
            await apply(ctl, a)
            await apply(ctl, b)
            seq, state = ctl.seq, ctl.state
            assert plan(ctl.state, b) == []
            again = await apply(ctl, b)
            assert again.commands == () and not again.changed
            assert (ctl.seq, ctl.state) == (seq, state)

    trio.run(main)


@given(apps(), apps(), st.integers(0, 30))
def test_a_plan_cut_short_converges_when_applied_again(a: App, b: App, cut: int) -> None:
    """As after a crash half-way through an apply: the next apply finishes the job."""

    async def main() -> None:
        async with servecore.open_controller(InMemoryRuntime()) as ctl:
            await apply(ctl, a)
            for command in plan(ctl.state, b)[:cut]:
                await ctl.submit(command)  # no CommandError (BackendInUse...) on the way
            await apply(ctl, b)
            assert declared(ctl.state) == b
            assert plan(ctl.state, b) == []

    trio.run(main)


def test_order_creates_then_wires_then_deletes() -> None:
    old = App(
        backends={"v1": BackendSpec(tag="v1", target=TARGETS[0])},
        endpoints={"e": EndpointSpec(name="e", route="/e", methods=("GET",), traffic={"v1": 1})},
    )
    new = App(
        backends={"v2": BackendSpec(tag="v2", target=TARGETS[0])},
        endpoints={"e": EndpointSpec(name="e", route="/e", methods=("GET",), traffic={"v2": 1})},
    )

    async def main() -> list[servecore.Command]:
        async with servecore.open_controller(InMemoryRuntime()) as ctl:
            await apply(ctl, old)
            return plan(ctl.state, new)

    assert trio.run(main) == [
        servecore.CreateBackend(tag="v2", target=TARGETS[0]),
        servecore.SetTraffic(endpoint="e", traffic={"v2": 1.0}),
        servecore.DeleteBackend(tag="v1"),
    ]


def _echo_app(target: str = TARGETS[1], **init_kwargs: Any) -> App:
    return App(
        backends={
            "m": BackendSpec(
                tag="m",
                target=target,
                init_kwargs=init_kwargs,
                config=servecore.BackendConfig(num_replicas=2),
            )
        },
        endpoints={"e": EndpointSpec(name="e", route="/e", methods=("GET",), traffic={"m": 1})},
    )


def test_a_changed_target_rolls_the_backend_in_place() -> None:
    async def main() -> None:
        async with servecore.open_controller(InMemoryRuntime()) as ctl:
            await apply(ctl, _echo_app(TARGETS[0]))
            applied = await apply(ctl, _echo_app(TARGETS[1]))
            assert [type(c).__name__ for c in applied.commands] == ["UpdateBackend"]
            assert ctl.state.backends["m"].target == TARGETS[1]
            assert await ctl.get_handle("e").call("hi") == "hi"

    trio.run(main)


def test_the_plan_for_changed_init_kwargs_deletes_nothing() -> None:
    state = servecore.State()
    for command in plan(state, _echo_app(prefix="v1:")):
        state = servecore.step(state, command).state
    commands = plan(state, _echo_app(prefix="v2:"))
    assert commands == [
        servecore.UpdateBackend(
            tag="m",
            target=TARGETS[1],
            init_kwargs={"prefix": "v2:"},
            config=servecore.BackendConfig(num_replicas=2),
        )
    ]
    assert not any(
        isinstance(c, servecore.DeleteEndpoint | servecore.DeleteBackend) for c in commands
    )


def _moved(app: App, route: str, methods: tuple[str, ...] = ("GET",)) -> App:
    ep = app.endpoints["e"]
    moved = EndpointSpec(name="e", route=route, methods=methods, traffic=ep.traffic)
    return attrs.evolve(app, endpoints={"e": moved})


def test_a_new_route_or_methods_move_the_endpoint_in_place() -> None:
    """The plan never deletes an endpoint to change its route: its traffic, its
    handles and its queries carry on."""

    async def main() -> None:
        async with servecore.open_controller(InMemoryRuntime()) as ctl:
            await apply(ctl, _echo_app(TARGETS[0]))
            handle = ctl.get_handle("e")
            applied = await apply(ctl, _moved(_echo_app(TARGETS[0]), "/v2", ("GET", "POST")))
            assert list(applied.commands) == [
                servecore.UpdateEndpoint(name="e", route="/v2", methods=("GET", "POST"))
            ]
            ep = ctl.state.endpoints["e"]
            assert (ep.route, tuple(ep.methods)) == ("/v2", ("GET", "POST"))
            assert ep.traffic == {"m": 1.0}
            assert await handle.call("hi") == "hi"

    trio.run(main)


def test_asking_for_requests_changes_the_endpoint_in_place() -> None:
    async def main() -> None:
        async with servecore.open_controller(InMemoryRuntime()) as ctl:
            app = _echo_app(TARGETS[0])
            await apply(ctl, app)
            e = app.endpoints["e"]
            wanting = attrs.evolve(app, endpoints={"e": attrs.evolve(e, http_request=True)})
            applied = await apply(ctl, wanting)
            assert list(applied.commands) == [
                servecore.UpdateEndpoint(
                    name="e", route=e.route, methods=e.methods, http_request=True
                )
            ]
            assert ctl.state.endpoints["e"].http_request is True
            assert ctl.state.endpoints["e"].traffic == {"m": 1.0}
            assert not (await apply(ctl, wanting)).commands

    trio.run(main)


def test_a_route_another_endpoint_holds_is_still_refused_by_the_core() -> None:
    state = servecore.State()
    for command in (
        servecore.CreateEndpoint(name="a", route="/a"),
        servecore.CreateEndpoint(name="b", route="/b"),
    ):
        state = servecore.step(state, command).state
    with pytest.raises(servecore.RouteConflict):
        servecore.step(state, servecore.UpdateEndpoint(name="a", route="/b"))
    with pytest.raises(servecore.EndpointNotFound):
        servecore.step(state, servecore.UpdateEndpoint(name="zz", route="/z"))
    same = servecore.step(state, servecore.UpdateEndpoint(name="a", route="/a"))
    assert same.state is state and same.effects == ()


class _HeldStarts(InMemoryRuntime):
    """Starts of replicas of a newer version wait until the test lets them go."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()
        self.held = trio.Event()

    async def start_replica(self, effect: servecore.StartReplica) -> None:
        if effect.init_kwargs.get("prefix") == "v2:":
            self.held.set()
            await self.release.wait()
        await super().start_replica(effect)


def test_the_endpoint_keeps_answering_while_new_init_kwargs_roll_out() -> None:
    async def main() -> None:
        runtime = _HeldStarts()
        async with servecore.open_controller(runtime) as ctl:
            await apply(ctl, _echo_app(prefix="v1:"))
            handle = ctl.get_handle("e")
            assert await handle.call("x") == "v1:x"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(apply, ctl, _echo_app(prefix="v2:"))
                await runtime.held.wait()
                # New replicas are starting: the endpoint is still there, and the
                # old replicas answer every query.
                assert "e" in ctl.state.endpoints
                for _ in range(20):
                    assert await handle.call("x") == "v1:x"
                runtime.release.set()
            assert await handle.call("x") == "v2:x"
            assert ctl.state.backends["m"].status is servecore.BackendStatus.HEALTHY
            assert {r.version for r in ctl.state.replicas.values()} == {1}

    trio.run(main)


def test_a_backend_that_fails_to_start_is_reported_and_the_rest_applied() -> None:
    app = App(
        backends={
            "bad": BackendSpec(tag="bad", target="servecore.testing.targets:FailingInit"),
            "ok": BackendSpec(tag="ok", target=TARGETS[0]),
        },
        endpoints={"e": EndpointSpec(name="e", route="/e", methods=("GET",), traffic={"ok": 1})},
    )

    async def main() -> None:
        async with servecore.open_controller(InMemoryRuntime()) as ctl:
            applied = await apply(ctl, app)
            assert set(applied.failed) == {"bad"}
            assert ctl.state.backends["bad"].status is servecore.BackendStatus.FAILED
            assert await ctl.get_handle("e").call(1) == 1
            # Applying the same file again means "try again": a FAILED backend it
            # restates is retried (and fails again here, so it is reported again).
            again = await apply(ctl, app)
            assert again.commands == (servecore.RetryBackend(tag="bad"),)
            assert set(again.failed) == {"bad"}

    trio.run(main)


def test_sync_controller_applies_a_file(tmp_path: Any) -> None:
    path = tmp_path / "app.toml"
    path.write_text(
        '[backends.echo]\ntarget = "servecore.testing.targets:echo"\n'
        "[endpoints.echo]\ntraffic = { echo = 1.0 }\n"
    )
    with servecore.start(runtime="threads") as ctl:
        applied = ctl.apply(path)
        assert len(applied.commands) == 3
        assert ctl.state.endpoints["echo"].route == "/echo"
        assert ctl.get_handle("echo").call("hi") == "hi"
        assert not ctl.apply(path).changed


def test_a_file_that_breaks_the_limits_at_its_last_backend_changes_nothing() -> None:
    app = App(
        backends={
            tag: BackendSpec(
                tag=tag,
                target=TARGETS[0],
                config=servecore.BackendConfig(num_replicas=5 if tag == "z" else 1),
            )
            for tag in ("a", "b", "z")
        },
        endpoints={"e": EndpointSpec(name="e", route="/e", methods=("GET",), traffic={"a": 1})},
    )

    async def main() -> None:
        limits = servecore.Limits(max_replicas=2)
        async with servecore.open_controller(InMemoryRuntime(), limits=limits) as ctl:
            seq, state = ctl.seq, ctl.state
            with pytest.raises(AppFileError) as info:
                await apply(ctl, app)
            assert (ctl.seq, ctl.state) == (seq, state)  # not even backend 'a'
            err = info.value
            assert (err.key, err.value) == ("backends.z.num_replicas", 5)
            assert "nothing was applied" in str(err) and "limit of 2" in str(err)

    trio.run(main)


def test_check_plan_steps_the_whole_plan_without_submitting_it() -> None:
    app = App(backends={"a": BackendSpec(tag="a", target=TARGETS[0])})
    commands = plan(servecore.State(), app)
    check_plan(servecore.State(), commands, servecore.Limits(), "app.toml")
    with pytest.raises(AppFileError, match=r"app\.toml: endpoints\.e"):
        # A plan out of order: traffic to an endpoint that does not exist yet.
        check_plan(
            servecore.State(),
            [*commands, servecore.SetTraffic(endpoint="e", traffic={"a": 1.0})],
            servecore.Limits(),
            "app.toml",
        )
