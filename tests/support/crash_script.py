"""One script of commands (and a kill) that touches every kind of change, replayed with
a crash at every point by the crash-consistency tests of each store."""

from __future__ import annotations

from servecore import (
    BackendConfig,
    CreateBackend,
    CreateEndpoint,
    DeleteBackend,
    SetBackendConfig,
    SetShadowTraffic,
    SetTraffic,
)
from servecore.testing import Kill

ECHO = "servecore.testing.targets:Echo"


def config(n: int) -> BackendConfig:
    return BackendConfig(num_replicas=n, graceful_shutdown_timeout_s=0.0)


SCRIPT = [
    CreateBackend(tag="a", target=ECHO, config=config(3)),
    CreateEndpoint(name="e", route="/e"),
    SetTraffic(endpoint="e", traffic={"a": 1.0}),
    CreateBackend(tag="b", target=ECHO, config=config(2)),
    SetTraffic(endpoint="e", traffic={"a": 0.5, "b": 0.5}),
    SetShadowTraffic(endpoint="e", backend="b", proportion=0.25),
    SetBackendConfig(tag="a", config=config(1)),
    SetBackendConfig(tag="b", config=config(4)),
    Kill("b#5"),
    # A new user_config rolls b's four replicas onto new ones.
    SetBackendConfig(tag="b", config=config(4).evolve(user_config={"v": 2})),
    SetTraffic(endpoint="e", traffic={"b": 1.0}),
    SetShadowTraffic(endpoint="e", backend="b", proportion=0.0),
    DeleteBackend(tag="a"),
]
