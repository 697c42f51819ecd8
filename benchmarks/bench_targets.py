"""Trivial targets for the benchmarks, importable by path as ``bench_targets:...``.

``bench_router.py`` puts this directory on ``PYTHONPATH`` so that out-of-process
runtimes (their children inherit the environment) can import them too.
"""

from __future__ import annotations

from typing import Any

from servecore._batch import batch


def echo(value: Any) -> Any:
    """Return the argument: the cheapest possible query."""
    return value


@batch
def echo_batch(values: list[Any]) -> list[Any]:
    """Return the batch as is: the cheapest possible batched query."""
    return values
