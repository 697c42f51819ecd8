"""The autoscaling policy and its place in the pure core: config, decisions, delays,
durability, and what a report that changes nothing costs (nothing)."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servecore import (
    AutoscaleState,
    AutoscalingConfig,
    BackendConfig,
    BackendNotFound,
    CreateBackend,
    DeleteBackend,
    InvalidConfig,
    LoadReport,
    Recover,
    ReplicaStarted,
    ScaleDirection,
    SetBackendConfig,
    StartReplica,
    State,
    StopReplica,
    step,
    validate_state,
)
from servecore._core.autoscaling import TOLERANCE, _ceil, decide, recommend
from servecore._core.records import decode, encode
from servecore._core.transitions import same_checkpoint

TARGET = "servecore.testing.targets:Echo"


def cfg(**kw: Any) -> AutoscalingConfig:
    base: dict[str, Any] = {
        "min_replicas": 1,
        "max_replicas": 10,
        "target_ongoing_requests": 1.0,
        "upscale_delay_s": 30.0,
        "downscale_delay_s": 60.0,
        "look_back_period_s": 1.0,
    }
    base.update(kw)
    return AutoscalingConfig(**base)


def created(c: AutoscalingConfig, tag: str = "a") -> State:
    """A state with backend ``tag`` autoscaling under ``c``, its replicas RUNNING."""
    state = step(
        State(), CreateBackend(tag=tag, target=TARGET, config=BackendConfig(autoscaling=c))
    ).state
    return run_all(state)


def run_all(state: State) -> State:
    for tag, r in state.replicas.items():
        if r.status.value == "STARTING":
            state = step(state, ReplicaStarted(tag=tag)).state
    for tag in [t for t, r in state.replicas.items() if r.status.value == "STOPPING"]:
        from servecore import ReplicaStopped

        state = step(state, ReplicaStopped(tag=tag)).state
    return state


def report(state: State, ongoing: float, now: float, tag: str = "a") -> State:
    t = step(state, LoadReport(backend=tag, ongoing=ongoing, now=now))
    validate_state(t.state)
    return run_all(t.state)


def target(state: State, tag: str = "a") -> int:
    auto = state.backends[tag].autoscale
    assert auto is not None
    return auto.replicas


# -- the config ---------------------------------------------------------------------------


def test_defaults_follow_ray_serves_num_replicas_auto() -> None:
    c = AutoscalingConfig()
    assert (c.min_replicas, c.max_replicas, c.target_ongoing_requests) == (1, 100, 2.0)
    assert (c.look_back_period_s, c.upscale_delay_s, c.downscale_delay_s) == (30.0, 30.0, 600.0)
    assert c.downscale_to_zero_delay_s is None and c.initial_replicas is None
    assert (c.upscaling_factor, c.downscaling_factor) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"min_replicas": -1}, "autoscaling.min_replicas"),
        ({"max_replicas": 0}, "autoscaling.max_replicas"),
        ({"min_replicas": 5, "max_replicas": 2}, "autoscaling.min_replicas"),
        ({"initial_replicas": 20}, "autoscaling.initial_replicas"),
        ({"target_ongoing_requests": 0}, "autoscaling.target_ongoing_requests"),
        ({"target_ongoing_requests": float("nan")}, "autoscaling.target_ongoing_requests"),
        ({"look_back_period_s": 0}, "autoscaling.look_back_period_s"),
        ({"upscale_delay_s": -1}, "autoscaling.upscale_delay_s"),
        ({"downscale_delay_s": float("inf")}, "autoscaling.downscale_delay_s"),
        ({"downscale_to_zero_delay_s": True}, "autoscaling.downscale_to_zero_delay_s"),
        ({"upscaling_factor": 0}, "autoscaling.upscaling_factor"),
        ({"downscaling_factor": "1"}, "autoscaling.downscaling_factor"),
    ],
)
def test_bad_autoscaling_values_name_field_and_value(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidConfig) as info:
        AutoscalingConfig(**{"max_replicas": 10, **fields})
    assert info.value.field == field
    assert field in str(info.value)


def test_a_mapping_is_accepted_and_unknown_keys_are_named() -> None:
    c = BackendConfig(autoscaling={"min_replicas": 0, "max_replicas": 3})
    assert c.autoscaling == AutoscalingConfig(min_replicas=0, max_replicas=3)
    with pytest.raises(InvalidConfig, match=r"autoscaling\.max_replica=") as info:
        BackendConfig(autoscaling={"max_replica": 3})
    assert "max_replicas" in str(info.value)  # the known names are listed
    with pytest.raises(InvalidConfig, match="autoscaling"):
        BackendConfig(autoscaling=5)


def test_num_replicas_or_autoscaling_never_both() -> None:
    assert BackendConfig().num_replicas == 1
    assert BackendConfig(num_replicas=None).num_replicas == 1
    assert BackendConfig(autoscaling=cfg()).num_replicas is None
    for n in (1, 3):
        with pytest.raises(InvalidConfig, match="num_replicas") as info:
            BackendConfig(num_replicas=n, autoscaling=cfg())
        assert info.value.value == n
    # evolve switches the mode: giving one clears the other.
    fixed = BackendConfig(num_replicas=3)
    auto = fixed.evolve(autoscaling=cfg())
    assert (auto.num_replicas, auto.autoscaling) == (None, cfg())
    assert auto.evolve(num_replicas=2) == BackendConfig(num_replicas=2)
    with pytest.raises(InvalidConfig):
        fixed.evolve(num_replicas=2, autoscaling=cfg())


# -- the decision -------------------------------------------------------------------------


def test_recommendation_is_the_ratio_to_target_with_tolerance_and_clamp() -> None:
    c = cfg(target_ongoing_requests=2.0, max_replicas=8)
    assert recommend(c, 2, 4.0) == 2  # exactly on target
    assert recommend(c, 2, 4.0 * (1 + TOLERANCE)) == 2  # within tolerance
    assert recommend(c, 2, 5.0) == 3  # ceil(5 / 2)
    assert recommend(c, 2, 100.0) == 4  # at most doubles per step
    assert recommend(c, 6, 100.0) == 8  # clamped to max
    assert recommend(c, 4, 1.0) == 1  # ceil(0.5), at least min_replicas
    assert recommend(c, 3, 0.0) == 1  # min_replicas
    half = attrs.evolve(c, upscaling_factor=0.5, downscaling_factor=0.5)
    assert recommend(half, 3, 12.0) == 5  # ceil(3 + (6 - 3) * 0.5)
    assert recommend(half, 8, 2.0) == 5  # ceil(8 - 7 * 0.5)
    tiny = attrs.evolve(c, downscaling_factor=0.01)
    assert recommend(tiny, 4, 0.0) == 3  # a small factor still moves by one


def test_a_load_step_scales_up_after_upscale_delay_and_not_before() -> None:
    state = created(cfg(upscale_delay_s=30.0, initial_replicas=2))
    assert target(state) == 2 and len(state.replicas) == 2
    state = report(state, 4.0, now=100.0)
    auto = state.backends["a"].autoscale
    assert auto is not None and auto.replicas == 2
    assert auto.pending is not None and auto.pending.direction is ScaleDirection.UP
    assert (auto.pending.replicas, auto.pending.since) == (4, 100.0)
    for now in (110.0, 120.0, 129.9):
        state = report(state, 4.0, now=now)
        assert target(state) == 2 and len(state.replicas) == 2
    t = step(state, LoadReport(backend="a", ongoing=4.0, now=130.0))
    assert [type(e) for e in t.effects].count(StartReplica) == 2
    assert target(t.state) == 4 and t.state.backends["a"].autoscale.pending is None  # type: ignore[union-attr]


def test_a_load_drop_scales_down_after_downscale_delay() -> None:
    state = created(cfg(initial_replicas=4, downscale_delay_s=60.0))
    assert target(state) == 4
    state = report(state, 1.0, now=0.0)
    state = report(state, 1.0, now=59.0)
    assert target(state) == 4
    t = step(state, LoadReport(backend="a", ongoing=1.0, now=60.0))
    assert [type(e) for e in t.effects].count(StopReplica) == 3
    assert target(t.state) == 1


def test_a_flip_of_direction_restarts_the_countdown_and_no_change_cancels_it() -> None:
    state = created(cfg(initial_replicas=2))
    state = report(state, 6.0, now=0.0)  # up, since 0
    state = report(state, 0.5, now=20.0)  # down now: since 20
    pending = state.backends["a"].autoscale.pending  # type: ignore[union-attr]
    assert pending is not None and pending.direction is ScaleDirection.DOWN
    assert pending.since == 20.0
    state = report(state, 2.0, now=30.0)  # on target: cancelled
    assert state.backends["a"].autoscale.pending is None  # type: ignore[union-attr]
    state = report(state, 6.0, now=40.0)
    assert state.backends["a"].autoscale.pending.since == 40.0  # type: ignore[union-attr]


def test_min_and_max_are_respected() -> None:
    state = created(cfg(min_replicas=2, max_replicas=3, upscale_delay_s=0, downscale_delay_s=0))
    assert target(state) == 2
    state = report(state, 1000.0, now=1.0)
    assert target(state) == 3 and len(state.replicas) == 3
    state = report(state, 0.0, now=2.0)
    assert target(state) == 2 and len(state.replicas) == 2


def test_to_zero_in_two_steps_and_back_from_zero_at_once() -> None:
    c = cfg(min_replicas=0, initial_replicas=3, downscale_delay_s=10, downscale_to_zero_delay_s=50)
    assert recommend(c, 0, 30.0) == 10  # from zero: what the waiting queries need
    state = created(c)
    state = report(state, 0.0, now=0.0)
    state = report(state, 0.0, now=10.0)
    assert target(state) == 1  # 3 -> 1 after downscale_delay_s, never straight to 0
    state = report(state, 0.0, now=11.0)  # the next step's countdown begins
    state = report(state, 0.0, now=60.9)
    assert target(state) == 1
    state = report(state, 0.0, now=61.0)  # 1 -> 0 after downscale_to_zero_delay_s
    assert target(state) == 0 and not state.replicas
    route = state.routing_table().backends["a"]
    assert route.wakes_on_demand and route.replicas == ()
    # Any load at zero starts replicas at once, with no upscale delay.
    t = step(state, LoadReport(backend="a", ongoing=3.0, now=62.0))
    assert [type(e) for e in t.effects].count(StartReplica) == 3
    assert target(t.state) == 3


def test_per_replica_load_halving_after_scale_up_does_not_oscillate() -> None:
    """A constant total load: after scaling up, each replica carries half as much as
    before, which a per-replica metric reads as a reason to scale down again."""
    state = created(cfg(target_ongoing_requests=2.0, upscale_delay_s=5, downscale_delay_s=5))
    decisions = []
    for i in range(200):
        before = target(state)
        state = report(state, 4.0, now=float(i))
        if target(state) != before:
            decisions.append((i, target(state)))
    assert decisions == [(5, 2)]
    assert state.backends["a"].autoscale.pending is None  # type: ignore[union-attr]


def test_load_between_two_counts_settles_instead_of_cycling() -> None:
    """Load that needs 2.5 replicas: ceil gives 3 going up, and going down never goes
    below ceil(need), so 3 is where it stays."""
    state = created(cfg(upscale_delay_s=0, downscale_delay_s=0, initial_replicas=2))
    seen = []
    for i in range(50):
        state = report(state, 2.5, now=float(i))
        seen.append(target(state))
    assert set(seen[1:]) == {3}


def test_a_stale_report_is_ignored() -> None:
    state = created(cfg(upscale_delay_s=0))
    state = report(state, 5.0, now=100.0)
    assert target(state) == 2  # one step at most doubles
    t = step(state, LoadReport(backend="a", ongoing=0.0, now=50.0))
    assert t.effects == () and same_checkpoint(state, t.state)


def test_a_report_that_changes_no_decision_checkpoints_as_before() -> None:
    state = created(cfg())
    state = report(state, 4.0, now=0.0)  # a pending proposal: a change
    for now in (1.0, 2.0, 3.0):
        t = step(state, LoadReport(backend="a", ongoing=4.0, now=now))
        assert t.effects == () and same_checkpoint(state, t.state)
        assert encode(t.state, 1) == encode(state, 1)
        assert t.state.observations["a"].at == now and t.state.observations["a"].desired == 2
        state = t.state
    # A fixed backend: the very same state.
    fixed = step(state, CreateBackend(tag="f", target=TARGET)).state
    assert step(fixed, LoadReport(backend="f", ongoing=9, now=9)).state is fixed


def test_a_report_for_an_unknown_backend_is_refused() -> None:
    state = created(cfg())
    with pytest.raises(BackendNotFound, match=r"'zz' does not exist \(known backends: 'a'\)"):
        step(state, LoadReport(backend="zz", ongoing=1, now=1))


def test_report_values_are_validated() -> None:
    for bad in (-1, float("nan"), True, "3"):
        with pytest.raises(InvalidConfig, match="ongoing"):
            LoadReport(backend="a", ongoing=bad, now=0)
    with pytest.raises(InvalidConfig, match="now"):
        LoadReport(backend="a", ongoing=1, now=float("inf"))


# -- config changes -----------------------------------------------------------------------


def test_switching_modes_and_changing_the_range() -> None:
    state = step(
        State(), CreateBackend(tag="a", target=TARGET, config=BackendConfig(num_replicas=3))
    ).state
    state = run_all(state)
    b = state.backends["a"]
    # Fixed -> autoscaling: keeps the count it runs (clamped), no restart of replicas.
    t = step(
        state, SetBackendConfig(tag="a", config=b.config.evolve(autoscaling=cfg(max_replicas=5)))
    )
    assert target(t.state) == 3 and not any(
        isinstance(e, (StartReplica, StopReplica)) for e in t.effects
    )
    state = report(t.state, 9.0, now=0.0)
    assert state.backends["a"].autoscale.pending is not None  # type: ignore[union-attr]
    # A change that does not touch autoscaling keeps the countdown.
    c = state.backends["a"].config
    t = step(state, SetBackendConfig(tag="a", config=c.evolve(max_concurrent_queries=4)))
    assert t.state.backends["a"].autoscale == state.backends["a"].autoscale
    # Lowering max clamps at once and drops the proposal.
    t = step(state, SetBackendConfig(tag="a", config=c.evolve(autoscaling=cfg(max_replicas=2))))
    assert target(t.state) == 2 and t.state.backends["a"].autoscale.pending is None  # type: ignore[union-attr]
    state = run_all(t.state)
    # Autoscaling -> fixed: the decision state is gone.
    t = step(state, SetBackendConfig(tag="a", config=BackendConfig(num_replicas=2)))
    assert t.state.backends["a"].autoscale is None and "a" not in t.state.observations
    validate_state(t.state)
    # Deleting forgets the observation too.
    state = report(state, 1.0, now=5.0)
    assert "a" in state.observations
    assert "a" not in step(state, DeleteBackend(tag="a")).state.observations


# -- checkpoints --------------------------------------------------------------------------


def test_checkpoint_round_trips_the_decision_and_drops_the_observation() -> None:
    state = created(cfg(min_replicas=0, initial_replicas=1, downscale_to_zero_delay_s=7.5))
    state = report(state, 5.0, now=3.0)
    loaded, seq = decode(encode(state, 4), "test")
    assert seq == 4 and loaded == state
    assert loaded.backends["a"].autoscale == state.backends["a"].autoscale
    assert loaded.backends["a"].autoscale.pending is not None  # type: ignore[union-attr]
    assert not loaded.observations
    validate_state(loaded)


def _without_autoscaling(state: State) -> tuple[bytes, bytes]:
    """``state`` as a controller from before autoscaling wrote it (no ``autoscale`` in
    backends, no ``autoscaling`` in configs): a version 1 blob and a version 2 one."""
    from checkpoints import encode_v1
    from servecore._core.records import _checksum, _record, encode_blob, records_of

    def strip(backend: dict[str, Any]) -> None:
        del backend["autoscale"]
        del backend["config"]["autoscaling"]

    envelope = json.loads(encode_v1(state, 1))
    for b in envelope["state"]["backends"].values():
        strip(b)
    body = json.dumps(envelope["state"], sort_keys=True, separators=(",", ":")).encode()
    v1 = b'{"checksum":"%s","format":"servecore-checkpoint","seq":1,"state":%s,"version":1}' % (
        _checksum(1, body).encode(),
        body,
    )
    records = records_of(state, 1)
    for key in [k for k in records if k.startswith("backend/")]:
        value = json.loads(records[key])["value"]
        strip(value)
        records[key] = _record(key, json.dumps(value, sort_keys=True).encode())
    return v1, encode_blob(1, records)


@pytest.mark.parametrize("version", [1, 2])
def test_an_old_checkpoint_without_autoscaling_still_loads(version: int) -> None:
    state = run_all(
        step(
            State(), CreateBackend(tag="a", target=TARGET, config=BackendConfig(num_replicas=2))
        ).state
    )
    data = _without_autoscaling(state)[version - 1]
    assert b"autoscal" not in data
    loaded, _ = decode(data, "old")
    assert loaded == state
    assert loaded.backends["a"].wanted_replicas == 2
    t = step(loaded, Recover(live=frozenset(loaded.replicas)))
    assert not any(isinstance(e, (StartReplica, StopReplica)) for e in t.effects)


def test_the_records_of_an_autoscaling_backend_carry_its_decision() -> None:
    """The keyed checkpoint writes the decision with the backend's record, in the
    change set of the report that made it, and reads it back."""
    from servecore._core.records import (
        META_KEY,
        encode_changes,
        load_records,
        meta_record,
        records_of,
    )

    state = created(cfg(min_replicas=0, initial_replicas=1, downscale_to_zero_delay_s=7.5))
    t = step(state, LoadReport(backend="a", ongoing=5.0, now=3.0))
    assert t.state.backends["a"].autoscale != state.backends["a"].autoscale
    delta = encode_changes(t.changes)
    assert "backend/a" in delta
    # What a commit of the change set leaves in a store that held the state before.
    after = records_of(state, 1)
    for key, value in delta.items():
        if value is None:
            after.pop(key, None)
        else:
            after[key] = value
    after[META_KEY] = meta_record(2, t.state.replica_counter)
    assert after == records_of(t.state, 2)
    loaded = load_records(2, after, "test")
    assert loaded == t.state
    assert loaded.backends["a"].autoscale == t.state.backends["a"].autoscale


# -- the property -------------------------------------------------------------------------

configs = st.builds(
    lambda lo, span, target, up, down, fu, fd: AutoscalingConfig(
        min_replicas=lo,
        max_replicas=max(1, lo + span),
        target_ongoing_requests=target,
        upscale_delay_s=up,
        downscale_delay_s=down,
        upscaling_factor=fu,
        downscaling_factor=fd,
    ),
    st.integers(0, 5),
    st.integers(0, 10),
    st.floats(0.1, 10),
    st.sampled_from([0.0, 1.0, 5.0]),
    st.sampled_from([0.0, 1.0, 5.0]),
    st.floats(0.1, 3),
    st.floats(0.1, 3),
)


@settings(max_examples=300, deadline=None)
@given(
    c=configs,
    loads=st.lists(st.tuples(st.floats(0, 200), st.floats(0, 3)), min_size=1, max_size=40),
)
def test_target_stays_in_range_and_moves_only_as_the_load_calls_for(
    c: AutoscalingConfig, loads: list[tuple[float, float]]
) -> None:
    state = AutoscaleState(
        replicas=c.min_replicas if c.initial_replicas is None else c.initial_replicas
    )
    now = 0.0
    for ongoing, dt in loads:
        now += dt
        new = decide(c, state, ongoing, now)
        assert c.min_replicas <= new.replicas <= c.max_replicas
        need = ongoing / c.target_ongoing_requests
        if new.replicas > state.replicas:
            # Up only when the load needs more than the current count can carry.
            assert state.replicas == 0 or need > state.replicas * (1 + TOLERANCE) - 1e-9
            step_up = _ceil(state.replicas + (need - state.replicas) * c.upscaling_factor)
            assert state.replicas == 0 or new.replicas <= step_up
        elif new.replicas < state.replicas:
            # Down only when the load needs fewer, and never below what it needs.
            assert need < state.replicas * (1 - TOLERANCE) + 1e-9
            assert new.replicas >= min(c.max_replicas, _ceil(need))
        if new.pending is not None:
            up = new.pending.direction is ScaleDirection.UP
            assert (new.pending.replicas > new.replicas) == up
            assert c.min_replicas <= new.pending.replicas <= c.max_replicas
        if new == state:
            assert new is state  # nothing changed: nothing to write
        state = new


def test_the_next_proposal_waits_for_a_window_measured_after_the_last_decision() -> None:
    c = cfg(look_back_period_s=5.0, upscale_delay_s=1.0)
    state = report(created(c), 2.0, now=0.0)
    state = report(state, 2.0, now=1.0)
    assert target(state) == 2  # decided at 1.0
    state = report(state, 8.0, now=5.9)  # the window still holds load from before
    assert target(state) == 2 and state.backends["a"].autoscale.pending is None  # type: ignore[union-attr]
    state = report(state, 8.0, now=6.0)
    assert state.backends["a"].autoscale.pending.since == 6.0  # type: ignore[union-attr]
