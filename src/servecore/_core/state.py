"""The controller's state, and the one way a step writes it.

:class:`State` holds what the controller wants and knows (endpoints, backends,
replicas, the replica counter), with the routing table and a per-backend index of
replicas kept *inside* it and updated incrementally with persistent maps
(``immutables.Map``), so the cost of a step grows with what the message changes, not
with the size of the state. :class:`TransitionBuilder` is that incremental writer: a
transaction over one step, the only writer of the maps, which notes every entity it
touches and finishes as a :class:`Transition` (new state, effects in order, and the
:class:`Changes` a keyed checkpoint writes). The failure budget (how many failed
starts and early deaths a backend may have, and the back-off between them) is kept
here too, as the builder applies it.

What each command and event does with the builder is :mod:`servecore._core.transitions`;
its rules hold here: no I/O, no clock, no randomness, nothing imported from the
controller, the stores, the router or the runtimes, and not trio.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any

import attrs

from servecore._core.autoscaling import LoadObservation
from servecore._core.maps import Map
from servecore._core.messages import Effect, StartReplica, StopReplica, UpdateRouter
from servecore._core.values import (
    EMPTY,
    Backend,
    BackendRoute,
    BackendStatus,
    Endpoint,
    Replica,
    ReplicaStatus,
    RoutingTable,
    _init_args,
    _init_kwargs,
    replica_number,
    replica_tag,
)

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "EARLY_DEATH_S",
    "MAX_START_FAILURES",
    "Changes",
    "State",
    "Transition",
    "TransitionBuilder",
    "failures",
    "same_checkpoint",
    "status_of",
    "unchanged",
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


def failures(b: Backend) -> int:
    """What counts against ``b``'s failure budget: failed starts plus early deaths."""
    return b.start_failures + b.early_deaths


def _backoff_s(b: Backend) -> float:
    n = failures(b)
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


class TransitionBuilder:
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

    def retire_version(self, b: Backend) -> None:
        """The replicas of ``b``'s old definition: those still starting serve nothing
        yet and go now; running ones become outdated and keep serving until replaced
        (:meth:`reconcile`)."""
        idx = self.index[b.tag]
        for _, rtag in sorted(idx.starting.items()):
            self.begin_stop(self.replicas[rtag], b.config.graceful_shutdown_timeout_s)
        idx = self.index[b.tag]
        self._set_index(
            b.tag,
            _BackendIndex(outdated=Map({**dict(idx.outdated), **dict(idx.running)})),
        )

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
        if failures(b) >= MAX_START_FAILURES:
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
            status = status_of(b, self.index.get(tag, _NO_INDEX))
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


def status_of(b: Backend, idx: _BackendIndex) -> BackendStatus:
    """The status of a backend that is not FAILED."""
    if failures(b):
        return BackendStatus.UNHEALTHY
    healthy = not idx.starting and not idx.outdated and len(idx.running) == b.wanted_replicas
    return BackendStatus.HEALTHY if healthy else BackendStatus.UPDATING


def unchanged(state: State) -> Transition:
    """The transition that changes nothing: ``state`` again, no effects."""
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
