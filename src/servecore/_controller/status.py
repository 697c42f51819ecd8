"""A controller's status, as an operator reads it: one frozen value.

:func:`status_of` computes it from a :class:`~servecore.State` alone (what a checkpoint
says) or, for a running controller, with what the runtime knows (replica pids, actor
ids) and what the router sees (queued and running queries). ``ctl.status()``,
``SyncController.status()`` and ``servecore status`` all return this value;
:meth:`Status.as_dict` is its JSON form (``servecore status --json``).
"""

from __future__ import annotations

from typing import Any

import attrs

from servecore._controller.replica_lifecycle import replica_info
from servecore._core.transitions import State
from servecore._core.values import replica_order
from servecore._serving.router_stats import RouterStatistics

__all__ = [
    "DIED",
    "STOPPED",
    "BackendView",
    "EndpointView",
    "ReplicaView",
    "Status",
    "live_status",
    "status_of",
]

#: Offline status of replicas (and backends) known to have stopped with their server.
STOPPED = "STOPPED"
#: Live status of a replica the runtime reported dead whose death is not saved yet (the
#: store does not answer); its backend shows ``UNHEALTHY`` meanwhile.
DIED = "DIED"


@attrs.frozen(kw_only=True)
class ReplicaView:
    """One replica: its status and, where the runtime has them, pid, actor, log."""

    tag: str
    backend: str
    status: str
    version: int
    pid: int | None = None
    actor_id: str | None = None
    #: The node it runs on (a Ray node id) and its address, where the runtime says.
    node: str | None = None
    node_ip: str | None = None
    log_path: str | None = None
    #: Queries running on it now (live status only).
    running: int | None = None
    #: Why it died, while its death is seen but not yet saved (status ``DIED``).
    death: str | None = None


@attrs.frozen(kw_only=True)
class BackendView:
    """One backend: its definition, health and replicas."""

    tag: str
    target: str
    status: str
    num_replicas: int
    running_replicas: int
    version: int
    last_error: str | None
    config: dict[str, Any]
    replicas: tuple[ReplicaView, ...]
    #: Queries waiting and running on it now (live status only).
    queued: int | None = None
    running: int | None = None
    #: Queries it answered since the router was made, by outcome (``ok``, ``error``,
    #: ``timed_out``, ``cancelled``, ``no_replica``, ``backpressure``,
    #: ``replica_died``; only those that happened), over all endpoints (live only).
    queries: dict[str, int] | None = None


@attrs.frozen(kw_only=True)
class EndpointView:
    """One endpoint: its route, methods, traffic split and shadows."""

    name: str
    route: str | None
    methods: tuple[str, ...]
    traffic: dict[str, float]
    shadow: dict[str, float]
    #: Its HTTP requests reach the target as ``servecore.Request`` values, JSON too.
    http_request: bool = False
    #: Queries it received since the router was made, by outcome (as
    #: :attr:`BackendView.queries`), over all its backends (live status only).
    queries: dict[str, int] | None = None


@attrs.frozen(kw_only=True)
class Status:
    """Everything ``servecore status`` shows. ``live`` is False when it was read from a
    checkpoint with no controller running (no pids, no load)."""

    seq: int
    live: bool
    runtime: str | None
    endpoints: tuple[EndpointView, ...]
    backends: tuple[BackendView, ...]
    #: What the reader should know that the table does not say (offline status of a
    #: server whose replicas stopped with it), or ``None``.
    note: str | None = None

    @property
    def healthy(self) -> bool:
        """Whether every backend runs all the replicas it should."""
        return all(b.status == "HEALTHY" for b in self.backends)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready), with ``healthy`` included."""
        data: dict[str, Any] = attrs.asdict(self)
        data["healthy"] = self.healthy
        return data


def status_of(
    state: State,
    seq: int,
    *,
    runtime: Any = None,
    statistics: RouterStatistics | None = None,
    replicas_gone: str | None = None,
    unrecorded_deaths: dict[str, str] | None = None,
) -> Status:
    """The :class:`Status` of ``state`` (checkpoint number ``seq``); with ``runtime``
    (a live controller's), replicas carry their pid/actor/log and backends their load
    (0 before the first query: nothing is queued or running yet), from ``statistics``
    (its router's).

    ``replicas_gone`` (offline only) says that the replicas the checkpoint records are
    not running, and why (the ``threads`` runtime's replicas stop with their server):
    they are shown ``STOPPED``, as is every backend that wants replicas, and the
    reason becomes :attr:`Status.note`.

    ``unrecorded_deaths`` (live only: tag to reason) are deaths the runtime reported
    that the store has not saved yet: those replicas show ``DIED`` (not the
    checkpoint's ``RUNNING``), their backends ``UNHEALTHY``, and the note says why."""
    live = runtime is not None
    gone = replicas_gone is not None and not live
    died = dict(unrecorded_deaths or {}) if live else {}
    by_backend: dict[str, dict[str, int]] = {}
    by_endpoint: dict[str, dict[str, int]] = {}
    for (endpoint, backend, outcome), n in statistics.queries.items() if statistics else ():
        for table, key in ((by_backend, backend), (by_endpoint, endpoint)):
            counts = table.setdefault(key, {})
            counts[outcome] = counts.get(outcome, 0) + n
    backends = []
    for tag in sorted(state.backends):
        b = state.backends[tag]
        load = statistics.backends.get(tag) if statistics is not None else None
        replicas = []
        for rtag in sorted(
            (t for t, r in state.replicas.items() if r.backend == tag),
            key=replica_order,
        ):
            r = state.replicas[rtag]
            info = replica_info(runtime, rtag) if live else None
            replicas.append(
                ReplicaView(
                    tag=rtag,
                    backend=tag,
                    status=STOPPED if gone else DIED if rtag in died else r.status.value,
                    version=r.version,
                    pid=info.pid if info is not None else None,
                    actor_id=info.actor_id if info is not None else None,
                    node=info.node if info is not None else None,
                    node_ip=info.node_ip if info is not None else None,
                    log_path=info.log_path if info is not None else None,
                    running=(
                        load.running_by_replica.get(rtag, 0)
                        if load is not None
                        else (0 if live else None)
                    ),
                    death=died.get(rtag),
                )
            )
        backends.append(
            BackendView(
                tag=tag,
                target=b.target,
                status=(
                    STOPPED
                    if gone and b.wanted_replicas
                    else "UNHEALTHY"
                    if any(r.status == DIED for r in replicas)
                    else b.status.value
                ),
                num_replicas=b.wanted_replicas,
                running_replicas=sum(1 for r in replicas if r.status == "RUNNING"),
                version=b.version,
                last_error=b.last_error,
                config=attrs.asdict(b.config),
                replicas=tuple(replicas),
                queued=load.queued if load is not None else (0 if live else None),
                running=load.running if load is not None else (0 if live else None),
                queries=dict(sorted(by_backend.get(tag, {}).items())) if live else None,
            )
        )
    endpoints = tuple(
        EndpointView(
            name=name,
            route=ep.route,
            methods=tuple(ep.methods),
            traffic=dict(sorted(ep.traffic.items())),
            shadow=dict(sorted(ep.shadow.items())),
            http_request=ep.http_request,
            queries=dict(sorted(by_endpoint.get(name, {}).items())) if live else None,
        )
        for name, ep in sorted(state.endpoints.items())
    )
    return Status(
        seq=seq,
        live=live,
        runtime=type(runtime).__name__ if live else None,
        endpoints=endpoints,
        backends=tuple(backends),
        note=replicas_gone if gone else _unrecorded_note(died),
    )


def _unrecorded_note(died: dict[str, str]) -> str | None:
    if not died:
        return None
    tags = ", ".join(sorted(died, key=replica_order))
    return (
        f"{len(died)} replica death(s) seen but not saved yet ({tags}): the checkpoint "
        f"store does not answer; they are replaced once it does"
    )


def live_status(controller: Any) -> Status:
    """The :class:`Status` of a running controller: its state, runtime and router."""
    return status_of(
        controller.state,
        controller.seq,
        runtime=controller.runtime,
        statistics=controller.router_statistics(),
        unrecorded_deaths=controller.unrecorded_deaths,
    )
