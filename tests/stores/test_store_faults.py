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
from test_stores import commit_state, loaded, states

from servecore import (
    CheckpointCorrupt,
    CheckpointError,
    FileStore,
    MemoryStore,
    ServecoreError,
    SQLiteStore,
    StoreLocked,
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
