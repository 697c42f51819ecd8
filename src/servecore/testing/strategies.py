"""Hypothesis strategies for servecore commands, configs and events.

Names are drawn from small pools on purpose, so that generated commands collide: a
backend created twice, traffic to a backend that was deleted, a route taken twice.
That is how invalid commands (for the state at hand) arise without being special-cased.

Every command drawn is one a correct runtime can carry out: each backend tag belongs to
one family of targets, and configs fit it. Tags in ``BATCH_TAGS`` get only
``@servecore.batch`` targets (:data:`BATCH_TARGETS`), and only they may set
``max_batch_size``; the others get plain targets (:data:`TARGETS`) and never batch.
Functions get no ``init_args``. So a start that fails under these strategies is the
runtime's fault (or an injected fault), never the kit's.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from servecore._core.transitions import (
    EARLY_DEATH_S,
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
    RetryBackend,
    SetBackendConfig,
    SetShadowTraffic,
    SetTraffic,
    State,
)

__all__ = [
    "BACKEND_TAGS",
    "BATCH_TAGS",
    "BATCH_TARGETS",
    "ENDPOINT_NAMES",
    "TARGETS",
    "backend_configs",
    "backend_definitions",
    "commands",
    "events",
    "invalid_config_kwargs",
    "traffic",
]

BACKEND_TAGS = ("a", "b", "c")
#: The tags whose backends run ``@servecore.batch`` targets (and may batch).
BATCH_TAGS = ("c",)
ENDPOINT_NAMES = ("e1", "e2")
ROUTES = (None, "/x", "/y")
#: Plain targets, and whether each is a class (only classes take ``init_args``).
TARGETS = (
    "servecore.testing.targets:Echo",
    "servecore.testing.targets:echo",
    "servecore.testing.targets:Counter",
)
#: Targets marked ``@servecore.batch``.
BATCH_TARGETS = (
    "servecore.testing.targets:BatchEcho",
    "servecore.testing.targets:echo_all",
)
_FUNCTIONS = frozenset({"servecore.testing.targets:echo", "servecore.testing.targets:echo_all"})


def backend_configs(
    max_replicas: int = 3, *, batch: bool = False, min_replicas: int = 0
) -> st.SearchStrategy[BackendConfig]:
    """Valid configs with small replica counts; ``max_batch_size`` only if ``batch``
    (for a ``@servecore.batch`` target: a runtime refuses it on any other)."""
    return st.builds(
        BackendConfig,
        num_replicas=st.integers(min_replicas, max_replicas),
        max_batch_size=st.none() | st.integers(1, 4) if batch else st.none(),
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


@st.composite
def backend_definitions(
    draw: st.DrawFn,
    tag: str,
    *,
    batch: bool = False,
    min_replicas: int = 0,
    max_replicas: int = 3,
) -> CreateBackend:
    """A ``CreateBackend`` for ``tag`` whose target, init args and config fit together."""
    target = draw(st.sampled_from(BATCH_TARGETS if batch else TARGETS), label="target")
    args = () if target in _FUNCTIONS else draw(st.sampled_from([(), ("x",)]), label="init")
    config = draw(
        backend_configs(max_replicas, batch=batch, min_replicas=min_replicas), label="config"
    )
    return CreateBackend(tag=tag, target=target, init_args=args, config=config)


def _create_backend(tag: str, batch_tags: tuple[str, ...]) -> st.SearchStrategy[Command]:
    return backend_definitions(tag, batch=tag in batch_tags)


def _set_config(tag: str, batch_tags: tuple[str, ...]) -> st.SearchStrategy[Command]:
    return st.builds(
        SetBackendConfig, tag=st.just(tag), config=backend_configs(batch=tag in batch_tags)
    )


def commands(
    tags: tuple[str, ...] = BACKEND_TAGS,
    endpoints: tuple[str, ...] = ENDPOINT_NAMES,
    *,
    batch_tags: tuple[str, ...] = BATCH_TAGS,
) -> st.SearchStrategy[Command]:
    """Any command over small name pools: valid and invalid (for a given state) alike.

    Backends under ``batch_tags`` run batch targets and may batch; the rest never do.
    """
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
        tag.flatmap(lambda t: _create_backend(t, batch_tags)),
        st.builds(DeleteBackend, tag=tag),
        st.builds(RetryBackend, tag=tag),
        tag.flatmap(lambda t: _set_config(t, batch_tags)),
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
        st.builds(ReplicaDied, tag=tags, reason=reason, uptime_s=_UPTIMES),
    )


#: No uptime known, a death soon after start (a crash loop), one at the boundary, and
#: one long after: every branch of the early-death rule.
_UPTIMES = st.sampled_from([None, 0.0, 1.0, EARLY_DEATH_S, 3600.0])
