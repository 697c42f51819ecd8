"""Handles in an asyncio program (a FastAPI or aiohttp app, a notebook):
:func:`open_asyncio_client`, the asyncio twin of :func:`~servecore.open_client`.

The client itself (table feed, load reports, the router) is trio code, so it runs as a
*guest* of the program's asyncio loop, on the same thread
(``trio.lowlevel.start_guest_run``), as in an ingress worker: no second thread, no lock.
Queries take the ingress workers' path (:mod:`servecore._serving.asyncio_queries`): on
the subprocess runtime a query never enters trio in the common case but goes over this
loop's own connection to the replica; on the Ray runtime it runs on the client's router
as a task of the guest, whose result comes back in an asyncio future (cancelling the
asyncio side cancels it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import trio

from servecore._serving.asyncio_queries import AsyncioHandle, AsyncioQueries
from servecore._serving.connect import Client, open_client
from servecore._serving.remote_runtime import ReplicaClient
from servecore._serving.replica_links import ReplicaLinks
from servecore._store_choice import DEFAULT_STORE

__all__ = ["AsyncioClient", "TrioGuest", "client_in_guest", "open_asyncio_client"]

T = TypeVar("T")


class TrioGuest:
    """Runs trio functions from asyncio, with trio a guest of the same loop and thread.

    :meth:`run` starts ``afn`` as a trio task and awaits its result in an asyncio
    future; cancelling the asyncio side cancels the trio task.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken, nursery: Any
    ) -> None:
        self._loop = loop
        self._token = token
        self._nursery = nursery

    async def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await afn(*args)`` on trio, from asyncio."""
        future: asyncio.Future[T] = self._loop.create_future()
        scope = trio.CancelScope()

        async def task() -> None:
            # Trio tasks of a guest run on the host loop's thread: the future may be
            # completed directly.
            try:
                with scope:
                    result = await afn(*args)
                    if not future.done():
                        future.set_result(result)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            finally:
                if not future.done():
                    future.cancel()

        self._token.run_sync_soon(self._nursery.start_soon, task)
        try:
            return await future
        except asyncio.CancelledError:
            self._token.run_sync_soon(scope.cancel)
            raise

    def run_soon(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` on trio soon (from any thread)."""
        self._token.run_sync_soon(fn)


@contextlib.asynccontextmanager
async def client_in_guest(
    store: Any, options: dict[str, Any]
) -> AsyncIterator[tuple[Client, TrioGuest]]:
    """``open_client(store, **options)`` run by trio as a guest of the running asyncio
    loop; yields the client once its first table has arrived, and the guest to run
    trio functions with. Leaving closes the client and waits for trio to finish."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[tuple[Client, TrioGuest]] = loop.create_future()
    finished: asyncio.Future[None] = loop.create_future()
    release = trio.Event()

    async def trio_main() -> None:
        async with open_client(store, **options) as client, trio.open_nursery() as nursery:
            guest = TrioGuest(loop, trio.lowlevel.current_trio_token(), nursery)
            started.set_result((client, guest))
            await release.wait()
            nursery.cancel_scope.cancel()

    def done(outcome: Any) -> None:
        if not started.done():
            try:
                outcome.unwrap()
                started.set_exception(RuntimeError("the client stopped before its first table"))
            except BaseException as exc:
                started.set_exception(exc)
        if not finished.done():
            finished.set_result(None)

    trio.lowlevel.start_guest_run(
        trio_main,
        run_sync_soon_threadsafe=loop.call_soon_threadsafe,
        run_sync_soon_not_threadsafe=loop.call_soon,
        done_callback=done,
        # The host may own the signal wakeup fd (asyncio's add_signal_handler does).
        host_uses_signal_set_wakeup_fd=True,
    )
    client, guest = await started
    try:
        yield client, guest
    finally:
        guest.run_soon(release.set)
        await asyncio.shield(finished)


class AsyncioClient:
    """Handles to the endpoints of a ``servecore run`` from an asyncio program (from
    :func:`open_asyncio_client`)."""

    def __init__(self, client: Client, queries: AsyncioQueries) -> None:
        self._client = client
        self._queries = queries

    @property
    def client(self) -> Client:
        """The trio client underneath: its table (``table``, ``seq``) and feed."""
        return self._client

    def get_handle(self, endpoint: str) -> AsyncioHandle:
        """A handle sending queries to ``endpoint``: ``await handle.call(...)``,
        ``async for item in handle.stream(...)``, ``handle.options(timeout_s=...,
        multiplexed_model_id=...)``."""
        return AsyncioHandle(self._queries, endpoint)


@contextlib.asynccontextmanager
async def open_asyncio_client(
    store: str | os.PathLike[str] = DEFAULT_STORE, **options: Any
) -> AsyncIterator[AsyncioClient]:
    """Connect to the ``servecore run`` serving ``store`` from asyncio::

        async with servecore.open_asyncio_client(".servecore/state.db") as client:
            print(await client.get_handle("echo").call("hi"))

    The same store names, options and errors as :func:`~servecore.open_client` (its
    trio twin), which it runs as a guest of the running asyncio loop. On the subprocess
    runtime queries go straight from this loop to the replicas' sockets."""
    async with client_in_guest(store, options) as (client, guest):
        # Subprocess replicas are reached over this loop's own connections; Ray actors
        # through the client's router on trio.
        direct = isinstance(client.replicas, ReplicaClient)
        links = ReplicaLinks(client.replicas.address_of if direct else _unreachable)
        queries = AsyncioQueries(
            client.router, links, guest, asyncio.get_running_loop(), direct=direct
        )
        client.add_table_listener(queries.on_table)
        client.add_load_source(queries.waiting)
        try:
            yield AsyncioClient(client, queries)
        finally:
            links.close()


def _unreachable(tag: str) -> None:
    return None
