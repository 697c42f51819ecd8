"""The layering rule, read from the source tree: no list of modules to keep in step.

The core (``servecore/_core/``) is pure: it imports no I/O, no clock, no randomness and
nothing of servecore outside itself. The layers above it import downwards only: stores
and runtimes know nothing of the controller, the router or the operations layer, and
nothing in the library imports the crash kit.
"""

from __future__ import annotations

import ast
from pathlib import Path

import servecore

SRC = Path(servecore.__file__).parent

# Modules the pure core may never import: I/O, clocks, randomness, threads, processes.
IMPURE = {
    "trio", "time", "random", "os", "socket", "threading", "subprocess", "asyncio",
    "select", "signal", "shutil", "tempfile", "pathlib", "io", "sqlite3", "datetime",
    "uuid", "secrets", "multiprocessing", "concurrent", "logging", "psutil",
}  # fmt: skip


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _modules(package: str) -> list[Path]:
    modules = sorted((SRC / package).rglob("*.py"))
    assert modules, f"no modules under servecore/{package}"
    return modules


def test_every_module_of_the_core_is_pure() -> None:
    for path in _modules("_core"):
        for name in _imports(path):
            top = name.split(".")[0]
            where = path.relative_to(SRC)
            assert top not in IMPURE, f"{where} imports {name}: the core does no I/O"
            if top == "servecore":
                assert name.startswith(("servecore._core", "servecore._text")), (
                    f"{where} imports {name}: the core imports nothing of the shell"
                )


def test_the_text_helpers_depend_on_nothing() -> None:
    """Replica processes import ``servecore._text`` before anything else of servecore."""
    for name in _imports(SRC / "_text.py"):
        assert not name.startswith("servecore"), name


def _layer_imports(package: str) -> set[str]:
    names: set[str] = set()
    for path in _modules(package):
        names |= {n for n in _imports(path) if n.startswith("servecore.")}
    return names


def test_stores_and_runtimes_know_nothing_of_the_layers_above() -> None:
    above = (
        "servecore._controller", "servecore.router", "servecore.http", "servecore._serving",
        "servecore.cli", "servecore.app", "servecore.metrics", "servecore.testing",
    )  # fmt: skip
    for package in ("stores", "runtimes"):
        for name in _layer_imports(package):
            assert not name.startswith(above), f"servecore.{package} imports {name}"
    for name in _layer_imports("stores"):
        assert not name.startswith("servecore.runtimes"), name


def test_the_controller_does_not_import_the_operations_layer_at_import_time() -> None:
    """The controller may *offer* ``serve_http`` and ``apply`` (imported when called),
    but importing it never loads the CLI, the app file, metrics or the kit."""
    for path in _modules("_controller"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(
                    ("servecore.cli", "servecore.app", "servecore.http", "servecore.testing")
                ), f"{path.relative_to(SRC)} imports {node.module}"


def test_nothing_in_the_library_imports_the_crash_kit() -> None:
    for path in SRC.rglob("*.py"):
        if "testing" in path.relative_to(SRC).parts:
            continue
        for name in _imports(path):
            assert not name.startswith("servecore.testing"), f"{path} imports {name}"
