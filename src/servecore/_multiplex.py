"""Model multiplexing: many models served by one backend, a few loaded per replica
(docs/design.md §5, "Model multiplexing"), as Ray Serve's ``@serve.multiplexed``.

Standard library only: replica processes import it through user code.

A caller names the model a query is for (``handle.options(multiplexed_model_id="m")``,
or the HTTP header ``serve_multiplexed_model_id``); the router sends it, when it can,
to a replica that served that model recently (so has it loaded); user code reads the
id with :func:`servecore.get_multiplexed_model_id` and gets the model from a loader
marked :func:`multiplexed`, which keeps the last ``max_num_models_per_replica`` models
it loaded, per replica object, and loads the others (evicting the least recently used).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["multiplexed"]

F = TypeVar("F", bound=Callable[..., Any])

#: Ray Serve's default for ``max_num_models_per_replica``.
DEFAULT_MODELS_PER_REPLICA = 3


class _Models:
    """The models one loader holds for one owner (a replica object, or none for a
    function), least recently used first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.models: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.lock = threading.Lock()
        #: (async loaders) loads under way, shared by the queries waiting for them
        self.loading: dict[str, asyncio.Future[Any]] = {}

    def get(self, model_id: str) -> tuple[bool, Any]:
        with self.lock:
            if model_id in self.models:
                self.models.move_to_end(model_id)
                return True, self.models[model_id]
        return False, None

    def put(self, model_id: str, model: Any) -> None:
        with self.lock:
            self.models[model_id] = model
            self.models.move_to_end(model_id)
            while len(self.models) > self.limit:
                self.models.popitem(last=False)  # dropped: the least recently used


def multiplexed(
    func: F | None = None, *, max_num_models_per_replica: int = DEFAULT_MODELS_PER_REPLICA
) -> Any:
    """Mark a model loader (``def`` or ``async def``, a method or a function, taking
    the model id) so that each replica keeps the models it loaded, up to
    ``max_num_models_per_replica``, dropping the least recently used::

        class Models:
            @servecore.multiplexed(max_num_models_per_replica=2)
            async def get_model(self, model_id: str):
                return await load(model_id)

            async def __call__(self, text):
                model = await self.get_model(servecore.get_multiplexed_model_id())
                return model(text)

    Concurrent queries for a model being loaded by an async loader wait for that one
    load (a cancelled query does not cancel it); a load that fails is not kept. A
    dropped model is only released (its ``__del__`` runs when nothing else holds it).
    """
    if (
        isinstance(max_num_models_per_replica, bool)
        or not isinstance(max_num_models_per_replica, int)
        or max_num_models_per_replica < 1
    ):
        raise ValueError(
            f"max_num_models_per_replica={max_num_models_per_replica!r} must be an "
            f"integer >= 1 (how many models each replica keeps loaded)"
        )
    limit = max_num_models_per_replica

    def mark(loader: F) -> F:
        if not callable(loader):
            raise TypeError(f"@servecore.multiplexed marks a model loader; got {loader!r}")
        owners: weakref.WeakKeyDictionary[Any, _Models] = weakref.WeakKeyDictionary()
        pinned: dict[int, _Models] = {}  # owners that take no weak reference
        lock = threading.Lock()
        name = getattr(loader, "__qualname__", repr(loader))

        def models_of(args: tuple[Any, ...]) -> tuple[_Models, str]:
            if len(args) not in (1, 2):
                raise TypeError(
                    f"{name} is a @servecore.multiplexed loader: call it with the model id "
                    f"only (a method: self.{getattr(loader, '__name__', 'load')}(model_id))"
                )
            model_id = args[-1]
            if not isinstance(model_id, str) or not model_id:
                raise ValueError(
                    f"{name} was asked for model id {model_id!r}; a model id is a non-empty "
                    f"string (send one with handle.options(multiplexed_model_id=...) or the "
                    f"HTTP header serve_multiplexed_model_id)"
                )
            owner = args[0] if len(args) == 2 else loader
            with lock:
                try:
                    found = owners.get(owner)
                    if found is None:
                        found = owners[owner] = _Models(limit)
                except TypeError:
                    found = pinned.setdefault(id(owner), _Models(limit))
            return found, model_id

        if inspect.iscoroutinefunction(loader):

            async def load_async(*args: Any) -> Any:
                models, model_id = models_of(args)
                hit, model = models.get(model_id)
                if hit:
                    return model
                pending = models.loading.get(model_id)
                if pending is None:
                    pending = asyncio.ensure_future(loader(*args))
                    models.loading[model_id] = pending

                    def loaded(done: asyncio.Future[Any]) -> None:
                        models.loading.pop(model_id, None)
                        if not done.cancelled() and done.exception() is None:
                            models.put(model_id, done.result())

                    pending.add_done_callback(loaded)
                return await asyncio.shield(pending)

            wrapped: Any = load_async
        else:

            def load_sync(*args: Any) -> Any:
                models, model_id = models_of(args)
                hit, model = models.get(model_id)
                if hit:
                    return model
                model = loader(*args)
                models.put(model_id, model)
                return model

            wrapped = load_sync
        return cast(F, functools.wraps(loader)(wrapped))

    return mark if func is None else mark(func)
