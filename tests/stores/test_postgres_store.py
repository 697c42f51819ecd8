"""PostgresStore: the store-agreement tests every store passes, the crash-consistency
machine, and its lease (one holder at a time, epochs that only grow, fencing).

Runs against a private PostgreSQL server started for the session (see conftest.py).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_stores as agreement
import trio
from hypothesis import settings
from test_stores import CORRUPT, GOOD, _edit, _too_new, commit_state, loaded, states

from checkpoints import encode_v1
from postgres_setup import postgres_or_skip, server_pids
from servecore import (
    BackendConfig,
    BlobAdapter,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointOutcomeUnknown,
    CheckpointVersionError,
    CreateBackend,
    CreateEndpoint,
    LeaseLost,
    MemoryStore,
    PostgresStore,
    SetTraffic,
    State,
    StoreAccessDenied,
    StoreLocked,
    open_controller,
    step,
)
from servecore._core.records import decode, encode
from servecore.stores.postgres import BLOB_KEY, SCHEMA_VERSION, PostgresRecords
from servecore.testing import CrashConsistencyMachine, CrashWorld, InMemoryRuntime
from servecore.testing.postgres import PostgresServer

try:
    import psycopg
except ImportError:  # without the postgres extra there is nothing to test here
    postgres_or_skip(module=True)

ECHO = "servecore.testing.targets:Echo"
#: Short, so that tests of expiry wait little; renewals every third of it.
LEASE_S = 1.0


class PostgresKind:
    """Makes stores on one checkpoint, as test_stores' ``Kind`` does for the file stores
    (``new``, ``opened``, ``path``, ``name``): ``PostgresStore(...).records``, the keyed
    path the controller takes. ``blob`` makes the bare store (its whole-blob interface).
    Closes them all at the end."""

    name = "postgres"

    def __init__(self, server: PostgresServer, checkpoint: str) -> None:
        self.dsn = server.dsn
        self.checkpoint = checkpoint
        self.made: list[PostgresStore] = []
        self.path = self.blob().where  # what error messages name, as a path does

    def blob(self, **kwargs: Any) -> PostgresStore:
        kwargs.setdefault("lease_s", LEASE_S)
        store = PostgresStore(self.dsn, checkpoint=self.checkpoint, **kwargs)
        self.made.append(store)
        return store

    def new(self, **kwargs: Any) -> PostgresRecords:
        return self.blob(**kwargs).records

    def opened(self, **kwargs: Any) -> PostgresRecords:
        records = self.new(**kwargs)
        records.open()
        return records

    def opened_blob(self, **kwargs: Any) -> PostgresStore:
        store = self.blob(**kwargs)
        store.open()
        return store

    def close_all(self) -> None:
        for store in self.made:
            store.close()


@pytest.fixture
def kind(postgres_server: PostgresServer, checkpoint_name: str) -> Iterator[PostgresKind]:
    k = PostgresKind(postgres_server, checkpoint_name)
    yield k
    k.close_all()


locking_kind = kind


@pytest.fixture
def store(kind: PostgresKind) -> PostgresRecords:
    return kind.opened()


# The store-agreement tests of test_stores, run on PostgresStore's records as they are.
test_load_on_empty_is_nothing = agreement.test_load_on_empty_is_nothing
test_load_before_open_on_empty_is_nothing = agreement.test_load_before_open_on_empty_is_nothing
test_commit_load_round_trip = agreement.test_commit_load_round_trip
test_second_opener_in_this_process_is_locked_out = (
    agreement.test_second_opener_in_this_process_is_locked_out
)
test_open_twice_on_one_object_is_harmless = agreement.test_open_twice_on_one_object_is_harmless
test_second_controller_on_the_same_store_is_locked_out = (
    agreement.test_second_controller_on_the_same_store_is_locked_out
)
test_failed_save_raises_changes_nothing_and_runs_no_effect = (
    agreement.test_failed_save_raises_changes_nothing_and_runs_no_effect
)
test_controller_reopens_from_each_store = agreement.test_controller_reopens_from_each_store


def test_postgres_agrees_with_the_memory_store(kind: PostgresKind) -> None:
    """The same commits give the same loads, record for record, as in every other store."""

    def run(make: Any) -> list[Any]:
        store = make()
        getattr(store, "open", lambda: None)()
        loads = [store.load()]
        for seq, state in enumerate(states(), start=1):
            commit_state(store, state, seq)
            loads.append(store.load())
        commit_state(store, states()[2], len(states()) + 1)
        loads.append(store.load())
        getattr(store, "close", lambda: None)()
        again = make()
        loads.append(again.load())
        return loads

    memory = MemoryStore()
    assert run(kind.new) == run(lambda: memory)


# ---------------------------------------------------------------------------------------
# Checkpoints saved whole (the blob interface, and the controllers before keyed records)


@pytest.mark.parametrize("damage", ["garbage bytes", "truncated JSON", "stale checksum"])
def test_a_corrupt_blob_checkpoint_raises_naming_the_store(kind: PostgresKind, damage: str) -> None:
    kind.blob().save(CORRUPT[damage])
    with pytest.raises(CheckpointCorrupt) as info:
        loaded(kind.opened())
    assert info.value.where == kind.path and kind.path in str(info.value)


def test_a_too_new_blob_checkpoint_raises_naming_the_store(kind: PostgresKind) -> None:
    kind.blob().save(_edit(GOOD, _too_new))
    with pytest.raises(CheckpointVersionError) as info:
        loaded(kind.opened())
    assert info.value.where == kind.path


def _served() -> State:
    state = State()
    for message in [
        CreateBackend(tag="a", target=ECHO, config=BackendConfig(num_replicas=2)),
        CreateEndpoint(name="api", route="/api"),
        SetTraffic(endpoint="api", traffic={"a": 1.0}),
    ]:
        state = step(state, message).state
    return state


@pytest.mark.parametrize("version", [1, 2])
async def test_a_checkpoint_saved_whole_opens_and_is_replaced_by_records(
    kind: PostgresKind, version: int
) -> None:
    """What a controller saved through the blob interface opens; its first commit
    turns it into records, and it opens again from those."""
    old = _served()
    writer = kind.blob()
    for _ in range(3):  # the store's own sequence number runs ahead of the blob's
        writer.save(encode_v1(old, 1) if version == 1 else encode(old, 1))
    runtime = InMemoryRuntime()
    async with open_controller(runtime=runtime, store=kind.blob()) as ctl:
        assert dict(ctl.state.endpoints) == dict(old.endpoints)
        assert set(ctl.state.backends) == {"a"}
        assert set(runtime.live) == {"a#0", "a#1"}
        await ctl.create_endpoint("more")
        state = ctl.state
    seq, records = kind.new().load()
    assert BLOB_KEY not in records and "endpoint/more" in records
    async with open_controller(runtime=runtime, store=kind.blob()) as ctl:
        assert ctl.state == state and ctl.seq > seq  # (its recovery commits too)


async def test_the_bare_store_runs_a_controller_through_the_blob_adapter(
    kind: PostgresKind,
) -> None:
    runtime = InMemoryRuntime()
    async with open_controller(runtime=runtime, store=BlobAdapter(kind.blob())) as ctl:
        await ctl.create_backend("a", ECHO, num_replicas=2)
        state = ctl.state
    saved, _seq = decode(kind.blob().load() or b"", kind.path)
    assert saved == state
    async with open_controller(runtime=runtime, store=BlobAdapter(kind.blob())) as ctl:
        assert ctl.state == state


# ---------------------------------------------------------------------------------------
# The keyed protocol


def test_records_round_trip_atomically_with_their_sequence_number(kind: PostgresKind) -> None:
    records = kind.opened_blob().records
    assert isinstance(records, PostgresRecords)
    assert records.load() == (0, {})
    records.commit(1, {"counter": b"1", "backend/a": b"A", "replica/a#0": b"r0"}, [])
    records.commit(2, {"replica/a#1": b"r1", "counter": b"2"}, ["replica/a#0"])
    records.commit(3, {"replica/a#2": b"r2"}, ["replica/a#1"])  # one put and a delete
    records.commit(4, {}, ["replica/a#2"])  # deletes only
    records.commit(5, {"replica/a#1": b"r1"}, [])  # one put
    records.commit(6, {}, [])  # nothing but the sequence number
    expected = (6, {"counter": b"2", "backend/a": b"A", "replica/a#1": b"r1"})
    assert records.load() == expected
    # A commit that fails (here: a key both put and deleted) applies none of itself.
    with pytest.raises(ValueError, match="puts writes too"):
        records.commit(7, {"backend/a": b"B"}, ["backend/a"])
    assert records.load() == expected
    records.close()
    assert kind.blob().records.load() == expected  # read back by another store object


def test_a_commit_that_does_not_move_the_sequence_forward_writes_nothing(
    kind: PostgresKind,
) -> None:
    """A commit whose answer was lost but which landed must not be built upon: the next
    commit at the same sequence number is refused, naming the way out."""
    store = kind.opened_blob()
    store.commit_records(5, {"a": b"1"}, [])
    with pytest.raises(CheckpointError, match="reopen") as info:
        store.commit_records(5, {"b": b"2"}, ["a"])
    assert not isinstance(info.value, LeaseLost)
    assert store.load_records() == (5, {"a": b"1"})


# ---------------------------------------------------------------------------------------
# Schema


def test_schema_is_created_once_and_versioned(postgres_server: PostgresServer) -> None:
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        PostgresStore(postgres_server.dsn, checkpoint="schema-probe").load()
        rows = conn.execute("SELECT version FROM servecore_schema").fetchall()
        assert rows == [(SCHEMA_VERSION,)]


def test_a_database_with_a_newer_schema_is_refused(postgres_server: PostgresServer) -> None:
    """A database written by a newer servecore raises, naming it; nothing is written."""
    with psycopg.connect(postgres_server.dsn, autocommit=True) as admin:
        admin.execute("CREATE DATABASE newer")
    dsn = postgres_server.dsn.rsplit("/", 1)[0] + "/newer"
    PostgresStore(dsn).load()  # creates the schema
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE servecore_schema SET version = %s", (SCHEMA_VERSION + 1,))
    store = PostgresStore(dsn)
    for attempt in (store.load, store.open, lambda: store.save(GOOD)):
        with pytest.raises(CheckpointVersionError) as info:
            attempt()
        assert info.value.found == SCHEMA_VERSION + 1 and "newer" in info.value.where
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM servecore_records").fetchone() == (0,)


def test_messages_never_show_the_password(postgres_server: PostgresServer) -> None:
    dsn = postgres_server.dsn.replace("postgres@", "postgres:s3cret@")
    store = PostgresStore(dsn, checkpoint="pw")
    assert "s3cret" not in store.where + repr(store) + store.store_id


def test_an_unreachable_server_is_a_checkpoint_error_naming_it() -> None:
    store = PostgresStore("postgresql://nobody@127.0.0.1:1/none", connect_timeout_s=1)
    with pytest.raises(CheckpointError, match=re.escape("127.0.0.1:1/none")) as info:
        store.open()
    assert "up and reachable" in str(info.value)


def test_a_standby_outlasts_an_unreachable_database() -> None:
    """A bounded standby wait on a database that is down ends as a wait (StoreLocked
    saying why), not as a failure: a standby keeps waiting through an outage."""
    store = PostgresStore("postgresql://nobody@127.0.0.1:1/none", connect_timeout_s=1)
    with pytest.raises(StoreLocked, match="cannot be reached"):
        store.open(standby=True, timeout_s=0.3)


def test_store_ids_name_the_database_and_checkpoint(kind: PostgresKind) -> None:
    a, b = kind.blob(), kind.blob()
    other = PostgresStore(kind.dsn, checkpoint=kind.checkpoint + "-other")
    assert a.store_id == b.store_id != other.store_id
    assert a.store_id.startswith("postgres:127.0.0.1:") and kind.checkpoint in a.store_id


@pytest.mark.parametrize("key", [b"bytes", 3, "nul\x00inside"])
def test_record_keys_are_strings_without_nul(kind: PostgresKind, key: Any) -> None:
    store = kind.opened_blob()
    with pytest.raises(ValueError, match="key"):
        store.commit_records(1, {key: b"v"}, [])
    assert store.load_records() == (0, {})


# ---------------------------------------------------------------------------------------
# The lease


def _lease_row(kind: PostgresKind) -> tuple[Any, ...]:
    with psycopg.connect(kind.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT holder, epoch, expires_at > now() FROM servecore_leases WHERE checkpoint = %s",
            (kind.checkpoint,),
        ).fetchone()
    assert row is not None
    return tuple(row)


def test_the_lease_names_its_holder_and_epochs_only_grow(kind: PostgresKind) -> None:
    epochs = []
    for n in range(3):
        store = kind.opened_blob(holder=f"controller-{n}")
        holder, epoch, live = _lease_row(kind)
        assert (holder, epoch, live) == (f"controller-{n}", store.epoch, True)
        epochs.append(epoch)
        store.close()
        assert _lease_row(kind)[0] is None  # released: the next opener gets in at once
    assert epochs == sorted(set(epochs)) and len(epochs) == 3


def test_the_lease_is_renewed_while_open(kind: PostgresKind) -> None:
    """Held for several lease durations without a write: the renewer keeps it."""
    store = kind.opened_blob(lease_s=2 * LEASE_S)  # tolerates a renewer late by a second
    second = kind.blob()
    for _ in range(6):  # three seconds: longer than the lease
        threading.Event().wait(LEASE_S / 2)
        with pytest.raises(StoreLocked, match="lease held by"):
            second.open()
    store.save(GOOD)
    assert store.load() == GOOD


def test_a_standby_waits_for_the_lease_then_takes_it_with_the_next_epoch(
    kind: PostgresKind,
) -> None:
    leader = kind.opened_blob(holder="leader", lease_s=2 * LEASE_S)
    leader.save(GOOD)
    leader_epoch = leader.epoch or 0
    with pytest.raises(StoreLocked):
        kind.blob().open(standby=True, timeout_s=LEASE_S / 4)  # a bounded wait gives up
    standby = kind.blob(holder="standby")
    took = threading.Event()

    def wait() -> None:
        standby.open(standby=True)
        took.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        assert not took.wait(LEASE_S * 3)  # the leader renews: the standby keeps waiting
        leader.close()
        assert took.wait(30)
    finally:
        waiter.join(30)
    assert standby.epoch is not None and standby.epoch > leader_epoch
    assert _lease_row(kind)[:2] == ("standby", standby.epoch)
    assert standby.load() == GOOD


def test_a_holder_whose_lease_was_taken_writes_nothing(kind: PostgresKind) -> None:
    """Fencing: a paused holder (its renewer stopped, as SIGSTOP would) loses the lease
    to a standby; its writes then raise LeaseLost and change nothing, blob or keyed."""
    old = kind.opened_blob(holder="old")
    old.save(GOOD)
    old_epoch = old.epoch
    assert old._lease is not None
    old._lease.stop.set()  # the renewer stops, as in a paused process
    new = kind.blob(holder="new")
    new.open(standby=True, timeout_s=30)
    assert new.epoch is not None and old_epoch is not None and new.epoch > old_epoch
    new.save(b"new")
    for write in (lambda: old.save(b"stale"), lambda: old.commit_records(10**6, {"x": b"1"}, [])):
        with pytest.raises(LeaseLost) as info:
            write()
        err = info.value
        assert (err.holder, err.epoch, err.new_holder, err.new_epoch) == (
            old.holder,
            old_epoch,
            "new",
            new.epoch,
        )
        assert "nothing was written" in str(err) and kind.path in str(err)
    assert new.load() == b"new"
    assert new.load_records()[1] == {BLOB_KEY: b"new"}


def test_a_lost_lease_seen_by_the_renewer_fails_the_next_write_at_once(
    kind: PostgresKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = kind.opened_blob(holder="old")
    # Another holder takes the lease behind the renewer's back (an operator, a standby
    # that saw it expire): the renewer's next round finds it gone.
    with psycopg.connect(kind.dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE servecore_leases SET holder = 'usurper', epoch = epoch + 1 "
            "WHERE checkpoint = %s",
            (kind.checkpoint,),
        )
    lease = old._lease
    assert lease is not None and lease.thread is not None
    lease.thread.join(30)  # the renewer ends once it sees the lease taken
    assert lease.lost_to == ("usurper", (old.epoch or 0) + 1)
    # No round trip: a write that reached the database would fail differently.
    monkeypatch.setattr(old, "_connection", lambda: pytest.fail("went to the database"))
    with pytest.raises(LeaseLost, match="usurper"):
        old.save(GOOD)


def test_a_save_without_open_is_refused_while_someone_holds_the_lease(
    kind: PostgresKind,
) -> None:
    holder = kind.opened_blob()
    with pytest.raises(StoreLocked):
        kind.blob().save(b"sneaky")
    holder.save(GOOD)
    epoch = holder.epoch
    holder.close()
    kind.blob().save(b"after")  # nobody holds it: a one-statement lease, given back
    assert kind.blob().load() == b"after"
    assert _lease_row(kind)[1] == (epoch or 0) + 1  # ...which fences out older holders


async def test_a_fenced_controller_raises_lease_lost_and_runs_no_effect(
    kind: PostgresKind,
) -> None:
    runtime = InMemoryRuntime()
    store = kind.blob(holder="old")
    async with open_controller(runtime=runtime, store=store, resync_interval_s=None) as ctl:
        await ctl.create_backend("a", ECHO, num_replicas=1)
        state, started = ctl.state, list(runtime.started)
        assert store._lease is not None
        store._lease.stop.set()  # paused: no more renewals
        taker = kind.blob(holder="new")
        await trio.to_thread.run_sync(lambda: taker.open(standby=True, timeout_s=30))
        with pytest.raises(LeaseLost):
            await ctl.create_backend("b", ECHO, num_replicas=2)
        assert ctl.state is state and runtime.started == started
        # Known lost now: the next command fails the same way, at once.
        with pytest.raises(LeaseLost):
            await ctl.update_backend_config("a", num_replicas=3)
        assert runtime.started == started
    saved, _seq = loaded(taker.records)
    assert set(saved.backends) == {"a"} and set(saved.replicas) == {"a#0"}


async def test_open_controller_standby_takes_over_when_the_leader_closes(
    kind: PostgresKind,
) -> None:
    runtime = InMemoryRuntime()
    order: list[str] = []

    async def standby() -> None:
        async with open_controller(
            runtime=runtime, store=kind.blob(holder="standby"), standby=True
        ) as ctl:
            order.append("standby serves")
            assert set(ctl.state.replicas) == {"a#0", "a#1"}
            await ctl.update_backend_config("a", num_replicas=1)

    async with (
        trio.open_nursery() as nursery,
        open_controller(
            runtime=runtime, store=kind.blob(holder="leader", lease_s=2 * LEASE_S)
        ) as leader,
    ):
        await leader.create_backend("a", ECHO, num_replicas=2)
        nursery.start_soon(standby)
        await trio.sleep(LEASE_S * 2.5)  # longer than its lease: the leader renews it
        order.append("leader closes")
    assert order == ["leader closes", "standby serves"]


async def test_a_cancelled_standby_leaves_no_waiter_behind(kind: PostgresKind) -> None:
    leader = kind.opened_blob(holder="leader")
    with trio.move_on_after(LEASE_S / 2):
        async with open_controller(
            runtime=InMemoryRuntime(), store=kind.blob(holder="quitter"), standby=True
        ):
            raise AssertionError("got the lease while the leader held it")  # pragma: no cover
    leader.close()
    await trio.sleep(LEASE_S)
    # Nobody took the lease after the standby gave up: it is free for the next opener.
    assert _lease_row(kind)[0] is None
    kind.opened_blob(holder="next")


async def test_standby_needs_a_store_that_can_wait(tmp_path: Path) -> None:
    from servecore import InvalidConfig, SQLiteStore

    with pytest.raises(InvalidConfig, match="PostgresStore"):
        async with open_controller(
            runtime=InMemoryRuntime(), store=SQLiteStore(tmp_path / "s.db"), standby=True
        ):
            pass  # pragma: no cover


# ---------------------------------------------------------------------------------------
# The crash-consistency machine


class PostgresCrashes(CrashConsistencyMachine):
    dsn = ""

    def make_store(self) -> PostgresStore:
        return PostgresStore(self.dsn, checkpoint=f"crash-{uuid.uuid4().hex[:12]}")


def test_postgres_crash_consistency_machine(postgres_server: PostgresServer) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    PostgresCrashes.dsn = postgres_server.dsn
    run_state_machine_as_test(
        PostgresCrashes, settings=settings(max_examples=25, stateful_step_count=15)
    )


@pytest.mark.parametrize("whole", [False, True], ids=["records", "blob adapter"])
def test_every_crash_point_of_a_script_recovers_on_postgres(
    postgres_server: PostgresServer, whole: bool
) -> None:
    from crash_script import SCRIPT
    from servecore.testing import enumerate_crashes

    def make_world() -> CrashWorld:
        store = PostgresStore(postgres_server.dsn, checkpoint=f"script-{uuid.uuid4().hex[:12]}")
        return CrashWorld(BlobAdapter(store) if whole else store)

    assert enumerate_crashes(make_world, SCRIPT[:4]) >= 16


def test_without_psycopg_the_store_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)  # what a missing package looks like
    with pytest.raises(ImportError, match=re.escape("servecore[postgres]")):
        PostgresStore("postgresql://localhost/x")


class _AnswerLost:
    """A connection whose next statement runs but whose answer never arrives (the link
    broke after the server committed), or, with ``runs=False``, never reaches the server."""

    def __init__(self, conn: Any, *, runs: bool) -> None:
        self.conn, self.runs = conn, runs
        self.info = conn.info
        self.closed = False

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if self.runs:
            self.conn.execute(*args, **kwargs)
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    def close(self) -> None:
        self.conn.close()


@pytest.mark.parametrize("runs", [True, False], ids=["landed", "never-sent"])
def test_a_write_whose_answer_was_lost_is_checked_on_a_new_connection(
    kind: PostgresKind, runs: bool
) -> None:
    store = kind.opened_blob()
    store.save(GOOD)
    store._conn = _AnswerLost(store._connection(), runs=runs)  # type: ignore[assignment]
    if runs:
        store.save(b"new")  # it landed: the save succeeds
        assert store.load() == b"new"
    else:
        with pytest.raises(CheckpointError, match="it did not land"):
            store.save(b"new")
        assert store.load() == GOOD
    store.save(b"after")  # and the store goes on, on a new connection
    assert kind.blob().load() == b"after"


# ---------------------------------------------------------------------------------------
# Faults at the edges: the epoch as the only fence, vanished records, a wrong password,
# a restarted and a hung database


def test_a_restarted_holder_reusing_its_name_is_fenced_by_the_epoch(kind: PostgresKind) -> None:
    """A pod restarted under the same name: the holder check passes, the epoch must not."""
    old = kind.opened_blob(holder="pod-0")
    old.save(GOOD)
    assert old._lease is not None
    old._lease.stop.set()  # paused, as SIGSTOP would
    new = kind.blob(holder="pod-0")
    new.open(standby=True, timeout_s=30)
    assert new.epoch is not None and old.epoch is not None and new.epoch > old.epoch
    new.save(b"new")
    for write in (lambda: old.save(b"stale"), lambda: old.commit_records(10**6, {"x": b"1"}, [])):
        with pytest.raises(LeaseLost) as info:
            write()
        assert (info.value.holder, info.value.new_holder) == ("pod-0", "pod-0")
        assert info.value.new_epoch == new.epoch
    assert new.load_records()[1] == {BLOB_KEY: b"new"}


async def test_a_checkpoint_whose_records_vanished_is_corrupt(kind: PostgresKind) -> None:
    store = kind.opened()
    commit_state(store, agreement.states()[3], 5)
    store.close()
    with psycopg.connect(kind.dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM servecore_records WHERE checkpoint = %s", (kind.checkpoint,))
    runtime = InMemoryRuntime()
    with pytest.raises(CheckpointCorrupt, match="holds no records"):
        async with open_controller(runtime=runtime, store=kind.new()):
            pass
    assert not runtime.started and not runtime.live  # nothing started, nothing stopped


def test_a_standby_with_a_wrong_password_fails_at_once_naming_the_user(
    postgres_server: PostgresServer,
) -> None:
    hba = postgres_server.data / "pg_hba.conf"
    rule = "host all servecore_pw 127.0.0.1/32 scram-sha-256\n"
    if not hba.read_text().startswith(rule):
        hba.write_text(rule + hba.read_text())
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(
            "DO $$ BEGIN CREATE ROLE servecore_pw LOGIN PASSWORD 'right'; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )
        conn.execute("SELECT pg_reload_conf()")
    dsn = f"postgresql://servecore_pw:wr0ng@127.0.0.1:{postgres_server.port}/postgres"
    store = PostgresStore(dsn, checkpoint="pw")
    with pytest.raises(StoreAccessDenied) as info:
        store.open(standby=True)  # no timeout: it must not wait for ever
    text = str(info.value)
    assert "servecore_pw@127.0.0.1" in text and "wr0ng" not in text
    assert "password authentication failed" in text


async def test_a_hung_database_fails_a_command_within_the_deadline_and_frees_the_store() -> None:
    postgres_or_skip()
    with PostgresServer() as server:
        store = PostgresStore(server.dsn, lease_s=30, call_timeout_s=1.0, connect_timeout_s=2)
        runtime = InMemoryRuntime()
        async with open_controller(runtime=runtime, store=store, resync_interval_s=None) as ctl:
            await ctl.create_backend("a", ECHO, num_replicas=1)
            state = ctl.state
            pids = server_pids(server)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                with trio.fail_after(60):  # a guard against hanging for ever, not a timing
                    with pytest.raises(CheckpointOutcomeUnknown) as info:
                        await ctl.create_backend("b", ECHO, num_replicas=1)
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            # It says what it does not know (the write was sent), and how to find out.
            assert "within 1s" in str(info.value) and "read_state" in str(info.value)
            assert ctl.state is state and set(runtime.live) == {"a#0"}
            # The store is free again: it answers as soon as the server does.
            seq, _ = await trio.to_thread.run_sync(store.load_records)
            assert seq >= 3
        # Reopened, the controller carries on from whatever landed.
        store = PostgresStore(server.dsn, lease_s=30, call_timeout_s=1.0)
        async with open_controller(runtime=runtime, store=store, resync_interval_s=None) as ctl:
            await ctl.create_backend("c", ECHO, num_replicas=1)
            assert {"a", "c"} <= set(ctl.state.backends)


async def test_after_a_frozen_database_the_next_command_works_without_a_reopen() -> None:
    """The write sent to a frozen server lands when it resumes, after the store gave up
    on it (CheckpointOutcomeUnknown): the controller asks the store before its next
    commit, so that commit does not reuse the sequence number and is not refused."""
    postgres_or_skip()
    with PostgresServer() as server:
        store = PostgresStore(server.dsn, lease_s=30, call_timeout_s=1.0, connect_timeout_s=2)
        runtime = InMemoryRuntime()
        async with open_controller(runtime=runtime, store=store, resync_interval_s=None) as ctl:
            await ctl.create_backend("a", ECHO, num_replicas=1)
            pids = server_pids(server)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                with trio.fail_after(60), pytest.raises(CheckpointOutcomeUnknown):
                    await ctl.create_backend("b", ECHO, num_replicas=1)
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            assert "b" not in ctl.state.backends and set(runtime.live) == {"a#0"}
            with trio.fail_after(60):
                await ctl.create_endpoint("after")  # no reopen: the store is asked first
                await ctl.settle()
            fresh = PostgresStore(server.dsn, lease_s=30).records
            state, seq = await trio.to_thread.run_sync(loaded, fresh)
            assert seq == ctl.seq
            assert set(state.backends) == set(ctl.state.backends)
            assert set(state.endpoints) == set(ctl.state.endpoints) == {"after"}
            # All or nothing, and its effects once: the frozen server had the write, so
            # it landed when it resumed (unless its process was ended first).
            landed = "b" in ctl.state.backends
            assert sorted(runtime.started) == (["a#0", "b#1"] if landed else ["a#0"])
            assert sorted(runtime.live) == sorted(runtime.started)
            await ctl.create_backend("c", ECHO, num_replicas=1)
        again = PostgresStore(server.dsn, lease_s=30).records
        assert {"a", "c"} <= set(loaded(again)[0].backends)


async def test_the_first_command_after_a_database_restart_succeeds() -> None:
    postgres_or_skip()
    with PostgresServer() as server:
        store = PostgresStore(server.dsn, lease_s=30)
        async with open_controller(
            runtime=InMemoryRuntime(), store=store, resync_interval_s=None
        ) as ctl:
            await ctl.create_backend("a", ECHO, num_replicas=1)
            server.stop()
            server.start()
            await ctl.create_backend("b", ECHO, num_replicas=1)  # a dead connection, replaced
            assert set(ctl.state.backends) == {"a", "b"}
        again = PostgresStore(server.dsn, lease_s=30).records
        assert set(loaded(again)[0].backends) == {"a", "b"}


def test_a_commit_notifies_listeners_and_a_fenced_write_does_not(kind: PostgresKind) -> None:
    """A notification means a commit: it is sent by the write's own statement, for its
    checkpoint only, and a write the fence refused sends none."""
    old = kind.opened_blob(holder="old")
    listener = kind.blob().listen_for_commits()
    other = PostgresStore(kind.dsn, checkpoint=f"{kind.checkpoint}-other", lease_s=LEASE_S)
    kind.made.append(other)
    try:
        assert listener.wait(0.1) is True  # listening anew: whatever came before is unknown
        assert listener.wait(0.2) is False
        old.commit_records(1, {"a": b"1"}, [])
        assert listener.wait(5) is True
        other.save(b"elsewhere")  # another checkpoint's commit is not this one's
        assert listener.wait(0.5) is False
        old_epoch = old.epoch
        assert old._lease is not None
        old._lease.stop.set()  # paused, as SIGSTOP would: a standby takes over
        new = kind.blob(holder="new")
        new.open(standby=True, timeout_s=30)
        with pytest.raises(LeaseLost):
            old.commit_records(2, {"a": b"stale"}, [])
        assert listener.wait(0.5) is False
        committed = kind.blob().load_committed()
        assert (committed.seq, committed.records) == (1, {"a": b"1"})
        assert old_epoch is not None and committed.epoch == new.epoch == old_epoch + 1
        new.commit_records(2, {"a": b"2"}, ["b"])
        assert listener.wait(5) is True
    finally:
        listener.close()
