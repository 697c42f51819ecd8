"""``servecore run`` and the other commands as a user runs them, for the end-to-end tests.

:class:`CliServer` is a working directory with app files, a private SQLite store and
replica directory, and every process started in it: ``servecore run`` servers on free
loopback ports, and the commands run against the same store. Everything it started is
stopped by pid (:meth:`CliServer.stop_everything`): the servers, their ingress workers,
and any replica process whose command line names its own replica directory. Never by
name: other work may share the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

#: The longest a server may take to say it serves, or a command to finish.
WAIT_S = 120

__all__ = ["ROOT", "CliServer", "free_port", "servecore_env"]


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def servecore_env() -> dict[str, str]:
    """This environment, with this checkout's servecore first on the path and the test
    support modules importable (replicas import their targets, e.g.
    ``subprocess_targets:Slow``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), str(ROOT / "tests/support")])
    return env


class CliServer:
    """A working directory with app files, and the processes started in it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.store = directory / ".servecore" / "state.db"
        self.replica_dir = directory / ".servecore" / "replicas"
        #: How each command names the store (empty: the app file's [server] table does).
        self.store_args: tuple[str, ...] = ("--store", str(self.store))
        #: Every ``servecore run`` started, in order.
        self.servers: list[subprocess.Popen[str]] = []
        #: Replica pids seen in ``status`` (stopped at the end even if they moved away).
        self.seen_pids: set[int] = set()

    def write(self, name: str, text: str) -> Path:
        path = self.directory / name
        path.write_text(text)
        return path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``servecore ARGS`` on this store; wait for it to finish."""
        return subprocess.run(
            [sys.executable, "-m", "servecore", *args, *self.store_args],
            cwd=self.directory,
            env=servecore_env(),
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )

    def serve(self, app: Path, *extra: str) -> subprocess.Popen[str]:
        """Start ``servecore run`` on a free port and wait until it serves."""
        proc, _log = self.run(app, free_port(), *extra)
        return proc

    def run(self, app: Path, port: int | None, *extra: str) -> tuple[subprocess.Popen[str], Path]:
        """Start ``servecore run`` (``port`` None: the app file's) and wait until it
        serves; return it and its log (stderr)."""
        proc, log, serving = self.spawn(app, port, *extra)
        self.wait_serving(proc, log, serving)
        return proc, log

    def spawn(
        self, app: Path, port: int | None, *extra: str
    ) -> tuple[subprocess.Popen[str], Path, threading.Event]:
        """Start ``servecore run``; the event is set once it says it serves."""
        port_args = () if port is None else ("--port", str(port))
        return self.spawn_command("server", "run", str(app), *port_args, *extra)

    def spawn_command(
        self, log_name: str, command: str, *args: str
    ) -> tuple[subprocess.Popen[str], Path, threading.Event]:
        """Start ``servecore COMMAND`` on this store, then ``ARGS`` (which may override
        it); a server, stopped with the others. The event is set once it says it
        serves. Its stderr goes to a log of its own."""
        log = self.directory / f"{log_name}-{len(self.servers)}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "servecore", command, *self.store_args, *args],
                cwd=self.directory,
                env=servecore_env(),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.servers.append(proc)
        serving = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("servecore: serving"):
                    serving.set()

        threading.Thread(target=read, daemon=True).start()
        return proc, log, serving

    @staticmethod
    def wait_serving(proc: subprocess.Popen[str], log: Path, serving: threading.Event) -> None:
        """Return once ``proc`` says it serves; fail with its log if it exits or never
        does (a guard against hanging for ever, not a timing)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if serving.wait(timeout=0.5):
                return
            if proc.poll() is not None:
                raise AssertionError(f"servecore exited: {log.read_text()}")
        raise AssertionError(f"servecore did not start serving: {log.read_text()}")

    def status(self) -> dict[str, Any]:
        """``servecore status --json``; remembers the replica pids it names."""
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        for b in data["backends"]:
            self.seen_pids.update(r["pid"] for r in b["replicas"] if r["pid"])
        return data

    def replica_pids(self) -> set[int]:
        """Live processes whose command line names this directory's replica directory."""
        found = set()
        marker = str(self.replica_dir).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
        return found

    def worker_pids(self) -> set[int]:
        """Live ingress workers (``--workers``) whose command line names this store: a
        SIGKILLed server leaves them serving."""
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    args = (entry / "cmdline").read_bytes().split(b"\0")
                    if b"servecore._serving.worker" in args and str(self.store).encode() in args:
                        found.add(int(entry.name))
        return found

    def stop_everything(self) -> None:
        """Stop, by pid, every process this started (and their workers and replicas)."""
        for proc in self.servers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for pid in self.worker_pids() | self.replica_pids() | self.seen_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
