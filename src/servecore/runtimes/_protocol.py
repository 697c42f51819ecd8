"""The Runtime protocol: what carries effects out (docs/design.md §6).

A runtime never touches the controller's state. It starts and stops replicas when told
to, says which replicas are alive, runs batches of queries on them, and reports deaths.
Plugins need no base class: anything with the four required methods is a runtime.

Theory of operation, as the controller drives it:

1. ``open(namespace=..., report=...)`` (optional) once per controller, on the trio
   thread that controller runs on; then ``list_replicas()`` for recovery.
2. ``start_replica(effect)`` / ``stop_replica(tag, timeout_s)`` for each effect, many
   at once (each in its own trio task); ``call(tag, batch)`` from the router, also many
   at once. None of them is ever called on a tag concurrently with a start of the same
   tag except to restate it (starts are idempotent).
3. ``close()`` (optional) once, when the controller exits or crashes. In-process
   replicas stop; replicas that outlive the host (processes, actors) keep running, to
   be found again by ``list_replicas()`` under the same namespace.

Events a runtime reports, through ``report``:

* ``ReplicaDied(tag, reason)`` -- for a replica that dies *after* its
  ``start_replica`` returned (a crash, a failed health check, a kill). That is the
  only event a runtime needs to report.
* Not start failures: a start that fails *raises* from ``start_replica`` (with the
  replica's own error in the message), and the controller turns it into
  ``ReplicaStartFailed``. Not stops: ``stop_replica`` returning is the answer.
* Not deaths of replicas it was told to stop: a stop is not news.

Threads: ``report`` must be called on the trio thread the runtime was opened on
(where ``open`` ran). From any other thread (a watcher thread, a callback of a client
library), hand the event over with the token captured in ``open``::

    async def open(self, *, namespace, report):
        self._report, self._token = report, trio.lowlevel.current_trio_token()

    def _on_exit(self, tag, code):             # runs on a watcher thread
        event = ReplicaDied(tag=tag, reason=f"exit code {code}")
        trio.from_thread.run_sync(self._report, event, trio_token=self._token)

Background work: ``open`` gets no nursery, and a task spawned from ``start_replica``
would die with the effect's task. A runtime that watches its replicas (process exits,
heartbeats) opens a nursery of its own in a *system task* from ``open``, and cancels
it in ``close``; its watchers report on the trio thread directly::

    async def open(self, *, namespace, report):
        self._report = report
        self._cancel = trio.CancelScope()
        trio.lowlevel.spawn_system_task(self._watch_all)   # lives until close()

    async def _watch_all(self):
        with self._cancel:
            async with trio.open_nursery() as self._nursery:
                await trio.sleep_forever()

    async def close(self):
        self._cancel.cancel()

Test hooks: a ``kill(tag)`` hook (for ``servecore.testing``) must report
``ReplicaDied`` *before it returns*, as the in-memory and threads runtimes do, so a
test that kills and then looks sees the death; a process runtime waits for the exit it
caused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from servecore._core.transitions import Event, StartReplica

__all__ = [
    "OPTIONAL_METHODS",
    "REQUIRED_METHODS",
    "Introspection",
    "Lifecycle",
    "Query",
    "ReplicaInfo",
    "Report",
    "Runtime",
    "Streaming",
]

#: The callback a runtime uses to report events (``ReplicaDied``; see the module
#: docstring). Call it on the trio thread the runtime was opened in; from another
#: thread, use ``trio.from_thread.run_sync(report, event, trio_token=token)``.
Report = Callable[[Event], None]

#: What every runtime must have.
REQUIRED_METHODS = ("start_replica", "stop_replica", "list_replicas", "call")
#: What a runtime may have (see :class:`Lifecycle`, :class:`Introspection` and
#: :class:`Streaming`); the controller and router call each only if it is there.
OPTIONAL_METHODS = ("open", "close", "replica_info", "stream")


@attrs.frozen(kw_only=True)
class Query:
    """One call's arguments, as passed to ``handle.call(*args, **kwargs)``."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = attrs.field(factory=dict)
    #: When the caller stops waiting, in seconds since the epoch (``time.time()``), or
    #: ``None``: no deadline. Set from the handle's ``timeout_s``; a runtime carries it
    #: to the replica, which drops the query unrun once it has passed and tells user
    #: code the time left (``servecore.time_remaining()``). The wall clock, not a
    #: monotonic one: it is compared in other processes (same host: the same clock).
    deadline: float | None = None


@runtime_checkable
class Runtime(Protocol):
    """What the controller and router need of a runtime. All methods run on trio.

    ``open`` and ``close`` (see :class:`Lifecycle`) are optional: a runtime with only
    these four methods works, and never reports a death (it has nowhere to report to).
    """

    async def start_replica(self, effect: StartReplica) -> None:
        """Start ``effect.tag`` and return once it is ready; raise on failure.

        Idempotent by tag: a replica already alive under that tag is not started twice.
        A failure raises (with the replica's own error in the message) and leaves
        nothing alive under the tag; it is not reported through ``report``.
        Unknown ``effect.config.runtime_options`` keys are refused, naming them.
        """

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        """Drain the replica, then stop it, forcing after ``timeout_s``.

        Idempotent: stopping a tag that is stopped, dead or was never started returns
        quietly (never a ``KeyError``). The stopped replica is not reported as dead.
        """

    async def list_replicas(self) -> frozenset[str]:
        """The tags alive in this runtime's namespace (used by recovery).

        A fresh namespace lists nothing; a dead or stopped replica is not listed.
        """

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        """Run one batch on one replica; return one result per query, in order.

        A user exception is raised as is (for a batch, it fails the whole batch);
        a replica that dies mid-call raises :class:`~servecore.ReplicaDiedError`.
        """
        ...


@runtime_checkable
class Lifecycle(Protocol):
    """The optional half of the protocol: attach to a controller and detach."""

    async def open(self, *, namespace: str, report: Report) -> None:
        """Attach to the controller named ``namespace``; events go to ``report``.

        Called once per controller, on its trio thread, before :meth:`Runtime.list_replicas`.
        A runtime whose replicas outlive the host (subprocess, Ray) finds them again
        here. Capture ``trio.lowlevel.current_trio_token()`` here if other threads will
        report.

        Two more keywords are passed only to a runtime whose ``open`` names them (or
        takes ``**kwargs``): ``store_id`` (what identifies the controller's store, so
        replicas are adopted only by a controller on the same store) and ``epoch``
        (the store's lease epoch, ``None`` without a lease). A runtime that takes
        ``epoch`` lets a newer epoch of the same store take it over from a controller
        that may only be frozen, and then refuses to act for the older one
        (:class:`~servecore.RuntimeFenced`, upon which that controller steps down).
        """

    async def close(self) -> None:
        """Detach. In-process replicas stop; out-of-process ones keep running.

        Cancel background work started in :meth:`open`; report nothing after this.
        """


@attrs.frozen(kw_only=True)
class ReplicaInfo:
    """Where one replica runs, for an operator: every field is optional, since each
    runtime knows different things (a process id, a Ray actor and node, a log file).
    ``node`` identifies the machine in its cluster (a Ray node id), ``node_ip`` its
    address."""

    pid: int | None = None
    actor_id: str | None = None
    node: str | None = None
    log_path: str | None = None
    node_ip: str | None = None


@runtime_checkable
class Introspection(Protocol):
    """The optional view into a runtime that status, logs and lifecycle records use.

    A runtime without it still works; status then shows no pid or log path.
    """

    def replica_info(self, tag: str) -> ReplicaInfo | None:
        """Where replica ``tag`` runs, or ``None`` if it is not known here. Must not
        block or raise (it is called from status and logging)."""


@runtime_checkable
class Streaming(Protocol):
    """The optional streaming half of the protocol (a runtime that has it also sets
    ``supports_streaming = True``; see docs/plugins.md, "Streams")."""

    async def stream(self, tag: str, query: Query) -> Any:
        """Open a stream of a generator target on replica ``tag``; return an async
        iterator of its items (with ``close()``, which stops the generator).

        Items come in order as the generator yields them, at most a bounded window
        ahead of the consumer. A death mid-stream ends it with
        :class:`~servecore.ReplicaDiedError` after the items already delivered; a
        stream the replica never began raises one marked ``retry_safe``. A target that
        does not stream raises :class:`~servecore.StreamMismatch`.
        """
