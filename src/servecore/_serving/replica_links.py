"""Connections from an asyncio loop to subprocess replicas: an ingress worker's own.

An ingress worker serves HTTP on asyncio (``servecore run --workers``, see
:mod:`servecore._serving.worker`). Its queries go to the replicas over these
connections, speaking the wire format of ``runtimes/subprocess/wire.py`` exactly as the
host's runtime and a ``servecore.connect`` client do (the same handshake, frames, and
meaning of each answer: ``runtimes/subprocess/replica.py``), but driven by asyncio
callbacks: a query costs one frame written and one read, with no hop into trio.

A :class:`ReplicaLink` is one connection, made on the first query to its replica and
kept. What a replica says maps onto the same errors as on the trio path:

* ``REFUSED`` (draining) and ``DRAINED`` (drained and gone) mean a query that was never
  begun: :class:`~servecore.ReplicaDiedError` marked ``retry_safe``, so the caller sends
  it to another replica; the link takes no new query.
* A connection that closes fails the queries in flight with
  :class:`~servecore.ReplicaDiedError` (not safe to resend: they may have run).
* A replica that cannot be reached fails the query as never begun.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
from collections.abc import Callable
from typing import Any, cast

import outcome

from servecore._core.errors import ReplicaDiedError
from servecore.runtimes._protocol import Query
from servecore.runtimes._remote_errors import decode_reply
from servecore.runtimes._streams import ItemStream
from servecore.runtimes.subprocess.replica import answer_of, not_begun, stream_end_error
from servecore.runtimes.subprocess.wire import (
    CALL,
    CANCEL,
    COUNT,
    CREDIT,
    DRAINED,
    HEADER,
    ITEM,
    OK,
    PING,
    REFUSED,
    STREAM,
    call_body,
    frame,
    stream_body,
)
from servecore.runtimes.toolkit import DEFAULT_STREAM_WINDOW

__all__ = ["HANDSHAKE_TIMEOUT_S", "ReplicaLink", "ReplicaLinks"]

#: How long a replica may take to answer the handshake of a new connection.
HANDSHAKE_TIMEOUT_S = 10.0


class ReplicaLink(asyncio.Protocol):
    """One asyncio connection to replica ``tag``: calls and streams out, answers back by
    request id (the loop's thread only)."""

    def __init__(
        self, tag: str, loop: asyncio.AbstractEventLoop, on_lost: Callable[[ReplicaLink], None]
    ) -> None:
        self.tag = tag
        # Kept: asyncio.get_running_loop() makes a getpid() system call each time.
        self._loop = loop
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._ids = itertools.count(1)
        # request id -> the future its answer goes to, and what to call once answered
        self._pending: dict[int, tuple[asyncio.Future[Any], Callable[[], object]]] = {}
        self._streams: dict[int, ItemStream] = {}
        self._hello: asyncio.Future[Any] | None = None
        # Frames written in one turn of the loop, sent together at its end.
        #: Why the connection is unusable (closed, or the replica drained), if it is.
        self.dead_reason: str | None = None
        #: The replica said it is draining: it takes no new query on any connection.
        self.draining = False

    @property
    def usable(self) -> bool:
        """Whether a new query may be sent here."""
        return self.dead_reason is None and not self.draining

    # -- asyncio's side ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports have asyncio.Transport's methods
        # but are not its subclasses (an assert here failed every connection on uvloop).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        size = HEADER.size
        start, end = 0, len(buffer)
        while end - start >= size:
            length, kind, request_id = HEADER.unpack_from(buffer, start)
            stop = start + size + length
            if stop > end:
                break
            self._deliver(kind, request_id, bytes(buffer[start + size : stop]))
            start = stop
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self.dead_reason or (
            f"connection lost: {exc}" if exc is not None else "it closed the connection"
        )
        self.dead_reason = reason
        self._fail_all(lambda: ReplicaDiedError(self.tag, reason))
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(ConnectionError(reason))
        self._on_lost(self)

    # -- answers -----------------------------------------------------------------------

    def _deliver(self, kind: int, request_id: int, body: bytes) -> None:
        if kind == DRAINED:
            self.draining = True
            why = "the replica drained and stopped before beginning it"
            self._fail_all(lambda: not_begun(self.tag, why))
            return
        items = self._streams.get(request_id)
        if items is not None:
            self._deliver_stream(items, kind, request_id, body)
            return
        if kind == REFUSED:
            self.draining = True
        if request_id == 0 and self._hello is not None and not self._hello.done():
            self._hello.set_result((kind, body))
            return
        entry = self._pending.pop(request_id, None)
        if entry is None:  # its caller gave up; drop the answer
            return
        future, answered = entry
        answered()
        if future.done():
            return
        if kind == OK:  # the common answer, without an Outcome around it
            try:
                results = pickle.loads(body)
            except BaseException:  # read again below, by what names the failure
                pass
            else:
                future.set_result(results[0])
                return
        answer = answer_of(kind, body, self.tag)
        if isinstance(answer, outcome.Value):
            future.set_result(answer.value[0])
        elif isinstance(answer, outcome.Error):
            future.set_exception(answer.error)

    def _deliver_stream(self, items: ItemStream, kind: int, request_id: int, body: bytes) -> None:
        if kind == ITEM:
            try:
                items.push(decode_reply(body, self.tag, "subprocess"))
            except Exception as exc:  # a ResultDecodeError: the stream ends with it
                items.end(exc)
                self._streams.pop(request_id, None)
                self._send_quietly(frame(CANCEL, request_id, b""))
            return
        self._streams.pop(request_id, None)
        if kind == REFUSED:
            self.draining = True
        items.end(stream_end_error(kind, body, self.tag))

    def _fail_all(self, error: Callable[[], BaseException]) -> None:
        pending, self._pending = self._pending, {}
        for future, answered in pending.values():
            answered()
            if not future.done():
                future.set_exception(error())
        streams, self._streams = self._streams, {}
        for items in streams.values():
            items.end(error())  # items already delivered are read first

    # -- queries -----------------------------------------------------------------------

    # Frames are written at once, not held to the end of the loop's turn: the replica
    # starts on a query while this loop reads the next requests. Held, the frames of a
    # turn went out in one send, but each query waited for the turn to end: on 2 shared
    # cores a worker answered about a fifth fewer requests, for no less CPU (the
    # transport's buffer still gathers what the socket cannot take at once).

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if self.dead_reason is not None or transport is None or transport.is_closing():
            raise ReplicaDiedError(self.tag, self.dead_reason or "the connection is closed")
        transport.write(data)

    def _send_quietly(self, data: bytes) -> None:
        """Send a frame no answer depends on (a dead connection fails the query anyway)."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def handshake(self, timeout_s: float) -> Any:
        """Ask the replica who it is; return its hello (``{"tag", "pid", "key"}``)."""
        self._hello = self._loop.create_future()
        self._write(frame(PING, 0, b""))
        async with asyncio.timeout(timeout_s):
            kind, body = await self._hello
        if kind != OK:
            raise ValueError(f"replica {self.tag!r} answered the handshake with kind {kind}")
        return decode_reply(body, self.tag, "subprocess")

    def send_call(
        self, query: Query, future: asyncio.Future[Any], answered: Callable[[], object]
    ) -> int:
        """Send one query; its result (or error) goes to ``future``, and ``answered()``
        is called first, once: when the answer comes, when the connection fails, or on
        :meth:`forget_call`. Returns the request id."""
        if not self.usable:
            raise not_begun(self.tag, "the replica is stopping; the query was not sent")
        body = call_body([query], self.tag)
        request_id = next(self._ids)
        self._write(frame(CALL, request_id, body))
        self._pending[request_id] = (future, answered)
        return request_id

    def forget_call(self, request_id: int) -> None:
        """The caller of ``request_id`` gave up: drop its answer, and send ``CANCEL``
        (the replica cancels the call's task if it runs on its loop, an async target)."""
        entry = self._pending.pop(request_id, None)
        if entry is not None:
            self._send_quietly(frame(CANCEL, request_id, b""))
            entry[1]()

    def stream(self, query: Query, window: int = DEFAULT_STREAM_WINDOW) -> ItemStream:
        """Open a stream of a generator target (the credit scheme of the trio path:
        ``window`` items ahead, credit back half a window at a time; closing it early
        sends ``CANCEL``)."""
        if not self.usable:
            raise not_begun(self.tag, "the replica is stopping; the stream was not opened")
        body = stream_body(query, window, self.tag)
        request_id = next(self._ids)

        def grant(n: int) -> None:
            if request_id in self._streams:
                self._send_quietly(frame(CREDIT, request_id, COUNT.pack(n)))

        def cancel() -> None:
            if self._streams.pop(request_id, None) is not None:
                self._send_quietly(frame(CANCEL, request_id, b""))

        items = ItemStream(
            tag=self.tag,
            grant=grant,
            cancel=cancel,
            grant_every=max(1, window // 2),
            event=asyncio.Event,
        )
        self._write(frame(STREAM, request_id, body))
        self._streams[request_id] = items
        return items

    def close(self, reason: str) -> None:
        """Close the connection; queries in flight fail with ReplicaDiedError."""
        self.dead_reason = self.dead_reason or reason
        if self._transport is not None:
            self._transport.close()


class ReplicaLinks:
    """The links of one asyncio loop, by replica tag, made on first use.

    ``address_of(tag)`` gives the socket address of replica ``tag`` (as
    :meth:`servecore._serving.remote_runtime.ReplicaClient.address_of` does), or
    ``None`` when it cannot be reached from here.
    """

    def __init__(self, address_of: Callable[[str], tuple[str, object] | None]) -> None:
        self._address_of = address_of
        self._links: dict[str, ReplicaLink] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._closed = False

    def get(self, tag: str) -> ReplicaLink | None:
        """The usable link to ``tag``, if one is open."""
        link = self._links.get(tag)
        return link if link is not None and link.usable else None

    async def open(self, tag: str) -> ReplicaLink:
        """The link to ``tag``, connecting (and checking the replica's hello) if none
        is open. A replica that cannot be reached raises
        :class:`~servecore.ReplicaDiedError` marked safe to send elsewhere."""
        lock = self._connecting.setdefault(tag, asyncio.Lock())
        async with lock:
            link = self.get(tag)
            if link is not None:
                return link
            if self._closed:
                raise not_begun(tag, "cannot reach it from this process (the client is closed)")
            where = self._address_of(tag)
            if where is None:
                raise not_begun(tag, "cannot reach it from this process (no address)")
            loop = asyncio.get_running_loop()
            link = ReplicaLink(tag, loop, self._forget)
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                    await loop.create_unix_connection(lambda: link, where[0])
                hello = await link.handshake(HANDSHAKE_TIMEOUT_S)
                if not isinstance(hello, dict) or hello.get("tag") != tag:
                    raise ValueError(f"socket {where[0]} is served by {hello!r}, not {tag!r}")
            except (OSError, ValueError, TimeoutError, ReplicaDiedError) as exc:
                link.close("the handshake failed")
                raise not_begun(tag, f"cannot reach it from this process ({exc!r})") from exc
            self._links[tag] = link
            return link

    def _forget(self, link: ReplicaLink) -> None:
        if self._links.get(link.tag) is link:
            del self._links[link.tag]
            lock = self._connecting.get(link.tag)
            if lock is not None and not lock.locked():  # tags are never reused
                del self._connecting[link.tag]

    def close(self) -> None:
        """Close every link; queries in flight fail with ReplicaDiedError."""
        self._closed = True
        links, self._links = self._links, {}
        for link in links.values():
            link.close("the client was closed")
