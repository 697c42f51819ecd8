"""Trivial targets for the benchmarks, importable by path as ``bench_targets:...``.

``bench_router.py`` puts this directory on ``PYTHONPATH`` so that out-of-process
runtimes (their children inherit the environment) can import them too.
"""

from __future__ import annotations

import time
from typing import Any

from servecore.runtimes.toolkit import batch


def echo(value: Any) -> Any:
    """Return the argument: the cheapest possible query."""
    return value


@batch
def echo_batch(values: list[Any]) -> list[Any]:
    """Return the batch as is: the cheapest possible batched query."""
    return values


#: What one call of the "model" below costs, whatever the batch size (think: a kernel
#: launch on an accelerator); batching shares it between the queries of a batch.
FIXED_COST_S = 0.0002


def model(value: Any) -> Any:
    """A query with a fixed cost per call."""
    time.sleep(FIXED_COST_S)
    return value


@batch
def model_batch(values: list[Any]) -> list[Any]:
    """The same, batch-capable: one fixed cost per batch."""
    time.sleep(FIXED_COST_S)
    return values


#: The service time of :func:`service`: one replica answers ``1 / SERVICE_S`` queries
#: per second, one at a time (the autoscaling benchmark's "model").
SERVICE_S = 0.02


def service(value: Any) -> Any:
    """A query with a fixed service time."""
    time.sleep(SERVICE_S)
    return value


#: How long one query of :func:`async_wait` awaits (think: a call to another service).
ASYNC_WAIT_S = 0.01


async def async_wait(value: Any) -> Any:
    """An async target that awaits ``ASYNC_WAIT_S`` and returns its argument."""
    import asyncio

    await asyncio.sleep(ASYNC_WAIT_S)
    return value
