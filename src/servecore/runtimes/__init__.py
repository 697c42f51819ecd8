"""Runtimes carry effects out: threads, subprocesses, Ray, or a third-party plugin.

Built-ins are looked up by name from dotted paths and imported only when used, so
``import servecore`` never imports Ray. Other names come from the entry-point group
``servecore.runtimes``, read lazily only when a name is not built in::

    # in a plugin's pyproject.toml
    [project.entry-points."servecore.runtimes"]
    k8s = "servecore_k8s:K8sRuntime"

How to write one: ``docs/plugins.md``; the helpers every Python runtime shares are in
:mod:`servecore.runtimes.toolkit`.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from servecore._core.errors import InvalidRuntime, InvalidRuntimeOption
from servecore.runtimes._protocol import (
    OPTIONAL_METHODS,
    REQUIRED_METHODS,
    Introspection,
    Lifecycle,
    Query,
    ReplicaInfo,
    Report,
    Runtime,
)

__all__ = [
    "BUILTIN_RUNTIMES",
    "ENTRY_POINT_GROUP",
    "OPTIONAL_METHODS",
    "REQUIRED_METHODS",
    "Introspection",
    "Lifecycle",
    "Query",
    "ReplicaInfo",
    "Report",
    "Runtime",
    "check_runtime_methods",
    "close_runtime",
    "open_runtime",
    "resolve_runtime",
    "runtime_name",
]

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


def _accepted_keywords(factory: Callable[..., Any]) -> tuple[tuple[str, ...], bool]:
    """The keywords ``factory`` takes, and whether it takes any (``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: let it judge
        return (), True
    names = tuple(
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def resolve_runtime(runtime: str | Runtime, **kwargs: Any) -> Runtime:
    """Return a runtime instance: ``runtime`` itself, or a new one of the named kind.

    Names are built-ins first, then the entry-point group ``servecore.runtimes``.
    ``kwargs`` go to the runtime's constructor (``open_controller(runtime_kwargs=...)``);
    a keyword the constructor does not take raises
    :class:`~servecore.InvalidRuntimeOption` naming it and the accepted ones::

        resolve_runtime("subprocess", directory="/run/myapp")
    """
    if not isinstance(runtime, str):
        if kwargs:
            raise TypeError(
                f"runtime constructor keywords {sorted(kwargs)} only apply when the runtime "
                f"is given by name; {runtime!r} is already an instance, so configure it "
                f"when you construct it"
            )
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
    accepted, takes_any = _accepted_keywords(factory)
    bad = tuple(sorted(k for k in kwargs if k not in accepted))
    if bad and not takes_any:
        raise InvalidRuntimeOption(runtime, bad, accepted)
    instance: Runtime = factory(**kwargs)
    return instance


def runtime_name(runtime: str | object) -> str | None:
    """The name ``runtime`` is registered under: the name itself, or, for an instance,
    the built-in name of its exact class; ``None`` for any other instance (a wrapper, a
    test double, a plugin passed as an object), which a checkpoint then does not
    record. Imports nothing: a built-in whose module is not imported yet cannot be the
    class of an instance that exists."""
    if isinstance(runtime, str):
        return runtime
    for name, (path, _) in BUILTIN_RUNTIMES.items():
        module_name, _, attr = path.partition(":")
        module = sys.modules.get(module_name)
        if module is not None and type(runtime) is getattr(module, attr, None):
            return name
    return None


def check_runtime_methods(runtime: object) -> None:
    """Raise :class:`~servecore.InvalidRuntime` listing every required method
    ``runtime`` lacks (``open`` and ``close`` are optional, see :class:`Runtime`)."""
    missing = tuple(m for m in REQUIRED_METHODS if not callable(getattr(runtime, m, None)))
    if missing:
        raise InvalidRuntime(f"{type(runtime).__qualname__} object {runtime!r}", missing)


async def open_runtime(runtime: object, *, namespace: str, report: Report) -> None:
    """Call ``runtime.open(namespace=..., report=...)`` if the runtime has it."""
    opener = getattr(runtime, "open", None)
    if opener is not None:
        await opener(namespace=namespace, report=report)


async def close_runtime(runtime: object) -> None:
    """Call ``runtime.close()`` if the runtime has it."""
    closer = getattr(runtime, "close", None)
    if closer is not None:
        await closer()
