"""The invariants of a :class:`~servecore.State`, asserted after every step in tests
(dask's ``validate_state``).

The rules of :mod:`servecore._core.transitions` hold here too: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import json
import math

from servecore._core.autoscaling import ScaleDirection
from servecore._core.state import MAX_START_FAILURES, State, failures, status_of
from servecore._core.values import (
    WEIGHT_TOLERANCE,
    BackendRoute,
    BackendStatus,
    ReplicaStatus,
    replica_number,
)

__all__ = ["validate_state"]


def validate_state(state: State) -> None:
    """Assert every invariant of ``state`` (dask's ``validate_state``); for tests.

    Raises ``AssertionError`` naming the first broken invariant.
    """
    for name, ep in state.endpoints.items():
        assert ep.name == name, f"endpoint key {name!r} != {ep.name!r}"
        for tag in (*ep.traffic, *ep.shadow):
            assert tag in state.backends, f"endpoint {name!r} routes to missing backend {tag!r}"
        if ep.traffic:
            assert abs(math.fsum(ep.traffic.values()) - 1) <= WEIGHT_TOLERANCE, ep
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
            current = r.version == state.backends[r.backend].version
            assert r.version <= state.backends[r.backend].version, f"{tag} from the future"
            if r.status is ReplicaStatus.STARTING:
                assert current, f"{tag} of an outdated config is starting"
                where = idx.starting
            else:
                where = idx.running if current else idx.outdated
            assert where.get(n) == tag, f"{tag} missing from its backend's index"
    for tag, b in state.backends.items():
        assert b.tag == tag
        idx = state._index[tag]
        for n, rtag in (*idx.starting.items(), *idx.running.items(), *idx.outdated.items()):
            assert replica_number(rtag) == n and rtag in state.replicas, rtag
        running = {t for _, t in idx.running.items()}
        serving = running | {t for _, t in idx.outdated.items()}
        assert serving <= set(state.replicas.keys())
        route = state._routes[tag]
        assert route == BackendRoute.of(b, route.replicas), f"stale route for {tag}"
        assert set(route.replicas) == serving and len(route.replicas) == len(serving), tag
        for rtag in idx.outdated.values():
            r = state.replicas[rtag]
            assert r.status is ReplicaStatus.RUNNING and r.version < b.version, r
        keep = max(0, b.wanted_replicas - len(running))
        assert len(idx.outdated) <= keep, f"{tag} keeps {len(idx.outdated)} outdated replicas"
        for rtag in idx.starting.values():
            assert state.replicas[rtag].status is ReplicaStatus.STARTING
        for rtag in running:
            assert state.replicas[rtag].status is ReplicaStatus.RUNNING
        want = b.wanted_replicas
        scaling = b.config.autoscaling
        assert (scaling is None) == (b.autoscale is None), f"{tag}: autoscale state {b.autoscale}"
        assert (scaling is None) != (b.config.num_replicas is None), b.config
        if scaling is not None and b.autoscale is not None:
            assert scaling.min_replicas <= want <= scaling.max_replicas, (tag, b.autoscale)
            pending = b.autoscale.pending
            if pending is not None:
                up = pending.direction is ScaleDirection.UP
                assert (pending.replicas > want) == up and pending.replicas != want, pending
        if b.status is BackendStatus.FAILED:
            assert len(idx) <= want and failures(b) >= MAX_START_FAILURES, b
        else:
            # All wanted replicas are active, or a roll runs as many as max_surge allows.
            active = len(idx) + len(idx.outdated)
            assert len(idx) == want or (
                len(idx) < want and active == want + b.config.surge(want)
            ), f"{tag} has {len(idx)} active replicas, wants {want} ({len(idx.outdated)} outdated)"
            assert b.status is status_of(b, idx), b
    # The JSON shape of every stored value is what a round trip gives back.
    for b in state.backends.values():
        assert json.loads(json.dumps([b.init_args, b.init_kwargs])) == [
            list(b.init_args),
            b.init_kwargs,
        ]
