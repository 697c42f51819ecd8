"""The ingress worker processes of ``servecore run --workers N``: start, watch, restart,
stop -- each by its pid (docs/design.md §5, "Ingress workers").

The server listens on the HTTP socket bound in preflight and hands that one listening
socket to every worker (``pass_fds``); each worker serves it with its own client and
router (:mod:`servecore._serving.worker`). A worker that exits while the server runs is
started again (after a pause that grows with quick repeated deaths); SIGTERM/SIGINT of
the server drains and stops them (SIGTERM, then SIGKILL past the graceful timeout).

The workers' pids are kept in ``workers.json`` in the state directory: workers outlive
a server that was SIGKILLed (that is the point: they keep serving), and the next
``servecore run`` on the same state directory (a restart, or a standby that took the
lease) takes their listening socket from them
(:mod:`servecore._serving.socket_handoff`), starts its own workers on it, and only
then stops them (:func:`find_stale_workers`, :func:`stop_workers`): the port never
closes. If they cannot hand it over, it stops them before it binds the port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from servecore._core.errors import ServecoreError
from servecore._serving.socket_handoff import handoff_path
from servecore._serving.worker_metrics import clear_worker_metrics

__all__ = [
    "WORKERS_RECORD",
    "WorkerPool",
    "WorkersFailed",
    "find_stale_workers",
    "stop_stale_workers",
    "stop_workers",
]

log = logging.getLogger("servecore.cli")

#: In the state directory: the pids of the running server's ingress workers.
WORKERS_RECORD = "workers.json"
#: How long a worker may take to hold its first routing table and serve.
READY_TIMEOUT_S = 60.0
#: The longest pause before starting a worker again after it died.
MAX_RESTART_PAUSE_S = 10.0
#: A worker that lived this long before dying is restarted without a pause.
STABLE_S = 30.0
#: The module a worker runs; stale workers are recognised by it.
WORKER_MODULE = "servecore._serving.worker"


class WorkersFailed(ServecoreError):
    """An ingress worker could not start serving."""

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(
            f"an ingress worker failed to start: {why}; nothing is served. See the log "
            f"above, or run with --workers 0 to serve from the server's own process"
        )


class WorkerPool:
    """``count`` worker processes serving ``sock`` (listening) for the controller on
    ``store``."""

    def __init__(
        self,
        *,
        store: Path,
        sock: socket.socket,
        count: int,
        timeout_s: float | None,
        stack: str | None = None,
        environment: dict[str, str] | None = None,
        record: str = WORKERS_RECORD,
    ) -> None:
        self.store = store.absolute()
        #: The file in the state directory the workers' pids are kept in
        #: (``servecore ingress`` keeps its own, apart from ``servecore run``'s).
        self.record = record
        #: Added to the workers' environment (a PostgreSQL store, see
        #: :func:`servecore._store_choice.store_environment`).
        self.environment = dict(environment or {})
        self.sock = sock
        self.count = count
        self.timeout_s = timeout_s
        self.stack = stack
        self.processes: list[trio.Process | None] = [None] * count
        self.restarts = 0
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        """The pids of the workers alive now."""
        return [p.pid for p in self.processes if p is not None and p.returncode is None]

    def _record(self) -> None:
        path = self.store.parent / self.record
        temp = path.with_name(f".{self.record}.tmp")
        try:
            temp.write_text(json.dumps({"pids": self.pids, "store": str(self.store)}))
            os.replace(temp, path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)

    def _command(self, ready_fd: int) -> list[str]:
        command = [
            *(sys.executable, "-m", WORKER_MODULE),
            *("--store", str(self.store), "--fd", str(self.sock.fileno())),
            *("--ready-fd", str(ready_fd)),
            "--handoff",
        ]
        if self.timeout_s is not None:
            command += ["--timeout", repr(self.timeout_s)]
        if self.stack is not None:
            command += ["--stack", self.stack]
        return command

    async def _spawn(self) -> trio.Process:
        """One worker, serving: returns once it said ``ready``."""
        read_fd, write_fd = os.pipe()
        try:
            process = await trio.lowlevel.open_process(
                self._command(write_fd),
                pass_fds=(self.sock.fileno(), write_fd),
                stdin=subprocess.DEVNULL,
                # A worker writes nothing there, and must not die writing to the pipe
                # of a server that was killed.
                stdout=subprocess.DEVNULL,
                env={**os.environ, **self.environment},
            )
        finally:
            os.close(write_fd)
        said = b""
        try:
            async with trio.lowlevel.FdStream(read_fd) as ready:
                with trio.move_on_after(READY_TIMEOUT_S):
                    while b"\n" not in said and (chunk := await ready.receive_some(64)):
                        said += chunk
        finally:
            if said.strip() != b"ready":
                # Not serving, or the server is stopping meanwhile: never leave it behind.
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
        if said.strip() != b"ready":
            why = (
                f"it exited with status {process.returncode}"
                if said == b""
                else f"it said {said[:200]!r}"
            )
            raise WorkersFailed(f"worker pid {process.pid}: {why}")
        return process

    async def _keep(self, slot: int, *, task_status: trio.TaskStatus[None]) -> None:
        """Keep worker ``slot`` serving: start it, and start it again when it dies."""
        process = await self._spawn()
        self.processes[slot] = process
        self._record()
        task_status.started()
        pause = 0.1
        while True:
            born = time.monotonic()
            await process.wait()
            if self._stopping:
                return
            log.warning(
                "ingress worker pid %d exited with status %s; starting another",
                process.pid,
                process.returncode,
            )
            if time.monotonic() - born > STABLE_S:
                pause = 0.1
            else:
                await trio.sleep(pause)
                pause = min(pause * 2, MAX_RESTART_PAUSE_S)
            try:
                process = await self._spawn()
            except WorkersFailed as exc:
                log.warning("%s", exc.why)
                continue
            self.restarts += 1
            self.processes[slot] = process
            self._record()

    async def run(self, *, task_status: trio.TaskStatus[list[int]]) -> None:
        """Start every worker (``task_status.started(pids)`` once all serve), keep them
        serving until cancelled, then stop them (:meth:`stop`).

        The metric files of an earlier server's workers are removed first: the sums
        its workers serve at ``/-/metrics`` start again from zero, as a restarted
        process's counters do."""
        clear_worker_metrics(self.store.parent)
        try:
            async with trio.open_nursery() as nursery:
                for slot in range(self.count):
                    await nursery.start(self._keep, slot)
                task_status.started(self.pids)
        finally:
            with trio.CancelScope(shield=True):
                await self.stop()

    async def stop(self, timeout_s: float = 6.0) -> None:
        """SIGTERM every worker (they drain requests in flight), SIGKILL those still
        alive after ``timeout_s``; by pid, only the processes this pool started."""
        self._stopping = True
        alive = [p for p in self.processes if p is not None and p.returncode is None]
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        with trio.move_on_after(timeout_s):
            for process in alive:
                await process.wait()
        for process in alive:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        self._record()


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def find_stale_workers(state_dir: Path, record: str = WORKERS_RECORD) -> list[int]:
    """The pids of the workers a previous server on ``state_dir`` left serving (it was
    killed, or it was a leader a standby took over from), as its ``record`` keeps them:
    only processes that are this state directory's workers (their command line runs
    the worker module on this store) count."""
    path = state_dir / record
    try:
        data: Any = json.loads(path.read_text())
        pids = [int(p) for p in data["pids"]]
        store = str(data["store"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [pid for pid in pids if _is_worker(pid, store)]


def _is_worker(pid: int, store: str) -> bool:
    args = _cmdline(pid)
    return WORKER_MODULE in args and store in args


def stop_workers(state_dir: Path, pids: list[int], timeout_s: float = 6.0) -> list[int]:
    """SIGTERM the workers ``pids`` of ``state_dir`` (they drain what they accepted),
    SIGKILL those still alive after ``timeout_s``; return the pids signalled. Blocking.
    Each pid's command line is checked again first: a pid reused by a process other
    than a worker is left alone."""
    stopped = []
    for pid in pids:
        args = _cmdline(pid)
        if WORKER_MODULE in args:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                stopped.append(pid)
    deadline = time.monotonic() + timeout_s
    for pid in stopped:
        while _cmdline(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # Gone, not merely signalled: the caller may bind the port they held.
    deadline = time.monotonic() + 2.0
    while any(_cmdline(pid) for pid in stopped) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in pids:
        with contextlib.suppress(OSError):
            handoff_path(state_dir, pid).unlink()
    return stopped


def stop_stale_workers(state_dir: Path, timeout_s: float = 6.0) -> list[int]:
    """Stop the workers a previous server on ``state_dir`` left behind
    (:func:`find_stale_workers`, :func:`stop_workers`); return their pids."""
    stale = stop_workers(state_dir, find_stale_workers(state_dir), timeout_s)
    with contextlib.suppress(OSError):
        (state_dir / WORKERS_RECORD).unlink()
    return stale
