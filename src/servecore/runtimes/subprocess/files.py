"""The files of one replica in the runtime directory, and how they are written safely.

Standard library only: the replica process uses this too.

Files of one replica, named after its *key* (a filename-safe form of its tag, see
:func:`replica_key`):

``KEY.lock``
    An ``flock`` the replica holds for its whole life. The host takes it, then hands the
    locked file to the child (``pass_fds``), so "the lock is held" means "a process of
    this tag is alive", with no race and no pid-reuse question: the kernel drops the lock
    when the last holder exits.
``KEY.spec.json``
    What to run (target, arguments, host ``sys.path``), written by the host before spawn.
``KEY.json``
    The record: tag, pid, create time and phase (``starting``, ``ready``, ``failed``,
    ``dead``) with the error, written by the replica first thing and rewritten on each
    change. A replica that ends itself (a failed health check, SystemExit in user code)
    says why there, and the host puts that in ``ReplicaDied``.
``KEY.sock``
    The replica's Unix socket, bound once the target is constructed.
``KEY.log``
    The replica's stdout and stderr. When the replica is gone its log moves to
    ``logs/``, where the last :data:`LOGS_PER_BACKEND` of each backend are kept, each
    cut to its last :data:`KEPT_LOG_BYTES` (the tail, where a failure shows; a first
    line says how much was dropped). A live replica's log is not cut.

Nothing here follows a symbolic link: files are created with ``O_EXCL | O_NOFOLLOW``
and mode 0600 (replaced atomically by ``rename``, which replaces a link, never its
target), and read with ``O_NOFOLLOW``. A link planted in the directory is removed or
refused, never written through.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import time
from typing import Any

from servecore._core.values import backend_of
from servecore._text import encodable

__all__ = [
    "FAILED_MARKER",
    "KEPT_LOG_BYTES",
    "LOGS_DIR",
    "LOGS_PER_BACKEND",
    "ReplicaFiles",
    "create_exclusive",
    "open_lock",
    "process_create_time",
    "read_nofollow",
    "replica_key",
    "write_atomically",
]

#: Dead replicas' logs, under the runtime directory.
LOGS_DIR = "logs"
#: How many logs of dead replicas are kept per backend (the newest).
LOGS_PER_BACKEND = 3
#: How many are kept in all, whatever their backend (the newest).
LOGS_IN_ALL = 64
#: The most of one dead replica's log that is kept: its end. So ``logs/`` holds at
#: most ``LOGS_IN_ALL * KEPT_LOG_BYTES`` (64 MiB), whatever the replicas printed.
KEPT_LOG_BYTES = 1024 * 1024
#: The line a replica writes to its log before the traceback of a failed start.
FAILED_MARKER = "servecore: the replica failed to start:"

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
#: How much of the end of a log is read for its last lines, and how many are kept.
_TAIL_BYTES = 8192
_TAIL_LINES = 8
_TAIL_LINE_CHARS = 300


def replica_key(tag: str) -> str:
    """The filename-safe key of a replica tag: ``"echo#3"`` -> ``"echo_3-1a2b3c4d5e"``.

    Readable (the tag with unsafe characters replaced, cut to 40 characters) and
    unique (a hash of the whole tag).
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)[:40]
    digest = hashlib.blake2b(tag.encode("utf-8", "surrogatepass"), digest_size=5).hexdigest()
    return f"{safe}-{digest}"


def create_exclusive(path: str, flags: int = os.O_WRONLY) -> int:
    """A new file at ``path``, mode 0600; fails if anything (a link too) is there."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader never sees half of it.

    The temporary file is new (``O_EXCL``) and the rename replaces whatever ``path``
    is, a planted link included, without following it.
    """
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = create_exclusive(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_nofollow(path: str) -> bytes | None:
    """The content of the regular file at ``path``; ``None`` if it is missing, a link
    or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read()


def open_lock(path: str) -> int:
    """Open (creating, mode 0600) the lock file at ``path`` without following a link.

    A link found there is not ours to follow: it is removed and a real file made.
    """
    flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
    os.unlink(path)
    return os.open(path, flags | os.O_EXCL, 0o600)


def process_create_time(pid: int | None = None) -> float:
    """The process's start time in seconds since the epoch, as ``psutil`` computes it.

    Read from ``/proc`` on Linux, so that a replica need not import psutil to record
    it; elsewhere psutil is imported. Host and replica compare these values (with a
    tolerance) to tell a replica from a later process that reused its pid.
    """
    try:
        with open(f"/proc/{pid or 'self'}/stat", "rb") as f:
            stat_line = f.read()
        # Fields after the command name (which may hold spaces) start at field 3;
        # starttime is field 22.
        ticks = int(stat_line[stat_line.rindex(b")") + 2 :].split()[19])
        with open("/proc/stat", "rb") as f:
            btime = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
        return ticks / os.sysconf("SC_CLK_TCK") + btime
    except (OSError, ValueError, IndexError, StopIteration):
        import psutil  # a non-Linux system: pay for the import

        return float(psutil.Process(pid).create_time())


def _tail(text: str, lines: int) -> str:
    kept = [line[:_TAIL_LINE_CHARS] for line in text.strip().splitlines()[-lines:]]
    return encodable("\n".join(kept))


class ReplicaFiles:
    """The paths of one replica's files in the runtime directory (see the module doc)."""

    def __init__(self, directory: str, key: str) -> None:
        self.directory = directory
        self.key = key
        base = os.path.join(directory, key)
        self.lock = base + ".lock"
        self.spec = base + ".spec.json"
        self.record = base + ".json"
        self.socket = base + ".sock"
        self.log = base + ".log"

    def read_record(self) -> dict[str, Any] | None:
        """The record, or ``None`` if it is missing or torn."""
        return self._read_json(self.record)

    def read_spec(self) -> dict[str, Any] | None:
        """The spec, or ``None`` if it is missing or torn."""
        return self._read_json(self.spec)

    @staticmethod
    def _read_json(path: str) -> dict[str, Any] | None:
        data = read_nofollow(path)
        if data is None:
            return None
        try:
            value = json.loads(data)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def write_record(self, record: dict[str, Any]) -> None:
        """Replace the record atomically."""
        write_atomically(self.record, json.dumps(record).encode("utf-8"))

    def write_spec(self, spec: dict[str, Any]) -> None:
        """Replace the spec atomically."""
        write_atomically(self.spec, json.dumps(spec).encode("utf-8"))

    def create_log(self) -> int:
        """A new, empty log file (its fd, for the child's stdout and stderr)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log)
        return create_exclusive(self.log, os.O_WRONLY | os.O_APPEND)

    def log_tail(self, *, before_failure: bool = False, lines: int = _TAIL_LINES) -> str:
        """The last lines of the log (encodable text; ``""`` if there is none).

        With ``before_failure``, the lines before the traceback of a failed start
        (which travels on its own): what the replica printed as it went wrong.
        """
        try:
            fd = os.open(self.log, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            return ""
        with os.fdopen(fd, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _TAIL_BYTES))
            text = f.read().decode("utf-8", "replace")
        if before_failure:
            text = text.rpartition(FAILED_MARKER)[0] if FAILED_MARKER in text else text
        return _tail(text, lines)

    def remove(self, *, keep_lock: bool = False) -> str | None:
        """Delete the files (those that exist); the log moves to ``logs/``.

        Returns where the log was kept, if it was.
        """
        kept = self.retire_log()
        paths = [self.spec, self.record, self.socket, self.log]
        if not keep_lock:
            paths.append(self.lock)
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return kept

    def retire_log(self) -> str | None:
        """Move the log to ``logs/`` and drop the oldest there beyond the bounds.

        Logs are grouped by backend (read from the record or spec), so that a crash
        loop keeps its latest few whatever the tags of its replicas.
        """
        try:
            info = os.lstat(self.log)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return None
        about = self.read_record() or self.read_spec() or {}
        tag = about.get("tag")
        group = replica_key(backend_of(str(tag))) if tag else self.key
        logs = os.path.join(self.directory, LOGS_DIR)
        kept = os.path.join(logs, f"{group}~{time.time_ns():020d}~{self.key}.log")
        try:
            if info.st_size > KEPT_LOG_BYTES:
                _keep_tail(self.log, kept, info.st_size)
                os.unlink(self.log)
            else:
                os.rename(self.log, kept)
        except OSError:  # no logs/ (or not a directory): the log goes with the rest
            return None
        _prune(logs, group)
        return kept


def _keep_tail(source: str, kept: str, size: int) -> None:
    """Write the last :data:`KEPT_LOG_BYTES` of ``source`` (from a line start) to the
    new file ``kept``, after a line saying how much was dropped."""
    with os.fdopen(os.open(source, os.O_RDONLY | _NOFOLLOW), "rb") as f:
        f.seek(size - KEPT_LOG_BYTES)
        tail = f.read(KEPT_LOG_BYTES)
    newline = tail.find(b"\n")
    if 0 <= newline < len(tail) - 1:
        tail = tail[newline + 1 :]  # start at a whole line
    dropped = size - len(tail)
    header = f"servecore: the first {dropped} bytes of this log were dropped\n".encode()
    fd = create_exclusive(kept)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(header + tail)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(kept)
        raise


def _prune(logs: str, group: str) -> None:
    try:
        names = [n for n in os.listdir(logs) if n.endswith(".log") and n.count("~") == 2]
    except OSError:
        return

    def age(name: str) -> str:
        return name.split("~")[1]

    mine = sorted((n for n in names if n.split("~")[0] == group), key=age)
    doomed = set(mine[:-LOGS_PER_BACKEND])
    rest = sorted((n for n in names if n not in doomed), key=age)
    doomed.update(rest[:-LOGS_IN_ALL])
    for name in doomed:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(logs, name))
