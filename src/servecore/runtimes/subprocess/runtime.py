"""SubprocessRuntime: the Runtime protocol over replica processes (see the package doc)."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import math
import os
import select
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import trio

from servecore._core.errors import ReplicaDiedError, RuntimeFenced
from servecore._core.transitions import ReplicaDied, StartReplica
from servecore._text import encodable
from servecore.runtimes._protocol import Query, ReplicaInfo, Report
from servecore.runtimes._streams import ItemStream
from servecore.runtimes.subprocess.blocking import BlockingCalls
from servecore.runtimes.subprocess.channel import Channel
from servecore.runtimes.subprocess.directory import RuntimeDirectory
from servecore.runtimes.subprocess.files import ReplicaFiles, open_lock, replica_key
from servecore.runtimes.subprocess.process import Process, reap_finished
from servecore.runtimes.subprocess.replica import Replica, open_replica_channel
from servecore.runtimes.subprocess.spawn import (
    KILL_WAIT_S,
    Starting,
    check_options,
    launch,
    replica_spec,
)
from servecore.runtimes.subprocess.wire import PING, frame, socket_address
from servecore.runtimes.toolkit import DEFAULT_STREAM_WINDOW

__all__ = ["SubprocessRuntime"]

log = logging.getLogger("servecore.runtimes.subprocess")

#: How long a replica that is alive but wrote no record yet may take to write it.
_RECORD_WAIT_S = 10.0
#: How long a replica whose connection closed may take to exit before it is killed.
_LOST_CONNECTION_GRACE_S = 2.0
#: The longest death reason reported (it goes into the controller's checkpoint).
_MAX_REASON_CHARS = 4000
_POLL_S = 0.02


class SubprocessRuntime:
    """Runs each replica in its own Python process; replicas outlive the host.

    ``directory`` is the runtime directory (default: beside a file store, else derived
    from the controller's namespace, see the package doc). ``python`` is the interpreter
    for replicas (default: the host's). ``startup_timeout_s`` bounds how long a replica may take to
    import and construct its target before it is killed and the start fails (a
    backend's ``runtime_options["startup_timeout_s"]`` overrides it). ``env`` adds
    environment variables for every replica. A target with a ``check_health()`` method
    has it called every ``health_check_period_s`` on a thread of its replica; if it
    raises (as in the threads runtime), or does not return within its backend's
    ``health_check_timeout_s``, the replica's process ends and it is reported dead
    with that error. ``control_socket`` is the control socket of the
    ``servecore run`` serving this runtime's controller (the CLI passes it): replica
    code's ``servecore.get_handle`` connects there (``servecore.connect``), on first use.

    Chosen by name with options: ``open_controller(runtime="subprocess",
    runtime_options={"directory": "/srv/replicas"})``.
    """

    #: Serves ``async def`` targets (on an asyncio loop in each replica process).
    supports_async_targets = True
    #: Serves generator targets through :meth:`stream`.
    supports_streaming = True

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        python: str | None = None,
        startup_timeout_s: float = 120.0,
        env: Mapping[str, str] | None = None,
        health_check_period_s: float = 10.0,
        control_socket: str | os.PathLike[str] | None = None,
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
        #: Where replica code connects to call other endpoints (None: it cannot).
        self.control_socket = (
            None if control_socket is None else str(Path(control_socket).absolute())
        )
        self.namespace: str | None = None
        self.store_id: str | None = None
        #: The store's lease epoch this runtime acts for (``None``: a store without one).
        self.epoch: int | None = None
        self._opened: RuntimeDirectory | None = None
        self._report: Report | None = None
        self._replicas: dict[str, Replica] = {}
        self._blocking = BlockingCalls(self._address_for_threads)
        self._thread_addresses: dict[str, str] = {}
        #: tag -> the starts of it in flight (a stop cuts them all short)
        self._starting: dict[str, list[Starting]] = {}
        self._key_locks: dict[str, trio.Lock] = {}

    @property
    def directory(self) -> Path:
        """The runtime directory (known once opened, or when given explicitly)."""
        if self._opened is not None:
            return self._opened.path
        if self._requested_directory is not None:
            return self._requested_directory
        raise RuntimeError("the runtime directory is known once the runtime is opened")

    def __repr__(self) -> str:
        where = self._opened.path if self._opened else self._requested_directory or "unopened"
        return f"SubprocessRuntime({str(where)!r})"

    # -- the Runtime protocol -------------------------------------------------------------

    async def open(
        self,
        *,
        namespace: str,
        report: Report,
        store_id: str | None = None,
        epoch: int | None = None,
    ) -> None:
        """Take the runtime directory of ``namespace`` (creating it, mode 0700), check
        that it is private to this user, and lock it.

        ``store_id`` names the controller's store, stably across processes: the
        resolved path of a file store, say, or ``"memory:<id>"`` for a store that lives
        only in this process. The directory records it; if it records another store
        whose replicas are alive, the open fails with
        :class:`~servecore.RuntimeDirectoryStoreMismatch` and those replicas are left
        alone. Without ``store_id`` nothing is checked or recorded.

        ``epoch`` is the store's lease epoch (stores with a lease): a runtime of a newer
        epoch of the same store takes the directory over even from a live owner that
        still holds it (a leader frozen past its lease), and from then on the older
        runtime refuses to start, stop, kill or adopt anything, raising
        :class:`~servecore.RuntimeFenced`; opening with an older epoch than the
        directory's raises it at once.
        """
        if self._opened is not None:
            await self.close()
        if store_id is not None and not isinstance(store_id, str):
            raise TypeError(f"store_id={store_id!r} must be a str or None")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise TypeError(f"epoch={epoch!r} must be an int or None")
        self._opened = await trio.to_thread.run_sync(
            RuntimeDirectory.open, self._requested_directory, namespace, store_id, epoch
        )
        self._key_locks = {}  # trio locks of an earlier trio.run must not be reused
        self.namespace = namespace
        self.store_id = store_id
        self.epoch = epoch
        self._report = report

    async def close(self) -> None:
        """Detach: connections close, the replica processes keep running."""
        self._report = None
        replicas, self._replicas = self._replicas, {}
        for replica in replicas.values():
            replica.watcher_scope.cancel()
            replica.probe_scope.cancel()  # detached: no longer this host's to judge
            replica.fail_pending("the runtime was closed")
            replica.channel.close()
            replica.process.close()
        opened, self._opened = self._opened, None
        self._thread_addresses.clear()  # they name the directory's descriptor
        if opened is not None:
            opened.close()

    async def start_replica(self, effect: StartReplica) -> None:
        """Start ``effect.tag`` in a new process and return once it serves; a live
        process of that tag (say, from before a host crash) is adopted instead.

        A replica that fails to import or construct its target raises that error here,
        with its own type and message (traceback text as ``__cause__``, and what it
        printed before failing as a note). A :meth:`stop_replica` of the tag while it
        starts kills it, and this raises :class:`~servecore.ReplicaDiedError`.
        """
        env, timeout = check_options(effect)
        self._check_fence()
        files = self._files(effect.tag)
        starting = Starting(effect.tag)
        self._starting.setdefault(effect.tag, []).append(starting)
        try:
            async with self._key_lock(files.key):
                if starting.stop_requested:
                    raise starting.stopped_error("the stop came before it was spawned")
                replica = self._replicas.get(effect.tag)
                if replica is not None and not replica.dead:
                    return
                self._check_fence()
                lock_fd = self._claim(files)
                if lock_fd is None:
                    if await self._adopt(files, starting) is not None:
                        return
                    if starting.stop_requested:
                        raise starting.stopped_error("it was being adopted")
                    lock_fd = self._claim(files)
                    if lock_fd is None:
                        raise RuntimeError(
                            f"replica {effect.tag!r}: a process still holds {files.lock} "
                            f"and could not be adopted or stopped"
                        )
                await self._spawn(effect, files, lock_fd, env, timeout, starting)
        finally:
            starting.done.set()
            starts = self._starting[effect.tag]
            starts.remove(starting)
            if not starts:
                del self._starting[effect.tag]

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        """Drain the calls in flight, SIGTERM, then SIGKILL once ``timeout_s`` has
        passed since the stop began. A start of ``tag`` still in flight is cut short
        the same way: its process is signalled and the start raises."""
        self._check_fence()
        deadline = trio.current_time() + max(0.0, timeout_s)
        starts = list(self._starting.get(tag, ()))
        for starting in starts:
            starting.stop_requested = True
        for starting in starts:
            await self._stop_start(starting, deadline, timeout_s)
        files = self._files(tag)
        async with self._key_lock(files.key):
            replica = self._replicas.get(tag)
            process: Process | None
            if replica is not None:
                replica.stopping = True
                with trio.move_on_at(deadline):
                    await replica.idle.wait()
                process = replica.process
            else:
                process = await self._locate(files, deadline)
            if process is not None:
                await self._terminate(process, deadline, tag, timeout_s)
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
        if self._opened is None:
            return self._peek()
        self._check_fence()
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
                await self._adopt(files, None)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(visit, key)
        return frozenset(tag for tag, r in self._replicas.items() if not r.dead)

    def call_blocking(
        self, tag: str, batch: Sequence[Query], timeout_s: float | None
    ) -> list[Any] | None:
        """Run ``batch`` on replica ``tag`` from a host thread, over that thread's own
        connection, without entering trio (see :mod:`.blocking`); ``None`` when the
        replica cannot take it here (the router then routes it through trio)."""
        return self._blocking.call(tag, batch, timeout_s)

    def _address_for_threads(self, tag: str) -> tuple[str, object] | None:
        # Read from host threads: a replica seen a moment late is caught by its
        # connection (EOF) or the handshake, never by a wrong answer.
        replica = self._replicas.get(tag)
        opened = self._opened
        if opened is None or replica is None:
            return None
        if replica.dead or replica.stopping or replica.draining:
            return None
        address = self._thread_addresses.get(tag)
        if address is None:  # the same for the replica's life: worked out once
            address = socket_address(str(replica.files.socket), opened.dir_fd)
            self._thread_addresses[tag] = address
        return address, replica.process.pid

    async def call(self, tag: str, batch: Sequence[Query]) -> list[Any]:
        """Run one batch on replica ``tag`` in its process; see the package doc for how
        exceptions travel. A replica that dies meanwhile raises ``ReplicaDiedError``."""
        replica = self._replicas.get(tag)
        if replica is None:
            raise ReplicaDiedError(tag, f"no live replica with this tag in {self!r}")
        return await replica.call(batch)

    async def stream(
        self, tag: str, query: Query, window: int = DEFAULT_STREAM_WINDOW
    ) -> ItemStream:
        """Open a stream of a generator target on replica ``tag``: its items as the
        replica yields them, at most ``window`` ahead of the consumer."""
        replica = self._replicas.get(tag)
        if replica is None:
            raise ReplicaDiedError(tag, f"no live replica with this tag in {self!r}")
        return await replica.stream(query, window)

    # -- operations -----------------------------------------------------------------------

    def pid(self, tag: str) -> int | None:
        """The process id of replica ``tag`` if it is connected here, else ``None``."""
        replica = self._replicas.get(tag)
        return None if replica is None or replica.dead else replica.process.pid

    def replica_info(self, tag: str) -> ReplicaInfo:
        """Replica ``tag``'s process id (if connected here) and its kept log file."""
        log_path = str(self._files(tag).log) if self._opened is not None else None
        return ReplicaInfo(pid=self.pid(tag), log_path=log_path)

    def kill(self, tag: str) -> None:
        """SIGKILL replica ``tag``'s process, as a crash would, and report it now.

        Blocks (briefly: SIGKILL cannot be caught) until the process is gone, then
        fails the calls in flight with :class:`~servecore.ReplicaDiedError` and reports
        ``ReplicaDied`` before returning, so a test (or an operator) can rely on the
        controller knowing. Call it on the trio thread the runtime was opened in.
        """
        self._check_fence()
        replica = self._replicas.get(tag)
        if replica is None or replica.dead:
            return
        process = replica.process
        process.signal(signal.SIGKILL)
        if process.pidfd is not None:
            select.select([process.pidfd], [], [], KILL_WAIT_S)
        else:
            with contextlib.suppress(psutil.Error):
                psutil.Process(process.pid).wait(KILL_WAIT_S)
        self._on_death(replica, f"process {process.pid} was killed by SubprocessRuntime.kill()")

    # -- helpers --------------------------------------------------------------------------

    async def _stop_start(self, starting: Starting, deadline: float, timeout_s: float) -> None:
        """Cut a start in flight short: SIGTERM now, SIGKILL at the deadline."""
        starting.stop_requested = True
        with trio.move_on_at(deadline):
            await self._signal_until_done(starting, signal.SIGTERM)
        if not starting.done.is_set():
            log.warning("replica %s still starting after %ss; killing it", starting.tag, timeout_s)
            with trio.move_on_after(KILL_WAIT_S):
                await self._signal_until_done(starting, signal.SIGKILL)

    @staticmethod
    async def _signal_until_done(starting: Starting, signum: int) -> None:
        while not starting.done.is_set():
            # Signalled again on each turn: the process may be spawned after the stop.
            if starting.process is not None:
                starting.process.signal(signum)
            with trio.move_on_after(_POLL_S * 5):
                await starting.done.wait()

    async def _terminate(
        self, process: Process, deadline: float, tag: str, timeout_s: float
    ) -> None:
        self._check_fence()  # again, just before the signal: a drain may have been long
        process.signal(signal.SIGTERM)
        with trio.move_on_at(deadline):
            await process.wait()
        if not process.exited.is_set():
            log.warning("replica %s did not stop within %ss; killing it", tag, timeout_s)
            process.signal(signal.SIGKILL)
            with trio.move_on_after(KILL_WAIT_S):
                await process.wait()
            if not process.exited.is_set():
                raise RuntimeError(f"replica {tag!r} (pid {process.pid}) survived SIGKILL")

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

    def _fenced(self) -> RuntimeFenced | None:
        """Why this runtime must not act (a newer epoch took its directory over)."""
        return None if self._opened is None else self._opened.fenced()

    def _check_fence(self) -> None:
        """Refuse to act for a controller whose epoch is older than the directory's."""
        fenced = self._fenced()
        if fenced is not None:
            raise fenced

    def _require_open(self) -> Path:
        if self._opened is None:
            raise RuntimeError("the subprocess runtime is not open; call open() first")
        return self._opened.path

    def _files(self, tag: str) -> ReplicaFiles:
        return ReplicaFiles(str(self._require_open()), replica_key(tag))

    def _key_lock(self, key: str) -> trio.Lock:
        lock = self._key_locks.get(key)
        if lock is None:
            lock = self._key_locks[key] = trio.Lock()
        return lock

    def _claim(self, files: ReplicaFiles) -> int | None:
        """Take the replica's lock (its fd), or ``None`` if a live process holds it."""
        fd = open_lock(files.lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _remove_if_free(self, files: ReplicaFiles) -> str | None:
        """Remove the files of a replica no process holds; where its log was kept."""
        fd = self._claim(files)
        if fd is None:
            return None
        try:
            return files.remove()
        finally:
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

    async def _locate(self, files: ReplicaFiles, deadline: float = math.inf) -> Process | None:
        """The live process of a replica this runtime has not connected to."""
        if not self._holds_lock(files):
            return None
        record = None
        with trio.move_on_at(deadline):
            record = await self._read_record(files)
        if record is not None:
            found = Process.adopt(int(record["pid"]), float(record["create_time"]), files.key)
            if found is not None:
                return found
        # Alive, but without a (matching) record: find it by its command line.
        for ps in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(ps.info["cmdline"] or ())
            if files.key in cmdline and files.directory in cmdline:
                with contextlib.suppress(psutil.Error):
                    return Process.adopt(ps.pid, ps.create_time(), files.key)
        return None

    def _holds_lock(self, files: ReplicaFiles) -> bool:
        fd = self._claim(files)
        if fd is None:
            return True
        os.close(fd)
        return False

    async def _adopt(self, files: ReplicaFiles, starting: Starting | None) -> Replica | None:
        """Connect to the live replica of ``files`` (waiting while it starts).

        Returns ``None`` when there is no usable replica: it exited, or it was stuck
        (never ready, or not answering) or stopped meanwhile, and has been killed.
        """
        process = await self._locate(files)
        if process is None:
            return None
        if starting is not None:
            starting.process = process
        record = files.read_record() or {}
        timeout = float(record.get("startup_timeout_s") or self.startup_timeout_s)
        ready = False
        with trio.move_on_after(timeout):
            while starting is None or not starting.stop_requested:
                record = files.read_record() or {}
                if record.get("phase") == "ready":
                    ready = True
                    break
                if record.get("phase") == "failed" or not self._holds_lock(files):
                    break
                await trio.sleep(_POLL_S)
        replica = None
        if ready and (starting is None or not starting.stop_requested):
            try:
                replica = await self._connect(record["tag"], files, process)
            except Exception as exc:  # refused, timed out, or someone else's socket
                log.warning("replica %s does not answer (%r); killing it", files.key, exc)
        if replica is None:
            fenced = self._fenced()
            if fenced is not None:
                process.close()
                raise fenced
            await self._kill(process)
            process.close()
            self._remove_if_free(files)
        return replica

    async def _kill(self, process: Process) -> None:
        process.signal(signal.SIGKILL)
        with trio.move_on_after(KILL_WAIT_S):
            await process.wait()

    async def _connect(self, tag: str, files: ReplicaFiles, process: Process) -> Replica:
        """Open the replica's socket, check it is ``tag``, and start its watcher."""
        assert self._opened is not None
        address = socket_address(files.socket, self._opened.dir_fd)
        channel, hello = await open_replica_channel(address, tag, _RECORD_WAIT_S)
        if hello.get("pid") != process.pid:
            channel.close()
            raise ValueError(f"socket {files.socket} is served by {hello!r}, not {tag!r}")
        replica = Replica(tag=tag, files=files, process=process, channel=channel)
        self._replicas[tag] = replica
        trio.lowlevel.spawn_system_task(self._watch, replica, name=f"replica {tag} watcher")
        spec = files.read_spec() or {}
        period, timeout = spec.get("probe_period_s"), spec.get("probe_timeout_s")
        if isinstance(period, (int, float)) and isinstance(timeout, (int, float)):
            trio.lowlevel.spawn_system_task(
                self._probe, replica, float(period), float(timeout), name=f"replica {tag} probe"
            )
        return replica

    async def _probe(self, replica: Replica, period_s: float, timeout_s: float) -> None:
        """Ask the replica "are you there?" every ``period_s`` on a connection of its
        own (so queries queued on the main one never delay the answer: the replica
        serves each connection with its own threads); one that has not answered within
        ``timeout_s`` (stopped, frozen, wedged in C code holding the GIL) is killed and
        reported dead, and the controller replaces it."""
        channel: Channel | None = None
        try:
            with replica.probe_scope:
                if self._opened is None or replica.dead:
                    return  # the runtime closed (or the replica died) before it began
                address = socket_address(replica.files.socket, self._opened.dir_fd)
                stream = await trio.open_unix_socket(address)
                channel = Channel(socket.socket(fileno=stream.socket.detach()))
                for request_id in itertools.count(1):
                    await trio.sleep(period_s)
                    if replica.stopping or replica.dead:
                        return  # a stop drains and forces on its own deadline
                    channel.send(frame(PING, request_id, b""))
                    with trio.move_on_after(timeout_s):
                        while True:
                            answer = await channel.receive()
                            if answer is None:
                                return  # the connection closed: the watcher sees why
                            if answer[1] == request_id:
                                break
                        continue
                    if replica.stopping or replica.dead:
                        return
                    if self._fenced() is not None:
                        # A newer leader owns the replica now (this host may just have
                        # woken from a pause longer than the timeout): its probe judges.
                        log.warning("replica %s: not killed, this runtime is fenced", replica.tag)
                        return
                    replica.unresponsive = (
                        f"it did not answer a health probe within {timeout_s:g}s "
                        f"(health_check_timeout_s; stopped, frozen or hung), so it was killed"
                    )
                    log.warning("replica %s %s", replica.tag, replica.unresponsive)
                    replica.process.signal(signal.SIGKILL)
                    with trio.move_on_after(KILL_WAIT_S):
                        await replica.process.wait()
                    self._on_death(replica)
                    return
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not (replica.dead or replica.stopping):
                log.warning("the health probe of replica %s stopped: %r", replica.tag, exc)
        except Exception:
            log.exception("the health probe of replica %s failed", replica.tag)
        finally:
            if channel is not None:
                channel.close()

    async def _spawn(
        self,
        effect: StartReplica,
        files: ReplicaFiles,
        lock_fd: int,
        env: dict[str, str],
        timeout: float | None,
        starting: Starting,
    ) -> None:
        timeout = timeout or self.startup_timeout_s
        reap_finished()
        try:
            files.remove(keep_lock=True)  # leftovers of an earlier process of this tag
            files.write_spec(
                replica_spec(effect, timeout, self.health_check_period_s, self.control_socket)
            )
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            process = await launch(
                files=files,
                lock_fd=lock_fd,
                python=self.python,
                env={**self.env, **env},
                timeout=timeout,
                starting=starting,
            )
            if starting.stop_requested:
                raise starting.stopped_error("it was ready just as the stop came")
            await self._connect(effect.tag, files, process)
        except Exception:
            # A replica that will not serve is not left behind (its own error is what
            # the caller sees); the watcher owns it only once it is connected.
            if self._replicas.get(effect.tag) is None and starting.process is not None:
                await self._kill(starting.process)
                starting.process.close()
            self._remove_if_free(files)
            raise
        except BaseException:
            # Cancelled (the host is going away): leave the child be, as a crash would;
            # the next controller adopts it or stops it.
            if self._replicas.get(effect.tag) is None and starting.process is not None:
                starting.process.close()
            raise

    async def _watch(self, replica: Replica) -> None:
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
                        if not replica.stopping and self._fenced() is None:
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

    def _on_death(self, replica: Replica, reason: str | None = None) -> None:
        if replica.dead:  # already handled (stopped, killed, or the runtime closed)
            return
        if reason is None and replica.unresponsive is not None:
            reason = f"{replica.unresponsive} ({replica.process.exit_reason()})"
        reason = reason or replica.process.exit_reason()
        record = replica.files.read_record()
        if record is not None and record.get("phase") == "dead" and record.get("error"):
            reason = f"{record['error']} ({reason})"
        if replica.stopping:
            replica.fail_pending(encodable(f"the replica was stopped ({reason})"))
            return
        tail = replica.files.log_tail()
        self._forget(replica, encodable(reason))
        kept = self._remove_if_free(replica.files)
        if tail:
            where = f" (kept at {kept})" if kept else ""
            reason = f"{reason}. Last lines of its log{where}:\n{tail}"
        reason = encodable(reason)
        if len(reason) > _MAX_REASON_CHARS:
            reason = reason[: _MAX_REASON_CHARS - 3] + "..."
        # The controller logs each death once (servecore.lifecycle, WARNING).
        log.debug("replica %s died: %s", replica.tag, reason)
        if self._report is not None:
            self._report(ReplicaDied(tag=replica.tag, reason=reason))

    def _forget(self, replica: Replica, reason: str) -> None:
        replica.dead_reason = replica.dead_reason or reason
        replica.fail_pending(replica.dead_reason)
        replica.watcher_scope.cancel()
        replica.probe_scope.cancel()
        if self._replicas.get(replica.tag) is replica:
            del self._replicas[replica.tag]
            self._thread_addresses.pop(replica.tag, None)
        replica.channel.close()
        replica.process.close()
