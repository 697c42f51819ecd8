"""Messages of the pure core: commands (what a user asks for), events (what a runtime
reports) and effects (what the shell must carry out).

The rules of :mod:`servecore._core` hold here too. Commands validate their *shape* at
construction; whether a command fits the current state is decided by ``step``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeAlias

import attrs
from immutables import Map

from servecore._errors import (
    InvalidConfig,
    InvalidRoute,
    InvalidTraffic,
)
from servecore._values import (
    WEIGHT_TOLERANCE,
    BackendConfig,
    RoutingTable,
    _init_args,
    _init_kwargs,
    _name,
    _traffic_map,
    target_path,
)

__all__ = [
    "Command",
    "CreateBackend",
    "CreateEndpoint",
    "DeleteBackend",
    "DeleteEndpoint",
    "Effect",
    "Event",
    "Message",
    "Recover",
    "ReplicaDied",
    "ReplicaStartFailed",
    "ReplicaStarted",
    "ReplicaStopped",
    "SetBackendConfig",
    "SetShadowTraffic",
    "SetTraffic",
    "StartReplica",
    "StopReplica",
    "UpdateRouter",
]

# ---------------------------------------------------------------------------------------
# Commands: what a user asks for. Shape is validated at construction; whether the
# command fits the current state is checked by step().


def _route(_inst: CreateEndpoint, _attr: Any, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.startswith("/")):
        raise InvalidRoute(_inst.name, "route", value, "must be None or a path starting '/'")


_HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def _methods(endpoint: str, value: Any) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) or not isinstance(value, Iterable) else value
    out: list[str] = []
    for m in items:
        if not isinstance(m, str) or m.upper() not in _HTTP_METHODS:
            why = f"{m!r} is not one of {sorted(_HTTP_METHODS)}"
            raise InvalidRoute(endpoint, "methods", value, why)
        if m.upper() not in out:
            out.append(m.upper())
    if not out:
        raise InvalidRoute(endpoint, "methods", value, "needs at least one HTTP method")
    return tuple(out)


def _is_config(value: Any) -> None:
    if not isinstance(value, BackendConfig):
        raise InvalidConfig("config", value, "must be a servecore.BackendConfig")


@attrs.frozen(kw_only=True)
class CreateEndpoint:
    """Register an endpoint, with an optional HTTP route."""

    name: str = attrs.field(validator=_name("endpoint"))
    route: str | None = attrs.field(default=None, validator=_route)
    methods: tuple[str, ...] = ("GET",)

    def __attrs_post_init__(self) -> None:
        # Validated here, not by a converter, so the error can name the endpoint.
        object.__setattr__(self, "methods", _methods(self.name, self.methods))


@attrs.frozen(kw_only=True)
class DeleteEndpoint:
    """Remove an endpoint and its route."""

    name: str


@attrs.frozen(kw_only=True)
class CreateBackend:
    """Register code and config; the core then starts ``num_replicas`` replicas.

    ``target`` is an import path or the module-level class or function itself;
    ``init_args``/``init_kwargs`` must be plain JSON data, since they are checkpointed.
    """

    tag: str = attrs.field(validator=_name("backend"))
    target: str = attrs.field(converter=target_path)
    init_args: tuple[Any, ...] = attrs.field(default=(), converter=_init_args)
    init_kwargs: dict[str, Any] = attrs.field(factory=dict, converter=_init_kwargs)
    config: BackendConfig = attrs.field(
        factory=BackendConfig, validator=lambda _i, _a, v: _is_config(v)
    )


@attrs.frozen(kw_only=True)
class DeleteBackend:
    """Stop all replicas of a backend and forget it."""

    tag: str


@attrs.frozen(kw_only=True)
class SetBackendConfig:
    """Replace a backend's config: scale, batching, concurrency."""

    tag: str
    config: BackendConfig = attrs.field(validator=lambda _i, _a, v: _is_config(v))


def _weight(endpoint: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidTraffic(endpoint, value, f"{what} must be a finite number")
    if value < 0 or value > 1:
        raise InvalidTraffic(endpoint, value, f"{what} must be between 0 and 1")
    return float(value)


@attrs.frozen(kw_only=True)
class SetTraffic:
    """Split an endpoint's traffic between backends by weight (weights sum to 1).

    Backends with weight 0 are dropped, so a backend can be drained, then deleted.
    """

    endpoint: str
    traffic: Map[str, float] = attrs.field(converter=_traffic_map)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.traffic, Map) or not all(isinstance(k, str) for k in self.traffic):
            raise InvalidTraffic(self.endpoint, self.traffic, "must map backend tags to weights")
        weights = {
            k: _weight(self.endpoint, w, f"weight of {k!r}") for k, w in self.traffic.items()
        }
        total = math.fsum(weights.values())
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise InvalidTraffic(
                self.endpoint, dict(self.traffic), f"weights sum to {total}, not 1"
            )
        object.__setattr__(self, "traffic", Map({k: w for k, w in weights.items() if w > 0}))


@attrs.frozen(kw_only=True)
class SetShadowTraffic:
    """Copy ``proportion`` of an endpoint's queries to ``backend``; results are dropped.
    A proportion of 0 removes the shadow."""

    endpoint: str
    backend: str
    proportion: float

    def __attrs_post_init__(self) -> None:
        object.__setattr__(
            self, "proportion", _weight(self.endpoint, self.proportion, "shadow proportion")
        )


# ---------------------------------------------------------------------------------------
# Events: what a runtime reports. They never raise; an unknown tag is ignored.


@attrs.frozen(kw_only=True)
class ReplicaStarted:
    """The replica is ready to serve."""

    tag: str


@attrs.frozen(kw_only=True)
class ReplicaStartFailed:
    """The replica could not start; ``reason`` is its own error."""

    tag: str
    reason: str


@attrs.frozen(kw_only=True)
class ReplicaStopped:
    """The replica has stopped (after a StopReplica)."""

    tag: str


@attrs.frozen(kw_only=True)
class ReplicaDied:
    """The replica died on its own."""

    tag: str
    reason: str = ""


def _frozenset(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


@attrs.frozen(kw_only=True)
class Recover:
    """Start-up: ``live`` is every tag the runtime reports alive."""

    live: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)


# ---------------------------------------------------------------------------------------
# Effects: what the shell must carry out, in order.


@attrs.frozen(kw_only=True)
class StartReplica:
    """Start replica ``tag`` of ``backend`` running ``target``. Idempotent by tag."""

    tag: str
    backend: str
    target: str
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    config: BackendConfig


@attrs.frozen(kw_only=True)
class StopReplica:
    """Drain replica ``tag``, then stop it, forcing after ``timeout_s``."""

    tag: str
    timeout_s: float


@attrs.frozen(kw_only=True)
class UpdateRouter:
    """The whole routing table. Level triggered: re-sending it is always safe."""

    table: RoutingTable


Command: TypeAlias = (
    CreateEndpoint
    | DeleteEndpoint
    | CreateBackend
    | DeleteBackend
    | SetBackendConfig
    | SetTraffic
    | SetShadowTraffic
)
Event: TypeAlias = ReplicaStarted | ReplicaStartFailed | ReplicaStopped | ReplicaDied | Recover
Message: TypeAlias = Command | Event
Effect: TypeAlias = StartReplica | StopReplica | UpdateRouter
