"""The ingress's own routes, under ``/-/`` (as Ray Serve's): for operators and load
balancers, not for user endpoints.

* ``GET /-/healthz``: *liveness* (Kubernetes' livenessProbe): 200 ``{"status": "ok"}``
  whenever the process and its loop answer, whatever its backends do. A FAILED backend
  is not cured by restarting the server, so it never fails this probe. The one
  exception: 503 ``{"status": "stepped_down", "error": ...}`` once the controller
  lost its lease to another, since it serves nothing any more and a restart (as a
  standby) is what it needs.
* ``GET /-/readyz``: *readiness* (readinessProbe, a load balancer's check): 200
  ``{"status": "ready"}`` once the state is loaded, this controller leads its store
  (holds its lease, for a store that has one), and every endpoint with a route has a
  RUNNING replica to send a query to (or a backend that wakes on demand); 503
  ``{"status": "not ready", "reasons": [...]}`` otherwise, each reason naming what is
  missing, so traffic goes elsewhere meanwhile.
* ``GET /-/routes``: ``{route: endpoint}`` for every endpoint with a route.
* ``GET /-/metrics``: the Prometheus text format (see :mod:`servecore.metrics`).
* ``GET /-/status.json``, ``GET /-/events``, ``GET /-/dashboard``: the live status page,
  its JSON and its Server-Sent Events feed (see :mod:`servecore._serving.dashboard`).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from servecore._core.validation import OPERATOR_PREFIX

__all__ = [
    "PREFIX",
    "answer_ops",
    "count_response",
    "http_responses",
    "readyz",
    "response_counts",
]

#: The core refuses endpoint routes under it (``InvalidRoute``).
PREFIX = OPERATOR_PREFIX

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

#: The routes, in the order a 404 lists them.
ROUTES = ("healthz", "readyz", "routes", "metrics", "status.json", "events", "dashboard")


#: Responses the ingress sent, by status code, per controller (read by the metrics).
_RESPONSES: weakref.WeakKeyDictionary[Any, dict[int, int]] = weakref.WeakKeyDictionary()


def count_response(controller: Any, status: int) -> None:
    """Count one HTTP response of ``status`` sent for ``controller``."""
    counts = _RESPONSES.setdefault(controller, {})
    counts[status] = counts.get(status, 0) + 1


def response_counts(controller: Any) -> dict[int, int]:
    """The live counts :func:`count_response` keeps for ``controller`` (status code to
    responses), for a caller that counts many responses itself."""
    return _RESPONSES.setdefault(controller, {})


def http_responses(controller: Any) -> dict[int, int]:
    """The HTTP responses sent for ``controller`` so far, by status code: every one,
    404s, 405s and 400s included, not only the queries that reached the router."""
    return dict(sorted(_RESPONSES.get(controller, {}).items()))


def healthz(controller: Any) -> tuple[int, dict[str, Any]]:
    """Status code and body of ``/-/healthz``: liveness only (see the module)."""
    stepped = getattr(controller, "stepped_down", None)
    if stepped is not None:
        return 503, {"status": "stepped_down", "error": str(stepped)}
    return 200, {"status": "ok"}


def _leads(store: Any) -> str | None:
    """Why ``store`` says this controller does not lead it, or ``None``."""
    holds = getattr(store, "holds_lease", None)
    if holds is None or holds:
        return None  # a store without a lease is held by its lock while open
    return (
        f"this controller does not hold the lease of its store "
        f"({getattr(store, 'where', store)!r}); another controller leads it"
    )


def readyz(controller: Any) -> tuple[int, dict[str, Any]]:
    """Status code and body of ``/-/readyz``: readiness (see the module)."""
    reasons: list[str] = []
    not_leader = _leads(getattr(controller, "store", None))
    if not_leader is not None:
        reasons.append(not_leader)
    state = controller.state
    table = controller.routing_table
    # Deaths seen but not saved yet (the store does not answer) count as gone.
    died = set(getattr(controller, "unrecorded_deaths", {}))
    for name, ep in sorted(state.endpoints.items()):
        if ep.route is None:
            continue  # reached by handles only: not this ingress's to be ready for
        serving = [t for t, w in ep.traffic.items() if w > 0]
        if not serving:
            reasons.append(f"endpoint {name!r} at {ep.route} has no traffic set")
            continue
        routes = [table.backends.get(t) for t in serving]
        if any(r is not None and (set(r.replicas) - died or r.wakes_on_demand) for r in routes):
            continue
        why = ", ".join(
            f"{t!r} {b.status.value}" if (b := state.backends.get(t)) is not None else repr(t)
            for t in serving
        )
        reasons.append(f"endpoint {name!r} at {ep.route} has no RUNNING replica (backends {why})")
    if reasons:
        return 503, {"status": "not ready", "reasons": reasons}
    return 200, {"status": "ready"}


def routes(controller: Any) -> dict[str, str]:
    """Body of ``/-/routes``."""
    return {
        ep.route: name
        for name, ep in sorted(controller.state.endpoints.items())
        if ep.route is not None
    }


async def _send(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


#: The page is ours alone: no script, style or connection from anywhere else, no frame.
_PAGE_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        b"connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-cache"),
)


async def answer_ops(
    controller: Any, scope: MutableMapping[str, Any], receive: Receive, send: Send
) -> bool:
    """Answer ``scope`` if its path is one of the ``/-/`` routes; return whether it was."""
    path = scope["path"]
    if not path.startswith(PREFIX):
        return False
    name = path[len(PREFIX) :]
    json_type = b"application/json"
    if name not in ROUTES:
        listed = ", ".join(PREFIX + route for route in ROUTES)
        body = {"error": f"no operator route {path}; try {listed}"}
        await _send(send, 404, json.dumps({**body, "type": "NotFound"}).encode(), json_type)
        return True
    if scope["method"] not in {"GET", "HEAD"}:
        body = {"error": f"{path} takes GET", "type": "MethodNotAllowed"}
        await _send(send, 405, json.dumps(body).encode(), json_type)
        return True
    if name == "healthz":
        status, data = healthz(controller)
        await _send(send, status, json.dumps(data).encode(), json_type)
    elif name == "readyz":
        status, data = readyz(controller)
        await _send(send, status, json.dumps(data).encode(), json_type)
    elif name == "routes":
        await _send(send, 200, json.dumps(routes(controller)).encode(), json_type)
    elif name in {"status.json", "events", "dashboard"}:
        from servecore._serving import dashboard

        if name == "status.json":
            feed = json.dumps(dashboard.status_feed(controller), default=str).encode()
            await _send(send, 200, feed, json_type, ((b"cache-control", b"no-cache"),))
        elif name == "events":
            await dashboard.stream_events(controller, receive, send)
        else:
            page = dashboard.dashboard_html()
            await _send(send, 200, page, b"text/html; charset=utf-8", _PAGE_HEADERS)
    else:
        try:
            from servecore.metrics import CONTENT_TYPE_LATEST, exposition
        except ImportError as exc:
            body = {"error": str(exc), "type": "NotImplemented"}
            await _send(send, 501, json.dumps(body).encode(), json_type)
            return True
        await _send(send, 200, exposition(controller), CONTENT_TYPE_LATEST.encode())
    return True
