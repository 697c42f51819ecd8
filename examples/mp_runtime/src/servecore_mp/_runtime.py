"""The host's side: :class:`MultiprocessingRuntime`, a complete servecore runtime.

Read it next to docs/plugins.md; each rule of the Runtime protocol it keeps is marked
where it is kept:

* start is idempotent by tag, raises the replica's own error, and leaves nothing alive
  when it fails;
* stop is idempotent (a tag never started is a quiet no-op), drains, then kills after
  its timeout, and is not reported as a death;
* deaths (a crash, a failed health check, :meth:`MultiprocessingRuntime.kill`) are
  reported as ``ReplicaDied``, on the trio thread, by reader tasks that live in a
  nursery of the runtime's own (opened from a system task in ``open``);
* replicas outlive a controller (``close`` detaches), so a crashed controller's
  successor finds them with ``list_replicas``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import pickle
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any

import trio

from servecore import (
    RemoteError,
    ReplicaDied,
    ReplicaDiedError,
    ResultDecodeError,
    StartReplica,
)
from servecore.runtimes import Query, Report
from servecore.runtimes.toolkit import check_runtime_options
from servecore_mp import _replica

__all__ = ["MultiprocessingRuntime"]

log = logging.getLogger("servecore_mp")

#: ``BackendConfig.runtime_options`` this runtime knows: a replica's ``nice`` level.
KNOWN_RUNTIME_OPTIONS = frozenset({"niceness"})


class _Call:
    """A call waiting for its answer."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: tuple[Any, ...] | None = None


class _Replica:
    def __init__(self, effect: StartReplica, process: BaseProcess, conn: Any) -> None:
        self.effect = effect
        self.tag = effect.tag
        self.process = process
        self.conn: multiprocessing.connection.Connection = conn
        self.ready = trio.Event()  # started (or failed), either way
        self.start_error: BaseException | None = None
        self.calls: dict[int, _Call] = {}
        self.ids = itertools.count()
        self.stopping = False
        self.dead = False

    def alive(self) -> bool:
        return self.ready.is_set() and self.start_error is None and not self.dead


class MultiprocessingRuntime:
    """Replicas as ``multiprocessing`` spawn processes, one pipe each.

    ``start_timeout_s`` bounds a replica's import and constructor;
    ``health_check_period_s`` is how often a replica's ``check_health()`` runs (in the
    replica, between calls). Chosen by name, constructor keywords come through the
    controller: ``open_controller(runtime="mp", runtime_kwargs={"start_timeout_s": 30})``.
    """

    def __init__(
        self, *, start_timeout_s: float = 60.0, health_check_period_s: float = 5.0
    ) -> None:
        for name, value in (
            ("start_timeout_s", start_timeout_s),
            ("health_check_period_s", health_check_period_s),
        ):
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise ValueError(f"{name}={value!r} must be a number of seconds > 0")
        self.start_timeout_s = float(start_timeout_s)
        self.health_check_period_s = float(health_check_period_s)
        self._context = multiprocessing.get_context("spawn")
        # namespace -> tag -> replica. Replicas outlive a controller, not this object.
        self._namespaces: dict[str, dict[str, _Replica]] = {}
        self._replicas: dict[str, _Replica] = {}
        self._report: Report | None = None
        self._nursery: trio.Nursery | None = None
        self._readers = trio.CancelScope()

    # -- the Runtime protocol -------------------------------------------------------------

    async def open(self, *, namespace: str, report: Report) -> None:
        """Attach to a controller: adopt the namespace's replicas, start their readers."""
        self._replicas = self._namespaces.setdefault(namespace, {})
        for replica in list(self._replicas.values()):
            if replica.alive() and not replica.process.is_alive():
                # It died while no controller listened: recovery replaces it, unasked.
                self._end(replica, "it died while detached", report=False)
                del self._replicas[replica.tag]
        self._report = report
        self._readers = trio.CancelScope()
        opened = trio.Event()
        # open() gets no nursery, and a task started from an effect's task would die
        # with it: the readers live in a nursery of our own, in a system task.
        trio.lowlevel.spawn_system_task(self._serve_readers, opened)
        await opened.wait()
        for replica in self._replicas.values():
            if replica.alive():
                self._watch(replica)

    async def close(self) -> None:
        """Detach: stop reading and reporting; the replicas keep running."""
        self._report = None
        self._readers.cancel()
        self._nursery = None

    async def start_replica(self, effect: StartReplica) -> None:
        """Spawn the replica, return once its constructor ran; raise its own error."""
        check_runtime_options(effect, known=KNOWN_RUNTIME_OPTIONS, runtime="mp")
        replica = self._replicas.get(effect.tag)
        if replica is not None and (replica.dead or replica.start_error is not None):
            del self._replicas[effect.tag]  # a failed or dead attempt: start afresh
            replica = None
        if replica is None:
            replica = await self._spawn(effect)  # idempotent: one process per live tag
        await replica.ready.wait()
        if replica.start_error is not None:
            raise replica.start_error
        if replica.dead:
            raise ReplicaDiedError(replica.tag, "it died as it started")

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        """Let the replica finish its calls and exit; kill it after ``timeout_s``."""
        replica = self._replicas.get(tag)
        if replica is None:
            return  # idempotent, and never a KeyError
        replica.stopping = True  # from now on its end is not news
        if not replica.dead:
            with contextlib.suppress(OSError):
                replica.conn.send(("stop",))  # queued behind its calls: they drain first
            with trio.move_on_after(timeout_s):
                await trio.lowlevel.wait_readable(replica.process.sentinel)
            if replica.process.is_alive():
                log.warning("replica %s did not stop within %ss; killing it", tag, timeout_s)
            self._end(replica, "stopped")
        if self._replicas.get(tag) is replica:
            del self._replicas[tag]

    async def list_replicas(self) -> frozenset[str]:
        """The replicas of this namespace whose process runs."""
        return frozenset(
            tag for tag, r in self._replicas.items() if r.alive() and r.process.is_alive()
        )

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        """Send the batch down the replica's pipe; wait for its answer."""
        replica = self._replicas.get(tag)
        if replica is None or not replica.alive() or replica.stopping:
            raise ReplicaDiedError(tag, "the mp runtime has no live replica of that tag")
        request = next(replica.ids)
        waiting = replica.calls[request] = _Call()
        try:
            try:
                replica.conn.send(("call", request, list(batch)))
            except OSError as exc:  # the pipe broke: the replica is going, or gone
                raise ReplicaDiedError(tag, f"its pipe broke: {exc}") from exc
            await waiting.done.wait()
        finally:
            replica.calls.pop(request, None)  # a cancelled caller's late answer is dropped
        answer = waiting.answer
        assert answer is not None
        if answer[0] == "ok":
            results: list[Any] = decode(answer[2], tag)
            return results
        if answer[0] == "error":
            raise _error(answer[2], answer[3], tag)
        raise ReplicaDiedError(tag, answer[1])

    # -- operations -----------------------------------------------------------------------

    def kill(self, tag: str) -> None:
        """SIGKILL replica ``tag``, as a crash would, and report ``ReplicaDied`` before
        returning (the rule every kill hook keeps). Call it on the trio thread."""
        replica = self._replicas.get(tag)
        if replica is None or not replica.alive():
            return
        self._end(replica, "killed by MultiprocessingRuntime.kill()")

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop every replica of every namespace (blocking; not on a busy trio loop)."""
        for replicas in self._namespaces.values():
            for replica in list(replicas.values()):
                replica.stopping = True
                if replica.process.is_alive():
                    with contextlib.suppress(OSError):
                        replica.conn.send(("stop",))
                    replica.process.join(timeout_s)
                if replica.process.is_alive():
                    replica.process.kill()
                    replica.process.join()
                replica.conn.close()
            replicas.clear()

    # -- inside ---------------------------------------------------------------------------

    async def _spawn(self, effect: StartReplica) -> _Replica:
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_replica.main,
            args=(theirs, effect, self.health_check_period_s),
            name=f"servecore-mp-{effect.tag}",
            daemon=True,  # if the host dies, its replicas go too
        )
        replica = self._replicas[effect.tag] = _Replica(effect, process, ours)
        try:
            # Spawning runs a fresh interpreter and pickles the effect: off the loop.
            await trio.to_thread.run_sync(process.start)
            theirs.close()  # so that the replica's exit reads as EOF here
            with trio.fail_after(self.start_timeout_s):
                first = await self._receive(replica)
        except BaseException as exc:
            replica.start_error = (
                RuntimeError(
                    f"replica {effect.tag} gave no sign of life within "
                    f"{self.start_timeout_s}s (start_timeout_s)"
                )
                if isinstance(exc, trio.TooSlowError)
                else RuntimeError(f"replica {effect.tag} could not start: {exc!r}")
            )
            self._end(replica, "its start failed", report=False)
            replica.ready.set()
            if not isinstance(exc, Exception):
                raise
            return replica
        if first is None or first[0] != "ready":
            if first is not None and first[0] == "failed":
                replica.start_error = _error(first[1], first[2], effect.tag)
            else:
                replica.start_error = RuntimeError(
                    f"replica {effect.tag} could not start: it exited"
                )
            self._end(replica, "its start failed", report=False)
        else:
            self._watch(replica)
        replica.ready.set()
        return replica

    async def _receive(self, replica: _Replica) -> tuple[Any, ...] | None:
        """The replica's next message, or ``None`` once its process has gone."""
        while True:
            try:
                if replica.conn.poll():
                    message: tuple[Any, ...] = replica.conn.recv()
                    return message
                await trio.lowlevel.wait_readable(replica.conn.fileno())
            except (EOFError, OSError, trio.ClosedResourceError):
                return None

    def _watch(self, replica: _Replica) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._read, replica)

    async def _serve_readers(self, opened: trio.Event) -> None:
        with self._readers:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                opened.set()
                await trio.sleep_forever()

    async def _read(self, replica: _Replica) -> None:
        """Deliver the replica's answers; when its process ends, that is its death."""
        try:
            await self._read_until_end(replica)
        except Exception:  # a system task must never raise: it would end the trio run
            log.exception("reader of replica %s failed", replica.tag)
            self._end(replica, "its reader failed")

    async def _read_until_end(self, replica: _Replica) -> None:
        while not replica.dead:
            message = await self._receive(replica)
            if message is None:
                self._end(replica, f"its process exited (code {replica.process.exitcode})")
                return
            if message[0] == "died":
                self._end(replica, message[1])
                return
            waiting = replica.calls.get(message[1])
            if waiting is not None:
                waiting.answer = message
                waiting.done.set()

    def _end(self, replica: _Replica, reason: str, *, report: bool = True) -> None:
        """The replica is over: make sure its process is gone, fail its calls, and,
        unless it was stopped, report ``ReplicaDied`` (on the trio thread: we are on it)."""
        if replica.dead:
            return
        replica.dead = True
        if replica.process.is_alive():
            replica.process.kill()
        if replica.process.pid is not None:
            replica.process.join(5.0)  # SIGKILLed: gone in a moment
        for waiting in replica.calls.values():
            waiting.answer = ("died", reason)
            waiting.done.set()
        replica.calls.clear()
        with contextlib.suppress(OSError, RuntimeError):  # RuntimeError: outside trio
            trio.lowlevel.notify_closing(replica.conn.fileno())
        with contextlib.suppress(OSError):
            replica.conn.close()
        news = report and not replica.stopping and replica.ready.is_set()
        if news and self._report is not None:
            log.warning("replica %s died: %s", replica.tag, reason)
            self._report(ReplicaDied(tag=replica.tag, reason=reason))
        if self._replicas.get(replica.tag) is replica and not replica.stopping:
            del self._replicas[replica.tag]


def decode(data: bytes, tag: str) -> Any:
    """Unpickle what replica ``tag`` sent back; whatever that raises (a class this
    process cannot import, a ``__reduce__`` raising ``SystemExit``) becomes
    :class:`~servecore.ResultDecodeError`, never a BaseException that would end the
    host's trio run."""
    unpickler = _NamingUnpickler(io.BytesIO(data))
    try:
        return unpickler.load()
    except BaseException as exc:  # the replica's data must never stop the host
        reason = f"{type(exc).__name__}: {exc}"
        name = unpickler.last_class or "<unknown>"
        raise ResultDecodeError(tag, name, reason, runtime="mp") from None


class _NamingUnpickler(pickle.Unpickler):
    """Remembers the last class it looked up, so that a failure names the type."""

    last_class = ""

    def find_class(self, module: str, name: str) -> Any:
        self.last_class = f"{module}.{name}"
        return super().find_class(module, name)


def _error(pickled: bytes | None, text: str, tag: str) -> Exception:
    """The replica's exception as its own type when it unpickles, else a RemoteError."""
    if pickled is not None:
        try:
            error = decode(pickled, tag)
        except ResultDecodeError:
            error = None
        if isinstance(error, Exception):
            return error
    return RemoteError(text.split(":")[0], text)
