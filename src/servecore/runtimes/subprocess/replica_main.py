"""The replica process: load the spec, construct the target, serve it until SIGTERM.

The host starts this file *by path*, not with ``-m``::

    python -P .../servecore/runtimes/subprocess/replica_main.py --dir RUNTIME_DIR \\
        --key KEY --lock-fd N --status-fd M

``-P`` keeps this file's directory (which holds modules named ``process``, ``runtime``
and the like) off ``sys.path``, so that they never shadow the user's; the top of the
file removes it again for interpreters that ignore ``-P``, and imports servecore from
where the host imported it (then leaves ``sys.path`` as it found it). The replica
imports the wire format and the file helpers (standard library only) and
``servecore.runtimes.toolkit``, never trio or psutil. Its files are described in ``files.py``.

The replica writes its record first thing, then imports and constructs the target,
binds its socket (mode 0600), writes the record again (``ready``) and answers on the
status pipe: ``OK``, or ``ERROR`` with its exception (after writing
:data:`~servecore.runtimes.subprocess.files.FAILED_MARKER` and the traceback to its
log). Every text it sends is encodable UTF-8 (see ``servecore._text.encodable``).

An async target (``async def``) runs on the replica's asyncio loop, on a thread of its
own (``servecore.runtimes.toolkit.ReplicaLoop``): each connection's one reading thread
hands every call to the loop and reads on, the loop runs up to
``max_concurrent_queries`` of them at once (across all connections), and each answer
is written from the loop's thread as its task ends. A ``CANCEL`` frame cancels the
task of a call whose caller gave up; a host whose connection closes has its tasks
cancelled.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run by path (see the module doc)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    _ROOT = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))
    sys.path.insert(0, _ROOT)
    import servecore.runtimes.subprocess.files  # noqa: F401  (the host's servecore)

    sys.path.remove(_ROOT)

import contextlib
import pickle
import signal
import socket
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, BinaryIO

from servecore.runtimes.subprocess.files import (
    FAILED_MARKER,
    ReplicaFiles,
    process_create_time,
)
from servecore.runtimes.subprocess.wire import (
    CALL,
    CANCEL,
    COUNT,
    CREDIT,
    DRAINED,
    END,
    ERROR,
    GONE,
    HEADER,
    ITEM,
    OK,
    PING,
    REFUSED,
    STREAM,
    decode_call,
    dumps,
    encodable,
    encode_results,
    error_info,
    frame,
    socket_address,
)

if TYPE_CHECKING:
    import concurrent.futures

    from servecore.runtimes.toolkit import ReplicaCode, ReplicaLoop, StreamRun

__all__ = ["main"]

#: A call this fast, alone on its connection, runs on the reading thread (no hand-off).
_FAST_CALL_S = 0.001
#: How often a connection checks that an inline call has not held up reading too long.
_WATCHDOG_S = 0.005
#: Answers held back for one write at most (see ``_Connection._reply_soon``).
_HOLD_AT_MOST = 64
#: Bytes asked of the socket per read, and how far read frames may pile up before the
#: buffer drops them.
_RECV_SIZE = 256 * 1024
_COMPACT_AT = 256 * 1024


# ---------------------------------------------------------------------------------------
# The replica process


class _Terminate(Exception):
    """Raised in the main thread by the SIGTERM handler to leave the accept loop."""


class _Query:
    """What the shared batch runner reads of a query (``args``, ``kwargs``,
    ``deadline``): a plain slotted record, a few microseconds cheaper per query than
    the frozen attrs ``servecore.Query`` on the replica's hot path."""

    __slots__ = ("args", "deadline", "kwargs")

    def __init__(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float | None = None
    ) -> None:
        self.args = args
        self.kwargs = kwargs
        self.deadline = deadline


def _build(
    spec: dict[str, Any],
) -> tuple[Callable[[list[tuple[Any, Any, Any]]], list[Any]], ReplicaCode]:
    """Import and construct the target exactly as the threads runtime does; return
    ``run(batch)`` taking ``(args, kwargs, deadline)`` triples, and the built code (its
    ``check_health``, and for an async target its loop and ``run_async``).

    servecore itself is imported here, not at the top of the file: only after the
    record is written, and inside the start's error handling.
    """
    from servecore._calls import ConnectComposer
    from servecore.runtimes.toolkit import prepare_replica_code

    where = spec.get("control_socket")
    composer = ConnectComposer(where) if isinstance(where, str) else None
    code = prepare_replica_code(
        spec["target"],
        spec["init_args"],
        spec["init_kwargs"],
        backend=spec["backend"],
        max_batch_size=spec["max_batch_size"],
        user_config=spec["user_config"],
        allow_async=True,
        max_concurrent_queries=max(1, int(spec["concurrency"])),
        composer=lambda: composer,
    )
    runner = code.run

    def run(batch: list[tuple[Any, Any, Any]]) -> list[Any]:
        queries: Any = [_Query(args, kwargs, deadline) for args, kwargs, deadline in batch]
        return runner(queries)

    return run, code


class _Server:
    """Serves one constructed target on a listening socket until SIGTERM."""

    def __init__(
        self,
        *,
        run: Callable[[list[tuple[Any, Any, Any]]], list[Any]],
        listener: socket.socket,
        files: ReplicaFiles,
        tag: str,
        concurrency: int,
        record: dict[str, Any],
        code: ReplicaCode | None = None,
    ) -> None:
        self.run = run
        #: The built target (``None`` only in tests that serve a bare ``run``).
        self.code = code
        #: An async target's loop and coroutine function (``None`` for a sync target).
        self.loop: ReplicaLoop | None = code.loop if code is not None else None
        self.run_async: Callable[[Any], Awaitable[list[Any]]] | None = (
            code.run_async if code is not None else None
        )
        self.record = record
        self.listener = listener
        self.files = files
        self.tag = tag
        self.concurrency = concurrency
        self.stopping = False
        self.in_flight = 0
        self.idle = threading.Condition()
        #: Calls refused because they arrived while draining (never begun).
        self.refused = 0
        #: Calls dropped unrun because their deadline had passed when their turn came.
        self.late = 0
        #: Open host connections, told DRAINED before the process exits.
        self.connections: set[_Connection] = set()

    def begin(self) -> None:
        with self.idle:
            self.in_flight += 1

    def end(self) -> None:
        with self.idle:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.notify_all()

    def refuse(self) -> int:
        """Count one call refused while draining; return how many so far."""
        with self.idle:
            self.refused += 1
            return self.refused

    def dropped_late(self, exc: BaseException) -> None:
        """Count (and log) a call whose deadline passed before it could begin."""
        with self.idle:
            self.late += 1
            n = self.late
        print(f"replica {self.tag} dropped a call: {exc} ({n} so far)", flush=True)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stopping = True
        raise _Terminate

    def die(self, reason: str) -> None:
        """End the replica at once, leaving ``reason`` in its record for the host."""
        reason = encodable(reason)
        print(f"replica {self.tag} ends: {reason}", file=sys.stderr, flush=True)
        self.record.update(phase="dead", error=reason)
        with contextlib.suppress(OSError):
            self.files.write_record(self.record)
        sys.stdout.flush()
        os._exit(70)

    def check_health_forever(
        self, check_health: Callable[[], object], period: float, timeout: float | None
    ) -> None:
        """Call the target's ``check_health()`` every ``period`` seconds; if it raises,
        or does not return within ``timeout`` seconds (the backend's
        ``health_check_timeout_s``), the replica is dead (as in the threads runtime) and
        its process ends."""
        from servecore.runtimes.toolkit import run_health_check  # loaded with the target

        while not self.stopping:
            time.sleep(period)
            try:
                run_health_check(check_health, timeout, self.tag)
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
        # Calls that arrive meanwhile on open connections (a client whose routing
        # table is a step behind) are refused unbegun, so their router resends them.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.files.socket)
        with self.idle:
            print(f"replica {self.tag} draining: {self.in_flight} call(s) in flight", flush=True)
            while self.in_flight:
                self.idle.wait()
            refused = self.refused
        print(f"replica {self.tag} drained; refused {refused} call(s) unbegun", flush=True)
        # Every call that ran was answered before in_flight reached 0: whatever a
        # host still waits for was never begun, and DRAINED says so.
        with self.idle:
            connections = list(self.connections)
        for connection in connections:
            connection._reply(DRAINED, 0, b"")
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

    Frames are read from a buffer of what one ``recv`` brought. While more frames wait
    there, the answers of inline calls are held and go out together (one ``send`` here,
    one read for the host, instead of one each); the reader sends what is held before
    it waits for bytes, so an answer never waits for the host's next frame.

    For an async target one thread reads, hands each call to the replica's loop
    (:meth:`_submit`) and reads on; the loop bounds how many run at once.
    """

    def __init__(self, server: _Server, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        # What has been received and not yet read as frames (see _read).
        self.buffer = bytearray()
        self.position = 0
        self.read_lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.closed = False
        self.threads = 1 if server.loop is not None else server.concurrency
        self.threads_alive = self.threads
        #: request id -> an async call's task on the loop (for CANCEL)
        self.tasks: dict[int, concurrent.futures.Future[list[Any]]] = {}
        #: request id -> a stream being produced (for CREDIT and CANCEL)
        self.streams: dict[int, StreamRun] = {}
        self.threads_lock = threading.Lock()
        # Guards the fields below, shared by the threads and the watchdog.
        self.state_lock = threading.Lock()
        self.running = 0  # calls running on this connection
        self.inline_since: float | None = None  # when the inline call began
        self.role_passed = False  # the watchdog passed the inline reader's role on
        # The watchdog parks while no call runs inline (an idle connection must not wake
        # the process 200 times a second: with many connections, those wake-ups hold
        # the GIL when an answer is due); the next inline call wakes it.
        self.watchdog_parked = False
        self.watchdog_wake = threading.Event()
        self.call_time = 0.0  # moving average of how long calls take, in seconds
        # Answers of inline calls held while more frames wait in the buffer, sent in one
        # write before the reader next waits (or with the next answer sent at once).
        self.pending: list[bytes] = []

    def start(self) -> None:
        with self.server.idle:
            self.server.connections.add(self)
        for i in range(self.threads):
            threading.Thread(target=self._worker, name=f"replica-conn-{i}", daemon=True).start()
        if self.threads > 1:
            threading.Thread(target=self._watchdog, name="replica-watchdog", daemon=True).start()

    def _read(self) -> tuple[int, int, bytes] | None:
        """The next frame, or ``None`` once the host closed the connection. Before it
        waits for bytes it sends the answers held back (see :meth:`_reply_soon`)."""
        buffer = self.buffer
        while True:
            start = self.position
            if len(buffer) - start >= HEADER.size:
                length, kind, request_id = HEADER.unpack_from(buffer, start)
                end = start + HEADER.size + length
                if len(buffer) >= end:
                    with memoryview(buffer) as view:
                        body = bytes(view[start + HEADER.size : end])
                    if end == len(buffer):
                        buffer.clear()
                        self.position = 0
                    elif end > _COMPACT_AT:
                        del buffer[:end]
                        self.position = 0
                    else:
                        self.position = end
                    return kind, request_id, body
            self._flush()
            try:
                data = self.conn.recv(_RECV_SIZE)
            except OSError:
                return None
            if not data:
                return None
            buffer += data

    def _worker(self) -> None:
        try:
            while self._lead():
                pass
        finally:
            with self.threads_lock:
                self.threads_alive -= 1
                last = self.threads_alive == 0
            if last:  # nobody writes any more: the socket can go
                with self.server.idle:
                    self.server.connections.discard(self)
                self.closed = True
                self.watchdog_wake.set()  # a parked watchdog sees the connection closed
                for task in list(self.tasks.values()):
                    task.cancel()  # nobody is left to read their answers
                for stream in list(self.streams.values()):
                    stream.cancel()
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
            kind = message[0]
            if kind in (STREAM, CREDIT) or (kind == CANCEL and message[1] in self.streams):
                self._stream_frame(*message)  # the producer runs elsewhere; read on
                continue
            if self.server.loop is not None and kind in (CALL, CANCEL):
                self._submit(*message)  # the loop runs it; this thread reads on
                continue
            # Counted before the reading role can pass on: a drain cannot miss it.
            self.server.begin()
            with self.state_lock:
                inline = self.running == 0 and self.call_time < _FAST_CALL_S
                self.running += 1
                if inline:
                    self.inline_since = time.monotonic()
                    if self.watchdog_parked:
                        self.watchdog_parked = False
                        self.watchdog_wake.set()
            if not inline:
                self.read_lock.release()
            started = time.monotonic()
            try:
                self._handle(*message, inline=inline and self.threads > 1)
            finally:
                self.server.end()
                with self.state_lock:
                    self.running -= 1
                    self.call_time += (time.monotonic() - started - self.call_time) * 0.25
                    kept = False
                    if inline:  # only the inline call's own state: another may run beside
                        kept = not self.role_passed
                        self.inline_since = None
                        self.role_passed = False
            if not kept:
                return True

    def _watchdog(self) -> None:
        while not self.closed:
            time.sleep(_WATCHDOG_S)
            with self.state_lock:
                if self.inline_since is None:  # nothing runs inline: park until it does
                    self.watchdog_parked = True
                    self.watchdog_wake.clear()
            if self.watchdog_parked:
                self.watchdog_wake.wait()
                continue
            with self.state_lock:
                since = self.inline_since
                overdue = since is not None and time.monotonic() - since >= _WATCHDOG_S
                if overdue and not self.role_passed:
                    self.role_passed = True
                    self.read_lock.release()  # on the inline reader's behalf

    def _reply(self, kind: int, request_id: int, body: bytes) -> None:
        data = frame(kind, request_id, body)
        if self.pending:  # answers held back go first, so DRAINED follows them
            with self.state_lock:
                held, self.pending = self.pending, []
            data = b"".join([*held, data])
        self._send(data)

    def _reply_soon(self, kind: int, request_id: int, body: bytes) -> None:
        """Answer an inline call: held back while more of the host's frames wait in the
        buffer (their answers go out with it, in one write: one system call here and
        one read for the host instead of one each), else sent now."""
        data = frame(kind, request_id, body)
        with self.state_lock:
            held = self.pending
            held.append(data)
            # Held only by the thread that still reads: a reader flushes before it
            # waits, so nothing held can wait for the host's next frame.
            more = not self.role_passed and len(self.buffer) > self.position
            if more and len(held) < _HOLD_AT_MOST:
                return
            self.pending = []
        self._send(data if len(held) == 1 else b"".join(held))

    def _flush(self) -> None:
        """Send the answers held back (before the reader waits for the host)."""
        if self.pending:
            with self.state_lock:
                held, self.pending = self.pending, []
            if held:
                self._send(b"".join(held))

    def _send(self, data: bytes) -> None:
        with self.write_lock:
            try:  # noqa: SIM105 - the hot path; contextlib.suppress costs more
                self.conn.sendall(data)
            except OSError:
                pass  # the host is gone (crashed): its answers are dropped, we stay

    def _stream_frame(self, kind: int, request_id: int, body: bytes) -> None:
        """Open a stream (``STREAM``), give it credit (``CREDIT``) or stop it (``CANCEL``)."""
        server = self.server
        if kind == CREDIT:
            stream = self.streams.get(request_id)
            if stream is not None and len(body) == COUNT.size:
                stream.grant(COUNT.unpack(body)[0])
            return
        if kind == CANCEL:
            stream = self.streams.get(request_id)
            if stream is not None:
                stream.cancel()
            return
        server.begin()  # counted before the stopping check, as a call is
        if server.stopping:
            n = server.refuse()
            print(f"replica {server.tag} refused a stream: draining ({n} so far)", flush=True)
            self._reply(REFUSED, request_id, dumps("the replica is draining"))
            server.end()
            return
        try:
            if server.code is None:
                raise RuntimeError(f"replica {server.tag} serves no target that streams")
            args, kwargs, window = pickle.loads(body)
            stream = server.code.open_stream(
                _Query(args, kwargs),  # type: ignore[arg-type]
                window=max(1, int(window)),
                emit=lambda item: self._reply(
                    ITEM, request_id, encode_results(server.tag, item, "subprocess")
                ),
                finish=lambda error, cancelled: self._stream_ended(request_id, error, cancelled),
            )
        except Exception as exc:
            self._reply(ERROR, request_id, dumps(error_info(exc)))
            server.end()
            return
        self.streams[request_id] = stream
        stream.start()

    def _stream_ended(self, request_id: int, error: BaseException | None, cancelled: bool) -> None:
        """Say how stream ``request_id`` ended (on its producer's thread)."""
        from servecore.runtimes.toolkit import UserCodeEscaped

        server = self.server
        stream = self.streams.pop(request_id, None)
        emitted = stream.emitted if stream is not None else 0
        try:
            if cancelled:
                # Its caller stopped reading (or went away): no answer is awaited.
                print(
                    f"replica {server.tag}: stream {request_id} cancelled by its caller "
                    f"after {emitted} item(s)",
                    flush=True,
                )
            elif isinstance(error, UserCodeEscaped):
                self._reply(GONE, request_id, dumps(str(error)))
                server.die(str(error))
            elif error is not None:
                self._reply(ERROR, request_id, dumps(error_info(error)))
            else:
                self._reply(END, request_id, b"")
        finally:
            server.end()

    def _submit(self, kind: int, request_id: int, body: bytes) -> None:
        """Hand an async target's call to the loop (or cancel one, for ``CANCEL``)."""
        server = self.server
        if kind == CANCEL:
            task = self.tasks.get(request_id)
            if task is not None:
                task.cancel()
            return
        if server.stopping:
            self._reply(GONE, request_id, dumps("the replica is stopping"))
            return
        assert server.loop is not None and server.run_async is not None
        try:
            queries = [_Query(*query) for query in decode_call(body)]
        except Exception as exc:
            self._reply(ERROR, request_id, dumps(error_info(exc)))
            return
        run_async = server.run_async
        server.begin()
        task = server.loop.submit(lambda: run_async(queries))
        # Registered before the callback is added: a task already done runs it at once.
        self.tasks[request_id] = task
        task.add_done_callback(lambda done: self._answer(request_id, done))

    def _answer(self, request_id: int, task: concurrent.futures.Future[list[Any]]) -> None:
        """Write an async call's answer (on the loop's thread, as its task ends)."""
        from servecore.runtimes.toolkit import UserCodeEscaped

        server = self.server
        self.tasks.pop(request_id, None)
        try:
            if task.cancelled():
                self._reply(GONE, request_id, dumps("the query was cancelled"))
                return
            exc = task.exception()
            if exc is not None and _is_late(exc):
                server.dropped_late(exc)
            if isinstance(exc, UserCodeEscaped):
                self._reply(GONE, request_id, dumps(str(exc)))
                server.die(str(exc))
            if exc is not None:
                self._reply(ERROR, request_id, dumps(error_info(exc)))
                return
            results = task.result()
            try:
                out = encode_results(server.tag, results, "subprocess")
            except Exception as error:
                self._reply(ERROR, request_id, dumps(error_info(error)))
                return
            self._reply(OK, request_id, out)
        finally:
            server.end()

    def _handle(self, kind: int, request_id: int, body: bytes, *, inline: bool = False) -> None:
        server = self.server
        reply = self._reply_soon if inline else self._reply
        if kind == CANCEL:
            return  # a sync call cannot be cancelled: it runs to its end
        if kind == PING:
            answer = {"tag": server.tag, "pid": os.getpid(), "key": server.files.key}
            reply(OK, request_id, dumps(answer))
            return
        if kind != CALL:
            reply(GONE, request_id, dumps(f"unknown message kind {kind}"))
            return
        if server.stopping:
            # Checked after begin(): a call past this line is drained, never refused.
            n = server.refuse()
            print(f"replica {server.tag} refused a call: draining ({n} so far)", flush=True)
            reply(REFUSED, request_id, dumps("the replica is draining"))
            return
        try:
            results = server.run(decode_call(body))
        except Exception as exc:
            if _is_late(exc):
                server.dropped_late(exc)
            reply(ERROR, request_id, dumps(error_info(exc)))
            return
        except BaseException as exc:
            # SystemExit & co. escaping user code end the replica, as they would end
            # the thread of a threads-runtime replica: the host reports it dead.
            reason = f"{type(exc).__name__} escaped the user code: {exc}"
            reply(GONE, request_id, dumps(reason))
            server.die(reason)
        try:
            out = encode_results(server.tag, results, "subprocess")
        except Exception as exc:  # UnpicklableResult, naming the value's type
            reply(ERROR, request_id, dumps(error_info(exc)))
            return
        reply(OK, request_id, out)


def _is_late(exc: BaseException) -> bool:
    """Whether ``exc`` says the call was dropped unrun, its deadline past."""
    from servecore._core.errors import DeadlineExceeded  # loaded with the target already

    return isinstance(exc, DeadlineExceeded)


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

    spec = files.read_spec()
    if spec is None:
        raise SystemExit(f"replica {files.key}: no readable spec at {files.spec}")
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
        run, code = _build(spec)
        check_health = code.check_health
        dir_fd = os.open(files.directory, os.O_RDONLY | os.O_DIRECTORY)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(files.socket)
        # The socket file is made by bind, with the umask's mode: make it 0600.
        umask = os.umask(0o177)
        try:
            listener.bind(socket_address(files.socket, dir_fd))
        finally:
            os.umask(umask)
        listener.listen(16)
    except BaseException as exc:
        print(FAILED_MARKER, file=sys.stderr, flush=True)
        traceback.print_exc()
        info = error_info(exc)
        record.update(phase="failed", error=f"{type(exc).__name__}: {info['message']}")
        files.write_record(record)
        _send_status(status, ERROR, dumps(info))
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
        code=code,
    )
    if check_health is not None:
        period = float(spec["health_check_period_s"])
        bound = spec.get("probe_timeout_s")
        timeout = float(bound) if isinstance(bound, (int, float)) else None
        threading.Thread(
            target=server.check_health_forever,
            args=(check_health, period, timeout),
            daemon=True,
        ).start()
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
