"""The router's bookkeeping per backend and per endpoint: queues, replica slots, choices.

:class:`~servecore.router.Router` owns one :class:`BackendState` per backend in its
routing table (the replicas it may send to, how many queries each runs, the queries
waiting for a slot or a batch) and one :class:`EndpointRoute` per endpoint (its traffic
split, ready to draw from). Everything here runs on the router's trio thread, except
``acquire``/``add`` of a replica slot, which host threads call too for the direct path,
under the backend's ``lock``.
"""

from __future__ import annotations

import bisect
import itertools
import random
import threading
from collections import deque
from typing import Any

import trio

from servecore._core.transitions import BackendRoute, Endpoint
from servecore.runtimes._protocol import Query

__all__ = [
    "MODELS_REMEMBERED",
    "MODEL_HOLDERS",
    "BackendState",
    "EndpointRoute",
    "Waiter",
    "no_replica_why",
    "waits_for_replicas",
]

#: Multiplexed model ids a backend's routing remembers replicas for (least recently
#: used dropped): enough for a large model zoo, bounded for ids a client makes up.
MODELS_REMEMBERED = 4096
#: Replicas remembered per model id: a popular model spreads over a few replicas.
MODEL_HOLDERS = 4


class Waiter:
    """A query waiting in a backend's queue, for a replica slot or for its batch."""

    __slots__ = (
        "arrival",
        "batched",
        "dispatched",
        "done",
        "endpoint",
        "error",
        "event",
        "query",
        "resends",
        "result",
        "tag",
    )

    def __init__(self, endpoint: str, query: Query, *, batched: bool, arrival: float) -> None:
        self.endpoint = endpoint
        self.query = query
        self.batched = batched
        self.arrival = arrival
        self.event = trio.Event()
        self.done = False  # its caller gave up, or it was answered
        self.dispatched = False  # (batched) sent in a batch
        self.tag: str | None = None  # (not batched) the replica slot it was handed, counted
        self.result: Any = None
        self.resends = 0  # times it was queued again because its replica died first
        self.error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if not self.done:
            self.done = True
            self.result = result
            self.error = error
        self.event.set()


class BackendState:
    """Per-backend routing state: live replicas, their load, and the wait queue.

    The wait queue is touched on the trio thread only. The replicas and their load are
    also used by host threads calling synchronous handles directly
    (:meth:`servecore.router.Router.call_blocking`), so they change only under ``lock``.
    """

    def __init__(self, route: BackendRoute) -> None:
        self.tag = route.tag
        self.route = route
        self.lock = threading.Lock()
        self.live: list[str] = list(route.replicas)
        self.outstanding: dict[str, int] = dict.fromkeys(route.replicas, 0)
        self.dead: set[str] = set()  # answered ReplicaDiedError; skipped until the table drops them
        self.waiting: deque[Waiter] = deque()
        self.n_waiting = 0
        self._turn = itertools.count()
        #: Multiplexed model id -> the replicas it was last sent to, most recent last
        #: (they likely hold it loaded); at most MODELS_REMEMBERED ids, oldest dropped.
        self.models: dict[str, list[str]] = {}

    def set_route(self, route: BackendRoute | None) -> None:
        """Adopt the backend's new route (None: the backend is gone)."""
        with self.lock:
            if route is None:
                self.live = []
                return
            self.route = route
            self.dead &= set(route.replicas)
            self.live = [t for t in route.replicas if t not in self.dead]
            old = self.outstanding
            self.outstanding = {t: n for t, n in old.items() if n > 0}
            for t in self.live:
                self.outstanding.setdefault(t, 0)

    def acquire(self, limit: int, model: str | None = None) -> str | None:
        """Pick a replica below ``limit`` outstanding queries and count one more on it.

        For a query naming a multiplexed ``model``, a replica it was sent to recently
        (which likely holds it loaded) is preferred while one has a free slot; the
        least loaded replica otherwise, which is then remembered for the model.
        """
        with self.lock:
            tag = self._pick_holding(model, limit) if model else None
            if tag is None:
                tag = self.pick(limit)
            if tag is not None:
                self.outstanding[tag] += 1
                if model:
                    self._remember(model, tag)
            return tag

    def _pick_holding(self, model: str, limit: int) -> str | None:
        best: str | None = None
        best_load = limit
        for tag in reversed(self.models.get(model, ())):
            load = self.outstanding.get(tag)
            if load is not None and load < best_load and tag in self.live:
                best, best_load = tag, load
        return best

    def _remember(self, model: str, tag: str) -> None:
        holders = self.models.pop(model, None) or []
        if tag in holders:
            holders.remove(tag)
        holders.append(tag)
        del holders[:-MODEL_HOLDERS]
        self.models[model] = holders  # re-inserted: the most recently used id last
        if len(self.models) > MODELS_REMEMBERED:
            del self.models[next(iter(self.models))]

    def add(self, tag: str, n: int) -> None:
        """Count ``n`` more queries on ``tag`` (negative: fewer)."""
        with self.lock:
            left = self.outstanding.get(tag, 0) + n
            if left > 0 or tag in self.live:
                self.outstanding[tag] = left
            else:
                self.outstanding.pop(tag, None)

    def pick(self, limit: int) -> str | None:
        """The live replica with the fewest outstanding queries below ``limit``."""
        live = self.live
        n = len(live)
        if n == 1:
            only = live[0]
            return only if self.outstanding[only] < limit else None
        best: str | None = None
        best_load = limit
        start = next(self._turn) % n if n else 0
        outstanding = self.outstanding
        for i in range(n):
            tag = live[(start + i) % n]
            load = outstanding[tag]
            if load < best_load:
                best, best_load = tag, load
                if load == 0:
                    break
        return best

    def mark_dead(self, tag: str) -> None:
        with self.lock:
            if tag in self.live:
                self.dead.add(tag)
                self.live = [t for t in self.live if t != tag]


class EndpointRoute:
    """An endpoint's traffic split, prepared for drawing."""

    __slots__ = ("cumulative", "endpoint", "shadows", "tags")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        items = sorted(endpoint.traffic.items())
        self.tags = tuple(tag for tag, _ in items)
        self.cumulative = list(itertools.accumulate(w for _, w in items))
        self.shadows = tuple(sorted(endpoint.shadow.items()))

    def choose(self, rng: random.Random) -> str:
        if len(self.tags) == 1:
            return self.tags[0]
        i = bisect.bisect_right(self.cumulative, rng.random() * self.cumulative[-1])
        return self.tags[min(i, len(self.tags) - 1)]


def no_replica_why(b: BackendState) -> str:
    if b.route.failure is not None:
        return (
            f"backend {b.tag!r} is FAILED: {b.route.failure}; fix the code, then "
            f"retry_backend({b.tag!r}), change its config, or send traffic elsewhere"
        )
    return (
        f"backend {b.tag!r} has no running replica (num_replicas is 0, or its replicas "
        f"are starting or being replaced); retry once it has one"
    )


def waits_for_replicas(b: BackendState) -> bool:
    """Whether queries to ``b`` wait for a replica instead of failing when it has none:
    it may scale from zero, and it has not FAILED."""
    return b.route.wakes_on_demand and b.route.failure is None
