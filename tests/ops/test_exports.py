"""The public surface, pinned (the layering rule is in tests/core/test_layering.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import servecore
import servecore.testing

SRC = Path(servecore.__file__).parent

PUBLIC = set(servecore.__all__)


def _type_checking_names() -> set[str]:
    """The names the ``TYPE_CHECKING`` block of ``servecore/__init__.py`` imports."""
    tree = ast.parse((SRC / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return {
                alias.asname or alias.name
                for stmt in node.body
                if isinstance(stmt, ast.ImportFrom)
                for alias in stmt.names
            }
    raise AssertionError("servecore/__init__.py has no TYPE_CHECKING block")


def test_the_type_checking_block_names_exactly_the_public_table() -> None:
    """Type checkers read the ``TYPE_CHECKING`` imports; the lazy loader and ``__all__``
    read the table. A name added to one and not the other fails here."""
    assert _type_checking_names() == PUBLIC


def test_the_public_api_keeps_its_core_names() -> None:
    """Renaming or dropping one of these breaks users: it must be a decision."""
    kept = {
        "open_controller", "start", "Controller", "SyncController", "SyncHandle", "step",
        "State", "BackendConfig", "Handle", "Router", "ServecoreError", "CommandError",
        "CheckpointError", "MemoryStore", "FileStore", "SQLiteStore", "PostgresStore",
        "apply", "load_app", "Status", "validate_state", "batch", "Limits",
    }  # fmt: skip
    assert kept <= PUBLIC, kept - PUBLIC


def test_public_names_are_exported_and_documented() -> None:
    for name in servecore.__all__:
        obj = getattr(servecore, name)
        if callable(obj) and not isinstance(obj, int):
            assert getattr(obj, "__doc__", None), f"servecore.{name} has no docstring"


def test_every_public_controller_method_has_its_sync_twin() -> None:
    """``servecore.start`` offers the same API to synchronous hosts: a method added to
    :class:`~servecore.Controller` and forgotten in :class:`~servecore.SyncController`
    fails here."""
    public = {n for n in dir(servecore.Controller) if not n.startswith("_")}
    twins = {n for n in dir(servecore.SyncController) if not n.startswith("_")}
    assert public - twins == set(), f"SyncController lacks {sorted(public - twins)}"


def test_testing_kit_names_resolve() -> None:
    for name in servecore.testing.__all__:
        assert getattr(servecore.testing, name) is not None


def test_errors_form_two_families() -> None:
    command_errors = {
        "EndpointExists", "EndpointNotFound", "RouteConflict", "InvalidRoute",
        "BackendExists", "BackendNotFound", "BackendInUse", "InvalidTraffic",
        "InvalidConfig", "InvalidTarget", "InvalidCommand", "RuntimeMismatch",

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
