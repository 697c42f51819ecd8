"""Multiplexed targets (docs/design.md §5, "Model multiplexing"): each says which
replica object answered, for which model id, and how often it loaded each model."""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
from collections.abc import Iterator
from typing import Any

import servecore

_objects = itertools.count()


class Models:
    """Keeps two models loaded; a model is the string ``"model-ID"``."""

    def __init__(self) -> None:
        self.replica = f"{os.getpid()}-{next(_objects)}"
        self.loads: collections.Counter[str] = collections.Counter()

    @servecore.multiplexed(max_num_models_per_replica=2)
    def get_model(self, model_id: str) -> str:
        self.loads[model_id] += 1
        return f"model-{model_id}"

    def __call__(self, value: Any = None) -> dict[str, Any]:
        model_id = servecore.get_multiplexed_model_id()
        model = self.get_model(model_id) if model_id else None
        return {"replica": self.replica, "id": model_id, "model": model, "loads": dict(self.loads)}


class AsyncModels(Models):
    """:class:`Models` with a slow async loader (concurrent queries share one load)."""

    @servecore.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:  # type: ignore[override]
        self.loads[model_id] += 1
        await asyncio.sleep(0.2)  # long enough for the other queries to arrive meanwhile
        return f"model-{model_id}"

    async def __call__(self, value: Any = None) -> dict[str, Any]:  # type: ignore[override]
        model_id = servecore.get_multiplexed_model_id()
        model = await self.get_model(model_id) if model_id else None
        return {"replica": self.replica, "id": model_id, "model": model, "loads": dict(self.loads)}


def model_ids(n: int = 2) -> Iterator[str]:
    """A stream: the model id it was asked for, ``n`` times."""
    for _ in range(n):
        yield servecore.get_multiplexed_model_id()
