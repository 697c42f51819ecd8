"""The subprocess runtime: each replica is a child Python process (DESIGN §6).

Replicas outlive their host. Each one runs in its own session (``start_new_session``),
so a SIGKILL of the host, or a Ctrl-C in its terminal, leaves it running; the next
controller on the same store finds it again in the *runtime directory* and adopts it::

    async with servecore.open_controller(
        runtime="subprocess",
        runtime_options={"directory": "/var/run/myapp/replicas"},
        store=servecore.SQLiteStore("state.db"),
    ) as ctl:
        await ctl.create_backend("echo", "myapp.models:Echo", num_replicas=2)

The runtime directory
    One directory per controller namespace. By default it is
    ``$XDG_RUNTIME_DIR/servecore/NAMESPACE``, or ``TMPDIR/servecore-UID/NAMESPACE``
    without ``XDG_RUNTIME_DIR``; pass ``directory=`` to choose it (it is then used as is).
    It is created with mode 0700 and holds, per replica, a lock, a spec, a record, a Unix
    socket and a log (see ``_replica_main``). The runtime holds an ``flock`` on
    ``.owner.lock`` while it is open, so a second controller on the same directory fails
    at once with :class:`RuntimeDirectoryLocked` instead of adopting (and stopping) the
    first one's replicas; ``.namespace`` records the namespace the directory belongs to.

Liveness
    A replica is alive while it holds its lock file (the kernel drops an ``flock`` when
    the process dies, whatever happens to its pid). Its pid is checked against the
    recorded start time before any signal, and signals go through a ``pidfd``, so a
    reused pid is never signalled. Files of dead replicas are removed by
    :meth:`SubprocessRuntime.list_replicas` and on the way through ``start_replica``.

Start and stop
    ``start_replica`` writes the replica's spec, spawns ``_replica_main.py`` holding the
    tag's lock, and waits on a status pipe: the replica answers once its target is
    imported and constructed and its socket listens, or sends its own exception, which
    is raised here with its type (an import error, a constructor's ``ValueError``...). A
    replica not ready within ``startup_timeout_s`` is killed. ``stop_replica`` lets the
    calls in flight finish, sends SIGTERM (the replica takes no new call, finishes its
    own, and exits), and sends SIGKILL once ``timeout_s`` has passed since the stop
    began.

User code
    A replica runs its target under the threads runtime's rules (``servecore._batch``):
    ``@servecore.batch`` targets, ``max_batch_size``, ``reconfigure(user_config)``, and
    ``check_health()`` every ``health_check_period_s``. Up to
    ``max_concurrent_queries`` calls run at once, on that many threads.

Deaths
    A watcher per replica waits on the process (``pidfd``) and on its connection; a
    replica that dies other than by ``stop_replica`` is reported as
    :class:`~servecore.ReplicaDied` at once (with the reason the replica left in its
    record, if it ended itself), and calls in flight on it raise
    :class:`~servecore.ReplicaDiedError`. :meth:`SubprocessRuntime.kill` SIGKILLs a
    replica as a crash would (for tests and operators).

Wire format
    Length-prefixed frames over one Unix socket per replica; query arguments, results
    and exceptions are pickled (only this user can reach the socket; the controller's
    state never travels this way, it is checkpointed as JSON). A user exception
    is raised on the caller's side with its own type when that type can be imported
    (else as :class:`RemoteError`), and the replica's traceback text is kept as its
    ``__cause__`` (:class:`RemoteTraceback`), as :mod:`concurrent.futures` does.

``runtime_options`` (per backend) this runtime understands: ``env`` (a mapping of extra
environment variables for the replica processes) and ``startup_timeout_s`` (how long a
replica may take to import and construct its target; default: the runtime's). Any other
key makes the start fail with :class:`~servecore.InvalidConfig`.

Replicas import their target with the host's ``sys.path`` and working directory, so a
target importable in the host is importable in its replicas.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import pickle
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import outcome
import psutil
import trio

from servecore._core import ReplicaDied, StartReplica
from servecore._errors import (
    InvalidConfig,
    RemoteError,
    ReplicaDiedError,
    RuntimeDirectoryLocked,
)
from servecore.runtimes._protocol import Query, Report
from servecore.runtimes._remote_errors import rebuild_exception
from servecore.runtimes._replica_main import (
    CALL,
    ERROR,
    GONE,
    HEADER,
    OK,
    PING,
    ReplicaFiles,
    dumps,
    frame,
    socket_address,
)

__all__ = [
    "RUNTIME_OPTIONS",
    "RemoteError",
    "RemoteTraceback",
    "RuntimeDirectoryLocked",
    "SubprocessRuntime",
    "replica_key",
]

log = logging.getLogger("servecore.runtimes.subprocess")

#: The ``BackendConfig.runtime_options`` keys this runtime understands.
RUNTIME_OPTIONS = frozenset({"env", "startup_timeout_s"})

_REPLICA_MAIN = str(Path(__file__).with_name("_replica_main.py"))
#: How long a replica that is alive but wrote no record yet may take to write it.
_RECORD_WAIT_S = 10.0
#: How long SIGKILL may take to end a process (it cannot be caught; this is a safety net).
_KILL_WAIT_S = 10.0
#: How long a replica whose connection closed may take to exit before it is killed.
_LOST_CONNECTION_GRACE_S = 2.0
#: Two start times closer than this are the same process (btime can drift a little).
_CREATE_TIME_TOLERANCE_S = 1.0
_POLL_S = 0.02

#: Children this process spawned whose runtime closed while they ran; reaped later so
#: they do not linger as zombies of a long-lived host.
_unreaped: list[subprocess.Popen[bytes]] = []


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a replica process.

    Set as ``__cause__`` of the exception re-raised on the caller's side, so that the
    replica's frames show up in the caller's traceback.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(text)

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


def replica_key(tag: str) -> str:
    """The filename-safe key of a replica tag: ``"echo#3"`` -> ``"echo_3-1a2b3c4d5e"``.

    Readable (the tag with unsafe characters replaced, cut to 40 characters) and
    unique (a hash of the whole tag).
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)[:40]
    digest = hashlib.blake2b(tag.encode("utf-8"), digest_size=5).hexdigest()
    return f"{safe}-{digest}"


def _rebuild_exception(info: Mapping[str, Any], tag: str) -> BaseException:
    """Raise-able form of an :func:`~servecore.runtimes._replica_main.error_info`."""
    exc = rebuild_exception(info)
    exc.__cause__ = RemoteTraceback(info["traceback"])
    exc.add_note(f"raised in replica {tag!r} (subprocess runtime)")
    return exc


def _check_options(effect: StartReplica) -> tuple[dict[str, str], float | None]:
    options = effect.config.runtime_options
    unknown = sorted(set(options) - RUNTIME_OPTIONS)
    if unknown:
        raise InvalidConfig(
            "runtime_options",
            options,
            f"the subprocess runtime does not know key(s) {unknown}; "
            f"it understands {sorted(RUNTIME_OPTIONS)}",
            backend=effect.backend,
        )
    env = options.get("env", {})
    if not isinstance(env, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise InvalidConfig(
            "runtime_options['env']", env, "must map names to strings", backend=effect.backend
        )
    timeout = options.get("startup_timeout_s")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise InvalidConfig(
            "runtime_options['startup_timeout_s']",
            timeout,
            "must be a finite number of seconds > 0",
            backend=effect.backend,
        )
    return dict(env), (float(timeout) if timeout is not None else None)


def _log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _reap_finished() -> None:
    _unreaped[:] = [p for p in _unreaped if p.poll() is None]


# ---------------------------------------------------------------------------------------
# One replica process, seen from the host


class _Process:
    """A replica process, pinned by a pidfd so that a reused pid is never signalled."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.popen = popen
        self.pidfd: int | None = None
        self.exited = trio.Event()
        self._watching = False
        self._watch_scope = trio.CancelScope()
        with contextlib.suppress(OSError, AttributeError):
            self.pidfd = os.pidfd_open(pid)

    @classmethod
    def adopt(cls, pid: int, create_time: float, key: str) -> _Process | None:
        """The process ``pid`` if it is still the replica ``key`` started at
        ``create_time``; ``None`` if it is gone or the pid now belongs to another."""
        proc = cls(pid)
        try:
            ps = psutil.Process(pid)
            same = (
                abs(ps.create_time() - create_time) < _CREATE_TIME_TOLERANCE_S
                and ps.status() != psutil.STATUS_ZOMBIE
                and key in " ".join(ps.cmdline())
            )
        except (psutil.Error, OSError):
            same = False
        if not same:
            proc.close()
            return None
        return proc

    def alive(self) -> bool:
        if self.exited.is_set():
            return False
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            return bool(psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def signal(self, signum: int) -> None:
        """Send ``signum``; a process that already exited is left alone."""
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signum)
            elif self.alive():
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def exit_reason(self) -> str:
        if self.popen is not None:
            code = self.popen.poll()
            if code is not None and code < 0:
                return f"process {self.pid} was killed by {signal.Signals(-code).name}"
            if code is not None:
                return f"process {self.pid} exited with code {code}"
        return f"process {self.pid} exited"

    async def wait(self) -> None:
        """Return once the process has exited (a zombie counts as exited)."""
        if not self._watching:
            self._watching = True
            trio.lowlevel.spawn_system_task(self._watch, name=f"pid {self.pid} watcher")
        await self.exited.wait()

    async def _watch(self) -> None:
        # A system task: nothing but Cancelled may escape it.
        with self._watch_scope:
            try:
                if self.pidfd is None:
                    raise OSError("no pidfd on this system")
                await trio.lowlevel.wait_readable(self.pidfd)
            except (OSError, trio.ClosedResourceError, trio.BusyResourceError):
                while self.alive():
                    await trio.sleep(0.1)
            except Exception:
                log.exception("watching process %s failed", self.pid)
                return
            if self.popen is not None:
                self.popen.poll()  # reap it
            self.exited.set()

    def close(self) -> None:
        """Stop watching; the process itself is left alone."""
        self._watch_scope.cancel()
        if self.pidfd is not None:
            fd, self.pidfd = self.pidfd, None
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        if self.popen is not None and self.popen.poll() is None:
            _unreaped.append(self.popen)


def _parse_frame(buffer: bytearray) -> tuple[int, int, bytes] | None:
    """Take one whole frame off the front of ``buffer``, if there is one."""
    if len(buffer) < HEADER.size:
        return None
    length, kind, request_id = HEADER.unpack_from(buffer)
    end = HEADER.size + length
    if len(buffer) < end:
        return None
    body = bytes(buffer[HEADER.size : end])
    del buffer[:end]
    return kind, request_id, body


async def _read_frame(stream: trio.abc.ReceiveStream) -> tuple[int, int, bytes] | None:
    """Read one frame from ``stream`` (the status pipe); ``None`` if it ends first."""
    buffer = bytearray()
    while (message := _parse_frame(buffer)) is None:
        data = await stream.receive_some(1 << 16)
        if not data:
            return None
        buffer += data
    return message


class _Channel:
    """A non-blocking Unix socket driven with trio's low-level waits.

    The hot path has as few trio schedule points as possible (each costs several
    microseconds, the order of the whole round trip): :meth:`send` is synchronous --
    the kernel takes a small frame at once, and only what it does not take waits in
    ``backlog`` for :meth:`flush` (run by the replica's watcher) -- and :meth:`receive`
    waits for readability only when no whole frame is buffered. Frames are never
    interleaved, so senders need no lock, and a cancelled caller never leaves half a
    frame behind.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.inbox = bytearray()
        self.backlog = bytearray()
        self.backlog_ready = trio.Event()
        self.closed = False

    def send(self, data: bytes) -> None:
        if self.closed:
            raise trio.ClosedResourceError("the connection to the replica is closed")
        if self.backlog:
            self.backlog += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"sending to the replica failed: {exc}") from exc
        if sent < len(data):
            self.backlog += data[sent:]
            self.backlog_ready.set()

    async def flush(self) -> None:
        """Forever: send what :meth:`send` could not (the watcher runs this)."""
        while True:
            await self.backlog_ready.wait()
            while self.backlog and not self.closed:
                await trio.lowlevel.wait_writable(self.sock)
                try:
                    sent = self.sock.send(self.backlog)
                except BlockingIOError:
                    continue
                except OSError:
                    return  # the reader notices the broken connection
                del self.backlog[:sent]
            self.backlog_ready = trio.Event()

    async def receive(self) -> tuple[int, int, bytes] | None:
        """The next frame ``(kind, request_id, body)``, or ``None`` once the peer closed."""
        while (message := _parse_frame(self.inbox)) is None:
            if self.closed:
                raise trio.ClosedResourceError("the connection to the replica is closed")
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                return None
            if not data:
                return None
            self.inbox += data
        return message

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


class _Replica:
    """A connected replica: calls go out on its socket, answers come back by id."""

    def __init__(
        self, *, tag: str, files: ReplicaFiles, process: _Process, channel: _Channel
    ) -> None:
        self.tag = tag
        self.files = files
        self.process = process
        self.channel = channel
        #: request id -> the task waiting for its answer
        self.pending: dict[int, trio.lowlevel.Task] = {}
        self.ids = itertools.count(1)
        self.idle = trio.Event()
        self.idle.set()
        self.stopping = False
        self.dead_reason: str | None = None
        self.watcher_scope = trio.CancelScope()

    @property
    def dead(self) -> bool:
        return self.dead_reason is not None

    async def call(self, batch: Sequence[Query]) -> list[Any]:
        if self.dead_reason is not None:
            raise ReplicaDiedError(self.tag, self.dead_reason)
        if self.stopping:
            raise ReplicaDiedError(self.tag, "the replica is stopping")
        try:
            body = dumps([(q.args, q.kwargs) for q in batch])
        except Exception as exc:
            raise TypeError(
                f"the arguments of a query to replica {self.tag!r} cannot be pickled: {exc}"
            ) from exc
        request_id = next(self.ids)
        try:
            self.channel.send(frame(CALL, request_id, body))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = self.dead_reason or f"connection lost: {exc}"
            raise ReplicaDiedError(self.tag, reason) from exc
        self.pending[request_id] = trio.lowlevel.current_task()
        if self.idle.is_set():
            self.idle = trio.Event()

        def abort(_: Any) -> trio.lowlevel.Abort:
            # The caller gave up (cancelled): its answer will be dropped on arrival.
            self.pending.pop(request_id, None)
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            result: list[Any] = await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            if not self.pending:
                self.idle.set()
        return result

    def deliver(self, kind: int, request_id: int, body: bytes) -> None:
        task = self.pending.pop(request_id, None)
        if task is None:  # the caller gave up (cancelled); drop the answer
            return
        answer: outcome.Outcome[Any]
        try:
            if kind == OK:
                answer = outcome.Value(pickle.loads(body))
            elif kind == ERROR:
                answer = outcome.Error(_rebuild_exception(pickle.loads(body), self.tag))
            elif kind == GONE:
                answer = outcome.Error(ReplicaDiedError(self.tag, str(pickle.loads(body))))
            else:
                error = RuntimeError(f"replica {self.tag!r} sent message kind {kind}")
                answer = outcome.Error(error)
        except Exception as exc:  # e.g. a result whose class the host cannot import
            answer = outcome.Error(exc)
        trio.lowlevel.reschedule(task, answer)

    def fail_pending(self, reason: str) -> None:
        pending, self.pending = self.pending, {}
        for task in pending.values():
            trio.lowlevel.reschedule(task, outcome.Error(ReplicaDiedError(self.tag, reason)))


# ---------------------------------------------------------------------------------------
# The runtime


def _default_base() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "servecore"
    return Path(tempfile.gettempdir()) / f"servecore-{os.getuid()}"


class SubprocessRuntime:
    """Runs each replica in its own Python process; replicas outlive the host.

    ``directory`` is the runtime directory (default: derived from the controller's
    namespace, see the module doc). ``python`` is the interpreter for replicas (default:
    the host's). ``startup_timeout_s`` bounds how long a replica may take to import and
    construct its target before it is killed and the start fails (a backend's
    ``runtime_options["startup_timeout_s"]`` overrides it). ``env`` adds environment
    variables for every replica. A target with a ``check_health()`` method has it
    called every ``health_check_period_s`` on a thread of its replica; if it raises,
    the replica's process ends and it is reported dead with that error (as in the
    threads runtime).

    Chosen by name with options: ``open_controller(runtime="subprocess",
    runtime_options={"directory": "/srv/replicas"})``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        python: str | None = None,
        startup_timeout_s: float = 120.0,
        env: Mapping[str, str] | None = None,
        health_check_period_s: float = 10.0,
    ) -> None:
        for name, value in [
            ("startup_timeout_s", startup_timeout_s),
            ("health_check_period_s", health_check_period_s),
        ]:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a number of seconds > 0")
        self.health_check_period_s = float(health_check_period_s)
        # Absolute, so that replicas (and hosts started elsewhere) name the same place.
        self._requested_directory = None if directory is None else Path(directory).absolute()
        self.python = python or sys.executable
        self.startup_timeout_s = float(startup_timeout_s)
        self.env = dict(env or {})
        self.namespace: str | None = None
        self._directory: Path | None = None
        self._report: Report | None = None
        self._replicas: dict[str, _Replica] = {}
        self._key_locks: dict[str, trio.Lock] = {}
        self._owner_fd: int | None = None
        self._dir_fd: int | None = None

    @property
    def directory(self) -> Path:
        """The runtime directory (known once opened, or when given explicitly)."""
        if self._directory is not None:
            return self._directory
        if self._requested_directory is not None:
            return self._requested_directory
        raise RuntimeError("the runtime directory is known once the runtime is opened")

    def __repr__(self) -> str:
        where = self._directory or self._requested_directory or "unopened"
        return f"SubprocessRuntime({str(where)!r})"

    # -- the Runtime protocol -------------------------------------------------------------

    async def open(self, *, namespace: str, report: Report) -> None:
        """Take the runtime directory of ``namespace`` (creating it) and lock it."""
        if self._owner_fd is not None:
            await self.close()
        if self._requested_directory is not None:
            directory = self._requested_directory
        else:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", namespace) or "_"
            directory = _default_base() / safe
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner_fd = os.open(directory / ".owner.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(owner_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(owner_fd)
            raise RuntimeDirectoryLocked(str(directory)) from None
        marker = directory / ".namespace"
        try:
            owner = marker.read_text(encoding="utf-8")
        except FileNotFoundError:
            marker.write_text(namespace, encoding="utf-8")
        else:
            if owner != namespace:
                os.close(owner_fd)
                raise ValueError(
                    f"runtime directory {directory} belongs to the controller named "
                    f"{owner!r}, not {namespace!r}; give this controller its own directory"
                )
        self._owner_fd = owner_fd
        self._key_locks = {}  # trio locks of an earlier trio.run must not be reused
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._directory = directory
        self.namespace = namespace
        self._report = report

    async def close(self) -> None:
        """Detach: connections close, the replica processes keep running."""
        self._report = None
        replicas, self._replicas = self._replicas, {}
        for replica in replicas.values():
            replica.watcher_scope.cancel()
            replica.fail_pending("the runtime was closed")
            replica.channel.close()
            replica.process.close()
        for fd in (self._dir_fd, self._owner_fd):
            if fd is not None:
                os.close(fd)
        self._dir_fd = self._owner_fd = None

    async def start_replica(self, effect: StartReplica) -> None:
        """Start ``effect.tag`` in a new process and return once it serves; a live
        process of that tag (say, from before a host crash) is adopted instead.

        A replica that fails to import or construct its target raises that error here,
        with its own type and message (traceback text as ``__cause__``).
        """
        env, timeout = _check_options(effect)
        files = self._files(effect.tag)
        async with self._key_lock(files.key):
            replica = self._replicas.get(effect.tag)
            if replica is not None and not replica.dead:
                return
            lock_fd = self._claim(files)
            if lock_fd is None:
                if await self._adopt(files) is not None:
                    return
                lock_fd = self._claim(files)
                if lock_fd is None:
                    raise RuntimeError(
                        f"replica {effect.tag!r}: a process still holds {files.lock} "
                        f"and could not be adopted or stopped"
                    )
            await self._spawn(effect, files, lock_fd, env, timeout or self.startup_timeout_s)

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        """Drain the calls in flight, SIGTERM, then SIGKILL after ``timeout_s``."""
        files = self._files(tag)
        async with self._key_lock(files.key):
            deadline = trio.current_time() + max(0.0, timeout_s)
            replica = self._replicas.get(tag)
            process: _Process | None
            if replica is not None:
                replica.stopping = True
                with trio.move_on_at(deadline):
                    await replica.idle.wait()
                process = replica.process
            else:
                process = await self._locate(files)
            if process is not None:
                process.signal(signal.SIGTERM)
                with trio.move_on_at(deadline):
                    await process.wait()
                if not process.exited.is_set():
                    log.warning("replica %s did not stop within %ss; killing it", tag, timeout_s)
                    process.signal(signal.SIGKILL)
                    with trio.move_on_after(_KILL_WAIT_S):
                        await process.wait()
                    if not process.exited.is_set():
                        raise RuntimeError(f"replica {tag!r} (pid {process.pid}) survived SIGKILL")
            if replica is not None:
                self._forget(replica, "the replica was stopped")
            elif process is not None:
                process.close()
            self._remove_if_free(files)

    async def list_replicas(self) -> frozenset[str]:
        """Tags of the live replicas in the runtime directory, each adopted (connected
        and watched). A replica still starting is waited for; dead ones' files go.

        On a runtime that is not open (between two controllers), this only reads the
        directory: the tags of replicas that hold their lock and are ready.
        """
        if self._owner_fd is None:
            return self._peek()
        directory = self._require_open()
        keys = sorted(
            {p.name[: -len(".lock")] for p in directory.glob("*.lock") if p.name[0] != "."}
            | {p.name[: -len(".spec.json")] for p in directory.glob("*.spec.json")}
        )

        async def visit(key: str) -> None:
            files = ReplicaFiles(str(directory), key)
            async with self._key_lock(key):
                if any(r.files.key == key and not r.dead for r in self._replicas.values()):
                    return
                lock_fd = self._claim(files)
                if lock_fd is not None:  # nobody holds it: a dead replica's leftovers
                    files.remove()
                    os.close(lock_fd)
                    return
                await self._adopt(files)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(visit, key)
        return frozenset(tag for tag, r in self._replicas.items() if not r.dead)

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        """Run one batch on replica ``tag`` in its process; see the module doc for how
        exceptions travel. A replica that dies meanwhile raises ``ReplicaDiedError``."""
        replica = self._replicas.get(tag)
        if replica is None:
            raise ReplicaDiedError(tag, f"no live replica with this tag in {self!r}")
        return await replica.call(batch)

    # -- operations -----------------------------------------------------------------------

    def pid(self, tag: str) -> int | None:
        """The process id of replica ``tag`` if it is connected here, else ``None``."""
        replica = self._replicas.get(tag)
        return None if replica is None or replica.dead else replica.process.pid

    def kill(self, tag: str) -> None:
        """SIGKILL replica ``tag``'s process, as a crash would, and report it now.

        Blocks (briefly: SIGKILL cannot be caught) until the process is gone, then
        fails the calls in flight with :class:`~servecore.ReplicaDiedError` and reports
        ``ReplicaDied`` before returning, so a test (or an operator) can rely on the
        controller knowing. Call it on the trio thread the runtime was opened in.
        """
        replica = self._replicas.get(tag)
        if replica is None or replica.dead:
            return
        process = replica.process
        process.signal(signal.SIGKILL)
        if process.pidfd is not None:
            select.select([process.pidfd], [], [], _KILL_WAIT_S)
        else:
            with contextlib.suppress(psutil.Error):
                psutil.Process(process.pid).wait(_KILL_WAIT_S)
        self._on_death(replica, f"process {process.pid} was killed by SubprocessRuntime.kill()")

    # -- helpers --------------------------------------------------------------------------

    def _peek(self) -> frozenset[str]:
        """Ready replicas in the directory, read without taking it (see list_replicas)."""
        directory = self.directory
        tags = set()
        for path in directory.glob("*.lock"):
            if path.name[0] == ".":
                continue
            files = ReplicaFiles(str(directory), path.name[: -len(".lock")])
            if self._holds_lock(files):
                record = files.read_record()
                if record is not None and record.get("phase") == "ready":
                    tags.add(str(record["tag"]))
        return frozenset(tags)

    def _require_open(self) -> Path:
        if self._directory is None or self._owner_fd is None:
            raise RuntimeError("the subprocess runtime is not open; call open() first")
        return self._directory

    def _files(self, tag: str) -> ReplicaFiles:
        return ReplicaFiles(str(self._require_open()), replica_key(tag))

    def _key_lock(self, key: str) -> trio.Lock:
        lock = self._key_locks.get(key)
        if lock is None:
            lock = self._key_locks[key] = trio.Lock()
        return lock

    def _claim(self, files: ReplicaFiles) -> int | None:
        """Take the replica's lock (its fd), or ``None`` if a live process holds it."""
        fd = os.open(files.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _remove_if_free(self, files: ReplicaFiles) -> None:
        fd = self._claim(files)
        if fd is not None:
            files.remove()
            os.close(fd)

    async def _read_record(self, files: ReplicaFiles) -> dict[str, Any] | None:
        """The record of a live replica, waiting briefly for a process just spawned."""
        with trio.move_on_after(_RECORD_WAIT_S):
            while True:
                record = files.read_record()
                if record is not None:
                    return record
                fd = self._claim(files)
                if fd is not None:  # it died before writing one
                    os.close(fd)
                    return None
                await trio.sleep(_POLL_S)
        return None

    async def _locate(self, files: ReplicaFiles) -> _Process | None:
        """The live process of a replica this runtime has not connected to."""
        if not self._holds_lock(files):
            return None
        record = await self._read_record(files)
        if record is not None:
            found = _Process.adopt(int(record["pid"]), float(record["create_time"]), files.key)
            if found is not None:
                return found
        # Alive, but without a (matching) record: find it by its command line.
        for ps in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(ps.info["cmdline"] or ())
            if files.key in cmdline and files.directory in cmdline:
                with contextlib.suppress(psutil.Error):
                    return _Process.adopt(ps.pid, ps.create_time(), files.key)
        return None

    def _holds_lock(self, files: ReplicaFiles) -> bool:
        fd = self._claim(files)
        if fd is None:
            return True
        os.close(fd)
        return False

    async def _adopt(self, files: ReplicaFiles) -> _Replica | None:
        """Connect to the live replica of ``files`` (waiting while it starts).

        Returns ``None`` when there is no usable replica: it exited, or it was stuck
        (never ready, or not answering) and has been killed.
        """
        process = await self._locate(files)
        if process is None:
            return None
        record = files.read_record() or {}
        timeout = float(record.get("startup_timeout_s") or self.startup_timeout_s)
        ready = False
        with trio.move_on_after(timeout):
            while True:
                record = files.read_record() or {}
                if record.get("phase") == "ready":
                    ready = True
                    break
                if record.get("phase") == "failed" or not self._holds_lock(files):
                    break
                await trio.sleep(_POLL_S)
        replica = None
        if ready:
            try:
                replica = await self._connect(record["tag"], files, process)
            except Exception as exc:  # refused, timed out, or someone else's socket
                log.warning("replica %s does not answer (%r); killing it", files.key, exc)
        if replica is None:
            await self._kill(process)
            process.close()
            self._remove_if_free(files)
        return replica

    async def _kill(self, process: _Process) -> None:
        process.signal(signal.SIGKILL)
        with trio.move_on_after(_KILL_WAIT_S):
            await process.wait()

    async def _connect(self, tag: str, files: ReplicaFiles, process: _Process) -> _Replica:
        """Open the replica's socket, check it is ``tag``, and start its watcher."""
        stream = await trio.open_unix_socket(socket_address(files.socket, self._dir_fd))
        channel = _Channel(socket.socket(fileno=stream.socket.detach()))
        try:
            channel.send(frame(PING, 0, b""))
            with trio.fail_after(_RECORD_WAIT_S):
                answer = await channel.receive()
            if answer is None or answer[0] != OK:
                raise ValueError(f"replica {tag!r} closed the connection during the handshake")
            hello = pickle.loads(answer[2])
            if hello.get("tag") != tag or hello.get("pid") != process.pid:
                raise ValueError(f"socket {files.socket} is served by {hello!r}, not {tag!r}")
        except BaseException:
            channel.close()
            raise
        replica = _Replica(tag=tag, files=files, process=process, channel=channel)
        self._replicas[tag] = replica
        trio.lowlevel.spawn_system_task(self._watch, replica, name=f"replica {tag} watcher")
        return replica

    async def _spawn(
        self,
        effect: StartReplica,
        files: ReplicaFiles,
        lock_fd: int,
        env: dict[str, str],
        timeout: float,
    ) -> None:
        _reap_finished()
        files.remove(keep_lock=True)  # leftovers of an earlier process of this tag
        spec = {
            "tag": effect.tag,
            "backend": effect.backend,
            "target": effect.target,
            "init_args": list(effect.init_args),
            "init_kwargs": dict(effect.init_kwargs),
            "concurrency": effect.config.max_concurrent_queries,
            "max_batch_size": effect.config.max_batch_size,
            "user_config": effect.config.user_config,
            "startup_timeout_s": timeout,
            "health_check_period_s": self.health_check_period_s,
            "sys_path": [os.path.abspath(p or ".") for p in sys.path],
        }
        tmp = files.spec + ".tmp"
        Path(tmp).write_text(json.dumps(spec), encoding="utf-8")
        os.replace(tmp, files.spec)
        status_read, status_write = os.pipe()
        child_env = {**os.environ, **self.env, **env, "PYTHONUNBUFFERED": "1"}
        command = [
            self.python, "-P", _REPLICA_MAIN, "--dir", files.directory, "--key", files.key,
            "--lock-fd", str(lock_fd), "--status-fd", str(status_write),
        ]  # fmt: skip
        try:
            with open(files.log, "ab") as log_file:
                popen = await trio.to_thread.run_sync(
                    lambda: subprocess.Popen(
                        command,
                        pass_fds=(lock_fd, status_write),
                        start_new_session=True,
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env=child_env,
                    )
                )
        except BaseException:
            os.close(status_read)
            raise
        finally:
            # The child holds the lock now (same open file); the host lets go of its copy.
            os.close(lock_fd)
            os.close(status_write)
        process = _Process(popen.pid, popen)
        status = trio.lowlevel.FdStream(status_read)
        try:
            try:
                with trio.move_on_after(timeout) as waited:
                    answer = await _read_frame(status)
            finally:
                with trio.CancelScope(shield=True):
                    await status.aclose()
            if waited.cancelled_caught:
                raise TimeoutError(
                    f"replica {effect.tag!r} was not ready after {timeout}s (startup_timeout_s)"
                    f"; it was killed. Last lines of its log:\n{_log_tail(files.log)}"
                )
            if answer is not None and answer[0] == ERROR:
                raise _rebuild_exception(pickle.loads(answer[2]), effect.tag)
            if answer is None or answer[0] != OK:
                with trio.move_on_after(_KILL_WAIT_S):
                    await process.wait()
                raise RuntimeError(
                    f"replica {effect.tag!r}: {process.exit_reason()} before it was ready. "
                    f"Last lines of its log:\n{_log_tail(files.log)}"
                )
            await self._connect(effect.tag, files, process)
        except Exception:
            # A replica that will not serve is not left behind (its own error is what
            # the caller sees); the watcher owns it only once it is connected.
            if self._replicas.get(effect.tag) is None:
                await self._kill(process)
                process.close()
                self._remove_if_free(files)
            raise
        except BaseException:
            # Cancelled (the host is going away): leave the child be, as a crash would;
            # the next controller adopts it or stops it.
            if self._replicas.get(effect.tag) is None:
                process.close()
            raise

    async def _watch(self, replica: _Replica) -> None:
        """Notice the death of ``replica``: its process exits or its connection drops."""
        try:
            with replica.watcher_scope:
                read_all = trio.Event()
                async with trio.open_nursery() as nursery:

                    async def read() -> None:
                        with contextlib.suppress(trio.ClosedResourceError):
                            while (message := await replica.channel.receive()) is not None:
                                replica.deliver(*message)
                        read_all.set()
                        # The connection is gone. A replica that lives on without it is
                        # of no use to anyone: give it a moment to exit, then kill it.
                        if not replica.stopping:
                            with trio.move_on_after(_LOST_CONNECTION_GRACE_S):
                                await replica.process.wait()
                            if not replica.process.exited.is_set():
                                await self._kill(replica.process)
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(read)
                    nursery.start_soon(replica.channel.flush)
                    await replica.process.wait()
                    # Answers the replica sent just before it died are still in the
                    # socket: deliver them (end of stream follows at once) before
                    # failing the rest.
                    with trio.move_on_after(_LOST_CONNECTION_GRACE_S):
                        await read_all.wait()
                    nursery.cancel_scope.cancel()
                self._on_death(replica)
        except Exception:
            log.exception("watcher of replica %s failed", replica.tag)

    def _on_death(self, replica: _Replica, reason: str | None = None) -> None:
        if replica.dead:  # already handled (stopped, killed, or the runtime closed)
            return
        reason = reason or replica.process.exit_reason()
        record = replica.files.read_record()
        if record is not None and record.get("phase") == "dead" and record.get("error"):
            reason = f"{record['error']} ({reason})"
        if replica.stopping:
            replica.fail_pending(f"the replica was stopped ({reason})")
            return
        log.warning("replica %s died: %s", replica.tag, reason)
        self._forget(replica, reason)
        self._remove_if_free(replica.files)
        if self._report is not None:
            self._report(ReplicaDied(tag=replica.tag, reason=reason))

    def _forget(self, replica: _Replica, reason: str) -> None:
        replica.dead_reason = replica.dead_reason or reason
        replica.fail_pending(replica.dead_reason)
        replica.watcher_scope.cancel()
        if self._replicas.get(replica.tag) is replica:
            del self._replicas[replica.tag]
        replica.channel.close()
        replica.process.close()
