"""A client-side runtime for Ray: queries straight to replica actors from another process.

:class:`RayReplicaClient` is what the :class:`~servecore.router.Router` of a
``servecore.connect`` client sends through when the controller runs replicas on Ray.
It joins the Ray cluster (as a driver of its own, in the controller's namespace),
finds each replica's actor by its name (the replica's tag, as the controller's
:class:`~servecore.runtimes.ray.RayRuntime` names them), asks it once what it is
(``ready()``, on the actor's control threads, so never behind a query), and calls it
with the controller's own protocol (:class:`~servecore.runtimes.ray.calls.ActorCalls`):
results are decoded the same way, async targets are cancelled the same way, streams
stream the same way. It has nothing that changes the world: starting and stopping
replicas stays the controller's.

A replica that cannot be found (no live actor of that name: stopped, dead, or not yet
made) or does not answer its ``ready()`` within ``call_timeout_s`` raises
:class:`~servecore.ReplicaDiedError` marked ``retry_safe`` -- the query never reached
it -- so the router sends the query to another. A replica that dies while it serves
raises a plain ``ReplicaDiedError``, and is forgotten: the next query looks the name
up again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import ray
import trio

from servecore._core.errors import ReplicaDiedError
from servecore._core.transitions import StartReplica
from servecore.runtimes._protocol import Query
from servecore.runtimes._streams import ItemStream
from servecore.runtimes.ray.calls import ActorCalls
from servecore.runtimes.ray.connection import connect, disconnect
from servecore.runtimes.ray.errors import short
from servecore.runtimes.ray.results import Results
from servecore.runtimes.toolkit import DEFAULT_STREAM_WINDOW

__all__ = ["RayReplicaClient"]

log = logging.getLogger("servecore.connect")

_T = TypeVar("_T")


def _not_begun(tag: str, why: str) -> ReplicaDiedError:
    error = ReplicaDiedError(tag, f"cannot reach it from this process ({why})")
    error.retry_safe = True  # type: ignore[attr-defined]
    return error


class _Known:
    """One replica actor this client has found: its handle and what ``ready()`` said."""

    __slots__ = ("handle", "info")

    def __init__(self, handle: Any, info: Mapping[str, Any]) -> None:
        self.handle = handle
        self.info = info


class RayReplicaClient:
    """Calls the Ray replica actors of namespace ``namespace`` from this process.

    ``address`` is the Ray cluster's (as :class:`~servecore.runtimes.ray.RayRuntime`
    takes it: ``None`` for Ray's default, ``"auto"``, ``"host:port"`` of the GCS, or
    ``"ray://..."``). ``call_timeout_s`` bounds each lookup of an actor. Open it in a
    nursery (:meth:`start`); it joins Ray then, and :meth:`close` leaves.
    """

    def __init__(
        self,
        namespace: str,
        address: str | None = None,
        *,
        call_timeout_s: float = 30.0,
        init_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.namespace = namespace
        self.address = address
        self.call_timeout_s = float(call_timeout_s)
        self.init_options = dict(init_options or {})
        self._known: dict[str, _Known] = {}
        self._finding: dict[str, trio.Lock] = {}
        self._calls: ActorCalls | None = None
        self._nursery: trio.Nursery | None = None
        self._connected = False

    def __repr__(self) -> str:
        return f"RayReplicaClient(namespace={self.namespace!r}, address={self.address!r})"

    async def start(self, nursery: trio.Nursery) -> None:
        """Join the Ray cluster (within ``call_timeout_s``); streams are pumped in
        ``nursery``."""
        self._nursery = nursery
        self._calls = ActorCalls(Results(trio.lowlevel.current_trio_token()))
        await self._blocking("ray.init", connect, self.address, self.namespace, self.init_options)
        self._connected = True

    def close(self) -> None:
        """Forget every actor and leave Ray (if this client joined it)."""
        self._known.clear()
        if self._calls is not None:
            self._calls.results.close()
        if self._connected:
            self._connected = False
            disconnect()

    @property
    def connected(self) -> frozenset[str]:
        """Tags of the replicas this client has found."""
        return frozenset(self._known)

    # -- the runtime's call ----------------------------------------------------------

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        """Run one batch on replica ``tag``; see the module doc for failures."""
        known = await self._find(tag)
        try:
            return await self._actor_calls().run(tag, known.handle, known.info, batch)
        except ReplicaDiedError:
            self._forget(tag, known)
            raise

    async def stream(
        self, tag: str, query: Query, window: int = DEFAULT_STREAM_WINDOW
    ) -> ItemStream:
        """Open a stream of a generator target on replica ``tag`` (as the host does)."""
        known = await self._find(tag)
        assert self._nursery is not None
        try:
            return await self._actor_calls().stream(
                tag, known.handle, known.info, query, window, self._nursery
            )
        except ReplicaDiedError:
            self._forget(tag, known)
            raise

    def _actor_calls(self) -> ActorCalls:
        if self._calls is None:
            raise RuntimeError(f"{self!r} is not started")
        return self._calls

    def _forget(self, tag: str, known: _Known) -> None:
        if self._known.get(tag) is known:
            del self._known[tag]

    async def _find(self, tag: str) -> _Known:
        """The actor of replica ``tag``, looked up by name and asked ``ready()`` once."""
        known = self._known.get(tag)
        if known is not None:
            return known
        lock = self._finding.setdefault(tag, trio.Lock())
        async with lock:
            known = self._known.get(tag)
            if known is not None:
                return known

            def get() -> Any:
                try:
                    return ray.get_actor(tag, namespace=self.namespace)
                except ValueError:
                    return None

            try:
                handle = await self._blocking("ray.get_actor", get)
            except TimeoutError as exc:
                raise _not_begun(tag, str(exc)) from exc
            if handle is None:
                raise _not_begun(
                    tag, f"no live actor of that name in Ray namespace {self.namespace!r}"
                )
            info: Any = None
            with trio.move_on_after(self.call_timeout_s):
                info = await self._actor_calls().results.wait(handle.ready.remote())
            if info is None:
                raise _not_begun(tag, f"its ready() did not answer in {self.call_timeout_s}s")
            if isinstance(info, BaseException):
                raise _not_begun(tag, f"its ready() failed: {short(info)}")
            if not isinstance(info, Mapping):
                raise _not_begun(tag, f"its ready() answered {type(info).__name__}")
            known = self._known[tag] = _Known(handle, dict(info))
            self._finding.pop(tag, None)
            return known

    async def _blocking(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` on a worker thread, within ``call_timeout_s`` (``TimeoutError``
        past it; the thread is abandoned)."""
        with trio.move_on_after(self.call_timeout_s):
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
        raise TimeoutError(
            f"{what} did not return within {self.call_timeout_s}s (is the Ray cluster at "
            f"{self.address or 'the default address'} up? pass ray_address= to connect)"
        )

    # -- the rest of the Runtime protocol: the controller's business -----------------

    async def start_replica(self, effect: StartReplica) -> None:
        """Refused: replicas are started by the controller, never by a client."""
        raise RuntimeError(f"a client cannot start replica {effect.tag!r}; the controller does")

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        """Refused: replicas are stopped by the controller, never by a client."""
        raise RuntimeError(f"a client cannot stop replica {tag!r}; the controller does")

    async def list_replicas(self) -> frozenset[str]:
        """The replicas this client has found (it watches no actor)."""
        return self.connected
