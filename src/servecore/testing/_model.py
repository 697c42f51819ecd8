"""A simple reference model of what users asked for, written independently of the core.

It knows nothing of replicas: only endpoints and backends as plain dicts, and which
commands are invalid. The crash-consistency checks compare the controller's recovered
state against it (docs/design.md §7, property 1).
"""

from __future__ import annotations

from typing import Any

import attrs

from servecore._core.errors import (
    BackendExists,
    BackendInUse,
    BackendNotFound,
    CommandError,
    EndpointExists,
    EndpointNotFound,
    RouteConflict,
)
from servecore._core.transitions import (
    Command,
    CreateBackend,
    CreateEndpoint,
    DeleteBackend,
    DeleteEndpoint,
    RetryBackend,
    SetBackendConfig,
    SetShadowTraffic,
    SetTraffic,
    State,
)

__all__ = ["ReferenceModel", "desired"]

Desired = tuple[dict[str, Any], dict[str, Any]]


def desired(state: State) -> Desired:
    """The part of a state a user asked for: endpoints and backends, as plain data."""
    return (
        {
            name: (ep.route, ep.methods, dict(ep.traffic), dict(ep.shadow))
            for name, ep in state.endpoints.items()
        },
        {
            tag: (b.target, b.init_args, b.init_kwargs, b.config)
            for tag, b in state.backends.items()
        },
    )


@attrs.define
class ReferenceModel:
    """Endpoints and backends as dicts; :meth:`expected_error` gives the error type the
    core must raise, :meth:`apply` applies a valid command.

    What a user asked for does not include a backend's health, so the model needs no
    FAILED state: restating a FAILED backend's definition changes nothing (the
    controller raises ``BackendStartError`` again), and ``RetryBackend`` only starts
    replicas, which is not part of what is compared.
    """

    endpoints: dict[str, Any] = attrs.Factory(dict)
    backends: dict[str, Any] = attrs.Factory(dict)

    def copy(self) -> ReferenceModel:
        return ReferenceModel(
            endpoints={k: (r, m, dict(t), dict(s)) for k, (r, m, t, s) in self.endpoints.items()},
            backends=dict(self.backends),
        )

    def desired(self) -> Desired:
        return self.endpoints, self.backends

    def expected_error(self, cmd: Command) -> type[CommandError] | None:
        """The error type ``cmd`` must raise against this model, or ``None``."""
        eps, bes = self.endpoints, self.backends
        if isinstance(cmd, CreateEndpoint):
            if cmd.name in eps:
                return None if eps[cmd.name][:2] == (cmd.route, cmd.methods) else EndpointExists
            if cmd.route is not None and any(e[0] == cmd.route for e in eps.values()):
                return RouteConflict
        elif isinstance(cmd, DeleteEndpoint):
            return None if cmd.name in eps else EndpointNotFound
        elif isinstance(cmd, CreateBackend):
            new = (cmd.target, cmd.init_args, cmd.init_kwargs, cmd.config)
            if cmd.tag in bes and bes[cmd.tag] != new:
                return BackendExists
        elif isinstance(cmd, DeleteBackend):
            if cmd.tag not in bes:
                return BackendNotFound
            if any(cmd.tag in e[2] or cmd.tag in e[3] for e in eps.values()):
                return BackendInUse
        elif isinstance(cmd, SetBackendConfig | RetryBackend):
            return None if cmd.tag in bes else BackendNotFound
        elif isinstance(cmd, SetTraffic):
            if cmd.endpoint not in eps:
                return EndpointNotFound
            if any(tag not in bes for tag in cmd.traffic):
                return BackendNotFound
        elif isinstance(cmd, SetShadowTraffic):
            if cmd.endpoint not in eps:
                return EndpointNotFound
            if cmd.backend not in bes:
                return BackendNotFound
        return None

    def apply(self, cmd: Command) -> None:
        """Apply a command the model deems valid (call :meth:`expected_error` first)."""
        eps, bes = self.endpoints, self.backends
        if isinstance(cmd, CreateEndpoint):
            eps.setdefault(cmd.name, (cmd.route, cmd.methods, {}, {}))
        elif isinstance(cmd, DeleteEndpoint):
            del eps[cmd.name]
        elif isinstance(cmd, CreateBackend):
            bes[cmd.tag] = (cmd.target, cmd.init_args, cmd.init_kwargs, cmd.config)
        elif isinstance(cmd, DeleteBackend):
            del bes[cmd.tag]
        elif isinstance(cmd, RetryBackend):
            pass  # starts replicas again; what was asked for is unchanged
        elif isinstance(cmd, SetBackendConfig):
            target, args, kwargs, _ = bes[cmd.tag]
            bes[cmd.tag] = (target, args, kwargs, cmd.config)
        elif isinstance(cmd, SetTraffic):
            route, methods, _, shadow = eps[cmd.endpoint]
            eps[cmd.endpoint] = (route, methods, dict(cmd.traffic), shadow)
        elif isinstance(cmd, SetShadowTraffic):
            route, methods, weights, shadow = eps[cmd.endpoint]
            shadow = dict(shadow)
            if cmd.proportion == 0:
                shadow.pop(cmd.backend, None)
            else:
                shadow[cmd.backend] = cmd.proportion
            eps[cmd.endpoint] = (route, methods, weights, shadow)
