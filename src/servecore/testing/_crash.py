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

import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import trio
from trio.testing import MockClock

from servecore._controller.committer import deterministic_batches
from servecore._controller.controller import Controller, open_controller
from servecore._core.errors import (
    BackendStartError,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointVersionError,
    CommandError,
    InvalidConfig,
)
from servecore._core.invariants import validate_state
from servecore._core.records import (
    FORMAT,
    META_KEY,
    VERSION,
    _record,
    encode_blob,
    meta_record,
    read_meta,
)
from servecore._core.transitions import (
    BackendStatus,
    Command,
    Event,
    LoadReport,
    ReplicaDied,
    ReplicaStatus,
    StartReplica,
    State,
    replica_number,
)
from servecore._core.values import backend_of
from servecore._text import describe_exception as _describe
from servecore._text import exception_message
from servecore.runtimes import Query, Report, Runtime, close_runtime, open_runtime
from servecore.runtimes.toolkit import BatchSizeError, import_target, is_batch
from servecore.stores import BlobAdapter, BlobStore, MemoryStore, Store
from servecore.testing._faults import CrashPlan, InjectedFailure, SimulatedCrash
from servecore.testing._model import ReferenceModel, desired
from servecore.testing._runtime import InMemoryRuntime
from servecore.testing._store import FaultyStore

__all__ = [
    "CrashWorld",
    "CrashingRuntime",
    "Kill",
    "Outcome",
    "check_all_or_nothing",
    "check_store_holds",
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


Action = Command | Kill | LoadReport | Together | None


@attrs.frozen
class Outcome:
    """What one :meth:`CrashWorld.run` gave.

    ``crashed`` is the crash point label if the controller crashed; ``error`` the
    expected error the action (or opening) raised; ``state`` the controller's state at
    the end (``None`` after a crash or a failed open); ``points`` the crash points seen;
    ``live`` the tags the runtime listed alive at the end, while the controller was
    still open (``None`` after a crash or a failed open); ``action_log`` the runtime
    operations (see :attr:`CrashingRuntime.log`) from the action on, recovery excluded.
    """

    state: State | None
    error: BaseException | None
    crashed: str | None
    points: int
    table_unchanged: bool = True
    live: frozenset[str] | None = None
    action_log: tuple[tuple[str, str], ...] = ()
    errors: tuple[BaseException | None, ...] = ()


class CrashingRuntime:
    """Wraps any runtime: adds crash points around starts and stops, a log, and a
    record of every broken promise it sees.

    ``log`` lists ``("start", tag)`` and ``("stop", tag)`` for every operation that
    completed, ``("kill", tag)`` for kills through :meth:`kill`. ``problems`` lists, in
    words, what the runtime did that the kit did not ask for: a start that failed
    without an injected failure (:class:`InjectedFailure`), a stop that raised, a death
    nobody caused, a kill whose ``ReplicaDied`` came after the kill returned, a report
    made off the trio thread.

    ``refused`` maps a backend to the last start of it the runtime refused with a typed
    user error (a :class:`~servecore.CommandError` such as ``InvalidConfig`` for
    ``max_batch_size`` on a target not marked ``@servecore.batch``): the command asked
    for something the runtime rightly cannot do, so that is not a broken promise, and
    :meth:`CrashWorld.run` checks instead that the controller left the backend FAILED
    with that error. A typed refusal of something the start did not ask for (batching
    refused to a batch target, ``runtime_options`` refused when there are none) is the
    runtime's bug, and goes to ``problems``.
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
        self.problems: list[str] = []
        self.refused: dict[str, tuple[StartReplica, BaseException]] = {}
        self._kill = kill
        self._killed: set[str] = set()
        self._stopping: set[str] = set()
        self._died: set[str] = set()
        self._thread: int | None = None
        self._name = type(inner).__qualname__

    async def open(self, *, namespace: str, report: Report) -> None:
        self._thread = threading.get_ident()

        def watched(event: Event) -> None:
            if threading.get_ident() != self._thread:
                self.problems.append(
                    f"{self._name} reported {event!r} from a thread other than the trio "
                    f"thread it was opened on; hand events over with "
                    f"trio.from_thread.run_sync(report, event, trio_token=token)"
                )
            if isinstance(event, ReplicaDied):
                self._died.add(event.tag)
                if event.tag not in self._killed and event.tag not in self._stopping:
                    self.problems.append(
                        f"{self._name} reported replica {event.tag} dead, but the kit "
                        f"neither killed nor stopped it: {event.reason}"
                    )
            report(event)

        await open_runtime(self.inner, namespace=namespace, report=watched)

    async def close(self) -> None:
        await close_runtime(self.inner)

    async def start_replica(self, effect: StartReplica) -> None:
        self.plan.point(f"before start {effect.tag}")
        try:
            await self.inner.start_replica(effect)
        except InjectedFailure:
            raise
        except Exception as exc:
            if effect.tag not in self._stopping:
                unjustified = _unjustified_refusal(effect, exc)
                if unjustified is None:
                    self.refused[effect.backend] = (effect, exc)
                else:
                    self.problems.append(
                        f"{self._name} failed to start replica {effect.tag} (target "
                        f"{effect.target}) though the kit injected no failure: "
                        f"{_describe(exc)}{unjustified}"
                    )
            raise
        self.log.append(("start", effect.tag))
        self.plan.point(f"after start {effect.tag}")

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        self.plan.point(f"before stop {tag}")
        self._stopping.add(tag)
        try:
            await self.inner.stop_replica(tag, timeout_s)
        except Exception as exc:
            self.problems.append(
                f"{self._name}.stop_replica({tag!r}) raised {_describe(exc)}; a stop must "
                f"succeed, and stopping a tag that is gone is a quiet no-op"
            )
            raise
        self.log.append(("stop", tag))
        self.plan.point(f"after stop {tag}")

    async def list_replicas(self) -> frozenset[str]:
        return await self.inner.list_replicas()

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        return await self.inner.call(tag, batch)

    async def kill(self, tag: str) -> None:
        """Kill ``tag`` with the kill hook (or the inner runtime's own ``kill``), which
        may return an awaitable; ``ReplicaDied`` must be reported before it returns."""
        killer = self._kill or getattr(self.inner, "kill", None)
        if killer is None:
            raise TypeError(
                f"{self._name} offers no way to kill a replica: give it a kill(tag) method "
                f"or override kill_hook() in the machine (pass kill= to CrashWorld)"
            )
        self.log.append(("kill", tag))
        self._killed.add(tag)
        result = killer(tag)
        if inspect.isawaitable(result):
            await result
        if tag not in self._died:
            self.problems.append(
                f"the kill hook of {self._name} returned before ReplicaDied({tag!r}) was "
                f"reported; report the death before the kill returns"
            )


#: What a runtime may raise when the *command* asked for something it cannot do: the
#: user's error, which the controller records (backend FAILED with it), not the runtime's.
_USER_ERRORS: tuple[type[Exception], ...] = (CommandError, BatchSizeError)


def _unjustified_refusal(effect: StartReplica, exc: BaseException) -> str | None:
    """``None`` when ``exc`` is a typed user error that ``effect`` really earned;
    otherwise why the failure is the runtime's (a suffix for its problem line, empty
    for an untyped error)."""
    if not isinstance(exc, _USER_ERRORS):
        return ""
    if isinstance(exc, InvalidConfig) and exc.field == "max_batch_size":
        if effect.config.max_batch_size is None:
            return "; the start asked for no batching, so refusing max_batch_size is wrong"
        try:
            target = import_target(effect.target)
        except Exception:  # the kit cannot tell: trust the runtime's typed answer
            return None
        if is_batch(target):
            return (
                f"; {effect.target} is marked @servecore.batch, so it takes "
                f"max_batch_size={effect.config.max_batch_size}"
            )
    unknown_options = isinstance(exc, InvalidConfig) and exc.field == "runtime_options"
    if unknown_options and not effect.config.runtime_options:
        return "; the start gave no runtime_options, so refusing them is wrong"
    return None


class CrashWorld:
    """A store and a runtime that outlive every controller opened on them.

    ``store`` defaults to a :class:`~servecore.MemoryStore`; ``runtime`` to a new
    :class:`InMemoryRuntime`. Both are wrapped to add crash points. An action may also
    be a :class:`~servecore.LoadReport` (fed through ``ctl.report_load``, so its ``now``
    must be within an hour of the controller's clock: give a script's times on trio's
    clock with ``controller_options={"clock": trio.current_time}``), to crash an
    autoscaling decision. ``controller_options`` go to every ``open_controller`` (e.g.
    ``autoscale_interval_s=None`` so that only the actions report load).
    """

    def __init__(
        self,
        store: Store | BlobStore | None = None,
        runtime: Runtime | None = None,
        *,
        kill: Callable[[str], Any] | None = None,
        name: str = "crash-world",
        controller_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.plan = CrashPlan()
        self.store = FaultyStore(store if store is not None else MemoryStore(), self.plan)
        self.inner_runtime = runtime if runtime is not None else InMemoryRuntime()
        self.runtime = CrashingRuntime(self.inner_runtime, self.plan, kill)
        self.name = name
        self.controller_options = dict(controller_options or {})
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
        self.runtime.problems.clear()
        self.runtime.refused.clear()
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
                **{"save_in_thread": not in_memory, **self.controller_options},
            ) as ctl:
                await ctl.settle()
                box["table"] = ctl.routing_table
                if prepare is not None:
                    prepare(ctl)
                box["mark"] = len(self.runtime.log)
                try:
                    if isinstance(action, Together):
                        box["errors"] = await _together(ctl, action.commands)
                    elif isinstance(action, Kill):
                        if action.tag in await self.runtime.list_replicas():
                            await self.runtime.kill(action.tag)
                    elif isinstance(action, LoadReport):
                        await ctl.report_load(action.backend, action.ongoing, action.now)
                    elif action is not None:
                        await ctl.submit(action)
                except _EXPECTED_ERRORS as exc:
                    box["error"] = exc
                await ctl.settle()
                box["state"] = ctl.state
                box["unchanged"] = ctl.routing_table is box["table"]
                box["live"] = await self.runtime.list_replicas()

        try:
            trio.run(session, clock=MockClock(autojump_threshold=0) if in_memory else None)
        except SimulatedCrash as crash:
            self._check_promises()
            return Outcome(state=None, error=None, crashed=crash.label, points=self.plan.count)
        except _EXPECTED_ERRORS as exc:  # opening failed: corrupt or too-new checkpoint
            self._check_promises(exc)
            return Outcome(state=None, error=exc, crashed=None, points=self.plan.count)
        except BaseException as exc:
            self._check_promises(exc)
            raise
        self._check_promises(box.get("error"))
        state = box["state"]
        self._check_refusals_recorded(state)
        self.highest_counter = max(self.highest_counter, state.replica_counter)
        return Outcome(
            state=state,
            error=box.get("error"),
            crashed=None,
            points=self.plan.count,
            table_unchanged=box["unchanged"],
            live=box["live"],
            action_log=tuple(self.runtime.log[box["mark"] :]),
            errors=tuple(box.get("errors", ())),
        )

    def _check_promises(self, error: BaseException | None = None) -> None:
        """Fail with every broken promise the runtime wrapper saw during the run."""
        problems = self.runtime.problems
        if problems:
            message = "the runtime broke its promises:\n- " + "\n- ".join(problems)
            raise AssertionError(message) from error

    def _check_refusals_recorded(self, state: State) -> None:
        """A start the runtime refused with the user's error must leave its backend
        FAILED with that error, while the backend still asks for what was refused."""
        for backend, (effect, exc) in sorted(self.runtime.refused.items()):
            b = state.backends.get(backend)
            asked = (effect.target, effect.init_args, effect.init_kwargs, effect.config)
            if b is None or (b.target, b.init_args, b.init_kwargs, b.config) != asked:
                continue  # deleted or changed since: the refusal no longer applies
            reason = exception_message(exc)
            recorded = b.last_error or ""
            assert b.status is BackendStatus.FAILED and reason[:80] in recorded, (
                f"the runtime refused replica {effect.tag} with the user's error "
                f"{_describe(exc)}, but the controller left backend {backend} "
                f"{b.status.name} with last error {recorded!r}; a start refused for what "
                f"the command asked for must leave the backend FAILED with that error"
            )

    def clone(self) -> CrashWorld:
        """An in-memory copy: same checkpoint bytes, same live tags, same faults."""
        copy = InMemoryRuntime()
        inner = self.inner_runtime
        live = self.live()
        for tag in live:
            effect = getattr(inner, "live", {}).get(tag)
            copy.live[tag] = effect if effect is not None else _placeholder(tag)
        if isinstance(inner, InMemoryRuntime):
            for backend, (reason, times) in inner.injected_failures.items():
                copy.fail_starts(backend, reason, times)
        seq, records = self.store.load()
        return CrashWorld(
            store=MemoryStore(records, seq),
            runtime=copy,
            name=self.name,
            controller_options=self.controller_options,
        )

    def count_points(self, action: Action = None) -> int:
        """How many crash points ``action`` passes (recovery included), on a copy."""
        return self.clone().run(action).points

    # -- checks -------------------------------------------------------------------------

    def live(self) -> frozenset[str]:
        """The tags alive in the runtime now (opened and closed around the listing, as
        the protocol wants; no controller is open between runs)."""
        return trio.run(_list_live, self.inner_runtime, self.name)

    def check_settled(self, state: State, live: frozenset[str] | None = None) -> None:
        """Properties 2 and 3 (docs/design.md §7) on a settled state;
        raises AssertionError. ``live`` is what the runtime listed while the controller
        was open (an :attr:`Outcome.live`); by default it is listed now."""
        validate_state(state)
        running = {t for t, r in state.replicas.items() if r.status is ReplicaStatus.RUNNING}
        others = {t: r.status for t, r in state.replicas.items() if t not in running}
        assert not others, f"not settled: {others}"
        live = self.live() if live is None else live
        assert live == running, f"live {sorted(live)} != RUNNING {sorted(running)}"
        table = state.routing_table()
        for tag, b in state.backends.items():
            mine = {t for t in running if state.replicas[t].backend == tag}
            assert set(table.backends[tag].replicas) == mine, f"table of {tag} names non-RUNNING"
            if b.status is BackendStatus.FAILED:
                assert len(mine) <= b.wanted_replicas
            else:
                assert len(mine) == b.wanted_replicas, f"{tag}: {len(mine)} running"
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

    async with trio.open_nursery() as nursery:
        for i, command in enumerate(commands):
            before = ctl.queued
            nursery.start_soon(one, i, command)
            while ctl.queued == before and not finished[i]:
                await trio.lowlevel.checkpoint()
    return errors


async def _list_live(runtime: Runtime, name: str) -> frozenset[str]:
    await open_runtime(runtime, namespace=name, report=lambda _event: None)
    try:
        return await runtime.list_replicas()
    finally:
        await close_runtime(runtime)


def _placeholder(tag: str) -> StartReplica:
    from servecore._core.transitions import BackendConfig

    backend = backend_of(tag)
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
    exactly the RUNNING ones with each backend at the replicas it wants (3). A start failure
    that was not injected, a stop that raised, or a death nobody caused fails the check
    with an ``AssertionError`` naming the tag and the runtime's own error. Returns how
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
            world.check_settled(recovered.state, recovered.live)
            checked += 1
    return checked


def _apply_ok(world: CrashWorld, model: ReferenceModel, action: Command | Kill) -> None:
    outcome = world.run(action)
    assert outcome.crashed is None and outcome.state is not None, outcome
    world.check_settled(outcome.state, outcome.live)
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
        isinstance(action, (Kill, LoadReport, Together))
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
    a newer version; ``"emptied"``: every record deleted under a new sequence number,
    which the store must give back as it is, never as a fresh, empty store). Return the
    good ``(seq, records)`` so the caller can :func:`restore` them; ``None`` if the
    store is empty."""
    seq, records = store.inner.load()
    if not records:
        return None
    good = (seq, dict(records))
    if how == "emptied":
        store.inner.commit(seq + 1, {}, list(records))
        back = store.inner.load()
        assert (back[0], dict(back[1])) == (seq + 1, {}), (
            f"store {type(store.inner).__qualname__} did not give back a commit that "
            f"deleted every record: committed {seq + 1} with no records, loaded {back[0]} "
            f"with {sorted(back[1])[:8]}; Store.load must return exactly what commit left"
        )
        return good
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
    inner = store.inner
    if isinstance(inner, BlobAdapter):
        # The whole-blob store underneath gets the damaged envelope, and must hold it.
        # (The adapter keeps the good records: restore() commits through it.)
        check_store_holds(inner.blob, encode_blob(seq + 1, {**records, **puts}))
    else:
        check_store_holds(inner, puts, seq=seq + 1)
    return good


def check_store_holds(
    store: Store | BlobStore, data: bytes | Mapping[str, bytes], *, seq: int | None = None
) -> None:
    """Write ``data`` and check that ``load()`` gives exactly those bytes back.

    A whole-blob store (``save``/``load``) saves ``data`` (bytes) as its blob; a
    key-value store commits ``data`` (records, or bytes as the ``meta`` record) as
    checkpoint ``seq`` (default: the one after its last) and must load them unchanged.
    A store receives arbitrary bytes (a torn or foreign checkpoint is not UTF-8, nor
    JSON); one that cannot hold them fails here with an ``AssertionError`` naming it.
    Either way the store is left holding ``data``: use a scratch store, or restore it.
    """
    name = type(store).__qualname__
    sample = data if isinstance(data, bytes) else b"".join(data.values())
    if isinstance(store, Store):
        puts = {META_KEY: data} if isinstance(data, bytes) else dict(data)
        try:
            if seq is None:
                seq = store.load()[0] + 1
            store.commit(seq, puts, ())
            back_seq, records = store.load()
        except Exception as exc:
            raise AssertionError(
                f"store {name} cannot hold arbitrary bytes: committing and loading "
                f"{sample[:16]!r} raised {_describe(exc)}; Store.commit receives any bytes, "
                f"not only UTF-8 text"
            ) from exc
        changed = sorted(k for k, v in puts.items() if records.get(k) != v)
        assert back_seq == seq and not changed, (
            f"store {name} did not give back what it was given: committed {seq} with "
            f"{sample[:16]!r}..., loaded {back_seq} with other bytes under {changed}; "
            f"Store.load must return exactly what commit got"
        )
        return
    if not isinstance(data, bytes):
        raise TypeError(f"a whole-blob store holds bytes, not {type(data).__name__}")
    try:
        store.save(data)
        back = store.load()
    except Exception as exc:
        raise AssertionError(
            f"store {name} cannot hold arbitrary bytes: saving and loading {data[:16]!r} "
            f"raised {_describe(exc)}; Store.save receives any bytes, not only UTF-8 text"
        ) from exc
    assert back == data, (
        f"store {name} did not give back the bytes it was given: saved {data[:16]!r}..., "
        f"loaded {(back or b'')[:16]!r}...; Store.load must return exactly what save got"
    )


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
