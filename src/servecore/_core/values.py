"""Values of the pure core: configs, endpoints, backends, replicas, the routing table.

The rules of :mod:`servecore._core.transitions` hold here too: no I/O, no clock, no randomness, no
imports from the shell. Every value is a frozen, keyword-only attrs class validated at
construction, so a bad value cannot exist; validation errors are the typed
:class:`~servecore.CommandError` subclasses, naming the field and the value.
"""

from __future__ import annotations

import enum
import math
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from servecore._core.autoscaling import AutoscaleState, AutoscalingConfig, autoscaling_config, begin
from servecore._core.errors import (
    InvalidConfig,
    InvalidTarget,
)
from servecore._core.maps import Map
from servecore._core.validation import (
    MAX_BATCH_SIZE,
    MAX_CONCURRENT_QUERIES,
    MAX_REPLICAS,
    int_between,
    json_object,
    json_value,
    name_validator,
    seconds,
)

__all__ = [
    "EMPTY",
    "WEIGHT_TOLERANCE",
    "Backend",
    "BackendConfig",
    "BackendRoute",
    "BackendStatus",
    "Endpoint",
    "Replica",
    "ReplicaStatus",
    "RoutingTable",
    "replica_number",
    "target_path",
]

#: Tolerance on "traffic weights sum to 1".
WEIGHT_TOLERANCE = 1e-6

EMPTY: Map[Any, Any] = Map()

# ---------------------------------------------------------------------------------------
# Small validators (the shared checks live in servecore._core.validation).


def _batch_wait(value: Any) -> float:
    return seconds("batch_wait_timeout_s", value)


def _shutdown_timeout(value: Any) -> float:
    return seconds("graceful_shutdown_timeout_s", value)


def _positive_seconds(field: str, value: Any) -> float:
    result = seconds(field, value)
    if result <= 0:
        raise InvalidConfig(field, value, "must be a number of seconds above 0")
    return result


def _health_period(value: Any) -> float:
    return _positive_seconds("health_check_period_s", value)


def _health_timeout(value: Any) -> float:
    return _positive_seconds("health_check_timeout_s", value)


def _max_surge(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= 1
    ):
        raise InvalidConfig(
            "max_surge",
            value,
            "must be a fraction of num_replicas above 0 and at most 1 (0.25 is 25%)",
        )
    return float(value)


def _user_config(value: Any) -> Any:
    return json_value(value, "user_config")


def _runtime_options(value: Any) -> dict[str, Any]:
    return json_object("runtime_options", value)


def _init_args(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        why = f"must be a tuple or list of arguments, not a {type(value).__name__}"
        raise InvalidConfig("init_args", value, why)
    return tuple(json_value(list(value), "init_args"))


def _init_kwargs(value: Any) -> dict[str, Any]:
    return json_object("init_kwargs", value)


def _name(kind: str) -> Callable[..., None]:
    return name_validator(kind)


_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def target_path(target: Any) -> str:
    """Return the import path ``"package.module:attribute"`` of ``target``.

    ``target`` may already be such a string, or the module-level class or function
    itself. Anything that cannot be imported again after a crash (a lambda, a closure,
    an object of ``__main__``) raises :class:`~servecore.InvalidTarget` naming why.
    """
    if isinstance(target, str):
        if len(target) > 1_000 or not _IMPORT_PATH.match(target):
            raise InvalidTarget(target, "not of the form 'package.module:attribute'")
        return target
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise InvalidTarget(target, "it has no __module__/__qualname__ to import it by")
    if module == "__main__":
        raise InvalidTarget(target, "it lives in __main__, which a restarted process cannot import")
    if "<lambda>" in qualname:
        raise InvalidTarget(target, "a lambda has no name to import it by")
    if "<locals>" in qualname:
        raise InvalidTarget(target, "it is defined inside a function (a closure)")
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not target:
        raise InvalidTarget(target, f"{module}:{qualname} does not name this object")
    return f"{module}:{qualname}"


# ---------------------------------------------------------------------------------------
# Values held by the state.


class ReplicaStatus(enum.Enum):
    """Where a replica is in its life: starting, serving, or being stopped."""

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"


class BackendStatus(enum.Enum):
    """``UPDATING`` while replicas are short, ``HEALTHY`` when all run, ``UNHEALTHY``
    while recent starts failed or replicas died soon after starting (replacements back
    off), ``FAILED`` past the failure budget (no more starts until the config changes or
    ``retry_backend``)."""

    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    FAILED = "FAILED"


@attrs.frozen(kw_only=True)
class BackendConfig:
    """How a backend runs: its scale, batching, concurrency and runtime options.

    Every field is validated here, so an invalid config cannot exist::

        BackendConfig(num_replicas=2, max_batch_size=8, batch_wait_timeout_s=0.01)
        BackendConfig(autoscaling=AutoscalingConfig(min_replicas=0, max_replicas=8))

    A backend runs either a fixed ``num_replicas`` or as many as its ``autoscaling``
    config decides (an :class:`~servecore.AutoscalingConfig`, or a mapping of its
    fields), never both: giving both is :class:`~servecore.InvalidConfig`.
    ``num_replicas`` left out means 1 without autoscaling and ``None`` with it.
    ``num_replicas=0`` parks a backend without deleting it. ``runtime_options`` is
    passed untouched to the runtime (e.g. Ray's ``num_cpus``); the runtime rejects keys
    it does not know. ``health_check_period_s`` (default 10) and
    ``health_check_timeout_s`` (default 30), as Ray Serve's: a runtime that can probe a
    replica from outside (the subprocess runtime) does so every period, and declares a
    replica that has not answered within the timeout dead (docs/design.md §6); they
    apply to replicas started after a change. ``max_surge`` (default 0.25, as
    Kubernetes' 25%) is the fraction of the wanted count that a rolling replacement may
    start beyond it at once (rounded up, at least one replica): a roll of 8 replicas
    runs at most 10 at a time.
    """

    num_replicas: int | None = attrs.field(
        default=None, validator=int_between("num_replicas", 0, MAX_REPLICAS, optional=True)
    )
    max_batch_size: int | None = attrs.field(
        default=None, validator=int_between("max_batch_size", 1, MAX_BATCH_SIZE, optional=True)
    )
    batch_wait_timeout_s: float = attrs.field(default=0.0, converter=_batch_wait)
    max_concurrent_queries: int = attrs.field(
        default=8, validator=int_between("max_concurrent_queries", 1, MAX_CONCURRENT_QUERIES)
    )
    graceful_shutdown_timeout_s: float = attrs.field(default=5.0, converter=_shutdown_timeout)
    user_config: Any = attrs.field(default=None, converter=_user_config)
    runtime_options: dict[str, Any] = attrs.field(factory=dict, converter=_runtime_options)
    autoscaling: AutoscalingConfig | None = attrs.field(default=None, converter=autoscaling_config)
    health_check_period_s: float = attrs.field(default=10.0, converter=_health_period)
    health_check_timeout_s: float = attrs.field(default=30.0, converter=_health_timeout)
    max_surge: float = attrs.field(default=0.25, converter=_max_surge)

    def __attrs_post_init__(self) -> None:
        if self.autoscaling is None:
            if self.num_replicas is None:
                object.__setattr__(self, "num_replicas", 1)
        elif self.num_replicas is not None:
            raise InvalidConfig(
                "num_replicas",
                self.num_replicas,
                "cannot be given with autoscaling (the autoscaler sets the count); "
                "give one of num_replicas and autoscaling",
            )

    def surge(self, wanted: int) -> int:
        """How many replicas a rolling replacement may run beyond ``wanted`` at once."""
        return max(1, math.ceil(wanted * self.max_surge))

    def needs_new_replicas(self, other: BackendConfig) -> bool:
        """Whether going from this config to ``other`` changes what a replica was
        started with (``user_config``, ``runtime_options``), so running replicas must
        be replaced. Scale, batching, concurrency and timeouts are the router's and the
        controller's business and apply without new replicas."""
        return (self.user_config, self.runtime_options) != (
            other.user_config,
            other.runtime_options,
        )

    def evolve(self, **changes: Any) -> BackendConfig:
        """Return a copy with ``changes`` applied; unknown field names raise
        :class:`~servecore.InvalidConfig` listing the known ones.

        Giving one of ``num_replicas`` and ``autoscaling`` switches the mode and clears
        the other (``evolve(autoscaling=...)`` on a fixed config is an autoscaling one);
        giving both non-None is :class:`~servecore.InvalidConfig`.
        """
        known = {a.name for a in attrs.fields(BackendConfig)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InvalidConfig(
                unknown[0], changes[unknown[0]], f"unknown config key; known: {sorted(known)}"
            )
        if changes.get("autoscaling") is not None and "num_replicas" not in changes:
            changes = {**changes, "num_replicas": None}
        elif changes.get("num_replicas") is not None and "autoscaling" not in changes:
            changes = {**changes, "autoscaling": None}
        return attrs.evolve(self, **changes)


def _traffic_map(value: Any) -> Map[str, float]:
    # Permissive on purpose: SetTraffic validates the result and names the endpoint.
    if isinstance(value, Map):
        return value
    return Map(value) if isinstance(value, Mapping) else value


@attrs.frozen(kw_only=True)
class Endpoint:
    """A named entry point: optional HTTP route, methods, traffic split and shadows."""

    name: str
    route: str | None = None
    methods: tuple[str, ...] = ("GET",)
    #: The HTTP ingress passes the target a ``servecore.Request`` for every request,
    #: JSON ones too (by default only where the JSON value would lose what was sent).
    #: Checkpoints written before it have no such key and load as ``False``.
    http_request: bool = False
    traffic: Map[str, float] = attrs.field(default=EMPTY, converter=_traffic_map)
    shadow: Map[str, float] = attrs.field(default=EMPTY, converter=_traffic_map)


@attrs.frozen(kw_only=True)
class Backend:
    """A registered piece of user code with its config and health."""

    tag: str
    target: str
    init_args: tuple[Any, ...] = ()
    init_kwargs: dict[str, Any] = attrs.field(factory=dict)
    config: BackendConfig = attrs.field(factory=BackendConfig)
    status: BackendStatus = BackendStatus.UPDATING
    #: Consecutive failed starts; reset by a start that succeeds or a config change.
    start_failures: int = 0
    #: Replicas that died soon after starting (a crash loop), since the backend last
    #: proved healthy (a replica that kept running) or its config changed.
    early_deaths: int = 0
    #: The replica's own error from the last failed start or early death, if any.
    last_error: str | None = None
    #: The generation of the config replicas must run. A config change that reaches
    #: inside replicas (see :meth:`BackendConfig.needs_new_replicas`) bumps it, and the
    #: older replicas are replaced, rolling, as new ones come up.
    version: int = 0
    #: The autoscaler's durable decision (current target, pending proposal) when the
    #: config has ``autoscaling``; ``None`` for a fixed ``num_replicas``.
    autoscale: AutoscaleState | None = None

    @property
    def wanted_replicas(self) -> int:
        """The replicas the backend should run now: its ``num_replicas``, or the
        autoscaler's current target."""
        if self.autoscale is not None and self.config.autoscaling is not None:
            return self.autoscale.replicas
        if self.config.num_replicas is not None:
            return self.config.num_replicas
        return begin(self.config.autoscaling).replicas if self.config.autoscaling else 0

    def same_definition(self, other: Backend) -> bool:
        return (self.target, self.init_args, self.init_kwargs, self.config) == (
            other.target,
            other.init_args,
            other.init_kwargs,
            other.config,
        )


@attrs.frozen(kw_only=True)
class Replica:
    """One running copy of a backend, named by a tag that is never reused."""

    tag: str
    backend: str
    status: ReplicaStatus = ReplicaStatus.STARTING
    #: The backend's ``version`` this replica was started with.
    version: int = 0


# Replica tags, ``"{backend}#{n}"``: minted, parsed and sorted here and nowhere else.
# (A backend name cannot hold ``#``, so the last ``#`` always splits a tag.)


def replica_tag(backend: str, number: int) -> str:
    """The tag of replica ``number`` of ``backend``: ``"{backend}#{number}"``."""
    return f"{backend}#{number}"


def backend_of(tag: str) -> str:
    """The backend a replica tag belongs to (the whole text, for a tag without ``#``)."""
    return tag.rsplit("#", 1)[0]


def replica_number(tag: str) -> int:
    """The counter value ``n`` a replica tag ``"{backend}#{n}"`` was minted from."""
    return int(tag.rsplit("#", 1)[1])


def replica_order(tag: str) -> tuple[str, int]:
    """A sort key that puts ``a#2`` before ``a#10``; a tag that is not
    ``"{backend}#{n}"`` (a runtime's stray) sorts first within its prefix."""
    backend, _, number = tag.rpartition("#")
    return (backend, int(number)) if number.isdigit() else (tag, -1)


@attrs.frozen(kw_only=True)
class BackendRoute:
    """What the router needs of a backend: its RUNNING replicas and query settings."""

    tag: str
    replicas: tuple[str, ...] = ()
    max_batch_size: int | None = None
    batch_wait_timeout_s: float = 0.0
    max_concurrent_queries: int = 8
    #: Why the backend is FAILED (its last error), so a query can say so; else None.
    failure: str | None = None
    #: An autoscaling backend that may scale to zero: a query finding no replica waits
    #: in the queue (and wakes the autoscaler) instead of failing at once.
    wakes_on_demand: bool = False

    @classmethod
    def of(cls, backend: Backend, replicas: tuple[str, ...] = ()) -> BackendRoute:
        c = backend.config
        failed = backend.status is BackendStatus.FAILED
        return cls(
            tag=backend.tag,
            replicas=replicas,
            max_batch_size=c.max_batch_size,
            batch_wait_timeout_s=c.batch_wait_timeout_s,
            max_concurrent_queries=c.max_concurrent_queries,
            failure=(backend.last_error or "unknown error") if failed else None,
            wakes_on_demand=c.autoscaling is not None and c.autoscaling.min_replicas == 0,
        )


@attrs.frozen(kw_only=True)
class RoutingTable:
    """The whole table the router works from. Immutable, so re-sending it is safe."""

    endpoints: Map[str, Endpoint] = EMPTY
    backends: Map[str, BackendRoute] = EMPTY
