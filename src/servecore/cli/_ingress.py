"""``servecore ingress``: serve HTTP from ingress worker processes, with no controller in
this process, for a store whose controller runs elsewhere (docs/operating.md, "Ingress on
other hosts").

The command binds the HTTP port, starts ``--workers`` ingress workers on the listening
socket with the same :class:`~servecore.cli._workers.WorkerPool` as ``servecore run
--workers`` (each a client of the controller with its own router, querying the
replicas directly; one that dies is started again), and on SIGTERM or SIGINT drains
and stops them by pid. Where the workers' routing table comes from is the store's
business (:func:`servecore.open_client`): on a SQLite store the controller's control
socket, so the command runs on the controller's host (subprocess or Ray runtime); on a
PostgreSQL store the committed checkpoint in the database, so it may run on any host
that reaches the database and the replicas (the Ray runtime). Either way the workers
route on the last table they hold while the controller is down.

Its workers are not ``servecore run``'s, and neither command mistakes the other's for
its own: their pids are kept in a record of their own,
``ingress-HOST-PORT.json`` in the state directory (``servecore run`` keeps
``workers.json``), and the command holds ``ingress-HOST-PORT.lock`` (an ``flock``,
released by the kernel when the process dies) while it runs. A second ``servecore
ingress`` on the same state directory and address is refused while the first runs;
once the first is gone (killed: its workers keep serving), the next takes their
listening socket over (:mod:`servecore._serving.socket_handoff`), starts its own
workers on it and then stops the old ones, as ``servecore run`` does with its own.

Before anything is bound, the store is checked (:func:`check_store`): a controller
whose replicas another process cannot reach (threads), a SQLite store with no
controller answering, a checkpoint that names no runtime, and subprocess replicas
this host cannot see are refused in one paragraph each.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import trio
from rich.console import Console

from servecore._control_socket import (
    check_socket_owner,
    check_socket_path,
    check_state_dir,
    socket_path,
)
from servecore._core.errors import ServecoreError
from servecore._serving.socket_handoff import take_listening_socket
from servecore._store_choice import StoreChoice, store_environment
from servecore.cli._run import bind_http, http_address
from servecore.cli._workers import WorkerPool, WorkersFailed, find_stale_workers, stop_workers
from servecore.http import LISTEN_BACKLOG

__all__ = [
    "Claim",
    "IngressFailed",
    "IngressOptions",
    "IngressRefused",
    "IngressRunning",
    "check_store",
    "claim_ingress",
    "run_ingress",
]

log = logging.getLogger("servecore.cli")

#: How long the controller's control socket may take to say hello.
HELLO_TIMEOUT_S = 10.0
#: The runtimes whose replicas another process can query.
REACHABLE_RUNTIMES = ("subprocess", "ray")


class IngressRefused(ServecoreError):
    """The store's controller cannot be served from here (see :func:`check_store`)."""


class IngressRunning(ServecoreError):
    """Another ``servecore ingress`` already serves this address from this state
    directory."""

    def __init__(self, state_dir: Path, host: str, port: int) -> None:
        self.state_dir = state_dir
        super().__init__(
            f"another servecore ingress already serves {host}:{port} from {state_dir} "
            f"(it holds {state_dir / _name(host, port, 'lock')}); nothing was started. "
            f"Stop it first (SIGTERM), or give this one another --port"
        )


class IngressFailed(ServecoreError):
    """An ingress worker could not start serving."""

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(
            f"an ingress worker failed to start: {why}; nothing is served. See the "
            f"worker's message above; the controller must be running (servecore status)"
        )


class IngressOptions:
    """What ``servecore ingress`` was asked to do."""

    def __init__(
        self,
        *,
        store: StoreChoice,
        host: str,
        port: int,
        workers: int,
        timeout_s: float | None,
        worker_stack: str | None = None,
    ) -> None:
        self.store_choice = store
        self.host = host
        self.port = port
        #: How many ingress worker processes (at least 1).
        self.workers = workers
        self.timeout_s = timeout_s
        #: The workers' server stack (None: the worker's default).
        self.worker_stack = worker_stack

    @property
    def state_dir(self) -> Path:
        return self.store_choice.state_dir


def _name(host: str, port: int, suffix: str) -> str:
    """``ingress-HOST-PORT.SUFFIX``: the record (``json``) or lock (``lock``) of the
    ingress serving ``host:port``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", host) or "_"
    return f"ingress-{safe}-{port}.{suffix}"


# -- is there a controller whose replicas this host can reach? ------------------------------


def _hello(state_dir: Path) -> dict[str, Any] | None:
    """The table feed's hello of the server whose control socket is in ``state_dir``
    (its runtime, and how its replicas are reached), or ``None`` when none answers."""
    path = socket_path(state_dir)
    check_socket_path(path)
    if not (path.exists() or path.is_symlink()):
        return None
    # Never talk to a socket in a directory another user controls.
    check_state_dir(state_dir)
    check_socket_owner(path)
    data = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(HELLO_TIMEOUT_S)
            conn.connect(str(path))
            conn.sendall(b'{"op": "subscribe"}\n')
            while b"\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                data += chunk
        hello = json.loads(data.split(b"\n", 1)[0])
    except (OSError, ValueError):
        return None
    return hello if isinstance(hello, dict) and hello.get("ok") else None


def _unreachable(where: str, runtime: str) -> IngressRefused:
    return IngressRefused(
        f"the controller of {where} runs its replicas on the {runtime!r} runtime, which "
        f"no other process can reach, so ingress workers cannot query them; nothing was "
        f"started. Run the controller with --runtime subprocess or --runtime ray, or send "
        f"requests to its own HTTP port"
    )


def check_store(choice: StoreChoice) -> str:
    """The runtime of the controller on ``choice`` if ingress workers here can serve
    it, else :class:`IngressRefused` saying why and what to do. Blocking."""
    if not choice.is_postgres:
        assert choice.path is not None
        if not choice.path.exists():
            raise IngressRefused(
                f"no store at {choice.path}: no servecore run has used it, so there is no "
                f"table to serve; nothing was started. Start the controller first "
                f"(servecore run APP.toml --runtime subprocess --store {choice.path}), or "
                f"name its store with --store"
            )
        hello = _hello(choice.state_dir)
        if hello is None:
            raise IngressRefused(
                f"no servecore run answers at {socket_path(choice.state_dir)}: on a SQLite "
                f"store the ingress workers follow the controller's table through its "
                f"control socket, so the controller must be running on this host; nothing "
                f"was started. Start it first (servecore run APP.toml --runtime subprocess "
                f"--store {choice.path}), or use a PostgreSQL store to serve from other hosts"
            )
        runtime = str(hello.get("runtime"))
        if runtime not in REACHABLE_RUNTIMES:
            raise _unreachable(str(choice.path), runtime)
        return runtime
    from servecore._serving.pg_feed import read_table

    store = choice.open()
    try:
        _, named = read_table(store)
    finally:
        store.close()
    if named is None:
        raise IngressRefused(
            f"the checkpoint {choice.label} names no runtime: no servecore run has served "
            f"it yet, so there is no table to serve; nothing was started. Start the "
            f"controller first (servecore run APP.toml --runtime ray --store DSN)"
        )
    if named not in REACHABLE_RUNTIMES:
        raise _unreachable(choice.label, named)
    if named == "subprocess" and _hello(choice.state_dir) is None:
        replicas = choice.state_dir / "replicas"
        if not replicas.is_dir():
            raise IngressRefused(
                f"the controller of {choice.label} runs subprocess replicas, reached "
                f"through Unix sockets on its own host, and neither its control socket nor "
                f"its runtime directory is in {choice.state_dir}; nothing was started. Run "
                f"servecore ingress on the controller's host with its --state-dir, or use "
                f"the Ray runtime to serve from other hosts"
            )
    return named


# -- the socket, the lock and the workers a previous ingress left ---------------------------


class Claim:
    """What :func:`claim_ingress` holds: the bound socket, the lock, the record's name,
    and the workers of a previous ingress to stop once this one's serve."""

    def __init__(
        self, sock: socket.socket, lock: int, record: str, predecessors: list[int]
    ) -> None:
        self.sock = sock
        self.lock = lock
        self.record = record
        self.predecessors = predecessors

    def release(self, store: Path) -> None:
        """Close the socket, forget the record and give the lock back. Workers of a
        previous ingress not stopped yet (this one never served) stay recorded, for
        the next one to take over (``store``: the pids' store, as the pool records)."""
        state_dir = store.parent
        self.sock.close()
        with contextlib.suppress(OSError):
            if self.predecessors:
                data = {"pids": self.predecessors, "store": str(store.absolute())}
                (state_dir / self.record).write_text(json.dumps(data))
            else:
                (state_dir / self.record).unlink()
        lock_path = state_dir / self.record.replace(".json", ".lock")
        with contextlib.suppress(OSError):
            lock_path.unlink()  # still held: a newcomer finds the address free or ours
        os.close(self.lock)


def _lock(state_dir: Path, host: str, port: int) -> int:
    path = state_dir / _name(host, port, "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by the workers
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise IngressRunning(state_dir, host, port) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def claim_ingress(options: IngressOptions) -> Claim:
    """Prepare the state directory, take the lock and the HTTP socket (bound, not yet
    listening): the listening socket of the workers a killed ingress on this address
    left serving, if they hand it over, else the port bound now."""
    state_dir = options.state_dir
    if not state_dir.exists():
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_state_dir(state_dir)
    host, port = options.host, options.port
    if port == 0:
        # Any free port: no previous ingress can hold it.
        sock = bind_http(host, port)
        port = sock.getsockname()[1]
        try:
            lock = _lock(state_dir, host, port)
        except BaseException:
            sock.close()
            raise
        return Claim(sock, lock, _name(host, port, "json"), [])
    lock = _lock(state_dir, host, port)
    record = _name(host, port, "json")
    try:
        stale = find_stale_workers(state_dir, record)
        if stale:
            taken = take_listening_socket(state_dir, stale, http_address(host, port))
            if taken is not None:
                log.warning(
                    "took over the HTTP socket of %d ingress worker(s) a previous servecore "
                    "ingress left serving (pids %s); they stop once this one's serve",
                    len(stale),
                    ", ".join(map(str, stale)),
                )
                return Claim(taken, lock, record, stale)
            stop_workers(state_dir, stale)
            log.warning(
                "stopped %d ingress worker(s) a previous servecore ingress left running (pids %s)",
                len(stale),
                ", ".join(map(str, stale)),
            )
        return Claim(bind_http(host, port), lock, record, [])
    except BaseException:
        os.close(lock)
        raise


# -- serving -----------------------------------------------------------------------------


def _source(choice: StoreChoice) -> str:
    if choice.is_postgres:
        return f"table from PostgreSQL, checkpoint {choice.checkpoint!r}"
    return f"table from {socket_path(choice.state_dir)}"


async def run_ingress(options: IngressOptions, console: Console, claim: Claim) -> int:
    """Serve until SIGTERM or SIGINT, then drain and stop the workers; returns the exit
    status (0). The claim is released on the way out."""
    try:
        return await _serve(options, console, claim)
    finally:
        claim.release(options.store_choice.anchor)


async def _serve(options: IngressOptions, console: Console, claim: Claim) -> int:
    claim.sock.listen(LISTEN_BACKLOG)
    pool = WorkerPool(
        store=options.store_choice.anchor,
        sock=claim.sock,
        count=options.workers,
        timeout_s=options.timeout_s,
        stack=options.worker_stack,
        environment=store_environment(options.store_choice),
        record=claim.record,
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with trio.open_nursery() as nursery:

                async def watch_signals() -> None:
                    async for signum in signals:
                        console.print(
                            f"[bold]{signal.Signals(signum).name}[/]: draining requests and "
                            f"stopping the ingress workers"
                        )
                        # The pool drains and stops its workers (by pid) as it is cancelled.
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch_signals)
                pids = await nursery.start(pool.run)
                host, port = claim.sock.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                print(
                    f"servecore: serving http://{host}:{port} ({len(pids)} ingress workers, "
                    f"pids {' '.join(map(str, pids))}; {_source(options.store_choice)})",
                    flush=True,
                )
                if claim.predecessors:
                    stale, claim.predecessors = claim.predecessors, []
                    await trio.to_thread.run_sync(stop_workers, options.state_dir, stale)
                    log.warning("stopped the previous ingress workers (pids %s)", stale)
        except* WorkersFailed as group:
            failed = group.exceptions[0]
            assert isinstance(failed, WorkersFailed)
            raise IngressFailed(failed.why) from None
    return 0
