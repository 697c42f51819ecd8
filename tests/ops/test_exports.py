"""The public surface, pinned (the layering rule is in tests/core/test_layering.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import servecore
import servecore.testing

SRC = Path(servecore.__file__).parent

PUBLIC = {
    # core values, commands, events, effects
    "State", "Transition", "Changes", "step", "validate_state", "MAX_START_FAILURES",
    "Endpoint", "Backend", "Replica", "BackendConfig", "BackendRoute", "RoutingTable",
    "ReplicaStatus", "BackendStatus", "Command", "Event", "Effect", "Message",
    "CreateEndpoint", "DeleteEndpoint", "CreateBackend", "DeleteBackend",
    "SetBackendConfig", "RetryBackend", "SetTraffic", "SetShadowTraffic",
    "ReplicaStarted", "ReplicaStartFailed", "ReplicaStopped", "ReplicaDied", "Recover",
    "Resync", "EARLY_DEATH_S",
    "StartReplica", "StopReplica", "UpdateRouter",
    "AutoscalingConfig", "AutoscaleState", "ScaleProposal", "ScaleDirection",
    "LoadObservation", "LoadReport",
    # shell
    "open_controller", "Controller", "start", "SyncController", "SyncHandle", "Limits",
    "Router", "Handle", "batch", "Query", "Runtime",
    "Store", "MemoryStore", "FileStore", "SQLiteStore", "CallbackStore",
    "BlobStore", "BlobAdapter", "PostgresStore",
    # errors
    "ServecoreError", "CommandError", "EndpointExists", "EndpointNotFound",
    "RouteConflict", "InvalidRoute", "BackendExists", "BackendNotFound", "BackendInUse",
    "InvalidTraffic", "InvalidConfig", "InvalidTarget", "InvalidCommand", "CheckpointError",
    "CheckpointCorrupt", "CheckpointVersionError", "StoreLocked", "BackendStartError",
    "ReplicaDiedError", "BackpressureError", "NoReplicaError", "BatchSizeError",
    "RemoteError", "RuntimeDirectoryLocked", "RuntimeDirectoryStoreMismatch",
    "RuntimeDirectoryUnsafe", "InvalidRuntimeOption", "InvalidRuntime", "LeaseLost",
    "ResultDecodeError", "UnpicklableResult", "ControllerClosed",
    # operating it
    "App", "AppFileError", "Applied", "apply", "load_app", "Status", "load_state", "read_state",
}  # fmt: skip


def test_public_names_are_exported_and_documented() -> None:
    assert set(servecore.__all__) == PUBLIC
    for name in servecore.__all__:
        obj = getattr(servecore, name)
        if callable(obj) and not isinstance(obj, int):
            assert getattr(obj, "__doc__", None), f"servecore.{name} has no docstring"


def test_testing_kit_names_resolve() -> None:
    for name in servecore.testing.__all__:
        assert getattr(servecore.testing, name) is not None


def test_errors_form_two_families() -> None:
    command_errors = {
        "EndpointExists", "EndpointNotFound", "RouteConflict", "InvalidRoute",
        "BackendExists", "BackendNotFound", "BackendInUse", "InvalidTraffic",
        "InvalidConfig", "InvalidTarget", "InvalidCommand",

        "AppFileError",
    }  # fmt: skip
    for name in PUBLIC:
        obj = getattr(servecore, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, servecore.ServecoreError), name
            is_command = issubclass(obj, servecore.CommandError)
            assert is_command == (name in command_errors | {"CommandError"}), name
    assert issubclass(servecore.CommandError, ValueError)


def test_importing_servecore_does_not_import_ray() -> None:
    code = "import sys, servecore, servecore.testing; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_servecore_imports_without_hypothesis_and_the_kit_names_its_extra() -> None:
    """A production install has no Hypothesis: ``import servecore`` (and a controller)
    works, and ``import servecore.testing`` says which extra to install."""
    code = (
        "import sys\n"
        "sys.modules['hypothesis'] = None  # as if not installed\n"
        "import servecore, servecore.runtimes.toolkit\n"
        "servecore.open_controller, servecore.MemoryStore\n"
        "try:\n"
        "    import servecore.testing\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'servecore[testing]'" in out.stdout, out


def test_the_plugin_toolkit_is_public_and_documented() -> None:
    import servecore.runtimes.toolkit as toolkit

    for name in toolkit.__all__:
        assert getattr(toolkit, name).__doc__ or name == "BATCH_MARKER", name
    assert toolkit.batch is servecore.batch and toolkit.is_batch(toolkit.batch(lambda x: x))


def test_importing_servecore_and_its_stores_does_not_import_psycopg() -> None:
    code = (
        "import sys, servecore, servecore.stores, servecore.testing; "
        "servecore.SQLiteStore; print('psycopg' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
