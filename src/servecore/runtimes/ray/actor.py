"""The replica actor: what runs in a Ray worker process.

Ray imports this module in its workers by the actor class's path, so it imports only
what a replica needs.

The actor sends each batch's results back pickled by itself (``bytes``, with the
subprocess replica's :func:`~servecore.runtimes.subprocess.wire.encode_results`), and
the host unpickles them on its trio thread with ``decode_reply``. Left to Ray, the
results would be unpickled on one of Ray's threads, where whatever unpickling raises is
out of the caller's reach: a ``SystemExit`` there ends that thread and the call never
completes. Bytes are all Ray has to decode, and that cannot fail.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray

from servecore.runtimes._protocol import Query
from servecore.runtimes.ray.errors import carry
from servecore.runtimes.subprocess.wire import encode_results
from servecore.runtimes.toolkit import prepare_replica

__all__ = ["PROTOCOL", "ServecoreReplica"]

#: What this actor speaks, reported by ``ready()`` as ``"protocol"``. 3: ``ready()``
#: and ``watch()`` run in the ``control`` concurrency group (never behind a query), and
#: ``ready()`` reports the replica's health-probe settings and where it runs. 2:
#: ``run()`` returns the batch's results pickled (``bytes``). Actors started by a
#: servecore before versions existed (1: ``run()`` returns the list itself, for Ray to
#: pickle) report none. Detached actors outlive an upgrade of the controller, which may
#: adopt them.
PROTOCOL = 3

#: The concurrency group of the runtime's own calls, and its threads: the long
#: ``watch()``, a ``watch(0)`` probe, an adoption's ``ready()`` and a spare.
CONTROL_GROUP = "control"
CONTROL_THREADS = 4


@ray.remote(concurrency_groups={CONTROL_GROUP: CONTROL_THREADS})  # type: ignore[call-overload]
class ServecoreReplica:
    """One replica: builds the user's object once, then runs batches on it.

    Batches (and the object's ``check_health()``) run in the default concurrency group,
    one at a time (``max_concurrency=1``). The runtime's own calls (``ready``, ``watch``)
    run in the ``control`` group, on threads of their own, so that a replica busy with
    a long query still answers its health probe and an adopting controller at once.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self._spec = spec
        self._lock = threading.Lock()
        self._run: Callable[[Sequence[Query]], list[Any]] | None = None
        self._check: Callable[[], object] | None = None
        self._error: BaseException | None = None

    def _build(self) -> Callable[[Sequence[Query]], list[Any]]:
        with self._lock:
            if self._run is not None:
                return self._run
            if self._error is not None:
                raise self._error
            spec = self._spec
            try:
                self._run, self._check = prepare_replica(
                    spec["target"],
                    spec["init_args"],
                    spec["init_kwargs"],
                    backend=spec["backend"],
                    max_batch_size=spec["max_batch_size"],
                    user_config=spec["user_config"],
                )
            except Exception as exc:
                self._error = exc
                raise
            return self._run

    @ray.method(concurrency_group=CONTROL_GROUP)
    def ready(self) -> dict[str, Any]:
        """Build the replica object (once); return where it runs, whether it has a
        ``check_health()``, and its health-probe settings."""
        try:
            self._build()
        except Exception as exc:
            raise carry(exc) from None
        context = ray.get_runtime_context()
        return {
            "protocol": PROTOCOL,
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
            "actor_id": context.get_actor_id(),
            "health_check": self._check is not None,
            "health_check_period_s": self._spec.get("health_check_period_s"),
            "health_check_timeout_s": self._spec.get("health_check_timeout_s"),
        }

    def check_health(self) -> bool:
        """Run the object's ``check_health()``: between batches, like a batch."""
        check = self._check
        if check is None:
            return False
        try:
            check()
        except Exception as exc:
            raise carry(exc) from None
        return True

    def run(self, batch: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]) -> bytes:
        """Run one batch of ``(args, kwargs)`` pairs; one result per query, in order,
        pickled (see the module docstring). A result pickle refuses raises
        :class:`~servecore.UnpicklableResult` naming its type.

        Pairs, not :class:`Query` objects, cross the wire: Ray serializes plain tuples
        faster than objects it has to pickle.
        """
        try:
            run = self._run
            if run is None:
                run = self._build()
            results = run([Query(args=args, kwargs=kwargs) for args, kwargs in batch])
            return encode_results(self._spec["tag"], results, "ray")
        except Exception as exc:
            raise carry(exc) from None

    @ray.method(concurrency_group=CONTROL_GROUP)
    def watch(self, period_s: float) -> bool:
        """Return after ``period_s``; Ray fails the call if the actor dies first.
        ``watch(0)`` is the health probe: it answers at once if the process can."""
        time.sleep(period_s)
        return True
