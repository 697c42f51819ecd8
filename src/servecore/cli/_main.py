"""The ``servecore`` command: every operator action is one.

::

    servecore run app.toml [--runtime threads|subprocess|ray] [--store PATH]
                           [--host 127.0.0.1] [--port 8000] [--workers N]
    servecore status [--store PATH] [--json] [-w/--watch]
    servecore apply app.toml [--store PATH] [--dry-run]
    servecore retry BACKEND
    servecore delete endpoint NAME | servecore delete backend TAG
    servecore logs BACKEND|REPLICA [--follow]
    servecore shutdown [--stop-replicas]

State lives under ``.servecore/`` by default: the SQLite checkpoint ``state.db``, the
control socket ``control.sock`` and (subprocess runtime) ``replicas/``.

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
from servecore.http import check_timeout
from servecore.stores import SQLiteStore

__all__ = ["main"]

DEFAULT_STORE = Path(".servecore") / "state.db"

_store_option = click.option(
    "--store",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_STORE,
    show_default=True,
    help="The SQLite checkpoint; its directory also holds the control socket.",
)


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="servecore")
@click.option("--debug", is_flag=True, help="On an error, print its traceback too.")
def main(debug: bool) -> None:
    """Serve model or function code from an app file, crash-consistently."""
    global _DEBUG
    _DEBUG = debug


def _ask(store: Path, message: dict[str, Any], timeout_s: float | None = None) -> Any:
    """The running server's answer to ``message``; its refusal is this command's error."""
    reply = request(socket_path(store.parent), message, timeout_s=timeout_s)
    if not reply.get("ok"):
        _fail(str(reply.get("error", "the server refused it, and gave no reason")))
    return reply


@main.command()
@click.argument("app_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--runtime",
    type=click.Choice(["threads", "subprocess", "ray"]),
    default="threads",
    show_default=True,
    help="Where replicas run: threads of this process, processes of their own, Ray actors.",
)
@_store_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free port).",
)
@click.option("--name", default="servecore", show_default=True, help="Controller namespace.")
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
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=30.0,
    show_default=True,
    callback=_timeout,
    help="Seconds a request may take before 504.",
)
@click.option(
    "--workers",
    type=click.IntRange(0, 256),
    default=None,
    help="Ingress worker processes serving HTTP, each with its own router, all on the "
    "same port; they keep serving while this process is down. 0: serve HTTP from this "
    "process. [default: the CPU count with --runtime subprocess, else 0]",
)
@click.option(
    "--worker-stack",
    type=click.Choice(["uvicorn", "asyncio", "trio"]),
    default=None,
    hidden=True,  # for benchmarks: the workers' server stack
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@_one_paragraph
def run(
    app_file: Path,
    runtime: str,
    store: Path,
    host: str,
    port: int,
    name: str,
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
    CPU) that query the replicas directly and keep serving while this process is down.
    """
    if workers is None:
        workers = (os.cpu_count() or 1) if runtime == "subprocess" else 0
    elif workers and runtime != "subprocess":
        where = "threads of this process" if runtime == "threads" else "reached through Ray"
        _fail(
            f"--workers {workers} needs --runtime subprocess: {runtime} replicas are {where}, "
            f"so worker processes cannot query them. "
            f"Use --workers 0 to serve HTTP from this process, or --runtime subprocess"
        )
    from servecore.cli._run import RunOptions, add_app_dir, preflight, run_server

    add_app_dir(app_dir)
    _, app = _read(app_file)
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
        store=store,
        host=host,
        port=port,
        name=name,
        stop_replicas=stop_replicas,
        timeout_s=timeout_s,
        replica_logs=replica_logs,
        workers=workers,
        worker_stack=worker_stack,
    )
    # Before any replica starts: state directory, socket path, a server already
    # running there, the HTTP port.
    http_socket = preflight(options)
    code = trio.run(run_server, options, err, http_socket)
    sys.exit(code)


def _status_data(store: Path) -> dict[str, Any]:
    """Live from the running server, or read from the checkpoint when none runs."""
    try:
        reply = request(socket_path(store.parent), {"op": "status"}, timeout_s=10.0)
    except ControlUnavailable:
        reply = None
    if reply is not None and reply.get("ok"):
        data: dict[str, Any] = reply["status"]
        return data
    if not store.exists():
        _fail(f"no checkpoint at {store}; start a server with: servecore run APP.toml")
    try:
        found = load_checkpoint(SQLiteStore(store))
    except ServecoreError as exc:
        _fail(str(exc))
    state, seq = found if found is not None else (None, 0)
    from servecore._core.transitions import State
    from servecore.cli._run import last_run

    run = last_run(store.parent) or {}
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
    return status_of(state or State(), seq, replicas_gone=gone).as_dict()


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
def status(store: Path, as_json: bool, watch: bool, interval: float) -> None:
    """Show endpoints, backends and replicas: live from a running server, or read
    from the checkpoint (without locking it) when none runs."""
    if not watch:
        data = _status_data(store)
        if as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True))
        else:
            print_status(data, str(store), _console())
        return
    try:
        if as_json:  # one JSON object a line, for a script to follow
            while True:
                click.echo(json.dumps(_status_data(store), sort_keys=True))
                time.sleep(interval)
        from rich.live import Live

        with Live(console=_console(), auto_refresh=False) as live:
            while True:
                live.update(render_status(_status_data(store), str(store)), refresh=True)
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
def apply_command(app_file: Path, store: Path, dry_run: bool) -> None:
    """Apply APP_FILE to the server running on --store. An invalid file changes
    nothing and says why. A changed backend rolls its replicas in place; a FAILED
    backend the file restates as it is is retried."""
    # Read once: the server gets exactly the text checked here (a pipe such as
    # <(cat app.toml) could not be read a second time).
    text, _ = _read(app_file)
    message = {"op": "apply", "text": text, "source": str(app_file), "dry_run": dry_run}
    reply = request(socket_path(store.parent), message)
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
def retry(backend: str, store: Path) -> None:
    """Start FAILED backend BACKEND again with the same definition (after fixing what
    made it fail). A backend that is not FAILED is left as it is."""
    reply = request(socket_path(store.parent), {"op": "retry", "backend": backend})
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
def delete(kind: str, name: str, store: Path) -> None:
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
def shutdown(store: Path, stop_replicas: bool, wait_s: float) -> None:
    """Stop the server running on --store, as SIGTERM does: requests in flight
    finish, the checkpoint is kept."""
    path = socket_path(store.parent)
    _ask(store, {"op": "shutdown", "stop_replicas": stop_replicas})
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            request(path, {"op": "status"}, timeout_s=5.0, busy_retry_s=1.0)
        except ServecoreError:
            break  # no server answers any more
        time.sleep(0.1)
    else:
        _fail(f"the server on {store.parent} was told to stop but still runs after {wait_s:g}s")
    what = " and its replicas" if stop_replicas else ""
    _console().print(f"stopped the server on {escape(str(store.parent))}{what}")


@main.command()
@click.argument("target")
@_store_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@_one_paragraph
def logs(target: str, store: Path, follow: bool) -> None:
    """Print the logs of backend TARGET's replicas, or of replica TARGET (such as
    echo#3): the kept logs of dead ones (subprocess runtime), then the live ones."""
    from servecore.cli._logs import show_logs

    show_logs(target, store, follow=follow, console=_console())
