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
grows with what the message changes, not with the size of the state. That state, and the
one writer a step goes through (:class:`~servecore._core.state.TransitionBuilder`), are
:mod:`servecore._core.state`; this module is what each command and event does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
from servecore._core.state import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    EARLY_DEATH_S,
    MAX_START_FAILURES,
    Changes,
    State,
    Transition,
    TransitionBuilder,
    same_checkpoint,
    unchanged,
)
from servecore._core.values import (
    Backend,
    BackendConfig,
    BackendRoute,
    BackendStatus,
    Endpoint,
    Replica,
    ReplicaStatus,
    RoutingTable,
    backend_of,
    replica_number,
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


# ---------------------------------------------------------------------------------------
# The transition function: one handler per command and event, writing through a
# TransitionBuilder (servecore._core.state).


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
            return unchanged(state)
        raise EndpointExists(cmd.name)
    if cmd.route is not None:
        for other in state.endpoints.values():
            if other.route == cmd.route:
                raise RouteConflict(cmd.route, cmd.name, other.name)
    tx = TransitionBuilder(state)
    tx.put_endpoint(new)
    return tx.finish()


def _update_endpoint(state: State, cmd: UpdateEndpoint) -> Transition:
    old = _endpoint(state, cmd.name)
    if (old.route, tuple(old.methods), old.http_request) == (
        cmd.route,
        cmd.methods,
        cmd.http_request,
    ):
        return unchanged(state)
    if cmd.route is not None:
        for other in state.endpoints.values():
            if other.name != cmd.name and other.route == cmd.route:
                raise RouteConflict(cmd.route, cmd.name, other.name)
    tx = TransitionBuilder(state)
    tx.put_endpoint(
        attrs.evolve(old, route=cmd.route, methods=cmd.methods, http_request=cmd.http_request)
    )
    return tx.finish()


def _delete_endpoint(state: State, cmd: DeleteEndpoint) -> Transition:
    _endpoint(state, cmd.name)
    tx = TransitionBuilder(state)
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
            return unchanged(state)
        raise BackendExists(cmd.tag)
    tx = TransitionBuilder(state)
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
    tx = TransitionBuilder(state)
    for rtag in state.replicas_of(cmd.tag):
        tx.begin_stop(tx.replicas[rtag], b.config.graceful_shutdown_timeout_s)
    tx.drop_backend(cmd.tag)
    if cmd.tag in tx.observations:
        tx.observations = tx.observations.delete(cmd.tag)
    return tx.finish()


def _set_backend_config(state: State, cmd: SetBackendConfig) -> Transition:
    b = _backend(state, cmd.tag)
    if b.config == cmd.config:
        return unchanged(state)
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
        return unchanged(state)
    return _redefine(state, b, wanted)


def _redefine(state: State, b: Backend, wanted: Backend) -> Transition:
    """Give ``b`` the definition and config of ``wanted``, rolling its replicas when
    they must be rebuilt (new code, new init arguments, or a config that needs them):
    old replicas serve until new ones run in their place (:meth:`reconcile`)."""
    tx = TransitionBuilder(state)
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
        tx.retire_version(b)
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
        return unchanged(state)
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
    tx = TransitionBuilder(state)
    tx.observations = tx.observations.set(b.tag, seen)
    tx.put_backend(attrs.evolve(b, autoscale=decided))
    if decided.replicas != b.autoscale.replicas:
        tx.reconcile(b.tag)
    return tx.finish()


def _retry_backend(state: State, cmd: RetryBackend) -> Transition:
    b = _backend(state, cmd.tag)
    if b.status is not BackendStatus.FAILED:
        return unchanged(state)
    tx = TransitionBuilder(state)
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
        return unchanged(state)
    tx = TransitionBuilder(state)
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
        return unchanged(state)
    tx = TransitionBuilder(state)
    tx.put_endpoint(attrs.evolve(ep, shadow=shadow))
    return tx.finish()


def _replica_started(state: State, ev: ReplicaStarted) -> Transition:
    r = state.replicas.get(ev.tag)
    if r is None or r.status is not ReplicaStatus.STARTING:
        return unchanged(state)
    tx = TransitionBuilder(state)
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
        return unchanged(state)
    tx = TransitionBuilder(state)
    if r.status is ReplicaStatus.STOPPING:
        tx.forget(r)
    else:
        tx.start_failed(r, ev.reason)
    return tx.finish()


def _replica_gone(state: State, tag: str, reason: str, *, early: bool = False) -> Transition:
    r = state.replicas.get(tag)
    if r is None:
        return unchanged(state)
    tx = TransitionBuilder(state)
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
    tx = TransitionBuilder(state)
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
        return unchanged(state)  # they agree: nothing to write
    return tx.finish()


def _stop_timeout(state: State, tag: str) -> float:
    b = state.backends.get(backend_of(tag))
    return (b.config if b else BackendConfig()).graceful_shutdown_timeout_s


def _apply_fix(
    tx: TransitionBuilder, state: State, tag: str, found: Replica | None, fix: Fix
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
    tx = TransitionBuilder(state)
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
