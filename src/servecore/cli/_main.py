"""The ``servecore`` command: every operator action is one.

::

    servecore run app.toml [--runtime threads|subprocess|ray|PLUGIN] [--store PATH|DSN]
                           [--host 127.0.0.1] [--port 8000] [--workers N] [--standby]
    servecore ingress [--store PATH|DSN] [--host H] [--port P] [--workers N]
    servecore status [--store PATH|DSN] [--json] [-w/--watch]
    servecore apply app.toml [--store PATH|DSN] [--dry-run]
    servecore retry BACKEND
    servecore delete endpoint NAME | servecore delete backend TAG
    servecore logs BACKEND|REPLICA [--follow]
    servecore shutdown [--stop-replicas]

State lives under ``.servecore/`` by default: the SQLite checkpoint ``state.db``, the
control socket ``control.sock`` and (subprocess runtime) ``replicas/``. ``--store`` may
name a PostgreSQL database instead (``postgresql://...``, see
:mod:`servecore.cli._stores`); the control socket is then in ``--state-dir``.

``servecore run`` takes its settings from the app file's ``[server]`` table where the
command line does not give them (a flag overrides the table; a relative ``store`` there
is relative to the app file), then from the defaults below.

Every error is one paragraph on stderr (``error: ...``) and exit status 1, never a
traceback: the command's own checks, the server's refusals, and anything unforeseen
(``servecore --debug ...`` prints the traceback as well).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import trio
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from servecore._controller.read_state import load_checkpoint
from servecore._controller.status import status_of
from servecore._core.errors import ServecoreError
from servecore.app import App, AppFileError, parse_app, read_app_text
from servecore.cli._control import ControlUnavailable, request, socket_path
from servecore.cli._render import failed_hint, print_status, render_status
from servecore.cli._stores import DEFAULT_STORE, StoreChoice, choose_store, is_dsn
from servecore.http import check_timeout
from servecore.runtimes import BUILTIN_RUNTIMES, ENTRY_POINT_GROUP

__all__ = ["main"]

_STORE_HELP = (
    "The SQLite checkpoint (its directory also holds the control socket), or a "
    "PostgreSQL DSN postgresql://... (optional ?checkpoint=NAME&lease_s=SECONDS). "
    f"[default: {DEFAULT_STORE}]"
)
_STATE_DIR_HELP = (
    "With a PostgreSQL --store: the directory of the control socket and run files "
    "[default: .servecore/postgres-CHECKPOINT]."
)


def _store_option(command: F) -> F:
    """``--store`` and ``--state-dir``, given to the command as one ``store``
    (:class:`StoreChoice`)."""

    command = click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=_STATE_DIR_HELP,
    )(command)
    command = click.option("--store", default=None, metavar="PATH|DSN", help=_STORE_HELP)(command)

    @functools.wraps(command)
    def wrapper(*args: Any, store: str | None, state_dir: Path | None, **kwargs: Any) -> Any:
        try:
            choice = choose_store(store, state_dir)
        except ServecoreError as exc:
            _fail(str(exc))
        return command(*args, store=choice, **kwargs)

    return wrapper  # type: ignore[return-value]


def _console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        # Piped into a file or grep: do not cut tags and paths to 80 columns.
        console = Console(stderr=stderr, highlight=False, width=200)
    return console


#: ``servecore --debug``: tracebacks too, after the one paragraph.
_DEBUG = False


def _fail(message: str, code: int = 1) -> NoReturn:
    _console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(code)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _message(exc: BaseException) -> str:
    """One paragraph for a person: our errors say all; others get their type named."""
    if isinstance(exc, ServecoreError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc} (unexpected; please report it with the command run)"


F = TypeVar("F", bound=Callable[..., Any])


def _one_paragraph(command: F) -> F:
    """Turn any error escaping ``command`` into one ``error:`` paragraph, exit 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (SystemExit, KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
            raise
        except BaseException as exc:
            leaves = [e for e in _leaves(exc) if not isinstance(e, KeyboardInterrupt)]
            if not leaves:
                raise
            logging.getLogger("servecore.cli").debug("command failed", exc_info=True)
            if _DEBUG:
                traceback.print_exception(exc, file=sys.stderr)
            _fail("; ".join(dict.fromkeys(_message(e) for e in leaves)))

    return wrapper  # type: ignore[return-value]


def _read(app_file: Path) -> tuple[str, App]:
    """The app file's text, read once, and the app parsed from that same text."""
    try:
        text = read_app_text(app_file)
        return text, parse_app(text, source=str(app_file))
    except AppFileError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot read {app_file}: {exc.strerror or exc}")


def _timeout(ctx: click.Context, param: click.Parameter, value: float) -> float:
    try:
        checked = check_timeout(value)
    except ServecoreError:
        checked = None
    if checked is None or math.isnan(value):
        raise click.BadParameter(
            f"{value!r} is not a finite number of seconds above 0 (at most a day)"
        )
    return checked


# Options that `run` and `ingress` share.
_timeout_option = click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=30.0,
    show_default=True,
    callback=_timeout,
    help="Seconds a request may take before 504.",
)
_worker_stack_option = click.option(
    "--worker-stack",
    type=click.Choice(["lean", "uvicorn", "asyncio", "trio"]),
    default=None,
    hidden=True,  # for benchmarks: the workers' server stack
)
_log_level_option = click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="servecore")
@click.option("--debug", is_flag=True, help="On an error, print its traceback too.")
def main(debug: bool) -> None:
    """Serve model or function code from an app file, crash-consistently."""
    global _DEBUG
    _DEBUG = debug
    # The controller also logs what its RuntimeWarnings say (traffic sent to a FAILED
    # backend), and the command prints that as a line of its own: a second, raw copy
    # from the warnings module is noise on a terminal.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"servecore(\.|$)")
    warnings.filterwarnings("ignore", message=r"endpoint .* now sends traffic to backend")


def _ask(store: StoreChoice, message: dict[str, Any], timeout_s: float | None = None) -> Any:
    """The running server's answer to ``message``; its refusal is this command's error."""
    reply = request(socket_path(store.state_dir), message, timeout_s=timeout_s)
    if not reply.get("ok"):
        _fail(str(reply.get("error", "the server refused it, and gave no reason")))
    return reply


@main.command()
@click.argument("app_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--runtime",
    default=None,
    metavar="NAME",
    help="Where replicas run: threads (of this process), subprocess (processes of their "
    "own), ray (Ray actors), or a plugin registered under the entry-point group "
    f"{ENTRY_POINT_GROUP}. [default: [server] runtime, else threads]",
)
@click.option("--store", default=None, metavar="PATH|DSN", help=_STORE_HELP)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=_STATE_DIR_HELP,
)
@click.option(
    "--standby",
    is_flag=True,
    help="With a PostgreSQL --store: wait until the server holding its lease is gone, then "
    "take over (adopting its replicas) and serve.",
)
@click.option("--host", default=None, help="Address to listen on. [default: 127.0.0.1]")
@click.option(
    "--port",
    default=None,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free port). [default: 8000]",
)
@click.option("--name", default=None, help="Controller namespace. [default: servecore]")
@click.option(
    "--app-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory the app's targets are imported from.",
)
@click.option(
    "--stop-replicas",
    is_flag=True,
    help="On exit, stop out-of-process replicas too (default: keep them for the next run).",
)
@click.option(
    "--replica-logs/--no-replica-logs",
    default=True,
    show_default=True,
    help="Forward what out-of-process replicas print to this command's log.",
)
@_timeout_option
@click.option(
    "--workers",
    type=click.IntRange(0, 256),
    default=None,
    help="Ingress worker processes serving HTTP, each with its own router, all on the "
    "same port; they keep serving while this process is down. 0: serve HTTP from this "
    "process. [default: the CPU count with --runtime subprocess, else 0]",
)
@_worker_stack_option
@_log_level_option
@_one_paragraph
def run(
    app_file: Path,
    runtime: str | None,
    store: str | None,
    state_dir: Path | None,
    standby: bool,
    host: str | None,
    port: int | None,
    name: str | None,
    app_dir: Path,
    stop_replicas: bool,
    replica_logs: bool,
    timeout_s: float,
    workers: int | None,
    worker_stack: str | None,
    log_level: str,
) -> None:
    """Apply APP_FILE and serve its endpoints over HTTP until Ctrl-C or SIGTERM.

    A restart on the same --store recovers from the checkpoint (live subprocess and
    Ray replicas are adopted, not restarted), then applies the file again.

    With --runtime subprocess, HTTP is served by --workers processes (default: one per
    CPU) that query the replicas directly and keep serving while this process is down;
    with --runtime ray too when asked for (each worker joins the cluster as a driver).

    Settings not given here come from the app file's [server] table (runtime,
    runtime_options, host, port, workers, store, state_dir, name), then the defaults.
    """
    _, app = _read(app_file)
    server = app.server
    here = app_file.parent
    runtime = runtime or server.runtime or "threads"
    _check_runtime_name(runtime)
    if store is None and server.store is not None:
        store = server.store if is_dsn(server.store) else str(here / server.store)
    if state_dir is None and server.state_dir is not None:
        state_dir = here / server.state_dir
    try:
        choice = choose_store(store, state_dir)
    except ServecoreError as exc:
        _fail(str(exc))
    if standby and not choice.is_postgres:
        _fail(
            f"--standby needs a store with a lease, a PostgreSQL --store (postgresql://...); "
            f"the SQLite store {choice.path} is locked by the server that has it, so a "
            f"second server on it cannot wait to take over"
        )
    host = host if host is not None else server.host or "127.0.0.1"
    port = port if port is not None else (server.port if server.port is not None else 8000)
    name = name or server.name or "servecore"
    if workers is None:
        workers = server.workers
    if workers is None:
        workers = (os.cpu_count() or 1) if runtime == "subprocess" else 0
    elif workers and runtime not in ("subprocess", "ray"):
        # Ray actors are reached by name from any Ray driver, a worker's too; threads
        # (or a plugin's replicas, as far as servecore knows) only from this process.
        where = "threads of this process" if runtime == "threads" else "not reachable by a client"
        _fail(
            f"--workers {workers} needs --runtime subprocess or ray: {runtime} replicas are "
            f"{where}, so worker processes cannot query them. "
            f"Use --workers 0 to serve HTTP from this process, or --runtime subprocess"
        )
    from servecore.cli._run import RunOptions, add_app_dir, preflight, run_server

    add_app_dir(app_dir)
    err = _console(stderr=True)
    logging.basicConfig(
        level=log_level.upper(),
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=True)],
        force=True,
    )
    options = RunOptions(
        app=app,
        runtime=runtime,
        store=choice,
        host=host,
        port=port,
        name=name,
        stop_replicas=stop_replicas,
        timeout_s=timeout_s,
        replica_logs=replica_logs,
        workers=workers,
        worker_stack=worker_stack,
        # The table's options are for the table's runtime, not one a flag chose instead.
        runtime_options=server.runtime_options if server.runtime in (None, runtime) else None,
        standby=standby,
    )
    # Before any replica starts: state directory, socket path, a server already
    # running there, the HTTP port.
    http_socket = preflight(options)
    code = trio.run(run_server, options, err, http_socket)
    sys.exit(code)


def _check_runtime_name(runtime: str) -> None:
    """Refuse a runtime that is neither built in nor a plugin's, before anything starts."""
    if runtime in BUILTIN_RUNTIMES:
        return
    from importlib.metadata import entry_points

    plugins = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
    if runtime not in plugins:
        _fail(
            f"no runtime named {runtime!r}: built-ins are {', '.join(BUILTIN_RUNTIMES)}; "
            f"installed plugins: {', '.join(plugins) or 'none'}. A plugin registers under "
            f"the entry-point group {ENTRY_POINT_GROUP!r} (pip install it first)"
        )


def _lease(store: StoreChoice) -> dict[str, Any] | None:
    """A PostgreSQL store's lease (leader, epoch, expiry), read from the database."""
    if not store.is_postgres:
        return None
    opened = store.open()
    try:
        info: dict[str, Any] | None = opened.lease_info()
    finally:
        opened.close()
    return info or {"holder": None, "epoch": 0, "expires_in_s": 0.0}


def _status_data(store: StoreChoice) -> dict[str, Any]:
    """Live from the running server, or read from the checkpoint when none runs."""
    data = _status_here(store)
    try:
        lease = _lease(store)
    except ServecoreError as exc:
        _fail(str(exc))
    if lease is not None:
        data["lease"] = lease
    return data


def _status_here(store: StoreChoice) -> dict[str, Any]:
    try:
        reply = request(socket_path(store.state_dir), {"op": "status"}, timeout_s=10.0)
    except ControlUnavailable:
        reply = None
    if reply is not None and reply.get("ok"):
        data: dict[str, Any] = reply["status"]
        return data
    if store.path is not None and not store.path.exists():
        _fail(f"no checkpoint at {store.path}; start a server with: servecore run APP.toml")
    try:
        opened = store.open()
        try:
            found = load_checkpoint(opened)
        finally:
            close = getattr(opened, "close", None)
            if close is not None and store.is_postgres:
                close()
    except ServecoreError as exc:
        _fail(str(exc))
    state, seq = found if found is not None else (None, 0)
    from servecore._core.transitions import State
    from servecore.cli._run import last_run

    run = last_run(store.state_dir) or {}
    gone = None
    if run.get("replicas_stopped") and state is not None and state.replicas:
        runtime = run.get("runtime")
        why = (
            "ran them in its own process (the threads runtime)"
            if runtime == "threads"
            else "stopped them on exit (--stop-replicas)"
        )
        gone = (
            f"no replica is running: the last servecore run on this store {why}; "
            f"the next servecore run starts them again"
        )
    data = status_of(state or State(), seq, replicas_gone=gone).as_dict()
    if run.get("runtime") == "subprocess" and not run.get("replicas_stopped"):
        _add_offline_pids(data, store.state_dir / "replicas")
    return data


def _add_offline_pids(data: dict[str, Any], replica_dir: Path) -> None:
    """With no server running, subprocess replicas may still be alive (they outlive
    their host): show the pid of each one whose record names a live process (the same
    pid *and* start time, so a reused pid is not taken for it)."""
    from servecore.runtimes.subprocess.files import process_create_time, replica_key

    records: dict[str, dict[str, Any]] = {}
    for path in replica_dir.glob("**/*.json"):
        if path.name.endswith(".spec.json"):
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("key"), str):
            records[record["key"]] = record
    for backend in data.get("backends", ()):
        for replica in backend.get("replicas", ()):
            record = records.get(replica_key(replica["tag"]))
            if record is None or not isinstance(record.get("pid"), int):
                continue
            pid: int = record["pid"]
            try:
                alive = abs(process_create_time(pid) - float(record["create_time"])) < 1.0
            except Exception:  # gone (psutil's NoSuchProcess too), or a torn record
                alive = False
            if alive:
                replica["pid"] = pid


@main.command()
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option(
    "-w", "--watch", is_flag=True, help="Show it again every --interval seconds until Ctrl-C."
)
@click.option(
    "--interval",
    type=click.FloatRange(0.1, 3600),
    default=2.0,
    show_default=True,
    help="Seconds between two looks with --watch.",
)
@_one_paragraph
def status(store: StoreChoice, as_json: bool, watch: bool, interval: float) -> None:
    """Show endpoints, backends and replicas: live from a running server, or read
    from the checkpoint (without locking it) when none runs."""
    if not watch:
        data = _status_data(store)
        if as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True))
        else:
            print_status(data, store.label, _console())
        return
    try:
        if as_json:  # one JSON object a line, for a script to follow
            while True:
                click.echo(json.dumps(_status_data(store), sort_keys=True))
                time.sleep(interval)
        from rich.live import Live

        with Live(console=_console(), auto_refresh=False) as live:
            while True:
                live.update(render_status(_status_data(store), store.label), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        return


def _print_failed(out: Console, failed: dict[str, str]) -> None:
    for tag, error in failed.items():
        out.print(f"[red]backend {escape(repr(tag))} failed to start:[/] {escape(error)}")
        out.print(f"  {escape(failed_hint(tag, error))}")


@main.command("apply")
@click.argument("app_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_store_option
@click.option(
    "--dry-run", is_flag=True, help="Print the plan (the commands apply would run); run none."
)
@_one_paragraph
def apply_command(app_file: Path, store: StoreChoice, dry_run: bool) -> None:
    """Apply APP_FILE to the server running on --store. An invalid file changes
    nothing and says why. A changed backend rolls its replicas in place; a FAILED
    backend the file restates as it is is retried."""
    # Read once: the server gets exactly the text checked here (a pipe such as
    # <(cat app.toml) could not be read a second time).
    text, _ = _read(app_file)
    message = {"op": "apply", "text": text, "source": str(app_file), "dry_run": dry_run}
    reply = request(socket_path(store.state_dir), message)
    if not reply.get("ok"):
        _fail(f"the server refused it: {reply.get('error', 'no reason given')}")
    out = _console()
    if dry_run:
        out.print(f"{escape(str(app_file))}: the plan (dry run, nothing applied):")
    for change in reply["changes"]:
        out.print(f"  {escape(change)}")
    if not reply["changes"]:
        out.print(f"{escape(str(app_file))}: already applied, nothing to do")
    _print_failed(out, reply["failed"])
    sys.exit(1 if reply["failed"] else 0)


@main.command()
@click.argument("backend")
@_store_option
@_one_paragraph
def retry(backend: str, store: StoreChoice) -> None:
    """Start FAILED backend BACKEND again with the same definition (after fixing what
    made it fail). A backend that is not FAILED is left as it is."""
    reply = request(socket_path(store.state_dir), {"op": "retry", "backend": backend})
    out = _console()
    if reply.get("ok"):
        out.print(f"backend {escape(repr(backend))}: {escape(str(reply['status']))}")
        return
    if reply.get("type") == "BackendStartError":
        _print_failed(out, {backend: str(reply.get("reason", reply.get("error")))})
        sys.exit(1)
    _fail(str(reply.get("error", "the server refused it, and gave no reason")))


@main.command()
@click.argument("kind", type=click.Choice(["endpoint", "backend"]))
@click.argument("name")
@_store_option
@_one_paragraph
def delete(kind: str, name: str, store: StoreChoice) -> None:
    """Delete endpoint NAME (its route goes) or backend TAG (its replicas stop). A
    backend an endpoint still sends traffic to is refused, naming the endpoint. The
    next apply of a file that names it creates it again."""
    _ask(store, {"op": "delete", "kind": kind, "name": name})
    _console().print(f"deleted {kind} {escape(repr(name))}")


@main.command()
@_store_option
@click.option(
    "--stop-replicas",
    is_flag=True,
    help="Stop out-of-process replicas too (default: keep them for the next run).",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0, 3600),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the server to exit.",
)
@_one_paragraph
def shutdown(store: StoreChoice, stop_replicas: bool, wait_s: float) -> None:
    """Stop the server running on --store, as SIGTERM does: requests in flight
    finish, the checkpoint is kept."""
    path = socket_path(store.state_dir)
    _ask(store, {"op": "shutdown", "stop_replicas": stop_replicas})
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            request(path, {"op": "status"}, timeout_s=5.0, busy_retry_s=1.0)
        except ServecoreError:
            break  # no server answers any more
        time.sleep(0.1)
    else:
        _fail(f"the server on {store.state_dir} was told to stop but still runs after {wait_s:g}s")
    what = " and its replicas" if stop_replicas else ""
    _console().print(f"stopped the server on {escape(str(store.state_dir))}{what}")


@main.command()
@click.argument("target")
@_store_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@_one_paragraph
def logs(target: str, store: StoreChoice, follow: bool) -> None:
    """Print the logs of backend TARGET's replicas, or of replica TARGET (such as
    echo#3): the kept logs of dead ones (subprocess runtime), then the live ones."""
    from servecore.cli._logs import show_logs

    show_logs(target, store.anchor, follow=follow, console=_console())


@main.command()
@_store_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free port).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Ingress worker processes serving HTTP on the port. [default: the CPU count]",
)
@_timeout_option
@_worker_stack_option
@_log_level_option
@_one_paragraph
def ingress(
    store: StoreChoice,
    host: str,
    port: int,
    workers: int | None,
    timeout_s: float,
    worker_stack: str | None,
    log_level: str,
) -> None:
    """Serve HTTP for the controller of --store from ingress worker processes, with no
    controller here, until Ctrl-C or SIGTERM.

    On a SQLite store the controller (servecore run, --runtime subprocess or ray) runs
    on this host and the workers follow its control socket; on a PostgreSQL store they
    follow the checkpoint in the database, so this may run on other hosts (Ray runtime).
    The workers keep serving on the last table while the controller is down.
    """
    from servecore.cli._ingress import IngressOptions, check_store, claim_ingress, run_ingress

    err = _console(stderr=True)
    logging.basicConfig(
        level=log_level.upper(),
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=True)],
        force=True,
    )
    options = IngressOptions(
        store=store,
        host=host,
        port=port,
        workers=workers if workers is not None else (os.cpu_count() or 1),
        timeout_s=timeout_s,
        worker_stack=worker_stack,
    )
    # Before anything is bound: a controller whose replicas the workers can reach.
    check_store(store)
    claim = claim_ingress(options)
    sys.exit(trio.run(run_ingress, options, err, claim))
