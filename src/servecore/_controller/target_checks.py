"""Refusing, before anything is saved, a target the runtime will never serve.

The controller never imports user code itself (a replica does, wherever it runs), but
a target whose module the host has already imported can be inspected: a generator on
a runtime that cannot stream, an async target on one that calls targets
synchronously, a batching generator. Those are :class:`~servecore.InvalidTarget` at
once, instead of a replica that fails to start.
"""

from __future__ import annotations

import sys
from typing import Any

from servecore._core.errors import InvalidTarget
from servecore.runtimes import toolkit

__all__ = ["refuse_unservable_target"]


def _loaded_target(path: str) -> Any:
    """The object ``path`` names if its module is already imported, else ``None``: the
    controller never imports user code itself (a replica does, wherever it runs)."""
    module_name, _, attribute = path.partition(":")
    found: Any = sys.modules.get(module_name)
    for part in attribute.split("."):
        if found is None:
            return None
        found = getattr(found, part, None)
    return found


def refuse_unservable_target(backend: str, target: str, runtime: object) -> None:
    """Refuse, before anything is saved, a target the controller can already tell will
    never start: a generator (a stream) on a runtime that does not declare
    ``supports_streaming``, a ``@servecore.batch`` generator, or an async target on a
    runtime that does not declare ``supports_async_targets``.

    Only a target whose module the host has imported is inspected (passing the class
    or function itself always is); any other is checked by the replica as it starts.
    """
    found = _loaded_target(target)
    if found is None:
        return
    if toolkit.is_stream(found):
        if not getattr(runtime, "supports_streaming", False):
            name = type(runtime).__name__
            raise InvalidTarget(
                target,
                f"it is a generator, which streams its answer, and streaming is not yet "
                f"supported on the runtime {name}",
                backend=backend,
                fix="serve it with the 'threads' or 'subprocess' runtime, or return the "
                "whole result (a list, say)",
            )
        if toolkit.is_batch(found):
            raise InvalidTarget(
                target,
                "it is both @servecore.batch and a generator, and a batch has one answer per query",
                backend=backend,
                fix="drop @servecore.batch to stream, or return a list to batch",
            )
        return
    if toolkit.is_async(found) and not getattr(runtime, "supports_async_targets", False):
        name = type(runtime).__name__
        raise InvalidTarget(
            target,
            f"it is async, and the runtime {name} calls targets synchronously",
            backend=backend,
            fix="serve it with the 'threads' or 'subprocess' runtime, or define it with "
            "plain 'def'",
        )
