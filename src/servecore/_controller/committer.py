"""The commit path: queue → fold ``step`` over the batch → one commit → adopt → dispatch.

Every message (command or event) the controller steps goes through one
:class:`Committer`. Messages that arrive while a commit is in flight wait in its queue;
when the commit is done the committer takes them all, steps them in arrival order over
the state (each seeing the ones before it), merges their change sets into one and
commits that once, with one new sequence number (group commit). Then it adopts the new
state and hands each message's effects to the controller, in order. For each message:

* rejected by ``step`` (or by the limits): it alone fails, at once, and the others go on;
* the commit fails: every message of the batch fails with a
  :class:`~servecore.CheckpointError` (a fenced store's :class:`~servecore.LeaseLost`
  saying what it means for that message, a lost answer's
  :class:`~servecore.CheckpointOutcomeUnknown` as it is), the state stays as it was
  and no effect runs;
* it has no effect and changed nothing checkpointed (a no-op, or a load report that
  only refreshed the state's ``observations``): an empty change set, so no commit; the
  new state is adopted with its batch;
* otherwise it returns once the commit holding it is durable and its effects have been
  dispatched.

Commits run on one long-lived writer thread (:class:`Writer`), not one fresh
``trio.to_thread`` hand-off per save, or inline on the trio thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, get_args

import outcome
import trio

from servecore._core.errors import (
    CheckpointError,
    CheckpointLocked,
    CheckpointOutcomeUnknown,
    LeaseLost,
)
from servecore._core.limits import Limits
from servecore._core.messages import describe
from servecore._core.records import META_KEY, encode_changes, meta_record
from servecore._core.transitions import (
    Command,
    Effect,
    Message,
    State,
    Transition,
    UpdateRouter,
    same_checkpoint,
    step,
)
from servecore.stores import Store

__all__ = ["Committer", "Writer", "deterministic_batches"]

log = logging.getLogger("servecore.controller")

_COMMANDS = get_args(Command)
T = TypeVar("T")

#: Awaited before each batch is taken, if set (the crash kit waits until every task is
#: blocked, so the batches, and so the crash points, do not depend on timing).
_GATHER: contextvars.ContextVar[Callable[[], Awaitable[None]] | None] = contextvars.ContextVar(
    "servecore_gather_batch", default=None
)


@contextlib.contextmanager
def deterministic_batches(cushion_s: float = 0.0) -> Iterator[None]:
    """Controllers opened inside take a batch only once every other task has been
    blocked for ``cushion_s`` (with a real clock, a cushion lets timers that expire
    together be batched together)."""
    import trio.testing

    async def gather() -> None:
        await trio.testing.wait_all_tasks_blocked(cushion_s)

    token = _GATHER.set(gather)
    try:
        yield
    finally:
        _GATHER.reset(token)


class Writer:
    """One long-lived thread that runs store calls, handed over through a queue.

    Cheaper than ``trio.to_thread.run_sync`` per call (no thread-cache lookup, no
    limiter), and one thread means the store sees its calls in order.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the writer thread; return or raise what it did. Not
        cancellable once handed over: a write in progress finishes."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, name=f"servecore-writer-{self._name}", daemon=True
            )
            self._thread.start()
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome[T]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._jobs.put((fn, deliver))
        result: T = await trio.lowlevel.wait_task_rescheduled(
            lambda _raise_cancel: trio.lowlevel.Abort.FAILED
        )
        return result

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, deliver = job
            result = outcome.capture(fn)
            # If the run is over, the controller is gone: nobody waits for this write.
            with contextlib.suppress(trio.RunFinishedError):
                deliver(result)

    def stop(self) -> None:
        """Let the thread finish after the calls already handed over."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None


class _Item:
    """One message waiting for its commit."""

    __slots__ = ("build", "done", "error", "group", "message")

    def __init__(self, build: Message | Callable[[State], Message | None], group: Any) -> None:
        self.build = build
        self.group = group
        self.message: Message | None = None
        self.error: BaseException | None = None
        self.done = trio.Event()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


Dispatch = Callable[[Effect, Any], None]
#: Told of each commit that reached the store: how long it took (s), how many bytes.
OnCommit = Callable[[float, int], None]


class Committer:
    """Owns the adopted state and its sequence number; the only writer of both."""

    def __init__(
        self,
        *,
        store: Store,
        where: str,
        limits: Limits,
        dispatch: Dispatch,
        writer: Writer | None,
        on_commit: OnCommit | None = None,
    ) -> None:
        self.store = store
        self.where = where
        self.limits = limits
        self._dispatch = dispatch
        self._writer = writer
        self._on_commit = on_commit
        self.state = State()
        self.seq = 0
        #: Records outside the state (the ``runtime`` record) to go with the next commit.
        self.pending_records: dict[str, bytes] = {}
        self.commits = 0  # how many commits reached the store (a batch is one)
        self.queued = 0  # how many messages were ever queued
        self._queue: list[_Item] = []
        self._wake = trio.Event()

    def adopt_loaded(self, state: State, seq: int) -> None:
        """Start from a checkpoint just loaded."""
        self.state, self.seq = state, seq

    async def commit_pending(self) -> None:
        """Commit :attr:`pending_records` alone, as the next checkpoint (before
        :meth:`serve` runs: nothing else may commit meanwhile). Raises what the store
        raised; then nothing was adopted."""
        seq = self.seq + 1
        puts = {**self.pending_records, META_KEY: meta_record(seq, self.state.replica_counter)}
        await self.call(lambda: self.store.commit(seq, puts, []))
        self.seq = seq
        self.pending_records = {}
        self.commits += 1

    async def call(self, fn: Callable[[], T]) -> T:
        """Run a store call where commits run (the writer thread, or inline)."""
        if self._writer is None:
            return fn()
        return await self._writer.run(fn)

    async def run(
        self, message: Message | Callable[[State], Message | None], group: Any
    ) -> Message | None:
        """Queue ``message`` (or a builder of it from the state it will be stepped on);
        return the message once its commit is durable and its effects dispatched
        (``None`` if the builder made none); raise what rejected it."""
        item = _Item(message, group)
        self._queue.append(item)
        self.queued += 1
        self._wake.set()
        await item.done.wait()
        if item.error is not None:
            raise item.error
        return item.message

    async def serve(self) -> None:
        """The committer task: one batch at a time, for ever. Never raises (but
        ``Cancelled``): a failure is the failure of the messages in the batch."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            gather = _GATHER.get()
            if gather is not None:
                await gather()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                await self._commit(batch)
            except Exception as exc:  # a bug: fail the batch, keep the controller up
                log.exception("the commit path failed; the messages of its batch fail")
                for item in batch:
                    if not item.done.is_set():
                        item.fail(exc)

    async def _commit(self, batch: list[_Item]) -> None:
        state, seq = self.state, self.seq + 1
        records: dict[str, bytes | None] = {}
        stepped: list[tuple[_Item, Transition | None]] = []
        for item in batch:
            try:
                message = item.build(state) if callable(item.build) else item.build
                if message is None:
                    item.done.set()
                    continue
                item.message = message
                if isinstance(message, _COMMANDS):
                    self.limits.check(message)
                transition = step(state, message)  # CommandError: this one alone
            except Exception as exc:
                item.fail(exc)
                continue
            if not transition.effects and (
                transition.state is state or same_checkpoint(state, transition.state)
            ):
                # A no-op, or a change to what is not checkpointed (observations):
                # nothing to write, resolved with its batch.
                state = transition.state
                stepped.append((item, None))
                continue
            try:
                delta = encode_changes(transition.changes)
            except Exception as exc:  # a value no check foresaw: this message alone
                item.fail(_not_applied(f"encoding checkpoint {seq} failed: {exc!r}", message))
                log.exception("encoding %s failed", describe(message))
                continue
            records.update(delta)
            state = transition.state
            stepped.append((item, transition))
        if all(t is None for _, t in stepped):
            # Nothing to commit (no-ops, observations): adopt what is not checkpointed.
            self.state = state
            for item, _ in stepped:
                item.done.set()
            return
        records.update(self.pending_records)
        records[META_KEY] = meta_record(seq, state.replica_counter)
        puts = {k: v for k, v in records.items() if v is not None}
        deletes = [k for k, v in records.items() if v is None]
        started = time.perf_counter()
        try:
            await self.call(lambda: self.store.commit(seq, puts, deletes))
        except LeaseLost as exc:  # fenced: this commit wrote nothing, and none ever will
            for item, _ in stepped:
                assert item.message is not None
                item.fail(exc.with_outcome(_fenced(item.message)))
            return
        except CheckpointOutcomeUnknown as exc:  # it says itself what is not known
            for item, _ in stepped:
                item.fail(exc)
            return
        except CheckpointLocked as exc:  # a lock held elsewhere: nothing was written
            for item, _ in stepped:
                assert item.message is not None
                item.fail(exc.with_outcome(_outcome(item.message, yet=True)))
            return
        except Exception as exc:
            for item, _ in stepped:
                assert item.message is not None
                item.fail(
                    _not_applied(
                        f"saving checkpoint {seq} to {self.where} failed: {exc!r}",
                        item.message,
                        yet=True,
                    )
                )
            return
        self.seq, self.state = seq, state
        self.pending_records = {k: v for k, v in self.pending_records.items() if k not in puts}
        self.commits += 1
        if self._on_commit is not None:
            try:
                self._on_commit(time.perf_counter() - started, sum(map(len, puts.values())))
            except Exception:  # bookkeeping must not undo a durable commit
                log.exception("recording a commit's figures failed")
        self._carry_out(stepped)

    def _carry_out(self, stepped: list[tuple[_Item, Transition | None]]) -> None:
        # The last routing table holds every earlier one's changes: push only it, first,
        # so the router stops sending to a replica before anything is asked to stop.
        table = None
        for _, t in stepped:
            if t is not None:
                for effect in t.effects:
                    if isinstance(effect, UpdateRouter):
                        table = effect
        for item, t in stepped:
            if table is not None:
                self._effect(table, item)
                table = None
            if t is not None:
                for effect in t.effects:
                    if not isinstance(effect, UpdateRouter):
                        self._effect(effect, item)
            item.done.set()

    def _effect(self, effect: Effect, item: _Item) -> None:
        try:
            self._dispatch(effect, item.group)
        except Exception as exc:  # an effect the shell does not know: that message fails
            log.exception("dispatching %r failed", effect)
            if item.error is None:
                item.error = exc


def _not_applied(why: str, message: Message, *, yet: bool = False) -> CheckpointError:
    return CheckpointError(f"{why}; {_outcome(message, yet=yet)}")


def _outcome(message: Message, *, yet: bool = False) -> str:
    """What a commit that wrote nothing means for ``message``."""
    if isinstance(message, _COMMANDS):
        return "the command was not applied and nothing was started or stopped"
    return f"that {describe(message)} was not recorded{' yet' if yet else ''}"


def _fenced(message: Message) -> str:
    """What a commit refused by the fence means for ``message``: no more than is known."""
    if isinstance(message, _COMMANDS):
        return "nothing was written: the command was not applied and no effect ran"
    return (
        f"recording that {describe(message)} was refused (the command that led to it was "
        f"saved earlier and its effects ran); the controller holding the lease finds the "
        f"replicas as they are when it recovers: ask it (its status) for the outcome"
    )
