"""The stateful crash-consistency machine (docs/design.md §7), for Hypothesis.

Subclass :class:`CrashConsistencyMachine` and override :meth:`make_store` (and, for a
runtime author, :meth:`make_runtime` and :meth:`kill_hook`) to run it against your own
store or runtime::

    class SQLiteCrashes(CrashConsistencyMachine):
        def make_store(self):
            return servecore.SQLiteStore(self.tmp / "state.db")

    TestSQLiteCrashes = SQLiteCrashes.TestCase

Every rule opens a controller on the same store and runtime (so every rule also
recovers), does one thing and checks the five properties against a
:class:`ReferenceModel`. Crash rules first count the crash points of what they are
about to do on a copy of the world, then draw one of them, so every drawn crash fires.

Only what the machine injects may fail: a start failure it did not inject, a stop that
raises, or a death it did not cause fails the example, naming the tag and the runtime's
own error. Each example starts from an empty store and an empty runtime (checked).
For settings that suit slow runtimes, see docs/plugins.md.

A failure is reported as its own ``AssertionError`` after the steps that led to it.
The machine's ``TestCase`` runs with the kit's settings (no deadline, one bug
reported, a ``@reproduce_failure`` blob) and bounds shrinking to
:attr:`CrashConsistencyMachine.shrink_budget_s`, well under pytest's timeout, so a slow
shrink shows a partly shrunk example instead of a ``Timeout``. Every draw is from a
range that does not depend on the world (a crash point or a victim is an index taken
modulo what there is), so replaying a failure draws the same values and a timing
difference cannot turn it into ``FlakyStrategyDefinition``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import unittest
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from servecore._core.errors import (
    BackendStartError,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointVersionError,
)
from servecore._core.transitions import (
    BackendStatus,
    Command,
    CreateBackend,
    CreateEndpoint,
    RetryBackend,
    SetBackendConfig,
)
from servecore.runtimes import Runtime, close_runtime, open_runtime
from servecore.stores import BlobStore, MemoryStore, Store
from servecore.testing._crash import (
    CrashWorld,
    Kill,
    Outcome,
    Snapshot,
    Together,
    check_all_or_nothing,
    corrupt,
    restore,
)
from servecore.testing._group import check_some_order
from servecore.testing._model import ReferenceModel, desired
from servecore.testing._runtime import InMemoryRuntime
from servecore.testing.strategies import BACKEND_TAGS, backend_definitions, commands

__all__ = ["CrashConsistencyMachine"]

#: A command that changes the state (the first time), so that its commit can be torn.
_PROBE = CreateEndpoint(name="torn-save-probe")

#: Draws of a crash point or a victim come from this fixed range, then are taken
#: modulo what there is: the strategy never depends on the world.
_INDEX = st.integers(0, 1023)

_T = TypeVar("_T")


@contextlib.contextmanager
def shrink_budget(seconds: float) -> Iterator[None]:
    """Stop Hypothesis shrinking a failure after ``seconds`` (its own limit is five
    minutes, as long as pytest's timeout); the failure is then reported partly shrunk.

    Hypothesis offers no setting for this; its engine keeps the limit in a module
    constant it documents as patchable. On a Hypothesis without it this does nothing.
    """
    from hypothesis.internal.conjecture import engine

    before = getattr(engine, "MAX_SHRINKING_SECONDS", None)
    if before is None:
        yield
        return
    engine.MAX_SHRINKING_SECONDS = seconds  # type: ignore[assignment]
    try:
        yield
    finally:
        engine.MAX_SHRINKING_SECONDS = before


def _kit_settings() -> settings:
    """The machine's default settings, on top of the profile loaded now: no deadline
    (a start takes what it takes), no health check that a slow world trips, one bug
    reported (its own assertion, not a group of them), and a blob to replay it."""
    return settings(
        deadline=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=True,
    )


class _KitTestCase:
    """``Machine.TestCase``: a ``unittest.TestCase`` running the machine with the kit's
    settings (assign ``Machine.TestCase.settings`` to change them) and with shrinking
    bounded by ``Machine.shrink_budget_s``."""

    def __get__(
        self, obj: object, owner: type[CrashConsistencyMachine] | None = None
    ) -> type[unittest.TestCase]:
        machine = type(obj) if isinstance(obj, CrashConsistencyMachine) else owner
        assert machine is not None
        case = machine.__dict__.get("_kit_test_case")
        if case is None:
            case = _test_case_for(machine)
            setattr(machine, "_kit_test_case", case)  # noqa: B010 (one per class)
        return case


def _test_case_for(machine: type[CrashConsistencyMachine]) -> type[unittest.TestCase]:
    class KitTestCase(unittest.TestCase):
        settings = _kit_settings()

        def runTest(self) -> None:
            with shrink_budget(machine.shrink_budget_s):
                run_state_machine_as_test(machine, settings=self.settings)

        runTest.is_hypothesis_test = True  # type: ignore[attr-defined]
        runTest._hypothesis_state_machine_class = machine  # type: ignore[attr-defined]

    KitTestCase.__name__ = f"{machine.__name__}.TestCase"
    KitTestCase.__qualname__ = f"{machine.__qualname__}.TestCase"
    return KitTestCase


def _pick(data: st.DataObject, choices: Sequence[_T], label: str) -> _T:
    """One of ``choices``, drawn as an index from a fixed range (see :data:`_INDEX`)."""
    chosen = choices[data.draw(_INDEX, label=f"{label} (index)") % len(choices)]
    note(f"{label}: {chosen!r}")
    return chosen


class CrashConsistencyMachine(RuleBasedStateMachine):
    """Crash a controller anywhere; check it always recovers to what was acknowledged."""

    #: Seconds Hypothesis may spend shrinking a failure before reporting it as it is.
    shrink_budget_s: float = 60.0

    TestCase = _KitTestCase()  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="servecore-crash-"))
        self.world = CrashWorld(self.make_store(), self.make_runtime(), kill=self.kill_hook())
        self.model = ReferenceModel()
        self.last: Outcome | None = None
        self.backup: tuple[Snapshot, ReferenceModel] | None = None

    # -- what subclasses override -------------------------------------------------------

    def make_store(self) -> Store | BlobStore:
        """A fresh, empty store (``self.tmp`` is a private directory, new per example):
        a key-value store, or a whole-blob one (run through
        :class:`~servecore.BlobAdapter`)."""
        return MemoryStore()

    def make_runtime(self) -> Runtime:
        """The runtime under test: a new, *isolated and empty* world per example (its
        own directory under ``self.tmp``, or its own namespace). Replicas should
        outlive a controller; an in-process runtime, whose replicas stop with it, is
        checked while the controller is open."""
        return InMemoryRuntime()

    def kill_hook(self) -> Callable[[str], Any] | None:
        """``kill(tag)`` killing a replica behind the controller's back (it may return
        an awaitable), or ``None`` to use the runtime's own ``kill`` method. It must
        report ``ReplicaDied`` before it returns."""
        return None

    def teardown(self) -> None:
        """Remove ``self.tmp``. A runtime whose replicas outlive the host must stop them
        here: override, call :meth:`stop_live_replicas`, then ``super().teardown()``."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def stop_live_replicas(self, timeout_s: float = 5.0) -> None:
        """Stop every replica alive in the runtime (for :meth:`teardown`)."""
        trio.run(_stop_all, self.world.inner_runtime, self.world.name, timeout_s)

    # -- helpers ------------------------------------------------------------------------

    def _settled(self, outcome: Outcome) -> None:
        assert outcome.crashed is None, outcome
        assert outcome.state is not None, f"controller did not open: {outcome.error!r}"
        self.world.check_settled(outcome.state, outcome.live)
        assert desired(outcome.state) == self.model.desired(), (
            desired(outcome.state),
            self.model.desired(),
        )
        self.last = outcome

    def _crash_point(self, data: st.DataObject, total: int) -> int:
        """One of the ``total`` crash points, noted with its label in the report."""
        k = data.draw(_INDEX, label="crash point (index)") % total
        note(f"crash point {k} of {total}")
        return k

    def _failed_before(self, cmd: Command) -> bool:
        """Whether ``cmd`` names a backend that was FAILED when last seen."""
        tag = getattr(cmd, "tag", None)
        if self.last is None or self.last.state is None or tag is None:
            return False
        backend = self.last.state.backends.get(tag)
        return backend is not None and backend.status is BackendStatus.FAILED

    def _expect(self, cmd: Command, outcome: Outcome) -> None:
        expected = self.model.expected_error(cmd)
        if expected is not None:
            assert isinstance(outcome.error, expected), (cmd, expected, outcome.error)
        else:
            # BackendStartError is allowed here only because the runtime wrapper already
            # failed the run if the start failure was not injected.
            assert outcome.error is None or isinstance(outcome.error, BackendStartError), (
                cmd,
                outcome.error,
            )
            self.model.apply(cmd)

    # -- rules --------------------------------------------------------------------------

    @initialize(first=backend_definitions(BACKEND_TAGS[0], min_replicas=1, max_replicas=2))
    def open_empty(self, first: CreateBackend) -> None:
        """Each example starts from nothing (an empty store, an empty runtime, both
        checked), then creates one backend with running replicas, so that even a short
        example has replicas to kill, crash around and recover."""
        _, stored = self.world.store.load()
        assert not stored, (
            f"make_store() gave a store that already holds a checkpoint ({len(stored)} "
            f"records); each example needs a fresh, empty store (e.g. under self.tmp)"
        )
        live = self.world.live()
        assert not live, (
            f"make_runtime() gave a runtime with replicas already alive: {sorted(live)}; "
            f"each example needs an isolated, empty world (its own directory or "
            f"namespace), and teardown() must stop what the example started"
        )
        self._settled(self.world.run(None))
        self.command(first)

    @rule(cmd=commands())
    def command(self, cmd: Command) -> None:
        """A command on a healthy controller: applied exactly, or rejected unchanged."""
        outcome = self.world.run(cmd)
        self._expect(cmd, outcome)
        self._settled(outcome)

    @rule(cmd=commands(), data=st.data())
    def command_with_crash(self, cmd: Command, data: st.DataObject) -> None:
        """Crash at one enumerated point of (recovery +) the command, then recover."""
        total = self.world.count_points(cmd)
        k = self._crash_point(data, total)
        outcome = self.world.run(cmd, crash_at=k)
        assert outcome.crashed is not None, f"crash point {k} of {total} did not fire"
        recovered = self.world.run(None)
        assert recovered.state is not None, recovered
        check_all_or_nothing(self.model, cmd, recovered.state)
        self._settled(recovered)

    @rule(cmd=commands())
    def command_with_failed_save(self, cmd: Command) -> None:
        """Property 4: a failed save leaves the state unchanged and runs no effect."""
        outcome = self.world.run(cmd, prepare=lambda _ctl: self.world.store.fail_next(1))
        self.world.store.fail_next(0)
        expected = self.model.expected_error(cmd)
        if expected is not None:
            assert isinstance(outcome.error, expected), (cmd, outcome.error)
        elif isinstance(outcome.error, CheckpointError):
            assert not outcome.action_log, f"an effect ran after a failed save: {outcome}"
            assert outcome.table_unchanged, "the router saw a state that was never saved"
        else:
            # A restated command is a no-op: nothing to save, nothing to fail. Restating
            # the definition of a FAILED backend, or retrying one, leaves it FAILED and
            # says so again.
            restated_failed = isinstance(outcome.error, BackendStartError) and (
                isinstance(cmd, CreateBackend | SetBackendConfig | RetryBackend)
                and self._failed_before(cmd)
            )
            assert outcome.error is None or restated_failed, (cmd, outcome.error)
            assert not outcome.action_log, f"a no-op command ran an effect: {outcome}"
            self.model.apply(cmd)
        self._settled(outcome)

    @rule(cmd=commands(), n=st.sampled_from([1, 2, 6]))
    def command_during_store_outage(self, cmd: Command, n: int) -> None:
        """The command's own save lands, then the store fails the ``n`` saves that
        follow (the events of its starts and stops) and recovers: no event is dropped,
        and the controller converges to the acknowledged state."""
        store = self.world.store
        outcome = self.world.run(cmd, prepare=lambda _ctl: store.fail_next(n, after=1))
        store.fail_next(0)
        expected = self.model.expected_error(cmd)
        if expected is not None:
            assert isinstance(outcome.error, expected), (cmd, expected, outcome.error)
        else:
            if isinstance(outcome.error, CheckpointError):
                # Only the events' saves failed: the command itself was saved.
                assert "the command was saved" in str(outcome.error), outcome.error
            else:
                assert outcome.error is None or isinstance(outcome.error, BackendStartError), (
                    cmd,
                    outcome.error,
                )
            self.model.apply(cmd)
        self._settled(outcome)

    @precondition(lambda self: self.last is not None and bool(self.last.state.replicas))
    @rule(data=st.data(), n=st.sampled_from([1, 2, 6]))
    def kill_replica_during_store_outage(self, data: st.DataObject, n: int) -> None:
        """A replica dies while the store is failing: its death and its replacement
        are recorded once the store recovers."""
        assert self.last is not None and self.last.state is not None
        tag = _pick(data, sorted(self.last.state.replicas), "victim")
        store = self.world.store
        outcome = self.world.run(Kill(tag), prepare=lambda _ctl: store.fail_next(n))
        store.fail_next(0)
        self._settled(outcome)

    @precondition(lambda self: self.last is not None and bool(self.last.state.replicas))
    @rule(data=st.data())
    def kill_replica(self, data: st.DataObject) -> None:
        """A replica dies while the controller runs: it is replaced."""
        assert self.last is not None and self.last.state is not None
        tag = _pick(data, sorted(self.last.state.replicas), "victim")
        self._settled(self.world.run(Kill(tag)))

    @precondition(lambda self: self.last is not None and bool(self.last.state.replicas))
    @rule(data=st.data())
    def kill_replica_with_crash(self, data: st.DataObject) -> None:
        """A replica dies, and the controller crashes while replacing it."""
        assert self.last is not None and self.last.state is not None
        tag = _pick(data, sorted(self.last.state.replicas), "victim")
        total = self.world.count_points(Kill(tag))
        k = self._crash_point(data, total)
        assert self.world.run(Kill(tag), crash_at=k).crashed is not None
        recovered = self.world.run(None)
        assert recovered.state is not None
        self._settled(recovered)

    @rule(tag=st.sampled_from(BACKEND_TAGS), times=st.sampled_from([1, 2, None]))
    def fail_starts(self, tag: str, times: int | None) -> None:
        """Starts of a backend fail ``times`` times (always if ``None``)."""
        runtime = self.world.inner_runtime
        if isinstance(runtime, InMemoryRuntime):
            runtime.fail_starts(tag, f"injected failure of {tag}", times)

    @rule(tag=st.sampled_from(BACKEND_TAGS))
    def heal(self, tag: str) -> None:
        """Starts of a backend succeed again (a FAILED backend stays FAILED until told)."""
        runtime = self.world.inner_runtime
        if isinstance(runtime, InMemoryRuntime):
            runtime.heal(tag)

    @rule(cmds=st.lists(commands(), min_size=2, max_size=3))
    def commands_together(self, cmds: list[Command]) -> None:
        """Concurrent commands share commits: each is applied or rejected alone, as in
        some arrival order."""
        outcome = self.world.run(Together(tuple(cmds)))
        assert outcome.state is not None, outcome
        self.model = check_some_order(self.model, cmds, outcome.state, outcome.errors)
        self._settled(outcome)

    @rule(cmds=st.lists(commands(), min_size=2, max_size=3), data=st.data())
    def commands_together_with_crash(self, cmds: list[Command], data: st.DataObject) -> None:
        """Crash anywhere in (recovery +) a group commit: whole batches survive, in order."""
        total = self.world.count_points(Together(tuple(cmds)))
        k = self._crash_point(data, total)
        outcome = self.world.run(Together(tuple(cmds)), crash_at=k)
        if outcome.crashed is None:
            # Concurrent commands may share commits differently from one run to the
            # next, so this run had fewer crash points than the counting run and ran
            # whole: check it as a run without a crash.
            assert outcome.state is not None, outcome
            self.model = check_some_order(self.model, cmds, outcome.state, outcome.errors)
            self._settled(outcome)
            return
        recovered = self.world.run(None)
        assert recovered.state is not None, recovered
        self.model = check_some_order(self.model, cmds, recovered.state)
        self._settled(recovered)

    @rule(cmds=st.lists(commands(), min_size=1, max_size=3), restate=st.booleans())
    def commands_together_with_failed_commit(self, cmds: list[Command], restate: bool) -> None:
        """A failed group commit fails every command in it and runs no effect.

        Half the batches end by restating their first command on purpose: that copy is
        a no-op only against a state that was never committed, so it must fail too
        (random draws repeat a command too rarely to find a shell that acknowledges it).
        """
        if restate or len(cmds) == 1:
            cmds = [*cmds, cmds[0]]
        outcome = self.world.run(
            Together(tuple(cmds)), prepare=lambda _ctl: self.world.store.fail_next(1)
        )
        self.world.store.fail_next(0)
        assert outcome.state is not None, outcome
        self.model = check_some_order(self.model, cmds, outcome.state, outcome.errors)
        if any(isinstance(e, CheckpointError) for e in outcome.errors):
            assert not outcome.action_log, f"an effect ran after a failed commit: {outcome}"
            assert outcome.table_unchanged, "the router saw a state that was never committed"
        self._settled(outcome)

    @rule()
    def torn_commit(self) -> None:
        """A commit that fails half-way is kept by no store: not now, not on reopening."""
        store = self.world.store
        outcome = self.world.run(_PROBE, prepare=lambda _ctl: store.tear_next())
        store.tear_next(False)
        if isinstance(outcome.error, CheckpointError):
            assert not outcome.action_log, f"an effect ran after a torn commit: {outcome}"
        else:
            assert outcome.error is None, outcome.error
            self.model.apply(_PROBE)  # already there: nothing to commit, nothing torn
        self._settled(outcome)
        self._settled(self.world.run(None))

    @rule(how=st.sampled_from(["torn", "garbage", "checksum", "too-new", "emptied"]))
    def corrupt_checkpoint(self, how: str) -> None:
        """Property 5: a corrupt or too-new checkpoint raises; never read as empty."""
        store = self.world.store
        before = list(self.world.runtime.log)
        good = corrupt(store, how)
        if good is None:
            return
        reopened = self.world.run(None)
        wanted = CheckpointVersionError if how == "too-new" else CheckpointCorrupt
        assert isinstance(reopened.error, wanted), reopened
        assert reopened.state is None
        assert self.world.runtime.log == before, "a replica was touched on a bad checkpoint"
        restore(store, good)
        self._settled(self.world.run(None))

    @rule()
    def snapshot_checkpoint(self) -> None:
        """Remember the checkpoint as it is now (to restore it later, as from a backup)."""
        seq, records = self.world.store.inner.load()
        self.backup = ((seq, dict(records)), self.model.copy())

    @precondition(lambda self: getattr(self, "backup", None) is not None)
    @rule()
    def restore_old_checkpoint(self) -> None:
        """Roll the store back to an older checkpoint. Replicas started since then are
        orphans: recovery must stop them, and never mint their tags again."""
        assert self.backup is not None
        snapshot, model = self.backup
        if not snapshot[1]:
            return
        live_before = self.world.live()
        restore(self.world.store, snapshot)
        self.model = model.copy()
        # Tags retired after the backup may be minted again: the old checkpoint cannot
        # know them. Live ones must not be: recovery bumps the counter past them.
        self.world.runtime.log.clear()
        self.world.highest_counter = 0
        outcome = self.world.run(None)
        self._settled(outcome)
        assert outcome.state is not None
        for tag in live_before:
            alive = tag in outcome.state.replicas
            assert alive or tag not in self.world.live(), f"orphan {tag} left running"

    @invariant()
    def counter_never_goes_back(self) -> None:
        """Property 2's other half: the replica counter only grows."""
        if self.last is not None and self.last.state is not None:
            assert self.last.state.replica_counter >= self.world.highest_counter


async def _stop_all(runtime: Runtime, name: str, timeout_s: float) -> None:
    await open_runtime(runtime, namespace=name, report=lambda _event: None)
    try:
        for tag in sorted(await runtime.list_replicas()):
            await runtime.stop_replica(tag, timeout_s)
    finally:
        await close_runtime(runtime)
