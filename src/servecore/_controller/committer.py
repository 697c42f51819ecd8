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
* its outcome is unknown (:class:`~servecore.CheckpointOutcomeUnknown`: the store lost
  the answer and could not say): the batch is remembered as *uncertain*, and before the
  next commit the committer asks the store which sequence number it holds
  (``committed_seq()``, or a ``load()`` for a store without it). If the uncertain
  commit landed it is adopted and its effects carried out then; if not it is
  forgotten; if the store still cannot say, the next batch fails unsent (as during a
  hang), and the one after asks again. Without this the next commit would reuse the
  sequence number, and a store that checks it would refuse every commit after;
* it has no effect and changed nothing checkpointed (a no-op, or a load report that
  only refreshed the state's ``observations``): an empty change set, so no commit; the
  new state is adopted with its batch;
* otherwise it returns once the commit holding it is durable and its effects have been
  dispatched.

Commits run on one long-lived writer thread (:class:`~servecore._controller.writer.Writer`),
not one fresh ``trio.to_thread`` hand-off per save, or inline on the trio thread. On the
writer thread every store call has a deadline (``store_call_timeout_s``): a call not
answered within it fails its messages with :class:`~servecore.StoreUnresponsive`, and
its answer, when it comes, is still heeded: a commit that landed late is adopted and
its effects carried out then (the state cannot have moved meanwhile, since every batch
that comes while a call is unanswered waits for it, at most the deadline, and fails
unsent if it is still unanswered).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, get_args

import trio

from servecore._controller.writer import Answer, Writer
from servecore._core.errors import (
    CheckpointError,
    CheckpointLocked,
    CheckpointOutcomeUnknown,
    LeaseLost,
    StoreUnresponsive,
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

__all__ = ["Committer", "deterministic_batches"]

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


class _Unanswered:
    """A store call given up on: its answer, the commit's seq (``None``: not a commit)
    and what to do if it landed."""

    __slots__ = ("answer", "landed", "seq")

    def __init__(
        self, answer: Answer[Any], seq: int | None, landed: Callable[[], None] | None
    ) -> None:
        self.answer, self.seq, self.landed = answer, seq, landed


class _Uncertain:
    """A commit whose answer was lost: its seq, and what to do if it landed (adopt its
    state and carry out its effects)."""

    __slots__ = ("landed", "seq")

    def __init__(self, seq: int, landed: Callable[[], None]) -> None:
        self.seq, self.landed = seq, landed


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
        call_timeout_s: float = math.inf,
        late_group: Any = None,
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
        #: How long a store call on the writer thread is waited for.
        self.call_timeout_s = call_timeout_s
        # Where the effects of a commit that landed after its deadline go (the commands
        # that caused them have already been told StoreUnresponsive).
        self._late_group = late_group
        # A store call given up on and not answered yet, and what to do if it landed.
        self._unanswered: _Unanswered | None = None
        # A commit whose outcome the store could not tell: asked about before the next.
        self._uncertain: _Uncertain | None = None

    @property
    def unanswered(self) -> str | None:
        """The store call given up on that has not answered yet, in words, or ``None``."""
        return None if self._unanswered is None else self._unanswered.answer.what

    def after_unanswered(self, fn: Callable[[], object]) -> bool:
        """If a store call is still unanswered, hand ``fn`` to the writer thread to run
        after it (closing the store must not cut a call in progress) and return True;
        otherwise return False and do nothing."""
        if self._unanswered is None or self._writer is None:
            return False
        self._writer.submit(fn, "close")
        return True

    def adopt_loaded(self, state: State, seq: int) -> None:
        """Start from a checkpoint just loaded."""
        self.state, self.seq = state, seq

    async def commit_pending(self) -> None:
        """Commit :attr:`pending_records` alone, as the next checkpoint (before
        :meth:`serve` runs: nothing else may commit meanwhile). Raises what the store
        raised; then nothing was adopted."""
        seq = self.seq + 1
        puts = {**self.pending_records, META_KEY: meta_record(seq, self.state.replica_counter)}
        await self.call(lambda: self.store.commit(seq, puts, []), "commit", seq=seq)
        self.seq = seq
        self.pending_records = {}
        self.commits += 1

    async def call(
        self,
        fn: Callable[[], T],
        what: str = "load",
        *,
        seq: int | None = None,
        landed: Callable[[], None] | None = None,
    ) -> T:
        """Run a store call where commits run (the writer thread, or inline).

        On the writer thread it is waited for at most :attr:`call_timeout_s`; then it
        raises :class:`~servecore.StoreUnresponsive` (``what`` and ``seq`` name the
        call), and if the call answers later, successfully, ``landed()`` runs then.
        Inline, a call cannot be given up on: the trio thread is the one blocked.
        """
        if self._writer is None:
            return fn()
        name = what if seq is None else f"{what} of checkpoint {seq}"
        answer = self._writer.submit(fn, name)
        # Not cancellable (a write in progress finishes), but bounded.
        with trio.CancelScope(shield=True), trio.move_on_after(self.call_timeout_s):
            await answer.wait()
        if answer.answered:
            return answer.unwrap()
        self._unanswered = _Unanswered(answer, seq, landed)
        answer.on_answer(self._wake.set)  # the committer heeds the late answer at once
        log.error(
            "the checkpoint store %s has not answered %s within %gs (store_call_timeout_s)",
            self.where, name, self.call_timeout_s,
        )  # fmt: skip
        raise StoreUnresponsive(self.where, what, self.call_timeout_s, seq)

    async def _heed_unanswered(self) -> bool:
        """Wait (at most :attr:`call_timeout_s`) for a store call given up on; heed its
        answer. Return False if it is still unanswered."""
        if self._unanswered is None:
            return True
        answer = self._unanswered.answer
        with trio.CancelScope(shield=True), trio.move_on_after(self.call_timeout_s):
            await answer.wait()
        if not answer.answered:
            return False
        self._heed_late()
        return True

    def _heed_late(self) -> None:
        """The store answered a call given up on: adopt the commit if it landed."""
        assert self._unanswered is not None
        unanswered, self._unanswered = self._unanswered, None
        answer, seq, landed = unanswered.answer, unanswered.seq, unanswered.landed
        try:
            answer.unwrap()
        except LeaseLost as exc:
            log.error("the store answered %s late, refusing it: %s", answer.what, exc)
            return
        except CheckpointOutcomeUnknown as exc:
            log.error("the store answered %s late, and could not say more: %s", answer.what, exc)
            if seq is not None and landed is not None:
                self._uncertain = _Uncertain(seq, landed)  # asked before the next commit
            return
        except Exception as exc:
            log.warning(
                "the store answered %s late: it failed (%r), so nothing of it was written",
                answer.what, exc,
            )  # fmt: skip
            return
        log.warning(
            "the store answered %s late: it landed, so it is adopted now and its effects "
            "carried out", answer.what,
        )  # fmt: skip
        if landed is not None:
            landed()

    async def _resolve_uncertain(self) -> CheckpointError | None:
        """Ask the store whether the uncertain commit landed; adopt and carry it out if
        it did, forget it if not. Return the error the batch waiting on the answer fails
        with (unsent) if the store cannot say, or ``None``: go on."""
        assert self._uncertain is not None
        seq = self._uncertain.seq
        try:
            held = await self.call(self._committed_seq, "committed_seq")
        except LeaseLost as exc:  # fenced: no later commit could go through
            return exc.with_outcome(
                "nothing was sent for this: it was not applied, and nothing was started or "
                "stopped for it"
            )
        except Exception as exc:
            return CheckpointError(
                f"the checkpoint store {self.where} could not say whether checkpoint {seq} "
                f"(whose answer was lost) landed: {exc}; so nothing more was sent to it: this "
                f"was not applied or recorded, and nothing was started or stopped for it; "
                f"the next command asks again (check that the store answers)"
            )
        if self._uncertain is None or self._uncertain.seq != seq:  # (heeded meanwhile)
            return None
        landed = self._uncertain.landed
        if held == seq:
            self._uncertain = None
            log.warning(
                "checkpoint %d, whose answer was lost, did land in %s: it is adopted now and "
                "its effects carried out", seq, self.where,
            )  # fmt: skip
            landed()
            return None
        if held == self.seq:
            self._uncertain = None
            log.warning(
                "checkpoint %d, whose answer was lost, did not land in %s (it holds %d): "
                "forgotten, nothing of it was carried out", seq, self.where, held,
            )  # fmt: skip
            return None
        return CheckpointError(
            f"the checkpoint store {self.where} holds sequence number {held}, but this "
            f"controller has {self.seq} and sent {seq} last (whose answer was lost): "
            f"something else writes to it; nothing more was sent to it: this was not "
            f"applied or recorded, and nothing was started or stopped for it; close and "
            f"reopen the controller to load what it holds"
        )

    def _committed_seq(self) -> int:
        """The sequence number the store holds now (on the writer thread)."""
        ask = getattr(self.store, "committed_seq", None)
        if ask is not None:
            return int(ask())
        return int(self.store.load()[0])

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
            if self._unanswered is not None and self._unanswered.answer.answered:
                self._heed_late()
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
        if not await self._heed_unanswered():
            error = CheckpointError(
                f"the checkpoint store {self.where} has still not answered {self.unanswered} "
                f"after {self.call_timeout_s:g}s more (store_call_timeout_s), so nothing more "
                f"was sent to it: this was not applied or recorded, and nothing was started "
                f"or stopped for it; check that the store answers, or raise "
                f"store_call_timeout_s in open_controller if it is only slow"
            )
            for item in batch:  # (not stepped: builders see only committed states)
                item.fail(error)
            return
        if self._uncertain is not None:
            unsure = await self._resolve_uncertain()
            if unsure is not None:
                for item in batch:  # not stepped, not sent
                    item.fail(unsure)
                return
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

        def landed() -> None:  # the commit landed after its deadline
            self._adopt(seq, state, puts, started)
            self._carry_out(stepped, late=True)

        try:
            await self.call(
                lambda: self.store.commit(seq, puts, deletes), "commit", seq=seq, landed=landed
            )
        except LeaseLost as exc:  # fenced: this commit wrote nothing, and none ever will
            for item, _ in stepped:
                assert item.message is not None
                item.fail(exc.with_outcome(_fenced(item.message)))
            return
        except StoreUnresponsive as exc:  # given up on: its answer is heeded when it comes
            for item, _ in stepped:
                item.fail(exc)
            return
        except CheckpointOutcomeUnknown as exc:  # it says itself what is not known
            # Ask before the next commit: it may have landed (then it is adopted and
            # carried out), and the next commit must not reuse its sequence number.
            self._uncertain = _Uncertain(seq, landed)
            log.error(
                "the outcome of checkpoint %d is unknown (%s); the store is asked whether it "
                "landed before the next commit", seq, exc.reason,
            )  # fmt: skip
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
        self._adopt(seq, state, puts, started)
        self._carry_out(stepped)

    def _adopt(self, seq: int, state: State, puts: dict[str, bytes], started: float) -> None:
        """A commit is durable: make its state and sequence number the adopted ones."""
        self.seq, self.state = seq, state
        self.pending_records = {k: v for k, v in self.pending_records.items() if k not in puts}
        self.commits += 1
        if self._on_commit is not None:
            try:
                self._on_commit(time.perf_counter() - started, sum(map(len, puts.values())))
            except Exception:  # bookkeeping must not undo a durable commit
                log.exception("recording a commit's figures failed")

    def _carry_out(
        self, stepped: list[tuple[_Item, Transition | None]], late: bool = False
    ) -> None:
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
                self._effect(table, item, late)
                table = None
            if t is not None:
                for effect in t.effects:
                    if not isinstance(effect, UpdateRouter):
                        self._effect(effect, item, late)
            item.done.set()

    def _effect(self, effect: Effect, item: _Item, late: bool = False) -> None:
        # A late commit's messages were answered already: its effects are background work.
        group = self._late_group if late and self._late_group is not None else item.group
        try:
            self._dispatch(effect, group)
        except Exception as exc:  # an effect the shell does not know: that message fails
            log.exception("dispatching %r failed", effect)
            if item.error is None and not late:
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
