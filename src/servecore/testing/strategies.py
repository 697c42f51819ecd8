"""Hypothesis strategies for servecore commands, configs and events.

Names are drawn from small pools on purpose, so that generated commands collide: a
backend created twice, traffic to a backend that was deleted, a route taken twice.
That is how invalid commands (for the state at hand) arise without being special-cased.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from servecore._core import (
    BackendConfig,
    Command,
    CreateBackend,
    CreateEndpoint,
    DeleteBackend,
    DeleteEndpoint,
    Event,
    ReplicaDied,
    ReplicaStarted,
    ReplicaStartFailed,
    ReplicaStopped,
    SetBackendConfig,
    SetShadowTraffic,
    SetTraffic,
    State,
)

__all__ = [
    "BACKEND_TAGS",
    "ENDPOINT_NAMES",
    "TARGETS",
    "backend_configs",
    "commands",
    "events",
    "invalid_config_kwargs",
    "traffic",
]

BACKEND_TAGS = ("a", "b", "c")
ENDPOINT_NAMES = ("e1", "e2")
ROUTES = (None, "/x", "/y")
TARGETS = (
    "servecore.testing.targets:Echo",
    "servecore.testing.targets:echo",
    "servecore.testing.targets:Counter",
)


def backend_configs(max_replicas: int = 3) -> st.SearchStrategy[BackendConfig]:
    """Valid configs with small replica counts."""
    return st.builds(
        BackendConfig,
        num_replicas=st.integers(0, max_replicas),
        max_batch_size=st.none() | st.integers(1, 4),
        batch_wait_timeout_s=st.sampled_from([0.0, 0.01]),
        max_concurrent_queries=st.integers(1, 4),
        graceful_shutdown_timeout_s=st.sampled_from([0.0, 1.0]),
        user_config=st.none() | st.fixed_dictionaries({"threshold": st.integers(0, 3)}),
    )


def invalid_config_kwargs() -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments that ``BackendConfig`` must reject with ``InvalidConfig``."""
    return st.one_of(
        st.fixed_dictionaries({"num_replicas": st.integers(max_value=-1) | st.just(True)}),
        st.fixed_dictionaries({"max_batch_size": st.integers(max_value=0) | st.just(1.5)}),
        st.fixed_dictionaries(
            {"batch_wait_timeout_s": st.floats(max_value=-0.001) | st.just(float("nan"))}
        ),
        st.fixed_dictionaries({"max_concurrent_queries": st.integers(max_value=0)}),
        st.fixed_dictionaries({"graceful_shutdown_timeout_s": st.just(float("inf"))}),
        st.fixed_dictionaries({"user_config": st.just({1: "non-string key"})}),
        st.fixed_dictionaries({"runtime_options": st.just({"num_cpus": object()})}),
    )


@st.composite
def traffic(draw: st.DrawFn, tags: tuple[str, ...] = BACKEND_TAGS) -> dict[str, float]:
    """Weights over a non-empty subset of ``tags`` that sum to 1."""
    chosen = draw(st.lists(st.sampled_from(tags), min_size=1, max_size=len(tags), unique=True))
    raw = draw(st.lists(st.integers(1, 4), min_size=len(chosen), max_size=len(chosen)))
    total = sum(raw)
    return {tag: w / total for tag, w in zip(chosen, raw, strict=True)}


def commands(
    tags: tuple[str, ...] = BACKEND_TAGS, endpoints: tuple[str, ...] = ENDPOINT_NAMES
) -> st.SearchStrategy[Command]:
    """Any command over small name pools: valid and invalid (for a given state) alike."""
    tag = st.sampled_from(tags)
    endpoint = st.sampled_from(endpoints)
    return st.one_of(
        st.builds(
            CreateEndpoint,
            name=endpoint,
            route=st.sampled_from(ROUTES),
            methods=st.sampled_from([("GET",), ("GET", "POST")]),
        ),
        st.builds(DeleteEndpoint, name=endpoint),
        st.builds(
            CreateBackend,
            tag=tag,
            target=st.sampled_from(TARGETS),
            init_args=st.sampled_from([(), ("x",)]),
            config=backend_configs(),
        ),
        st.builds(DeleteBackend, tag=tag),
        st.builds(SetBackendConfig, tag=tag, config=backend_configs()),
        st.builds(SetTraffic, endpoint=endpoint, traffic=traffic(tags)),
        st.builds(
            SetShadowTraffic,
            endpoint=endpoint,
            backend=tag,
            proportion=st.sampled_from([0.0, 0.1, 0.5]),
        ),
    )


def events(state: State) -> st.SearchStrategy[Event]:
    """Runtime events about the replicas of ``state`` (and some unknown tags)."""
    known = sorted(state.replicas)
    tags = st.sampled_from([*known, "ghost#999"]) if known else st.just("ghost#999")
    reason = st.sampled_from(["boom", "exit code 1"])
    return st.one_of(
        st.builds(ReplicaStarted, tag=tags),
        st.builds(ReplicaStartFailed, tag=tags, reason=reason),
        st.builds(ReplicaStopped, tag=tags),
        st.builds(ReplicaDied, tag=tags, reason=reason),
    )
