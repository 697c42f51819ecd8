"""Small module-level targets for tests and conformance checks.

They live in an importable module so every runtime (threads, a child process, a Ray
actor) can import them by path, e.g. ``"servecore.testing.targets:Echo"``.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from servecore.runtimes.toolkit import batch

__all__ = ["BatchEcho", "Counter", "Echo", "FailingInit", "Raiser", "echo", "echo_all"]

_instances = itertools.count()


def echo(*args: Any, **kwargs: Any) -> Any:
    """Return the single positional argument, or ``[args, kwargs]`` otherwise."""
    if len(args) == 1 and not kwargs:
        return args[0]
    return [list(args), kwargs]


class Echo:
    """Returns what it is given; ``identity()`` tells instances apart."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.instance = f"{os.getpid()}-{next(_instances)}"

    def __call__(self, value: Any = None) -> Any:
        if value == "__identity__":
            return self.instance
        return f"{self.prefix}{value}" if self.prefix else value


@batch
def echo_all(values: list[Any]) -> list[Any]:
    """A batch target: returns each value of the batch as it came."""
    return list(values)


class BatchEcho:
    """A batch-capable class: returns each value of the batch, with ``prefix``."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    @batch
    def __call__(self, values: list[Any]) -> list[Any]:
        return [f"{self.prefix}{v}" if self.prefix else v for v in values]


class Counter:
    """Counts its calls (state kept inside one replica)."""

    def __init__(self, *_args: Any) -> None:
        self.calls = 0

    def __call__(self, *_args: Any) -> int:
        self.calls += 1
        return self.calls


class FailingInit:
    """A constructor that always fails, with a recognisable message."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        raise ValueError("constructor failed on purpose")

    def __call__(self, *_args: Any) -> None:  # pragma: no cover - never constructed
        return None


class Raiser:
    """Raises ``KeyError(value)`` on every call."""

    def __call__(self, value: Any = None) -> Any:
        raise KeyError(value)
