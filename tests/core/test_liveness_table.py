"""Recovery and resync follow one table of (recorded status, alive) -> fix, and
docs/design.md shows that same table."""

from __future__ import annotations

from pathlib import Path

import pytest

from servecore import (
    BackendConfig,
    CreateBackend,
    Recover,
    ReplicaStarted,
    ReplicaStatus,
    Resync,
    SetBackendConfig,
    StartReplica,
    State,
    StopReplica,
    step,
    validate_state,
)
from servecore._core.reconcile import LIVENESS_FIXES, Fix, fixes_table_markdown

DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"


def _state_with(status: ReplicaStatus | None) -> tuple[State, str]:
    """Backend ``a`` (one replica wanted) whose replica ``a#0`` is recorded as
    ``status``; for ``None``, a backend of 0 replicas and an unknown tag ``a#7``."""
    if status is None:
        state = step(
            State(), CreateBackend(tag="a", target="m:T", config=BackendConfig(num_replicas=0))
        ).state
        return state, "a#7"
    state = step(State(), CreateBackend(tag="a", target="m:T")).state
    if status is ReplicaStatus.RUNNING:
        state = step(state, ReplicaStarted(tag="a#0")).state
    elif status is ReplicaStatus.STOPPING:
        state = step(state, ReplicaStarted(tag="a#0")).state
        state = step(state, SetBackendConfig(tag="a", config=BackendConfig(num_replicas=0))).state
    assert (state.replicas["a#0"].status if "a#0" in state.replicas else None) is status
    return state, "a#0"


def _observed(state: State, tag: str, alive: bool, event: Recover | Resync) -> Fix:
    out = step(state, event)
    validate_state(out.state)
    stopped = any(isinstance(e, StopReplica) and e.tag == tag for e in out.effects)
    started = any(isinstance(e, StartReplica) and e.tag == tag for e in out.effects)
    after = out.state.replicas.get(tag)
    before = state.replicas.get(tag)
    if stopped:
        return Fix.STOP
    if started:
        return Fix.START_AGAIN
    if before is not None and after is None:
        return Fix.FORGET
    if before is not None and after is not None and before.status is not after.status:
        assert after.status is ReplicaStatus.RUNNING
        return Fix.MARK_RUNNING
    return Fix.KEEP


@pytest.mark.parametrize(("status", "alive"), list(LIVENESS_FIXES))
@pytest.mark.parametrize("kind", ["recover", "resync"])
def test_recover_and_resync_both_follow_the_table(
    status: ReplicaStatus | None, alive: bool, kind: str
) -> None:
    state, tag = _state_with(status)
    live = frozenset({tag}) if alive else frozenset()
    event = Recover(live=live) if kind == "recover" else Resync(live=live, busy=frozenset())
    assert _observed(state, tag, alive, event) is LIVENESS_FIXES[(status, alive)]


@pytest.mark.parametrize(("status", "alive"), list(LIVENESS_FIXES))
def test_resync_leaves_a_busy_replica_alone(status: ReplicaStatus | None, alive: bool) -> None:
    state, tag = _state_with(status)
    live = frozenset({tag}) if alive else frozenset()
    out = step(state, Resync(live=live, busy=frozenset({tag})))
    assert out.state.replicas.get(tag) == state.replicas.get(tag)
    assert not any(getattr(e, "tag", None) == tag for e in out.effects)


def test_a_resync_that_agrees_writes_nothing() -> None:
    state, tag = _state_with(ReplicaStatus.RUNNING)
    out = step(state, Resync(live=frozenset({tag}), busy=frozenset()))
    assert out.state is state and out.effects == ()


def test_an_outdated_starting_replica_is_never_started_again() -> None:
    """STARTING and not alive, but its backend's config has moved on: it is forgotten,
    and reconcile starts a replica of the current version instead."""
    state = step(State(), CreateBackend(tag="a", target="m:T")).state
    state = step(state, SetBackendConfig(tag="a", config=BackendConfig(user_config={"v": 2}))).state
    outdated = [t for t, r in state.replicas.items() if r.version != state.backends["a"].version]
    for event in (Recover(live=frozenset()), Resync(live=frozenset(), busy=frozenset())):
        out = step(state, event)
        started = [e.tag for e in out.effects if isinstance(e, StartReplica)]
        assert not set(started) & set(outdated)
        validate_state(out.state)


def test_an_orphan_number_is_never_minted_again() -> None:
    state, tag = _state_with(None)
    for event in (Recover(live=frozenset({tag})), Resync(live=frozenset({tag}), busy=frozenset())):
        out = step(state, event)
        assert out.state.replica_counter > 7


def test_design_doc_shows_the_table_the_code_reads() -> None:
    assert fixes_table_markdown() in DESIGN.read_text()
