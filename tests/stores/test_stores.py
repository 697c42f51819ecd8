"""The three built-in checkpoint stores agree with each other (docs/design.md §3, §7).

Each test runs the same sequence against :class:`MemoryStore`, :class:`FileStore` and
:class:`SQLiteStore`: commit/load round trips with real checkpoints, corrupt and
too-new checkpoints of the old whole-state format (which must raise, never read as
empty), the OS lock that keeps a store to one controller (also against another
process), and the controller's promise that a failed commit changes nothing and runs
no effect. The format's own damage (records, log frames, torn tails) is tested in
``test_records.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from checkpoints import encode_v1, plant_v1
from servecore import (
    BackendConfig,
    BlobAdapter,
    CallbackStore,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointVersionError,
    CreateBackend,
    CreateEndpoint,
    FileStore,
    MemoryStore,
    ReplicaStarted,
    SetTraffic,
    SQLiteStore,
    State,
    StoreLocked,
    StoreUnwritable,
    open_controller,
    step,
)
from servecore._core.records import VERSION, decode, load_records, records_of
from servecore.testing import FaultyStore, InMemoryRuntime

ECHO = "servecore.testing.targets:Echo"
KINDS = ["memory", "file", "sqlite"]
LOCKING_KINDS = ["file", "sqlite"]

Store = MemoryStore | FileStore | SQLiteStore | BlobAdapter


class Kind:
    """Makes stores of one kind that all refer to the same place."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.path = directory / {"memory": "-", "file": "state.json", "sqlite": "state.db"}[name]
        self._memory = MemoryStore()

    def new(self) -> Store:
        """A fresh store object on the same place (the same object for memory)."""
        if self.name == "memory":
            return self._memory
        return FileStore(self.path) if self.name == "file" else SQLiteStore(self.path)

    def opened(self) -> Store:
        store = self.new()
        opener = getattr(store, "open", None)
        if opener is not None:
            opener()
        return store


def close(store: Any) -> None:
    closer = getattr(store, "close", None)
    if closer is not None:
        closer()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Kind:
    return Kind(request.param, tmp_path)


@pytest.fixture(params=LOCKING_KINDS)
def locking_kind(request: pytest.FixtureRequest, tmp_path: Path) -> Kind:
    return Kind(request.param, tmp_path)


@pytest.fixture
def store(kind: Kind) -> Iterator[Store]:
    s = kind.opened()
    yield s
    close(s)


def states() -> list[State]:
    """A few real states, each a step further than the last."""
    out = [State()]
    for message in [
        CreateBackend(
            tag="a",
            target=ECHO,
            init_args=("hi", 2),
            init_kwargs={"k": [1, None]},
            config=BackendConfig(num_replicas=2, user_config={"x": 0.5}),
        ),
        ReplicaStarted(tag="a#0"),
        ReplicaStarted(tag="a#1"),
        CreateEndpoint(name="api", route="/api", methods=("GET", "POST")),
        SetTraffic(endpoint="api", traffic={"a": 1.0}),
    ]:
        out.append(step(out[-1], message).state)
    return out


def where(store: Any) -> str:
    return str(store.where)


def commit_state(store: Any, state: State, seq: int) -> None:
    """Make ``state`` the store's checkpoint ``seq``, whatever it held before."""
    records = records_of(state, seq)
    _, now = store.load()
    store.commit(seq, records, [k for k in now if k not in records])


def loaded(store: Any) -> tuple[State, int]:
    seq, records = store.load()
    return load_records(seq, records, where(store)), seq


# ---------------------------------------------------------------------------------------
# Damaged checkpoints, built from a real one


def _checksum(body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _edit(data: bytes, change: Any) -> bytes:
    envelope = json.loads(data)
    change(envelope)
    return json.dumps(envelope).encode()


def _stale_checksum(envelope: dict[str, Any]) -> None:
    envelope["state"]["replica_counter"] += 1


def _bad_format(envelope: dict[str, Any]) -> None:
    envelope["format"] = "something-else"


def _string_version(envelope: dict[str, Any]) -> None:
    envelope["version"] = "1"


def _unparseable_state(envelope: dict[str, Any]) -> None:
    envelope["state"]["replicas"]["a#0"]["status"] = "FLYING"
    envelope["checksum"] = _checksum(envelope["state"])


def _invalid_config(envelope: dict[str, Any]) -> None:
    envelope["state"]["backends"]["a"]["config"]["num_replicas"] = -1
    envelope["checksum"] = _checksum(envelope["state"])


def _too_new(envelope: dict[str, Any]) -> None:
    envelope["version"] = VERSION + 1
    envelope["checksum"] = _checksum(envelope["state"])


# A checkpoint in the format before keyed records (version 1), as files hold it today.
GOOD = encode_v1(states()[-1], 7)

CORRUPT = {
    "garbage bytes": b"\x00\xff\xfe garbage \x80",
    "empty": b"",
    "truncated JSON": GOOD[: len(GOOD) // 2],
    "one byte short": GOOD[:-1],
    "stale checksum": _edit(GOOD, _stale_checksum),
    "not an envelope": b'["servecore-checkpoint", 1]',
    "other format": _edit(GOOD, _bad_format),
    "string version": _edit(GOOD, _string_version),
    "unparseable state": _edit(GOOD, _unparseable_state),
    "invalid config": _edit(GOOD, _invalid_config),
}


# ---------------------------------------------------------------------------------------
# Save and load


def test_load_on_empty_is_nothing(store: Store) -> None:
    assert store.load() == (0, {})


def test_load_before_open_on_empty_is_nothing(kind: Kind) -> None:
    assert kind.new().load() == (0, {})


def test_commit_load_round_trip(kind: Kind, store: Store) -> None:
    for seq, state in enumerate(states(), start=1):
        commit_state(store, state, seq)
        assert loaded(store) == (state, seq)
    close(store)
    # A new store object on the same place reads the last checkpoint back.
    again = kind.opened()
    try:
        assert loaded(again) == (states()[-1], len(states()))
    finally:
        close(again)


def test_the_three_stores_agree(tmp_path: Path) -> None:
    """The same commits give the same loads, record for record, in every store."""
    seen: dict[str, list[Any]] = {}
    for name in KINDS:
        kind = Kind(name, tmp_path / name)
        store = kind.opened()
        loads = [store.load()]
        for seq, state in enumerate(states(), start=1):
            commit_state(store, state, seq)
            loads.append(store.load())
        commit_state(store, states()[2], len(states()) + 1)  # going "back" is a commit
        loads.append(store.load())
        close(store)
        reopened = kind.opened()
        loads.append(reopened.load())
        close(reopened)
        seen[name] = loads
    assert seen["memory"] == seen["file"] == seen["sqlite"]
    assert seen["memory"][0] == (0, {})


def test_file_store_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "state.json", compact_min_bytes=0)
    store.open()
    try:
        for seq, state in enumerate(states(), start=1):
            commit_state(store, state, seq)
        assert store.compactions > 0
    finally:
        store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state.json",
        "state.json.lock",
        "state.json.log",
    ]


def test_file_store_commit_is_durable_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    store = FileStore(path)
    store.open()
    store.commit(1, records_of(states()[1], 1), ())  # makes the log
    calls: list[tuple[str, str]] = []
    real_fdatasync, real_write = os.fdatasync, os.write

    def fdatasync(fd: int) -> None:
        calls.append(("fdatasync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fdatasync(fd)

    def write(fd: int, data: Any) -> int:
        calls.append(("write", os.readlink(f"/proc/self/fd/{fd}")))
        return real_write(fd, data)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "write", write)
    try:
        store.commit(2, records_of(states()[2], 2), ())
    finally:
        monkeypatch.undo()
        store.close()
    # The change set is appended to the log, and the log is synced, before commit returns.
    assert [c[0] for c in calls][-1] == "fdatasync"
    assert {c[1] for c in calls} == {str(path) + ".log"}


def test_file_store_compaction_fsyncs_then_replaces_then_fsyncs_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    store = FileStore(path, compact_min_bytes=0)
    store.open()
    store.commit(1, records_of(states()[1], 1), ())  # makes the log
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        calls.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    try:
        store.commit(2, records_of(states()[2], 2), ())
    finally:
        monkeypatch.undo()
        store.close()
    assert store.compactions == 2
    # The snapshot: a temporary file in the same directory, durable before it replaces
    # the old one, the rename durable before the log is emptied the same way.
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"] * 2
    assert Path(calls[0][1]).parent == tmp_path and Path(calls[0][1]) != path
    assert calls[1] == ("replace", str(path)) and Path(calls[2][1]) == tmp_path
    assert calls[4] == ("replace", f"{path}.log") and Path(calls[5][1]) == tmp_path
    assert loaded(FileStore(path)) == (states()[2], 2)


def test_sqlite_store_uses_wal_and_synchronous_full(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    store.open()
    try:
        commit_state(store, states()[1], 1)
        db = store._db
        assert db is not None
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert db.execute("PRAGMA user_version").fetchone()[0] == SQLiteStore.SCHEMA_VERSION
    finally:
        store.close()


# ---------------------------------------------------------------------------------------
# Corrupt and too-new checkpoints raise, naming the path


# Damage that a lenient JSON parser would let through.
NAN_IN_STATE = GOOD.replace(b'"replica_counter":', b'"replica_counter":NaN,"x":', 1)
DEEPLY_NESTED = b"[" * 100_000 + b"]" * 100_000
CORRUPT_MORE = {"NaN in state": NAN_IN_STATE, "deeply nested": DEEPLY_NESTED}


@pytest.mark.parametrize(
    "data",
    [pytest.param(CORRUPT[name], id=name) for name in sorted(CORRUPT)]
    + [pytest.param(data, id=name) for name, data in CORRUPT_MORE.items()],
)
def test_corrupt_checkpoint_raises_naming_the_store(kind: Kind, data: bytes) -> None:
    store = plant_v1(kind.name, kind.path, data)
    with pytest.raises(CheckpointCorrupt) as info:
        store.open()
        loaded(store)
    close(store)
    assert info.value.where == where(store)
    assert where(store) in str(info.value)


def test_too_new_version_raises_naming_the_store(kind: Kind) -> None:
    store = plant_v1(kind.name, kind.path, _edit(GOOD, _too_new))
    with pytest.raises(CheckpointVersionError) as info:
        store.open()
        loaded(store)
    close(store)
    err = info.value
    assert (err.where, err.found, err.supported) == (where(store), VERSION + 1, VERSION)
    assert where(store) in str(err) and str(VERSION + 1) in str(err)


def test_a_version_1_checkpoint_opens_and_is_upgraded(kind: Kind) -> None:
    store = plant_v1(kind.name, kind.path, GOOD)
    store.open()
    try:
        assert loaded(store) == (states()[-1], 7)
        commit_state(store, states()[1], 8)
    finally:
        close(store)
    again = plant_v1(kind.name, kind.path, None)  # the same place, not planted again
    again.open()
    try:
        assert loaded(again) == (states()[1], 8)
    finally:
        close(again)
    if kind.name == "file":
        assert not kind.path.read_bytes().startswith(b"{")  # a snapshot now
    if kind.name == "sqlite":
        with sqlite3.connect(kind.path) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == 2
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        db.close()
        assert "checkpoint" not in tables and "records" in tables


@pytest.mark.parametrize("damage", ["garbage bytes", "truncated JSON", "stale checksum"])
def test_file_corrupted_on_disk_raises_naming_the_path(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "state.json"
    store = FileStore(path)
    store.open()
    commit_state(store, states()[-1], 7)
    store.close()
    path.write_bytes(CORRUPT[damage])
    with pytest.raises(CheckpointCorrupt, match=re.escape(str(path))):
        FileStore(path).load()


@pytest.mark.parametrize("damage", ["garbage bytes", "truncated JSON", "stale checksum"])
def test_sqlite_version_1_row_corrupted_on_disk_raises_naming_the_path(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "state.db"
    store = plant_v1("sqlite", path, CORRUPT[damage])
    with pytest.raises(CheckpointCorrupt, match=re.escape(str(path))):
        store.open()
    store.close()
    # The upgrade was rolled back: the evidence is still there, as it was.
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT data FROM checkpoint").fetchone()[0] == CORRUPT[damage]
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.close()


def test_sqlite_record_corrupted_on_disk_raises_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    store.open()
    commit_state(store, states()[-1], 7)
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE records SET value = substr(value, 1, 20) WHERE key = 'backend/a'")
    db.close()
    store = SQLiteStore(path)
    store.open()
    try:
        with pytest.raises(CheckpointCorrupt, match=re.escape(str(path))):
            loaded(store)
    finally:
        store.close()


def test_sqlite_schema_version_too_new_raises(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SQLiteStore.SCHEMA_VERSION + 1}")
    db.close()
    for attempt in (SQLiteStore(path).open, SQLiteStore(path).load):
        with pytest.raises(CheckpointVersionError) as info:
            attempt()
        assert info.value.where == str(path) and str(path) in str(info.value)
        assert info.value.found == SQLiteStore.SCHEMA_VERSION + 1
    # The failed open released the lock: the next opener sees the same error, not
    # StoreLocked.
    with pytest.raises(CheckpointVersionError):
        SQLiteStore(path).open()


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a database" * 10,
        b"\x00" * 4096,
        b"SQLite format 3\x00",  # a header torn after 16 bytes
        GOOD,  # a FileStore checkpoint given to SQLiteStore
    ],
    ids=["text", "zeros", "torn-header", "json-checkpoint"],
)
def test_non_sqlite_file_for_sqlite_store_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(content)
    with pytest.raises(CheckpointCorrupt) as info:
        SQLiteStore(path).open()
    assert info.value.where == str(path) and str(path) in str(info.value)
    with pytest.raises(CheckpointCorrupt):
        SQLiteStore(path).load()
    # Nothing was written over the evidence.
    assert path.read_bytes() == content


def test_one_byte_file_for_sqlite_store_raises(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"x")
    store = SQLiteStore(path)
    try:
        with pytest.raises(CheckpointCorrupt):
            store.open()
    finally:
        store.close()


# ---------------------------------------------------------------------------------------
# One controller per store: the OS lock


def test_second_opener_in_this_process_is_locked_out(locking_kind: Kind) -> None:
    first = locking_kind.opened()
    try:
        second = locking_kind.new()
        with pytest.raises(StoreLocked) as info:
            second.open()
        assert info.value.where == str(locking_kind.path)
        assert str(locking_kind.path) in str(info.value)
        # Still locked after a failed attempt; the first store keeps working.
        with pytest.raises(StoreLocked):
            locking_kind.new().open()
        commit_state(first, states()[-1], 7)
        assert loaded(first) == (states()[-1], 7)
    finally:
        close(first)
    # Released on close: a new opener gets in and sees the checkpoint.
    third = locking_kind.opened()
    try:
        assert loaded(third) == (states()[-1], 7)
    finally:
        close(third)


def test_open_twice_on_one_object_is_harmless(locking_kind: Kind) -> None:
    store = locking_kind.opened()
    try:
        store.open()  # type: ignore[union-attr]
        commit_state(store, states()[-1], 7)
        with pytest.raises(StoreLocked):
            locking_kind.new().open()  # type: ignore[union-attr]
    finally:
        close(store)
    # One close releases it.
    again = locking_kind.opened()
    close(again)


_OPENER = textwrap.dedent(
    """
    import sys
    from servecore import FileStore, SQLiteStore, StoreLocked

    cls = {"file": FileStore, "sqlite": SQLiteStore}[sys.argv[1]]
    store = cls(sys.argv[2])
    try:
        store.open()
    except StoreLocked as exc:
        print("LOCKED", exc.where, flush=True)
        sys.exit(0)
    print("OPENED", flush=True)
    if sys.argv[3] == "hold":
        sys.stdin.read()  # hold the lock until the parent closes our stdin
    store.close()
    print("CLOSED", flush=True)
    """
)


def _other_process(kind: Kind, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _OPENER, kind.name, str(kind.path), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_another_process_is_locked_out(locking_kind: Kind) -> None:
    first = locking_kind.opened()
    try:
        child = _other_process(locking_kind, "once")
        out, _ = child.communicate()
        assert child.returncode == 0
        assert out.split() == ["LOCKED", str(locking_kind.path)]
    finally:
        close(first)
    child = _other_process(locking_kind, "once")
    out, _ = child.communicate()
    assert out.split() == ["OPENED", "CLOSED"]


def test_a_lock_held_by_another_process_locks_us_out_until_it_closes(
    locking_kind: Kind,
) -> None:
    with _other_process(locking_kind, "hold") as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            assert child.stdout.readline().strip() == "OPENED"
            with pytest.raises(StoreLocked):
                locking_kind.new().open()  # type: ignore[union-attr]
            child.stdin.close()
            assert child.stdout.readline().strip() == "CLOSED"
            assert child.wait() == 0
        finally:
            if child.poll() is None:
                child.kill()
    close(locking_kind.opened())


def test_a_lock_dies_with_its_process(locking_kind: Kind) -> None:
    with _other_process(locking_kind, "hold") as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "OPENED"
        child.kill()  # a crashed controller
    close(locking_kind.opened())


async def test_second_controller_on_the_same_store_is_locked_out(locking_kind: Kind) -> None:
    async with open_controller(runtime=InMemoryRuntime(), store=locking_kind.new()):
        with pytest.raises(StoreLocked, match=re.escape(str(locking_kind.path))):
            async with open_controller(runtime=InMemoryRuntime(), store=locking_kind.new()):
                raise AssertionError("a second controller got in")  # pragma: no cover
    async with open_controller(runtime=InMemoryRuntime(), store=locking_kind.new()):
        pass


# ---------------------------------------------------------------------------------------
# Through the controller


async def test_failed_save_raises_changes_nothing_and_runs_no_effect(kind: Kind) -> None:
    runtime = InMemoryRuntime()
    store = FaultyStore(inner=kind.new())
    async with open_controller(runtime=runtime, store=store) as ctl:
        await ctl.create_backend("a", ECHO, num_replicas=1)
        await ctl.create_endpoint("api", route="/api")
        await ctl.set_traffic("api", {"a": 1.0})
        state, seq, table = ctl.state, ctl.seq, ctl.routing_table
        saved = store.inner.load()
        started, stopped = list(runtime.started), list(runtime.stopped)
        for attempt in [
            lambda: ctl.create_backend("b", ECHO, num_replicas=2),  # would start replicas
            lambda: ctl.update_backend_config("a", num_replicas=0),  # would stop one
            lambda: ctl.delete_endpoint("api"),  # would only update the router
        ]:
            store.fail_next()
            with pytest.raises(CheckpointError, match="not applied") as info:
                await attempt()
            assert where(store) in str(info.value)
            assert ctl.state is state and ctl.seq == seq and ctl.routing_table is table
            assert runtime.started == started and runtime.stopped == stopped
            assert set(runtime.live) == {"a#0"}
            assert store.inner.load() == saved
        # The retry lands.
        await ctl.create_backend("b", ECHO, num_replicas=2)
        assert ctl.seq > seq and set(runtime.live) == {"a#0", "b#1", "b#2"}
        assert loaded(store.inner) == (ctl.state, ctl.seq)


def _evidence(kind: Kind, store: Any) -> Any:
    """What the planted checkpoint looks like on disk (or in memory)."""
    if kind.name == "file":
        return kind.path.read_bytes()
    if kind.name == "sqlite":
        with sqlite3.connect(kind.path) as db:
            row = db.execute("SELECT data FROM checkpoint").fetchone()
        db.close()
        return row
    return store.blob.load()


@pytest.mark.parametrize("damage", ["garbage bytes", "truncated JSON", "stale checksum"])
async def test_controller_refuses_a_corrupt_checkpoint(kind: Kind, damage: str) -> None:
    store = plant_v1(kind.name, kind.path, CORRUPT[damage])
    before = _evidence(kind, store)
    runtime = InMemoryRuntime()
    with pytest.raises(CheckpointCorrupt, match=re.escape(where(store))):
        async with open_controller(runtime=runtime, store=store):
            raise AssertionError("opened on a corrupt checkpoint")  # pragma: no cover
    # Nothing was started, and the evidence was not overwritten.
    assert runtime.started == []
    assert _evidence(kind, store) == before


async def test_controller_refuses_a_too_new_checkpoint(kind: Kind) -> None:
    store = plant_v1(kind.name, kind.path, _edit(GOOD, _too_new))
    with pytest.raises(CheckpointVersionError):
        async with open_controller(runtime=InMemoryRuntime(), store=store):
            raise AssertionError("opened on a too-new checkpoint")  # pragma: no cover


async def test_controller_opens_a_version_1_checkpoint(kind: Kind) -> None:
    old = State()
    for message in [
        CreateBackend(tag="a", target=ECHO, config=BackendConfig(num_replicas=2)),
        ReplicaStarted(tag="a#0"),
        CreateEndpoint(name="api", route="/api"),
        SetTraffic(endpoint="api", traffic={"a": 1.0}),
    ]:
        old = step(old, message).state
    store = plant_v1(kind.name, kind.path, encode_v1(old, 7))
    runtime = InMemoryRuntime()
    async with open_controller(runtime=runtime, store=store) as ctl:
        assert ctl.seq > 7
        assert dict(ctl.state.endpoints) == dict(old.endpoints)
        assert set(runtime.live) == {"a#1", "a#2"}  # a#0 is not alive: replaced
        state = ctl.state
    async with open_controller(runtime=runtime, store=plant_v1(kind.name, kind.path, None)) as ctl:
        assert ctl.state == state


async def test_controller_reopens_from_each_store(kind: Kind) -> None:
    runtime = InMemoryRuntime()
    async with open_controller(runtime=runtime, store=kind.new()) as ctl:
        await ctl.create_backend("a", ECHO, num_replicas=2)
        await ctl.create_endpoint("api")
        await ctl.set_traffic("api", {"a": 1.0})
        state = ctl.state
    async with open_controller(runtime=runtime, store=kind.new()) as ctl:
        assert ctl.state == state
        assert set(ctl.routing_table.backends["a"].replicas) == {"a#0", "a#1"}


async def test_a_callable_is_a_save_only_store() -> None:
    saved: list[bytes] = []
    runtime = InMemoryRuntime()
    async with open_controller(runtime=runtime, store=saved.append) as ctl:
        assert isinstance(ctl.store, BlobAdapter) and isinstance(ctl.store.blob, CallbackStore)
        await ctl.create_backend("a", ECHO)
        await ctl.create_endpoint("api")
        assert decode(saved[-1], "callback") == (ctl.state, ctl.seq)
        assert len(saved) == ctl.seq  # every new state went through it, in order
        assert [decode(data, "callback")[1] for data in saved] == list(range(1, ctl.seq + 1))
    # Save-only: a new controller on it starts from nothing (it has nothing to load).
    assert CallbackStore(saved.append).load() is None
    async with open_controller(runtime=InMemoryRuntime(), store=saved.append) as ctl:
        assert dict(ctl.state.backends) == {}


async def test_a_failing_callable_is_a_failed_save() -> None:
    calls: list[bytes] = []

    def callback(data: bytes) -> None:
        calls.append(data)
        if len(calls) > 1:
            raise OSError("disk full")

    runtime = InMemoryRuntime()
    async with open_controller(runtime=runtime, store=callback) as ctl:
        state = ctl.state
        with pytest.raises(CheckpointError, match="disk full"):
            await ctl.create_backend("a", ECHO)
        assert ctl.state is state and runtime.started == []


def test_store_paths_may_be_strings_and_created_directories(tmp_path: Path) -> None:
    for cls, name in [(FileStore, "state.json"), (SQLiteStore, "state.db")]:
        path = os.path.join(tmp_path, "deep", "er", name)
        store = cls(path)
        store.open()
        try:
            commit_state(store, states()[-1], 7)
            assert loaded(store) == (states()[-1], 7)
        finally:
            store.close()


# ---------------------------------------------------------------------------------------
# The lock follows the file, not the name


def _aliases(tmp_path: Path, name: str) -> dict[str, Path]:
    """Other names for ``tmp_path / "real" / name`` (which must exist)."""
    real = tmp_path / "real" / name
    (tmp_path / "link-to-file").symlink_to(real)
    (tmp_path / "link-to-dir").symlink_to(tmp_path / "real", target_is_directory=True)
    os.link(real, tmp_path / "hard-link")
    return {
        "symlinked file": tmp_path / "link-to-file",
        "symlinked directory": tmp_path / "link-to-dir" / name,
        "dotted path": tmp_path / "real" / ".." / "real" / name,
        "hard link": tmp_path / "hard-link",
    }


ALIASES = ["symlinked file", "symlinked directory", "dotted path", "hard link"]


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("first_through_alias", [False, True])
def test_an_alias_of_an_open_checkpoint_is_locked_out(
    locking_kind: Kind, tmp_path: Path, alias: str, first_through_alias: bool
) -> None:
    cls = FileStore if locking_kind.name == "file" else SQLiteStore
    real = tmp_path / "real" / locking_kind.path.name
    seed = cls(real)
    seed.open()
    commit_state(seed, states()[-1], 7)
    seed.close()
    other = _aliases(tmp_path, real.name)[alias]
    first_path, second_path = (other, real) if first_through_alias else (real, other)
    first = cls(first_path)
    first.open()
    try:
        with pytest.raises(StoreLocked) as info:
            cls(second_path).open()
        assert info.value.where == str(second_path)
        # A commit (a new inode under the name, if a FileStore compacts) keeps both
        # names locked.
        if isinstance(first, FileStore):
            first.compact_min_bytes = 0
        commit_state(first, states()[1], 8)
        with pytest.raises(StoreLocked):
            cls(second_path).open()
        with pytest.raises(StoreLocked):
            cls(first_path).open()
    finally:
        first.close()
    again = cls(first_path)
    again.open()
    try:
        assert loaded(again) == (states()[1], 8)
    finally:
        again.close()


def test_a_relative_and_an_absolute_path_are_one_store(
    locking_kind: Kind, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = FileStore if locking_kind.name == "file" else SQLiteStore
    monkeypatch.chdir(tmp_path)
    relative = cls(locking_kind.path.name)
    relative.open()
    try:
        with pytest.raises(StoreLocked):
            cls(locking_kind.path).open()
        commit_state(relative, states()[-1], 7)
    finally:
        relative.close()
    monkeypatch.chdir("/")  # the relative store keeps naming the file it was made for
    assert loaded(relative) == (states()[-1], 7)
    absolute = cls(locking_kind.path)
    absolute.open()
    try:
        assert loaded(absolute) == (states()[-1], 7)
        assert absolute.store_id == relative.store_id
    finally:
        absolute.close()


def test_a_symlinked_checkpoint_stays_a_symlink_after_commits(tmp_path: Path) -> None:
    # Committing through a symlink writes the file it points to (and its log beside
    # it), so both names keep naming one checkpoint, through compactions too.
    real = tmp_path / "real.json"
    (tmp_path / "link.json").symlink_to(real)
    store = FileStore(tmp_path / "link.json", compact_min_bytes=0)
    store.open()
    try:
        commit_state(store, states()[-1], 7)
    finally:
        store.close()
    assert (tmp_path / "link.json").is_symlink()
    assert real.read_bytes().startswith(b"servecore-snapshot")
    assert loaded(FileStore(real)) == (states()[-1], 7)


def test_store_ids_name_the_resolved_file(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    real = os.path.realpath(tmp_path / "real")
    assert FileStore(tmp_path / "link" / "s.json").store_id == f"file:{real}/s.json"
    assert SQLiteStore(tmp_path / "link" / "s.db").store_id == f"sqlite:{real}/s.db"
    assert FileStore(tmp_path / "real" / "s.json").store_id == f"file:{real}/s.json"
    memories = {MemoryStore().store_id for _ in range(3)}
    memories.add(CallbackStore(lambda data: None).store_id)
    assert len(memories) == 4
    assert all(re.fullmatch(r"memory:[0-9a-f]{32}", m) for m in memories)
    store = MemoryStore()
    assert store.store_id == store.store_id


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_files_holding_the_checkpoint_are_owner_only_even_with_umask_zero(
    tmp_path: Path,
) -> None:
    old = os.umask(0)
    try:
        file_store = FileStore(tmp_path / "state.json")
        file_store.open()
        sqlite_store = SQLiteStore(tmp_path / "state.db")
        sqlite_store.open()
        try:
            file_store.compact_min_bytes = 0
            commit_state(file_store, states()[-1], 7)
            commit_state(sqlite_store, states()[-1], 7)
            names = ["state.json", "state.json.lock", "state.json.log", "state.db", "state.db.lock"]
            for name in names:
                assert _mode(tmp_path / name) == 0o600, name
            for suffix in ["-wal", "-shm"]:
                assert _mode(tmp_path / f"state.db{suffix}") == 0o600, suffix
        finally:
            file_store.close()
            sqlite_store.close()
    finally:
        os.umask(old)


def test_an_existing_world_readable_checkpoint_is_made_owner_only(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "state.json")
    (tmp_path / "state.json").write_bytes(GOOD)
    (tmp_path / "state.json").chmod(0o644)
    store.open()
    try:
        commit_state(store, states()[-1], 8)  # upgrades the old file to a snapshot
    finally:
        store.close()
    assert _mode(tmp_path / "state.json") == 0o600
    db = SQLiteStore(tmp_path / "state.db")
    db.open()
    db.close()
    (tmp_path / "state.db").chmod(0o644)
    db.open()
    db.close()
    assert _mode(tmp_path / "state.db") == 0o600


def test_a_symlink_planted_at_the_lock_file_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "state.json.lock").symlink_to(victim)
    with pytest.raises(StoreUnwritable) as info:
        FileStore(tmp_path / "state.json").open()
    assert info.value.path == str(tmp_path / "state.json.lock")
    assert victim.read_bytes() == b"precious"


def test_a_compaction_that_fails_to_replace_leaves_the_store_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(tmp_path / "state.json")
    store.open()
    try:
        commit_state(store, states()[-1], 7)
        real_replace = os.replace

        def failing_replace(*args: Any) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "replace", failing_replace)
        store.compact_min_bytes = 0
        # The commit is durable in the log before the compaction: it is not a failure.
        commit_state(store, states()[1], 8)
        monkeypatch.setattr(os, "replace", real_replace)
        assert loaded(store) == (states()[1], 8)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "state.json",
            "state.json.lock",
            "state.json.log",
        ]
        commit_state(store, states()[2], 9)
        assert store.compactions > 0 and loaded(store) == (states()[2], 9)
        with pytest.raises(StoreLocked):
            FileStore(tmp_path / "state.json").open()
    finally:
        store.close()
    assert loaded(FileStore(tmp_path / "state.json")) == (states()[2], 9)
