"""Queries to a replica actor, the same from the controller and from any other process.

:class:`ActorCalls` is the caller's half of the actor protocol (``actor.py``): one
batch is one ``run()`` call, whose pickled results are decoded here on the trio thread
(:func:`batch_results`); an async target's call carries a request id that a caller
who gives up cancels through ``cancel()``; a stream is opened with ``stream_open()``
and pulled with ``stream_next()``, with credit given back by ``stream_credit()``
(see :meth:`ActorCalls.stream`). The controller's :class:`RayRuntime` and a client's
:class:`~servecore.runtimes.ray.client.RayReplicaClient` both send through it, so a
query answers alike from everywhere.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray.exceptions
import trio

from servecore._core.errors import ReplicaDiedError, ResultDecodeError, StreamMismatch
from servecore.runtimes._protocol import Query
from servecore.runtimes._remote_errors import decode_reply
from servecore.runtimes._streams import ItemStream
from servecore.runtimes.ray.errors import short, user_error
from servecore.runtimes.ray.results import Results

__all__ = ["DEADLINES_SINCE", "STREAMS_SINCE", "ActorCalls", "batch_results", "ray_error"]

#: The first actor protocol that streams (``stream_open`` and the rest).
STREAMS_SINCE = 4
#: The first actor protocol whose ``run()`` takes the queries' deadlines.
DEADLINES_SINCE = 5
#: How long one ``stream_next()`` waits in the replica for an item before it answers
#: with none (so that a stream waiting on a slow generator holds a thread of the
#: actor's stream group for at most this long at a time).
NEXT_WAIT_S = 2.0


def ray_error(tag: str, value: BaseException) -> BaseException:
    """What a caller raises for the Ray error a call of replica ``tag`` failed with."""
    if isinstance(value, ray.exceptions.RayTaskError):
        return user_error(tag, value)
    if isinstance(value, ray.exceptions.RayActorError):
        return ReplicaDiedError(tag, short(value))
    if isinstance(value, ray.exceptions.RaySystemError):
        # Ray could not deserialize the reply here (a class this process cannot
        # import, a rebuild that raises): the replica's answer, not ours.
        return ResultDecodeError(tag, "<unknown>", short(value), runtime="ray")
    return value


def batch_results(tag: str, value: Any, protocol: int | None) -> list[Any]:
    """The results of one ``run()`` of replica ``tag`` (speaking actor ``protocol``;
    ``None``: not asked) from what Ray returned: pickled results, decoded here on the
    trio thread so that whatever unpickling raises (even ``SystemExit``) is a
    :class:`~servecore.ResultDecodeError` for this call alone; or the error raised."""
    if isinstance(value, bytes):
        result: list[Any] = decode_reply(value, tag, "ray")
        return result
    if isinstance(value, BaseException):
        raise ray_error(tag, value)
    if isinstance(value, list) and (protocol is None or protocol < 2):
        # An actor of an earlier servecore sends the list itself, decoded by Ray (one
        # found by a call was never asked its protocol).
        return value
    cls = type(value)
    raise ResultDecodeError(
        tag,
        f"{cls.__module__}.{cls.__qualname__}",
        f"a replica speaking actor protocol {protocol} sent it in place of its pickled results",
        runtime="ray",
    )


class ActorCalls:
    """Sends queries to replica actors and awaits them on one trio loop (``results``)."""

    def __init__(self, results: Results) -> None:
        self.results = results

    async def run(
        self, tag: str, handle: Any, info: Mapping[str, Any], batch: Sequence[Query]
    ) -> list[Any]:
        """Run ``batch`` on the actor ``handle`` of replica ``tag``, whose ``ready()``
        said ``info`` (empty: not asked).

        The queries' deadlines go along to an actor that takes them (protocol
        :data:`DEADLINES_SINCE` and later); an older one, or one never asked its
        protocol, gets the call without them and runs the queries as before.
        """
        pairs = [(q.args, q.kwargs) for q in batch]
        protocol = info.get("protocol") if info else None
        protocol = protocol if isinstance(protocol, int) else None
        deadlines: list[float | None] | None = None
        if protocol is not None and protocol >= DEADLINES_SINCE:
            deadlines = [q.deadline for q in batch]
            if all(d is None for d in deadlines):
                deadlines = None
        if info.get("async"):
            value = await self._run_async(handle, pairs, deadlines)
        elif deadlines is not None:
            value = await self.results.wait(handle.run.remote(pairs, None, deadlines))
        else:
            value = await self.results.wait(handle.run.remote(pairs))
        return batch_results(tag, value, protocol)

    async def _run_async(
        self, handle: Any, pairs: list[Any], deadlines: list[float | None] | None
    ) -> Any:
        """A call of an async target: one whose caller gives up cancels its task in the
        replica (``cancel(request_id)``, on the actor's control threads)."""
        request_id = uuid.uuid4().hex
        if deadlines is None:
            ref = handle.run.remote(pairs, request_id)
        else:
            ref = handle.run.remote(pairs, request_id, deadlines)
        try:
            return await self.results.wait(ref)
        except trio.Cancelled:
            with contextlib.suppress(Exception):  # only sends the request
                handle.cancel.remote(request_id)
            raise

    async def stream(
        self,
        tag: str,
        handle: Any,
        info: Mapping[str, Any],
        query: Query,
        window: int,
        nursery: trio.Nursery,
        on_end: Callable[[], object] | None = None,
    ) -> ItemStream:
        """Open a stream of the generator target of replica ``tag``; its items are
        pulled in ``nursery`` until it ends or its consumer closes it.

        Credit, as on the subprocess wire: the replica produces at most ``window``
        items ahead of the consumer; each ``stream_next()`` takes what it produced
        (waiting up to :data:`NEXT_WAIT_S` for one), and credit goes back
        (``stream_credit()``, half a window at a time) only as the consumer takes
        items, so neither side buffers more than the window. A consumer that leaves
        sends ``stream_cancel()``, which stops the generator. An actor that dies ends
        the stream with :class:`~servecore.ReplicaDiedError` after the items already
        pulled. ``on_end`` is called once the stream is over, whichever way.
        """
        protocol = info.get("protocol")
        if info and (not isinstance(protocol, int) or protocol < STREAMS_SINCE):
            raise StreamMismatch(
                f"{tag} (a replica of an earlier servecore, actor protocol {protocol})",
                streams=False,
            )
        request_id = uuid.uuid4().hex
        ref = handle.stream_open.remote(query.args, query.kwargs, request_id, window)
        try:
            opened = await self.results.wait(ref)
        except trio.Cancelled:
            with contextlib.suppress(Exception):  # only sends the request
                handle.stream_cancel.remote(request_id)
            raise
        if isinstance(opened, BaseException):
            raise ray_error(tag, opened)
        scope = trio.CancelScope()

        def grant(n: int) -> None:
            with contextlib.suppress(Exception):  # a dead actor ends the stream anyway
                handle.stream_credit.remote(request_id, n)

        def cancel() -> None:
            scope.cancel()
            with contextlib.suppress(Exception):
                handle.stream_cancel.remote(request_id)

        items = ItemStream(tag=tag, grant=grant, cancel=cancel, grant_every=max(1, window // 2))
        nursery.start_soon(self._pump, tag, handle, request_id, items, scope, on_end)
        return items

    async def _pump(
        self,
        tag: str,
        handle: Any,
        request_id: str,
        items: ItemStream,
        scope: trio.CancelScope,
        on_end: Callable[[], object] | None,
    ) -> None:
        """Pull the items of stream ``request_id`` into ``items`` until it ends."""
        try:
            with scope:
                while not items.ended:
                    value = await self.results.wait(
                        handle.stream_next.remote(request_id, NEXT_WAIT_S)
                    )
                    if isinstance(value, BaseException):
                        items.end(ray_error(tag, value))
                        return
                    blobs, done = value
                    for blob in blobs:
                        try:
                            items.push(decode_reply(blob, tag, "ray"))
                        except ResultDecodeError as exc:
                            items.end(exc)
                            with contextlib.suppress(Exception):
                                handle.stream_cancel.remote(request_id)
                            return
                    if done:
                        items.end()
                        return
        finally:
            if on_end is not None:
                on_end()
