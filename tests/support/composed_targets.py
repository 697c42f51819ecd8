"""Targets that call other endpoints (tests/serving/test_composition.py)."""

from __future__ import annotations

from typing import Any

import servecore


def inner(x: Any) -> str:
    return f"inner({x})"


def outer(x: Any) -> str:
    return f"outer({servecore.get_handle('inner').call(x)})"


async def outer_async(x: Any) -> str:
    return f"outer_async({await servecore.get_handle('inner').call_async(x)})"


def ping(x: Any) -> Any:
    """Calls ``pong``, which calls ``ping`` again: a cycle."""
    return servecore.get_handle("pong").call(x)


def pong(x: Any) -> Any:
    return servecore.get_handle("ping").call(x)


def chain(n: int) -> int:
    """Endpoint ``chain{n}`` calls ``chain{n+1}`` ... down to one that answers."""
    if n <= 0:
        return 0
    return 1 + servecore.get_handle(f"chain{n - 1}").call(n - 1)


def where() -> str:
    return "nowhere"
