"""The ingress workers' HTTP/1.1 server: httptools' parser (llhttp, in C) under an
asyncio protocol made for one application, :class:`~servecore.http.HTTPIngress`.

An ASGI server turns each request into messages, a task, an event and the checks a
server owes any application; then the ingress turns those back into a query and its
answer into messages again. For the request most clients send -- one whole body, one
JSON answer -- this server does none of that: it hands the parsed request to
:meth:`HTTPIngress.respond <servecore.http.HTTPIngress.respond>` and writes the answer
it gets back as one segment. Everything else the ingress serves (streams, Server-Sent
Events, the ``/-/`` routes) goes through the same app's ASGI interface, on the same
connection, through the small ASGI bridge below. ``docs/benchmarks.md`` ("HTTP")
measures what that is worth against uvicorn, httptools and granian.

What the server does, as HTTP/1.1 asks:

* keep-alive (HTTP/1.0 too when asked for), ``Connection: close``, pipelined requests
  answered in order (reading stops while :data:`MAX_PIPELINED` wait);
* ``Expect: 100-continue`` answered before the body is read;
* a body over the app's ``max_body_bytes`` answered 413 at once (from its
  ``Content-Length`` when it has one) and the connection closed; a request head over
  :data:`MAX_HEAD_BYTES` or :data:`MAX_HEADERS` 431; a request it cannot parse 400;
  a request to upgrade (WebSocket, h2c) answered as the HTTP/1.1 request it also is,
  as uvicorn does (the ingress serves neither protocol), or 400 if it has a body
  (the parser would have given that to the other protocol);
* a connection idle, or with a request unfinished, for :data:`KEEP_ALIVE_S` is closed;
* a client that disconnects cancels its query (counted ``cancelled``) at once, or
  ends its stream; one that only shuts down its sending side is taken to have left
  (a closed socket looks the same);
* a ``HEAD`` answer has the headers of the ``GET`` one and no body;
* shutdown: stop accepting, let the requests in flight be answered (and one that
  arrives within :data:`FRESH_GRACE_S` on an idle connection), close each connection
  after its answer, and what is left after the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote

import httptools

from servecore._serving.fresh_connections import FRESH_GRACE_S

__all__ = [
    "KEEP_ALIVE_S",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "MAX_PIPELINED",
    "LeanServer",
    "Responder",
]

log = logging.getLogger(__name__)

#: Bytes of a request's line and headers together (431 past it).
MAX_HEAD_BYTES = 64 * 1024
#: Headers of one request (431 past it).
MAX_HEADERS = 100
#: Seconds a connection may stay idle, or keep a request unfinished, before it is closed
#: (uvicorn's default keep-alive).
KEEP_ALIVE_S = 5.0
#: Requests read ahead on one connection while one is answered; reading stops beyond.
MAX_PIPELINED = 16

Headers = list[tuple[bytes, bytes]]


class Responder(Protocol):
    """What the server serves: :class:`~servecore.http.HTTPIngress`."""

    @property
    def max_body_bytes(self) -> int: ...

    def respond(
        self, method: str, path: str, query_string: bytes, headers: Headers, body: bytes
    ) -> Awaitable[tuple[int, bytes, Headers] | None]: ...

    def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> Awaitable[None]: ...


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


_STATUS_LINES = {status.value: _status_line(status.value) for status in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _error_response(status: int, kind: str, message: str) -> bytes:
    body = json.dumps({"error": message, "type": kind}).encode()
    return b"".join(
        (
            _STATUS_LINES[status],
            b"content-type: application/json\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n",
            body,
        )
    )


class _Request:
    """A request read whole: what the app is given."""

    __slots__ = ("body", "head_only", "headers", "http10", "keep_alive", "method", "url")

    def __init__(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: bytes,
        keep_alive: bool,
        http10: bool,
    ) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.http10 = http10
        self.head_only = method == b"HEAD"


class LeanServer:
    """Serves ``app`` on asyncio (see the module): :meth:`serve` on a listening socket
    until its ``stop`` event is set."""

    def __init__(self, app: Responder, *, graceful_s: float = 5.0, backlog: int = 2048) -> None:
        self.app = app
        self.graceful_s = graceful_s
        self.backlog = backlog
        self.connections: set[_Connection] = set()
        #: The ``Date`` header line, and the loop's time, as of the last second.
        self.date = b""
        self.now = 0.0
        self._stopping = False

    async def serve(
        self,
        sock: socket.socket,
        stop: asyncio.Event,
        ready: Callable[[], object] | None = None,
    ) -> None:
        """Accept on ``sock`` until ``stop`` is set, then shut down (see the module);
        ``ready`` is called once connections are taken."""
        loop = asyncio.get_running_loop()
        self._tick(loop)
        server = await loop.create_server(
            lambda: _Connection(self, loop), sock=sock, backlog=self.backlog
        )
        sweeper = loop.create_task(self._sweep(loop))
        try:
            if ready is not None:
                ready()
            await stop.wait()
        finally:
            server.close()
            self._stopping = True
            for connection in list(self.connections):
                # Not at once: a request may be on its way (a connection accepted in
                # the turn the stop came has not been read yet), and closing a socket
                # with unread data resets it; a request that comes is answered first.
                connection.finish(FRESH_GRACE_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.graceful_s):
                    while self.connections:
                        await asyncio.sleep(0.05)
            for connection in list(self.connections):
                connection.abort()
            sweeper.cancel()

    @property
    def stopping(self) -> bool:
        """Whether the server is shutting down (connections close after their answer)."""
        return self._stopping

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.date = b"date: " + formatdate(usegmt=True).encode() + b"\r\n"
        self.now = loop.time()

    async def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Once a second: the ``Date`` header, and close the connections idle or with a
        request unfinished for :data:`KEEP_ALIVE_S`."""
        while True:
            await asyncio.sleep(1.0)
            self._tick(loop)
            for connection in list(self.connections):
                if connection.idle_for(self.now) > KEEP_ALIVE_S:
                    connection.finish()


class _Connection(asyncio.Protocol):
    """One client connection (see the module)."""

    def __init__(self, server: LeanServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.app = server.app
        self.loop = loop
        self.limit = server.app.max_body_bytes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # The request being read.
        self.url = b""
        self.headers: Headers = []
        self.body: list[bytes] = []
        self.size = 0
        # Requests read whole, waiting for the one answered before them.
        self.waiting: deque[_Request] = deque()
        # The connection's task answers its requests one by one, and waits on ``next``
        # for another between them (cheaper than a task per request).
        self.task: asyncio.Task[None] | None = None
        self.next: asyncio.Future[_Request] | None = None
        self.answering = False  # a request is being answered
        self.reading_paused = False
        self.since = loop.time()  # of the last sign of progress
        self.gone = False
        self.gone_event: asyncio.Event | None = None
        self.drained: asyncio.Event | None = None
        self.closing = False  # close once the request answered now is
        self.refused = False  # an error was answered: read nothing more
        self.in_asgi = False  # the request answered now went to the app's ASGI side

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports are not asyncio's subclasses.
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        if self.server.stopping:
            self.closing = True

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # Served as the plain HTTP/1.1 request it also is (a server may ignore
            # Upgrade): read on, with a parser that is not waiting for another protocol.
            self.parser = httptools.HttpRequestParser(self)
            offset = exc.args[0]
            if offset < len(data):
                self.data_received(data[offset:])
        except httptools.HttpParserError as exc:
            if not self.refused:  # else: refused from a callback already
                reason = str(exc)[:200]
                self._refuse(400, "BadRequest", f"the request is not HTTP/1.1: {reason}")

    def eof_received(self) -> bool:
        # A client that closed its sending side is taken to have left, as uvicorn and
        # hypercorn take it: a closed socket looks the same, and its query must not run
        # on for nobody.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.closing = True
        self.server.connections.discard(self)
        self.waiting.clear()
        if self.gone_event is not None:
            self.gone_event.set()
        if self.drained is not None:
            self.drained.set()
        if self.task is not None and not self.in_asgi:
            # A query is cancelled with it. An ASGI app is told instead (receive).
            self.task.cancel()

    def pause_writing(self) -> None:
        self.drained = asyncio.Event()

    def resume_writing(self) -> None:
        if self.drained is not None:
            self.drained.set()
            self.drained = None

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []
        self.size = 0
        self.since = self.server.now

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.size += len(url)
        if self.size > MAX_HEAD_BYTES:
            self._too_large_head()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))
        self.size += len(name) + len(value)
        if self.size > MAX_HEAD_BYTES or len(self.headers) > MAX_HEADERS:
            self._too_large_head()

    def on_headers_complete(self) -> None:
        self.size = 0  # from here on: the body's
        expect = length = None
        chunked = False
        for name, value in self.headers:
            if name == b"content-length":
                length = value
            elif name == b"expect":
                expect = value
            elif name == b"transfer-encoding":
                chunked = True
        if self.parser.should_upgrade() and (chunked or (length or b"0").strip() != b"0"):
            # The parser hands what follows the head to the other protocol: the body
            # would be lost, so the request is not served rather than served without it.
            self._refuse(
                400,
                "BadRequest",
                "a request to switch protocols with a body is not served here; "
                "send it without an Upgrade header",
            )
            raise _Refused
        if length is not None and length.strip().isdigit() and int(length) > self.limit:
            self._refuse(413, "PayloadTooLarge", f"body over {self.limit} bytes")
            raise _Refused
        if (
            expect is not None
            and expect.lower() == b"100-continue"
            and not self.answering
            and not self.waiting
            and self.transport is not None
        ):
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.limit:
            self._refuse(413, "PayloadTooLarge", f"body over {self.limit} bytes")
            raise _Refused
        self.body.append(body)
        self.since = self.server.now

    def on_message_complete(self) -> None:
        if self.refused or self.gone:
            return
        parser = self.parser
        body = self.body
        request = _Request(
            parser.get_method(),
            self.url,
            self.headers,
            body[0] if len(body) == 1 else b"".join(body),
            parser.should_keep_alive(),
            parser.get_http_version() == "1.0",
        )
        if not self.answering and not self.waiting:
            self.answering = True
            waiter = self.next
            if waiter is not None:
                self.next = None
                waiter.set_result(request)
            else:
                self.task = self.loop.create_task(self._answer(request))
        else:
            self.waiting.append(request)
            if len(self.waiting) >= MAX_PIPELINED and self.transport is not None:
                self.transport.pause_reading()
                self.reading_paused = True

    # -- answering -----------------------------------------------------------------------

    def idle_for(self, now: float) -> float:
        """Seconds since this connection last made progress, if it waits on its client
        (0 while a request of its own is being answered)."""
        if self.answering:
            return 0.0
        return now - self.since

    def finish(self, grace_s: float = 0.0) -> None:
        """Close once the request answered now is; if none is, after ``grace_s``
        unless a request comes meanwhile (then after its answer)."""
        self.closing = True
        if not self.answering and not self.waiting:
            if grace_s > 0:
                self.loop.call_later(grace_s, self._close_if_idle)
            else:
                self._close()

    def _close_if_idle(self) -> None:
        if not self.answering and not self.waiting:
            self._close()

    def abort(self) -> None:
        """Close at once, dropping what is unanswered."""
        if self.transport is not None:
            self.transport.abort()

    async def _answer(self, request: _Request) -> None:
        while True:
            try:
                raw_path, path, query = _split_target(request.url)
                method = request.method.decode("latin-1")
                answer = await self.app.respond(method, path, query, request.headers, request.body)
                if answer is None:
                    await self._through_asgi(request, method, path, raw_path, query)
                else:
                    self._write_whole(request, *answer)
            except asyncio.CancelledError:
                return  # the client left: nobody to answer
            except Exception:
                log.exception("servecore: answering a request failed")
                self.abort()
                return
            if self.gone:
                return
            if not request.keep_alive or (self.closing and not self.waiting):
                self._close()
                return
            if self.waiting:
                request = self.waiting.popleft()
                if self.reading_paused and self.transport is not None:
                    self.reading_paused = False
                    self.transport.resume_reading()
                continue
            self.answering = False
            self.since = self.server.now
            self.next = self.loop.create_future()
            try:
                request = await self.next
            except asyncio.CancelledError:
                return  # the client left

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _through_asgi(
        self, request: _Request, method: str, path: str, raw_path: bytes, query: bytes
    ) -> None:
        self.in_asgi = True
        try:
            await _ASGIExchange(self, request, method, path, raw_path, query).run()
        finally:
            self.in_asgi = False

    def _write_whole(self, request: _Request, status: int, body: bytes, headers: Headers) -> None:
        parts = [
            _STATUS_LINES.get(status) or _status_line(status),
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\n",
        ]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(self.server.date)
        parts.append(self.connection_header(request))
        parts.append(b"\r\n")
        if not request.head_only:
            parts.append(body)
        if self.transport is not None:
            self.transport.write(b"".join(parts))

    def connection_header(self, request: _Request) -> bytes:
        """The ``Connection`` header line of the answer to ``request`` (none for HTTP/1.1
        keep-alive); marks the request's connection to close if it must."""
        if not request.keep_alive or (self.closing and not self.waiting):
            request.keep_alive = False
            return b"connection: close\r\n"
        return b"connection: keep-alive\r\n" if request.http10 else b""

    def _too_large_head(self) -> None:
        self._refuse(
            431,
            "RequestHeaderFieldsTooLarge",
            f"request head over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers",
        )
        raise _Refused

    def _refuse(self, status: int, kind: str, message: str) -> None:
        """Answer ``status`` and close: what follows on the connection cannot be read.
        While an earlier request is being answered, the error cannot go before its
        answer, nor wait for it (the rest cannot be read): the connection just closes."""
        if self.refused or self.transport is None:
            return
        self.refused = self.closing = True
        self.waiting.clear()
        if self.answering:
            self.transport.abort()
            return
        self.transport.write(_error_response(status, kind, message))
        self.transport.close()

    def request_failed(self) -> None:
        """The request being answered failed before its status went out: 500, close."""
        if self.transport is not None and not self.gone:
            self.transport.write(
                _error_response(500, "InternalError", "the server failed to answer; see its log")
            )
            self.transport.close()
        self.closing = True

    async def wait_drained(self) -> None:
        """Until the transport's buffer is below its high-water mark again."""
        drained = self.drained
        if drained is not None:
            await drained.wait()

    async def wait_gone(self) -> None:
        """Until the client disconnects."""
        if self.gone:
            return
        if self.gone_event is None:
            self.gone_event = asyncio.Event()
        await self.gone_event.wait()


def _split_target(url: bytes) -> tuple[bytes, str, bytes]:
    """A request target's raw path, its path percent-decoded, and its query string."""
    if url[:1] != b"/":  # an absolute URL, or "*": its path and query
        parsed = httptools.parse_url(url)
        raw_path, query = parsed.path or b"/", parsed.query or b""
    else:
        raw_path, _, query = url.partition(b"?")
    path = raw_path.decode("latin-1")
    if "%" in path:
        path = unquote(path)
    return raw_path, path, query


class _Refused(Exception):
    """Raised from a parser callback to stop reading a request already refused."""


class _ASGIExchange:
    """One request served through the app's ASGI interface (streams, ``/-/`` routes):
    ``receive`` gives the body read, then waits for the client to leave; ``send``
    writes the head with the first body message (one segment), a length when the body
    comes in one message, chunks otherwise."""

    def __init__(
        self,
        connection: _Connection,
        request: _Request,
        method: str,
        path: str,
        raw_path: bytes,
        query: bytes,
    ) -> None:
        self.connection = connection
        self.request = request
        transport = connection.transport
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.0" if request.http10 else "1.1",
            "server": transport.get_extra_info("sockname") if transport else None,
            "client": transport.get_extra_info("peername") if transport else None,
            "scheme": "http",
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": request.headers,
        }
        self.body_given = False
        self.head: bytes | None = None  # written with the first body message
        self.chunked = False
        self.started = False
        self.complete = False

    async def run(self) -> None:
        try:
            await self.connection.app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "servecore: the ingress failed answering %s %s",
                self.scope["method"],
                self.scope["path"],
            )
            if not self.started:
                self.connection.request_failed()
                return
        if not self.complete:
            # Started and never ended (or never started): the client cannot tell where
            # the body would end, so the connection goes.
            if not self.started:
                log.error("servecore: the ingress sent no response to %s", self.scope["path"])
            self.connection.abort()
            raise asyncio.CancelledError

    async def receive(self) -> MutableMapping[str, Any]:
        if not self.body_given:
            self.body_given = True
            return {"type": "http.request", "body": self.request.body, "more_body": False}
        if not self.complete:
            await self.connection.wait_gone()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        connection = self.connection
        if connection.gone:
            return
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("the response was started twice")
            self.started = True
            status = int(message["status"])
            headers: Headers = list(message.get("headers", ()))
            self.chunked = not any(name.lower() == b"content-length" for name, _ in headers)
            parts = [_STATUS_LINES.get(status) or _status_line(status)]
            for name, value in headers:
                parts += (name, b": ", value, b"\r\n")
            parts.append(connection.server.date)
            parts.append(connection.connection_header(self.request))
            self.head = b"".join(parts)
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.started or self.complete:
            raise RuntimeError("response body sent before its start or after its end")
        body = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        head_only = self.request.head_only
        out = []
        if self.head is not None:
            head, self.head = self.head, None
            if self.chunked and not more:  # the whole body in one message: its length
                self.chunked = False
                head += b"content-length: " + str(len(body)).encode() + b"\r\n"
            elif self.chunked and not head_only:
                head += b"transfer-encoding: chunked\r\n"
            out.append(head + b"\r\n")
        if not head_only:
            if self.chunked:
                if body:
                    out.append(b"%x\r\n%b\r\n" % (len(body), body))
                if not more:
                    out.append(b"0\r\n\r\n")
            elif body:
                out.append(body)
        if not more:
            self.complete = True
        transport = connection.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(b"".join(out))
            await connection.wait_drained()
