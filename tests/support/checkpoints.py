"""Checkpoints in the format servecore wrote before keyed records (version 1), planted
where each store kind keeps its checkpoint, to test that they open and upgrade."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

from servecore import BlobAdapter, FileStore, SQLiteStore, State
from servecore._core.records import FORMAT, _encoder, _Snapshot


def encode_v1(state: State, seq: int) -> bytes:
    """A version 1 checkpoint: one envelope around the whole state, as it was written."""
    state_json = _encoder.encode(
        _Snapshot(
            endpoints=dict(state.endpoints),
            backends=dict(state.backends),
            replicas=dict(state.replicas),
            replica_counter=state.replica_counter,
        )
    )
    checksum = "sha256:" + hashlib.sha256(b"%d:%s" % (seq, state_json)).hexdigest()
    return b'{"checksum":"%s","format":"%s","seq":%d,"state":%s,"version":1}' % (
        checksum.encode(),
        FORMAT.encode(),
        seq,
        state_json,
    )


class MemoryBlob:
    """A whole-blob store in memory (a user's ``save``/``load`` store)."""

    where = "memory blob"

    def __init__(self, data: bytes | None = None) -> None:
        self.data = data

    def save(self, data: bytes) -> None:
        self.data = data

    def load(self) -> bytes | None:
        return self.data


_BLOBS: dict[Path, MemoryBlob] = {}


def plant_v1(kind: str, path: Path, data: bytes | None) -> Any:
    """Put ``data`` (if not ``None``) where a store of ``kind`` at ``path`` keeps its
    checkpoint, as servecore wrote it before keyed records; return an unopened store.

    ``"file"``: the bytes are the file. ``"sqlite"``: a version 1 database with one
    ``checkpoint`` row. ``"memory"``: a whole-blob store in memory behind a
    :class:`~servecore.BlobAdapter` (the same blob for the same ``path``).
    """
    if kind == "file":
        if data is not None:
            path.write_bytes(data)
        return FileStore(path)
    if kind == "sqlite":
        if data is not None:
            with sqlite3.connect(path) as db:
                db.execute(
                    "CREATE TABLE checkpoint (id INTEGER PRIMARY KEY CHECK (id = 1),"
                    " data BLOB NOT NULL)"
                )
                db.execute("INSERT INTO checkpoint (id, data) VALUES (1, ?)", (data,))
                db.execute("PRAGMA user_version=1")
            db.close()
        return SQLiteStore(path)
    blob = _BLOBS.setdefault(path, MemoryBlob())
    if data is not None:
        blob.data = data
    return BlobAdapter(blob)
