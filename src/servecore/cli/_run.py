"""``servecore run``: open a controller on a store, apply an app file, serve HTTP.

Start-up: recover from the checkpoint (replicas of the subprocess and Ray runtimes that
are still alive are adopted, not restarted), apply the file, serve the routes and the
control socket. SIGINT or SIGTERM: stop taking connections, let requests in flight
finish (hypercorn's graceful timeout), close the control socket, then close the
controller. The checkpoint stays. In-process (threads) replicas stop with the
process; out-of-process replicas keep running, to be adopted by the next
``servecore run`` on the same store, unless ``--stop-replicas`` is given.

With ``--workers N`` (N > 0; subprocess runtime only) this process serves the control
socket and its routing-table feed, and HTTP is served by N ingress worker processes
sharing the bound socket (:mod:`servecore.cli._workers`); they keep serving while this
process is down, and the next run on the same state directory takes over from them.

Everything that can be checked before a replica starts is checked first
(:func:`preflight`): the state directory (created ``0700`` if missing; refused if
another user owns it or others may write to it; an existing directory's mode is never
changed), the control socket's path length, another server already running there, and
the HTTP port, which is bound then and held until serving starts.
A signal during the apply stops it: the exit status is ``128 + signal`` and, with
``--stop-replicas``, the replicas are stopped. A controller that loses its store's lease
(a store with one) steps down: the server says so in one paragraph, drains and exits
with :data:`STEPPED_DOWN_EXIT`, leaving the replicas to the controller that holds it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from servecore._control_socket import check_socket_path, check_state_dir, is_live, socket_path
from servecore._controller.controller import Controller, open_controller
from servecore._controller.remote_load import LOAD_REPORT_INTERVAL_S, STALE_AFTER_S
from servecore._controller.standby import open_store
from servecore._core.errors import InvalidConfig, ServecoreError, SteppedDown
from servecore._core.transitions import ReplicaStatus
from servecore._serving.dashboard import end_streams
from servecore._serving.socket_handoff import take_listening_socket
from servecore._store_choice import store_environment
from servecore.app import App, apply, describe
from servecore.cli._control import serve_control
from servecore.cli._stores import StoreChoice, choose_store
from servecore.cli._workers import WorkerPool, find_stale_workers, stop_workers
from servecore.http import LISTEN_BACKLOG, HTTPIngress, hypercorn_config
from servecore.replica_logs import forward_replica_logs
from servecore.stores.postgres import PostgresStore

__all__ = [
    "RUN_RECORD",
    "STEPPED_DOWN_EXIT",
    "AlreadyRunning",
    "CannotListen",
    "RunOptions",
    "bind_http",
    "http_address",
    "last_run",
    "preflight",
    "run_server",
]

log = logging.getLogger("servecore.cli")

#: How long requests in flight may take to finish after SIGINT/SIGTERM.
GRACEFUL_TIMEOUT_S = 5.0
#: The exit status of a server whose controller lost its store's lease and stepped down.
STEPPED_DOWN_EXIT = 3

#: In the state directory: the runtime the last ``servecore run`` used and whether
#: its replicas are known to have stopped with it, so that ``servecore status`` read
#: from the checkpoint does not call replicas RUNNING that cannot be (threads).
RUN_RECORD = "last-run.json"


def _record_run(state_dir: Path, runtime: str, *, replicas_stopped: bool) -> None:
    record = {"runtime": runtime, "replicas_stopped": replicas_stopped}
    temp = state_dir / f".{RUN_RECORD}.tmp"
    try:
        temp.write_text(json.dumps(record))
        os.replace(temp, state_dir / RUN_RECORD)
    except OSError as exc:  # only status's wording depends on it
        log.warning("cannot write %s: %s", state_dir / RUN_RECORD, exc)


def last_run(state_dir: Path) -> dict[str, Any] | None:
    """What :data:`RUN_RECORD` says of the last ``servecore run`` here, if anything."""
    try:
        data = json.loads((state_dir / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunOptions:
    """What ``servecore run`` was asked to do."""

    def __init__(
        self,
        *,
        app: App,
        runtime: str,
        store: Path | StoreChoice,
        host: str,
        port: int,
        name: str,
        stop_replicas: bool,
        timeout_s: float | None,
        replica_logs: bool = True,
        workers: int = 0,
        worker_stack: str | None = None,
        runtime_options: dict[str, Any] | None = None,
        standby: bool = False,
    ) -> None:
        self.app = app
        self.runtime = runtime
        #: What to open, and the state directory.
        self.store_choice = store if isinstance(store, StoreChoice) else choose_store(store)
        #: A path in the state directory standing for the store (workers are given it).
        self.store = self.store_choice.anchor
        self.host = host
        self.port = port
        self.name = name
        self.stop_replicas = stop_replicas
        self.timeout_s = timeout_s
        self.replica_logs = replica_logs
        #: Ingress worker processes (0: serve HTTP from this process).
        self.workers = workers
        #: The workers' server stack (None: the worker's default).
        self.worker_stack = worker_stack
        #: Keywords for the runtime's constructor ([server] runtime_options).
        self.runtime_options = dict(runtime_options or {})
        #: Wait for the store's lease, then take over (PostgreSQL).
        self.standby = standby
        #: Ingress workers of a previous server whose HTTP socket this one took over:
        #: stopped once this server serves (:func:`claim_http`).
        self.predecessors: list[int] = []

    @property
    def state_dir(self) -> Path:
        return self.store_choice.state_dir


class CannotListen(ServecoreError):
    """The HTTP address cannot be listened on (in use, not this host's, out of range)."""

    def __init__(self, host: str, port: int, why: str) -> None:
        self.host = host
        self.port = port
        super().__init__(
            f"cannot listen on {host}:{port}: {why}; nothing was started. Stop what uses "
            f"it, or pick another --host/--port"
        )


class AlreadyRunning(ServecoreError):
    """Another server already runs on the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        super().__init__(
            f"another servecore server is already running on {state_dir} (its control "
            f"socket answers); nothing was started. Use it (servecore status, servecore "
            f"apply), stop it first, or give this one another --store"
        )


def _prepare_state_dir(state_dir: Path) -> None:
    if not state_dir.exists():
        # Only the directory made here gets 0700; existing ones keep their mode.
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_state_dir(state_dir)


def _resolve(host: str, port: int) -> tuple[Any, ...]:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, OverflowError, UnicodeError) as exc:
        raise CannotListen(host, port, str(exc)) from exc


def http_address(host: str, port: int) -> tuple[Any, ...]:
    """The address ``host:port`` is bound at (as a socket's ``getsockname`` gives it)."""
    return tuple(_resolve(host, port)[4])


def bind_http(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not yet listening), or :class:`CannotListen`."""
    family, kind, proto, _, address = _resolve(host, port)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise CannotListen(host, port, exc.strerror or str(exc)) from exc
    return sock


def preflight(options: RunOptions) -> socket.socket | None:
    """Check what can fail before a replica starts; return the HTTP socket
    (:func:`claim_http`). A standby checks the state directory only and returns
    ``None``: it claims the control socket and the port once it holds the lease, since
    until then they are its leader's (on the same state directory)."""
    _prepare_state_dir(options.state_dir)
    check_socket_path(socket_path(options.state_dir))
    if options.standby:
        return None
    return claim_http(options)


def claim_http(options: RunOptions, *, leader_gone: bool = False) -> socket.socket:
    """The HTTP socket: taken from the ingress workers a previous server on this state
    directory left serving, if they hand it over (they are stopped once this server
    serves: :attr:`RunOptions.predecessors`), else bound now (not yet listening).
    ``leader_gone``: this server holds the store's lease, so a control socket that
    still answers is a fenced leader's, to be replaced rather than refused."""
    control = socket_path(options.state_dir)
    if not leader_gone and (control.exists() or control.is_symlink()) and is_live(control):
        raise AlreadyRunning(options.state_dir)
    # Workers of a server that was killed still serve (and hold the port): this
    # server takes their socket over, or stops them before it binds the port.
    stale = find_stale_workers(options.state_dir)
    if stale:
        try:
            address = http_address(options.host, options.port)
        except CannotListen:
            address = None
        sock = None
        if address is not None:
            sock = take_listening_socket(options.state_dir, stale, address)
        if sock is not None:
            log.warning(
                "took over the HTTP socket of %d ingress worker(s) a previous server left "
                "serving (pids %s); they stop once this server serves",
                len(stale),
                ", ".join(map(str, stale)),
            )
            options.predecessors = stale
            return sock
        stop_workers(options.state_dir, stale)
        log.warning(
            "stopped %d ingress worker(s) a previous server left running (pids %s)",
            len(stale),
            ", ".join(map(str, stale)),
        )
    return bind_http(options.host, options.port)


async def _retire_predecessors(options: RunOptions) -> None:
    """Stop the workers this server took the HTTP socket from, now that it serves on
    it (they drain what they accepted)."""
    stale, options.predecessors = options.predecessors, []
    if stale:
        await trio.to_thread.run_sync(stop_workers, options.state_dir, stale)
        log.warning("stopped the previous server's ingress workers (pids %s)", stale)


def _runtime_options(options: RunOptions) -> dict[str, Any]:
    if options.runtime not in ("subprocess", "ray"):
        return options.runtime_options
    found = options.runtime_options
    # Replica code calls other endpoints through this server's control socket.
    found = {"control_socket": str(socket_path(options.state_dir)), **found}
    if options.runtime == "ray":
        return found
    if "directory" not in found:
        # In the state directory, so that one directory holds the whole deployment
        # and two projects never share one.
        found = {**found, "directory": str(options.state_dir / "replicas")}
    return found


async def _show_progress(ctl: Controller, console: Console) -> None:
    """Replicas RUNNING out of wanted, per backend, until cancelled."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("replicas running"),
        console=console,
        transient=True,
    ) as progress:
        tasks: dict[str, Any] = {}
        while True:
            state = ctl.state
            for tag, b in sorted(state.backends.items()):
                running = sum(
                    1
                    for r in state.replicas.values()
                    if r.backend == tag and r.status is ReplicaStatus.RUNNING
                )
                if tag not in tasks:
                    tasks[tag] = progress.add_task(tag, total=b.wanted_replicas)
                progress.update(tasks[tag], completed=running, total=b.wanted_replicas)
            await trio.sleep(0.1)


async def _serve_http(
    ctl: Controller,
    options: RunOptions,
    shutdown: trio.Event,
    sock: socket.socket,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    # hypercorn takes the socket bound in preflight by its descriptor, and owns it now.
    config = hypercorn_config(Config(), f"fd://{sock.detach()}")
    assert config.backlog == LISTEN_BACKLOG
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    app = HTTPIngress(ctl, timeout_s=options.timeout_s)
    await serve(
        app,  # type: ignore[arg-type]
        config,
        shutdown_trigger=shutdown.wait,
        mode="asgi",
        task_status=task_status,
    )


async def run_server(
    options: RunOptions, console: Console, http_socket: socket.socket | None = None
) -> int:
    """The whole life of ``servecore run``; returns the exit status. ``http_socket``
    is :func:`preflight`'s (it runs here when not given; a standby claims it once it
    holds the lease)."""
    if http_socket is None and not options.standby:
        http_socket = preflight(options)
    try:
        return await _run(options, console, http_socket)
    finally:
        if http_socket is not None:
            http_socket.close()


def _store(options: RunOptions) -> Any:
    return options.store_choice.open()


async def _wait_for_lease(
    store: Any, options: RunOptions, console: Console, signals: Any, received: list[int]
) -> bool:
    """``--standby``: wait until the store's lease is free and take it; ``False`` if a
    signal came first (nothing was started)."""
    console.print(
        f"[bold]standby[/]: waiting for the lease on {escape(options.store_choice.label)}; "
        f"this server takes over when the controller holding it is gone"
    )
    with trio.CancelScope() as waiting:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    received.append(signum)
                    console.print(f"[bold]{signal.Signals(signum).name}[/]: stopped waiting")
                    waiting.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            await open_store(store, standby=True)
            nursery.cancel_scope.cancel()
    if waiting.cancelled_caught:
        return False
    epoch = getattr(store, "epoch", None)
    took = f" (epoch {epoch})" if epoch is not None else ""
    console.print(f"[bold]standby[/]: took the lease{took}; recovering and serving")
    return True


async def _run(options: RunOptions, console: Console, http_socket: socket.socket | None) -> int:
    shutdown = trio.Event()
    received: list[int] = []
    interrupted = False
    stepped_down: list[SteppedDown] = []

    def on_step_down(error: SteppedDown) -> None:
        stepped_down.append(error)
        console.print(
            f"[bold red]stepped down:[/] {escape(str(error))}. This server stops serving "
            f"and exits with status {STEPPED_DOWN_EXIT}; its replicas are left to the "
            f"controller that holds the lease now."
        )
        shutdown.set()

    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        contextlib.ExitStack() as claimed,
    ):
        store = _store(options)
        if options.standby:
            try:
                took = await _wait_for_lease(store, options, console, signals, received)
                if took and http_socket is None:
                    # The leader is gone (or fenced): its control socket and port,
                    # or its workers' socket, are this server's now.
                    http_socket = claimed.enter_context(claim_http(options, leader_gone=True))
            except BaseException:
                store.close()
                raise
            if not took:
                store.close()
                return 128 + received[0]
        assert http_socket is not None
        async with open_controller(
            options.runtime,
            store,
            name=options.name,
            runtime_options=_runtime_options(options),
            on_step_down=on_step_down,
        ) as ctl:
            # Recorded once the controller opened: a refused open (another runtime's
            # checkpoint) changes nothing here either.
            _record_run(options.state_dir, options.runtime, replicas_stopped=False)
            try:
                async with trio.open_nursery() as nursery:

                    async def watch_signals() -> None:
                        async for signum in signals:
                            received.append(signum)
                            console.print(
                                f"[bold]{signal.Signals(signum).name}[/]: draining requests "
                                f"and stopping (the checkpoint is kept)"
                            )
                            shutdown.set()
                            return

                    nursery.start_soon(watch_signals)
                    if isinstance(store, PostgresStore):
                        nursery.start_soon(_read_load_reports, ctl, store)
                    if options.replica_logs:
                        nursery.start_soon(forward_replica_logs, ctl)
                    applying = trio.CancelScope()

                    async def cancel_apply_on_shutdown() -> None:
                        await shutdown.wait()
                        applying.cancel()

                    nursery.start_soon(cancel_apply_on_shutdown)
                    with applying:
                        async with trio.open_nursery() as progress_nursery:
                            progress_nursery.start_soon(_show_progress, ctl, console)
                            applied = await apply(ctl, options.app)
                            progress_nursery.cancel_scope.cancel()
                        for command in applied.commands:
                            console.print(f"  {escape(describe(command))}")
                        if not applied.commands:
                            console.print(
                                f"{escape(options.app.source)}: already applied, nothing to do"
                            )
                        for tag, error in applied.failed.items():
                            failed = f"[red]backend {escape(repr(tag))} failed to start:[/]"
                            console.print(f"{failed} {escape(error)}")
                    if shutdown.is_set():
                        # Interrupted mid-apply: the app is not (all) applied; the exit
                        # status says so, and --stop-replicas still holds (below).
                        nursery.cancel_scope.cancel()
                        if not stepped_down:
                            console.print(
                                "[bold]interrupted[/] while applying: the app may be partly "
                                "applied; the next servecore run or apply finishes it"
                            )
                        interrupted = True
                    else:
                        await _serve(ctl, options, console, shutdown, http_socket, nursery)
            finally:
                if options.stop_replicas and not stepped_down:
                    with trio.CancelScope(shield=True):
                        await _stop_replicas(ctl, console)
                # Threads replicas lived in this process: they are gone with it.
                gone = options.stop_replicas or options.runtime == "threads"
                _record_run(options.state_dir, options.runtime, replicas_stopped=gone)
    if stepped_down:
        return STEPPED_DOWN_EXIT
    return 128 + received[0] if interrupted and received else 0


async def _read_load_reports(ctl: Controller, store: PostgresStore) -> None:
    """Count the load reported by routers on any host (clients and ingress workers
    of a PostgreSQL store write it to the database, not to the control socket): the
    fresh rows, twice a second, each new report once."""
    from servecore.stores.postgres_load import PostgresLoadReports

    reports = PostgresLoadReports(store)
    seen: dict[str, int] = {}
    try:
        while True:
            await trio.sleep(LOAD_REPORT_INTERVAL_S)
            try:
                rows = await trio.to_thread.run_sync(
                    reports.read, STALE_AFTER_S, abandon_on_cancel=True
                )
            except Exception as exc:  # the database is away: the next round retries
                log.debug("reading load reports from %s failed: %r", store.where, exc)
                continue
            for row in rows:
                if seen.get(row.reporter) == row.serial:
                    continue  # already counted; it ages out unless renewed
                seen[row.reporter] = row.serial
                try:
                    ctl.report_router_load(row.reporter, row.ongoing, row.wake)
                except InvalidConfig as exc:
                    log.warning("ignored a malformed load report from %s: %s", row.reporter, exc)
    finally:
        reports.close()


async def _serve(
    ctl: Controller,
    options: RunOptions,
    console: Console,
    shutdown: trio.Event,
    http_socket: socket.socket,
    nursery: trio.Nursery,
) -> None:
    """Serve HTTP and the control socket until ``shutdown``, then drain."""
    if options.workers:
        await _serve_with_workers(ctl, options, console, shutdown, http_socket, nursery)
        return
    binds = await nursery.start(_serve_http, ctl, options, shutdown, http_socket)

    control = await _start_control(ctl, options, console, shutdown, nursery)
    nursery.start_soon(_retire_predecessors, options)
    url = next((b for b in binds if b.startswith("http://")), binds[0])
    # One plain line on stdout, flushed: scripts wait for it.
    print(f"servecore: serving {url} (control socket {control})", flush=True)
    await shutdown.wait()
    # Status-page streams never finish on their own: end them, or they hold the drain.
    end_streams(ctl)
    # hypercorn returns once connections drained; then stop the rest.
    with trio.move_on_after(GRACEFUL_TIMEOUT_S + 1):
        while ctl.router is not None and any(
            load.running or load.queued for load in ctl.router.statistics().backends.values()
        ):
            await trio.sleep(0.05)
    nursery.cancel_scope.cancel()


async def _start_control(
    ctl: Controller,
    options: RunOptions,
    console: Console,
    shutdown: trio.Event,
    nursery: trio.Nursery,
) -> Any:
    def stop(stop_replicas: bool) -> None:
        # servecore shutdown [--stop-replicas]: as SIGTERM, and maybe the replicas too.
        if stop_replicas:
            options.stop_replicas = True
        console.print("[bold]servecore shutdown[/]: draining requests and stopping")
        shutdown.set()

    # A standby holds the lease: a control socket still there is its fenced leader's.
    serve = functools.partial(serve_control, shutdown=stop, replace=options.standby)
    return await nursery.start(serve, ctl, socket_path(options.state_dir))


async def _serve_with_workers(
    ctl: Controller,
    options: RunOptions,
    console: Console,
    shutdown: trio.Event,
    http_socket: socket.socket,
    nursery: trio.Nursery,
) -> None:
    """Serve the control socket (and its table feed) here and HTTP from
    ``options.workers`` worker processes sharing ``http_socket``, until ``shutdown``."""
    # The feed first: each worker subscribes to it before it serves.
    control = await _start_control(ctl, options, console, shutdown, nursery)
    http_socket.listen(LISTEN_BACKLOG)
    pool = WorkerPool(
        store=options.store,
        sock=http_socket,
        count=options.workers,
        timeout_s=options.timeout_s,
        stack=options.worker_stack,
        environment=store_environment(options.store_choice),
    )
    async with trio.open_nursery() as serving:
        pids = await serving.start(pool.run)
        # Its own workers serve: the previous server's (if any) can go.
        serving.start_soon(_retire_predecessors, options)
        host, port = http_socket.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        print(
            f"servecore: serving http://{host}:{port} (control socket {control}; "
            f"{len(pids)} ingress workers, pids {' '.join(map(str, pids))})",
            flush=True,
        )
        await shutdown.wait()
        # Cancelled, the pool drains and stops its workers (by pid) before it returns.
        serving.cancel_scope.cancel()
    nursery.cancel_scope.cancel()


async def _stop_replicas(ctl: Controller, console: Console) -> None:
    """Stop every replica without changing the checkpoint: the next run starts them
    again (as after a machine restart), rather than adopting them."""
    async with trio.open_nursery() as nursery:
        for tag, r in sorted(ctl.state.replicas.items()):
            b = ctl.state.backends.get(r.backend)
            timeout = b.config.graceful_shutdown_timeout_s if b is not None else 5.0
            nursery.start_soon(ctl.runtime.stop_replica, tag, timeout)
    console.print(f"stopped {len(ctl.state.replicas)} replica(s)")


def add_app_dir(app_dir: Path) -> None:
    """Make targets under ``app_dir`` importable here and in replica processes."""
    path = str(app_dir.absolute())
    if path not in sys.path:
        sys.path.insert(0, path)
    existing = os.environ.get("PYTHONPATH", "")
    if path not in existing.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (path, existing) if p)
