"""The Runtime protocol: what carries effects out (DESIGN §6).

A runtime never touches the controller's state. It starts and stops replicas when told
to, says which replicas are alive, runs batches of queries on them, and reports deaths.
Plugins need no base class: anything with these methods is a runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from servecore._core import Event, StartReplica

__all__ = ["Query", "Report", "Runtime"]

#: The callback a runtime uses to report events (``ReplicaDied`` above all). It must be
#: called from the trio thread the runtime was opened in; from another thread, use
#: ``trio.from_thread.run_sync(report, event, trio_token=token)``.
Report = Callable[[Event], None]


@attrs.frozen(kw_only=True)
class Query:
    """One call's arguments, as passed to ``handle.call(*args, **kwargs)``."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = attrs.field(factory=dict)


@runtime_checkable
class Runtime(Protocol):
    """What the controller and router need of a runtime. All methods run on trio."""

    async def open(self, *, namespace: str, report: Report) -> None:
        """Attach to the controller named ``namespace``; events go to ``report``.

        Called once per controller before :meth:`list_replicas`. A runtime whose
        replicas outlive the host (subprocess, Ray) finds them again here.
        """

    async def close(self) -> None:
        """Detach. In-process replicas stop; out-of-process ones keep running."""

    async def start_replica(self, effect: StartReplica) -> None:
        """Start ``effect.tag`` and return once it is ready; raise on failure.

        Idempotent by tag: a replica already alive under that tag is not started twice.
        """

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        """Drain the replica, then stop it, forcing after ``timeout_s``. Idempotent."""

    async def list_replicas(self) -> frozenset[str]:
        """The tags alive in this runtime's namespace (used by recovery)."""

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        """Run one batch on one replica; return one result per query, in order.

        A user exception is raised as is (for a batch, it fails the whole batch);
        a replica that dies mid-call raises :class:`~servecore.ReplicaDiedError`.
        """
        ...
