"""Keyed checkpoints: change sets from the core, records, and the file store's log."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from servecore import (
    Backend,
    BackendConfig,
    CheckpointCorrupt,
    CheckpointVersionError,
    CreateBackend,
    CreateEndpoint,
    Endpoint,
    FileStore,
    Replica,
    ReplicaStarted,
    ReplicaStatus,
    SetTraffic,
    SQLiteStore,
    State,
    step,
)
from servecore._core.records import (
    META_KEY,
    _record,
    encode_changes,
    load_records,
    meta_record,
    records_of,
)

ECHO = "servecore.testing.targets:Echo"


def big_state(n: int) -> State:
    """Backend ``a`` with ``n`` RUNNING replicas, ``b`` with one; ``api`` sends to ``a``."""
    backends = {
        "a": Backend(tag="a", target=ECHO, config=BackendConfig(num_replicas=n)),
        "b": Backend(tag="b", target=ECHO, config=BackendConfig(num_replicas=1)),
    }
    replicas = {
        f"a#{i}": Replica(tag=f"a#{i}", backend="a", status=ReplicaStatus.RUNNING) for i in range(n)
    }
    replicas[f"b#{n}"] = Replica(tag=f"b#{n}", backend="b", status=ReplicaStatus.RUNNING)
    return State.rebuild(
        endpoints={"api": Endpoint(name="api", traffic={"a": 1.0})},
        backends=backends,
        replicas=replicas,
        replica_counter=n + 1,
    )


# ---------------------------------------------------------------------------------------
# Change sets


def test_a_transition_carries_exactly_what_it_changed() -> None:
    t = step(State(), CreateBackend(tag="a", target=ECHO, config=BackendConfig(num_replicas=3)))
    assert set(t.changes.backends) == {"a"} and set(t.changes.replicas) == {"a#0", "a#1", "a#2"}
    assert dict(t.changes.endpoints) == {} and t.changes.replica_counter == 3
    assert t.changes.replicas["a#1"] is t.state.replicas["a#1"]
    started = step(t.state, ReplicaStarted(tag="a#1"))
    assert set(started.changes.replicas) == {"a#1"}
    assert started.changes.replicas["a#1"].status is ReplicaStatus.RUNNING


def test_a_deleted_entity_is_a_none_in_the_change_set() -> None:
    state = step(State(), CreateEndpoint(name="e")).state
    from servecore import DeleteEndpoint

    t = step(state, DeleteEndpoint(name="e"))
    assert dict(t.changes.endpoints) == {"e": None}
    assert encode_changes(t.changes) == {"endpoint/e": None}


@pytest.mark.parametrize("n", [10, 10_000])
def test_the_change_set_of_set_traffic_does_not_grow_with_the_fleet(n: int) -> None:
    t = step(big_state(n), SetTraffic(endpoint="api", traffic={"a": 0.5, "b": 0.5}))
    assert len(t.changes) == 1 and set(t.changes.endpoints) == {"api"}
    records = encode_changes(t.changes)
    assert set(records) == {"endpoint/api"}


def test_a_no_op_changes_nothing() -> None:
    state = big_state(3)
    t = step(state, SetTraffic(endpoint="api", traffic={"a": 1.0}))
    assert t.state is state and len(t.changes) == 0


def test_records_round_trip_and_applying_changes_matches_the_whole_state() -> None:
    state, records = State(), records_of(State(), 0)
    messages = [
        CreateBackend(tag="a", target=ECHO, config=BackendConfig(num_replicas=2)),
        ReplicaStarted(tag="a#0"),
        CreateEndpoint(name="api", route="/api"),
        SetTraffic(endpoint="api", traffic={"a": 1.0}),
        ReplicaStarted(tag="a#1"),
    ]
    for seq, message in enumerate(messages, start=1):
        t = step(state, message)
        for key, value in encode_changes(t.changes).items():
            if value is None:
                records.pop(key, None)
            else:
                records[key] = value
        records[META_KEY] = meta_record(seq, t.state.replica_counter)
        state = t.state
        assert records == records_of(state, seq)  # the delta adds up to the whole
        assert load_records(seq, records, "x") == state


# ---------------------------------------------------------------------------------------
# Damaged records


def _damaged(key: str, data: bytes) -> dict[str, bytes]:
    records = records_of(big_state(2), 5)
    records[key] = data
    return records


@pytest.mark.parametrize(
    "records, why",
    [
        (_damaged("backend/a", records_of(big_state(2), 5)["backend/a"][:-3]), "not a record"),
        (
            _damaged("backend/a", records_of(big_state(2), 5)["backend/a"].replace(b":2", b":3")),
            "checksum",
        ),
        (_damaged("backend/z", records_of(big_state(2), 5)["backend/a"]), "checksum"),
        (_damaged("thing/x", _record("thing/x", b"{}")), "unknown record key"),
        (_damaged("backend/z", _record("backend/z", b'{"tag":"a","target":"m:f"}')), "holds"),
        ({"backend/a": records_of(big_state(2), 5)["backend/a"]}, "no 'meta' record"),
        (_damaged(META_KEY, meta_record(5, 1)), "not below counter"),
        (_damaged(META_KEY, meta_record(4, 3)), "the store says 5"),
        (_damaged("backend/a", _record("backend/a", b'{"tag":"a"}')), "does not parse"),
    ],
    ids=[
        "torn",
        "edited",
        "moved",
        "unknown key",
        "wrong name",
        "no meta",
        "counter",
        "seq",
        "invalid",
    ],
)
def test_damaged_records_raise_naming_where(records: dict[str, bytes], why: str) -> None:
    with pytest.raises(CheckpointCorrupt, match=why) as info:
        load_records(5, records, "/srv/state.db")
    assert info.value.where == "/srv/state.db"


def test_a_meta_record_of_a_newer_version_raises_a_version_error() -> None:
    body = b'{"format":"servecore-checkpoint","replica_counter":3,"seq":5,"version":3}'
    with pytest.raises(CheckpointVersionError) as info:
        load_records(5, _damaged(META_KEY, _record(META_KEY, body)), "/srv/x")
    assert (info.value.found, info.value.supported, info.value.where) == (3, 2, "/srv/x")


# ---------------------------------------------------------------------------------------
# The file store's log


def _file(tmp_path: Path, **kwargs: int) -> FileStore:
    store = FileStore(tmp_path / "state.json", **kwargs)
    store.open()
    return store


def _commit_states(store: FileStore, states: list[State]) -> None:
    for seq, state in enumerate(states, start=1):
        _, now = store.load() if seq == 1 else (None, store._records or {})
        records = records_of(state, seq)
        store.commit(seq, records, [k for k in now if k not in records])


STATES = [big_state(1), big_state(2), big_state(3)]


def _gone(old: State, new: State) -> list[str]:
    """The records of ``old`` that ``new`` no longer has."""
    return sorted(set(records_of(old, 0)) - set(records_of(new, 0)))


def test_a_torn_log_tail_is_the_only_thing_discarded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _file(tmp_path)
    _commit_states(store, STATES[:2])
    store.close()
    log = tmp_path / "state.json.log"
    good = log.read_bytes()
    store = _file(tmp_path)
    store.load()
    store.midway_hook = lambda: (_ for _ in ()).throw(KeyboardInterrupt)  # a crash, half-way
    with pytest.raises(KeyboardInterrupt):
        store.commit(3, records_of(STATES[2], 3), ())
    store.close()
    assert len(log.read_bytes()) > len(good)  # half a frame is on disk
    with caplog.at_level(logging.WARNING, logger="servecore.stores"):
        store = _file(tmp_path)
        seq, records = store.load()
    assert (seq, load_records(seq, records, "x")) == (2, STATES[1])
    assert "torn" in caplog.text
    assert log.read_bytes() == good  # cut off
    store.commit(3, records_of(STATES[2], 3), ())
    store.close()
    assert FileStore(tmp_path / "state.json").load()[0] == 3


def test_a_last_frame_with_a_bad_checksum_is_a_torn_tail(tmp_path: Path) -> None:
    store = _file(tmp_path)
    _commit_states(store, STATES)
    store.close()
    log = tmp_path / "state.json.log"
    data = bytearray(log.read_bytes())
    data[-5] ^= 0xFF
    log.write_bytes(bytes(data))
    seq, records = FileStore(tmp_path / "state.json").load()
    assert (seq, load_records(seq, records, "x")) == (2, STATES[1])


def test_damage_before_the_last_frame_raises_naming_the_path(tmp_path: Path) -> None:
    store = _file(tmp_path)
    _commit_states(store, STATES)
    store.close()
    log = tmp_path / "state.json.log"
    data = bytearray(log.read_bytes())
    data[40] ^= 0xFF  # inside the first frame
    log.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match="checksum mismatch") as info:
        FileStore(tmp_path / "state.json").load()
    assert info.value.where == str(tmp_path / "state.json")


@pytest.mark.parametrize(
    "name, content, error",
    [
        ("state.json", b"servecore-snapshot 4\n", CheckpointVersionError),
        ("state.json.log", b"servecore-log 4\n", CheckpointVersionError),
        ("state.json", b"servecore-snapshot 2\n\x00\x00", CheckpointCorrupt),
        ("state.json", b"", CheckpointCorrupt),
        ("state.json.log", b"garbage\n", CheckpointCorrupt),
    ],
    ids=["snapshot too new", "log too new", "torn snapshot", "empty snapshot", "bad log"],
)
def test_damaged_or_newer_files_raise(
    tmp_path: Path, name: str, content: bytes, error: type[Exception]
) -> None:
    store = _file(tmp_path)
    _commit_states(store, STATES[:1])
    store.close()
    (tmp_path / name).write_bytes(content)
    with pytest.raises(error) as info:
        FileStore(tmp_path / "state.json").load()
    assert info.value.where == str(tmp_path / "state.json")  # type: ignore[attr-defined]


def test_the_log_is_compacted_once_it_outgrows_the_state(tmp_path: Path) -> None:
    store = _file(tmp_path, compact_min_bytes=1)
    _commit_states(store, STATES[:1])
    state = STATES[0]
    live = sum(len(k) + len(v) for k, v in records_of(state, 1).items())
    for i in range(2, 60):
        split = {"a": 1.0} if i % 2 else {"a": 0.5, "b": 0.5}
        t = step(state, SetTraffic(endpoint="api", traffic=split))
        puts = {k: v for k, v in encode_changes(t.changes).items() if v is not None}
        store.commit(i, {**puts, META_KEY: meta_record(i, t.state.replica_counter)}, ())
        state = t.state
        assert os.path.getsize(tmp_path / "state.json.log") <= 2 * live + 200
    assert store.compactions >= 2
    store.close()
    seq, records = FileStore(tmp_path / "state.json").load()
    assert (seq, load_records(seq, records, "x")) == (59, state)


def test_frames_already_in_the_snapshot_are_skipped(tmp_path: Path) -> None:
    """A compaction that crashed after the new snapshot, before emptying the log."""
    store = _file(tmp_path)
    _commit_states(store, STATES[:2])
    old_log = (tmp_path / "state.json.log").read_bytes()
    store.compact_min_bytes = 0
    store.commit(3, records_of(STATES[2], 3), _gone(STATES[1], STATES[2]))
    store.close()
    (tmp_path / "state.json.log").write_bytes(old_log)
    seq, records = FileStore(tmp_path / "state.json").load()
    assert (seq, load_records(seq, records, "x")) == (3, STATES[2])


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_a_commit_that_fails_half_way_leaves_nothing_behind(tmp_path: Path, kind: str) -> None:
    def make() -> FileStore | SQLiteStore:
        store = FileStore(tmp_path / "s.json") if kind == "file" else SQLiteStore(tmp_path / "s.db")
        store.open()
        return store

    store = make()
    store.commit(1, records_of(STATES[0], 1), ())
    store.commit(2, records_of(STATES[1], 2), _gone(STATES[0], STATES[1]))

    def fail() -> None:
        raise OSError(5, "I/O error")

    store.midway_hook = fail  # part of the change set is written when the disk fails
    with pytest.raises(OSError, match="I/O error"):
        store.commit(3, records_of(STATES[2], 3), _gone(STATES[1], STATES[2]))
    store.midway_hook = None
    seq, records = store.load()
    assert (seq, load_records(seq, records, "x")) == (2, STATES[1])
    store.commit(3, records_of(STATES[2], 3), _gone(STATES[1], STATES[2]))
    store.close()
    reopened = make()
    try:
        seq, records = reopened.load()
        assert (seq, load_records(seq, records, "x")) == (3, STATES[2])
    finally:
        reopened.close()


def test_a_backend_record_written_before_newer_config_fields_loads_with_their_defaults() -> None:
    """Checkpoints written before health_check_period_s, health_check_timeout_s and
    max_surge existed open, the missing fields taking their defaults."""
    import json

    state = big_state(2)
    records = records_of(state, 5)
    value = json.loads(records["backend/a"])["value"]
    newer = ("health_check_period_s", "health_check_timeout_s", "max_surge")
    for field in newer:
        value["config"].pop(field, None)
    body = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
    records["backend/a"] = _record("backend/a", body)
    loaded = load_records(5, records, "test")
    config = loaded.backends["a"].config
    assert config == BackendConfig(num_replicas=2)
    assert (config.health_check_period_s, config.health_check_timeout_s) == (10.0, 30.0)


def test_an_endpoint_record_written_before_http_request_loads_without_it() -> None:
    import json

    state = big_state(2)
    records = records_of(state, 5)
    key = next(k for k in records if k.startswith("endpoint/"))
    value = json.loads(records[key])["value"]
    assert value.pop("http_request") is False
    body = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
    records[key] = _record(key, body)
    loaded = load_records(5, records, "test")
    assert loaded == state
    assert all(ep.http_request is False for ep in loaded.endpoints.values())
