"""servecore: an embeddable, crash-consistent controller for serving model or function code.

A pure state machine (:func:`step`) turns commands and runtime events into a new
:class:`State` plus effects; the trio controller (:func:`open_controller`) saves each new
state through a checkpoint store *before* any effect runs, then lets a runtime carry the
effects out. See the README for a tour.
"""

# Names are imported on first use (PEP 562), so a process that only needs a piece of
# servecore (a replica process imports servecore._batch) does not pay for trio, the
# controller and the router at start-up.

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servecore._batch import (
        BatchSizeError,
        batch,
    )
    from servecore._controller import (
        Controller,
        open_controller,
    )
    from servecore._core import (
        EARLY_DEATH_S,
        MAX_START_FAILURES,
        Backend,
        BackendConfig,
        BackendRoute,
        BackendStatus,
        Command,
        CreateBackend,
        CreateEndpoint,
        DeleteBackend,
        DeleteEndpoint,
        Effect,
        Endpoint,
        Event,
        Message,
        Recover,
        Replica,
        ReplicaDied,
        ReplicaStarted,
        ReplicaStartFailed,
        ReplicaStatus,
        ReplicaStopped,
        Resync,
        RetryBackend,
        RoutingTable,
        SetBackendConfig,
        SetShadowTraffic,
        SetTraffic,
        StartReplica,
        State,
        StopReplica,
        Transition,
        UpdateRouter,
        step,
        validate_state,
    )
    from servecore._errors import (
        BackendExists,
        BackendInUse,
        BackendNotFound,
        BackendStartError,
        BackpressureError,
        CheckpointCorrupt,
        CheckpointError,
        CheckpointVersionError,
        CommandError,
        EndpointExists,
        EndpointNotFound,
        InvalidCommand,
        InvalidConfig,
        InvalidRoute,
        InvalidTarget,
        InvalidTraffic,
        LeaseLost,
        NoReplicaError,
        RemoteError,
        ReplicaDiedError,
        RouteConflict,
        RuntimeDirectoryLocked,
        ServecoreError,
        StoreLocked,
    )
    from servecore._limits import (
        Limits,
    )
    from servecore._sync import (
        SyncController,
        SyncHandle,
        start,
    )
    from servecore.router import (
        Handle,
        Router,
    )
    from servecore.runtimes import (
        Query,
        Runtime,
    )
    from servecore.stores import (
        CallbackStore,
        FileStore,
        MemoryStore,
        SQLiteStore,
        Store,
    )
    from servecore.stores_postgres import (
        PostgresStore,
    )

_LAZY: dict[str, str] = {
    "PostgresStore": "servecore.stores_postgres",
    "LeaseLost": "servecore._errors",
    "Limits": "servecore._limits",
    "InvalidCommand": "servecore._errors",
    "EARLY_DEATH_S": "servecore._core",
    "Resync": "servecore._core",
    "RetryBackend": "servecore._core",
    "MAX_START_FAILURES": "servecore._core",
    "Backend": "servecore._core",
    "BackendConfig": "servecore._core",
    "BackendExists": "servecore._errors",
    "BackendInUse": "servecore._errors",
    "BackendNotFound": "servecore._errors",
    "BackendRoute": "servecore._core",
    "BackendStartError": "servecore._errors",
    "BackendStatus": "servecore._core",
    "BackpressureError": "servecore._errors",
    "BatchSizeError": "servecore._batch",
    "CallbackStore": "servecore.stores",
    "CheckpointCorrupt": "servecore._errors",
    "CheckpointError": "servecore._errors",
    "CheckpointVersionError": "servecore._errors",
    "Command": "servecore._core",
    "CommandError": "servecore._errors",
    "Controller": "servecore._controller",
    "CreateBackend": "servecore._core",
    "CreateEndpoint": "servecore._core",
    "DeleteBackend": "servecore._core",
    "DeleteEndpoint": "servecore._core",
    "Effect": "servecore._core",
    "Endpoint": "servecore._core",
    "EndpointExists": "servecore._errors",
    "EndpointNotFound": "servecore._errors",
    "Event": "servecore._core",
    "FileStore": "servecore.stores",
    "Handle": "servecore.router",
    "InvalidConfig": "servecore._errors",
    "InvalidRoute": "servecore._errors",
    "InvalidTarget": "servecore._errors",
    "InvalidTraffic": "servecore._errors",
    "MemoryStore": "servecore.stores",
    "Message": "servecore._core",
    "NoReplicaError": "servecore._errors",
    "Query": "servecore.runtimes",
    "Recover": "servecore._core",
    "RemoteError": "servecore._errors",
    "Replica": "servecore._core",
    "ReplicaDied": "servecore._core",
    "ReplicaDiedError": "servecore._errors",
    "ReplicaStartFailed": "servecore._core",
    "ReplicaStarted": "servecore._core",
    "ReplicaStatus": "servecore._core",
    "ReplicaStopped": "servecore._core",
    "RouteConflict": "servecore._errors",
    "Router": "servecore.router",
    "RoutingTable": "servecore._core",
    "Runtime": "servecore.runtimes",
    "RuntimeDirectoryLocked": "servecore._errors",
    "SQLiteStore": "servecore.stores",
    "ServecoreError": "servecore._errors",
    "SetBackendConfig": "servecore._core",
    "SetShadowTraffic": "servecore._core",
    "SetTraffic": "servecore._core",
    "StartReplica": "servecore._core",
    "State": "servecore._core",
    "StopReplica": "servecore._core",
    "Store": "servecore.stores",
    "StoreLocked": "servecore._errors",
    "SyncController": "servecore._sync",
    "SyncHandle": "servecore._sync",
    "Transition": "servecore._core",
    "UpdateRouter": "servecore._core",
    "batch": "servecore._batch",
    "open_controller": "servecore._controller",
    "start": "servecore._sync",
    "step": "servecore._core",
    "validate_state": "servecore._core",
}

__all__ = [
    "EARLY_DEATH_S",
    "MAX_START_FAILURES",
    "Backend",
    "BackendConfig",
    "BackendExists",
    "BackendInUse",
    "BackendNotFound",
    "BackendRoute",
    "BackendStartError",
    "BackendStatus",
    "BackpressureError",
    "BatchSizeError",
    "CallbackStore",
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointVersionError",
    "Command",
    "CommandError",
    "Controller",
    "CreateBackend",
    "CreateEndpoint",
    "DeleteBackend",
    "DeleteEndpoint",
    "Effect",
    "Endpoint",
    "EndpointExists",
    "EndpointNotFound",
    "Event",
    "FileStore",
    "Handle",
    "InvalidCommand",
    "InvalidConfig",
    "InvalidRoute",
    "InvalidTarget",
    "InvalidTraffic",
    "LeaseLost",
    "Limits",
    "MemoryStore",
    "Message",
    "NoReplicaError",
    "PostgresStore",
    "Query",
    "Recover",
    "RemoteError",
    "Replica",
    "ReplicaDied",
    "ReplicaDiedError",
    "ReplicaStartFailed",
    "ReplicaStarted",
    "ReplicaStatus",
    "ReplicaStopped",
    "Resync",
    "RetryBackend",
    "RouteConflict",
    "Router",
    "RoutingTable",
    "Runtime",
    "RuntimeDirectoryLocked",
    "SQLiteStore",
    "ServecoreError",
    "SetBackendConfig",
    "SetShadowTraffic",
    "SetTraffic",
    "StartReplica",
    "State",
    "StopReplica",
    "Store",
    "StoreLocked",
    "SyncController",
    "SyncHandle",
    "Transition",
    "UpdateRouter",
    "batch",
    "open_controller",
    "start",
    "step",
    "validate_state",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'servecore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
