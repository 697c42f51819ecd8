"""Deliberately broken runtimes and stores: the kit catches each, and says what broke.

Each breaks one promise of docs/plugins.md. ``check_runtime`` or the machine must fail
with an ``AssertionError`` naming that promise (never pass, never surface the
runtime's bare exception).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import rule

from servecore import (
    BackendConfig,
    BackendStartError,
    BackendStatus,
    Command,
    CreateBackend,
    DeleteBackend,
    InvalidConfig,
    ReplicaDied,
    StartReplica,
    Store,
)
from servecore.runtimes import Query, Report, Runtime
from servecore.testing import (
    CrashConsistencyMachine,
    CrashWorld,
    InMemoryRuntime,
    check_runtime,
    check_store_holds,
    enumerate_crashes,
)
from servecore.testing.strategies import BACKEND_TAGS

SCRIPT: list[Command] = [
    CreateBackend(
        tag="a",
        target="servecore.testing.targets:Echo",
        config=BackendConfig(num_replicas=2, graceful_shutdown_timeout_s=0.0),
    ),
    DeleteBackend(tag="a"),
]

#: Enough examples to find each planted bug (the first example already meets most);
#: derandomized, so each run is the same; no shrinking, since only the message matters.
FIND = settings(
    max_examples=40, stateful_step_count=8, deadline=None, database=None, derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)  # fmt: skip


def kill(runtime: Runtime, tag: str) -> Any:
    return runtime.kill(tag)  # type: ignore[attr-defined]


class LateDeaths(InMemoryRuntime):
    """Reports a killed replica's death only later, from a task of its own."""

    def kill(self, tag: str, reason: str = "killed") -> None:
        report, self._report = self._report, None
        super().kill(tag, reason)
        self._report = report
        if report is not None:
            trio.lowlevel.spawn_system_task(self._late, report, tag)

    async def _late(self, report: Report, tag: str) -> None:
        await trio.sleep(0.01)
        report(ReplicaDied(tag=tag, reason="reported late"))


class BusyStarts(InMemoryRuntime):
    """Every real start fails (an fd reused across trio runs, say)."""

    async def start_replica(self, effect: StartReplica) -> None:
        raise trio.BusyResourceError("another task is already waiting on fd 7")


class KeyErrorStops(InMemoryRuntime):
    """Stopping a tag it does not hold raises a bare KeyError."""

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        if tag not in self.live:
            raise KeyError(tag)
        await super().stop_replica(tag, timeout_s)


class WrongKeyStops(InMemoryRuntime):
    """Looks replicas up by the wrong key on stop: every stop raises KeyError."""

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        raise KeyError(tag.replace("#", "/"))


class DiesOnItsOwn(InMemoryRuntime):
    """Reports deaths nobody caused: every call kills the replica it ran on."""

    async def start_replica(self, effect: StartReplica) -> None:
        await super().start_replica(effect)
        if effect.tag.endswith(("#1", "#2")):
            self.kill(effect.tag, "spontaneous death")


class OffThreadReports(InMemoryRuntime):
    """Reports a kill's death from another thread, straight into ``report``."""

    def kill(self, tag: str, reason: str = "killed") -> None:
        import threading

        report, self._report = self._report, None
        super().kill(tag, reason)
        self._report = report
        if report is not None:
            thread = threading.Thread(target=report, args=(ReplicaDied(tag=tag, reason=reason),))
            thread.start()
            thread.join()


class Bare:
    """Only the four required methods, all broken in one way: stop raises KeyError."""

    def __init__(self) -> None:
        self.live: set[str] = set()

    async def start_replica(self, effect: StartReplica) -> None:
        self.live.add(effect.tag)

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        self.live.remove(tag)

    async def list_replicas(self) -> frozenset[str]:
        return frozenset(self.live)

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        return [q.args[0] for q in batch]


# -- check_runtime -----------------------------------------------------------------------


def test_a_late_death_report_is_caught() -> None:
    with pytest.raises(AssertionError, match=r"returned before ReplicaDied\('raiser#1'\)"):
        check_runtime(LateDeaths, kill=kill)


def test_failing_starts_are_caught() -> None:
    with pytest.raises(AssertionError, match=r"start_replica.*BusyResourceError"):
        check_runtime(BusyStarts)


def test_a_key_error_from_stop_becomes_a_named_broken_promise() -> None:
    with pytest.raises(AssertionError, match=r"must be a quiet no-op.*KeyError"):
        check_runtime(KeyErrorStops)


def test_an_off_thread_report_is_caught() -> None:
    with pytest.raises(AssertionError, match="trio thread"):
        check_runtime(OffThreadReports, kill=kill)


def test_a_runtime_without_open_and_close_is_checked_but_its_flaws_named() -> None:
    # No open/close is fine; but this one serves no Raiser errors and refuses nothing.
    with pytest.raises(AssertionError):
        check_runtime(Bare)


# -- enumerate_crashes and the machine ---------------------------------------------------


def test_enumerate_crashes_fails_on_starts_it_did_not_inject() -> None:
    with pytest.raises(AssertionError, match=r"failed to start replica a#\d.*BusyResourceError"):
        enumerate_crashes(lambda: CrashWorld(runtime=BusyStarts()), SCRIPT[:1])


def test_enumerate_crashes_fails_on_deaths_it_did_not_cause() -> None:
    with pytest.raises(AssertionError, match=r"reported replica a#[12] dead.*spontaneous"):
        enumerate_crashes(lambda: CrashWorld(runtime=DiesOnItsOwn()), SCRIPT[:1])


def test_enumerate_crashes_names_a_stop_that_raises() -> None:
    with pytest.raises(AssertionError, match=r"stop_replica\('a#\d'\) raised KeyError"):
        enumerate_crashes(lambda: CrashWorld(runtime=WrongKeyStops()), SCRIPT)


def machine_for(runtime: type[InMemoryRuntime] | None = None, store: Any = None) -> Any:
    shared = InMemoryRuntime()

    class Machine(CrashConsistencyMachine):
        def make_runtime(self) -> Runtime:
            if runtime is None:
                return shared  # the same world every example: a leak
            return runtime()

        def make_store(self) -> Store:
            return store() if store is not None else super().make_store()

    Machine.TestCase.settings = FIND
    return Machine.TestCase


def run_machine(case: Any) -> None:
    case("runTest").runTest()


def test_the_machine_fails_on_starts_it_did_not_inject() -> None:
    with pytest.raises(AssertionError, match=r"injected no failure.*BusyResourceError"):
        run_machine(machine_for(BusyStarts))


def test_the_machine_catches_a_late_death_report() -> None:
    with pytest.raises(AssertionError, match="returned before ReplicaDied"):
        run_machine(machine_for(LateDeaths))


def test_the_machine_catches_replicas_leaking_between_examples() -> None:
    with pytest.raises(AssertionError, match="isolated, empty world"):
        run_machine(machine_for(None))


class TextStore:
    """A JSON-lines store that keeps checkpoints as text: it cannot hold any bytes."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def save(self, data: bytes) -> None:
        self.lines.append(data.decode("utf-8"))

    def load(self) -> bytes | None:
        return self.lines[-1].encode("utf-8") if self.lines else None


class ManglingStore(TextStore):
    """The same, but it "repairs" what it cannot decode, and gives back other bytes."""

    def save(self, data: bytes) -> None:
        self.lines.append(data.decode("utf-8", errors="replace"))


def test_a_store_that_cannot_hold_non_utf8_bytes_is_caught() -> None:
    with pytest.raises(AssertionError, match=r"cannot hold arbitrary bytes.*UnicodeDecodeError"):
        check_store_holds(TextStore(), b"\x00\xffnot json")
    with pytest.raises(AssertionError, match="did not give back the bytes"):
        check_store_holds(ManglingStore(), b"\x00\xffnot json")
    with pytest.raises(AssertionError, match="cannot hold arbitrary bytes"):
        run_machine(GarbageCorruptions.TestCase)


class GarbageCorruptions(CrashConsistencyMachine):
    """The machine on a text store, with one more rule: the corruption whose bytes are
    not UTF-8 (one of five the machine draws), so finding the bug does not hang on
    which corruption a derandomized run happens to draw."""

    def make_runtime(self) -> Runtime:
        return InMemoryRuntime()

    def make_store(self) -> Any:
        return TextStore()

    @rule()
    def corrupt_with_bytes_that_are_not_text(self) -> None:
        self.corrupt_checkpoint("garbage")


GarbageCorruptions.TestCase.settings = FIND


def test_a_correct_runtime_and_store_pass_with_the_same_settings() -> None:
    run_machine(machine_for(InMemoryRuntime))
    assert BACKEND_TAGS  # the strategies' pools are what the machine draws from


# -- the user's error is not the runtime's ------------------------------------------------

#: Batching asked of a plain target: the runtime rightly refuses it (InvalidConfig).
BATCH_ON_PLAIN = CreateBackend(
    tag="a",
    target="servecore.testing.targets:Echo",
    config=BackendConfig(num_replicas=2, max_batch_size=4, graceful_shutdown_timeout_s=0.0),
)
#: Batching asked of a batch target: a valid start every runtime must carry out.
BATCH_ON_BATCH = CreateBackend(
    tag="a",
    target="servecore.testing.targets:echo_all",
    config=BackendConfig(num_replicas=2, max_batch_size=4, graceful_shutdown_timeout_s=0.0),
)


class NoBatching(InMemoryRuntime):
    """Cannot batch at all, and says so with an untyped error: even to a batch target."""

    async def start_replica(self, effect: StartReplica) -> None:
        if effect.config.max_batch_size is not None:
            raise RuntimeError("this runtime cannot batch")
        await super().start_replica(effect)


class RefusesBatchTargets(InMemoryRuntime):
    """Refuses batching with the user's error type, but to a target that can batch."""

    async def start_replica(self, effect: StartReplica) -> None:
        if effect.config.max_batch_size is not None:
            raise InvalidConfig("max_batch_size", effect.config.max_batch_size, "no batching")
        await super().start_replica(effect)


def test_batching_asked_of_a_plain_target_is_the_users_error_not_the_runtimes() -> None:
    outcome = CrashWorld().run(BATCH_ON_PLAIN)
    assert isinstance(outcome.error, BackendStartError)
    assert outcome.state is not None
    backend = outcome.state.backends["a"]
    assert backend.status is BackendStatus.FAILED
    assert "not marked @servecore.batch" in (backend.last_error or "")
    # Crashing anywhere, then deleting the backend, blames nothing either.
    assert enumerate_crashes(CrashWorld, [BATCH_ON_PLAIN, DeleteBackend(tag="a")]) > 0


def test_an_untyped_error_for_a_valid_start_is_still_the_runtimes() -> None:
    with pytest.raises(AssertionError, match=r"injected no failure: RuntimeError: this runtime"):
        CrashWorld(runtime=NoBatching()).run(BATCH_ON_BATCH)
    with pytest.raises(AssertionError, match=r"failed to start replica a#\d.*cannot batch"):
        enumerate_crashes(lambda: CrashWorld(runtime=NoBatching()), [BATCH_ON_BATCH])


def test_a_typed_refusal_of_what_the_command_did_not_ask_for_is_the_runtimes() -> None:
    with pytest.raises(AssertionError, match=r"echo_all is marked @servecore.batch"):
        CrashWorld(runtime=RefusesBatchTargets()).run(BATCH_ON_BATCH)
    # The same runtime is right to refuse batching of a plain target.
    outcome = CrashWorld(runtime=RefusesBatchTargets()).run(BATCH_ON_PLAIN)
    assert isinstance(outcome.error, BackendStartError)


def test_the_kit_checks_the_controller_records_the_users_error() -> None:
    world = CrashWorld()
    healthy = world.run(CreateBackend(tag="a", target=BATCH_ON_PLAIN.target)).state
    assert healthy is not None
    b = healthy.backends["a"]
    effect = StartReplica(
        tag="a#9", backend="a", target=b.target, init_args=b.init_args,
        init_kwargs=dict(b.init_kwargs), config=b.config,
    )  # fmt: skip
    # A refusal of the backend as it is now, yet the backend is not FAILED: caught.
    world.runtime.refused["a"] = (effect, InvalidConfig("max_batch_size", 4, "no batching"))
    with pytest.raises(AssertionError, match="must leave the backend FAILED"):
        world._check_refusals_recorded(healthy)


# -- what a kit user sees when the machine finds a bug, shrinking on -------------------------


class ForgetfulStops(InMemoryRuntime):
    """Says a replica stopped, but leaves it running."""

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        await trio.lowlevel.checkpoint()


class ForgetfulStopsCrashes(CrashConsistencyMachine):
    shrink_budget_s = 5.0

    def make_runtime(self) -> Runtime:
        return ForgetfulStops()


# The kit's own settings (shrinking on), made repeatable; only the budget is the test's.
ForgetfulStopsCrashes.TestCase.settings = settings(
    ForgetfulStopsCrashes.TestCase.settings,
    max_examples=60, stateful_step_count=10, database=None, derandomize=True,
)  # fmt: skip


def test_a_shrunk_failure_shows_the_failing_step_and_its_own_assertion() -> None:
    case = ForgetfulStopsCrashes.TestCase
    assert Phase.shrink in case.settings.phases
    with pytest.raises(Exception) as info:
        run_machine(case)
    error = info.value
    # The planted bug's own assertion, not Hypothesis's Flaky* or a timeout.
    assert type(error) is AssertionError, repr(error)
    assert "live" in str(error) and "!= RUNNING" in str(error), error
    report = "\n".join(getattr(error, "__notes__", []))
    assert "state = ForgetfulStopsCrashes()" in report, report
    assert "state.open_empty(" in report, report
    assert "Flaky" not in report and "Timeout" not in report
