"""The ingress's own routes, under ``/-/`` (as Ray Serve's): for operators and load
balancers, not for user endpoints.

* ``GET /-/healthz``: 200 ``{"status": "ok"}`` when every backend runs all its
  replicas; 503 ``{"status": "unhealthy", "backends": {...}}`` naming those that do
  not (UPDATING or FAILED), so a load balancer sends traffic elsewhere meanwhile;
  503 ``{"status": "stepped_down", "error": ...}`` once the controller lost its lease
  to another (it serves nothing any more).
* ``GET /-/routes``: ``{route: endpoint}`` for every endpoint with a route.
* ``GET /-/metrics``: the Prometheus text format (see :mod:`servecore.metrics`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from servecore._core.transitions import BackendStatus
from servecore._core.validation import OPERATOR_PREFIX

__all__ = ["PREFIX", "answer_ops"]

#: The core refuses endpoint routes under it (``InvalidRoute``).
PREFIX = OPERATOR_PREFIX

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def healthz(controller: Any) -> tuple[int, dict[str, Any]]:
    """Status code and body of ``/-/healthz``."""
    stepped = getattr(controller, "stepped_down", None)
    if stepped is not None:
        return 503, {"status": "stepped_down", "error": str(stepped)}
    unhealthy = {
        tag: b.status.value
        for tag, b in sorted(controller.state.backends.items())
        if b.status is not BackendStatus.HEALTHY
    }
    if unhealthy:
        return 503, {"status": "unhealthy", "backends": unhealthy}
    return 200, {"status": "ok"}


def routes(controller: Any) -> dict[str, str]:
    """Body of ``/-/routes``."""
    return {
        ep.route: name
        for name, ep in sorted(controller.state.endpoints.items())
        if ep.route is not None
    }


async def _send(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type)],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def answer_ops(controller: Any, scope: MutableMapping[str, Any], send: Send) -> bool:
    """Answer ``scope`` if its path is one of the ``/-/`` routes; return whether it was."""
    path = scope["path"]
    if not path.startswith(PREFIX):
        return False
    name = path[len(PREFIX) :]
    json_type = b"application/json"
    if name not in {"healthz", "routes", "metrics"}:
        body = {"error": f"no operator route {path}; try /-/healthz, /-/routes, /-/metrics"}
        await _send(send, 404, json.dumps({**body, "type": "NotFound"}).encode(), json_type)
        return True
    if scope["method"] not in {"GET", "HEAD"}:
        body = {"error": f"{path} takes GET", "type": "MethodNotAllowed"}
        await _send(send, 405, json.dumps(body).encode(), json_type)
        return True
    if name == "healthz":
        status, data = healthz(controller)
        await _send(send, status, json.dumps(data).encode(), json_type)
    elif name == "routes":
        await _send(send, 200, json.dumps(routes(controller)).encode(), json_type)
    else:
        try:
            from servecore.metrics import CONTENT_TYPE_LATEST, exposition
        except ImportError as exc:
            body = {"error": str(exc), "type": "NotImplemented"}
            await _send(send, 501, json.dumps(body).encode(), json_type)
            return True
        await _send(send, 200, exposition(controller), CONTENT_TYPE_LATEST.encode())
    return True
