"""The kit's "database hangs" fault: every store call of a script hung in turn, on each
built-in store (PostgreSQL with real hangs: a locked table, a frozen server), and the
kit catching a controller or a store that mishandles a hang (docs/design.md §7)."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import pytest

from checkpoints import MemoryBlob
from postgres_setup import postgres_or_skip, server_pids
from servecore import FileStore, MemoryStore, SQLiteStore, Store
from servecore._controller.committer import Committer
from servecore.testing import HangingStore, StoreFault, check_store_hangs

#: Calls of HANG_SCRIPT: the load at open, then one commit per command and one per batch
#: of events its starts and stops feed back.
CALLS = 11


def test_every_call_of_the_script_is_hung_on_the_memory_store() -> None:
    assert check_store_hangs(MemoryStore) == 2 * CALLS


@pytest.mark.parametrize("kind", ["file", "sqlite", "blob"])
def test_every_call_of_the_script_is_hung_on_each_store(kind: str, tmp_path: Path) -> None:
    # A call released to fail never reaches the store underneath (the memory test covers
    # that outcome); one released to land is carried out late, by the store itself.
    counter = itertools.count()

    def make() -> Store | MemoryBlob:
        path = tmp_path / str(next(counter))
        if kind == "file":
            return FileStore(path / "state.log")
        if kind == "sqlite":
            return SQLiteStore(path / "state.db")
        return MemoryBlob()

    assert check_store_hangs(make, outcomes=[True]) == CALLS


def test_the_hanging_store_counts_and_releases() -> None:
    store = HangingStore()
    store.load()
    store.hang(at=1)
    store.commit(1, {"meta": b"x"}, [])  # not this one: the one after
    assert store.labels == ["load", "commit 1"] and store.hung == 0
    released = threading.Timer(0.05, store.release, kwargs={"land": False})
    released.start()
    with pytest.raises(StoreFault, match="answered with an error"):
        store.commit(2, {"meta": b"y"}, [])
    assert store.hung == 1 and store.inner.load()[0] == 1 and not store.hanging
    store.commit(3, {"meta": b"z"}, [])  # released: disarmed
    with pytest.raises(ValueError):
        store.hang(at=-1)
    with pytest.raises(TypeError, match="both freeze and thaw"):
        HangingStore(freeze=lambda: None)


# -- PostgreSQL: a real hang -----------------------------------------------------------


def test_every_call_of_the_script_is_hung_on_postgres(postgres_server: Any) -> None:
    """The medium really hangs: another session holds an exclusive lock on the records
    table, so the store's own lock_timeout answers (it refused the write: nothing
    landed), and the lock is let go when released."""
    postgres_or_skip()
    import psycopg

    from servecore import PostgresStore

    counter = itertools.count()
    locker: list[Any] = []

    def freeze() -> None:
        conn = psycopg.connect(postgres_server.dsn)
        conn.execute("LOCK TABLE servecore_records IN ACCESS EXCLUSIVE MODE")
        locker.append(conn)

    def thaw() -> None:
        while locker:
            conn = locker.pop()
            conn.rollback()
            conn.close()

    def make() -> HangingStore:
        store = PostgresStore(
            postgres_server.dsn,
            checkpoint=f"hang-{next(counter)}",
            lease_s=30,
            call_timeout_s=0.5,
            connect_timeout_s=2,
        )
        return HangingStore(store.records, freeze=freeze, thaw=thaw)

    try:
        assert check_store_hangs(make, store_call_timeout_s=10.0) == CALLS
    finally:
        thaw()


def test_every_call_of_the_script_is_hung_on_a_frozen_postgres() -> None:
    """The whole server is frozen (SIGSTOP): the store's own deadline gives up on the
    call, and the write it had sent lands when the server resumes (thaw: SIGCONT). The
    controller learns that from the store before its next commit, adopts the write and
    carries it out, so later commands work without a reopen."""
    postgres_or_skip()
    import os
    import signal

    from servecore import PostgresStore
    from servecore.testing.postgres import PostgresServer

    counter = itertools.count()
    stopped: list[int] = []

    with PostgresServer() as server:

        def freeze() -> None:
            for pid in server_pids(server):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)

        def thaw() -> None:
            while stopped:
                os.kill(stopped.pop(), signal.SIGCONT)

        def make() -> HangingStore:
            store = PostgresStore(
                server.dsn,
                checkpoint=f"frozen-{next(counter)}",
                lease_s=30,
                call_timeout_s=0.5,
                connect_timeout_s=2,
            )
            return HangingStore(store.records, freeze=freeze, thaw=thaw)

        # Not the calls of opening (the load, and the commit of the runtime record):
        # opening fails, and a store closed while the server is frozen cannot give its
        # lease back, so the kit's second open would meet that lease for lease_s (the
        # locked-table test above covers those calls).
        try:
            assert check_store_hangs(make, store_call_timeout_s=10.0, points=range(2, CALLS)) == (
                CALLS - 2
            )
        finally:
            thaw()


# -- the kit catches what mishandles a hang ----------------------------------------------


def test_the_kit_catches_a_controller_that_waits_for_ever(monkeypatch) -> None:
    bounded = Committer.call

    async def unbounded(self: Committer, *args: Any, **kwargs: Any) -> Any:
        self.call_timeout_s = math.inf  # the controller as it was before the deadline
        return await bounded(self, *args, **kwargs)

    monkeypatch.setattr(Committer, "call", unbounded)
    with pytest.raises(AssertionError) as info:
        check_store_hangs(MemoryStore, points=[2], outcomes=[False], bound_s=2.0)
    text = str(info.value)
    assert "store call 2 of 11 (commit 2)" in text
    assert "did not end within 2s" in text and "does not bound its store calls" in text


def test_the_kit_catches_a_controller_that_ignores_a_late_landing(monkeypatch) -> None:
    monkeypatch.setattr(Committer, "_heed_late", lambda self: setattr(self, "_unanswered", None))
    with pytest.raises(AssertionError) as info:
        check_store_hangs(MemoryStore, points=[3], outcomes=[True])
    assert "landed when the store answered, but the controller did not adopt it" in str(info.value)


class _TornWhenThawed:
    """A broken store: a commit the medium held, once it answers, keeps part of its
    change set and raises (a store must raise having changed nothing)."""

    where = "torn-when-thawed"

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.frozen = threading.Event()
        self.thawed = threading.Event()

    def load(self) -> tuple[int, Mapping[str, bytes]]:
        return self.inner.load()

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        if self.frozen.is_set():
            self.frozen.clear()
            self.thawed.wait(30)
            first = dict(sorted(puts.items())[:1])  # an endpoint or a backend, not meta
            self.inner.commit(self.inner.seq, first, [])
            raise OSError("the database timed out")
        self.inner.commit(seq, puts, deletes)


def test_the_kit_catches_a_store_that_keeps_part_of_a_failed_commit() -> None:
    def make() -> HangingStore:
        torn = _TornWhenThawed()
        return HangingStore(torn, freeze=torn.frozen.set, thaw=torn.thawed.set)

    with pytest.raises(AssertionError) as info:
        check_store_hangs(make, points=[2], store_call_timeout_s=0.2)
    text = str(info.value)
    assert "store call 2 of 11 (commit 2) hung" in text
    assert "recovered" in text or "reopening" in text, text
