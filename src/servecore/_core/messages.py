"""Messages of the pure core: commands (what a user asks for), events (what a runtime
reports) and effects (what the shell must carry out).

The rules of :mod:`servecore._core.transitions` hold here too. Commands validate their *shape* at
construction; whether a command fits the current state is decided by ``step``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeAlias

import attrs

from servecore._core.autoscaling import MAX_ONGOING
from servecore._core.errors import (
    InvalidConfig,
    InvalidRoute,
    InvalidTraffic,
)
from servecore._core.maps import Map
from servecore._core.validation import (
    MAX_ROUTE_LENGTH,
    OPERATOR_PREFIX,
    check_name,
    reason_text,
    seconds,
)
from servecore._core.values import (
    WEIGHT_TOLERANCE,
    BackendConfig,
    RoutingTable,
    _init_args,
    _init_kwargs,
    _name,
    _traffic_map,
    target_path,
)
from servecore._text import encodable

__all__ = [
    "Command",
    "CreateBackend",
    "CreateEndpoint",
    "DeleteBackend",
    "DeleteEndpoint",
    "Effect",
    "Event",
    "LoadReport",
    "Message",
    "Recover",
    "ReplicaDied",
    "ReplicaStartFailed",
    "ReplicaStarted",
    "ReplicaStopped",
    "Resync",
    "RetryBackend",
    "SetBackendConfig",
    "SetShadowTraffic",
    "SetTraffic",
    "StartReplica",
    "StopReplica",
    "UpdateBackend",
    "UpdateEndpoint",
    "UpdateRouter",
    "describe",
]

# ---------------------------------------------------------------------------------------
# Commands: what a user asks for. Shape is validated at construction; whether the
# command fits the current state is checked by step().


def _route(_inst: CreateEndpoint, _attr: Any, value: Any) -> None:
    if value is None:
        return
    why = (
        f"must be None or a printable path starting '/', at most {MAX_ROUTE_LENGTH} "
        f"characters of valid text"
    )
    if not isinstance(value, str) or not value.startswith("/") or len(value) > MAX_ROUTE_LENGTH:
        raise InvalidRoute(_inst.name, "route", value, why)
    if not value.isprintable() or encodable(value) != value:
        raise InvalidRoute(_inst.name, "route", value, why)
    if value.startswith(OPERATOR_PREFIX):
        # The ingress answers these paths itself (/-/healthz, /-/routes, /-/metrics):
        # an endpoint there would be listed but never reached.
        raise InvalidRoute(
            _inst.name,
            "route",
            value,
            f"routes under {OPERATOR_PREFIX} are the ingress's own (health, routes, "
            f"metrics); pick a route outside {OPERATOR_PREFIX}",
        )


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


def _flag(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidRoute(instance.name, attribute.name, value, "must be true or false")


def _is_config(value: Any) -> None:
    if not isinstance(value, BackendConfig):
        raise InvalidConfig("config", value, "must be a servecore.BackendConfig")


@attrs.frozen(kw_only=True)
class CreateEndpoint:
    """Register an endpoint, with an optional HTTP route. With ``http_request`` the
    HTTP ingress passes its target a ``servecore.Request`` for every request."""

    name: str = attrs.field(validator=_name("endpoint"))
    route: str | None = attrs.field(default=None, validator=_route)
    methods: tuple[str, ...] = ("GET",)
    http_request: bool = attrs.field(default=False, validator=_flag)

    def __attrs_post_init__(self) -> None:
        # Validated here, not by a converter, so the error can name the endpoint.
        object.__setattr__(self, "methods", _methods(self.name, self.methods))


@attrs.frozen(kw_only=True)
class UpdateEndpoint:
    """Give an existing endpoint a new route, methods or ``http_request`` in place: its
    traffic split, shadows and handles stay, so its queries never meet a gap (deleting
    and creating it again would answer 404 in between)."""

    name: str = attrs.field(validator=_name("endpoint"))
    route: str | None = attrs.field(default=None, validator=_route)
    methods: tuple[str, ...] = ("GET",)
    http_request: bool = attrs.field(default=False, validator=_flag)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "methods", _methods(self.name, self.methods))


@attrs.frozen(kw_only=True)
class DeleteEndpoint:
    """Remove an endpoint and its route."""

    name: str = attrs.field(validator=_name("endpoint"))


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

    tag: str = attrs.field(validator=_name("backend"))


@attrs.frozen(kw_only=True)
class SetBackendConfig:
    """Replace a backend's config: scale, batching, concurrency."""

    tag: str = attrs.field(validator=_name("backend"))
    config: BackendConfig = attrs.field(validator=lambda _i, _a, v: _is_config(v))


@attrs.frozen(kw_only=True)
class UpdateBackend:
    """Replace a backend's whole definition (target, init arguments, config) in place.

    Its replicas roll as for a config change that needs new replicas: the version is
    bumped, replicas of the old definition keep serving until new ones run in their
    place, and the endpoints routing to it are never touched, so its routes never
    answer 404 during the change. A new definition is a new chance: the failure budget
    (and FAILED) is cleared. Restating the current definition changes nothing.
    """

    tag: str = attrs.field(validator=_name("backend"))
    target: str = attrs.field(converter=target_path)
    init_args: tuple[Any, ...] = attrs.field(default=(), converter=_init_args)
    init_kwargs: dict[str, Any] = attrs.field(factory=dict, converter=_init_kwargs)
    config: BackendConfig = attrs.field(
        factory=BackendConfig, validator=lambda _i, _a, v: _is_config(v)
    )


@attrs.frozen(kw_only=True)
class RetryBackend:
    """Try a FAILED backend again with the same definition and config: its failure
    budget is cleared and its replicas start. A no-op for a backend that is not FAILED.
    """

    tag: str = attrs.field(validator=_name("backend"))


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

    endpoint: str = attrs.field(validator=_name("endpoint"))
    traffic: Map[str, float] = attrs.field(converter=_traffic_map)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.traffic, Map) or not all(
            isinstance(k, str) and encodable(k) == k for k in self.traffic
        ):
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

    endpoint: str = attrs.field(validator=_name("endpoint"))
    backend: str = attrs.field(validator=_name("backend"))
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
    """The replica could not start; ``reason`` is its own error (made encodable and
    bounded, since it is checkpointed)."""

    tag: str
    reason: str = attrs.field(converter=reason_text)


@attrs.frozen(kw_only=True)
class ReplicaStopped:
    """The replica has stopped (after a StopReplica)."""

    tag: str


@attrs.frozen(kw_only=True)
class ReplicaDied:
    """The replica died on its own. ``uptime_s`` is how long it had been running, if
    the shell knows: a death soon after starting counts towards the backend's failure
    budget (see :data:`servecore._core.transitions.EARLY_DEATH_S`)."""

    tag: str
    reason: str = attrs.field(default="", converter=reason_text)
    uptime_s: float | None = None


def _frozenset(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


@attrs.frozen(kw_only=True)
class Recover:
    """Start-up: ``live`` is every tag the runtime reports alive."""

    live: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)


@attrs.frozen(kw_only=True)
class Resync:
    """A periodic check of what the state believes against what the runtime has, the
    way Kubernetes controllers resync: ``live`` is every tag the runtime reports alive,
    ``busy`` the tags the shell is still starting or stopping (left alone: their own
    answers will come), ``proven`` RUNNING tags that have run long enough to show their
    backend works (its crash-loop count is cleared)."""

    live: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)
    busy: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)
    proven: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)


def _ongoing(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfig("ongoing", value, "must be a number of queries >= 0")
    if not math.isfinite(value) or not 0 <= value <= MAX_ONGOING:
        raise InvalidConfig(
            "ongoing", value, f"must be a finite number of queries between 0 and {MAX_ONGOING:g}"
        )
    return float(value)


def _now(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidConfig("now", value, "must be a finite time in seconds")
    return float(value)


def _report_backend(value: Any) -> str:
    return check_name("backend", value)


@attrs.frozen(kw_only=True)
class LoadReport:
    """The load of a backend, as the shell measured it: ``ongoing`` is the mean number
    of queries running on or queued for it over its autoscaling look-back window,
    ``now`` the time of the measurement (the controller's clock). It feeds the
    autoscaling policy (:mod:`servecore._core.autoscaling`); a report that changes no decision
    changes nothing that is checkpointed. Ignored for a backend that does not
    autoscale; refused (:class:`~servecore.BackendNotFound`) for one that does not
    exist."""

    backend: str = attrs.field(converter=_report_backend)
    ongoing: float = attrs.field(converter=_ongoing)
    now: float = attrs.field(converter=_now)


# ---------------------------------------------------------------------------------------
# Effects: what the shell must carry out, in order.


def _delay(value: Any) -> float:
    return seconds("delay_s", value)


@attrs.frozen(kw_only=True)
class StartReplica:
    """Start replica ``tag`` of ``backend`` running ``target``. Idempotent by tag."""

    tag: str
    backend: str
    target: str
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    config: BackendConfig
    #: Wait this long before starting: replacements in a crash loop back off.
    delay_s: float = attrs.field(default=0.0, converter=_delay)


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
    | UpdateEndpoint
    | DeleteEndpoint
    | CreateBackend
    | DeleteBackend
    | SetBackendConfig
    | UpdateBackend
    | RetryBackend
    | SetTraffic
    | SetShadowTraffic
)
Event: TypeAlias = (
    ReplicaStarted
    | ReplicaStartFailed
    | ReplicaStopped
    | ReplicaDied
    | Recover
    | Resync
    | LoadReport
)
Message: TypeAlias = Command | Event
Effect: TypeAlias = StartReplica | StopReplica | UpdateRouter


def describe(message: Message | Effect) -> str:
    """A message in words for a person, one line: ``create backend 'echo' (2
    replica(s))``, ``replica echo#3 started``. Logs, errors, ``servecore apply`` and its
    plan all use it, so a message reads the same everywhere."""
    if isinstance(message, CreateBackend):
        return f"create backend {message.tag!r} ({_replicas(message.config)})"
    if isinstance(message, SetBackendConfig):
        return f"update backend {message.tag!r} ({_replicas(message.config)})"
    if isinstance(message, UpdateBackend):
        return f"roll backend {message.tag!r} to a new definition ({_replicas(message.config)})"
    if isinstance(message, DeleteBackend):
        return f"delete backend {message.tag!r}"
    if isinstance(message, RetryBackend):
        return f"retry backend {message.tag!r}"
    if isinstance(message, CreateEndpoint):
        return f"create endpoint {message.name!r} at {message.route or '(no route)'}"
    if isinstance(message, UpdateEndpoint):
        return f"move endpoint {message.name!r} to {message.route or '(no route)'}"
    if isinstance(message, DeleteEndpoint):
        return f"delete endpoint {message.name!r}"
    if isinstance(message, SetTraffic):
        return f"set traffic of {message.endpoint!r} to {dict(sorted(message.traffic.items()))}"
    if isinstance(message, SetShadowTraffic):
        return f"shadow {message.proportion:g} of {message.endpoint!r} to {message.backend!r}"
    if isinstance(message, ReplicaStarted):
        return f"replica {message.tag} started"
    if isinstance(message, ReplicaStartFailed):
        return f"replica {message.tag} failed to start"
    if isinstance(message, ReplicaStopped):
        return f"replica {message.tag} stopped"
    if isinstance(message, ReplicaDied):
        return f"replica {message.tag} died"
    if isinstance(message, LoadReport):
        return f"a load report of {message.ongoing:g} for backend {message.backend!r}"
    if isinstance(message, StartReplica):
        return f"start replica {message.tag}"
    if isinstance(message, StopReplica):
        return f"stop replica {message.tag}"
    return type(message).__name__  # Recover, Resync, UpdateRouter: their name says it


def _replicas(config: BackendConfig) -> str:
    scaling = config.autoscaling
    if scaling is not None:
        return f"autoscaling {scaling.min_replicas}-{scaling.max_replicas} replica(s)"
    return f"{config.num_replicas} replica(s)"
