"""servecore: an embeddable, crash-consistent controller for serving model or function code.

A pure state machine (:func:`step`) turns commands and runtime events into a new
:class:`State` plus effects; the trio controller (:func:`open_controller`) commits what
each new state changed to a checkpoint store *before* any effect runs, then lets a runtime carry the
effects out. See the README for a tour.
"""

# Names are imported on first use (PEP 562), so a process that only needs a piece of
# servecore (a replica process imports servecore.runtimes.toolkit) does not pay for trio,
# the controller and the router at start-up.

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servecore._calls import (
        NotInReplica,
        ReplicaHandle,
        get_handle,
        get_multiplexed_model_id,
        time_remaining,
    )
    from servecore._controller.controller import (
        Controller,
        open_controller,
    )
    from servecore._controller.read_state import load_state, read_state
    from servecore._controller.status import Status
    from servecore._controller.sync import (
        SyncController,
        SyncHandle,
        start,
    )
    from servecore._core.errors import (
        BackendExists,
        BackendInUse,
        BackendNotFound,
        BackendStartError,
        BackpressureError,
        CallCycle,
        CallDepthExceeded,
        CheckpointCorrupt,
        CheckpointError,
        CheckpointLocked,
        CheckpointOutcomeUnknown,
        CheckpointVersionError,
        CommandError,
        ControllerClosed,
        DeadlineExceeded,
        EndpointExists,
        EndpointNotFound,
        InvalidCommand,
        InvalidConfig,
        InvalidRoute,
        InvalidRuntime,
        InvalidRuntimeOption,
        InvalidTarget,
        InvalidTraffic,
        LeaseLost,
        NoReplicaError,
        RemoteError,
        ReplicaDiedError,
        ReplicasUnreachable,
        ResultDecodeError,
        RouteConflict,
        RuntimeDirectoryLocked,
        RuntimeDirectoryStoreMismatch,
        RuntimeDirectoryUnsafe,
        RuntimeFenced,
        RuntimeMismatch,
        RuntimeUnresponsive,
        ServecoreError,
        SteppedDown,
        StoreAccessDenied,
        StoreLocked,
        StoreUnresponsive,
        StoreUnwritable,
        StreamMismatch,
        UnpicklableResult,
    )
    from servecore._core.invariants import validate_state
    from servecore._core.limits import (
        Limits,
    )
    from servecore._core.transitions import (
        EARLY_DEATH_S,
        MAX_START_FAILURES,
        AutoscaleState,
        AutoscalingConfig,
        Backend,
        BackendConfig,
        BackendRoute,
        BackendStatus,
        Changes,
        Command,
        CreateBackend,
        CreateEndpoint,
        DeleteBackend,
        DeleteEndpoint,
        Effect,
        Endpoint,
        Event,
        LoadObservation,
        LoadReport,
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
        ScaleDirection,
        ScaleProposal,
        SetBackendConfig,
        SetShadowTraffic,
        SetTraffic,
        StartReplica,
        State,
        StopReplica,
        Transition,
        UpdateBackend,
        UpdateEndpoint,
        UpdateRouter,
        step,
    )
    from servecore._multiplex import multiplexed
    from servecore._serving.asyncio_client import AsyncioClient, open_asyncio_client
    from servecore._serving.connect import Client, SyncClient, connect, open_client
    from servecore.app import App, AppFileError, Applied, apply, load_app
    from servecore.router import (
        Handle,
        Router,
    )
    from servecore.runtimes import (
        Query,
        Runtime,
    )
    from servecore.runtimes.toolkit import (
        BatchSizeError,
        batch,
    )
    from servecore.stores import (
        BlobAdapter,
        BlobStore,
        CallbackStore,
        FileStore,
        MemoryStore,
        SQLiteStore,
        Store,
    )
    from servecore.stores.postgres import (
        PostgresStore,
    )
    from servecore.web import Request, Response

#: The public names, by the module that defines them: the one table. ``__all__`` and
#: the lazy loader are derived from it; ``tests/ops/test_exports.py`` checks that the
#: ``TYPE_CHECKING`` block above (for type checkers) names the same.
_PUBLIC: dict[str, tuple[str, ...]] = {
    "servecore._controller.controller": (
        "Controller",
        "open_controller",
    ),
    "servecore._controller.read_state": (
        "load_state",
        "read_state",
    ),
    "servecore._controller.status": ("Status",),
    "servecore._controller.sync": (
        "SyncController",
        "SyncHandle",
        "start",
    ),
    "servecore._core.errors": (
        "BackendExists",
        "CallCycle",
        "CallDepthExceeded",
        "BackendInUse",
        "BackendNotFound",
        "BackendStartError",
        "BackpressureError",
        "CheckpointCorrupt",
        "CheckpointError",
        "CheckpointLocked",
        "CheckpointOutcomeUnknown",
        "CheckpointVersionError",
        "CommandError",
        "DeadlineExceeded",
        "EndpointExists",
        "EndpointNotFound",
        "InvalidCommand",
        "InvalidConfig",
        "InvalidRoute",
        "InvalidRuntime",
        "InvalidRuntimeOption",
        "InvalidTarget",
        "InvalidTraffic",
        "LeaseLost",
        "NoReplicaError",
        "RemoteError",
        "ReplicaDiedError",
        "ReplicasUnreachable",
        "RouteConflict",
        "RuntimeDirectoryLocked",
        "RuntimeDirectoryStoreMismatch",
        "RuntimeDirectoryUnsafe",
        "RuntimeFenced",
        "RuntimeMismatch",
        "RuntimeUnresponsive",
        "ServecoreError",
        "StoreAccessDenied",
        "StoreUnresponsive",
        "StoreLocked",
        "StoreUnwritable",
        "StreamMismatch",
        "ControllerClosed",
        "SteppedDown",
        "ResultDecodeError",
        "UnpicklableResult",
    ),
    "servecore._core.invariants": ("validate_state",),
    "servecore._serving.connect": ("Client", "SyncClient", "connect", "open_client"),
    "servecore._serving.asyncio_client": ("AsyncioClient", "open_asyncio_client"),
    "servecore._calls": (
        "NotInReplica",
        "ReplicaHandle",
        "get_handle",
        "get_multiplexed_model_id",
        "time_remaining",
    ),
    "servecore._multiplex": ("multiplexed",),
    "servecore._core.limits": ("Limits",),
    "servecore._core.transitions": (
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
        "step",
    ),
    "servecore.app": (
        "App",
        "AppFileError",
        "Applied",
        "apply",
        "load_app",
    ),
    "servecore.router": (
        "Handle",
        "Router",
    ),
    "servecore.runtimes": (
        "Query",
        "Runtime",
    ),
    "servecore.runtimes.toolkit": (
        "BatchSizeError",
        "batch",
    ),
    "servecore.stores": (
        "BlobAdapter",
        "BlobStore",
        "CallbackStore",
        "FileStore",
        "MemoryStore",
        "SQLiteStore",
        "Store",
    ),
    "servecore.stores.postgres": ("PostgresStore",),
    "servecore.web": ("Request", "Response"),
}

_LAZY: dict[str, str] = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'servecore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
