"""Crash a controller at every effect boundary and check what recovery makes of it.

A :class:`CrashWorld` is what survives a controller: a store and a runtime. Each
:meth:`CrashWorld.run` opens a controller on them (which recovers), performs one action
(a command, or killing a replica), waits for it to settle and closes it, optionally
crashing at crash point ``k``. Crash points are numbered by a :class:`CrashPlan`:
before, midway through (part of the change set written) and after every commit, and
before and after every replica start and stop, during recovery as well as during the
action. Controllers in a world take a batch of messages only once every other task is
blocked, so which messages share a commit (group commit), and so the count of crash
points, does not depend on timing. :meth:`CrashWorld.count_points` runs the same
action on an in-memory copy of the world to learn how many points there are, so a test
can visit each one (:func:`enumerate_crashes`), never hoping a random crash fires.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import trio
from trio.testing import MockClock

from servecore._checkpoint import FORMAT, META_KEY, VERSION, _record, meta_record, read_meta
from servecore._commit import deterministic_batches
from servecore._controller import Controller, open_controller
from servecore._core import (
    BackendStatus,
    Command,
    ReplicaStatus,
    StartReplica,
    State,
    replica_number,
    validate_state,
)
from servecore._errors import (
    BackendStartError,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointVersionError,
    CommandError,
)
from servecore.runtimes import Query, Report, Runtime
from servecore.stores import BlobStore, MemoryStore, Store
from servecore.testing._faults import CrashPlan, SimulatedCrash
from servecore.testing._model import ReferenceModel, desired
from servecore.testing._runtime import InMemoryRuntime
from servecore.testing._store import FaultyStore

__all__ = [
    "CrashWorld",
    "CrashingRuntime",
    "Kill",
    "Outcome",
    "check_all_or_nothing",
    "corrupt",
    "enumerate_crashes",
    "restore",
]

_EXPECTED_ERRORS = (
    CommandError,
    BackendStartError,
    CheckpointError,
    CheckpointCorrupt,
    CheckpointVersionError,
)


@attrs.frozen
class Kill:
    """An action: kill replica ``tag`` behind the controller's back."""

    tag: str


@attrs.frozen
class Together:
    """An action: submit ``commands`` concurrently, so they share commits (group
    commit). Each one's error (or ``None``) is in :attr:`Outcome.errors`, in order."""

    commands: tuple[Command, ...]


Action = Command | Kill | Together | None


@attrs.frozen
class Outcome:
    """What one :meth:`CrashWorld.run` gave.

    ``crashed`` is the crash point label if the controller crashed; ``error`` the
    expected error the action (or opening) raised; ``state`` the controller's state at
    the end (``None`` after a crash or a failed open); ``points`` the crash points seen.
    """

    state: State | None
    error: BaseException | None
    crashed: str | None
    points: int
    table_unchanged: bool = True
    errors: tuple[BaseException | None, ...] = ()


class CrashingRuntime:
    """Wraps any runtime: adds crash points around starts and stops, and a log.

    ``log`` lists ``("start", tag)`` and ``("stop", tag)`` for every operation that
    completed, ``("kill", tag)`` for kills through :meth:`kill`.
    """

    def __init__(
        self,
        inner: Runtime,
        plan: CrashPlan,
        kill: Callable[[str], Any] | None = None,
    ) -> None:
        self.inner = inner
        self.plan = plan
        self.log: list[tuple[str, str]] = []
        self._kill = kill

    async def open(self, *, namespace: str, report: Report) -> None:
        await self.inner.open(namespace=namespace, report=report)

    async def close(self) -> None:
        await self.inner.close()

    async def start_replica(self, effect: StartReplica) -> None:
        self.plan.point(f"before start {effect.tag}")
        await self.inner.start_replica(effect)
        self.log.append(("start", effect.tag))
        self.plan.point(f"after start {effect.tag}")

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        self.plan.point(f"before stop {tag}")
        await self.inner.stop_replica(tag, timeout_s)
        self.log.append(("stop", tag))
        self.plan.point(f"after stop {tag}")

    async def list_replicas(self) -> frozenset[str]:
        return await self.inner.list_replicas()

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        return await self.inner.call(tag, batch)

    def kill(self, tag: str) -> None:
        """Kill ``tag`` with the kill hook (or the in-memory runtime's own ``kill``)."""
        killer = self._kill or getattr(self.inner, "kill", None)
        if killer is None:
            raise TypeError("this runtime offers no way to kill a replica; pass kill=")
        self.log.append(("kill", tag))
        killer(tag)


class CrashWorld:
    """A store and a runtime that outlive every controller opened on them.

    ``store`` defaults to a :class:`~servecore.MemoryStore`; ``runtime`` to a new
    :class:`InMemoryRuntime`. Both are wrapped to add crash points.
    """

    def __init__(
        self,
        store: Store | BlobStore | None = None,
        runtime: Runtime | None = None,
        *,
        kill: Callable[[str], Any] | None = None,
        name: str = "crash-world",
    ) -> None:
        self.plan = CrashPlan()
        self.store = FaultyStore(store if store is not None else MemoryStore(), self.plan)
        self.inner_runtime = runtime if runtime is not None else InMemoryRuntime()
        self.runtime = CrashingRuntime(self.inner_runtime, self.plan, kill)
        self.name = name
        self.highest_counter = 0

    # -- running ------------------------------------------------------------------------

    def run(
        self,
        action: Action = None,
        *,
        crash_at: int | None = None,
        prepare: Callable[[Controller], Any] | None = None,
    ) -> Outcome:
        """Open a controller, do ``action``, settle, close; crash at ``crash_at``.

        ``prepare(ctl)`` runs after recovery, just before the action (e.g. to make the
        action's save fail).
        """
        self.plan.arm(crash_at)  # restarts the count too
        box: dict[str, Any] = {}

        # On the in-memory runtime nothing waits for the real world: a mock clock and
        # inline commits make every run with the same history take the same course.
        in_memory = isinstance(self.inner_runtime, InMemoryRuntime)

        async def session() -> None:
            with deterministic_batches(0.0 if in_memory else 0.005):
                await controlled()

        async def controlled() -> None:
            async with open_controller(
                runtime=self.runtime,
                store=self.store,
                name=self.name,
                save_in_thread=not in_memory,
            ) as ctl:
                await ctl.settle()
                box["table"] = ctl.routing_table
                if prepare is not None:
                    prepare(ctl)
                try:
                    if isinstance(action, Together):
                        box["errors"] = await _together(ctl, action.commands)
                    elif isinstance(action, Kill):
                        if action.tag in await self.runtime.list_replicas():
                            self.runtime.kill(action.tag)
                    elif action is not None:
                        await ctl.submit(action)
                except _EXPECTED_ERRORS as exc:
                    box["error"] = exc
                await ctl.settle()
                box["state"] = ctl.state
                box["unchanged"] = ctl.routing_table is box["table"]

        try:
            trio.run(session, clock=MockClock(autojump_threshold=0) if in_memory else None)
        except SimulatedCrash as crash:
            return Outcome(state=None, error=None, crashed=crash.label, points=self.plan.count)
        except _EXPECTED_ERRORS as exc:  # opening failed: corrupt or too-new checkpoint
            return Outcome(state=None, error=exc, crashed=None, points=self.plan.count)
        state = box["state"]
        self.highest_counter = max(self.highest_counter, state.replica_counter)
        return Outcome(
            state=state,
            error=box.get("error"),
            crashed=None,
            points=self.plan.count,
            table_unchanged=box["unchanged"],
            errors=tuple(box.get("errors", ())),
        )

    def clone(self) -> CrashWorld:
        """An in-memory copy: same checkpoint bytes, same live tags, same faults."""
        copy = InMemoryRuntime()
        inner = self.inner_runtime
        live = self.live()
        for tag in live:
            effect = getattr(inner, "live", {}).get(tag)
            copy.live[tag] = effect if effect is not None else _placeholder(tag)
        copy._failures = dict(getattr(inner, "_failures", {}))
        seq, records = self.store.load()
        return CrashWorld(store=MemoryStore(records, seq), runtime=copy, name=self.name)

    def count_points(self, action: Action = None) -> int:
        """How many crash points ``action`` passes (recovery included), on a copy."""
        return self.clone().run(action).points

    # -- checks -------------------------------------------------------------------------

    def live(self) -> frozenset[str]:
        """The tags alive in the runtime now (opened and closed around the listing, as
        the protocol wants; no controller is open between runs)."""
        return trio.run(_list_live, self.inner_runtime, self.name)

    def check_settled(self, state: State) -> None:
        """DESIGN §7 properties 2 and 3 on a settled state; raises AssertionError."""
        validate_state(state)
        running = {t for t, r in state.replicas.items() if r.status is ReplicaStatus.RUNNING}
        others = {t: r.status for t, r in state.replicas.items() if t not in running}
        assert not others, f"not settled: {others}"
        live = self.live()
        assert live == running, f"live {sorted(live)} != RUNNING {sorted(running)}"
        table = state.routing_table()
        for tag, b in state.backends.items():
            mine = {t for t in running if state.replicas[t].backend == tag}
            assert set(table.backends[tag].replicas) == mine, f"table of {tag} names non-RUNNING"
            if b.status is BackendStatus.FAILED:
                assert len(mine) <= b.config.num_replicas
            else:
                assert len(mine) == b.config.num_replicas, f"{tag}: {len(mine)} running"
        self.check_no_reuse(state)

    def check_no_reuse(self, state: State) -> None:
        """Property 2: no tag starts again once stopped or killed; the counter never
        goes back."""
        retired: set[str] = set()
        for op, tag in self.runtime.log:
            if op == "start":
                assert tag not in retired, f"replica tag {tag} reused after it was retired"
            else:
                retired.add(tag)
        assert state.replica_counter >= self.highest_counter, "replica counter went back"
        for tag in self.live():
            assert replica_number(tag) < state.replica_counter, f"{tag} >= counter"


async def _together(ctl: Controller, commands: Sequence[Command]) -> list[BaseException | None]:
    """Submit ``commands`` concurrently, arriving in their order: each is queued before
    the next one's task starts. This task stays runnable meanwhile, so the committer
    (waiting for every task to block) takes them as one batch."""
    errors: list[BaseException | None] = [None] * len(commands)
    finished = [False] * len(commands)

    async def one(i: int, command: Command) -> None:
        try:
            await ctl.submit(command)
        except _EXPECTED_ERRORS as exc:
            errors[i] = exc
        finally:
            finished[i] = True

    committer = ctl._committer
    async with trio.open_nursery() as nursery:
        for i, command in enumerate(commands):
            before = committer.queued
            nursery.start_soon(one, i, command)
            while committer.queued == before and not finished[i]:
                await trio.lowlevel.checkpoint()
    return errors


async def _list_live(runtime: Runtime, name: str) -> frozenset[str]:
    await runtime.open(namespace=name, report=lambda _event: None)
    try:
        return await runtime.list_replicas()
    finally:
        await runtime.close()


def _placeholder(tag: str) -> StartReplica:
    from servecore._core import BackendConfig

    backend = tag.rsplit("#", 1)[0]
    return StartReplica(
        tag=tag, backend=backend, target="x:y", init_args=(), init_kwargs={}, config=BackendConfig()
    )


def enumerate_crashes(
    make_world: Callable[[], CrashWorld],
    script: Sequence[Command | Kill],
    *,
    crash_step: int | None = None,
) -> int:
    """Run ``script`` on fresh worlds, crashing at *every* crash point of every step.

    For each step ``i`` (or only ``crash_step``) and each crash point ``k`` of it, a
    fresh world replays the steps before ``i``, crashes step ``i`` at ``k``, recovers,
    and checks: the recovered state is the acknowledged commands plus all or nothing of
    the one in flight (property 1), no tag is reused (2), and the live replicas are
    exactly the RUNNING ones with each backend at ``num_replicas`` (3). Returns how
    many crashes were checked.
    """
    checked = 0
    steps = range(len(script)) if crash_step is None else [crash_step]
    for i in steps:
        probe = make_world()
        model = ReferenceModel()
        for action in script[:i]:
            _apply_ok(probe, model, action)
        total = probe.count_points(script[i])
        for k in range(total):
            world = make_world()
            model = ReferenceModel()
            for action in script[:i]:
                _apply_ok(world, model, action)
            outcome = world.run(script[i], crash_at=k)
            assert outcome.crashed is not None, f"step {i}: crash point {k} did not fire"
            recovered = world.run(None)
            assert recovered.error is None and recovered.state is not None, recovered
            check_all_or_nothing(model, script[i], recovered.state)
            world.check_settled(recovered.state)
            checked += 1
    return checked


def _apply_ok(world: CrashWorld, model: ReferenceModel, action: Command | Kill) -> None:
    outcome = world.run(action)
    assert outcome.crashed is None and outcome.state is not None, outcome
    if not isinstance(action, Kill):
        expected = model.expected_error(action)
        if expected is None:
            model.apply(action)
    assert desired(outcome.state) == model.desired()


def check_all_or_nothing(model: ReferenceModel, action: Action, state: State) -> bool:
    """Property 1: ``state`` equals ``model`` or ``model`` plus ``action``. Applies the
    action to ``model`` if it landed; returns whether it did."""
    got = desired(state)
    if got == model.desired():
        return False
    if (
        isinstance(action, (Kill, Together))
        or action is None
        or model.expected_error(action) is not None
    ):
        raise AssertionError(f"state changed without an acknowledged command: {got}")
    after = model.copy()
    after.apply(action)
    assert got == after.desired(), f"half-applied command {action}: {got} vs {after.desired()}"
    model.apply(action)
    return True


Snapshot = tuple[int, Mapping[str, bytes]]


def corrupt(store: FaultyStore, how: str) -> Snapshot | None:
    """Damage the checkpoint in ``store`` with one more commit through its own
    ``commit`` (``"torn"``: a record cut short; ``"garbage"``: a meta record of noise;
    ``"checksum"``: a record edited under its checksum; ``"too-new"``: a meta record of
    a newer version). Return the good ``(seq, records)`` so the caller can
    :func:`restore` them; ``None`` if the store is empty."""
    seq, records = store.inner.load()
    if not records:
        return None
    good = (seq, dict(records))
    counter = read_meta(records, seq, store.where)
    key = max(k for k in records) if len(records) > 1 else META_KEY
    if how in ("torn", "checksum") and key != META_KEY:
        data = records[key]
        if how == "torn":
            bad = data[: len(data) // 2]
        else:
            i = data.index(b'"value":') + len(b'"value":') + 1
            bad = data[:i] + b" " + data[i:]  # the same JSON value in other bytes
        puts = {key: bad, META_KEY: meta_record(seq + 1, counter)}
    elif how == "too-new":
        body = b'{"format":"%s","replica_counter":%d,"seq":%d,"version":%d}' % (
            FORMAT.encode(),
            counter,
            seq + 1,
            VERSION + 1,
        )
        puts = {META_KEY: _record(META_KEY, body)}
    else:
        puts = {META_KEY: b"\x00\xffnot json"}
    store.inner.commit(seq + 1, puts, ())
    return good


def restore(store: FaultyStore, snapshot: Snapshot) -> None:
    """Make ``store`` hold the records of ``snapshot`` again (a backup put back), as
    its next commit: the sequence number goes on, the state goes back."""
    seq, records = snapshot
    try:
        now_seq, now = store.inner.load()
    except (CheckpointCorrupt, CheckpointVersionError):
        # Unreadable as a whole (a blob): :func:`corrupt` changed no key, added none.
        now_seq, now = seq + 1, records
    counter = read_meta(records, seq, store.where)
    puts = {**records, META_KEY: meta_record(now_seq + 1, counter)}
    store.inner.commit(now_seq + 1, puts, [k for k in now if k not in records])
