"""Runtimes carry effects out: threads, subprocesses, Ray, or a third-party plugin.

Built-ins are looked up by name from dotted paths and imported only when used, so
``import servecore`` never imports Ray. Other names come from the entry-point group
``servecore.runtimes``, read lazily only when a name is not built in::

    # in a plugin's pyproject.toml
    [project.entry-points."servecore.runtimes"]
    k8s = "servecore_k8s:K8sRuntime"
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from servecore.runtimes._protocol import Query, Report, Runtime

__all__ = ["BUILTIN_RUNTIMES", "ENTRY_POINT_GROUP", "Query", "Report", "Runtime", "resolve_runtime"]

ENTRY_POINT_GROUP = "servecore.runtimes"

#: name -> (import path, the extra to install when the import fails)
BUILTIN_RUNTIMES: dict[str, tuple[str, str | None]] = {
    "threads": ("servecore.runtimes.threads:ThreadRuntime", None),
    "subprocess": ("servecore.runtimes.subprocess:SubprocessRuntime", None),
    "ray": ("servecore.runtimes.ray:RayRuntime", "ray"),
}


def _load(path: str, name: str, extra: str | None) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"; install it with: pip install 'servecore[{extra}]'" if extra else ""
        raise ImportError(f"runtime {name!r} needs {exc.name or module_name}{hint}") from exc
    return getattr(module, attr)


def resolve_runtime(runtime: str | Runtime, **options: Any) -> Runtime:
    """Return a runtime instance: ``runtime`` itself, or a new one of the named kind.

    Names are built-ins first, then the entry-point group ``servecore.runtimes``.
    ``options`` go to the runtime's constructor.
    """
    if not isinstance(runtime, str):
        if options:
            raise TypeError("runtime options only apply when the runtime is given by name")
        return runtime
    if runtime in BUILTIN_RUNTIMES:
        path, extra = BUILTIN_RUNTIMES[runtime]
        factory = _load(path, runtime, extra)
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == runtime]
        if not found:
            plugins = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
            raise LookupError(
                f"no runtime named {runtime!r}: built-ins are {sorted(BUILTIN_RUNTIMES)}, "
                f"installed plugins {plugins or 'none'}; plugins register under the "
                f"entry-point group {ENTRY_POINT_GROUP!r}"
            )
        factory = found[0].load()
    instance: Runtime = factory(**options)
    return instance
