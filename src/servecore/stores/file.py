"""The file store: an append-only log of change sets, compacted into a snapshot.

Two files hold the checkpoint: the snapshot at the store's path and the log beside it
(``<path>.log``)::

    snapshot   b"servecore-snapshot 2\\n" + one frame: every record at some seq S
    log        b"servecore-log 2\\n" + frames: one change set per commit, S+1, S+2, …

A frame is ``length (4 bytes, big-endian) + CRC-32 of the payload (4) + CRC-32 of
those eight bytes (4) + payload``, the payload a msgpack array ``[seq, {key: value, …},
[deleted key, …], prev]``, ``prev`` being the sequence number the change set applies
to. A commit appends one frame and fsyncs the log; when the log has grown past the live
records (and a floor), the records are written as a new snapshot (temporary file, fsync,
``os.replace``, directory fsync) and the log is replaced by an empty one, so a commit
costs what it changed and the files stay proportional to the state.

Sequence numbers must grow from commit to commit. On load, frames at or below the
snapshot's seq (left by a compaction that crashed before emptying the log) are
skipped; each later frame must apply to the one before it (its ``prev`` is the seq
reached so far), so a frame missing from the middle is a gap, and a gap raises.

A *torn tail* is a commit that crashed before its fsync returned, so was never
acknowledged: what an append leaves when it stops part-way. It is recognised only at
the very end of the log: fewer bytes than a header; zeros to the end of the file (what
a filesystem shows for blocks it had not written); or a header that checks out whose
frame runs past the end of the file, or ends exactly there with a payload that fails
its checksum. It is the only thing ever discarded (and cut off the log). A header that
fails its own checksum is damage, wherever it is: a length field read wrong could make
any frame look like the last, so it is never taken for a torn tail. Damage anywhere
else raises :class:`~servecore.CheckpointCorrupt`; a newer format raises
:class:`~servecore.CheckpointVersionError`. Files of format 2 (frames without the
header checksum and ``prev``) load and are rewritten as format 3 at once; a file in
the old single-envelope format (version 1) loads and is rewritten as a snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import msgspec

from servecore._core.errors import CheckpointCorrupt, CheckpointVersionError
from servecore._core.records import decode_blob
from servecore.stores._locking import (
    StoreLock,
    fsync_dir,
    open_private,
    prepare_directory,
    resolve,
    unwritable,
)

__all__ = ["FileStore"]

log = logging.getLogger("servecore.stores")

FORMAT_VERSION = 3
#: The oldest framed format still read (and rewritten as the current one when loaded).
_OLDEST_FRAMED = 2
_SNAPSHOT = b"servecore-snapshot "
_LOG = b"servecore-log "
_LENGTH_CRC = struct.Struct(">II")
_HEADER = struct.Struct(">III")  # length, CRC-32 of the payload, CRC-32 of those 8 bytes
#: Below this many bytes of log, no compaction, whatever the state's size.
COMPACT_MIN_BYTES = 1 << 16


def _frame(seq: int, puts: Mapping[str, bytes], deletes: Collection[str], prev: int = -1) -> bytes:
    payload = msgspec.msgpack.encode([seq, dict(puts), list(deletes), prev])
    head = _LENGTH_CRC.pack(len(payload), zlib.crc32(payload))
    return head + struct.pack(">I", zlib.crc32(head)) + payload


def _magic(prefix: bytes) -> bytes:
    return prefix + b"%d\n" % FORMAT_VERSION


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file is at ``path`` now (inode, change time), or ``None``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Payload(msgspec.Struct, array_like=True):
    seq: int
    puts: dict[str, bytes]
    deletes: list[str]
    prev: int = -1  # the seq this change set applies to; -1: not recorded (format 2)


_payload_decoder = msgspec.msgpack.Decoder(_Payload)


class FileStore:
    """A snapshot file plus an append-only log of checksummed change sets.

    The path is resolved (symlinks, relative paths) when the store is made, and the
    store reads and writes the resolved files. While a controller has it open,
    ``<resolved>.lock`` and the snapshot file itself are ``flock``-ed; a second
    controller, through any name for the same file, gets
    :class:`~servecore.StoreLocked` at once. Files are created owner-only (0600).
    ``compact_min_bytes`` is the log size below which it is never compacted.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, compact_min_bytes: int = COMPACT_MIN_BYTES
    ) -> None:
        self.path = Path(path)
        self.resolved = resolve(path)
        self.log_path = Path(f"{self.resolved}.log")
        self.where = str(self.path)
        self.compact_min_bytes = compact_min_bytes
        self._lock = StoreLock(self.resolved, self.where)
        self._records: dict[str, bytes] | None = None  # None: not loaded yet
        self._seq = 0
        self._live_bytes = 0
        self._log_fd: int | None = None
        self._log_end = 0  # where the last good frame ends
        #: Called (if set) where a commit has written part of its change set and none of
        #: it is visible yet: the crash kit's *midway* crash point (``FaultyStore``).
        self.midway_hook: Callable[[], None] | None = None
        self.compactions = 0

    @property
    def store_id(self) -> str:
        """``"file:"`` followed by the resolved absolute path."""
        return f"file:{self.resolved}"

    # -- life -------------------------------------------------------------------------------

    def open(self) -> None:
        """Take the store's locks (:class:`~servecore.StoreLocked` if another holds
        them); :class:`~servecore.StoreUnwritable` naming the path if its files cannot
        be created or opened there."""
        prepare_directory(self.where, self.resolved)
        try:
            self._lock.acquire(self._open_checkpoint)
        except OSError as exc:
            raise unwritable(self.where, exc, self.resolved) from exc
        self._records = None  # read again from disk: another process may have written
        if self._lock.inode_fd is None and not self.resolved.exists():
            # An empty snapshot now, so the checkpoint's inode is locked from the start.
            try:
                self._replace(self.resolved, _magic(_SNAPSHOT) + _frame(0, {}, ()), lock=True)
            except OSError as exc:
                self._lock.release()
                raise unwritable(self.where, exc, self.resolved) from exc
            except BaseException:
                self._lock.release()
                raise

    def _open_checkpoint(self) -> int | None:
        try:
            return os.open(self.resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None

    def close(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        self._records = None
        self._lock.release()

    # -- reading ----------------------------------------------------------------------------

    def read(self) -> tuple[int, dict[str, bytes]]:
        """The last commit's ``(seq, records)``, read without the lock and without
        writing anything (no torn tail cut off, no upgrade, no compaction): for status
        tools and backups, while a controller may own the store.

        A compaction replaces the snapshot and then empties the log; a read that
        overlaps one (the snapshot changed under it) reads both again.
        """
        for _ in range(8):
            before = _identity(self.resolved)
            seq, records, _ = self._read_snapshot()
            try:
                data = self.log_path.read_bytes()
            except FileNotFoundError:
                data = None
            if _identity(self.resolved) != before:
                continue
            if data is not None:
                seq, _, _, _ = self._replay(data, seq, records)
            return seq, records
        raise CheckpointCorrupt(self.where, "the snapshot kept changing while it was read")

    def load(self) -> tuple[int, dict[str, bytes]]:
        """Read the snapshot and replay the log; cut off a torn tail."""
        seq, records, upgraded = self._read_snapshot()
        end, torn = 0, False
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            data = None
        if data is not None:
            seq, end, torn, old_log = self._replay(data, seq, records)
            # Frames of the current format may not follow the older ones: rewrite.
            upgraded = upgraded or old_log
        self._records, self._seq = records, seq
        self._live_bytes = sum(len(k) + len(v) for k, v in records.items())
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        self._log_end = end if data is not None else 0
        if torn:
            log.warning(
                "%s: discarded a torn last commit of the log (it was never acknowledged)",
                self.where,
            )
            if self._lock.held:
                self._log(truncate=True)
        if upgraded:
            self._compact()  # the old format becomes a snapshot and an empty log
        return seq, dict(records)

    def committed_seq(self) -> int:
        """The sequence number of the last commit (a commit that raised appended
        nothing: its frame was cut off)."""
        if self._records is None:
            return self.load()[0]
        return self._seq

    def _read_snapshot(self) -> tuple[int, dict[str, bytes], bool]:
        try:
            data = self.resolved.read_bytes()
        except FileNotFoundError:
            return 0, {}, False
        if data.startswith(b"{"):
            seq, records = decode_blob(data, self.where)
            return seq, records, True
        version, body = self._check_magic(data, _SNAPSHOT, "snapshot")
        frames = list(self._frames(body, version, what="snapshot"))
        if len(frames) != 1 or frames[0][2]:
            raise CheckpointCorrupt(self.where, "the snapshot is not one whole frame")
        payload = frames[0][0]
        if payload.deletes:
            raise CheckpointCorrupt(self.where, "the snapshot deletes records")
        return payload.seq, payload.puts, False

    def _check_magic(self, data: bytes, prefix: bytes, what: str) -> tuple[int, memoryview]:
        line, newline, _ = data[:64].partition(b"\n")
        if not newline or not line.startswith(prefix):
            raise CheckpointCorrupt(self.where, f"the {what} file is not a servecore {what}")
        try:
            version = int(line[len(prefix) :])
        except ValueError as exc:
            raise CheckpointCorrupt(self.where, f"the {what} has no version number") from exc
        if version > FORMAT_VERSION:
            raise CheckpointVersionError(self.where, version, FORMAT_VERSION)
        if version < _OLDEST_FRAMED:
            raise CheckpointCorrupt(self.where, f"the {what} has version {version}")
        return version, memoryview(data)[len(line) + 1 :]

    def _frames(self, body: memoryview, version: int, *, what: str) -> Any:
        """Yield ``(payload, end offset, torn)``; a torn frame is yielded last, alone."""
        header = _HEADER if version >= 3 else _LENGTH_CRC
        offset, size = 0, len(body)
        while offset < size:
            if size - offset < header.size:
                yield None, offset, True  # a header cut short
                return
            if version >= 3:
                length, crc, head_crc = _HEADER.unpack_from(body, offset)
                if zlib.crc32(body[offset : offset + _LENGTH_CRC.size]) != head_crc:
                    if not bytes(body[offset:]).strip(b"\x00"):
                        yield None, offset, True  # blocks the filesystem never wrote
                        return
                    # Never a torn tail: an append that stops part-way leaves a short
                    # header, not a wrong one, and a wrong length could make any frame
                    # look like the last one, hiding every acknowledged frame after it.
                    raise CheckpointCorrupt(
                        self.where, f"{what} frame at byte {offset}: header checksum mismatch"
                    )
            else:
                length, crc = _LENGTH_CRC.unpack_from(body, offset)
            end = offset + header.size + length
            if end > size:
                yield None, offset, True
                return
            raw = body[offset + header.size : end]
            if zlib.crc32(raw) != crc:
                if end == size:
                    yield None, offset, True
                    return
                raise CheckpointCorrupt(
                    self.where, f"{what} frame at byte {offset}: checksum mismatch"
                )
            try:
                payload = _payload_decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise CheckpointCorrupt(
                    self.where, f"{what} frame at byte {offset} does not parse ({exc})"
                ) from exc
            yield payload, end, False
            offset = end

    def _replay(
        self, data: bytes, seq: int, records: dict[str, bytes]
    ) -> tuple[int, int, bool, bool]:
        """Apply the log's frames to ``(seq, records)``: the seq reached, where the last
        good frame ends, whether a torn tail follows it, whether the log is of an older
        format."""
        version, body = self._check_magic(data, _LOG, "log")
        start = len(data) - len(body)
        end, torn, base = start, False, seq
        for payload, offset, is_torn in self._frames(body, version, what="log"):
            if is_torn:
                torn = True
                break
            end = start + offset
            if payload.seq <= base:
                continue  # written before the snapshot that now holds it
            if payload.seq <= seq:
                raise CheckpointCorrupt(
                    self.where, f"the log goes back from checkpoint {seq} to {payload.seq}"
                )
            if payload.prev != -1 and payload.prev != seq:
                raise CheckpointCorrupt(
                    self.where,
                    f"the log has a gap: checkpoint {payload.seq} applies to checkpoint "
                    f"{payload.prev}, but the snapshot and the frames before it reach "
                    f"{seq} (a frame is missing)",
                )
            for key in payload.deletes:
                records.pop(key, None)
            records.update(payload.puts)
            seq = payload.seq
        return seq, end, torn, version < FORMAT_VERSION

    # -- writing ----------------------------------------------------------------------------

    def _log(self, *, truncate: bool = False) -> int:
        """The log, open for appending (made empty if missing); cut to the last good
        frame if ``truncate``."""
        if self._log_fd is None:
            if not self.log_path.exists():
                self._replace(self.log_path, _magic(_LOG), lock=False)
                self._log_end = len(_magic(_LOG))
            self._log_fd = open_private(self.log_path, os.O_RDWR | os.O_APPEND)
            truncate = os.fstat(self._log_fd).st_size != self._log_end
        if truncate:
            os.ftruncate(self._log_fd, self._log_end)
            os.fsync(self._log_fd)
        return self._log_fd

    def commit(self, seq: int, puts: Mapping[str, bytes], deletes: Collection[str]) -> None:
        """Append one change set to the log and fsync it; compact if the log outgrew
        the state."""
        if self._records is None:
            self.load()
        assert self._records is not None
        frame = _frame(seq, puts, deletes, self._seq)
        fd = self._log()
        try:
            half = len(frame) // 2
            _write_all(fd, frame[:half])
            if self.midway_hook is not None:
                self.midway_hook()
            _write_all(fd, frame[half:])
            os.fdatasync(fd)
        except Exception:
            # Nothing after a failed frame may be appended: cut it off, or give up the
            # descriptor so the next commit starts from the last good frame.
            try:
                os.ftruncate(fd, self._log_end)
            except OSError:
                os.close(fd)
                self._log_fd = None
            raise
        self._log_end += len(frame)
        records = self._records
        for key in deletes:
            old = records.pop(key, None)
            if old is not None:
                self._live_bytes -= len(key) + len(old)
        for key, value in puts.items():
            old = records.get(key)
            self._live_bytes += len(key) + len(value) - (len(key) + len(old) if old else 0)
            records[key] = value
        self._seq = seq
        if self._log_end > max(self.compact_min_bytes, self._live_bytes):
            try:
                self._compact()
            except OSError as exc:  # the commit is durable in the log: not a failure
                log.warning("%s: compaction failed, the log keeps growing: %r", self.where, exc)

    def _compact(self) -> None:
        assert self._records is not None
        snapshot = _magic(_SNAPSHOT) + _frame(self._seq, self._records, ())
        self._replace(self.resolved, snapshot, lock=True)
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        self._replace(self.log_path, _magic(_LOG), lock=False)
        self._log_end = len(_magic(_LOG))
        self.compactions += 1

    def _replace(self, path: Path, data: bytes, *, lock: bool) -> None:
        """Write ``data`` to a temporary file, fsync it, ``os.replace`` it over ``path``
        and fsync the directory. The snapshot (``lock``) is locked before it gets there,
        so the file under the checkpoint's name is always locked while we hold it."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            _write_all(fd, data)
            os.fsync(fd)
            if lock and self._lock.held:
                self._lock.lock_new(fd)
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if lock and self._lock.held:
            self._lock.keep_new(fd)  # open, and locked, until the next snapshot
        else:
            os.close(fd)
        fsync_dir(path.parent)

    def __repr__(self) -> str:
        return f"FileStore({self.where!r})"
