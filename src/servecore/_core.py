"""The pure state machine of servecore.

Rules of this module, in the manner of h11's ``_state.py``:

* Everything that decides what the controller *wants* lives here and only here:
  commands (what a user asks for) and events (what a runtime reports) go in through
  :func:`step`; a new :class:`State` and a tuple of effects come out.
* This module performs no I/O, reads no clock and draws no random numbers. It imports
  nothing from the controller, the stores, the router or the runtimes, and not trio.
  The same (state, message) always gives an equal transition.
* Every value is a frozen, keyword-only attrs class validated at construction, so a bad
  value cannot exist. A command that is invalid *for the current state* raises a
  :class:`~servecore.CommandError` from :func:`step`, and the caller keeps its old state:
  nothing here is ever mutated.
* Replica tags are minted from a counter stored in the state, ``"{backend}#{n}"``, so a
  tag is never reused: the counter reaches the checkpoint before any replica with that
  tag is started.
* Effects come out in the order they must be carried out: first ``UpdateRouter`` (so the
  router stops sending to a replica before it is asked to stop), then ``StopReplica``,
  then ``StartReplica``.

The routing table and a per-backend index of replicas are kept *inside* the state and
updated incrementally with persistent maps (``immutables.Map``), so the cost of a step
grows with what the message changes, not with the size of the state.
"""

from __future__ import annotations

import enum
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

import attrs
from immutables import Map

from servecore._errors import (
    BackendExists,
    BackendInUse,
    BackendNotFound,
    EndpointExists,
    EndpointNotFound,
    InvalidConfig,
    InvalidRoute,
    InvalidTarget,
    InvalidTraffic,
    RouteConflict,
)

__all__ = [
    "MAX_START_FAILURES",
    "Backend",
    "BackendConfig",
    "BackendRoute",
    "BackendStatus",
    "Command",
    "CreateBackend",
    "CreateEndpoint",
    "DeleteBackend",
    "DeleteEndpoint",
    "Effect",
    "Endpoint",
    "Event",
    "Message",
    "Recover",
    "Replica",
    "ReplicaDied",
    "ReplicaStartFailed",
    "ReplicaStarted",
    "ReplicaStatus",
    "ReplicaStopped",
    "RoutingTable",
    "SetBackendConfig",
    "SetShadowTraffic",
    "SetTraffic",
    "StartReplica",
    "State",
    "StopReplica",
    "Transition",
    "UpdateRouter",
    "replica_number",
    "step",
    "target_path",
    "validate_state",
]

#: Consecutive failed starts after which a backend is marked FAILED and left alone.
MAX_START_FAILURES = 3

#: Tolerance on "traffic weights sum to 1".
_WEIGHT_TOLERANCE = 1e-6

_EMPTY: Map[Any, Any] = Map()

# ---------------------------------------------------------------------------------------
# Small validators. Each raises the typed CommandError naming the field and value.


def _json_value(value: Any, field: str) -> Any:
    """Return ``value`` in the exact shape a JSON round trip gives back.

    A checkpoint is JSON, and recovery must rebuild a state *equal* to the one saved,
    so tuples become lists and mappings become dicts with string keys here, once.
    """
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidConfig(field, value, "must be a finite number (checkpoints are JSON)")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{field}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidConfig(field, value, f"key {k!r} is not a string (JSON)")
            out[k] = _json_value(v, f"{field}[{k!r}]")
        return out
    raise InvalidConfig(
        field, value, f"{type(value).__name__} is not JSON-serializable; pass plain data"
    )


def _json_object(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidConfig(field, value, "must be a mapping with string keys")
    result: dict[str, Any] = _json_value(value, field)
    return result


def _int_at_least(field: str, low: int, *, optional: bool = False) -> Callable[..., None]:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidConfig(field, value, f"must be an integer >= {low}")
        if value < low:
            raise InvalidConfig(field, value, f"must be >= {low}")

    return check


def _seconds(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfig(field, value, "must be a number of seconds >= 0")
    if not math.isfinite(value) or value < 0:
        raise InvalidConfig(field, value, "must be a finite number of seconds >= 0")
    return float(value)


def _batch_wait(value: Any) -> float:
    return _seconds("batch_wait_timeout_s", value)


def _shutdown_timeout(value: Any) -> float:
    return _seconds("graceful_shutdown_timeout_s", value)


def _user_config(value: Any) -> Any:
    return _json_value(value, "user_config")


def _runtime_options(value: Any) -> dict[str, Any]:
    return _json_object("runtime_options", value)


def _init_args(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidConfig("init_args", value, "must be a tuple or list of arguments")
    return tuple(_json_value(list(value), "init_args"))


def _init_kwargs(value: Any) -> dict[str, Any]:
    return _json_object("init_kwargs", value)


_NAME = re.compile(r"^[^\s#/][^\s#]*$")


def _name(kind: str) -> Callable[..., None]:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if not isinstance(value, str) or not _NAME.match(value):
            raise InvalidConfig(
                f"{kind} name",
                value,
                "must be a non-empty string without whitespace or '#' that does not start with '/'",
            )

    return check


_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def target_path(target: Any) -> str:
    """Return the import path ``"package.module:attribute"`` of ``target``.

    ``target`` may already be such a string, or the module-level class or function
    itself. Anything that cannot be imported again after a crash (a lambda, a closure,
    an object of ``__main__``) raises :class:`~servecore.InvalidTarget` naming why.
    """
    if isinstance(target, str):
        if not _IMPORT_PATH.match(target):
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
    """``UPDATING`` while replicas are short, ``HEALTHY`` when all run, ``FAILED`` when
    starts kept failing (no more starts until the config changes)."""

    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    FAILED = "FAILED"


@attrs.frozen(kw_only=True)
class BackendConfig:
    """How a backend runs: its scale, batching, concurrency and runtime options.

    Every field is validated here, so an invalid config cannot exist::

        BackendConfig(num_replicas=2, max_batch_size=8, batch_wait_timeout_s=0.01)

    ``num_replicas=0`` parks a backend without deleting it. ``runtime_options`` is
    passed untouched to the runtime (e.g. Ray's ``num_cpus``); the runtime rejects keys
    it does not know.
    """

    num_replicas: int = attrs.field(default=1, validator=_int_at_least("num_replicas", 0))
    max_batch_size: int | None = attrs.field(
        default=None, validator=_int_at_least("max_batch_size", 1, optional=True)
    )
    batch_wait_timeout_s: float = attrs.field(default=0.0, converter=_batch_wait)
    max_concurrent_queries: int = attrs.field(
        default=8, validator=_int_at_least("max_concurrent_queries", 1)
    )
    graceful_shutdown_timeout_s: float = attrs.field(default=5.0, converter=_shutdown_timeout)
    user_config: Any = attrs.field(default=None, converter=_user_config)
    runtime_options: dict[str, Any] = attrs.field(factory=dict, converter=_runtime_options)

    def evolve(self, **changes: Any) -> BackendConfig:
        """Return a copy with ``changes`` applied; unknown field names raise
        :class:`~servecore.InvalidConfig` listing the known ones."""
        known = {a.name for a in attrs.fields(BackendConfig)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InvalidConfig(
                unknown[0], changes[unknown[0]], f"unknown config key; known: {sorted(known)}"
            )
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
    traffic: Map[str, float] = attrs.field(default=_EMPTY, converter=_traffic_map)
    shadow: Map[str, float] = attrs.field(default=_EMPTY, converter=_traffic_map)


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
    #: The replica's own error from the last failed start, if any.
    last_error: str | None = None

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


def replica_number(tag: str) -> int:
    """The counter value ``n`` a replica tag ``"{backend}#{n}"`` was minted from."""
    return int(tag.rsplit("#", 1)[1])


@attrs.frozen(kw_only=True)
class BackendRoute:
    """What the router needs of a backend: its RUNNING replicas and query settings."""

    tag: str
    replicas: tuple[str, ...] = ()
    max_batch_size: int | None = None
    batch_wait_timeout_s: float = 0.0
    max_concurrent_queries: int = 8

    @classmethod
    def of(cls, backend: Backend, replicas: tuple[str, ...] = ()) -> BackendRoute:
        c = backend.config
        return cls(
            tag=backend.tag,
            replicas=replicas,
            max_batch_size=c.max_batch_size,
            batch_wait_timeout_s=c.batch_wait_timeout_s,
            max_concurrent_queries=c.max_concurrent_queries,
        )


@attrs.frozen(kw_only=True)
class RoutingTable:
    """The whole table the router works from. Immutable, so re-sending it is safe."""

    endpoints: Map[str, Endpoint] = _EMPTY
    backends: Map[str, BackendRoute] = _EMPTY


@attrs.frozen(kw_only=True)
class _BackendIndex:
    """Active (STARTING or RUNNING) replicas of one backend, keyed by their number."""

    starting: Map[int, str] = _EMPTY
    running: Map[int, str] = _EMPTY

    def __len__(self) -> int:
        return len(self.starting) + len(self.running)


_NO_INDEX = _BackendIndex()


@attrs.frozen(kw_only=True)
class State:
    """The controller's whole desired and known state. ``State()`` is empty.

    ``endpoints``, ``backends`` and ``replicas`` are read-only mappings; the routing
    table and a per-backend index are derived, kept up to date incrementally, and are
    neither compared nor checkpointed.
    """

    endpoints: Map[str, Endpoint] = _EMPTY
    backends: Map[str, Backend] = _EMPTY
    replicas: Map[str, Replica] = _EMPTY
    #: The next replica number to mint; only ever grows.
    replica_counter: int = 0
    _index: Map[str, _BackendIndex] = attrs.field(default=_EMPTY, eq=False, repr=False)
    _routes: Map[str, BackendRoute] = attrs.field(default=_EMPTY, eq=False, repr=False)

    def routing_table(self) -> RoutingTable:
        """The table carried by the last ``UpdateRouter`` (a cheap view, not a rebuild)."""
        return RoutingTable(endpoints=self.endpoints, backends=self._routes)

    def replicas_of(self, backend: str) -> tuple[str, ...]:
        """Tags of the backend's STARTING and RUNNING replicas, oldest first."""
        idx = self._index.get(backend, _NO_INDEX)
        return tuple(tag for _, tag in sorted([*idx.starting.items(), *idx.running.items()]))

    @classmethod
    def rebuild(
        cls,
        *,
        endpoints: Mapping[str, Endpoint],
        backends: Mapping[str, Backend],
        replicas: Mapping[str, Replica],
        replica_counter: int,
    ) -> State:
        """Build a state from its checkpointed parts, deriving the table and index."""
        index: dict[str, dict[ReplicaStatus, dict[int, str]]] = {
            tag: {ReplicaStatus.STARTING: {}, ReplicaStatus.RUNNING: {}} for tag in backends
        }
        for r in sorted(replicas.values(), key=lambda r: replica_number(r.tag)):
            if r.status is not ReplicaStatus.STOPPING and r.backend in index:
                index[r.backend][r.status][replica_number(r.tag)] = r.tag
        return cls(
            endpoints=Map(endpoints),
            backends=Map(backends),
            replicas=Map(replicas),
            replica_counter=replica_counter,
            index=Map(
                {
                    tag: _BackendIndex(
                        starting=Map(d[ReplicaStatus.STARTING]),
                        running=Map(d[ReplicaStatus.RUNNING]),
                    )
                    for tag, d in index.items()
                }
            ),
            routes=Map(
                {
                    tag: BackendRoute.of(b, tuple(index[tag][ReplicaStatus.RUNNING].values()))
                    for tag, b in backends.items()
                }
            ),
        )


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
        if abs(total - 1.0) > _WEIGHT_TOLERANCE:
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


@attrs.frozen(kw_only=True)
class Transition:
    """The result of :func:`step`: the new state and the effects to carry out, in order."""

    state: State
    effects: tuple[Effect, ...] = ()


# ---------------------------------------------------------------------------------------
# The transition function.


class _Tx:
    """A transaction over one step: local copies of the persistent maps plus the
    effects gathered so far. Nothing outside the step ever sees it."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.endpoints = state.endpoints
        self.backends = state.backends
        self.replicas = state.replicas
        self.counter = state.replica_counter
        self.index: Map[str, _BackendIndex] = state._index
        self.routes: Map[str, BackendRoute] = state._routes
        self.stops: list[StopReplica] = []
        self.starts: list[StartReplica] = []
        self.force_router_update = False

    # -- replicas -----------------------------------------------------------------------

    def _set_index(self, backend: str, idx: _BackendIndex) -> None:
        self.index = self.index.set(backend, idx)

    def mint(self, backend: Backend) -> None:
        n = self.counter
        self.counter += 1
        tag = f"{backend.tag}#{n}"
        self.replicas = self.replicas.set(tag, Replica(tag=tag, backend=backend.tag))
        idx = self.index.get(backend.tag, _NO_INDEX)
        self._set_index(backend.tag, attrs.evolve(idx, starting=idx.starting.set(n, tag)))
        self.starts.append(self.start_effect(tag, backend))

    @staticmethod
    def start_effect(tag: str, b: Backend) -> StartReplica:
        return StartReplica(
            tag=tag,
            backend=b.tag,
            target=b.target,
            init_args=b.init_args,
            init_kwargs=b.init_kwargs,
            config=b.config,
        )

    def mark_running(self, r: Replica) -> None:
        n = replica_number(r.tag)
        self.replicas = self.replicas.set(r.tag, attrs.evolve(r, status=ReplicaStatus.RUNNING))
        idx = self.index[r.backend]
        self._set_index(
            r.backend,
            _BackendIndex(starting=idx.starting.delete(n), running=idx.running.set(n, r.tag)),
        )
        route = self.routes[r.backend]
        self.routes = self.routes.set(
            r.backend, attrs.evolve(route, replicas=(*route.replicas, r.tag))
        )

    def _deactivate(self, r: Replica) -> None:
        """Take an active replica out of the index (and the routes, if RUNNING)."""
        if r.status is ReplicaStatus.STOPPING or r.backend not in self.index:
            return
        n = replica_number(r.tag)
        idx = self.index[r.backend]
        if r.status is ReplicaStatus.RUNNING:
            self._set_index(r.backend, attrs.evolve(idx, running=idx.running.delete(n)))
            route = self.routes[r.backend]
            self.routes = self.routes.set(
                r.backend,
                attrs.evolve(route, replicas=tuple(t for t in route.replicas if t != r.tag)),
            )
        else:
            self._set_index(r.backend, attrs.evolve(idx, starting=idx.starting.delete(n)))

    def begin_stop(self, r: Replica, timeout_s: float) -> None:
        self._deactivate(r)
        self.replicas = self.replicas.set(r.tag, attrs.evolve(r, status=ReplicaStatus.STOPPING))
        self.stops.append(StopReplica(tag=r.tag, timeout_s=timeout_s))

    def forget(self, r: Replica) -> None:
        self._deactivate(r)
        self.replicas = self.replicas.delete(r.tag)

    # -- backends -----------------------------------------------------------------------

    def put_backend(self, b: Backend) -> None:
        self.backends = self.backends.set(b.tag, b)

    def start_failed(self, r: Replica, reason: str) -> None:
        self.forget(r)
        b = self.backends.get(r.backend)
        if b is not None:
            failures = b.start_failures + 1
            status = BackendStatus.FAILED if failures >= MAX_START_FAILURES else b.status
            self.put_backend(
                attrs.evolve(b, start_failures=failures, last_error=reason, status=status)
            )
            self.reconcile(b.tag)

    def reconcile(self, tag: str) -> None:
        """Start or stop replicas until the backend has ``num_replicas`` active ones."""
        b = self.backends[tag]
        idx = self.index.get(tag, _NO_INDEX)
        want = b.config.num_replicas
        have = len(idx)
        if have < want and b.status is not BackendStatus.FAILED:
            for _ in range(want - have):
                self.mint(b)
        elif have > want:
            # Surplus: STARTING ones first (they serve nothing yet), then newest RUNNING.
            doomed = sorted(idx.starting.items(), reverse=True)[: have - want]
            doomed += sorted(idx.running.items(), reverse=True)[: have - want - len(doomed)]
            for _, rtag in doomed:
                self.begin_stop(self.replicas[rtag], b.config.graceful_shutdown_timeout_s)
        if b.status is not BackendStatus.FAILED:
            idx = self.index.get(tag, _NO_INDEX)
            healthy = not idx.starting and len(idx.running) == want
            status = BackendStatus.HEALTHY if healthy else BackendStatus.UPDATING
            if status is not b.status:
                self.put_backend(attrs.evolve(b, status=status))

    # -- result -------------------------------------------------------------------------

    def finish(self) -> Transition:
        new = State(
            endpoints=self.endpoints,
            backends=self.backends,
            replicas=self.replicas,
            replica_counter=self.counter,
            index=self.index,
            routes=self.routes,
        )
        effects: list[Effect] = []
        if (
            self.force_router_update
            or self.routes is not self.state._routes
            or self.endpoints is not self.state.endpoints
        ):
            effects.append(UpdateRouter(table=new.routing_table()))
        effects.extend(self.stops)
        effects.extend(self.starts)
        return Transition(state=new, effects=tuple(effects))


def _unchanged(state: State) -> Transition:
    return Transition(state=state, effects=())


def _endpoint(state: State, name: str) -> Endpoint:
    ep = state.endpoints.get(name)
    if ep is None:
        raise EndpointNotFound(name, tuple(sorted(state.endpoints)))
    return ep


def _backend(state: State, tag: str) -> Backend:
    b = state.backends.get(tag)
    if b is None:
        raise BackendNotFound(tag, tuple(sorted(state.backends)))
    return b


def _create_endpoint(state: State, cmd: CreateEndpoint) -> Transition:
    new = Endpoint(name=cmd.name, route=cmd.route, methods=cmd.methods)
    old = state.endpoints.get(cmd.name)
    if old is not None:
        if (old.route, old.methods) == (new.route, new.methods):
            return _unchanged(state)
        raise EndpointExists(cmd.name)
    if cmd.route is not None:
        for other in state.endpoints.values():
            if other.route == cmd.route:
                raise RouteConflict(cmd.route, cmd.name, other.name)
    tx = _Tx(state)
    tx.endpoints = tx.endpoints.set(cmd.name, new)
    return tx.finish()


def _delete_endpoint(state: State, cmd: DeleteEndpoint) -> Transition:
    _endpoint(state, cmd.name)
    tx = _Tx(state)
    tx.endpoints = tx.endpoints.delete(cmd.name)
    return tx.finish()


def _create_backend(state: State, cmd: CreateBackend) -> Transition:
    new = Backend(
        tag=cmd.tag,
        target=cmd.target,
        init_args=cmd.init_args,
        init_kwargs=cmd.init_kwargs,
        config=cmd.config,
    )
    old = state.backends.get(cmd.tag)
    if old is not None:
        if old.same_definition(new):
            return _unchanged(state)
        raise BackendExists(cmd.tag)
    tx = _Tx(state)
    tx.put_backend(new)
    tx.index = tx.index.set(cmd.tag, _NO_INDEX)
    tx.routes = tx.routes.set(cmd.tag, BackendRoute.of(new))
    tx.reconcile(cmd.tag)
    return tx.finish()


def _users_of(state: State, tag: str) -> tuple[str, ...]:
    return tuple(
        sorted(ep.name for ep in state.endpoints.values() if tag in ep.traffic or tag in ep.shadow)
    )


def _delete_backend(state: State, cmd: DeleteBackend) -> Transition:
    b = _backend(state, cmd.tag)
    users = _users_of(state, cmd.tag)
    if users:
        raise BackendInUse(cmd.tag, users)
    tx = _Tx(state)
    for rtag in state.replicas_of(cmd.tag):
        tx.begin_stop(tx.replicas[rtag], b.config.graceful_shutdown_timeout_s)
    tx.backends = tx.backends.delete(cmd.tag)
    tx.index = tx.index.delete(cmd.tag)
    tx.routes = tx.routes.delete(cmd.tag)
    return tx.finish()


def _set_backend_config(state: State, cmd: SetBackendConfig) -> Transition:
    b = _backend(state, cmd.tag)
    if b.config == cmd.config:
        return _unchanged(state)
    tx = _Tx(state)
    # A new config is a new chance: clear the failure budget (and FAILED).
    tx.put_backend(
        attrs.evolve(
            b, config=cmd.config, status=BackendStatus.UPDATING, start_failures=0, last_error=None
        )
    )
    route = tx.routes[cmd.tag]
    new_route = BackendRoute.of(tx.backends[cmd.tag], route.replicas)
    if new_route != route:
        tx.routes = tx.routes.set(cmd.tag, new_route)
    tx.reconcile(cmd.tag)
    return tx.finish()


def _set_traffic(state: State, cmd: SetTraffic) -> Transition:
    ep = _endpoint(state, cmd.endpoint)
    for tag in cmd.traffic:
        _backend(state, tag)
    if ep.traffic == cmd.traffic:
        return _unchanged(state)
    tx = _Tx(state)
    tx.endpoints = tx.endpoints.set(ep.name, attrs.evolve(ep, traffic=cmd.traffic))
    return tx.finish()


def _set_shadow_traffic(state: State, cmd: SetShadowTraffic) -> Transition:
    ep = _endpoint(state, cmd.endpoint)
    _backend(state, cmd.backend)
    if cmd.proportion == 0:
        shadow = ep.shadow.delete(cmd.backend) if cmd.backend in ep.shadow else ep.shadow
    else:
        shadow = ep.shadow.set(cmd.backend, cmd.proportion)
    if shadow == ep.shadow:
        return _unchanged(state)
    tx = _Tx(state)
    tx.endpoints = tx.endpoints.set(ep.name, attrs.evolve(ep, shadow=shadow))
    return tx.finish()


def _replica_started(state: State, ev: ReplicaStarted) -> Transition:
    r = state.replicas.get(ev.tag)
    if r is None or r.status is not ReplicaStatus.STARTING:
        return _unchanged(state)
    tx = _Tx(state)
    tx.mark_running(r)
    b = tx.backends[r.backend]
    # A late success does not lift FAILED: only a config change does (DESIGN §2).
    if b.status is not BackendStatus.FAILED and (b.start_failures or b.last_error is not None):
        tx.put_backend(attrs.evolve(b, start_failures=0, last_error=None))
    tx.reconcile(r.backend)
    return tx.finish()


def _replica_start_failed(state: State, ev: ReplicaStartFailed) -> Transition:
    r = state.replicas.get(ev.tag)
    if r is None or r.status is ReplicaStatus.RUNNING:
        return _unchanged(state)
    tx = _Tx(state)
    if r.status is ReplicaStatus.STOPPING:
        tx.forget(r)
    else:
        tx.start_failed(r, ev.reason)
    return tx.finish()


def _replica_gone(state: State, tag: str, reason: str) -> Transition:
    r = state.replicas.get(tag)
    if r is None:
        return _unchanged(state)
    tx = _Tx(state)
    if r.status is ReplicaStatus.STARTING:
        tx.start_failed(r, reason)
    else:
        tx.forget(r)
        if r.status is ReplicaStatus.RUNNING:
            tx.reconcile(r.backend)
    return tx.finish()


def _replica_stopped(state: State, ev: ReplicaStopped) -> Transition:
    return _replica_gone(state, ev.tag, "the replica stopped unexpectedly")


def _replica_died(state: State, ev: ReplicaDied) -> Transition:
    return _replica_gone(state, ev.tag, ev.reason or "the replica died")


def _recover(state: State, ev: Recover) -> Transition:
    tx = _Tx(state)
    tx.force_router_update = True
    for r in state.replicas.values():
        alive = r.tag in ev.live
        if r.status is ReplicaStatus.STARTING:
            if alive:
                tx.mark_running(r)
            else:
                tx.starts.append(tx.start_effect(r.tag, state.backends[r.backend]))
        elif r.status is ReplicaStatus.RUNNING:
            if not alive:
                tx.forget(r)
        elif alive:
            b = state.backends.get(r.backend)
            timeout = (
                b.config.graceful_shutdown_timeout_s
                if b
                else BackendConfig().graceful_shutdown_timeout_s
            )
            tx.stops.append(StopReplica(tag=r.tag, timeout_s=timeout))
        else:
            tx.forget(r)
    for tag in sorted(t for t in ev.live if t not in state.replicas):
        # An orphan: alive, but no checkpoint names it. Stop it, and make sure its number
        # is never minted again even if the checkpoint it came from was lost.
        b = state.backends.get(tag.rsplit("#", 1)[0])
        timeout = (
            b.config.graceful_shutdown_timeout_s
            if b
            else BackendConfig().graceful_shutdown_timeout_s
        )
        tx.stops.append(StopReplica(tag=tag, timeout_s=timeout))
        if re.fullmatch(r".+#\d+", tag):
            tx.counter = max(tx.counter, replica_number(tag) + 1)
    for tag in state.backends:
        tx.reconcile(tag)
    return tx.finish()


_HANDLERS: dict[type, Callable[[State, Any], Transition]] = {
    CreateEndpoint: _create_endpoint,
    DeleteEndpoint: _delete_endpoint,
    CreateBackend: _create_backend,
    DeleteBackend: _delete_backend,
    SetBackendConfig: _set_backend_config,
    SetTraffic: _set_traffic,
    SetShadowTraffic: _set_shadow_traffic,
    ReplicaStarted: _replica_started,
    ReplicaStartFailed: _replica_start_failed,
    ReplicaStopped: _replica_stopped,
    ReplicaDied: _replica_died,
    Recover: _recover,
}


def step(state: State, message: Message) -> Transition:
    """Apply one command or event to ``state``; return the new state and its effects.

    Pure: ``state`` is never modified. An invalid command raises a
    :class:`~servecore.CommandError` and the caller's state stays as it was; events
    never raise. A command that restates what is already there returns the same state
    and no effects, so an unsure client may simply retry.
    """
    handler = _HANDLERS.get(type(message))
    if handler is None:
        raise TypeError(f"step() takes a servecore command or event, not {message!r}")
    return handler(state, message)


def validate_state(state: State) -> None:
    """Assert every invariant of ``state`` (dask's ``validate_state``); for tests.

    Raises ``AssertionError`` naming the first broken invariant.
    """
    for name, ep in state.endpoints.items():
        assert ep.name == name, f"endpoint key {name!r} != {ep.name!r}"
        for tag in (*ep.traffic, *ep.shadow):
            assert tag in state.backends, f"endpoint {name!r} routes to missing backend {tag!r}"
        if ep.traffic:
            assert abs(math.fsum(ep.traffic.values()) - 1) <= _WEIGHT_TOLERANCE, ep
    routes = [ep.route for ep in state.endpoints.values() if ep.route is not None]
    assert len(routes) == len(set(routes)), f"duplicate routes {routes}"
    assert set(state._index) == set(state.backends) == set(state._routes)
    for tag, r in state.replicas.items():
        assert r.tag == tag
        n = replica_number(tag)
        assert 0 <= n < state.replica_counter, f"{tag} not below counter {state.replica_counter}"
        if r.status is not ReplicaStatus.STOPPING:
            assert r.backend in state.backends, f"active replica {tag} of missing backend"
            idx = state._index[r.backend]
            where = idx.running if r.status is ReplicaStatus.RUNNING else idx.starting
            assert where.get(n) == tag, f"{tag} missing from its backend's index"
    for tag, b in state.backends.items():
        assert b.tag == tag
        idx = state._index[tag]
        for n, rtag in (*idx.starting.items(), *idx.running.items()):
            assert replica_number(rtag) == n and rtag in state.replicas, rtag
        running = {t for _, t in idx.running.items()}
        assert running <= set(state.replicas.keys())
        route = state._routes[tag]
        assert route == BackendRoute.of(b, route.replicas), f"stale route for {tag}"
        assert set(route.replicas) == running and len(route.replicas) == len(running), tag
        for rtag in idx.starting.values():
            assert state.replicas[rtag].status is ReplicaStatus.STARTING
        for rtag in running:
            assert state.replicas[rtag].status is ReplicaStatus.RUNNING
        want = b.config.num_replicas
        if b.status is BackendStatus.FAILED:
            assert len(idx) <= want and b.start_failures >= MAX_START_FAILURES, b
        else:
            assert len(idx) == want, f"{tag} has {len(idx)} active replicas, wants {want}"
            healthy = not idx.starting and len(idx.running) == want
            assert (b.status is BackendStatus.HEALTHY) == healthy, b
    # The JSON shape of every stored value is what a round trip gives back.
    for b in state.backends.values():
        assert json.loads(json.dumps([b.init_args, b.init_kwargs])) == [
            list(b.init_args),
            b.init_kwargs,
        ]
