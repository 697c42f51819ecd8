"""Check a store (and the controller above it) against "the database hangs".

:func:`check_store_hangs` replays a script of commands on a fresh store, once per store
call of the script (the load at open, every commit), hanging that one call with a
:class:`HangingStore`. Each replay must show what docs/design.md §7 promises of a hung
store: the command waiting on the call gets a typed :class:`~servecore.CheckpointError`
within its bound instead of hanging; once the store answers, the next commands work;
no acknowledged command is lost; and a command that was not acknowledged is all or
nothing: nothing of it, and no effect, unless its commit landed (late), and then all of
it, carried out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import trio

from servecore._controller.committer import deterministic_batches
from servecore._controller.controller import Controller, open_controller
from servecore._core.errors import CheckpointError, CheckpointOutcomeUnknown
from servecore._core.invariants import validate_state
from servecore._core.transitions import (
    BackendConfig,
    Command,
    CreateBackend,
    CreateEndpoint,
    DeleteBackend,
    DeleteEndpoint,
    ReplicaStatus,
    SetBackendConfig,
    SetTraffic,
    State,
    replica_number,
)
from servecore._text import describe_exception
from servecore.runtimes import Runtime
from servecore.stores import BlobStore, Store
from servecore.testing._hang import HangingStore
from servecore.testing._model import ReferenceModel, desired
from servecore.testing._runtime import InMemoryRuntime

__all__ = ["HANG_SCRIPT", "check_store_hangs"]

_ECHO = "servecore.testing.targets:Echo"


def _config(n: int) -> BackendConfig:
    return BackendConfig(num_replicas=n, graceful_shutdown_timeout_s=0.0)


#: The default script: commits of commands alone, of commands with starts and stops
#: behind them (whose events commit after), and of deletes.
HANG_SCRIPT: tuple[Command, ...] = (
    CreateEndpoint(name="e", route="/e"),
    CreateBackend(tag="a", target=_ECHO, config=_config(2)),
    SetTraffic(endpoint="e", traffic={"a": 1.0}),
    SetBackendConfig(tag="a", config=_config(1)),
    DeleteEndpoint(name="e"),
    DeleteBackend(tag="a"),
)

#: Added to a command's bound: the time to carry out its effects, not a measurement.
_SLACK_S = 30.0


class _Phase:
    """What the replay is doing, and the deadline a hang must not make it outlast."""

    def __init__(self, bound_s: float) -> None:
        self.bound_s = bound_s
        self.what = "starting"
        self.expired = False
        self._timer = trio.CancelScope()

    def __call__(self, what: str) -> None:
        self.what = what
        self._timer.deadline = trio.current_time() + self.bound_s

    async def watch(self, replay: trio.CancelScope, store: HangingStore) -> None:
        """Once a phase outlasts its deadline, release the store (so that nothing stays
        blocked on it, even a wait the controller shields) and cancel the replay."""
        with self._timer:
            await trio.sleep_forever()
        self.expired = True
        store.release(land=False)
        replay.cancel()


def check_store_hangs(
    make_store: Callable[[], Store | BlobStore | HangingStore],
    script: Sequence[Command] = HANG_SCRIPT,
    *,
    store_call_timeout_s: float = 0.5,
    outcomes: Sequence[bool] = (True, False),
    make_runtime: Callable[[], Runtime] | None = None,
    points: Sequence[int] | None = None,
    bound_s: float | None = None,
) -> int:
    """Hang every store call of ``script`` in turn; check what the controller makes of it.

    ``make_store()`` returns a new, empty store for each replay; it is wrapped in a
    :class:`HangingStore` (simulated hangs, each replayed once per outcome in
    ``outcomes``: ``True``, the call lands when released; ``False``, it fails) unless
    it is one already (give it ``freeze``/``thaw`` for a real hang: then the store's own
    deadline answers, and each call is replayed once). ``store_call_timeout_s`` is the
    controllers' deadline; a real hang's store should answer well within it. ``points``
    picks calls by index (default: all; index 0 is the load at open). Replicas run on
    ``make_runtime()`` (default: a new :class:`InMemoryRuntime`). ``bound_s`` is the
    longest any step may take (default: twice ``store_call_timeout_s`` plus 30 s for
    its effects; a guard, not a measurement). Returns how many
    replays were checked; a broken promise raises ``AssertionError`` saying which call
    hung and what went wrong, never a timeout.

    Each replay must show:

    1. *Bounded*: the step whose store call hangs (opening the controller, or a
       command, whose own commit or its replicas' events' commit hangs) ends within
       twice ``store_call_timeout_s`` (plus the time its effects take), with a
       :class:`~servecore.CheckpointError`; a command whose own commit was refused
       by the store is not applied.
    2. *Released*: once the store answers, the controller heeds the answer (a commit
       that landed late is adopted and carried out) and every later command works.
    3. *Nothing lost, nothing half done*: the state is the acknowledged commands
       plus all or nothing of the unacknowledged one (all only if its commit could
       have landed: a simulated hang released to land, or a
       :class:`~servecore.CheckpointOutcomeUnknown`); no replica ran for a command that
       is not in the state; after settling, the live replicas are the RUNNING ones.
    4. *Durable*: a controller reopened on the store recovers that same state, and
       never reuses a replica tag.
    """
    if isinstance(store_call_timeout_s, bool) or not 0 < store_call_timeout_s < math.inf:
        raise ValueError("store_call_timeout_s must be a positive, finite number of seconds")
    runtime_maker = make_runtime or InMemoryRuntime

    def wrapped() -> HangingStore:
        made = make_store()
        return made if isinstance(made, HangingStore) else HangingStore(made)

    probe = wrapped()
    bound = bound_s if bound_s is not None else 2 * store_call_timeout_s + _SLACK_S
    made = trio.run(
        _replay, probe, runtime_maker(), script, store_call_timeout_s, bound, None, True
    )
    labels = probe.labels[:made]  # (not the calls of the reopening that checks the end)
    real = probe.freeze is not None
    chosen = range(len(labels)) if points is None else points
    checked = 0
    for k in chosen:
        for land in (True,) if real else outcomes:
            store = wrapped()
            store.hang(at=k)
            where = f"store call {k} of {len(labels)} ({labels[k]})"
            if not real:
                where += ", released to " + ("land" if land else "fail")
            try:
                trio.run(
                    _replay, store, runtime_maker(), script, store_call_timeout_s, bound, k, land
                )
            except AssertionError as exc:
                raise AssertionError(f"with {where} hung: {exc}") from exc
            finally:
                store.release()
            checked += 1
    return checked


async def _replay(
    store: HangingStore,
    runtime: Runtime,
    script: Sequence[Command],
    timeout_s: float,
    bound: float,
    hang_at: int | None,
    land: bool,
) -> int:
    """One replay of ``script``; with ``hang_at``, the store's call ``hang_at`` hangs.
    Returns how many store calls came before the reopening at the end."""
    options: dict[str, Any] = {
        "store_call_timeout_s": timeout_s,
        "resync_interval_s": None,
        "autoscale_interval_s": None,
    }
    phase = _Phase(bound)
    made, error = 0, None
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as replay:
            nursery.start_soon(phase.watch, replay, store)
            try:
                made = await _replay_watched(store, runtime, script, options, phase, land)
            except Exception as exc:  # raised below as itself, not in an exception group
                error = exc
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    if phase.expired:
        hung = f"; the store hung {store.hung} call(s)" if hang_at is not None else ""
        raise AssertionError(
            f"{phase.what} did not end within {phase.bound_s:g}s{hung}: the controller "
            f"does not bound its store calls (open_controller's store_call_timeout_s is "
            f"{timeout_s:g}s), or a hung call was never given up on"
        )
    if hang_at is not None:
        assert store.hung, f"the hang never happened: the replay made only {store.calls} calls"
    return made


async def _replay_watched(
    store: HangingStore,
    runtime: Runtime,
    script: Sequence[Command],
    options: dict[str, Any],
    phase: _Phase,
    land: bool,
) -> int:
    model = ReferenceModel()
    highest = 0
    with deterministic_batches():
        # (the hang may land in the load at open: then opening fails, and is tried again)
        for attempt in (1, 2):
            phase("opening the controller")
            try:
                async with open_controller(runtime=runtime, store=store, **options) as ctl:
                    highest = await _run_script(ctl, store, runtime, script, model, phase, land)
                    phase("settling at the end")
                    await ctl.settle()
                    _check_settled(ctl.state, await runtime.list_replicas(), model)
                    phase("closing the controller")
                break
            except CheckpointError as exc:
                assert attempt == 1 and store.hung, (
                    f"opening the controller failed although no store call hung: "
                    f"{describe_exception(exc)}"
                )
                store.release(land=land)
                phase("waiting for the hung store to answer and be closed")
                await trio.to_thread.run_sync(store.wait_idle, phase.bound_s)
        made = store.calls
        phase("reopening the controller (recovery)")
        try:
            async with open_controller(runtime=runtime, store=store, **options) as ctl:
                await ctl.settle()
                recovered, live = ctl.state, await runtime.list_replicas()
        except Exception as exc:
            raise AssertionError(
                f"reopening the controller on the store after the hang failed: "
                f"{describe_exception(exc)}; a store that hung must hold the last commit "
                f"it acknowledged, and nothing of one it failed"
            ) from exc
        assert desired(recovered) == model.desired(), (
            f"the reopened controller recovered {desired(recovered)}, but the commands "
            f"acknowledged (and those found applied) were {model.desired()}"
        )
        assert recovered.replica_counter >= highest, "the replica counter went back"
        _check_settled(recovered, live, model)
    return made


async def _run_script(
    ctl: Controller,
    store: HangingStore,
    runtime: Runtime,
    script: Sequence[Command],
    model: ReferenceModel,
    phase: _Phase,
    land: bool,
) -> int:
    """Run ``script``; check each step's outcome. Returns the highest replica counter."""
    released = store.hung > 0  # a hang in the load at open is over
    highest = 0
    for i, cmd in enumerate(script):
        phase(f"step {i} ({cmd!r})")
        hung_before = store.hung
        started = _runtime_log(runtime)
        expected = model.expected_error(cmd)
        error: BaseException | None = None
        try:
            await ctl.submit(cmd)
        except Exception as exc:
            error = exc
        hung_now = store.hung > hung_before
        if not hung_now or released:
            # No hang in this step: it must behave as it would on a healthy store.
            if expected is not None:
                assert isinstance(error, expected), (
                    f"step {i} ({cmd!r}) should raise {expected.__name__}, got "
                    f"{describe_exception(error) if error else 'no error'}"
                )
            else:
                assert error is None, (
                    f"step {i} ({cmd!r}) failed on a store that answers"
                    f"{' again' if released else ''}: {describe_exception(error)}"
                )
                model.apply(cmd)
            highest = max(highest, ctl.state.replica_counter)
            continue
        # This step's store call hung: a typed error, within the bound (we are here).
        released = True
        assert isinstance(error, CheckpointError) or (
            expected is not None and isinstance(error, expected)
        ), (
            f"step {i} ({cmd!r}) hung in the store and ended with "
            f"{describe_exception(error) if error else 'no error'}, not a CheckpointError"
        )
        store.release(land=land)
        phase(f"heeding the store's late answer to step {i}")
        await ctl.resync()  # goes through the commit path: the late answer is heeded first
        await ctl.settle()
        saved = isinstance(error, CheckpointError) and "the command was saved" in str(error)
        if expected is not None:
            assert desired(ctl.state) == model.desired(), "an invalid command changed the state"
        elif saved or error is None:
            model.apply(cmd)  # its own commit landed; only its events' did not, at first
        else:
            if not _all_or_nothing(ctl.state, model, cmd, error, store, land, i):
                assert _runtime_log(runtime) == started, (
                    f"step {i} ({cmd!r}) was not applied (its commit did not land), but "
                    f"replicas were started or stopped for it"
                )
        _check_settled(ctl.state, await runtime.list_replicas(), model)
        highest = max(highest, ctl.state.replica_counter)
    return highest


def _all_or_nothing(
    state: State,
    model: ReferenceModel,
    cmd: Command,
    error: BaseException,
    store: HangingStore,
    land: bool,
    i: int,
) -> bool:
    """The unacknowledged command is all there or not at all; all only if it could have
    landed. Applies it to ``model`` and returns True if it is there."""
    got = desired(state)
    after = model.copy()
    after.apply(cmd)
    could_land = isinstance(error, CheckpointOutcomeUnknown) and (store.freeze is not None or land)
    if got == after.desired() and got != model.desired():
        assert could_land, (
            f"step {i} ({cmd!r}) raised {describe_exception(error)}, which says it was not "
            f"applied, yet the state holds it"
        )
        model.apply(cmd)
        return True
    if got == model.desired():
        must_land = store.freeze is None and land and isinstance(error, CheckpointOutcomeUnknown)
        assert not must_land, (
            f"step {i} ({cmd!r}): its commit landed when the store answered, but the "
            f"controller did not adopt it (a commit that lands late must be adopted and "
            f"carried out)"
        )
        return False
    raise AssertionError(
        f"step {i} ({cmd!r}) is half applied after its commit hung: the state is {got}, "
        f"neither {model.desired()} nor {after.desired()}"
    )


def _runtime_log(runtime: Runtime) -> tuple[int, int]:
    started = getattr(runtime, "started", ())
    stopped = getattr(runtime, "stopped", ())
    return len(started), len(stopped)


def _check_settled(state: State, live: frozenset[str], model: ReferenceModel) -> None:
    """The state is sound, settled, and the runtime runs exactly its RUNNING replicas."""
    validate_state(state)
    assert desired(state) == model.desired(), (
        f"the state {desired(state)} is not the acknowledged commands {model.desired()}"
    )
    running = {t for t, r in state.replicas.items() if r.status is ReplicaStatus.RUNNING}
    others = {t: r.status.name for t, r in state.replicas.items() if t not in running}
    assert not others, f"not settled after the store answered again: {others}"
    assert live == running, f"live replicas {sorted(live)} != RUNNING {sorted(running)}"
    for tag in live:
        assert replica_number(tag) < state.replica_counter, f"{tag} >= the replica counter"
