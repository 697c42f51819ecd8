"""Storage faults that must never lose an acknowledged commit silently (docs/design.md §3).

A damaged length field, a frame missing from the middle of the log, a database locked by
another process, a directory that cannot be written, a checkpoint whose records vanished
under its sequence number: each either opens with every acknowledged commit or raises a
typed error that names the store, never a shorter history or a misleading diagnosis.
"""

from __future__ import annotations

import sqlite3
import struct
import zlib
from pathlib import Path

import msgspec
import pytest
import trio
from test_stores import commit_state, loaded, states

from servecore import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointLocked,
    CreateEndpoint,
    FileStore,
    MemoryStore,
    ServecoreError,
    SQLiteStore,
    StoreLocked,
    StoreUnwritable,
    open_controller,
)
from servecore._core.records import load_records, records_of
from servecore.testing import InMemoryRuntime

HEADER = 12  # length, CRC-32 of the payload, CRC-32 of those eight bytes


def _file_with_frames(tmp_path: Path, n: int = 4) -> tuple[Path, list[int]]:
    """A FileStore whose log holds ``n`` acknowledged commits; the log's path and the
    byte offset of each frame in it."""
    store = FileStore(tmp_path / "state.json")
    store.open()
    for seq, state in enumerate(states()[1 : n + 1], start=1):
        commit_state(store, state, seq)
    store.close()
    log = tmp_path / "state.json.log"
    data = log.read_bytes()
    offset, offsets = data.index(b"\n") + 1, []
    while offset < len(data):
        offsets.append(offset)
        (length,) = struct.unpack_from(">I", data, offset)
        offset += HEADER + length
    assert len(offsets) == n
    return log, offsets


def test_every_bit_flip_of_a_length_field_opens_whole_or_raises(tmp_path: Path) -> None:
    """A damaged length may never pass for a torn tail: it would drop every later frame,
    each an acknowledged commit, without a word."""
    log, offsets = _file_with_frames(tmp_path)
    good = log.read_bytes()
    last = len(offsets)
    for frame in offsets:
        for bit in range(8 * 8):  # the length and the payload's checksum
            data = bytearray(good)
            data[frame + bit // 8] ^= 0x80 >> (bit % 8)
            log.write_bytes(bytes(data))
            try:
                seq, _ = FileStore(tmp_path / "state.json").load()
            except CheckpointCorrupt as exc:
                assert "header checksum mismatch" in str(exc)
                continue
            assert seq == last, f"flipping bit {bit} of the frame at byte {frame} lost commits"
    log.write_bytes(good)
    assert FileStore(tmp_path / "state.json").load()[0] == last


def test_a_frame_missing_from_the_middle_of_the_log_is_a_gap(tmp_path: Path) -> None:
    log, offsets = _file_with_frames(tmp_path)
    good = log.read_bytes()
    for i in range(len(offsets) - 1):  # the first frame, or one between two others
        log.write_bytes(good[: offsets[i]] + good[offsets[i + 1] :])
        with pytest.raises(CheckpointCorrupt, match="gap") as info:
            FileStore(tmp_path / "state.json").load()
        assert info.value.where == str(tmp_path / "state.json")


def test_unwritten_blocks_after_the_last_frame_are_a_torn_tail(tmp_path: Path) -> None:
    """A crash can leave the file longer than what was written, the rest zeros."""
    log, _ = _file_with_frames(tmp_path)
    log.write_bytes(log.read_bytes() + bytes(300))
    store = FileStore(tmp_path / "state.json")
    store.open()
    assert loaded(store) == (states()[4], 4)
    store.close()
    assert not log.read_bytes().endswith(b"\x00")  # cut off


def _frame_v2(seq: int, puts: dict[str, bytes]) -> bytes:
    payload = msgspec.msgpack.encode([seq, puts, []])
    return struct.pack(">II", len(payload), zlib.crc32(payload)) + payload


def test_a_format_2_store_opens_and_is_rewritten_in_format_3(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    one, two = states()[1], states()[2]
    path.write_bytes(b"servecore-snapshot 2\n" + _frame_v2(1, records_of(one, 1)))
    Path(f"{path}.log").write_bytes(b"servecore-log 2\n" + _frame_v2(2, records_of(two, 2)))
    store = FileStore(path)
    store.open()
    assert loaded(store) == (two, 2)
    commit_state(store, states()[3], 3)
    store.close()
    assert path.read_bytes().startswith(b"servecore-snapshot 3\n")
    assert Path(f"{path}.log").read_bytes().startswith(b"servecore-log 3\n")
    assert loaded(FileStore(path)) == (states()[3], 3)


# ---------------------------------------------------------------------------------------
# A lock held by another process is a lock, not corruption


def test_a_sqlite_database_locked_by_another_process_is_store_locked(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    store.open()
    commit_state(store, states()[2], 1)
    store.close()
    # A sqlite3 shell (or a backup tool) holding an exclusive lock on the database.
    shell = sqlite3.connect(path, isolation_level=None)
    shell.execute("PRAGMA locking_mode=EXCLUSIVE")
    shell.execute("BEGIN EXCLUSIVE")
    try:
        locked = SQLiteStore(path, busy_timeout_s=0.05)
        with pytest.raises(StoreLocked) as info:
            locked.open()
        assert not isinstance(info.value, CheckpointCorrupt)
        assert info.value.where == str(path)
        assert "intact" in str(info.value) and "corrupt" not in str(info.value)
        locked.close()
    finally:
        shell.execute("COMMIT")
        shell.close()
    again = SQLiteStore(path)
    again.open()
    assert loaded(again) == (states()[2], 1)  # untouched
    again.close()


# ---------------------------------------------------------------------------------------
# A place the store cannot write (as root, permissions do not stop us: a regular file
# where a directory should be does)


@pytest.mark.parametrize("make", [FileStore, SQLiteStore], ids=["file", "sqlite"])
def test_a_store_under_a_regular_file_raises_a_typed_error_naming_the_path(
    tmp_path: Path, make: type[FileStore] | type[SQLiteStore]
) -> None:
    (tmp_path / "plain").write_text("not a directory")
    store = make(tmp_path / "plain" / "sub" / "state")
    with pytest.raises(StoreUnwritable) as info:
        store.open()
    assert isinstance(info.value, CheckpointError)  # a ServecoreError, not a bare OSError
    assert str(tmp_path / "plain") in info.value.path
    assert info.value.path in str(info.value)


@pytest.mark.parametrize("make", [FileStore, SQLiteStore], ids=["file", "sqlite"])
async def test_a_controller_on_a_directory_that_is_a_file_says_which_path(
    tmp_path: Path, make: type[FileStore] | type[SQLiteStore]
) -> None:
    (tmp_path / "plain").write_text("not a directory")
    with pytest.raises(ServecoreError, match="plain"):
        async with open_controller(
            runtime=InMemoryRuntime(), store=make(tmp_path / "plain" / "state")
        ):
            pass


# ---------------------------------------------------------------------------------------
# Records gone from under a sequence number


def _emptied(kind: str, tmp_path: Path) -> MemoryStore | FileStore | SQLiteStore:
    """A store at checkpoint 5 holding no record at all."""
    if kind == "memory":
        return MemoryStore({}, seq=5)
    store: FileStore | SQLiteStore
    store = FileStore(tmp_path / "s.json") if kind == "file" else SQLiteStore(tmp_path / "s.db")
    store.open()
    for seq in range(1, 6):
        commit_state(store, states()[min(seq, 5)], seq)
    _, records = store.load()
    store.commit(6, {}, list(records))  # every record deleted under checkpoint 6
    store.close()
    return store


@pytest.mark.parametrize("kind", ["memory", "file", "sqlite"])
async def test_a_checkpoint_with_no_records_under_a_nonzero_seq_is_corrupt(
    tmp_path: Path, kind: str
) -> None:
    store = _emptied(kind, tmp_path)
    seq, records = store.load()
    assert seq > 0 and not records
    with pytest.raises(CheckpointCorrupt, match="holds no records"):
        load_records(seq, records, "x")
    runtime = InMemoryRuntime()
    with pytest.raises(CheckpointCorrupt, match="orphan"):
        async with open_controller(runtime=runtime, store=store):
            pass


def test_a_sqlite_lock_met_during_a_commit_is_a_retryable_lock_not_a_bare_failure(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path, busy_timeout_s=0.05)

    async def main() -> None:
        async with open_controller(runtime=InMemoryRuntime(), store=store, name="t") as ctl:
            await ctl.submit(CreateEndpoint(name="before"))
            seq = ctl.seq
            # A sqlite3 shell (or a backup tool) takes the write lock while the
            # controller runs.
            shell = sqlite3.connect(path, isolation_level=None)
            shell.execute("BEGIN EXCLUSIVE")
            try:
                with pytest.raises(CheckpointLocked) as info:
                    await ctl.submit(CreateEndpoint(name="during"))
            finally:
                shell.execute("COMMIT")
                shell.close()
            error = info.value
            assert isinstance(error, CheckpointError) and isinstance(error, StoreLocked)
            assert not isinstance(error, CheckpointCorrupt)
            assert error.where == str(path)
            text = str(error)
            assert str(path) in text and "locked by another process" in text
            assert "the command was not applied" in text and "intact" in text
            assert "during" not in ctl.state.endpoints and ctl.seq == seq
            # The lock is gone: the same command, sent again, lands.
            await ctl.submit(CreateEndpoint(name="during"))
            assert set(ctl.state.endpoints) == {"before", "during"}

    trio.run(main)
    again = SQLiteStore(path)
    again.open()
    _, records = again.load()
    again.close()
    assert "endpoint/during" in records
