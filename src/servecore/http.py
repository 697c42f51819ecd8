"""HTTP ingress: serve endpoints at their routes (the top layer of docs/design.md §1).

:class:`HTTPIngress` is an ASGI 3 application that finds the endpoint whose ``route``
is the longest prefix of the request path (on a segment boundary), checks the method
against the endpoint's ``methods``, and sends one query through a router (the
controller's own, or that of an ingress worker process, ``servecore run --workers``;
see :mod:`servecore._serving.worker`):

* a request with a JSON body (no ``Content-Type``, or a JSON one) at the route itself
  passes the body parsed as JSON (``POST /echo {"text": "hi"}`` calls the target with
  ``{"text": "hi"}``);
* a request without one passes its query string as a dict of strings
  (``GET /echo?text=hi`` calls it with ``{"text": "hi"}``);
* a body of another type, or a path below the route, passes a
  :class:`servecore.Request` (method, the rest of the path, query, headers, raw body).

The result is answered as JSON, or as the :class:`servecore.Response` the target
returned (its status, headers and body). Errors map onto status codes: no endpoint at the path
404, a method the endpoint does not take 405, a body that is not strict JSON 400 (not
UTF-8, not JSON, ``NaN``/``Infinity`` or a number too large for a float such as
``1e999``, nested deeper than ``max_depth``, or holding a
lone surrogate), the user's own exception 500, a result that is not JSON 500, a replica
that died 502, no replica or too many queries waiting 503 (and every request once
the controller stepped down, having lost its lease), a timeout 504; the body is
``{"error": ..., "type": ...}``. No traceback is ever sent to the client; failures that
are not the caller's are logged once on the ``servecore.http`` logger.

:func:`serve_http` runs it with hypercorn on the controller's own trio loop (handles are
bound to it)::

    async with servecore.open_controller(...) as ctl, trio.open_nursery() as nursery:
        await nursery.start(servecore.http.serve_http, ctl, "127.0.0.1:8000")

It listens with a backlog of :data:`LISTEN_BACKLOG` connections, so that a burst of
clients waits in the kernel's queue instead of being reset (hypercorn's default is 100).

hypercorn is an optional extra: ``pip install 'servecore[http]'``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl

import trio

from servecore._controller.controller import Controller
from servecore._core.errors import (
    BackpressureError,
    EndpointNotFound,
    NoReplicaError,
    ReplicaDiedError,
    ServecoreError,
    SteppedDown,
    StreamMismatch,
)
from servecore._core.transitions import RoutingTable
from servecore._core.validation import MAX_SECONDS, positive_number
from servecore._serving.disconnect_watch import GONE as _GONE
from servecore._serving.disconnect_watch import Gone as _Gone
from servecore._serving.http_json import (
    BadBody,
    describe,
    dumps,
    error_answer,
    is_json,
    parse_body,
    query_dict,
)
from servecore._serving.http_responses import (
    BadResponse,
    head_of,
    raw_chunk,
    response_of,
)
from servecore._serving.ops_http import PREFIX as OPS_PREFIX
from servecore._serving.ops_http import answer_ops, count_response, response_counts
from servecore.web import Request, Response

__all__ = ["LISTEN_BACKLOG", "HTTPIngress", "HandleSource", "check_timeout", "serve_http"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
#: Answers a ``/-/`` route if it is one (``True``), as :func:`answer_ops` does; it takes
#: ``receive`` too, for streams that end when their client goes away.
OpsAnswer = Callable[[Scope, Receive, Send], Awaitable[bool]]


class HandleSource(Protocol):
    """What the ingress needs to serve: the routing table to find an endpoint by its
    route, and a handle to query it. A :class:`~servecore.Controller` is one; so is a
    :class:`servecore.Client` (an ingress worker's, in another process)."""

    @property
    def routing_table(self) -> RoutingTable: ...

    def get_handle(self, endpoint: str) -> Any: ...


#: Connections the kernel queues for the server while it is busy: bursts of hundreds of
#: clients are common, and a full queue resets connections (the kernel caps it at
#: ``net.core.somaxconn``).
LISTEN_BACKLOG = 2048


def check_timeout(value: float | None) -> float | None:
    """A request timeout: ``None`` (wait as long as it takes) or a finite number of
    seconds above 0 and at most a day; anything else raises
    :class:`~servecore.InvalidConfig` (a NaN or negative timeout would fail every
    request)."""
    if value is None:
        return None
    return positive_number("timeout_s", value, MAX_SECONDS)


#: Status codes for errors that are not the user's own.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (EndpointNotFound, 404),
    (ReplicaDiedError, 502),
    (NoReplicaError, 503),
    (BackpressureError, 503),
    (SteppedDown, 503),
    (TimeoutError, 504),
)


class HTTPIngress:
    """An ASGI app serving the endpoints of ``source`` (a controller, or a client of
    one in another process) at their routes.

    ``ops`` answers the ``/-/`` routes (default: :func:`answer_ops` on ``source``,
    which needs a controller); ``timeout_s`` bounds each query (504 past it; ``None``
    waits as long as it takes); ``max_body_bytes`` bounds a request body (413 past
    it); ``max_depth`` bounds how deeply a JSON body may nest arrays and objects (400
    past it).
    """

    def __init__(
        self,
        source: HandleSource,
        *,
        timeout_s: float | None = 30.0,
        max_body_bytes: int = 16 * 1024 * 1024,
        max_depth: int = 100,
        ops: OpsAnswer | None = None,
        loop: Literal["trio", "asyncio"] = "trio",
        count_responses: bool = True,
    ) -> None:
        if loop not in ("trio", "asyncio"):
            raise ValueError(f"loop={loop!r} is not 'trio' or 'asyncio'")
        self.source = source
        self.loop = loop
        self._unless_gone: Callable[..., Awaitable[Any]] = (
            self._watch_on_asyncio if loop == "asyncio" else _unless_gone
        )
        self.count_responses = count_responses
        self.ops: OpsAnswer = ops if ops is not None else functools.partial(answer_ops, source)
        self.timeout_s = check_timeout(timeout_s)
        self.max_body_bytes = max_body_bytes
        self.max_depth = max_depth
        # Endpoints whose target answered a call with StreamMismatch (it streams).
        self._streaming: set[str] = set()
        self._handles: dict[str, Any] = {}
        self._counts: dict[int, int] | None = None  # of responses, once one is counted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            if scope["path"].startswith(OPS_PREFIX) and await self.ops(
                scope, receive, self._counted(send)
            ):
                return  # /-/healthz, /-/routes, /-/metrics, /-/dashboard, ...
            try:
                answer = await self._answer(scope, receive)
                if isinstance(answer, _Gone):
                    return  # the client left before its answer: nobody to send it to
                if isinstance(answer, _Streaming):
                    await self._stream(answer, scope, receive, self._counted(send))
                    return
                status, body, headers = answer
            except Exception:
                # A bug of ours must still answer as JSON, not as the server's bare 500
                # with a traceback in its log.
                log.exception(
                    "servecore.http: answering %s %s failed", scope.get("method"), scope.get("path")
                )
                status, body, headers = error_answer(
                    500, "InternalError", "the server failed to answer; see its log"
                )
            if self.count_responses:  # here, not by wrapping send: one call fewer
                count_response(self.source, status)
            # A length, not chunks: one write fewer per answer.
            await _send_whole(send, status, body, headers)

    def _counted(self, send: Send) -> Send:
        """``send``, counting responses if this app counts them."""
        return _counting(self.source, send) if self.count_responses else send

    async def _stream(self, answer: _Streaming, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a stream: JSON lines (chunked), or Server-Sent Events when asked for,
        or -- when the first item is a :class:`Response` -- that status and those
        headers, then the items as the body, raw (see :func:`raw_chunk`).

        The first item is awaited before the status goes out, so a stream that fails
        at once (no replica, a target that does not stream) still answers with its
        error status. A client that disconnects cancels the generator in the replica.
        """
        items = answer.items
        sse = answer.sse
        try:
            try:
                # Watched: a client may leave while a model works on its first item.
                first = await self._unless_gone(receive, _next_item, items)
            except StopAsyncIteration:
                first = _NOTHING
            if isinstance(first, _Gone):
                await items.aclose()
                return
        except Exception as exc:
            await items.aclose()
            if isinstance(exc, StreamMismatch) and not exc.streams:
                # The target answers once (a stream was asked for, or its backend was
                # redefined since it streamed): answer it as one JSON value.
                self._streaming.discard(answer.endpoint)
                try:
                    status, body, _ = await self._call(
                        answer.endpoint, answer.handle, answer.payload
                    )
                except StreamMismatch as again:  # redefined once more meanwhile
                    status, body, _ = _failure(again)
            else:
                status, body, _ = _failure(exc)
            await _send_whole(send, status, body, [])
            return
        if isinstance(first, Response):
            await self._stream_response(answer, first, receive, send)
            return
        media = b"text/event-stream" if sse else b"application/x-ndjson"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", media), (b"cache-control", b"no-cache")],
            }
        )
        pump = _send_items_asyncio if self.loop == "asyncio" else _send_items_trio
        await pump(items, first, sse, answer.endpoint, receive, send)

    async def _stream_response(
        self, answer: _Streaming, head: Response, receive: Receive, send: Send
    ) -> None:
        """A stream whose first item is a :class:`Response`: its status and headers,
        its body (if any) as the first chunk, then each later item as a raw chunk.

        The target owns the framing here, so an error after the status cannot become
        a JSON record: it is logged once and the response is cut short (no final
        chunk), which HTTP clients report as an incomplete body.
        """
        items = answer.items
        try:
            status, headers = head_of(head)
            chunks = [] if head.body in (b"", "", None) else [raw_chunk(head.body)]
        except BadResponse as exc:
            await items.aclose()
            log.error("servecore.http: endpoint %r: %s", answer.endpoint, exc)
            await _send_whole(
                send, *error_answer(500, "BadResponse", f"endpoint {answer.endpoint!r} {exc}")
            )
            return
        if not any(name == b"content-type" for name, _ in headers):
            headers.insert(0, (b"content-type", b"application/octet-stream"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        complete = await self._unless_gone(
            receive, functools.partial(_send_raw, items, chunks, answer.endpoint), send
        )
        if complete is True:  # not cut short by an error, nor by the client leaving
            await send({"type": "http.response.body", "body": b""})

    async def _watch_on_asyncio(
        self, receive: Receive, call: Callable[[Any], Awaitable[Any]], arg: Any
    ) -> Any:
        """The first request's :func:`_unless_gone` on asyncio: make the loop's
        watches (the app may be built before its loop runs), then use them."""
        import asyncio

        from servecore._serving.disconnect_watch import DisconnectWatches

        self._unless_gone = DisconnectWatches(asyncio.get_running_loop()).unless_gone
        return await self._unless_gone(receive, call, arg)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _endpoint_at(self, path: str) -> tuple[Any, str]:
        """The endpoint whose route is the longest prefix of ``path`` on a segment
        boundary (``/classify`` serves ``/classify/sub``, never ``/classifyx``), and the
        rest of the path below it (``""`` for the route itself); ``(None, "")`` if none."""
        found, length = None, -1
        for endpoint in self.source.routing_table.endpoints.values():
            route = endpoint.route
            if route is None:
                continue
            if route == path:
                return endpoint, ""
            stem = route.rstrip("/")
            if len(stem) > length and path.startswith(stem + "/"):
                found, length = endpoint, len(stem)
        if found is None:
            return None, ""
        return found, path[length:]

    async def respond(
        self,
        method: str,
        path: str,
        query_string: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
        """The answer to a whole request, for a server that parsed it itself (the ingress
        workers' own, :mod:`servecore._serving.lean_http`): its status, body and headers
        (``content-type`` among them), counted like any response; or ``None`` when the
        answer streams or is a ``/-/`` route, which the server then serves through this
        app's ASGI interface. ``headers`` have lower-case names. The query is not
        watched for a disconnect: the server cancels this coroutine when its client
        leaves."""
        if path.startswith(OPS_PREFIX):
            return None
        try:
            endpoint, rest, refused = self._route(path, method)
            answer = refused or await self._answer_whole(
                endpoint, rest, method, path, query_string, headers, body, None
            )
            if isinstance(answer, (_Streaming, _Gone)):
                return None
            status, data, extra = answer
        except Exception:
            log.exception("servecore.http: answering %s %s failed", method, path)
            status, data, extra = error_answer(
                500, "InternalError", "the server failed to answer; see its log"
            )
        if self.count_responses:
            counts = self._counts
            if counts is None:
                counts = self._counts = response_counts(self.source)
            counts[status] = counts.get(status, 0) + 1
        if not extra:
            return status, data, _JSON_TYPE
        if not any(name == b"content-type" for name, _ in extra):
            extra = [*_JSON_TYPE, *extra]
        return status, data, extra

    async def _answer(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | _Streaming | _Gone:
        path, method = scope["path"], scope["method"]
        endpoint, rest, refused = self._route(path, method)
        if refused is not None:
            return refused
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return error_answer(
                    413, "PayloadTooLarge", f"body over {self.max_body_bytes} bytes"
                )
            if not message.get("more_body", False):
                break
        query_string = scope.get("query_string", b"")
        headers = scope.get("headers", ())
        return await self._answer_whole(
            endpoint, rest, method, path, query_string, headers, body, receive
        )

    def _route(
        self, path: str, method: str
    ) -> tuple[Any, str, tuple[int, bytes, list[tuple[bytes, bytes]]] | None]:
        """The endpoint serving ``path`` and the rest of the path below its route, or
        the error that answers the request before its body is read (stepped down, no
        endpoint there, a method it does not take)."""
        stepped = getattr(self.source, "stepped_down", None)
        if stepped is not None:  # its table may be stale: answer nothing from it
            return None, "", error_answer(503, type(stepped).__name__, str(stepped))
        endpoint, rest = self._endpoint_at(path)
        if endpoint is None:
            return None, "", error_answer(404, "NotFound", f"no endpoint serves {path}")
        if method not in endpoint.methods:
            allow = ", ".join(endpoint.methods).encode()
            why = f"endpoint {endpoint.name!r} at {path} takes {', '.join(endpoint.methods)}"
            return None, "", (*error_answer(405, "MethodNotAllowed", why)[:2], [(b"allow", allow)])
        return endpoint, rest, None

    async def _answer_whole(
        self,
        endpoint: Any,
        rest: str,
        method: str,
        path: str,
        query_string: bytes,
        headers: Any,
        body: bytes | bytearray,
        receive: Receive | None,
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | _Streaming | _Gone:
        """The answer to a request to ``endpoint`` whose body is read; its query
        watched for a disconnect through ``receive`` (not at all if ``None``)."""
        if len(body) > self.max_body_bytes:
            return error_answer(413, "PayloadTooLarge", f"body over {self.max_body_bytes} bytes")
        query = query_string.decode("latin-1")
        content_type, accept = _content_type_and_accept(headers)
        media = content_type.split(b";")[0].strip()
        if endpoint.http_request or rest or (body and not is_json(media, body)):
            # Asked for, or the JSON value alone would lose what the client sent: the
            # target gets it all.
            payload: Any = Request(
                method,
                rest,
                endpoint.route or "",
                tuple(parse_qsl(query, keep_blank_values=True)),
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                bytes(body),
            )
        elif body:
            try:
                payload = parse_body(bytes(body), self.max_depth)
            except BadBody as exc:
                return error_answer(400, "BadRequest", str(exc))
        else:
            payload = query_dict(query)
        handle = self._handle(endpoint.name)
        model = _header(headers, MODEL_HEADER, lower=False).decode("latin-1").strip()
        if model:
            handle = handle.options(timeout_s=self.timeout_s, multiplexed_model_id=model)
        sse = b"text/event-stream" in accept
        if sse or b"application/x-ndjson" in accept or endpoint.name in self._streaming:
            cached = not sse and b"application/x-ndjson" not in accept
            return _Streaming(endpoint.name, handle.stream(payload), sse, handle, payload, cached)
        try:
            if receive is None:
                result = await handle.call(payload)
            else:
                result = await self._unless_gone(receive, handle.call, payload)
        except StreamMismatch as exc:
            if not exc.streams:
                return _failure(exc)
            # A generator target: remember it, so later requests stream at once.
            self._streaming.add(endpoint.name)
            return _Streaming(endpoint.name, handle.stream(payload), sse, handle, payload, False)
        except Exception as exc:
            return _failure(exc)
        if isinstance(result, _Gone):
            return result
        return self._result(endpoint.name, path, result)

    def _handle(self, name: str) -> Any:
        """A handle to endpoint ``name`` with this app's timeout, made once per name
        (a handle looks its endpoint up on each call, so it never goes stale)."""
        handle = self._handles.get(name)
        if handle is None:
            if len(self._handles) > 2 * len(self.source.routing_table.endpoints) + 16:
                self._handles.clear()  # endpoints deleted since: do not keep theirs
            handle = self._handles[name] = self.source.get_handle(name).options(
                timeout_s=self.timeout_s
            )
        return handle

    async def _call(
        self, name: str, handle: Any, payload: Any
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        try:
            result = await handle.call(payload)
        except StreamMismatch:
            raise
        except Exception as exc:
            return _failure(exc)
        return self._result(name, "", result)

    def _result(
        self, name: str, path: str, result: Any
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        endpoint = self.source.routing_table.endpoints.get(name)
        path = path or (endpoint.route or "" if endpoint is not None else "")
        if isinstance(result, Response):
            try:
                return response_of(result)
            except BadResponse as exc:
                log.error("servecore.http: endpoint %r at %s: %s", name, path, exc)
                return error_answer(500, "BadResponse", f"endpoint {name!r} {exc}")
        try:
            return 200, dumps(result), []
        except (TypeError, ValueError, RecursionError) as exc:
            # The endpoint's own result is at fault: the client learns that much, the
            # log (once, here) gets the details.
            log.error(
                "servecore.http: endpoint %r at %s returned a result that is not JSON: %s",
                name,
                path,
                describe(exc),
            )
            why = f"endpoint {name!r} returned a result that is not JSON: {describe(exc)}"
            return error_answer(500, "ResultNotJSON", why)


#: The headers of a JSON answer (shared: never changed in place).
_JSON_TYPE: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]

#: The request header naming the multiplexed model a request is for (Ray Serve's name).
MODEL_HEADER = b"serve_multiplexed_model_id"


class _Streaming:
    """An answer that streams: the endpoint's items, sent as they come."""

    __slots__ = ("cached", "endpoint", "handle", "items", "payload", "sse")

    def __init__(
        self, endpoint: str, items: Any, sse: bool, handle: Any, payload: Any, cached: bool
    ) -> None:
        self.endpoint = endpoint
        self.items = items
        self.sse = sse
        self.handle = handle
        self.payload = payload
        #: Streamed only because the endpoint streamed before (not asked for).
        self.cached = cached


_NOTHING = object()


async def _next_item(items: Any) -> Any:
    return await items.__anext__()


async def _unless_gone(receive: Receive, call: Callable[[Any], Awaitable[Any]], arg: Any) -> Any:
    """``await call(arg)``, cancelled if the client disconnects first (then
    :data:`_GONE`): the query is cancelled in the router (counted ``cancelled``) and,
    for an async target, in its replica. Trio only (the controller's ingress)."""
    result: Any = _GONE
    error: Exception | None = None
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            # Once the body is read, an ASGI server's next message is the disconnect;
            # anything else (or an error) means there is none to wait for.
            try:
                message = await receive()
            except Exception:
                return
            if message.get("type") == "http.disconnect":
                nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            result = await call(arg)
        except Exception as exc:  # raised below, not as an exception group
            error = exc
        finally:
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


async def _send_raw(items: Any, chunks: list[bytes], endpoint: str, send: Send) -> bool:
    """Send ``chunks``, then each item of ``items`` raw (a stream under its own
    :class:`Response`); whether it ended without an error, which is logged (the status
    is gone already, so the body is cut short)."""
    buffered = getattr(items, "take_buffered", None)  # as in _send_all_items
    try:
        for data in chunks:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        async for item in items:
            data = raw_chunk(item)
            for more in buffered() if buffered is not None else ():
                try:
                    data += raw_chunk(more)
                except BadResponse:
                    await send(_chunk(data))  # the items before it, then the error
                    raise
            await send(_chunk(data))
        return True
    except Exception as exc:
        log.error(
            "servecore.http: endpoint %r: its stream failed after the status was sent, so "
            "the response is cut short: %s: %s",
            endpoint,
            type(exc).__name__,
            exc,
        )
        return False
    finally:
        await items.aclose()


async def _send_all_items(items: Any, first: Any, sse: bool, endpoint: str, send: Send) -> bytes:
    """Send ``first`` and every later item as chunks; return the stream's last chunk
    (an SSE ``end`` event, or the error that ended the stream as its last record)."""
    # Items that arrived while the last chunk was being sent go out in one chunk (the
    # router's stream and the asyncio path's offer them): a chunk costs the server a
    # write each, more than the rest of an item. Items already here are not waited for,
    # so the handle's timeout (each item within timeout_s) holds as it did.
    buffered = getattr(items, "take_buffered", None)
    try:
        if first is not _NOTHING:
            await send(_chunk(_record(first, sse, endpoint)))
            async for item in items:
                body = _record(item, sse, endpoint)
                for more in buffered() if buffered is not None else ():
                    try:
                        body += _record(more, sse, endpoint)
                    except _ItemNotJSON:
                        await send(_chunk(body))  # the items before it, then the error
                        raise
                await send(_chunk(body))
        return b"event: end\ndata: {}\n\n" if sse else b""
    except Exception as exc:
        # The status is gone already: the error is the stream's last record.
        _, body, _ = _failure(exc)
        return b"event: error\ndata: " + body + b"\n\n" if sse else body + b"\n"
    finally:
        await items.aclose()


async def _send_items_trio(
    items: Any, first: Any, sse: bool, endpoint: str, receive: Receive, send: Send
) -> None:
    """The items of a stream, on trio; a client that disconnects stops the generator."""
    reading = trio.CancelScope()
    tail = b""
    async with trio.open_nursery() as nursery:

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            reading.cancel()  # the client left: stop the generator

        nursery.start_soon(watch_disconnect)
        with reading:
            tail = await _send_all_items(items, first, sse, endpoint, send)
        if not reading.cancelled_caught:
            # Outside the reading scope: a disconnect now must not cut this send
            # short (the server closes the connection from inside it).
            await send({"type": "http.response.body", "body": tail})
        nursery.cancel_scope.cancel()


async def _send_items_asyncio(
    items: Any, first: Any, sse: bool, endpoint: str, receive: Receive, send: Send
) -> None:
    """The items of a stream, on asyncio (an ingress worker); a client that
    disconnects stops the generator."""
    import asyncio

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    producing = asyncio.ensure_future(_send_all_items(items, first, sse, endpoint, send))
    watching = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((producing, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not producing.done():  # the client left (or we were cancelled): stop it
            producing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producing
    if not producing.cancelled():
        await send({"type": "http.response.body", "body": producing.result()})


def _header(headers: Any, name: bytes, *, lower: bool = True) -> bytes:
    for key, value in headers:
        if key.lower() == name:
            return bytes(value).lower() if lower else bytes(value)
    return b""


def _content_type_and_accept(headers: Any) -> tuple[bytes, bytes]:
    """The request's ``Content-Type`` and ``Accept`` headers, lower case (``b""`` when
    absent), in one pass over the headers: every request reads both."""
    content_type = accept = None
    for key, value in headers:
        if content_type is None and (key == b"content-type" or key.lower() == b"content-type"):
            content_type = bytes(value).lower()
        elif accept is None and (key == b"accept" or key.lower() == b"accept"):
            accept = bytes(value).lower()
    return content_type or b"", accept or b""


def _record(item: Any, sse: bool, endpoint: str) -> bytes:
    """One item as a record of the body: a JSON line, or an SSE ``data:`` event."""
    try:
        data = dumps(item)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _ItemNotJSON(endpoint, describe(exc)) from None
    return b"data: " + data + b"\n\n" if sse else data + b"\n"


def _chunk(body: bytes) -> MutableMapping[str, Any]:
    return {"type": "http.response.body", "body": body, "more_body": True}


class _ItemNotJSON(ServecoreError, TypeError):
    """A streamed item that is not JSON: the stream ends with this as its error."""

    def __init__(self, endpoint: str, why: str) -> None:
        super().__init__(f"endpoint {endpoint!r} streamed an item that is not JSON: {why}")


def _failure(exc: BaseException) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The status and JSON body for a query that failed with ``exc``."""
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
    if status == 500 and isinstance(exc, ServecoreError) and exc.__cause__:
        exc = exc.__cause__
    return error_answer(status, type(exc).__name__, str(exc))


async def _send_whole(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    # JSON unless the answer names its own type (a target's Response).
    typed = any(name == b"content-type" for name, _ in headers)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *(() if typed else ((b"content-type", b"application/json"),)),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _counting(controller: Any, send: Send) -> Send:
    """``send``, counting the status of each response (404s, 405s, 400s too) for the
    ``servecore_http_responses_total`` metric."""

    async def counted(message: MutableMapping[str, Any]) -> None:
        if message.get("type") == "http.response.start":
            count_response(controller, int(message["status"]))
        await send(message)

    return counted


def hypercorn_config(config: Any, bind: str) -> Any:
    """``config`` (a ``hypercorn.config.Config``) set up to serve at ``bind``: quiet, and
    with a listen backlog sized for bursts."""
    config.bind = [bind]
    config.accesslog = None
    config.loglevel = "WARNING"  # no banner; errors still show
    config.backlog = LISTEN_BACKLOG
    return config


async def serve_http(
    controller: Controller,
    bind: str = "127.0.0.1:8000",
    *,
    timeout_s: float | None = 30.0,
    max_depth: int = 100,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``controller``'s endpoints over HTTP at ``bind`` until cancelled.

    Run it with ``nursery.start`` to learn the bound addresses (``bind`` may use port
    0): ``[url] = await nursery.start(serve_http, ctl, "127.0.0.1:0")``.
    """
    try:
        from hypercorn.config import Config
        from hypercorn.trio import serve
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "serving HTTP needs hypercorn; install it with: pip install 'servecore[http]'"
        ) from exc
    config = hypercorn_config(Config(), bind)
    app = HTTPIngress(controller, timeout_s=timeout_s, max_depth=max_depth)
    await serve(app, config, mode="asgi", task_status=task_status)  # type: ignore[arg-type]
