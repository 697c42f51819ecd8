"""``servecore logs BACKEND|REPLICA [--follow]``: the replica logs a server keeps.

The subprocess runtime writes each replica's output to ``<state dir>/replicas/KEY.log``
while it lives and keeps the last few of each backend in ``replicas/logs/`` once it is
gone (see :mod:`servecore.runtimes.subprocess.files`). This prints the kept ones
(oldest first), then the live ones; ``--follow`` then prints new lines of the live
ones as they come, picking up replicas that start meanwhile, until Ctrl-C. It works
with or without a running server: a running one says which replicas are alive and
where they log; without one the files themselves say whose they are.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from servecore._core.errors import ServecoreError
from servecore._core.values import backend_of
from servecore.cli._control import ControlUnavailable, request, socket_path
from servecore.replica_logs import _Follower
from servecore.runtimes.subprocess.files import LOGS_DIR, ReplicaFiles, replica_key

__all__ = ["NoLogs", "show_logs"]

#: How often --follow looks for new lines (and, with a server, for new replicas).
FOLLOW_PERIOD_S = 0.25


class NoLogs(ServecoreError):
    """Nothing is kept for the backend or replica asked for."""

    def __init__(self, target: str, why: str) -> None:
        self.target = target
        super().__init__(f"no logs of {target!r}: {why}")


def _matches(target: str, tag: str) -> bool:
    return tag == target if "#" in target else backend_of(tag) == target


def _kept(directory: Path, target: str) -> list[tuple[str, Path]]:
    """(tag or key, path) of the kept logs of dead replicas of ``target``, oldest first."""
    logs = directory / LOGS_DIR
    try:
        names = sorted(n for n in os.listdir(logs) if n.endswith(".log") and n.count("~") == 2)
    except OSError:
        return []
    key = replica_key(target)
    found = []
    for name in sorted(names, key=lambda n: n.split("~")[1]):
        group, _, replica = name[: -len(".log")].split("~")
        if (replica if "#" in target else group) == key:
            found.append((replica, logs / name))
    return found


def _live_offline(directory: Path, target: str) -> dict[str, str]:
    """tag -> log path of live-looking logs in ``directory`` (no server to ask)."""
    found = {}
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".log"))
    except OSError:
        return {}
    for name in names:
        files = ReplicaFiles(str(directory), name[: -len(".log")])
        about = files.read_record() or files.read_spec() or {}
        tag = about.get("tag")
        if isinstance(tag, str) and _matches(target, tag):
            found[tag] = files.log
    return found


def _ask_live(store: Path, target: str) -> dict[str, Any] | None:
    """The running server's answer about ``target``'s logs, or ``None`` if none runs."""
    try:
        reply = request(socket_path(store.parent), {"op": "logs", "target": target}, 10.0)
    except ControlUnavailable:
        return None
    if not reply.get("ok"):
        raise NoLogs(target, str(reply.get("error")))
    return dict(reply)


def _print_file(console: Console, title: str, path: Path | str) -> None:
    console.print(f"[bold]==> {escape(title)}: {escape(str(path))} <==[/]", soft_wrap=True)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        console.print(f"(cannot read it: {escape(exc.strerror or str(exc))})")
        return
    # The replica's own bytes, as they are: never read as markup.
    console.out(data.decode("utf-8", "replace"), end="" if data.endswith(b"\n") else "\n")


def show_logs(target: str, store: Path, *, follow: bool, console: Console) -> None:
    """Print the logs of ``target`` (a backend tag, or a replica tag such as
    ``echo#3``) kept under ``store``'s state directory; see the module."""
    from servecore.cli._run import last_run

    directory = store.parent / "replicas"
    reply = _ask_live(store, target)
    runtime = (last_run(store.parent) or {}).get("runtime")
    if reply is not None:
        live: dict[str, str] = dict(reply["live"])
        if reply["runtime"] == "ThreadsRuntime":
            runtime = "threads"
    else:
        live = _live_offline(directory, target)
    kept = _kept(directory, target)
    if not kept and not live:
        if runtime == "threads":
            raise NoLogs(
                target,
                "replicas of the threads runtime run inside servecore run and print into "
                "its own output (its terminal or log file); nothing is kept apart",
            )
        known = reply is None or reply.get("known")
        why = (
            f"nothing is kept for it under {directory} (only the subprocess runtime keeps "
            f"replica logs: the last few of each backend)"
            if known
            else "the server knows no backend or replica of that name (see servecore status)"
        )
        raise NoLogs(target, why)
    for name, kept_path in kept:
        _print_file(console, f"{name} (gone)", kept_path)
    for tag, live_path in sorted(live.items()):
        _print_file(console, f"{tag} (live)", live_path)
    if not follow:
        return
    followers = {tag: _Follower(path, from_start=False) for tag, path in live.items()}
    try:
        while True:
            time.sleep(FOLLOW_PERIOD_S)
            now = _ask_live(store, target) if reply is not None else None
            for tag, path in (now or {}).get("live", {}).items():
                if tag not in followers:  # started since: from its first line
                    followers[tag] = _Follower(path, from_start=True)
            for tag, follower in followers.items():
                for line in follower.read_lines():
                    console.out(f"[{tag}] {line}", highlight=False)
    except KeyboardInterrupt:
        return
