"""The live status page of a controller's own ingress: ``/-/status.json``, ``/-/events``
and ``/-/dashboard`` (read-only, like every ``/-/`` route).

* ``/-/status.json``: :func:`status_feed`, one JSON object: ``servecore status --json``'s
  fields (endpoints with their traffic split, backends, replicas, ``seq``, ``healthy``)
  plus ``controller`` (name, readiness, whether it stepped down), ``autoscaling`` (each
  autoscaling backend's range, current decision, pending proposal and last observed
  load), ``queries`` (per endpoint: queries by outcome since the router was made, and
  queries per second over the last :data:`RATE_WINDOW_S`) and ``events`` (the
  controller's recent lifecycle events, oldest first).
* ``/-/events``: the same object as Server-Sent Events (``text/event-stream``): one
  ``data:`` message at once, then one whenever it changes, checked every
  :data:`FEED_INTERVAL_S` (so at most four a second however busy the server is), and a
  comment every :data:`KEEPALIVE_S` while nothing changes so that proxies keep the
  connection. A stream ends when its client goes away or the server shuts down
  (:func:`end_streams`); browsers reconnect on their own (``retry: 1000``). At most
  :data:`MAX_STREAMS` at once per controller (503 past it).
* ``/-/dashboard``: ``dashboard.html``, one static page (inline CSS and JS, no external
  asset, no build step) that renders the event stream. It writes every string it
  shows with ``textContent``, never as HTML: names, targets and errors come from users.

Nothing here changes the controller: it reads its state, status, router statistics and
recent events.
"""

from __future__ import annotations

import json
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from importlib import resources
from typing import Any

import attrs
import trio

from servecore._controller.status import live_status

__all__ = [
    "FEED_INTERVAL_S",
    "KEEPALIVE_S",
    "MAX_STREAMS",
    "RATE_WINDOW_S",
    "QueryRates",
    "dashboard_html",
    "end_streams",
    "status_feed",
    "stream_events",
]

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

#: How often an event stream checks for a change (seconds): a page that reads live, at
#: a cost of one status computation per stream per interval.
FEED_INTERVAL_S = 0.25
#: A comment line after this long without a message (seconds), so that proxies and
#: load balancers do not close an idle stream.
KEEPALIVE_S = 15.0
#: Query rates are averaged over this window (seconds): long enough to smooth bursts,
#: short enough that a stopped load reads 0 soon after.
RATE_WINDOW_S = 10.0
#: Event streams one controller serves at once: each costs a status computation every
#: :data:`FEED_INTERVAL_S`, so a runaway client cannot take the controller's loop.
MAX_STREAMS = 32


class QueryRates:
    """Queries per second per endpoint, from samples of the router's running totals.

    Each :meth:`rates` call adds a sample (at most one per ``FEED_INTERVAL_S``) and
    answers the rate over the last ``window_s``: the totals now minus those of the
    newest sample at least ``window_s`` old (or of the oldest there is), over the time
    between them. ``None`` until two samples are apart.
    """

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, int]]] = deque()

    def rates(self, now: float, totals: dict[str, int]) -> dict[str, float | None]:
        samples = self._samples
        if not samples or now - samples[-1][0] >= FEED_INTERVAL_S * 0.8:
            samples.append((now, dict(totals)))
        while len(samples) > 1 and samples[1][0] <= now - self.window_s:
            samples.popleft()
        since, before = samples[0]
        elapsed = now - since
        if elapsed <= 0:
            return {endpoint: None for endpoint in totals}
        # A replaced router starts its counts again: never a negative rate.
        return {
            endpoint: round(max(0, n - before.get(endpoint, 0)) / elapsed, 2)
            for endpoint, n in totals.items()
        }


#: Per controller: its query-rate samples, shared by its streams and status.json.
_RATES: weakref.WeakKeyDictionary[Any, QueryRates] = weakref.WeakKeyDictionary()
#: Per controller: set when its server shuts down, to end its streams.
_CLOSING: weakref.WeakKeyDictionary[Any, trio.Event] = weakref.WeakKeyDictionary()
#: Per controller: its event streams open now.
_OPEN: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _autoscaling(state: Any) -> dict[str, Any]:
    """Each autoscaling backend's range, decision state and last observed load."""
    views: dict[str, Any] = {}
    for tag, backend in sorted(state.backends.items()):
        config = backend.config.autoscaling
        if config is None:
            continue
        decision = backend.autoscale
        pending = decision.pending if decision is not None else None
        observed = state.observations.get(tag)
        views[tag] = {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
            "replicas": backend.wanted_replicas,
            "decisions": decision.decisions if decision is not None else 0,
            "decided_at": decision.decided_at if decision is not None else None,
            "pending": (
                None
                if pending is None
                else {
                    "direction": getattr(pending.direction, "value", str(pending.direction)),
                    "replicas": pending.replicas,
                    "since": pending.since,
                }
            ),
            "observed": (
                None
                if observed is None
                else {"ongoing": observed.ongoing, "desired": observed.desired, "at": observed.at}
            ),
        }
    return views


def _queries(controller: Any, now: float) -> dict[str, Any]:
    """Per endpoint: queries by outcome since the router was made, and their rate."""
    statistics = controller.router_statistics()
    outcomes: dict[str, dict[str, int]] = {}
    for (endpoint, _backend, outcome), n in statistics.queries.items() if statistics else ():
        by_outcome = outcomes.setdefault(endpoint, {})
        by_outcome[outcome] = by_outcome.get(outcome, 0) + n
    totals = {endpoint: sum(by.values()) for endpoint, by in outcomes.items()}
    rates = _RATES.setdefault(controller, QueryRates()).rates(now, totals)
    return {
        endpoint: {
            "total": totals[endpoint],
            "outcomes": dict(sorted(outcomes[endpoint].items())),
            "per_second": rates.get(endpoint),
        }
        for endpoint in sorted(totals)
    }


def status_feed(controller: Any, now: float | None = None) -> dict[str, Any]:
    """What ``/-/status.json`` answers and ``/-/events`` pushes (see the module);
    ``now`` (trio's clock by default) times the query rates."""
    from servecore._serving.ops_http import readyz

    if now is None:
        now = trio.current_time()
    data = live_status(controller).as_dict()
    ready_status, ready = readyz(controller)
    stepped = getattr(controller, "stepped_down", None)
    data["controller"] = {
        "name": getattr(controller, "name", None),
        "ready": ready_status == 200,
        "not_ready": ready.get("reasons", []),
        "stepped_down": None if stepped is None else str(stepped),
    }
    data["autoscaling"] = _autoscaling(controller.state)
    data["queries"] = _queries(controller, now)
    data["events"] = [attrs.asdict(event) for event in controller.recent_events()]
    return data


def dashboard_html() -> bytes:
    """The page ``/-/dashboard`` serves (``dashboard.html`` beside this module)."""
    return resources.files(__package__).joinpath("dashboard.html").read_bytes()


def end_streams(controller: Any) -> None:
    """End ``controller``'s event streams now and refuse new ones (its server is
    shutting down: a stream must not hold the graceful drain open)."""
    _CLOSING.setdefault(controller, trio.Event()).set()


def _json(data: dict[str, Any]) -> bytes:
    # ASCII escapes keep any string (even a lone surrogate) encodable, on one line.
    return json.dumps(data, default=str).encode()


def _chunk(body: bytes) -> dict[str, Any]:
    return {"type": "http.response.body", "body": body, "more_body": True}


async def stream_events(controller: Any, receive: Receive, send: Send) -> None:
    """Answer ``/-/events``: the status feed as Server-Sent Events (see the module)."""
    closing = _CLOSING.setdefault(controller, trio.Event())
    json_type = [(b"content-type", b"application/json")]
    if closing.is_set() or _OPEN.get(controller, 0) >= MAX_STREAMS:
        why = (
            "the server is shutting down"
            if closing.is_set()
            else f"{MAX_STREAMS} event streams are open already; close one, or poll "
            f"/-/status.json instead"
        )
        body = json.dumps({"error": why, "type": "Unavailable"}).encode()
        await send({"type": "http.response.start", "status": 503, "headers": json_type})
        await send({"type": "http.response.body", "body": body})
        return
    _OPEN[controller] = _OPEN.get(controller, 0) + 1
    try:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    # nginx buffers responses unless told not to.
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        await send(_chunk(b"retry: 1000\n\n"))
        async with trio.open_nursery() as nursery:

            async def until_gone() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            async def until_closing() -> None:
                await closing.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_gone)
            nursery.start_soon(until_closing)
            last: bytes | None = None
            quiet = 0.0
            while True:
                message = _json(status_feed(controller))
                if message != last:
                    await send(_chunk(b"data: " + message + b"\n\n"))
                    last, quiet = message, 0.0
                elif quiet >= KEEPALIVE_S:
                    await send(_chunk(b": keep-alive\n\n"))
                    quiet = 0.0
                await trio.sleep(FEED_INTERVAL_S)
                quiet += FEED_INTERVAL_S
        if closing.is_set():
            # End the response cleanly: the browser reconnects to the next server.
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        _OPEN[controller] -= 1
