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

import heapq
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from servecore._core.autoscaling import (
    AutoscaleState,
    AutoscalingConfig,
    LoadObservation,
    ScaleDirection,
    ScaleProposal,
    begin,
    decide,
    recommend,
    reconfigure,
)
from servecore._core.errors import (
    BackendExists,
    BackendInUse,
    BackendNotFound,
    EndpointExists,
    EndpointNotFound,
    RouteConflict,
)
from servecore._core.maps import Map
from servecore._core.messages import (
    Command,
    CreateBackend,
    CreateEndpoint,
    DeleteBackend,
    DeleteEndpoint,
    Effect,
    Event,
    LoadReport,
    Message,
    Recover,
    ReplicaDied,
    ReplicaStarted,
    ReplicaStartFailed,
    ReplicaStopped,
    Resync,
    RetryBackend,
    SetBackendConfig,
    SetShadowTraffic,
    SetTraffic,
    StartReplica,
    StopReplica,
    UpdateBackend,
    UpdateEndpoint,
    UpdateRouter,
)
from servecore._core.reconcile import Fix, fix_for
from servecore._core.values import (
    EMPTY,
    Backend,
    BackendConfig,
    BackendRoute,
    BackendStatus,
    Endpoint,
    Replica,
    ReplicaStatus,
    RoutingTable,
    _init_args,
    _init_kwargs,
    backend_of,
    replica_number,
    replica_tag,
    target_path,
)

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "EARLY_DEATH_S",
    "MAX_START_FAILURES",
    "AutoscaleState",
    "AutoscalingConfig",
    "Backend",
    "BackendConfig",
    "BackendRoute",
    "BackendStatus",
    "Changes",
    "Command",
    "CreateBackend",
    "CreateEndpoint",
    "DeleteBackend",
    "DeleteEndpoint",
    "Effect",
    "Endpoint",
    "Event",
    "LoadObservation",
    "LoadReport",
    "Message",
    "Recover",
    "Replica",
    "ReplicaDied",
    "ReplicaStartFailed",
    "ReplicaStarted",
    "ReplicaStatus",
    "ReplicaStopped",
    "Resync",
    "RetryBackend",
    "RoutingTable",
    "ScaleDirection",
    "ScaleProposal",
    "SetBackendConfig",
    "SetShadowTraffic",
    "SetTraffic",
    "StartReplica",
    "State",
    "StopReplica",
    "Transition",
    "UpdateBackend",
    "UpdateEndpoint",
    "UpdateRouter",
    "replica_number",
    "same_checkpoint",
    "step",
    "target_path",
]

#: The failure budget: consecutive failed starts plus replicas that died soon after
#: starting, after which a backend is marked FAILED and left alone.
MAX_START_FAILURES = 3
#: A replica that dies within this many seconds of starting died "early": it counts
#: towards the failure budget, as a failed start does (a crash loop, not bad luck).
EARLY_DEATH_S = 10.0
#: Replacements after failures wait ``BACKOFF_BASE_S * 2**(failures - 1)`` seconds,
#: at most ``BACKOFF_CAP_S`` (Kubernetes' CrashLoopBackOff, shorter, since the budget
#: stops the loop after a few tries anyway).
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0


def _failures(b: Backend) -> int:
    return b.start_failures + b.early_deaths


def _backoff_s(b: Backend) -> float:
    n = _failures(b)
    return 0.0 if n == 0 else min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(n - 1, 30))


@attrs.frozen(kw_only=True)
class _BackendIndex:
    """Active replicas of one backend, keyed by their number: STARTING and RUNNING ones
    of the backend's current version, and RUNNING ones of an older version
    (``outdated``: still serving, retired as current ones come up)."""

    starting: Map[int, str] = EMPTY
    running: Map[int, str] = EMPTY
    outdated: Map[int, str] = EMPTY

    def __len__(self) -> int:
        """Current-version replicas, the ones that count towards ``num_replicas``."""
        return len(self.starting) + len(self.running)


_NO_INDEX = _BackendIndex()


@attrs.frozen(kw_only=True)
class State:
    """The controller's whole desired and known state. ``State()`` is empty.

    ``endpoints``, ``backends`` and ``replicas`` are read-only mappings; the routing
    table and a per-backend index are derived, kept up to date incrementally, and are
    neither compared nor checkpointed. ``observations`` holds the last
    :class:`LoadReport` of each autoscaling backend as the policy read it: status, not
    decision, so it is neither compared nor checkpointed either (a restarted controller
    begins with none).
    """

    endpoints: Map[str, Endpoint] = EMPTY
    backends: Map[str, Backend] = EMPTY
    replicas: Map[str, Replica] = EMPTY
    #: The next replica number to mint; only ever grows.
    replica_counter: int = 0
    observations: Map[str, LoadObservation] = attrs.field(default=EMPTY, eq=False)
    _index: Map[str, _BackendIndex] = attrs.field(default=EMPTY, eq=False, repr=False)
    _routes: Map[str, BackendRoute] = attrs.field(default=EMPTY, eq=False, repr=False)

    def routing_table(self) -> RoutingTable:
        """The table carried by the last ``UpdateRouter`` (a cheap view, not a rebuild)."""
        return RoutingTable(endpoints=self.endpoints, backends=self._routes)

    def replicas_of(self, backend: str) -> tuple[str, ...]:
        """Tags of the backend's STARTING and RUNNING replicas, oldest first."""
        idx = self._index.get(backend, _NO_INDEX)
        active = [*idx.starting.items(), *idx.running.items(), *idx.outdated.items()]
        return tuple(tag for _, tag in sorted(active))

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
        index: dict[str, dict[str, dict[int, str]]] = {
            tag: {"starting": {}, "running": {}, "outdated": {}} for tag in backends
        }
        for r in sorted(replicas.values(), key=lambda r: replica_number(r.tag)):
            if r.status is ReplicaStatus.STOPPING or r.backend not in index:
                continue
            if r.version != backends[r.backend].version:
                where = "outdated"
            else:
                where = "running" if r.status is ReplicaStatus.RUNNING else "starting"
            index[r.backend][where][replica_number(r.tag)] = r.tag
        return cls(
            endpoints=Map(endpoints),
            backends=Map(backends),
            replicas=Map(replicas),
            replica_counter=replica_counter,
            index=Map(
                {
                    tag: _BackendIndex(
                        starting=Map(d["starting"]),
                        running=Map(d["running"]),
                        outdated=Map(d["outdated"]),
                    )
                    for tag, d in index.items()
                }
            ),
            routes=Map(
                {
                    tag: BackendRoute.of(
                        b, (*index[tag]["running"].values(), *index[tag]["outdated"].values())
                    )
                    for tag, b in backends.items()
                }
            ),
        )


@attrs.frozen(kw_only=True)
class Changes:
    """What one transition changed, entity by entity: the delta a keyed checkpoint
    writes (one record per endpoint, backend and replica, plus the counter).

    Each map holds the entities put (their new value) and deleted (``None``); keys the
    transition did not touch are absent. Collected by the transaction as it writes, so
    its size, and the cost of making it, follow what changed, not the whole state.
    """

    endpoints: Map[str, Endpoint | None] = EMPTY
    backends: Map[str, Backend | None] = EMPTY
    replicas: Map[str, Replica | None] = EMPTY
    #: The replica counter after the transition (changed or not).
    replica_counter: int = 0

    def __len__(self) -> int:
        """How many entity records changed."""
        return len(self.endpoints) + len(self.backends) + len(self.replicas)


@attrs.frozen(kw_only=True)
class Transition:
    """The result of :func:`step`: the new state, the effects to carry out, in order,
    and the entities it changed (:class:`Changes`)."""

    state: State
    effects: tuple[Effect, ...] = ()
    changes: Changes = Changes()


# ---------------------------------------------------------------------------------------
# The transition function.


class _TransitionBuilder:
    """A transaction over one step: local copies of the persistent maps plus the
    effects gathered so far. Nothing outside the step ever sees it.

    It is the only writer of the maps, through the named operations below, and notes
    every entity key it writes: :meth:`finish` turns those keys into the transition's
    :class:`Changes` by looking each one up, so the delta costs what the step touched.
    """

    def __init__(self, state: State) -> None:
        self.state = state
        self.endpoints = state.endpoints
        self.backends = state.backends
        self.replicas = state.replicas
        self.counter = state.replica_counter
        self.index: Map[str, _BackendIndex] = state._index
        self.routes: Map[str, BackendRoute] = state._routes
        self.observations = state.observations
        self.stops: list[StopReplica] = []
        self.starts: list[StartReplica] = []
        self.force_router_update = False
        self._touched_endpoints: set[str] = set()
        self._touched_backends: set[str] = set()
        self._touched_replicas: set[str] = set()

    # -- the writers of the entity maps ---------------------------------------------------

    def put_endpoint(self, ep: Endpoint) -> None:
        self.endpoints = self.endpoints.set(ep.name, ep)
        self._touched_endpoints.add(ep.name)

    def drop_endpoint(self, name: str) -> None:
        self.endpoints = self.endpoints.delete(name)
        self._touched_endpoints.add(name)

    def _put_replica(self, r: Replica) -> None:
        self.replicas = self.replicas.set(r.tag, r)
        self._touched_replicas.add(r.tag)

    def _drop_replica(self, tag: str) -> None:
        self.replicas = self.replicas.delete(tag)
        self._touched_replicas.add(tag)

    # -- replicas -----------------------------------------------------------------------

    def _set_index(self, backend: str, idx: _BackendIndex) -> None:
        self.index = self.index.set(backend, idx)

    def mint(self, backend: Backend) -> None:
        n = self.counter
        self.counter += 1
        tag = replica_tag(backend.tag, n)
        self._put_replica(Replica(tag=tag, backend=backend.tag, version=backend.version))
        idx = self.index.get(backend.tag, _NO_INDEX)
        self._set_index(backend.tag, attrs.evolve(idx, starting=idx.starting.set(n, tag)))
        self.starts.append(self.start_effect(tag, backend))

    @staticmethod
    def start_effect(tag: str, b: Backend) -> StartReplica:
        # The effect gets its own copies of the JSON values (the converters rebuild
        # them), so user code that changes its constructor arguments or user_config
        # cannot reach back into the state or the next checkpoint.
        return StartReplica(
            tag=tag,
            backend=b.tag,
            target=b.target,
            init_args=_init_args(b.init_args),
            init_kwargs=_init_kwargs(b.init_kwargs),
            config=attrs.evolve(b.config),
            delay_s=_backoff_s(b),
        )

    def mark_running(self, r: Replica) -> None:
        n = replica_number(r.tag)
        self._put_replica(attrs.evolve(r, status=ReplicaStatus.RUNNING))
        idx = self.index[r.backend]
        if r.version == self.backends[r.backend].version:
            idx = attrs.evolve(
                idx, starting=idx.starting.delete(n), running=idx.running.set(n, r.tag)
            )
        else:  # only on recovery: an older replica that was still starting came up
            idx = attrs.evolve(
                idx, starting=idx.starting.delete(n), outdated=idx.outdated.set(n, r.tag)
            )
        self._set_index(r.backend, idx)
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
            if n in idx.outdated:
                idx = attrs.evolve(idx, outdated=idx.outdated.delete(n))
            else:
                idx = attrs.evolve(idx, running=idx.running.delete(n))
            self._set_index(r.backend, idx)
            route = self.routes[r.backend]
            i = route.replicas.index(r.tag)
            replicas = route.replicas[:i] + route.replicas[i + 1 :]
            self.routes = self.routes.set(r.backend, attrs.evolve(route, replicas=replicas))
        else:
            self._set_index(r.backend, attrs.evolve(idx, starting=idx.starting.delete(n)))

    def begin_stop(self, r: Replica, timeout_s: float) -> None:
        self._deactivate(r)
        self._put_replica(attrs.evolve(r, status=ReplicaStatus.STOPPING))
        self.stops.append(StopReplica(tag=r.tag, timeout_s=timeout_s))

    def forget(self, r: Replica) -> None:
        self._deactivate(r)
        self._drop_replica(r.tag)

    # -- backends -----------------------------------------------------------------------

    def add_backend(self, b: Backend) -> None:
        """A new backend: its record, an empty index and its route."""
        self.put_backend(b)
        self.index = self.index.set(b.tag, _NO_INDEX)
        self.routes = self.routes.set(b.tag, BackendRoute.of(b))

    def drop_backend(self, tag: str) -> None:
        self.backends = self.backends.delete(tag)
        self._touched_backends.add(tag)
        self.index = self.index.delete(tag)
        self.routes = self.routes.delete(tag)

    def put_backend(self, b: Backend) -> None:
        self.backends = self.backends.set(b.tag, b)
        self._touched_backends.add(b.tag)
        route = self.routes.get(b.tag)
        if route is not None:
            # The router names a FAILED backend's reason in NoReplicaError.
            new_route = BackendRoute.of(b, route.replicas)
            if new_route.failure != route.failure:
                self.routes = self.routes.set(b.tag, new_route)

    def _count_failure(self, b: Backend, reason: str, *, early_death: bool) -> None:
        if early_death:
            b = attrs.evolve(b, early_deaths=b.early_deaths + 1, last_error=reason)
        else:
            b = attrs.evolve(b, start_failures=b.start_failures + 1, last_error=reason)
        if _failures(b) >= MAX_START_FAILURES:
            b = attrs.evolve(b, status=BackendStatus.FAILED)
        self.put_backend(b)
        self.reconcile(b.tag)

    def start_failed(self, r: Replica, reason: str) -> None:
        self.forget(r)
        b = self.backends.get(r.backend)
        if b is not None:
            self._count_failure(b, reason, early_death=False)

    def died_early(self, r: Replica, reason: str) -> None:
        self.forget(r)
        b = self.backends.get(r.backend)
        if b is not None and b.status is not BackendStatus.FAILED:
            self._count_failure(b, reason, early_death=True)
        elif b is not None:
            self.reconcile(b.tag)

    def reconcile(self, tag: str) -> None:
        """Start or stop replicas until the backend has ``wanted_replicas`` active ones."""
        b = self.backends[tag]
        idx = self.index.get(tag, _NO_INDEX)
        want = b.wanted_replicas
        have = len(idx)
        if have > want:
            # Surplus: STARTING ones first (they serve nothing yet), then newest RUNNING.
            surplus = have - want
            doomed = heapq.nlargest(surplus, idx.starting.items())
            doomed += heapq.nlargest(surplus - len(doomed), idx.running.items())
            for _, rtag in doomed:
                self.begin_stop(self.replicas[rtag], b.config.graceful_shutdown_timeout_s)
        # Rolling replacement: older replicas serve until current ones run in their
        # place, so capacity never drops below num_replicas while there is a choice.
        idx = self.index.get(tag, _NO_INDEX)
        keep = max(0, want - len(idx.running))
        if len(idx.outdated) > keep:
            for _, rtag in heapq.nsmallest(len(idx.outdated) - keep, idx.outdated.items()):
                self.begin_stop(self.replicas[rtag], b.config.graceful_shutdown_timeout_s)
            idx = self.index.get(tag, _NO_INDEX)
        # Missing replicas start, but a roll runs at most max_surge beyond the wanted
        # count at once (outdated ones still serving count): the rest start as those
        # are retired.
        if len(idx) < want and b.status is not BackendStatus.FAILED:
            room = want + b.config.surge(want) - len(idx) - len(idx.outdated)
            for _ in range(min(want - len(idx), max(0, room))):
                self.mint(b)
        b = self.backends[tag]
        if b.status is not BackendStatus.FAILED:
            status = _status_of(b, self.index.get(tag, _NO_INDEX))
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
            observations=self.observations,
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
        old = self.state
        changes = Changes(
            endpoints=_delta(self._touched_endpoints, old.endpoints, new.endpoints),
            backends=_delta(self._touched_backends, old.backends, new.backends),
            replicas=_delta(self._touched_replicas, old.replicas, new.replicas),
            replica_counter=new.replica_counter,
        )
        return Transition(state=new, effects=tuple(effects), changes=changes)


def _delta(touched: set[str], old: Map[str, Any], new: Map[str, Any]) -> Map[str, Any]:
    """The touched keys whose value is not the one they had (``None``: deleted)."""
    if not touched:
        return EMPTY
    out: dict[str, Any] = {}
    for key in touched:
        value = new.get(key)
        if value is not old.get(key):
            out[key] = value
    return Map(out) if out else EMPTY


def _status_of(b: Backend, idx: _BackendIndex) -> BackendStatus:
    """The status of a backend that is not FAILED."""
    if _failures(b):
        return BackendStatus.UNHEALTHY
    healthy = not idx.starting and not idx.outdated and len(idx.running) == b.wanted_replicas
    return BackendStatus.HEALTHY if healthy else BackendStatus.UPDATING


def _unchanged(state: State) -> Transition:
    return Transition(
        state=state, effects=(), changes=Changes(replica_counter=state.replica_counter)
    )


def same_checkpoint(old: State, new: State) -> bool:
    """Whether ``new`` checkpoints exactly as ``old`` does (the same checkpointed
    objects): a transition to it needs no save, e.g. a :class:`LoadReport` that changed
    no decision and only refreshed ``observations``."""
    return (
        new.backends is old.backends
        and new.replicas is old.replicas
        and new.endpoints is old.endpoints
        and new.replica_counter == old.replica_counter
    )


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
    new = Endpoint(
        name=cmd.name, route=cmd.route, methods=cmd.methods, http_request=cmd.http_request
    )
    old = state.endpoints.get(cmd.name)
    if old is not None:
        if (old.route, old.methods, old.http_request) == (
            new.route,
            new.methods,
            new.http_request,
        ):
            return _unchanged(state)
        raise EndpointExists(cmd.name)
    if cmd.route is not None:
        for other in state.endpoints.values():
            if other.route == cmd.route:
                raise RouteConflict(cmd.route, cmd.name, other.name)
    tx = _TransitionBuilder(state)
    tx.put_endpoint(new)
    return tx.finish()


def _update_endpoint(state: State, cmd: UpdateEndpoint) -> Transition:
    old = _endpoint(state, cmd.name)
    if (old.route, tuple(old.methods), old.http_request) == (
        cmd.route,
        cmd.methods,
        cmd.http_request,
    ):
        return _unchanged(state)
    if cmd.route is not None:
        for other in state.endpoints.values():
            if other.name != cmd.name and other.route == cmd.route:
                raise RouteConflict(cmd.route, cmd.name, other.name)
    tx = _TransitionBuilder(state)
    tx.put_endpoint(
        attrs.evolve(old, route=cmd.route, methods=cmd.methods, http_request=cmd.http_request)
    )
    return tx.finish()


def _delete_endpoint(state: State, cmd: DeleteEndpoint) -> Transition:
    _endpoint(state, cmd.name)
    tx = _TransitionBuilder(state)
    tx.drop_endpoint(cmd.name)
    return tx.finish()


def _create_backend(state: State, cmd: CreateBackend) -> Transition:
    scaling = cmd.config.autoscaling
    new = Backend(
        tag=cmd.tag,
        target=cmd.target,
        init_args=cmd.init_args,
        init_kwargs=cmd.init_kwargs,
        config=cmd.config,
        autoscale=None if scaling is None else begin(scaling),
    )
    old = state.backends.get(cmd.tag)
    if old is not None:
        if old.same_definition(new):
            return _unchanged(state)
        raise BackendExists(cmd.tag)
    tx = _TransitionBuilder(state)
    tx.add_backend(new)
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
    tx = _TransitionBuilder(state)
    for rtag in state.replicas_of(cmd.tag):
        tx.begin_stop(tx.replicas[rtag], b.config.graceful_shutdown_timeout_s)
    tx.drop_backend(cmd.tag)
    if cmd.tag in tx.observations:
        tx.observations = tx.observations.delete(cmd.tag)
    return tx.finish()


def _set_backend_config(state: State, cmd: SetBackendConfig) -> Transition:
    b = _backend(state, cmd.tag)
    if b.config == cmd.config:
        return _unchanged(state)
    return _redefine(state, b, attrs.evolve(b, config=cmd.config))


def _update_backend(state: State, cmd: UpdateBackend) -> Transition:
    b = _backend(state, cmd.tag)
    wanted = attrs.evolve(
        b,
        target=cmd.target,
        init_args=cmd.init_args,
        init_kwargs=cmd.init_kwargs,
        config=cmd.config,
    )
    if b.same_definition(wanted):
        return _unchanged(state)
    return _redefine(state, b, wanted)


def _redefine(state: State, b: Backend, wanted: Backend) -> Transition:
    """Give ``b`` the definition and config of ``wanted``, rolling its replicas when
    they must be rebuilt (new code, new init arguments, or a config that needs them):
    old replicas serve until new ones run in their place (:meth:`reconcile`)."""
    tx = _TransitionBuilder(state)
    new_code = (b.target, b.init_args, b.init_kwargs) != (
        wanted.target,
        wanted.init_args,
        wanted.init_kwargs,
    )
    renew = new_code or b.config.needs_new_replicas(wanted.config)
    # A new definition or config is a new chance: clear the failure budget (and FAILED).
    tx.put_backend(
        attrs.evolve(
            wanted,
            status=BackendStatus.UPDATING,
            start_failures=0,
            early_deaths=0,
            last_error=None,
            version=b.version + 1 if renew else b.version,
            autoscale=_autoscale_after(b, wanted.config),
        )
    )
    if wanted.config.autoscaling is None and b.tag in tx.observations:
        tx.observations = tx.observations.delete(b.tag)
    if renew:
        # Replicas of the old definition: those still starting serve nothing yet and
        # go now; running ones become outdated and keep serving until replaced.
        idx = tx.index[b.tag]
        for _, rtag in sorted(idx.starting.items()):
            tx.begin_stop(tx.replicas[rtag], b.config.graceful_shutdown_timeout_s)
        idx = tx.index[b.tag]
        tx._set_index(
            b.tag,
            _BackendIndex(outdated=Map({**dict(idx.outdated), **dict(idx.running)})),
        )
    route = tx.routes[b.tag]
    new_route = BackendRoute.of(tx.backends[b.tag], route.replicas)
    # Same replicas tuple on both sides: compare only what comes from the definition.
    if attrs.evolve(new_route, replicas=()) != attrs.evolve(route, replicas=()):
        tx.routes = tx.routes.set(b.tag, new_route)
    tx.reconcile(b.tag)
    return tx.finish()


def _autoscale_after(b: Backend, config: BackendConfig) -> AutoscaleState | None:
    """The decision state of ``b`` under its new ``config``: started when autoscaling
    begins (from the count it runs now), kept or clamped when it changes, dropped when
    it ends."""
    new, old = config.autoscaling, b.config.autoscaling
    if new is None:
        return None
    if old is None or b.autoscale is None:
        return begin(new, b.wanted_replicas)
    return reconfigure(old, new, b.autoscale)


def _load_report(state: State, ev: LoadReport) -> Transition:
    """Feed the policy: a decision that fires reconciles the backend; a report that
    changes no decision returns a state that checkpoints as before
    (:func:`same_checkpoint`), with only its ``observations`` refreshed. A report for
    a backend that does not exist is refused (:class:`BackendNotFound`): it is the
    shell's or the host's mistake, not news."""
    b = state.backends.get(ev.backend)
    if b is None:
        raise BackendNotFound(ev.backend, tuple(sorted(state.backends)))
    scaling = b.config.autoscaling
    if scaling is None or b.autoscale is None:
        return _unchanged(state)
    seen = LoadObservation(
        ongoing=ev.ongoing, at=ev.now, desired=recommend(scaling, b.autoscale.replicas, ev.ongoing)
    )
    decided = decide(scaling, b.autoscale, ev.ongoing, ev.now)
    if decided is b.autoscale:
        # Nothing checkpointed changed: an empty change set.
        return Transition(
            state=attrs.evolve(state, observations=state.observations.set(b.tag, seen)),
            changes=Changes(replica_counter=state.replica_counter),
        )
    tx = _TransitionBuilder(state)
    tx.observations = tx.observations.set(b.tag, seen)
    tx.put_backend(attrs.evolve(b, autoscale=decided))
    if decided.replicas != b.autoscale.replicas:
        tx.reconcile(b.tag)
    return tx.finish()


def _retry_backend(state: State, cmd: RetryBackend) -> Transition:
    b = _backend(state, cmd.tag)
    if b.status is not BackendStatus.FAILED:
        return _unchanged(state)
    tx = _TransitionBuilder(state)
    tx.put_backend(
        attrs.evolve(
            b, status=BackendStatus.UPDATING, start_failures=0, early_deaths=0, last_error=None
        )
    )
    tx.reconcile(cmd.tag)
    return tx.finish()


def _set_traffic(state: State, cmd: SetTraffic) -> Transition:
    ep = _endpoint(state, cmd.endpoint)
    for tag in cmd.traffic:
        _backend(state, tag)
    if ep.traffic == cmd.traffic:
        return _unchanged(state)
    tx = _TransitionBuilder(state)
    tx.put_endpoint(attrs.evolve(ep, traffic=cmd.traffic))
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
    tx = _TransitionBuilder(state)
    tx.put_endpoint(attrs.evolve(ep, shadow=shadow))
    return tx.finish()


def _replica_started(state: State, ev: ReplicaStarted) -> Transition:
    r = state.replicas.get(ev.tag)
    if r is None or r.status is not ReplicaStatus.STARTING:
        return _unchanged(state)
    tx = _TransitionBuilder(state)
    tx.mark_running(r)
    b = tx.backends[r.backend]
    # A late success does not lift FAILED: only a config change or a retry does. It
    # ends a run of failed starts; a crash loop (early deaths) ends only once a replica
    # has proved it keeps running (see Resync).
    if b.status is not BackendStatus.FAILED and b.start_failures:
        last_error = b.last_error if b.early_deaths else None
        tx.put_backend(attrs.evolve(b, start_failures=0, last_error=last_error))
    tx.reconcile(r.backend)
    return tx.finish()


def _replica_start_failed(state: State, ev: ReplicaStartFailed) -> Transition:
    r = state.replicas.get(ev.tag)
    if r is None or r.status is ReplicaStatus.RUNNING:
        return _unchanged(state)
    tx = _TransitionBuilder(state)
    if r.status is ReplicaStatus.STOPPING:
        tx.forget(r)
    else:
        tx.start_failed(r, ev.reason)
    return tx.finish()


def _replica_gone(state: State, tag: str, reason: str, *, early: bool = False) -> Transition:
    r = state.replicas.get(tag)
    if r is None:
        return _unchanged(state)
    tx = _TransitionBuilder(state)
    if r.status is ReplicaStatus.STARTING:
        tx.start_failed(r, reason)
    elif r.status is ReplicaStatus.RUNNING and early:
        tx.died_early(r, reason)
    else:
        tx.forget(r)
        if r.status is ReplicaStatus.RUNNING:
            tx.reconcile(r.backend)
    return tx.finish()


def _replica_stopped(state: State, ev: ReplicaStopped) -> Transition:
    return _replica_gone(state, ev.tag, "the replica stopped unexpectedly")


def _replica_died(state: State, ev: ReplicaDied) -> Transition:
    early = ev.uptime_s is not None and ev.uptime_s < EARLY_DEATH_S
    return _replica_gone(state, ev.tag, ev.reason or "the replica died", early=early)


def _resync(state: State, ev: Resync) -> Transition:
    """Correct what the state believes about live replicas, leaving busy tags alone.

    Like :func:`_recover` with the shell's in-flight work excluded, by the same table
    (:data:`~servecore._core.reconcile.LIVENESS_FIXES`). Nothing changes, and nothing
    is saved, when the two agree.
    """
    tx = _TransitionBuilder(state)
    touched: set[str] = set()
    # Only the replicas where state and runtime may disagree: O(change), not O(state).
    for tag in sorted((set(state.replicas.keys()) - ev.live - ev.busy) | (ev.live - ev.busy)):
        found = state.replicas.get(tag)
        fix = fix_for(found.status if found is not None else None, tag in ev.live)
        if fix is not Fix.KEEP:
            touched.add(_apply_fix(tx, state, tag, found, fix))
    for tag in ev.proven & ev.live:
        found = tx.replicas.get(tag)
        if found is None or found.status is not ReplicaStatus.RUNNING:
            continue
        b = tx.backends.get(found.backend)
        if b is not None and b.early_deaths and b.status is not BackendStatus.FAILED:
            tx.put_backend(attrs.evolve(b, early_deaths=0, start_failures=0, last_error=None))
            touched.add(found.backend)
    for backend in sorted(touched):
        if backend in tx.backends:
            tx.reconcile(backend)
    if (
        not (tx.starts or tx.stops)
        and tx.replicas is state.replicas
        and (tx.backends is state.backends)
    ):
        return _unchanged(state)  # they agree: nothing to write
    return tx.finish()


def _stop_timeout(state: State, tag: str) -> float:
    b = state.backends.get(backend_of(tag))
    return (b.config if b else BackendConfig()).graceful_shutdown_timeout_s


def _apply_fix(
    tx: _TransitionBuilder, state: State, tag: str, found: Replica | None, fix: Fix
) -> str:
    """Carry out ``fix`` (from the liveness table) on replica ``tag``; return its backend."""
    if fix is Fix.MARK_RUNNING and found is not None:
        tx.mark_running(found)
    elif fix is Fix.START_AGAIN and found is not None:
        backend = state.backends[found.backend]
        if found.version == backend.version:
            tx.starts.append(tx.start_effect(tag, backend))
        else:
            tx.forget(found)  # never start a replica of an outdated config
    elif fix is Fix.FORGET and found is not None:
        tx.forget(found)
    elif fix is Fix.STOP:
        tx.stops.append(StopReplica(tag=tag, timeout_s=_stop_timeout(state, tag)))
        if found is None and re.fullmatch(r".+#\d+", tag):
            # An orphan: make sure its number is never minted again, even if the
            # checkpoint that named it was lost.
            tx.counter = max(tx.counter, replica_number(tag) + 1)
    return found.backend if found is not None else backend_of(tag)


def _recover(state: State, ev: Recover) -> Transition:
    """Everything recorded, and everything alive, through the liveness table; then
    every backend is reconciled and the router is told the whole table."""
    tx = _TransitionBuilder(state)
    tx.force_router_update = True
    for tag in sorted(set(state.replicas.keys()) | ev.live):
        found = state.replicas.get(tag)
        fix = fix_for(found.status if found is not None else None, tag in ev.live)
        if fix is not Fix.KEEP:
            _apply_fix(tx, state, tag, found, fix)
    for tag in state.backends:
        tx.reconcile(tag)
    return tx.finish()


_HANDLERS: dict[type, Callable[[State, Any], Transition]] = {
    CreateEndpoint: _create_endpoint,
    DeleteEndpoint: _delete_endpoint,
    CreateBackend: _create_backend,
    DeleteBackend: _delete_backend,
    SetBackendConfig: _set_backend_config,
    UpdateBackend: _update_backend,
    UpdateEndpoint: _update_endpoint,
    RetryBackend: _retry_backend,
    SetTraffic: _set_traffic,
    SetShadowTraffic: _set_shadow_traffic,
    ReplicaStarted: _replica_started,
    ReplicaStartFailed: _replica_start_failed,
    ReplicaStopped: _replica_stopped,
    ReplicaDied: _replica_died,
    Recover: _recover,
    Resync: _resync,
    LoadReport: _load_report,
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
