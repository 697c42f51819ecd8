"""The ``servecore`` command: ``run``, ``status`` and ``apply``.

::

    servecore run app.toml [--runtime threads|subprocess|ray] [--store PATH]
                           [--host 127.0.0.1] [--port 8000]
    servecore status [--store PATH] [--json]
    servecore apply app.toml [--store PATH]

State lives under ``.servecore/`` by default: the SQLite checkpoint ``state.db``, the
control socket ``control.sock`` and (subprocess runtime) ``replicas/``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click
import trio
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from servecore._controller.read_state import load_checkpoint
from servecore._controller.status import status_of
from servecore._core.errors import ServecoreError
from servecore.app import AppFileError, load_app
from servecore.cli._control import ControlUnavailable, request, socket_path
from servecore.cli._render import print_status
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


def _fail(message: str, code: int = 1) -> None:
    _console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(code)


def _load(app_file: Path) -> Any:
    try:
        return load_app(app_file)
    except AppFileError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot read {app_file}: {exc.strerror or exc}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="servecore")
def main() -> None:
    """Serve model or function code from an app file, crash-consistently."""


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
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
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
    help="Seconds a request may take before 504.",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
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
    log_level: str,
) -> None:
    """Apply APP_FILE and serve its endpoints over HTTP until Ctrl-C or SIGTERM.

    A restart on the same --store recovers from the checkpoint (live subprocess and
    Ray replicas are adopted, not restarted), then applies the file again.
    """
    from servecore.cli._run import RunOptions, add_app_dir, run_server

    add_app_dir(app_dir)
    app = _load(app_file)
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
    )
    try:
        code = trio.run(run_server, options, err)
    except ServecoreError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(str(exc))
    sys.exit(code)


@main.command()
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(store: Path, as_json: bool) -> None:
    """Show endpoints, backends and replicas: live from a running server, or read
    from the checkpoint (without locking it) when none runs."""
    try:
        reply = request(socket_path(store.parent), {"op": "status"}, timeout_s=10.0)
    except ControlUnavailable:
        reply = None
    if reply is not None and reply.get("ok"):
        data = reply["status"]
    else:
        if not store.exists():
            _fail(f"no checkpoint at {store}; start a server with: servecore run APP.toml")
        try:
            found = load_checkpoint(SQLiteStore(store))
        except ServecoreError as exc:
            _fail(str(exc))
        state, seq = found if found is not None else (None, 0)
        from servecore._core.transitions import State

        data = status_of(state or State(), seq).as_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        print_status(data, str(store), _console())


@main.command("apply")
@click.argument("app_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_store_option
def apply_command(app_file: Path, store: Path) -> None:
    """Apply APP_FILE to the server running on --store. An invalid file changes
    nothing and says why."""
    _load(app_file)  # say what is wrong before reaching the server
    text = app_file.read_text(encoding="utf-8")
    try:
        reply = request(
            socket_path(store.parent), {"op": "apply", "text": text, "source": str(app_file)}
        )
    except ControlUnavailable as exc:
        _fail(str(exc))
    if not reply.get("ok"):
        _fail(reply.get("error", "the server refused the file"))
    out = _console()
    for change in reply["changes"]:
        out.print(f"  {escape(change)}")
    if not reply["changes"]:
        out.print(f"{escape(str(app_file))}: already applied, nothing to do")
    for tag, error in reply["failed"].items():
        out.print(f"[red]backend {escape(repr(tag))} failed to start:[/] {escape(error)}")
    sys.exit(1 if reply["failed"] else 0)
