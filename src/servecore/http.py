"""HTTP ingress: serve endpoints at their routes (the top layer of docs/design.md §1).

:class:`HTTPIngress` is an ASGI 3 application that finds the endpoint whose ``route``
matches the request path, checks the method against the endpoint's ``methods``, and
sends one query through the controller's router:

* a request with a body passes the body parsed as JSON (``POST /echo {"text": "hi"}``
  calls the target with ``{"text": "hi"}``);
* a request without one passes its query string as a dict of strings
  (``GET /echo?text=hi`` calls it with ``{"text": "hi"}``).

The result is answered as JSON. Errors map onto status codes: no endpoint at the path
404, a method the endpoint does not take 405, a body that is not JSON 400, the user's
own exception 500, a replica that died 502, no replica or too many queries waiting 503,
a timeout 504; the body is ``{"error": ..., "type": ...}``.

:func:`serve_http` runs it with hypercorn on the controller's own trio loop (handles are
bound to it)::

    async with servecore.open_controller(...) as ctl, trio.open_nursery() as nursery:
        await nursery.start(servecore.http.serve_http, ctl, "127.0.0.1:8000")

hypercorn is an optional extra: ``pip install 'servecore[http]'``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

import trio

from servecore._controller import Controller
from servecore._errors import (
    BackpressureError,
    EndpointNotFound,
    NoReplicaError,
    ReplicaDiedError,
    ServecoreError,
)

__all__ = ["HTTPIngress", "serve_http"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Status codes for errors that are not the user's own.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (EndpointNotFound, 404),
    (ReplicaDiedError, 502),
    (NoReplicaError, 503),
    (BackpressureError, 503),
    (TimeoutError, 504),
)


class HTTPIngress:
    """An ASGI app serving ``controller``'s endpoints at their routes.

    ``timeout_s`` bounds each query (504 past it; ``None`` waits as long as it takes);
    ``max_body_bytes`` bounds a request body (413 past it).
    """

    def __init__(
        self,
        controller: Controller,
        *,
        timeout_s: float | None = 30.0,
        max_body_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.controller = controller
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            status, body, headers = await self._answer(scope, receive)
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json"), *headers],
                }
            )
            await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _endpoint_at(self, path: str) -> Any:
        for endpoint in self.controller.routing_table.endpoints.values():
            if endpoint.route == path:
                return endpoint
        return None

    async def _answer(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        path, method = scope["path"], scope["method"]
        endpoint = self._endpoint_at(path)
        if endpoint is None:
            return _error(404, "NotFound", f"no endpoint serves {path}")
        if method not in endpoint.methods:
            allow = ", ".join(endpoint.methods).encode()
            why = f"endpoint {endpoint.name!r} at {path} takes {', '.join(endpoint.methods)}"
            return (*_error(405, "MethodNotAllowed", why)[:2], [(b"allow", allow)])
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return _error(413, "PayloadTooLarge", f"body over {self.max_body_bytes} bytes")
            if not message.get("more_body", False):
                break
        if body:
            try:
                payload: Any = json.loads(body)
            except ValueError as exc:
                return _error(400, "BadRequest", f"the body is not JSON: {exc}")
        else:
            payload = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        handle = self.controller.get_handle(endpoint.name).options(timeout_s=self.timeout_s)
        try:
            result = await handle.call(payload)
        except Exception as exc:
            status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
            if status == 500 and isinstance(exc, ServecoreError) and exc.__cause__:
                exc = exc.__cause__  # type: ignore[assignment]
            return _error(status, type(exc).__name__, str(exc))
        try:
            return 200, _dumps(result), []
        except (TypeError, ValueError) as exc:
            return _error(500, "TypeError", f"the result is not JSON-serializable: {exc}")


def _dumps(value: Any) -> bytes:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not JSON")
    return json.dumps(value, allow_nan=False).encode()


def _error(status: int, kind: str, message: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    return status, json.dumps({"error": message, "type": kind}).encode(), []


async def serve_http(
    controller: Controller,
    bind: str = "127.0.0.1:8000",
    *,
    timeout_s: float | None = 30.0,
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
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.loglevel = "WARNING"  # no banner; errors still show
    app = HTTPIngress(controller, timeout_s=timeout_s)
    await serve(app, config, mode="asgi", task_status=task_status)  # type: ignore[arg-type]
