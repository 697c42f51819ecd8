"""A client-side runtime: queries straight to subprocess replicas from another process.

:class:`ReplicaClient` is what a :class:`~servecore.router.Router` in a process other
than the controller's sends through (``servecore.connect``). It has the runtime's
``call(tag, batch)`` and nothing that changes the world: starting and stopping
replicas stays the controller's. It connects to a replica's socket in the runtime
directory the first time a query goes there (the same handshake and framing as the
host's :class:`~servecore.runtimes.subprocess.SubprocessRuntime`, from
``runtimes/subprocess/replica.py``), keeps the connection, and forgets it when the
replica closes it; the next query connects again.

A replica that cannot be reached (its socket gone or refusing) raises
:class:`~servecore.ReplicaDiedError` marked ``retry_safe`` -- the query never reached
it -- so the router skips the replica and sends the query to another.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from servecore._core.errors import ReplicaDiedError
from servecore._core.transitions import StartReplica
from servecore.runtimes._protocol import Query
from servecore.runtimes._streams import ItemStream
from servecore.runtimes.subprocess.blocking import BlockingCalls
from servecore.runtimes.subprocess.files import ReplicaFiles, replica_key
from servecore.runtimes.subprocess.replica import (
    ReplicaConnection,
    not_begun,
    open_replica_channel,
)
from servecore.runtimes.subprocess.wire import socket_address
from servecore.runtimes.toolkit import DEFAULT_STREAM_WINDOW

__all__ = ["ReplicaClient"]

#: How long a replica may take to answer the handshake.
HANDSHAKE_TIMEOUT_S = 10.0


def _unreachable(tag: str, why: str) -> ReplicaDiedError:
    return not_begun(tag, f"cannot reach it from this process ({why})")


class ReplicaClient:
    """Calls replicas of the subprocess runtime in ``directory`` from this process.

    Open it in a nursery (:meth:`start`); connections' readers run there, and stop
    with it.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._dir_fd: int | None = None
        # Socket addresses by tag, worked out once (a regex and a path join per query
        # otherwise); valid while the directory descriptor they name stays open.
        self._addresses: dict[str, tuple[str, object]] = {}
        self._nursery: trio.Nursery | None = None
        self._connections: dict[str, ReplicaConnection] = {}
        self._connecting: dict[str, trio.Lock] = {}
        self._blocking = BlockingCalls(self.address_of)

    def __repr__(self) -> str:
        return f"ReplicaClient({str(self.directory)!r})"

    def start(self, nursery: trio.Nursery) -> None:
        """Read replies in ``nursery``; the directory is opened now (so that long paths
        are reached through it, as the host does)."""
        self._nursery = nursery
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        """Close every connection; calls in flight raise ReplicaDiedError."""
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            connection.dead_reason = connection.dead_reason or "the client was closed"
            connection.fail_pending(connection.dead_reason)
            connection.channel.close()
        if self._dir_fd is not None:
            self._addresses.clear()  # they name the descriptor closed now
            os.close(self._dir_fd)
            self._dir_fd = None

    @property
    def connected(self) -> frozenset[str]:
        """Tags of the replicas this client holds a connection to."""
        return frozenset(t for t, c in self._connections.items() if not c.dead)

    # -- the runtime's call ----------------------------------------------------------

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        """Run one batch on replica ``tag``; see the module doc for failures."""
        connection = self._connections.get(tag)
        if connection is None or connection.dead:
            connection = await self._connect(tag)
        return await connection.call(batch)

    async def stream(
        self, tag: str, query: Query, window: int = DEFAULT_STREAM_WINDOW
    ) -> ItemStream:
        """Open a stream of a generator target on replica ``tag`` (as the host does)."""
        connection = self._connections.get(tag)
        if connection is None or connection.dead:
            connection = await self._connect(tag)
        return await connection.stream(query, window)

    def call_blocking(
        self, tag: str, batch: Sequence[Query], timeout_s: float | None
    ) -> list[Any] | None:
        """Run ``batch`` on replica ``tag`` from a host thread over that thread's own
        connection, without entering trio (a ``SyncClient`` handle's path); ``None``
        when it cannot be reached that way (the router then uses :meth:`call`)."""
        return self._blocking.call(tag, batch, timeout_s)

    def address_of(self, tag: str) -> tuple[str, object] | None:
        """The socket address of replica ``tag`` (and ``None`` for its pid: tags are
        never reused), for connections of this process's own (host threads' blocking
        calls, an ingress worker's asyncio path); ``None`` before :meth:`start`."""
        found = self._addresses.get(tag)
        if found is not None:
            return found
        dir_fd = self._dir_fd
        if dir_fd is None:
            return None
        files = ReplicaFiles(str(self.directory), replica_key(tag))
        if len(self._addresses) >= 4096:  # tags are never reused: forget old ones
            self._addresses.clear()
        found = self._addresses[tag] = (socket_address(files.socket, dir_fd), None)
        return found

    async def _connect(self, tag: str) -> ReplicaConnection:
        if self._nursery is None or self._dir_fd is None:
            raise _unreachable(tag, "the client is not started")
        lock = self._connecting.setdefault(tag, trio.Lock())
        async with lock:
            connection = self._connections.get(tag)
            if connection is not None and not connection.dead:
                return connection
            files = ReplicaFiles(str(self.directory), replica_key(tag))
            address = socket_address(files.socket, self._dir_fd)
            try:
                channel, _ = await open_replica_channel(address, tag, HANDSHAKE_TIMEOUT_S)
            except (OSError, ValueError, trio.TooSlowError) as exc:
                raise _unreachable(tag, repr(exc)) from exc
            connection = ReplicaConnection(tag=tag, channel=channel)
            self._connections[tag] = connection
            self._nursery.start_soon(self._read, connection, name=f"replica {tag} reader")
            return connection

    async def _read(self, connection: ReplicaConnection) -> None:
        """Deliver answers until the replica closes the connection, then forget it."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.channel.flush)
            with contextlib.suppress(trio.ClosedResourceError):
                while (message := await connection.channel.receive()) is not None:
                    connection.deliver(*message)
            nursery.cancel_scope.cancel()
        connection.dead_reason = connection.dead_reason or "it closed the connection"
        connection.fail_pending(connection.dead_reason)
        connection.channel.close()
        if self._connections.get(connection.tag) is connection:
            del self._connections[connection.tag]

    # -- the rest of the Runtime protocol: the controller's business -----------------

    async def start_replica(self, effect: StartReplica) -> None:
        """Refused: replicas are started by the controller, never by a client."""
        raise RuntimeError(f"a client cannot start replica {effect.tag!r}; the controller does")

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        """Refused: replicas are stopped by the controller, never by a client."""
        raise RuntimeError(f"a client cannot stop replica {tag!r}; the controller does")

    async def list_replicas(self) -> frozenset[str]:
        """The replicas this client is connected to (it watches no process)."""
        return self.connected
