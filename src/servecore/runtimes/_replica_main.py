"""One replica of the subprocess runtime, and the wire format both ends share.

The host starts this file *by path*, not with ``-m``::

    python -P .../servecore/runtimes/_replica_main.py --dir RUNTIME_DIR --key KEY \\
        --lock-fd N --status-fd M

so that a replica imports only the standard library (not the servecore package, trio,
attrs…) unless its own target does: a bare replica starts about as fast as
``python -c pass``. ``-P`` keeps this file's directory (which holds a module named
``subprocess``) off ``sys.path``; :func:`main` removes it again for interpreters that
ignore ``-P``. The host imports the module normally, for the shared wire format.

Files of one replica, all in the runtime directory and named after ``KEY`` (a
filename-safe form of the tag, see ``replica_key`` in ``subprocess.py``):

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
    change (atomically). A replica that ends itself (a failed health check, SystemExit
    in user code) says why there, and the host puts that in ``ReplicaDied``.
``KEY.sock``
    The replica's Unix socket, bound once the target is constructed.
``KEY.log``
    The replica's stdout and stderr.

Wire format: frames of ``HEADER`` (body length, kind, request id; network order) and a
pickled body. Pickle carries the user's query arguments, results and exceptions over a
socket that only this user can reach (the directory is mode 0700); it is never used for
controller state, which is checkpointed as JSON. A malformed frame closes the connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, BinaryIO

__all__ = [
    "CALL",
    "ERROR",
    "GONE",
    "HEADER",
    "OK",
    "PING",
    "ReplicaFiles",
    "dumps",
    "error_info",
    "frame",
    "main",
    "process_create_time",
    "socket_address",
]

#: body length (bytes), message kind, request id
HEADER = struct.Struct("!IBQ")
#: host -> replica: run a batch; the body is a list of ``(args, kwargs)``.
CALL = 1
#: host -> replica: who are you? The reply body is ``{"tag", "pid", "key"}``.
PING = 2
#: replica -> host: the body is the list of results (or the ping answer).
OK = 3
#: replica -> host: the body is an :func:`error_info` dict.
ERROR = 4
#: replica -> host: the replica is stopping and did not run the batch; body: a reason.
GONE = 5

#: A call this fast, alone on its connection, runs on the reading thread (no hand-off).
_FAST_CALL_S = 0.001
#: How often a connection checks that an inline call has not held up reading too long.
_WATCHDOG_S = 0.005

#: Longest socket path that ``bind``/``connect`` take (``sun_path`` is 108 bytes on Linux).
_MAX_SOCKET_PATH = 100


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` with the highest protocol (both ends run the same Python)."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def frame(kind: int, request_id: int, body: bytes) -> bytes:
    """One message on the wire."""
    return HEADER.pack(len(body), kind, request_id) + body


def error_info(exc: BaseException) -> dict[str, Any]:
    """Describe ``exc`` so the other side can raise it again.

    ``pickled`` is the exception itself when it pickles (``None`` otherwise) and
    ``state`` its ``__dict__``, for types whose constructor pickle cannot call again
    (those with extra required arguments). The type's module and qualified name, the
    message and the formatted traceback always travel, so an exception whose class
    cannot be imported on the other side still says what it was.
    """
    try:
        pickled: bytes | None = dumps(exc)
    except Exception:
        pickled = None
    try:
        state: bytes | None = dumps(vars(exc))
    except Exception:
        state = None
    cls = type(exc)
    return {
        "pickled": pickled,
        "state": state,
        "module": cls.__module__,
        "qualname": cls.__qualname__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def socket_address(path: str, dir_fd: int | None) -> str:
    """A path that ``bind``/``connect`` accept for the socket at ``path``.

    ``sun_path`` holds about 100 bytes, and temporary directories (pytest's above all)
    can be longer. On Linux a long path is reached through the already open directory,
    ``/proc/self/fd/DIR_FD/NAME``, which is short whatever the directory's length.
    """
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH or dir_fd is None:
        return path
    return f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}"


def process_create_time(pid: int | None = None) -> float:
    """The process's start time in seconds since the epoch, as ``psutil`` computes it.

    Read from ``/proc`` on Linux, so that a replica need not import psutil to record
    it; elsewhere psutil is imported. Host and replica compare these values (with a
    tolerance) to tell a replica from a later process that reused its pid.
    """
    try:
        with open(f"/proc/{pid or 'self'}/stat", "rb") as f:
            stat = f.read()
        # Fields after the command name (which may hold spaces) start at field 3;
        # starttime is field 22.
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
        with open("/proc/stat", "rb") as f:
            btime = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
        return ticks / os.sysconf("SC_CLK_TCK") + btime
    except (OSError, ValueError, IndexError, StopIteration):
        import psutil  # a non-Linux system: pay for the import

        return float(psutil.Process(pid).create_time())


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
        try:
            with open(self.record, encoding="utf-8") as f:
                record: dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            return None
        return record

    def write_record(self, record: dict[str, Any]) -> None:
        """Replace the record atomically (a reader never sees half of it)."""
        tmp = f"{self.record}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, self.record)

    def remove(self, *, keep_lock: bool = False) -> None:
        """Delete the files (those that exist)."""
        paths = [self.spec, self.record, self.socket, self.log]
        if not keep_lock:
            paths.append(self.lock)
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


# ---------------------------------------------------------------------------------------
# The replica process


class _Terminate(Exception):
    """Raised in the main thread by the SIGTERM handler to leave the accept loop."""


class _Query:
    """What the shared batch runner reads of a query (``args``, ``kwargs``): a plain
    slotted pair, a few microseconds cheaper per query than the frozen attrs
    ``servecore.Query`` on the replica's hot path."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs


def _build(
    spec: dict[str, Any],
) -> tuple[Callable[[list[tuple[Any, Any]]], list[Any]], Callable[[], object] | None]:
    """Import and construct the target exactly as the threads runtime does; return
    ``run(batch)`` taking ``(args, kwargs)`` pairs, and the object's ``check_health``
    if it has one.

    servecore itself is imported here, not at the top of the file: only after the
    record is written, and inside the start's error handling.
    """
    from servecore._batch import prepare_replica

    runner, check = prepare_replica(
        spec["target"],
        spec["init_args"],
        spec["init_kwargs"],
        backend=spec["backend"],
        max_batch_size=spec["max_batch_size"],
        user_config=spec["user_config"],
    )

    def run(batch: list[tuple[Any, Any]]) -> list[Any]:
        queries: Any = [_Query(args, kwargs) for args, kwargs in batch]
        return runner(queries)

    return run, check


class _Server:
    """Serves one constructed target on a listening socket until SIGTERM."""

    def __init__(
        self,
        *,
        run: Callable[[list[tuple[Any, Any]]], list[Any]],
        listener: socket.socket,
        files: ReplicaFiles,
        tag: str,
        concurrency: int,
        record: dict[str, Any],
    ) -> None:
        self.run = run
        self.record = record
        self.listener = listener
        self.files = files
        self.tag = tag
        self.concurrency = concurrency
        self.stopping = False
        self.in_flight = 0
        self.idle = threading.Condition()

    def begin(self) -> None:
        with self.idle:
            self.in_flight += 1

    def end(self) -> None:
        with self.idle:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.notify_all()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stopping = True
        raise _Terminate

    def die(self, reason: str) -> None:
        """End the replica at once, leaving ``reason`` in its record for the host."""
        print(f"replica {self.tag} ends: {reason}", file=sys.stderr, flush=True)
        self.record.update(phase="dead", error=reason)
        with contextlib.suppress(OSError):
            self.files.write_record(self.record)
        sys.stdout.flush()
        os._exit(70)

    def check_health_forever(self, check_health: Callable[[], object], period: float) -> None:
        """Call the target's ``check_health()`` every ``period`` seconds; if it raises,
        the replica is dead (as in the threads runtime) and its process ends."""
        while not self.stopping:
            time.sleep(period)
            try:
                check_health()
            except BaseException as exc:
                self.die(f"health check failed: {type(exc).__name__}: {exc}")

    def serve(self) -> None:
        """Accept hosts until SIGTERM, then drain the calls in flight and exit."""
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            while not self.stopping:
                conn, _ = self.listener.accept()
                _Connection(self, conn).start()
        except _Terminate:
            pass
        # Stop taking connections, finish what is running, then leave. The host sends
        # SIGKILL if this takes longer than the backend's graceful_shutdown_timeout_s.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.files.socket)
        with self.idle:
            while self.in_flight:
                self.idle.wait()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class _Connection:
    """One host connection, served by ``concurrency`` threads taking turns to read.

    Leader/followers: the thread holding ``read_lock`` (the reading role) reads the
    next frame and runs it itself, so a call never waits for a hand-off on its way in.

    * A fast call (the recent ones took under :data:`_FAST_CALL_S`) that has the
      connection to itself runs *inline*: its thread keeps the reading role, and no
      other thread is woken -- waking one costs about as much as the rest of the
      round trip. Should such a call turn out slow, the watchdog (every
      :data:`_WATCHDOG_S`) passes the reading role on, so later calls still overlap.
    * Otherwise the thread passes the reading role on before it runs the call.

    Either way at most ``concurrency`` calls run at once: there are that many threads.
    """

    def __init__(self, server: _Server, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.rfile: BinaryIO = conn.makefile("rb")
        self.read_lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.closed = False
        self.threads_alive = server.concurrency
        self.threads_lock = threading.Lock()
        # Guards the fields below, shared by the threads and the watchdog.
        self.state_lock = threading.Lock()
        self.running = 0  # calls running on this connection
        self.inline_since: float | None = None  # when the inline call began
        self.role_passed = False  # the watchdog passed the inline reader's role on
        self.call_time = 0.0  # moving average of how long calls take, in seconds

    def start(self) -> None:
        for i in range(self.server.concurrency):
            threading.Thread(target=self._worker, name=f"replica-conn-{i}", daemon=True).start()
        if self.server.concurrency > 1:
            threading.Thread(target=self._watchdog, name="replica-watchdog", daemon=True).start()

    def _read(self) -> tuple[int, int, bytes] | None:
        try:
            header = self.rfile.read(HEADER.size)
            if len(header) < HEADER.size:
                return None
            length, kind, request_id = HEADER.unpack(header)
            body = self.rfile.read(length)
        except (OSError, ValueError):
            return None
        if len(body) < length:
            return None
        return kind, request_id, body

    def _worker(self) -> None:
        try:
            while self._lead():
                pass
        finally:
            with self.threads_lock:
                self.threads_alive -= 1
                last = self.threads_alive == 0
            if last:  # nobody writes any more: the socket can go
                self.closed = True
                self.rfile.close()
                self.conn.close()

    def _lead(self) -> bool:
        """Take the reading role and serve until it passes on; ``False`` once closed."""
        self.read_lock.acquire()
        while True:
            message = None if self.closed else self._read()
            if message is None:
                self.closed = True
                self.read_lock.release()
                return False
            # Counted before the reading role can pass on: a drain cannot miss it.
            self.server.begin()
            with self.state_lock:
                inline = self.running == 0 and self.call_time < _FAST_CALL_S
                self.running += 1
                if inline:
                    self.inline_since = time.monotonic()
            if not inline:
                self.read_lock.release()
            started = time.monotonic()
            try:
                self._handle(*message)
            finally:
                self.server.end()
                with self.state_lock:
                    self.running -= 1
                    self.call_time += (time.monotonic() - started - self.call_time) * 0.25
                    kept = inline and not self.role_passed
                    self.inline_since = None
                    self.role_passed = False
            if not kept:
                return True

    def _watchdog(self) -> None:
        while not self.closed:
            time.sleep(_WATCHDOG_S)
            with self.state_lock:
                since = self.inline_since
                overdue = since is not None and time.monotonic() - since >= _WATCHDOG_S
                if overdue and not self.role_passed:
                    self.role_passed = True
                    self.read_lock.release()  # on the inline reader's behalf

    def _reply(self, kind: int, request_id: int, body: bytes) -> None:
        data = frame(kind, request_id, body)
        with self.write_lock:
            try:  # noqa: SIM105 - the hot path; contextlib.suppress costs more
                self.conn.sendall(data)
            except OSError:
                pass  # the host is gone (crashed): its answers are dropped, we stay

    def _handle(self, kind: int, request_id: int, body: bytes) -> None:
        server = self.server
        if kind == PING:
            answer = {"tag": server.tag, "pid": os.getpid(), "key": server.files.key}
            self._reply(OK, request_id, dumps(answer))
            return
        if kind != CALL:
            self._reply(GONE, request_id, dumps(f"unknown message kind {kind}"))
            return
        if server.stopping:
            self._reply(GONE, request_id, dumps("the replica is stopping"))
            return
        try:
            results = server.run(pickle.loads(body))
        except Exception as exc:
            self._reply(ERROR, request_id, dumps(error_info(exc)))
            return
        except BaseException as exc:
            # SystemExit & co. escaping user code end the replica, as they would end
            # the thread of a threads-runtime replica: the host reports it dead.
            reason = f"{type(exc).__name__} escaped the user code: {exc}"
            self._reply(GONE, request_id, dumps(reason))
            server.die(reason)
        try:
            out = dumps(results)
        except Exception as exc:
            error = TypeError(f"replica {server.tag!r} cannot send its result back: {exc}")
            self._reply(ERROR, request_id, dumps(error_info(error)))
            return
        self._reply(OK, request_id, out)


def _send_status(status: BinaryIO | None, kind: int, body: bytes) -> None:
    if status is None:
        return
    # The host that started us may have crashed: then nobody reads, and that is fine.
    with contextlib.suppress(OSError):
        status.write(frame(kind, 0, body))
        status.close()


def _parse_args(argv: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    it = iter(argv)
    for flag in it:
        if not flag.startswith("--"):
            raise SystemExit(f"unexpected argument {flag!r}")
        options[flag[2:]] = next(it)
    return options


def main(argv: list[str] | None = None) -> int:
    """Run one replica: load the spec, construct the target, serve until SIGTERM."""
    options = _parse_args(sys.argv[1:] if argv is None else argv)
    files = ReplicaFiles(options["dir"], options["key"])
    lock_fd = int(options["lock-fd"])
    os.set_inheritable(lock_fd, False)  # held for life; never leaked to user subprocesses
    status_fd = int(options.get("status-fd", "-1"))
    status = os.fdopen(status_fd, "wb", buffering=0) if status_fd >= 0 else None
    if status_fd >= 0:
        os.set_inheritable(status_fd, False)

    with open(files.spec, encoding="utf-8") as f:
        spec: dict[str, Any] = json.load(f)
    tag: str = spec["tag"]
    record: dict[str, Any] = {
        "tag": tag,
        "key": files.key,
        "pid": os.getpid(),
        "create_time": process_create_time(),
        "phase": "starting",
        "error": None,
        "startup_timeout_s": spec["startup_timeout_s"],
    }
    files.write_record(record)

    try:
        # Import the user's code the way the host would have.
        extra = [p for p in spec["sys_path"] if p not in sys.path]
        sys.path[:0] = extra
        run, check_health = _build(spec)
        dir_fd = os.open(files.directory, os.O_RDONLY | os.O_DIRECTORY)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(files.socket)
        listener.bind(socket_address(files.socket, dir_fd))
        listener.listen(16)
    except BaseException as exc:
        traceback.print_exc()
        record.update(phase="failed", error=f"{type(exc).__name__}: {exc}")
        files.write_record(record)
        _send_status(status, ERROR, dumps(error_info(exc)))
        return 1

    record["phase"] = "ready"
    files.write_record(record)
    _send_status(status, OK, dumps({"pid": os.getpid(), "create_time": record["create_time"]}))
    print(f"replica {tag} (pid {os.getpid()}) serving {spec['target']}", flush=True)
    server = _Server(
        run=run,
        listener=listener,
        files=files,
        tag=tag,
        concurrency=max(1, int(spec["concurrency"])),
        record=record,
    )
    if check_health is not None:
        period = float(spec["health_check_period_s"])
        threading.Thread(
            target=server.check_health_forever, args=(check_health, period), daemon=True
        ).start()
    server.serve()
    return 0


if __name__ == "__main__":
    # Run by path: never let this directory (it holds a module named "subprocess")
    # shadow the standard library for the user's code.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.exit(main())
