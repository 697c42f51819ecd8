"""The pure core, command by command and event by event (docs/design.md §2, §8).

In the manner of h11's tests: every valid message is checked for the state it leads to
and the effects it asks for, in order; every invalid one for the typed error, a message
that names the object and the value at fault, and a state left exactly as it was.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from servecore import (
    EARLY_DEATH_S,
    MAX_START_FAILURES,
    BackendConfig,
    BackendExists,
    BackendInUse,
    BackendNotFound,
    BackendStatus,
    CommandError,
    CreateBackend,
    CreateEndpoint,
    DeleteBackend,
    DeleteEndpoint,
    EndpointExists,
    EndpointNotFound,
    InvalidConfig,
    InvalidRoute,
    InvalidTarget,
    InvalidTraffic,
    Message,
    Recover,
    ReplicaDied,
    ReplicaStarted,
    ReplicaStartFailed,
    ReplicaStatus,
    ReplicaStopped,
    Resync,
    RouteConflict,
    SetBackendConfig,
    SetShadowTraffic,
    SetTraffic,
    StartReplica,
    State,
    StopReplica,
    Transition,
    UpdateBackend,
    UpdateEndpoint,
    UpdateRouter,
    step,
    validate_state,
)
from servecore._core.records import encode

TARGET = "myapp.models:Echo"
OTHER_TARGET = "myapp.models:Other"


class Model:
    """A module-level class: a valid target."""

    class Inner:
        """A nested, still module-level, class."""


def handler() -> None:
    """A module-level function: a valid target."""


# ---------------------------------------------------------------------------------------
# Helpers


def apply(state: State, *messages: Message) -> State:
    """Step every message in turn, checking the invariants after each."""
    for message in messages:
        state = check(state, message).state
    return state


_RANK = {UpdateRouter: 0, StopReplica: 1, StartReplica: 2}


def check(state: State, message: Message) -> Transition:
    """Step ``message``, and check what must hold after *every* step."""
    transition = step(state, message)
    validate_state(transition.state)
    effects = transition.effects
    # UpdateRouter, then StopReplica, then StartReplica; at most one UpdateRouter.
    ranks = [_RANK[type(e)] for e in effects]
    assert ranks == sorted(ranks), effects
    assert ranks.count(0) <= 1, effects
    table = transition.state.routing_table()
    routers = [e for e in effects if isinstance(e, UpdateRouter)]
    if routers:
        # The state's table is the one the UpdateRouter carried.
        assert routers[0].table == table
    else:
        assert table == state.routing_table()
    # The table names RUNNING replicas only, so a stopped replica has left it already.
    routed = {tag for route in table.backends.values() for tag in route.replicas}
    for tag in routed:
        assert transition.state.replicas[tag].status is ReplicaStatus.RUNNING
    for effect in effects:
        if isinstance(effect, StopReplica):
            assert effect.tag not in routed
    return transition


def kinds(effects: Iterable[object]) -> list[str]:
    return [type(e).__name__ for e in effects]


def starts(effects: Iterable[object]) -> list[str]:
    return [e.tag for e in effects if isinstance(e, StartReplica)]


def stops(effects: Iterable[object]) -> list[str]:
    return [e.tag for e in effects if isinstance(e, StopReplica)]


def routed(state: State, backend: str) -> tuple[str, ...]:
    return state.routing_table().backends[backend].replicas


def status_of(state: State) -> dict[str, ReplicaStatus]:
    return {tag: r.status for tag, r in state.replicas.items()}


def backend(tag: str, n: int = 1, target: str = TARGET, **config: Any) -> CreateBackend:
    return CreateBackend(tag=tag, target=target, config=BackendConfig(num_replicas=n, **config))


def scale(tag: str, n: int, state: State) -> SetBackendConfig:
    return SetBackendConfig(tag=tag, config=state.backends[tag].config.evolve(num_replicas=n))


def start_all(state: State, backend_tag: str | None = None) -> State:
    """Report every STARTING replica (of one backend, or all) as started."""
    for tag, r in sorted(state.replicas.items()):
        if r.status is ReplicaStatus.STARTING and backend_tag in (None, r.backend):
            state = apply(state, ReplicaStarted(tag=tag))
    return state


def running(tag: str, n: int, state: State | None = None, **config: Any) -> State:
    """A state with backend ``tag`` HEALTHY on ``n`` RUNNING replicas."""
    return start_all(apply(state or State(), backend(tag, n, **config)), tag)


def served() -> State:
    """Backends ``a`` (2 RUNNING) and ``b`` (1 RUNNING); endpoint ``api`` at ``/api``
    sending everything to ``a``."""
    state = running("b", 1, running("a", 2))
    return apply(
        state,
        CreateEndpoint(name="api", route="/api"),
        SetTraffic(endpoint="api", traffic={"a": 1.0}),
    )


def assert_rejected(
    state: State,
    make: Message | Callable[[], Message],
    error: type[CommandError],
    *named: Any,
) -> CommandError:
    """``make`` (a message, or a callable building one) is rejected with ``error``; its
    message names every value in ``named``; ``state`` is exactly as it was."""
    before = encode(state, 0)
    table = state.routing_table()
    with pytest.raises(error) as info:
        message = make() if callable(make) else make
        step(state, message)
    assert isinstance(info.value, CommandError)
    assert isinstance(info.value, ValueError)
    text = str(info.value)
    for value in named:
        assert (repr(value) in text) or (str(value) in text), (value, text)
    assert encode(state, 0) == before
    assert state.routing_table() == table
    validate_state(state)
    return info.value


# ---------------------------------------------------------------------------------------
# The empty state


def test_empty_state() -> None:
    state = State()
    validate_state(state)
    assert dict(state.endpoints) == {} and dict(state.backends) == {}
    assert dict(state.replicas) == {} and state.replica_counter == 0
    table = state.routing_table()
    assert dict(table.endpoints) == {} and dict(table.backends) == {}


def test_step_rejects_non_messages() -> None:
    with pytest.raises(TypeError, match="command or event"):
        step(State(), "CreateEndpoint")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# CreateEndpoint / DeleteEndpoint


def test_create_endpoint_pushes_it_to_the_router() -> None:
    t = check(State(), CreateEndpoint(name="api", route="/api", methods=("get", "POST", "GET")))
    ep = t.state.endpoints["api"]
    assert (ep.name, ep.route, ep.methods) == ("api", "/api", ("GET", "POST"))
    assert dict(ep.traffic) == {} and dict(ep.shadow) == {}
    assert kinds(t.effects) == ["UpdateRouter"]
    assert t.effects[0].table.endpoints["api"] == ep


def test_create_endpoint_defaults() -> None:
    ep = apply(State(), CreateEndpoint(name="api")).endpoints["api"]
    assert ep.route is None and ep.methods == ("GET",)


def test_create_endpoint_restated_is_a_noop() -> None:
    state = apply(State(), CreateEndpoint(name="api", route="/api", methods=("POST",)))
    t = check(state, CreateEndpoint(name="api", route="/api", methods=["post"]))
    assert t.state is state and t.effects == ()


@pytest.mark.parametrize(
    "other",
    [
        CreateEndpoint(name="api", route="/other"),
        CreateEndpoint(name="api"),
        CreateEndpoint(name="api", route="/api", methods=("POST",)),
        CreateEndpoint(name="api", route="/api", http_request=True),
    ],
)
def test_create_endpoint_twice_differently_is_rejected(other: CreateEndpoint) -> None:
    state = apply(State(), CreateEndpoint(name="api", route="/api"))
    err = assert_rejected(state, other, EndpointExists, "api")
    assert err.name == "api"


def test_route_conflict_names_route_and_both_endpoints() -> None:
    state = apply(State(), CreateEndpoint(name="api", route="/api"))
    err = assert_rejected(
        state, CreateEndpoint(name="api2", route="/api"), RouteConflict, "/api", "api2", "api"
    )
    assert (err.route, err.endpoint, err.owner) == ("/api", "api2", "api")


def test_endpoints_without_routes_do_not_conflict() -> None:
    state = apply(State(), CreateEndpoint(name="one"), CreateEndpoint(name="two"))
    assert set(state.endpoints) == {"one", "two"}


@pytest.mark.parametrize("route", ["api", "", 5, b"/api"])
def test_invalid_route_is_rejected(route: Any) -> None:
    assert_rejected(
        State(), lambda: CreateEndpoint(name="api", route=route), InvalidRoute, "api", route
    )


@pytest.mark.parametrize("flag", ["yes", 1, None])
def test_http_request_must_be_a_bool(flag: Any) -> None:
    error = assert_rejected(
        State(),
        lambda: CreateEndpoint(name="api", http_request=flag),
        InvalidRoute,
        "api",
        "http_request",
    )
    assert "true or false" in str(error)


def test_update_endpoint_asks_for_requests_in_place() -> None:
    state = apply(
        State(),
        CreateBackend(tag="b", target="m:f"),
        CreateEndpoint(name="api", route="/api"),
        SetTraffic(endpoint="api", traffic={"b": 1.0}),
    )
    t = check(state, UpdateEndpoint(name="api", route="/api", http_request=True))
    ep = t.state.endpoints["api"]
    assert ep.http_request is True and ep.traffic == {"b": 1.0}
    assert t.state.routing_table().endpoints["api"].http_request is True
    again = check(t.state, UpdateEndpoint(name="api", route="/api", http_request=True))
    assert again.state is t.state


@pytest.mark.parametrize("route", ["/-/predict", "/-/healthz", "/-/"])
def test_routes_under_the_operator_prefix_are_refused_as_unreachable(route: str) -> None:
    error = assert_rejected(
        State(), lambda: CreateEndpoint(name="api", route=route), InvalidRoute, route, "/-/"
    )
    assert "pick a route outside /-/" in str(error)
    # Near misses stay valid: only the ingress's own prefix is reserved.
    assert CreateEndpoint(name="api", route="/-x").route == "/-x"
    assert CreateEndpoint(name="api", route="/api/-/x").route == "/api/-/x"


@pytest.mark.parametrize("methods", [("FETCH",), (), [5], "BREW"])
def test_invalid_methods_are_rejected(methods: Any) -> None:
    assert_rejected(State(), lambda: CreateEndpoint(name="api", methods=methods), InvalidRoute)


def test_invalid_methods_error_names_the_endpoint() -> None:
    assert_rejected(
        State(), lambda: CreateEndpoint(name="api", methods=("FETCH",)), InvalidRoute, "'api'"
    )


@pytest.mark.parametrize("name", ["", "a b", "a#b", "/api", 5, None])
def test_invalid_endpoint_name_is_rejected(name: Any) -> None:
    assert_rejected(State(), lambda: CreateEndpoint(name=name), InvalidConfig, name)


def test_delete_endpoint_removes_it_and_frees_its_route() -> None:
    state = served()
    t = check(state, DeleteEndpoint(name="api"))
    assert "api" not in t.state.endpoints
    assert kinds(t.effects) == ["UpdateRouter"]
    assert "api" not in t.effects[0].table.endpoints
    # The backend it used is no longer in use, and the route can be taken again.
    again = apply(t.state, CreateEndpoint(name="other", route="/api"), DeleteBackend(tag="a"))
    assert again.endpoints["other"].route == "/api"


def test_delete_missing_endpoint_is_rejected() -> None:
    state = apply(State(), CreateEndpoint(name="known"))
    err = assert_rejected(state, DeleteEndpoint(name="ghost"), EndpointNotFound, "ghost", "known")
    assert err.name == "ghost" and err.known == ("known",)


# ---------------------------------------------------------------------------------------
# CreateBackend


def test_create_backend_starts_num_replicas_with_minted_tags() -> None:
    t = check(State(), backend("a", 3, max_batch_size=4))
    b = t.state.backends["a"]
    assert b.target == TARGET and b.status is BackendStatus.UPDATING
    assert kinds(t.effects) == ["UpdateRouter", "StartReplica", "StartReplica", "StartReplica"]
    assert starts(t.effects) == ["a#0", "a#1", "a#2"]
    for effect in t.effects[1:]:
        assert isinstance(effect, StartReplica)
        assert (effect.backend, effect.target, effect.config) == ("a", TARGET, b.config)
        assert t.state.replicas[effect.tag].status is ReplicaStatus.STARTING
        assert t.state.replicas[effect.tag].backend == "a"
    assert t.state.replica_counter == 3
    # Not RUNNING yet, so not routed; but the router learns the backend's settings.
    route = t.effects[0].table.backends["a"]
    assert route.replicas == () and route.max_batch_size == 4


def test_create_backend_carries_args_and_kwargs_to_the_start() -> None:
    t = check(
        State(),
        CreateBackend(tag="a", target=TARGET, init_args=(1, (2, 3)), init_kwargs={"k": [4]}),
    )
    (effect,) = [e for e in t.effects if isinstance(e, StartReplica)]
    # Stored in the shape a JSON round trip gives back.
    assert effect.init_args == (1, [2, 3]) and effect.init_kwargs == {"k": [4]}


def test_replicas_join_the_table_only_when_running() -> None:
    state = apply(State(), backend("a", 2))
    assert routed(state, "a") == ()
    t = check(state, ReplicaStarted(tag="a#1"))
    assert kinds(t.effects) == ["UpdateRouter"]
    assert routed(t.state, "a") == ("a#1",)
    assert t.state.backends["a"].status is BackendStatus.UPDATING
    t = check(t.state, ReplicaStarted(tag="a#0"))
    assert set(routed(t.state, "a")) == {"a#0", "a#1"}
    assert t.state.backends["a"].status is BackendStatus.HEALTHY
    assert status_of(t.state) == {"a#0": ReplicaStatus.RUNNING, "a#1": ReplicaStatus.RUNNING}


def test_zero_replicas_is_healthy_at_once() -> None:
    t = check(State(), backend("a", 0))
    assert starts(t.effects) == []
    assert t.state.backends["a"].status is BackendStatus.HEALTHY


def test_create_backend_restated_is_a_noop() -> None:
    state = running("a", 2)
    t = check(state, backend("a", 2))
    assert t.state is state and t.effects == ()


def test_create_backend_restated_with_the_class_itself_is_a_noop() -> None:
    state = apply(State(), CreateBackend(tag="m", target=Model))
    t = check(state, CreateBackend(tag="m", target=f"{Model.__module__}:Model"))
    assert t.state is state and t.effects == ()


@pytest.mark.parametrize(
    "other",
    [
        backend("a", 2, target=OTHER_TARGET),
        backend("a", 3),
        CreateBackend(tag="a", target=TARGET, init_args=(1,), config=BackendConfig(num_replicas=2)),
        CreateBackend(
            tag="a", target=TARGET, init_kwargs={"x": 1}, config=BackendConfig(num_replicas=2)
        ),
    ],
)
def test_create_backend_twice_differently_is_rejected(other: CreateBackend) -> None:
    state = running("a", 2)
    err = assert_rejected(state, other, BackendExists, "a")
    assert err.tag == "a"


@pytest.mark.parametrize("tag", ["", "a b", "a#b", "/a", 3, None])
def test_invalid_backend_tag_is_rejected(tag: Any) -> None:
    assert_rejected(State(), lambda: CreateBackend(tag=tag, target=TARGET), InvalidConfig, tag)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("init_args", "abc"),
        ("init_args", 5),
        ("init_args", (object(),)),
        ("init_args", (math.nan,)),
        ("init_kwargs", [("a", 1)]),
        ("init_kwargs", {1: "a"}),
        ("init_kwargs", {"a": {1, 2}}),
        ("config", {"num_replicas": 1}),
        ("config", None),
    ],
)
def test_invalid_backend_arguments_are_rejected(field: str, value: Any) -> None:
    state = running("a", 1)
    err = assert_rejected(
        state, lambda: CreateBackend(tag="b", target=TARGET, **{field: value}), InvalidConfig
    )
    assert err.field.startswith(field)
    assert field in str(err)


# ---------------------------------------------------------------------------------------
# Targets


def test_module_level_class_and_function_become_import_paths() -> None:
    module = Model.__module__
    assert CreateBackend(tag="a", target=Model).target == f"{module}:Model"
    assert CreateBackend(tag="a", target=Model.Inner).target == f"{module}:Model.Inner"
    assert CreateBackend(tag="a", target=handler).target == f"{module}:handler"
    assert CreateBackend(tag="a", target="pkg.mod:Attr.sub").target == "pkg.mod:Attr.sub"


def _closure_target() -> Callable[[], None]:
    def inner() -> None:
        pass

    return inner


def _main_target() -> Any:
    return type("FromMain", (), {"__module__": "__main__"})


def _renamed_target() -> Any:
    def stray() -> None:
        pass

    stray.__qualname__ = "handler"  # claims to be `handler`, but is not it
    return stray


@pytest.mark.parametrize(
    ("make_target", "why"),
    [
        (lambda: lambda x: x, "lambda"),
        (_closure_target, "closure"),
        (_main_target, "__main__"),
        (_renamed_target, "does not name this object"),
        (lambda: 42, "no __module__"),
        (lambda: "myapp.models", "package.module:attribute"),
        (lambda: "myapp.models:", "package.module:attribute"),
        (lambda: ":Echo", "package.module:attribute"),
        (lambda: "my app:Echo", "package.module:attribute"),
        (lambda: "1app:Echo", "package.module:attribute"),
        (lambda: "app:Echo-2", "package.module:attribute"),
        (lambda: "", "package.module:attribute"),
    ],
)
def test_invalid_target_is_rejected_naming_why(make_target: Callable[[], Any], why: str) -> None:
    target = make_target()
    state = running("a", 1)
    err = assert_rejected(state, lambda: CreateBackend(tag="b", target=target), InvalidTarget)
    assert why in str(err)
    assert err.target is target
    if isinstance(target, str):
        assert repr(target) in str(err)


# ---------------------------------------------------------------------------------------
# DeleteBackend


def test_delete_backend_leaves_the_table_then_stops_every_replica() -> None:
    state = running("a", 2, graceful_shutdown_timeout_s=7.5)
    state = apply(state, scale("a", 3, state))  # a#2 STARTING, a#0 and a#1 RUNNING
    t = check(state, DeleteBackend(tag="a"))
    assert kinds(t.effects) == ["UpdateRouter", "StopReplica", "StopReplica", "StopReplica"]
    assert "a" not in t.effects[0].table.backends
    assert sorted(stops(t.effects)) == ["a#0", "a#1", "a#2"]
    assert {e.timeout_s for e in t.effects[1:]} == {7.5}
    assert "a" not in t.state.backends
    assert set(status_of(t.state).values()) == {ReplicaStatus.STOPPING}
    # Each STOPPING replica is forgotten once it reports stopped.
    after = apply(t.state, *(ReplicaStopped(tag=tag) for tag in ["a#0", "a#1", "a#2"]))
    assert dict(after.replicas) == {}


def test_replica_stopped_after_stop_has_no_effects() -> None:
    state = apply(running("a", 1), DeleteBackend(tag="a"))
    t = check(state, ReplicaStopped(tag="a#0"))
    assert t.effects == () and "a#0" not in t.state.replicas


def test_delete_missing_backend_is_rejected() -> None:
    state = running("a", 1)
    err = assert_rejected(state, DeleteBackend(tag="ghost"), BackendNotFound, "ghost", "a")
    assert err.tag == "ghost" and err.known == ("a",)


def test_delete_backend_in_use_by_traffic_is_rejected() -> None:
    err = assert_rejected(served(), DeleteBackend(tag="a"), BackendInUse, "a", "api")
    assert err.tag == "a" and err.endpoints == ("api",)


def test_delete_backend_in_use_by_shadow_is_rejected() -> None:
    state = apply(served(), SetShadowTraffic(endpoint="api", backend="b", proportion=0.1))
    assert_rejected(state, DeleteBackend(tag="b"), BackendInUse, "b", "api")


def test_tags_are_never_reused_after_delete_and_recreate() -> None:
    state = running("a", 2)
    state = apply(state, DeleteBackend(tag="a"))
    t = check(state, backend("a", 2))
    assert starts(t.effects) == ["a#2", "a#3"]
    # The old STOPPING replicas and the new STARTING ones coexist under distinct tags.
    assert status_of(t.state) == {
        "a#0": ReplicaStatus.STOPPING,
        "a#1": ReplicaStatus.STOPPING,
        "a#2": ReplicaStatus.STARTING,
        "a#3": ReplicaStatus.STARTING,
    }
    # Late news about the old replicas does not touch the new backend.
    state = apply(t.state, ReplicaStopped(tag="a#0"), ReplicaDied(tag="a#1", reason="x"))
    assert set(state.replicas) == {"a#2", "a#3"}
    again = apply(start_all(state), DeleteBackend(tag="a"), backend("a", 1))
    assert set(again.replicas) == {"a#2", "a#3", "a#4"}


def test_tags_are_minted_from_one_counter_across_backends() -> None:
    t1 = check(State(), backend("a", 2))
    t2 = check(t1.state, backend("b", 1))
    assert starts(t1.effects) == ["a#0", "a#1"] and starts(t2.effects) == ["b#2"]
    assert t2.state.replica_counter == 3


# ---------------------------------------------------------------------------------------
# SetBackendConfig


def test_scale_up_by_one_starts_one_replica_with_the_next_tag() -> None:
    state = running("a", 2)
    t = check(state, scale("a", 3, state))
    assert starts(t.effects) == ["a#2"] and stops(t.effects) == []
    assert t.state.backends["a"].status is BackendStatus.UPDATING
    assert t.state.backends["a"].config.num_replicas == 3


def test_scale_down_stops_the_newest_running_replica_after_the_router_update() -> None:
    state = running("a", 3)
    t = check(state, scale("a", 2, state))
    assert kinds(t.effects) == ["UpdateRouter", "StopReplica"]
    assert stops(t.effects) == ["a#2"]
    assert set(t.effects[0].table.backends["a"].replicas) == {"a#0", "a#1"}
    assert t.state.replicas["a#2"].status is ReplicaStatus.STOPPING
    assert t.state.backends["a"].status is BackendStatus.HEALTHY


def test_scale_down_stops_starting_replicas_first_then_newest_running() -> None:
    state = running("a", 3)
    state = apply(state, scale("a", 5, state))  # a#3, a#4 STARTING
    state = apply(state, ReplicaStarted(tag="a#4"))  # a#3 STARTING; a#0,1,2,4 RUNNING
    t = check(state, scale("a", 3, state))
    assert stops(t.effects) == ["a#3", "a#4"]
    t = check(state, scale("a", 2, state))
    assert stops(t.effects) == ["a#3", "a#4", "a#2"]
    assert set(routed(t.state, "a")) == {"a#0", "a#1"}
    t = check(state, scale("a", 0, state))
    assert stops(t.effects) == ["a#3", "a#4", "a#2", "a#1", "a#0"]
    assert routed(t.state, "a") == ()
    assert t.state.backends["a"].status is BackendStatus.HEALTHY


def test_scale_down_of_starting_replicas_only() -> None:
    state = apply(State(), backend("a", 2))
    t = check(state, scale("a", 1, state))
    assert stops(t.effects) == ["a#1"] and starts(t.effects) == []
    assert t.state.replicas["a#1"].status is ReplicaStatus.STOPPING


def test_changing_batching_updates_the_route() -> None:
    state = running("a", 2)
    config = state.backends["a"].config.evolve(max_batch_size=16, batch_wait_timeout_s=0.5)
    t = check(state, SetBackendConfig(tag="a", config=config))
    assert kinds(t.effects) == ["UpdateRouter"]
    route = t.effects[0].table.backends["a"]
    assert (route.max_batch_size, route.batch_wait_timeout_s) == (16, 0.5)
    assert set(route.replicas) == {"a#0", "a#1"}


def test_set_backend_config_restated_is_a_noop() -> None:
    state = running("a", 2)
    t = check(state, SetBackendConfig(tag="a", config=BackendConfig(num_replicas=2)))
    assert t.state is state and t.effects == ()


def test_set_backend_config_of_missing_backend_is_rejected() -> None:
    assert_rejected(
        running("a", 1),
        SetBackendConfig(tag="ghost", config=BackendConfig()),
        BackendNotFound,
        "ghost",
    )


@pytest.mark.parametrize("config", [None, {"num_replicas": 2}, 2])
def test_set_backend_config_needs_a_backend_config(config: Any) -> None:
    assert_rejected(
        running("a", 1), lambda: SetBackendConfig(tag="a", config=config), InvalidConfig, "config"
    )


# ---------------------------------------------------------------------------------------
# SetTraffic / SetShadowTraffic


def test_set_traffic_splits_and_drops_zero_weights() -> None:
    state = served()
    t = check(state, SetTraffic(endpoint="api", traffic={"a": 0.25, "b": 0.75}))
    assert dict(t.state.endpoints["api"].traffic) == {"a": 0.25, "b": 0.75}
    assert kinds(t.effects) == ["UpdateRouter"]
    assert dict(t.effects[0].table.endpoints["api"].traffic) == {"a": 0.25, "b": 0.75}
    t = check(t.state, SetTraffic(endpoint="api", traffic={"a": 0, "b": 1}))
    assert dict(t.state.endpoints["api"].traffic) == {"b": 1.0}
    # "a" is drained, so it can be deleted now.
    assert "a" not in apply(t.state, DeleteBackend(tag="a")).backends


def test_set_traffic_restated_is_a_noop() -> None:
    state = served()
    t = check(state, SetTraffic(endpoint="api", traffic={"a": 1}))
    assert t.state is state and t.effects == ()


def test_set_traffic_does_not_touch_replicas() -> None:
    state = served()
    t = check(state, SetTraffic(endpoint="api", traffic={"a": 0.5, "b": 0.5}))
    assert t.state.replicas == state.replicas
    assert t.state.routing_table().backends == state.routing_table().backends


def test_set_traffic_on_missing_endpoint_is_rejected() -> None:
    assert_rejected(
        served(), SetTraffic(endpoint="ghost", traffic={"a": 1}), EndpointNotFound, "ghost"
    )


def test_set_traffic_to_missing_backend_is_rejected() -> None:
    err = assert_rejected(
        served(),
        SetTraffic(endpoint="api", traffic={"a": 0.5, "ghost": 0.5}),
        BackendNotFound,
        "ghost",
    )
    assert err.known == ("a", "b")


@pytest.mark.parametrize(
    "traffic",
    [
        {"a": 0.5},
        {"a": 0.7, "b": 0.7},
        {},
        {"a": -0.5, "b": 1.5},
        {"a": 1.5},
        {"a": math.nan},
        {"a": math.inf},
        {"a": True},
        {"a": "1"},
        {"a": None},
        {1: 1.0},
        "a",
        [("a", 1.0)],
        None,
    ],
)
def test_invalid_traffic_is_rejected(traffic: Any) -> None:
    err = assert_rejected(
        served(), lambda: SetTraffic(endpoint="api", traffic=traffic), InvalidTraffic, "api"
    )
    assert err.endpoint == "api"


def test_invalid_traffic_names_the_bad_weight() -> None:
    assert_rejected(
        served(),
        lambda: SetTraffic(endpoint="api", traffic={"a": 0.25, "b": 0.5}),
        InvalidTraffic,
        "api",
        "0.75",
    )
    assert_rejected(
        served(),
        lambda: SetTraffic(endpoint="api", traffic={"a": 2.0, "b": 0.0}),
        InvalidTraffic,
        "'a'",
        "2.0",
    )


def test_shadow_traffic_added_changed_and_removed() -> None:
    state = served()
    t = check(state, SetShadowTraffic(endpoint="api", backend="b", proportion=0.1))
    assert dict(t.state.endpoints["api"].shadow) == {"b": 0.1}
    assert kinds(t.effects) == ["UpdateRouter"]
    assert dict(t.effects[0].table.endpoints["api"].shadow) == {"b": 0.1}
    restated = check(t.state, SetShadowTraffic(endpoint="api", backend="b", proportion=0.1))
    assert restated.state is t.state and restated.effects == ()
    t = check(t.state, SetShadowTraffic(endpoint="api", backend="b", proportion=1))
    assert dict(t.state.endpoints["api"].shadow) == {"b": 1.0}
    t = check(t.state, SetShadowTraffic(endpoint="api", backend="b", proportion=0))
    assert dict(t.state.endpoints["api"].shadow) == {}
    assert kinds(t.effects) == ["UpdateRouter"]
    # Removing an absent shadow restates what is there: a no-op.
    again = check(t.state, SetShadowTraffic(endpoint="api", backend="b", proportion=0))
    assert again.state is t.state and again.effects == ()


def test_shadow_traffic_on_missing_endpoint_or_backend_is_rejected() -> None:
    state = served()
    assert_rejected(
        state,
        SetShadowTraffic(endpoint="ghost", backend="b", proportion=0.1),
        EndpointNotFound,
        "ghost",
    )
    assert_rejected(
        state,
        SetShadowTraffic(endpoint="api", backend="ghost", proportion=0.1),
        BackendNotFound,
        "ghost",
    )


@pytest.mark.parametrize("proportion", [-0.1, 1.5, math.nan, math.inf, True, "0.5", None])
def test_invalid_shadow_proportion_is_rejected(proportion: Any) -> None:
    assert_rejected(
        served(),
        lambda: SetShadowTraffic(endpoint="api", backend="b", proportion=proportion),
        InvalidTraffic,
        "api",
        proportion,
    )


# ---------------------------------------------------------------------------------------
# Events: started, failed, died, stopped


@pytest.mark.parametrize(
    "event",
    [
        ReplicaStarted(tag="ghost#7"),
        ReplicaStartFailed(tag="ghost#7", reason="x"),
        ReplicaStopped(tag="ghost#7"),
        ReplicaDied(tag="ghost#7", reason="x"),
        ReplicaStarted(tag="a#99"),
        ReplicaDied(tag="not-a-tag"),
        ReplicaStopped(tag=""),
    ],
)
def test_events_about_unknown_tags_are_ignored(event: Message) -> None:
    state = served()
    t = check(state, event)
    assert t.state is state and t.effects == ()


def test_replica_started_twice_is_ignored() -> None:
    state = running("a", 1)
    t = check(state, ReplicaStarted(tag="a#0"))
    assert t.state is state and t.effects == ()


def test_replica_started_while_stopping_is_ignored() -> None:
    state = apply(State(), backend("a", 1), DeleteBackend(tag="a"))
    t = check(state, ReplicaStarted(tag="a#0"))
    assert t.state is state and t.effects == ()


def test_failed_start_is_retried_with_a_new_tag() -> None:
    state = apply(State(), backend("a", 1))
    t = check(state, ReplicaStartFailed(tag="a#0", reason="ImportError: no myapp"))
    assert starts(t.effects) == ["a#1"]
    assert "a#0" not in t.state.replicas
    b = t.state.backends["a"]
    assert b.status is BackendStatus.UNHEALTHY
    assert b.start_failures == 1 and b.last_error == "ImportError: no myapp"


def _fail_until_failed(state: State, backend_tag: str) -> tuple[State, list[str]]:
    """Fail every start of the backend until it is FAILED; return the tags tried."""
    tried = []
    while state.backends[backend_tag].status is not BackendStatus.FAILED:
        (tag,) = [
            t
            for t, r in sorted(state.replicas.items())
            if r.backend == backend_tag and r.status is ReplicaStatus.STARTING
        ][:1]
        tried.append(tag)
        t = check(state, ReplicaStartFailed(tag=tag, reason=f"boom {len(tried)}"))
        if t.state.backends[backend_tag].status is BackendStatus.FAILED:
            assert starts(t.effects) == []
        else:
            assert len(starts(t.effects)) == 1
        state = t.state
        assert len(tried) <= MAX_START_FAILURES
    return state, tried


def test_start_retries_are_bounded_then_backend_is_failed() -> None:
    state = apply(State(), backend("a", 1))
    state, tried = _fail_until_failed(state, "a")
    assert len(tried) == MAX_START_FAILURES
    assert tried == [f"a#{n}" for n in range(MAX_START_FAILURES)]
    b = state.backends["a"]
    assert b.status is BackendStatus.FAILED
    assert b.last_error == f"boom {MAX_START_FAILURES}"
    assert dict(state.replicas) == {}
    # No more starts while FAILED, whatever else happens...
    for message in [
        Recover(live=frozenset()),
        backend("a", 1),  # a restated definition is a no-op
        SetBackendConfig(tag="a", config=BackendConfig(num_replicas=1)),  # same config
        CreateEndpoint(name="api"),
    ]:
        t = check(state, message)
        assert starts(t.effects) == [], message
        assert t.state.backends["a"].status is BackendStatus.FAILED
        assert t.state.backends["a"].last_error == b.last_error
    # ...until the config changes: a fresh budget.
    t = check(state, SetBackendConfig(tag="a", config=BackendConfig(num_replicas=2)))
    assert starts(t.effects) == [f"a#{MAX_START_FAILURES}", f"a#{MAX_START_FAILURES + 1}"]
    b = t.state.backends["a"]
    assert b.status is BackendStatus.UPDATING and b.start_failures == 0
    assert start_all(t.state).backends["a"].status is BackendStatus.HEALTHY


def test_failed_backend_can_be_deleted() -> None:
    state, _ = _fail_until_failed(apply(State(), backend("a", 1)), "a")
    t = check(state, DeleteBackend(tag="a"))
    assert "a" not in t.state.backends


def test_failed_backend_with_running_replicas_keeps_them() -> None:
    state = running("a", 1)
    state, _ = _fail_until_failed(apply(state, scale("a", 2, state)), "a")
    assert routed(state, "a") == ("a#0",)
    # A death of a RUNNING replica of a FAILED backend is not replaced either.
    t = check(state, ReplicaDied(tag="a#0", reason="oom"))
    assert starts(t.effects) == [] and routed(t.state, "a") == ()


def test_start_failures_must_be_consecutive() -> None:
    state = apply(State(), backend("a", 2))
    # Fail MAX-1 times on one slot, then the other slot starts: the budget resets.
    for n in range(MAX_START_FAILURES - 1):
        tag = "a#0" if n == 0 else f"a#{n + 1}"
        state = apply(state, ReplicaStartFailed(tag=tag, reason="flaky"))
    state = apply(state, ReplicaStarted(tag="a#1"))
    b = state.backends["a"]
    assert b.start_failures == 0 and b.last_error is None
    t = check(state, ReplicaStartFailed(tag=f"a#{MAX_START_FAILURES}", reason="flaky"))
    assert t.state.backends["a"].status is BackendStatus.UNHEALTHY
    assert len(starts(t.effects)) == 1


def test_late_success_of_a_failed_backend_keeps_the_state_valid() -> None:
    # Two slots: one start stays in flight while the other slot burns the budget.
    state = apply(State(), backend("a", 2))
    tag = "a#0"
    for n in range(MAX_START_FAILURES):
        state = apply(state, ReplicaStartFailed(tag=tag, reason=f"boom {n}"))
        tag = f"a#{n + 2}"
    assert state.backends["a"].status is BackendStatus.FAILED
    assert status_of(state) == {"a#1": ReplicaStatus.STARTING}
    t = step(state, ReplicaStarted(tag="a#1"))
    validate_state(t.state)
    b = t.state.backends["a"]
    if b.status is BackendStatus.FAILED:
        assert b.last_error == f"boom {MAX_START_FAILURES - 1}"


def test_start_failure_of_a_stopping_replica_just_forgets_it() -> None:
    state = apply(State(), backend("a", 1), DeleteBackend(tag="a"))
    t = check(state, ReplicaStartFailed(tag="a#0", reason="late"))
    assert t.effects == () and dict(t.state.replicas) == {}


def test_running_replica_that_dies_leaves_the_table_and_is_replaced() -> None:
    state = served()
    t = check(state, ReplicaDied(tag="a#0", reason="segfault"))
    assert kinds(t.effects) == ["UpdateRouter", "StartReplica"]
    assert t.effects[0].table.backends["a"].replicas == ("a#1",)
    assert starts(t.effects) == [f"a#{state.replica_counter}"]
    assert "a#0" not in t.state.replicas
    assert t.state.backends["a"].status is BackendStatus.UPDATING
    # A death is not a failed start: the budget is untouched.
    assert t.state.backends["a"].start_failures == 0


def test_running_replica_that_stops_on_its_own_is_replaced() -> None:
    state = served()
    t = check(state, ReplicaStopped(tag="a#1"))
    assert kinds(t.effects) == ["UpdateRouter", "StartReplica"]
    assert "a#1" not in t.state.replicas


def test_starting_replica_that_dies_counts_as_a_failed_start() -> None:
    state = apply(State(), backend("a", 1))
    t = check(state, ReplicaDied(tag="a#0", reason="killed"))
    assert starts(t.effects) == ["a#1"]
    assert t.state.backends["a"].start_failures == 1
    assert t.state.backends["a"].last_error == "killed"


def test_stopping_replica_that_dies_is_forgotten() -> None:
    state = running("a", 2)
    state = apply(state, scale("a", 1, state))
    t = check(state, ReplicaDied(tag="a#1", reason="x"))
    assert t.effects == () and "a#1" not in t.state.replicas


# ---------------------------------------------------------------------------------------
# Recover


def test_recover_on_empty_state_sends_one_router_update() -> None:
    t = check(State(), Recover(live=frozenset()))
    assert kinds(t.effects) == ["UpdateRouter"]
    assert t.state == State()


def test_recover_starting_and_live_becomes_running() -> None:
    state = apply(running("a", 1), backend("b", 1))
    t = check(state, Recover(live={"a#0", "b#1"}))
    assert t.state.replicas["b#1"].status is ReplicaStatus.RUNNING
    assert kinds(t.effects) == ["UpdateRouter"]
    assert routed(t.state, "b") == ("b#1",)
    assert t.state.backends["b"].status is BackendStatus.HEALTHY


def test_recover_starting_and_not_live_is_started_again_with_the_same_tag() -> None:
    state = apply(running("a", 1), backend("b", 1))
    t = check(state, Recover(live={"a#0"}))
    assert kinds(t.effects) == ["UpdateRouter", "StartReplica"]
    (effect,) = [e for e in t.effects if isinstance(e, StartReplica)]
    assert effect.tag == "b#1" and effect.backend == "b" and effect.target == TARGET
    assert t.state.replicas["b#1"].status is ReplicaStatus.STARTING
    assert t.state.replica_counter == state.replica_counter


def test_recover_running_and_not_live_is_replaced() -> None:
    state = running("a", 2)
    t = check(state, Recover(live={"a#0"}))
    assert kinds(t.effects) == ["UpdateRouter", "StartReplica"]
    assert t.effects[0].table.backends["a"].replicas == ("a#0",)
    assert starts(t.effects) == ["a#2"]
    assert "a#1" not in t.state.replicas


def test_recover_stopping_and_live_is_stopped_again() -> None:
    state = running("a", 2, graceful_shutdown_timeout_s=3.0)
    state = apply(state, scale("a", 1, state))
    t = check(state, Recover(live={"a#0", "a#1"}))
    assert kinds(t.effects) == ["UpdateRouter", "StopReplica"]
    assert t.effects[1] == StopReplica(tag="a#1", timeout_s=3.0)
    assert t.state.replicas["a#1"].status is ReplicaStatus.STOPPING


def test_recover_stopping_of_a_deleted_backend_and_live_is_stopped_again() -> None:
    state = apply(running("a", 1), DeleteBackend(tag="a"))
    t = check(state, Recover(live={"a#0"}))
    assert stops(t.effects) == ["a#0"]
    assert t.state.replicas["a#0"].status is ReplicaStatus.STOPPING


def test_recover_stopping_and_not_live_is_forgotten() -> None:
    state = running("a", 2)
    state = apply(state, scale("a", 1, state))
    t = check(state, Recover(live={"a#0"}))
    assert kinds(t.effects) == ["UpdateRouter"]
    assert set(t.state.replicas) == {"a#0"}


@pytest.mark.parametrize(
    ("orphan", "counter"),
    [("a#99", 100), ("zz#7", 8), ("zz#3", 7), ("a#1", 7), ("not-a-tag", 7), ("a#x", 7)],
)
def test_recover_live_but_unknown_is_stopped_as_an_orphan(orphan: str, counter: int) -> None:
    state = running("a", 2)
    state = apply(state, DeleteBackend(tag="a"), ReplicaStopped(tag="a#0"))
    state = apply(state, ReplicaStopped(tag="a#1"), backend("a", 1), backend("b", 4))
    state = start_all(state)
    assert state.replica_counter == 7 and "a#1" not in state.replicas
    live = {tag for tag in state.replicas} | {orphan}
    t = check(state, Recover(live=live))
    assert kinds(t.effects) == ["UpdateRouter", "StopReplica"]
    assert stops(t.effects) == [orphan]
    assert orphan not in t.state.replicas
    # The orphan's number is never minted again.
    assert t.state.replica_counter == counter
    later = check(t.state, scale("b", 5, t.state))
    assert starts(later.effects) == [f"b#{counter}"]


def test_recover_every_case_at_once_sends_exactly_one_router_update() -> None:
    state = running("a", 3, graceful_shutdown_timeout_s=2.0)  # a#0, a#1, a#2 RUNNING
    state = apply(state, scale("a", 1, state))  # a#1, a#2 STOPPING
    state = apply(state, backend("b", 2))  # b#3, b#4 STARTING
    state = apply(state, ReplicaStarted(tag="b#4"))  # b#4 RUNNING
    live = {"a#0", "a#1", "b#3", "x#20"}  # a#2 and b#4 are gone
    t = check(state, Recover(live=live))
    assert kinds(t.effects).count("UpdateRouter") == 1
    assert kinds(t.effects)[0] == "UpdateRouter"
    assert status_of(t.state) == {
        "a#0": ReplicaStatus.RUNNING,  # RUNNING & live: kept
        "a#1": ReplicaStatus.STOPPING,  # STOPPING & live: stopped again
        "b#3": ReplicaStatus.RUNNING,  # STARTING & live: RUNNING
        "b#21": ReplicaStatus.STARTING,  # replaces b#4 (RUNNING & not live)
    }  # a#2 (STOPPING & not live): forgotten
    assert sorted(stops(t.effects)) == ["a#1", "x#20"]
    assert starts(t.effects) == ["b#21"]
    assert t.state.replica_counter == 22
    assert set(routed(t.state, "a")) == {"a#0"} and routed(t.state, "b") == ("b#3",)


def test_recover_is_a_noop_on_state_when_everything_is_live() -> None:
    state = served()
    t = check(state, Recover(live=frozenset(state.replicas)))
    assert t.state == state
    assert kinds(t.effects) == ["UpdateRouter"]
    assert t.effects[0].table == state.routing_table()


# ---------------------------------------------------------------------------------------
# BackendConfig


def test_backend_config_defaults() -> None:
    c = BackendConfig()
    assert (c.num_replicas, c.max_batch_size, c.batch_wait_timeout_s) == (1, None, 0.0)
    assert (c.max_concurrent_queries, c.graceful_shutdown_timeout_s) == (8, 5.0)
    assert c.user_config is None and c.runtime_options == {}


def test_backend_config_accepts_valid_values() -> None:
    c = BackendConfig(
        num_replicas=0,
        max_batch_size=1,
        batch_wait_timeout_s=1,
        max_concurrent_queries=1,
        graceful_shutdown_timeout_s=0,
        user_config={"threshold": 0.5, "labels": ("x", "y")},
        runtime_options={"num_cpus": 2, "resources": {"gpu_kind": 1}},
    )
    assert c.batch_wait_timeout_s == 1.0 and isinstance(c.batch_wait_timeout_s, float)
    # Stored in the shape a JSON round trip gives back.
    assert c.user_config == {"threshold": 0.5, "labels": ["x", "y"]}


_BAD_CONFIG = [
    ("num_replicas", -1),
    ("num_replicas", 1.5),
    ("num_replicas", "2"),
    ("num_replicas", True),
    ("num_replicas", math.nan),
    ("max_batch_size", 0),
    ("max_batch_size", -3),
    ("max_batch_size", 2.0),
    ("max_batch_size", False),
    ("max_batch_size", "8"),
    ("batch_wait_timeout_s", -0.1),
    ("batch_wait_timeout_s", math.nan),
    ("batch_wait_timeout_s", math.inf),
    ("batch_wait_timeout_s", True),
    ("batch_wait_timeout_s", "0.1"),
    ("batch_wait_timeout_s", None),
    ("max_concurrent_queries", 0),
    ("max_concurrent_queries", -1),
    ("max_concurrent_queries", True),
    ("max_concurrent_queries", 8.0),
    ("max_concurrent_queries", None),
    ("graceful_shutdown_timeout_s", -1),
    ("graceful_shutdown_timeout_s", math.nan),
    ("graceful_shutdown_timeout_s", -math.inf),
    ("graceful_shutdown_timeout_s", False),
    ("graceful_shutdown_timeout_s", "5"),
    ("user_config", object()),
    ("user_config", {1: "a"}),
    ("user_config", {"a": {1, 2}}),
    ("user_config", math.nan),
    ("user_config", [math.inf]),
    ("user_config", b"bytes"),
    ("runtime_options", None),
    ("runtime_options", [("num_cpus", 1)]),
    ("runtime_options", {"num_cpus": object()}),
    ("runtime_options", {1: 2}),
    ("runtime_options", {"num_gpus": math.nan}),
]


@pytest.mark.parametrize(("field", "value"), _BAD_CONFIG)
def test_backend_config_rejects_bad_values_naming_field_and_value(field: str, value: Any) -> None:
    with pytest.raises(InvalidConfig) as info:
        BackendConfig(**{field: value})
    err = info.value
    assert isinstance(err, CommandError) and isinstance(err, ValueError)
    assert err.field.startswith(field) and field in str(err)
    assert err.value is value or err.field != field  # nested values name the inner one
    assert repr(err.value) in str(err)


@pytest.mark.parametrize(("field", "value"), _BAD_CONFIG)
def test_backend_config_evolve_rejects_bad_values(field: str, value: Any) -> None:
    with pytest.raises(InvalidConfig, match=field):
        BackendConfig().evolve(**{field: value})


def test_backend_config_evolve() -> None:
    c = BackendConfig(num_replicas=2, max_batch_size=4)
    d = c.evolve(num_replicas=3)
    assert d == BackendConfig(num_replicas=3, max_batch_size=4)
    assert c.num_replicas == 2
    assert c.evolve() == c


def test_backend_config_evolve_with_unknown_key_names_it() -> None:
    with pytest.raises(InvalidConfig) as info:
        BackendConfig().evolve(num_replicas=2, replicas=3)
    assert info.value.field == "replicas" and info.value.value == 3
    assert "'replicas'" in str(info.value) or "replicas=3" in str(info.value)
    assert "num_replicas" in str(info.value)  # it lists the known keys, the way out


def test_backend_config_is_frozen() -> None:
    c = BackendConfig()
    with pytest.raises(AttributeError):
        c.num_replicas = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------------
# Purity


def test_step_never_modifies_its_input() -> None:
    state = served()
    before = encode(state, 0)
    table = state.routing_table()
    for message in [
        ReplicaDied(tag="a#0"),
        DeleteEndpoint(name="api"),
        scale("a", 5, state),
        scale("a", 0, state),
        Recover(live=frozenset()),
        SetTraffic(endpoint="api", traffic={"b": 1}),
    ]:
        step(state, message)
        assert encode(state, 0) == before
        assert state.routing_table() == table


def test_step_is_deterministic() -> None:
    state = served()
    for message in [
        scale("a", 4, state),
        Recover(live={"a#0", "zz#40"}),
        ReplicaDied(tag="b#2", reason="x"),
    ]:
        assert step(state, message) == step(state, message)


def _try(mutate: Callable[[], object]) -> None:
    """Run a mutation; a value that refuses to be mutated is just as good."""
    with contextlib.suppress(TypeError, AttributeError):
        mutate()


def test_effects_share_no_mutable_values_with_the_state() -> None:
    config = BackendConfig(user_config={"k": [1]}, runtime_options={"resources": {"x": 1}})
    command = CreateBackend(
        tag="a", target=TARGET, init_args=([1],), init_kwargs={"labels": ["x"]}, config=config
    )
    t = check(State(), command)
    before = encode(t.state, 0)
    (effect,) = [e for e in t.effects if isinstance(e, StartReplica)]
    # What a replica's constructor or reconfigure() may do with what it is given:
    _try(lambda: effect.init_args[0].append(2))
    _try(lambda: effect.init_kwargs["labels"].append("y"))
    _try(lambda: effect.config.user_config["k"].append(2))
    _try(lambda: effect.config.runtime_options["resources"].update(x=8))
    assert encode(t.state, 0) == before
    # ...and the backend still equals its definition, so restating it is a no-op.
    assert step(t.state, command).state is t.state


# ---------------------------------------------------------------------------------------
# Rolling replacement when a config change reaches inside replicas


def new_user_config(state: State, tag: str, value: Any) -> SetBackendConfig:
    return SetBackendConfig(tag=tag, config=state.backends[tag].config.evolve(user_config=value))


def test_a_user_config_change_rolls_replicas_without_losing_capacity() -> None:
    state = running("a", 2, max_surge=1.0)  # all new replicas at once
    t = check(state, new_user_config(state, "a", {"threshold": 1}))
    # New replicas start; the old ones keep serving (the table does not change yet).
    assert kinds(t.effects) == ["StartReplica", "StartReplica"]
    assert [e.config.user_config for e in t.effects] == [{"threshold": 1}] * 2
    assert set(routed(t.state, "a")) == {"a#0", "a#1"}
    assert t.state.backends["a"].status is BackendStatus.UPDATING
    assert t.state.backends["a"].version == 1
    # Each new replica that comes up retires one old one, oldest first.
    t = check(t.state, ReplicaStarted(tag="a#2"))
    assert kinds(t.effects) == ["UpdateRouter", "StopReplica"] and stops(t.effects) == ["a#0"]
    assert set(routed(t.state, "a")) == {"a#1", "a#2"}
    t = check(t.state, ReplicaStarted(tag="a#3"))
    assert stops(t.effects) == ["a#1"] and set(routed(t.state, "a")) == {"a#2", "a#3"}
    assert t.state.backends["a"].status is BackendStatus.HEALTHY
    state = apply(t.state, ReplicaStopped(tag="a#0"), ReplicaStopped(tag="a#1"))
    assert {r.version for r in state.replicas.values()} == {1}


def test_scale_batching_and_timeouts_apply_without_new_replicas() -> None:
    state = running("a", 2)
    config = state.backends["a"].config.evolve(
        max_batch_size=4, max_concurrent_queries=2, graceful_shutdown_timeout_s=1.0
    )
    t = check(state, SetBackendConfig(tag="a", config=config))
    assert starts(t.effects) == [] and t.state.backends["a"].version == 0


def test_a_new_config_that_cannot_start_leaves_the_old_replicas_serving() -> None:
    state = running("a", 2, max_surge=1.0)
    state = apply(state, new_user_config(state, "a", "broken"))
    for n in range(MAX_START_FAILURES):
        tag = next(t for t, r in state.replicas.items() if r.status is ReplicaStatus.STARTING)
        state = apply(state, ReplicaStartFailed(tag=tag, reason=f"bad config {n}"))
    assert state.backends["a"].status is BackendStatus.FAILED
    assert set(routed(state, "a")) == {"a#0", "a#1"}  # still serving the old config
    # Fixing the config rolls again, onto the fixed one.
    t = check(state, new_user_config(state, "a", "fixed"))
    assert len(starts(t.effects)) == 2 and t.state.backends["a"].version == 2


def _active(state: State, tag: str) -> int:
    """Replicas of ``tag`` starting or serving (a STOPPING one is draining)."""
    return sum(
        1
        for r in state.replicas.values()
        if r.backend == tag and r.status is not ReplicaStatus.STOPPING
    )


@pytest.mark.parametrize(
    ("replicas", "max_surge", "most"), [(8, 0.25, 10), (8, 1.0, 16), (3, 0.25, 4), (1, 0.25, 2)]
)
def test_a_roll_never_runs_more_than_max_surge_beyond_the_wanted_count_and_finishes(
    replicas: int, max_surge: float, most: int
) -> None:
    state = running("a", replicas, max_surge=max_surge)
    t = check(state, new_user_config(state, "a", {"v": 2}))
    assert len(starts(t.effects)) == most - replicas
    state, seen = t.state, [_active(t.state, "a")]
    while True:
        starting = sorted(
            t for t, r in state.replicas.items() if r.status is ReplicaStatus.STARTING
        )
        stopping = sorted(
            t for t, r in state.replicas.items() if r.status is ReplicaStatus.STOPPING
        )
        if not starting and not stopping:
            break
        # One answer at a time: stops first (the runtime finishes them), then a start.
        message = ReplicaStopped(tag=stopping[0]) if stopping else ReplicaStarted(tag=starting[0])
        state = check(state, message).state
        seen.append(_active(state, "a"))
    assert max(seen) == most
    assert state.backends["a"].status is BackendStatus.HEALTHY
    assert {r.version for r in state.replicas.values()} == {1}
    assert len(state.replicas) == replicas
    assert all(r.status is ReplicaStatus.RUNNING for r in state.replicas.values())


def test_a_roll_never_drops_below_the_wanted_count_of_serving_replicas() -> None:
    state = running("a", 8)
    state = apply(state, new_user_config(state, "a", {"v": 2}))
    for _ in range(8):
        tag = min(t for t, r in state.replicas.items() if r.status is ReplicaStatus.STARTING)
        state = apply(state, ReplicaStarted(tag=tag))
        assert len(routed(state, "a")) == 8


def test_max_surge_is_a_fraction_above_0_and_at_most_1() -> None:
    assert BackendConfig().max_surge == 0.25
    for bad in (0, -0.5, 1.5, float("nan"), True, "25%"):
        with pytest.raises(InvalidConfig, match="max_surge"):
            BackendConfig(max_surge=bad)


def test_a_change_while_new_replicas_start_stops_them_and_starts_newer_ones() -> None:
    state = running("a", 1)
    state = apply(state, new_user_config(state, "a", 1))  # a#1 starting (version 1)
    t = check(state, new_user_config(state, "a", 2))
    assert stops(t.effects) == ["a#1"] and starts(t.effects) == ["a#2"]
    assert set(routed(t.state, "a")) == {"a#0"}


def redefined(state: State, tag: str, **changes: Any) -> UpdateBackend:
    b = state.backends[tag]
    fields: dict[str, Any] = {
        "tag": tag,
        "target": b.target,
        "init_args": b.init_args,
        "init_kwargs": b.init_kwargs,
        "config": b.config,
    }
    fields.update(changes)
    return UpdateBackend(**fields)


def test_new_init_kwargs_roll_replicas_while_the_endpoint_keeps_its_route() -> None:
    state = served()
    t = check(state, redefined(state, "a", init_kwargs={"v": 2}))
    # The endpoint and its route are untouched; the old replicas keep serving.
    assert t.state.endpoints == state.endpoints
    assert set(routed(t.state, "a")) == {"a#0", "a#1"}
    # The surge bound (max_surge 25% of 2, at least 1) starts one new replica at a time.
    assert kinds(t.effects) == ["StartReplica"]
    assert [e.init_kwargs for e in t.effects] == [{"v": 2}]
    assert t.state.backends["a"].version == 1
    assert t.state.backends["a"].status is BackendStatus.UPDATING
    # Each new replica that comes up retires one old one; the route is never empty.
    state, pending = t.state, starts(t.effects)
    while pending:
        out = step(state, ReplicaStarted(tag=pending.pop(0)))
        state = out.state
        pending += starts(out.effects)
        assert routed(state, "a")
    assert set(routed(state, "a")) == {"a#3", "a#4"}
    assert state.backends["a"].init_kwargs == {"v": 2}
    assert state.backends["a"].status is BackendStatus.HEALTHY


def test_a_new_target_or_init_args_rolls_too() -> None:
    state = running("a", 1)
    for change in ({"target": OTHER_TARGET}, {"init_args": (1,)}):
        t = check(state, redefined(state, "a", **change))
        assert len(starts(t.effects)) == 1
        assert t.state.backends["a"].version == state.backends["a"].version + 1


def test_update_backend_restating_the_definition_is_a_noop() -> None:
    state = running("a", 2)
    t = step(state, redefined(state, "a"))
    assert t.state is state and t.effects == ()


def test_update_backend_of_a_failed_backend_clears_its_failures() -> None:
    state = apply(State(), backend("a", 1))
    for n in range(MAX_START_FAILURES):
        tag = next(t for t, r in state.replicas.items() if r.status is ReplicaStatus.STARTING)
        state = apply(state, ReplicaStartFailed(tag=tag, reason=f"No module named 'x' {n}"))
    assert state.backends["a"].status is BackendStatus.FAILED
    t = check(state, redefined(state, "a", init_kwargs={"fixed": True}))
    b = t.state.backends["a"]
    assert b.status is BackendStatus.UPDATING and b.last_error is None
    assert b.start_failures == 0 and len(starts(t.effects)) == 1


def test_update_backend_of_a_missing_backend_is_rejected() -> None:
    state = running("a", 1)
    assert_rejected(state, UpdateBackend(tag="nope", target=TARGET), BackendNotFound, "nope")


def test_outdated_replicas_survive_a_checkpoint_and_recovery() -> None:
    from servecore._core.records import decode

    state = running("a", 2)
    state = apply(state, new_user_config(state, "a", 1), ReplicaStarted(tag="a#2"))
    loaded, _ = decode(encode(state, 7), "test")
    validate_state(loaded)
    assert set(routed(loaded, "a")) == set(routed(state, "a")) == {"a#1", "a#2"}
    # a#3 (new) never started; the old a#1 still runs; a#0 was being stopped.
    t = check(loaded, Recover(live=frozenset({"a#0", "a#1", "a#2"})))
    assert starts(t.effects) == ["a#3"] and stops(t.effects) == ["a#0"]
    t = check(t.state, ReplicaStarted(tag="a#3"))
    assert stops(t.effects) == ["a#1"]
    assert t.state.backends["a"].status is BackendStatus.HEALTHY


# -- public values compare with plain ones --------------------------------------------------


def test_state_compares_equal_to_plain_mappings() -> None:
    state = served()
    assert state.endpoints["api"].traffic == {"a": 1.0}
    assert state.endpoints["api"].traffic == {"a": 1.0}
    assert state.endpoints["api"].traffic != {"a": 0.5}
    assert state.endpoints["api"].shadow == {}
    assert state.endpoints == {"api": state.endpoints["api"]}
    assert state.backends == dict(state.backends.items())
    assert state.replicas == {tag: state.replicas[tag] for tag in ("a#0", "a#1", "b#2")}
    assert state.replicas != {}
    assert state.routing_table().backends == dict(state.routing_table().backends.items())
    # Persistent updates stay: a set returns a new map and leaves the old one as it was.
    traffic = state.endpoints["api"].traffic
    assert traffic.set("b", 0.5) == {"a": 1.0, "b": 0.5} and traffic == {"a": 1.0}


# -- change sets delete the replicas that leave ---------------------------------------------


def test_a_failed_start_deletes_the_replica_from_the_change_set() -> None:
    state = apply(State(), backend("a", 1))
    t = check(state, ReplicaStartFailed(tag="a#0", reason="boom"))
    assert t.changes.replicas["a#0"] is None and "a#0" not in t.state.replicas


def test_a_scale_down_deletes_the_stopped_replica_from_the_change_set() -> None:
    state = apply(running("a", 2), scale("a", 1, running("a", 2)))
    (stopping,) = [t for t, r in state.replicas.items() if r.status is ReplicaStatus.STOPPING]
    t = check(state, ReplicaStopped(tag=stopping))
    assert t.changes.replicas == {stopping: None}


def test_a_stop_deletes_every_replica_from_the_change_sets() -> None:
    state = apply(running("a", 2), DeleteBackend(tag="a"))
    for tag in ("a#0", "a#1"):
        t = check(state, ReplicaStopped(tag=tag))
        assert t.changes.replicas == {tag: None}
        state = t.state
    assert not state.replicas


# -- deaths with and without an uptime; resync ----------------------------------------------


@pytest.mark.parametrize(
    ("uptime_s", "early"),
    [(None, False), (0.0, True), (EARLY_DEATH_S - 0.001, True), (EARLY_DEATH_S, False)],
)
def test_a_death_counts_as_early_only_by_its_uptime(uptime_s: float | None, early: bool) -> None:
    state = running("a", 1)
    t = check(state, ReplicaDied(tag="a#0", reason="gone", uptime_s=uptime_s))
    assert t.state.backends["a"].early_deaths == (1 if early else 0)
    assert starts(t.effects) == ["a#1"]  # replaced either way


def test_resync_replaces_the_dead_stops_orphans_and_writes_nothing_when_in_step() -> None:
    state = running("a", 2)
    in_step = check(state, Resync(live=frozenset({"a#0", "a#1"})))
    assert in_step.effects == () and len(in_step.changes) == 0
    t = check(state, Resync(live=frozenset({"a#0", "zz#9"})))
    assert "a#1" not in t.state.replicas and t.changes.replicas["a#1"] is None
    # As in recovery, an orphan's number is never minted again: the counter jumps past it.
    assert starts(t.effects) == ["a#10"] and stops(t.effects) == ["zz#9"]
    busy = check(state, Resync(live=frozenset({"a#0"}), busy=frozenset({"a#1"})))
    assert busy.state == state  # a tag still being started or stopped is left alone
