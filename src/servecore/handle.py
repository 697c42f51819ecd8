"""The handle: what callers hold to query one endpoint through a :class:`Router`.

``ctl.get_handle(endpoint)`` returns a :class:`Handle`; ``call`` awaits one query on
trio, ``stream`` iterates a generator target's items, ``call_blocking`` is the host
thread's way in (what :class:`~servecore.SyncHandle` uses), and ``options`` gives a
copy with a timeout or a multiplexed model. The routing itself -- choosing a replica,
queueing, batching, resending -- is the router's (``servecore.router``).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from servecore._calls import MODEL_KEY
from servecore.router_streams import HandleStream
from servecore.runtimes._protocol import Query

if TYPE_CHECKING:
    from servecore.router import Router

__all__ = ["Handle"]


class Handle:
    """Sends queries to one endpoint: ``await ctl.get_handle("echo").call("hi")``.

    ``call(*args, **kwargs)`` passes every argument to the target untouched, so handle
    options never clash with user keywords; set them with :meth:`options`, which
    returns a new handle::

        fast = ctl.get_handle("echo").options(timeout_s=0.5)
        await fast.call("hi")   # raises TimeoutError after 0.5 s in all

    A user exception is raised as itself; a dead replica gives
    :class:`~servecore.ReplicaDiedError`; no traffic or no running replica gives
    :class:`~servecore.NoReplicaError` at once; a full queue gives
    :class:`~servecore.BackpressureError`.
    """

    __slots__ = ("_router", "endpoint", "multiplexed_model_id", "timeout_s")

    def __init__(
        self,
        router: Router,
        endpoint: str,
        *,
        timeout_s: float | None = None,
        multiplexed_model_id: str = "",
    ) -> None:
        if timeout_s is not None and (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, (int, float))
            or math.isnan(timeout_s)
            or timeout_s < 0
        ):
            raise ValueError(f"timeout_s={timeout_s!r} must be None or a number of seconds >= 0")
        if not isinstance(multiplexed_model_id, str):
            raise ValueError(
                f"multiplexed_model_id={multiplexed_model_id!r} must be a string (a model "
                f'id; "" for none)'
            )
        self._router = router
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.multiplexed_model_id = multiplexed_model_id

    def options(
        self, *, timeout_s: float | None = None, multiplexed_model_id: str | None = None
    ) -> Handle:
        """A copy of this handle with ``timeout_s`` (None: wait as long as it takes)
        and, if given, ``multiplexed_model_id``: the model its queries are for (see
        :func:`servecore.multiplexed`; kept from this handle when not given)."""
        model = self.multiplexed_model_id if multiplexed_model_id is None else multiplexed_model_id
        return Handle(self._router, self.endpoint, timeout_s=timeout_s, multiplexed_model_id=model)

    @property
    def router(self) -> Router:
        """The router this handle sends through."""
        return self._router

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        """Run one query on the endpoint and return its result."""
        if self.multiplexed_model_id:
            kwargs[MODEL_KEY] = self.multiplexed_model_id
        timeout_s = self.timeout_s
        if timeout_s is None:
            return await self._router.call(self.endpoint, Query(args=args, kwargs=kwargs))
        query = Query(args=args, kwargs=kwargs, deadline=time.time() + timeout_s)
        return await self._router.call_timed(self.endpoint, query, timeout_s)

    def stream(self, *args: Any, **kwargs: Any) -> HandleStream:
        """Stream the items a generator target yields for one query (see
        :class:`HandleStream`)::

            async for token in handle.stream("once upon a time"):
                print(token, end="")

        A target that answers once raises :class:`~servecore.StreamMismatch`.
        """
        if self.multiplexed_model_id:
            kwargs[MODEL_KEY] = self.multiplexed_model_id
        return HandleStream(self, Query(args=args, kwargs=kwargs))

    def call_blocking(self, *args: Any, **kwargs: Any) -> Any:
        """Run one query from a host thread (not the trio thread), blocking for the result.

        Thread-safe; what :class:`~servecore.SyncHandle` uses.
        """
        if self.multiplexed_model_id:
            kwargs[MODEL_KEY] = self.multiplexed_model_id
        timeout_s = self.timeout_s
        deadline = None if timeout_s is None else time.time() + timeout_s
        query = Query(args=args, kwargs=kwargs, deadline=deadline)
        return self._router.call_blocking(self.endpoint, query, timeout_s)

    def __repr__(self) -> str:
        model = self.multiplexed_model_id
        more = f", multiplexed_model_id={model!r}" if model else ""
        return f"Handle(endpoint={self.endpoint!r}, timeout_s={self.timeout_s!r}{more})"
