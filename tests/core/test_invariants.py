"""``validate_state`` catches what it claims: each invariant, broken on purpose in an
otherwise valid state, fails with a message naming what is wrong. (With it switched
off, every other test would still pass: this is its only guard.)"""

from __future__ import annotations

import re
from collections.abc import Callable

import attrs
import pytest

from servecore import (
    BackendConfig,
    BackendStatus,
    CreateBackend,
    CreateEndpoint,
    ReplicaStarted,
    ReplicaStatus,
    SetTraffic,
    State,
    step,
    validate_state,
)


def served() -> State:
    """Backend ``a`` with two RUNNING replicas, endpoint ``e`` at ``/e`` sending to it."""
    state = State()
    for message in (
        CreateBackend(tag="a", target="m:T", config=BackendConfig(num_replicas=2)),
        ReplicaStarted(tag="a#0"),
        ReplicaStarted(tag="a#1"),
        CreateEndpoint(name="e", route="/e"),
        SetTraffic(endpoint="e", traffic={"a": 1.0}),
    ):
        state = step(state, message).state
    validate_state(state)
    return state


def _rebuilt(state: State, **parts: object) -> State:
    """``state`` rebuilt from changed checkpointed parts (table and index derived)."""
    fields = {
        "endpoints": dict(state.endpoints),
        "backends": dict(state.backends),
        "replicas": dict(state.replicas),
        "replica_counter": state.replica_counter,
    }
    fields.update(parts)
    return State.rebuild(**fields)  # type: ignore[arg-type]


def _routes_to_missing_backend(s: State) -> State:
    backends = dict(s.backends)
    backends["ghost"] = attrs.evolve(backends["a"], tag="ghost")
    endpoints = {"e": _force(s.endpoints["e"], traffic={"ghost": 1.0})}
    return attrs.evolve(_rebuilt(s, endpoints=endpoints), backends=s.backends)


def _force(value: object, **changes: object) -> object:
    """A copy of a frozen value with fields set past its validators (a corrupt value)."""
    copy = attrs.evolve(value)  # type: ignore[misc]
    for name, new in changes.items():
        object.__setattr__(copy, name, new)
    return copy


def _tag_at_or_past_the_counter(s: State) -> State:
    return _rebuilt(s, replica_counter=1)


def _replica_of_missing_backend(s: State) -> State:
    replicas = dict(s.replicas)
    replicas["a#1"] = _force(replicas["a#1"], backend="zzz")
    return attrs.evolve(s, replicas=type(s.replicas)(replicas))


def _replica_from_the_future(s: State) -> State:
    replicas = dict(s.replicas)
    replicas["a#1"] = attrs.evolve(replicas["a#1"], version=s.backends["a"].version + 1)
    return attrs.evolve(s, replicas=type(s.replicas)(replicas))


def _too_few_active_replicas(s: State) -> State:
    replicas = dict(s.replicas)
    del replicas["a#1"]
    return _rebuilt(s, replicas=replicas)


def _wrong_backend_status(s: State) -> State:
    backends = dict(s.backends)
    backends["a"] = attrs.evolve(backends["a"], status=BackendStatus.UNHEALTHY)
    return _rebuilt(s, backends=backends)


def _stale_routing_table(s: State) -> State:
    replicas = dict(s.replicas)
    replicas["a#1"] = attrs.evolve(replicas["a#1"], status=ReplicaStatus.STARTING)
    # The replica maps say STARTING, but the derived index and table still serve it.
    return attrs.evolve(s, replicas=type(s.replicas)(replicas))


def _duplicate_route(s: State) -> State:
    endpoints = dict(s.endpoints)
    endpoints["f"] = attrs.evolve(endpoints["e"], name="f")
    return _rebuilt(s, endpoints=endpoints)


def _endpoint_under_the_wrong_key(s: State) -> State:
    endpoints = {"other": s.endpoints["e"]}
    return _rebuilt(s, endpoints=endpoints)


#: name -> (how to break a valid state, what the failure must say)
BREAKS: dict[str, tuple[Callable[[State], State], str]] = {
    "an endpoint routes to a missing backend": (
        _routes_to_missing_backend,
        "routes to missing backend 'ghost'",
    ),
    "a replica tag at or past the counter": (_tag_at_or_past_the_counter, "not below counter"),
    "a replica of a missing backend": (_replica_of_missing_backend, "of missing backend"),
    "a replica of a version from the future": (_replica_from_the_future, "from the future"),
    "fewer active replicas than wanted": (_too_few_active_replicas, "1 active replicas, wants 2"),
    "a backend status that does not follow its replicas": (_wrong_backend_status, "UNHEALTHY"),
    "a routing table that serves a STARTING replica": (
        _stale_routing_table,
        "missing from its backend's index",
    ),
    "two endpoints on one route": (_duplicate_route, "duplicate routes"),
    "an endpoint stored under another name": (_endpoint_under_the_wrong_key, "endpoint key"),
}


@pytest.mark.parametrize(("break_it", "says"), BREAKS.values(), ids=list(BREAKS))
def test_validate_state_rejects_a_broken_state(
    break_it: Callable[[State], State], says: str
) -> None:
    broken = break_it(served())
    with pytest.raises(AssertionError, match=re.escape(says)):
        validate_state(broken)


def test_validate_state_accepts_every_state_step_makes() -> None:
    state = served()
    for message in (
        CreateBackend(tag="b", target="m:T", config=BackendConfig(num_replicas=1)),
        ReplicaStarted(tag="b#2"),
        SetTraffic(endpoint="e", traffic={"a": 0.5, "b": 0.5}),
    ):
        state = step(state, message).state
        validate_state(state)
