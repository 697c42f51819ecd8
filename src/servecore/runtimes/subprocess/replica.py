"""A connected replica, seen from the host: calls out, answers back by request id."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import outcome
import trio

from servecore._core.errors import ReplicaDiedError, ResultDecodeError
from servecore._text import encodable
from servecore.runtimes._protocol import Query
from servecore.runtimes._remote_errors import decode_reply, rebuild_exception
from servecore.runtimes.subprocess.channel import Channel
from servecore.runtimes.subprocess.files import ReplicaFiles
from servecore.runtimes.subprocess.process import Process
from servecore.runtimes.subprocess.wire import CALL, ERROR, GONE, OK, dumps, frame

__all__ = ["RemoteTraceback", "Replica", "rebuild_remote_exception"]


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a replica process.

    Set as ``__cause__`` of the exception re-raised on the caller's side, so that the
    replica's frames show up in the caller's traceback.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(text)

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


def rebuild_remote_exception(info: Mapping[str, Any], tag: str) -> Exception:
    """Raise-able form of an :func:`~servecore.runtimes.subprocess.wire.error_info`,
    its text encodable, the replica's traceback as its ``__cause__``."""
    exc = rebuild_exception(info)
    exc.__cause__ = RemoteTraceback(encodable(str(info.get("traceback", ""))))
    exc.add_note(f"raised in replica {tag!r} (subprocess runtime)")
    return exc


class Replica:
    """A connected replica: calls go out on its socket, answers come back by id."""

    def __init__(
        self, *, tag: str, files: ReplicaFiles, process: Process, channel: Channel
    ) -> None:
        self.tag = tag
        self.files = files
        self.process = process
        self.channel = channel
        #: request id -> the task waiting for its answer
        self.pending: dict[int, trio.lowlevel.Task] = {}
        self.ids = itertools.count(1)
        self.idle = trio.Event()
        self.idle.set()
        self.stopping = False
        self.dead_reason: str | None = None
        self.watcher_scope = trio.CancelScope()
        #: The liveness probe's scope (cancelled when the replica is forgotten).
        self.probe_scope = trio.CancelScope()
        #: Why the probe declared the replica dead (it did not answer in time), if it did.
        self.unresponsive: str | None = None

    @property
    def dead(self) -> bool:
        """Whether the replica has died (or was stopped, or its runtime closed)."""
        return self.dead_reason is not None

    async def call(self, batch: Sequence[Query]) -> list[Any]:
        """Send one batch and wait for its answer (its results, or its error raised)."""
        if self.dead_reason is not None:
            raise ReplicaDiedError(self.tag, self.dead_reason)
        if self.stopping:
            raise ReplicaDiedError(self.tag, "the replica is stopping")
        try:
            body = dumps([(q.args, q.kwargs) for q in batch])
        except Exception as exc:
            raise TypeError(
                f"the arguments of a query to replica {self.tag!r} cannot be pickled: {exc}"
            ) from exc
        request_id = next(self.ids)
        try:
            self.channel.send(frame(CALL, request_id, body))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = self.dead_reason or f"connection lost: {exc}"
            raise ReplicaDiedError(self.tag, reason) from exc
        self.pending[request_id] = trio.lowlevel.current_task()
        if self.idle.is_set():
            self.idle = trio.Event()

        def abort(_: Any) -> trio.lowlevel.Abort:
            # The caller gave up (cancelled): its answer will be dropped on arrival.
            self.pending.pop(request_id, None)
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            result: list[Any] = await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            if not self.pending:
                self.idle.set()
        return result

    def deliver(self, kind: int, request_id: int, body: bytes) -> None:
        """Wake the caller waiting for ``request_id`` with the answer in ``body``."""
        task = self.pending.pop(request_id, None)
        if task is None:  # the caller gave up (cancelled); drop the answer
            return
        answer: outcome.Outcome[Any]
        try:
            if kind == OK:
                answer = outcome.Value(decode_reply(body, self.tag, "subprocess"))
            elif kind == ERROR:
                info = decode_reply(body, self.tag, "subprocess")
                answer = outcome.Error(rebuild_remote_exception(info, self.tag))
            elif kind == GONE:
                reason = encodable(str(decode_reply(body, self.tag, "subprocess")))
                answer = outcome.Error(ReplicaDiedError(self.tag, reason))
            else:
                error = RuntimeError(f"replica {self.tag!r} sent message kind {kind}")
                answer = outcome.Error(error)
        except ResultDecodeError as exc:  # e.g. a result whose class the host cannot import
            answer = outcome.Error(exc)
        except Exception as exc:  # a malformed error description: still the replica's fault
            answer = outcome.Error(
                ResultDecodeError(self.tag, "error description", repr(exc), runtime="subprocess")
            )
        trio.lowlevel.reschedule(task, answer)

    def fail_pending(self, reason: str) -> None:
        """Fail every call in flight with :class:`~servecore.ReplicaDiedError`."""
        pending, self.pending = self.pending, {}
        for task in pending.values():
            trio.lowlevel.reschedule(task, outcome.Error(ReplicaDiedError(self.tag, reason)))
