"""Process-table helpers for the subprocess runtime tests (not imported by replicas)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil

from servecore import BackendConfig, StartReplica
from servecore._core.values import backend_of


def replica_processes(runtime_dir: Path) -> dict[str, psutil.Process]:
    """Live (non-zombie) replica processes of ``runtime_dir``, by replica key, read from
    the process table: replicas carry ``--dir RUNTIME_DIR --key KEY`` on their command
    line."""
    found: dict[str, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or str(runtime_dir) not in cmdline:
            continue
        if "--key" in cmdline:
            found[cmdline[cmdline.index("--key") + 1]] = proc
    return found


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie has)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_everything_under(path: Path) -> None:
    """Kill, by pid, every process whose command line names ``path``; wait for them."""
    victims = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or ()
        if proc.pid != os.getpid() and any(str(path) in part for part in cmdline):
            try:
                proc.kill()
                victims.append(proc)
            except psutil.Error:
                pass
    # Orphans (their host was killed) are reaped by init, which may take a while; a
    # zombie is gone enough. Bounded, so that cleanup never hangs a run.
    deadline = time.monotonic() + 10
    while victims and time.monotonic() < deadline:
        victims = [p for p in victims if not gone(p.pid)]
        time.sleep(0.01)


def replica_effect(tag: str, target: str, *args: Any, **config: Any) -> StartReplica:
    """A ``StartReplica`` of ``subprocess_targets:TARGET`` for tag ``backend#n``."""
    return StartReplica(
        tag=tag,
        backend=backend_of(tag),
        target=f"subprocess_targets:{target}",
        init_args=args,
        init_kwargs={},
        config=BackendConfig(**config),
    )
