"""A connected replica, seen from the host: calls out, answers back by request id."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import outcome
import trio

from servecore._core.errors import ReplicaDiedError, ResultDecodeError
from servecore._text import encodable
from servecore.runtimes._protocol import Query
from servecore.runtimes._remote_errors import decode_reply, rebuild_exception
from servecore.runtimes._streams import ItemStream
from servecore.runtimes.subprocess.channel import Channel
from servecore.runtimes.subprocess.files import ReplicaFiles
from servecore.runtimes.subprocess.process import Process
from servecore.runtimes.subprocess.wire import (
    CALL,
    CANCEL,
    COUNT,
    CREDIT,
    DRAINED,
    END,
    ERROR,
    GONE,
    ITEM,
    OK,
    PING,
    REFUSED,
    STREAM,
    call_body,
    frame,
    stream_body,
)
from servecore.runtimes.toolkit import DEFAULT_STREAM_WINDOW

__all__ = [
    "RemoteTraceback",
    "Replica",
    "ReplicaConnection",
    "answer_of",
    "not_begun",
    "open_replica_channel",
    "rebuild_remote_exception",
    "stream_end_error",
]


def not_begun(tag: str, reason: str) -> ReplicaDiedError:
    """A death error for a query the replica never began: the router may send it to
    another replica (see ``servecore.router``, "retry_safe")."""
    error = ReplicaDiedError(tag, reason)
    error.retry_safe = True  # type: ignore[attr-defined]
    return error


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


async def open_replica_channel(address: str, tag: str, timeout_s: float) -> tuple[Channel, Any]:
    """Connect to the replica socket at ``address`` and check that it serves ``tag``.

    Returns the channel and the replica's hello (``{"tag", "pid", "key"}``). What the
    host's runtime and a client in another process (``servecore.connect``) both do.
    Raises ``OSError`` when nothing listens there, ``ValueError`` when something else does.
    """
    stream = await trio.open_unix_socket(address)
    channel = Channel(socket.socket(fileno=stream.socket.detach()))
    try:
        channel.send(frame(PING, 0, b""))
        with trio.fail_after(timeout_s):
            answer = await channel.receive()
        if answer is None or answer[0] != OK:
            raise ValueError(f"replica {tag!r} closed the connection during the handshake")
        hello = decode_reply(answer[2], tag, "subprocess")
        if not isinstance(hello, dict) or hello.get("tag") != tag:
            raise ValueError(f"socket {address} is served by {hello!r}, not {tag!r}")
    except BaseException:
        channel.close()
        raise
    return channel, hello


def answer_of(kind: int, body: bytes, tag: str) -> outcome.Outcome[Any]:
    """What a replica's answer frame means for the caller: the batch's results, the
    user's exception, or a typed error (never a ``BaseException`` the host cannot
    handle). Shared by the trio path and the blocking path of host threads."""
    try:
        if kind == OK:
            return outcome.Value(decode_reply(body, tag, "subprocess"))
        if kind == ERROR:
            info = decode_reply(body, tag, "subprocess")
            return outcome.Error(rebuild_remote_exception(info, tag))
        if kind == REFUSED:
            reason = encodable(str(decode_reply(body, tag, "subprocess")))
            return outcome.Error(not_begun(tag, f"{reason}; it did not begin it"))
        if kind == GONE:
            reason = encodable(str(decode_reply(body, tag, "subprocess")))
            return outcome.Error(ReplicaDiedError(tag, reason))
        return outcome.Error(RuntimeError(f"replica {tag!r} sent message kind {kind}"))
    except ResultDecodeError as exc:  # e.g. a result whose class the host cannot import
        return outcome.Error(exc)
    except Exception as exc:  # a malformed error description: still the replica's fault
        return outcome.Error(
            ResultDecodeError(tag, "error description", repr(exc), runtime="subprocess")
        )


def stream_end_error(kind: int, body: bytes, tag: str) -> BaseException | None:
    """How a frame other than ``ITEM`` ends a stream of replica ``tag``: ``None`` for
    ``END``, else the error its consumer raises after the items already delivered
    (marked safe to send elsewhere for ``REFUSED``). Shared by the trio path and the
    asyncio one of ingress workers."""
    try:
        if kind == END:
            return None
        if kind == ERROR:
            return rebuild_remote_exception(decode_reply(body, tag, "subprocess"), tag)
        if kind == REFUSED:
            reason = encodable(str(decode_reply(body, tag, "subprocess")))
            return not_begun(tag, f"{reason}; it did not begin the stream")
        if kind == GONE:
            reason = encodable(str(decode_reply(body, tag, "subprocess")))
            return ReplicaDiedError(tag, reason)
        return RuntimeError(f"replica {tag!r} sent message kind {kind}")
    except ResultDecodeError as exc:
        return exc
    except Exception as exc:
        return ResultDecodeError(tag, "error description", repr(exc), runtime="subprocess")


class ReplicaConnection:
    """A connection to a replica: calls go out on its socket, answers come back by id.

    Whoever owns it reads the channel and passes each frame to :meth:`deliver`.
    """

    def __init__(self, *, tag: str, channel: Channel) -> None:
        self.tag = tag
        self.channel = channel
        #: request id -> the task waiting for its answer
        self.pending: dict[int, trio.lowlevel.Task] = {}
        #: request id -> a stream still open
        self.streams: dict[int, ItemStream] = {}
        self.ids = itertools.count(1)
        self.idle = trio.Event()
        self.idle.set()
        self.stopping = False
        #: The replica said it is draining (it refused a call, or drained): it takes
        #: no new call, though it may still be alive, and its death is still news.
        self.draining = False
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
        if self.stopping or self.draining:
            raise not_begun(self.tag, "the replica is stopping; the query was not sent")
        body = call_body(batch, self.tag)
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
            # The caller gave up (cancelled): its answer will be dropped on arrival, and
            # the replica cancels the call's task if it runs on its loop (async targets).
            if self.pending.pop(request_id, None) is not None and not self.channel.closed:
                try:  # noqa: SIM105 - a dead connection fails the query anyway
                    self.channel.send(frame(CANCEL, request_id, b""))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            result: list[Any] = await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            if not self.pending and not self.streams:
                self.idle.set()
        return result

    async def stream(self, query: Query, window: int = DEFAULT_STREAM_WINDOW) -> ItemStream:
        """Open a stream of a generator target: its items as the replica sends them.

        The replica sends at most ``window`` items ahead of the consumer; credit goes
        back as the consumer takes items (half a window at a time), and closing the
        stream early sends ``CANCEL``, which stops the generator.
        """
        if self.dead_reason is not None:
            raise ReplicaDiedError(self.tag, self.dead_reason)
        if self.stopping or self.draining:
            raise not_begun(self.tag, "the replica is stopping; the stream was not opened")
        body = stream_body(query, window, self.tag)
        request_id = next(self.ids)

        def grant(n: int) -> None:
            if request_id in self.streams:
                self._send_quietly(frame(CREDIT, request_id, COUNT.pack(n)))

        def cancel() -> None:
            if self.streams.pop(request_id, None) is not None:
                self._send_quietly(frame(CANCEL, request_id, b""))
                self._maybe_idle()

        items = ItemStream(
            tag=self.tag, grant=grant, cancel=cancel, grant_every=max(1, window // 2)
        )
        try:
            self.channel.send(frame(STREAM, request_id, body))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = self.dead_reason or f"connection lost: {exc}"
            raise ReplicaDiedError(self.tag, reason) from exc
        self.streams[request_id] = items
        if self.idle.is_set():
            self.idle = trio.Event()
        return items

    def _send_quietly(self, data: bytes) -> None:
        """Send a frame no answer depends on (a dead connection fails the stream anyway)."""
        if self.channel.closed:
            return
        try:  # noqa: SIM105
            self.channel.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _maybe_idle(self) -> None:
        if not self.pending and not self.streams:
            self.idle.set()

    def _deliver_stream(self, items: ItemStream, kind: int, request_id: int, body: bytes) -> None:
        """One frame of an open stream: an item, or how it ended."""
        if kind == ITEM:
            try:
                items.push(decode_reply(body, self.tag, "subprocess"))
            except ResultDecodeError as exc:
                items.end(exc)
                self.streams.pop(request_id, None)
                self._send_quietly(frame(CANCEL, request_id, b""))
                self._maybe_idle()
            return
        self.streams.pop(request_id, None)
        self._maybe_idle()
        if kind == REFUSED:
            self.draining = True
        error = stream_end_error(kind, body, self.tag)
        items.end(error)

    def deliver(self, kind: int, request_id: int, body: bytes) -> None:
        """Wake the caller waiting for ``request_id`` with the answer in ``body``."""
        if kind == DRAINED:
            self.draining = True
            self.fail_pending("the replica drained and stopped before beginning it", True)
            return
        items = self.streams.get(request_id)
        if items is not None:
            self._deliver_stream(items, kind, request_id, body)
            return
        task = self.pending.pop(request_id, None)
        if kind == REFUSED:
            self.draining = True
        if task is None:  # the caller gave up (cancelled); drop the answer
            return
        trio.lowlevel.reschedule(task, answer_of(kind, body, self.tag))

    def fail_pending(self, reason: str, never_begun: bool = False) -> None:
        """Fail every call in flight with :class:`~servecore.ReplicaDiedError`
        (marked safe to send elsewhere when the replica says it never began them)."""
        pending, self.pending = self.pending, {}
        for task in pending.values():
            error = (not_begun if never_begun else ReplicaDiedError)(self.tag, reason)
            trio.lowlevel.reschedule(task, outcome.Error(error))
        streams, self.streams = self.streams, {}
        for items in streams.values():
            # Items already delivered are read first; then the stream ends with this.
            items.end((not_begun if never_begun else ReplicaDiedError)(self.tag, reason))
        self.idle.set()


class Replica(ReplicaConnection):
    """A replica the host's runtime connected to: its connection, files and process."""

    def __init__(
        self, *, tag: str, files: ReplicaFiles, process: Process, channel: Channel
    ) -> None:
        super().__init__(tag=tag, channel=channel)
        self.files = files
        self.process = process
