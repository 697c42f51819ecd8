"""A private, throwaway PostgreSQL server for tests and benchmarks.

:class:`PostgresServer` runs the server binaries of the machine (Debian puts them in
``/usr/lib/postgresql/<version>/bin``, off ``PATH``) on a data directory of its own, on
127.0.0.1 and a free port, with trust authentication for local test connections only.
``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` user
(through ``runuser``) on a directory handed to it. It is stopped by its own data
directory and pid, never by name::

    with PostgresServer() as server:
        store = servecore.PostgresStore(server.dsn)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["PostgresServer", "find_postgres_bin"]

#: Bounded waits for start and stop, so a broken server fails a run instead of hanging it.
_WAIT_S = 60


def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or ``None``.
    ``$SERVECORE_PG_BIN`` wins; then ``PATH``; then the newest Debian install."""
    explicit = os.environ.get("SERVECORE_PG_BIN")
    if explicit:
        return Path(explicit) if (Path(explicit) / "initdb").exists() else None
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One private PostgreSQL server: made by :meth:`start` (``initdb`` the first time),
    stopped by :meth:`stop` (and started again on the same data by :meth:`start`),
    removed with its directory by :meth:`cleanup`. A context manager does all three."""

    def __init__(self, bin_dir: Path | None = None, *, fsync: bool = True) -> None:
        found = bin_dir or find_postgres_bin()
        if found is None:
            raise FileNotFoundError(
                "no PostgreSQL server binaries (initdb, pg_ctl) found: install the "
                "postgresql package, or set SERVECORE_PG_BIN to their directory"
            )
        self.bin_dir = found
        self.fsync = fsync
        self.port = _free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="servecore-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "server.log"
        # initdb will not run as root: hand the directory to the postgres user.
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.directory, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.pid: int | None = None

    @property
    def dsn(self) -> str:
        """A libpq URI for the ``postgres`` database as the ``postgres`` user."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self._as, *args], check=True, capture_output=True, text=True, timeout=_WAIT_S
        )

    def start(self) -> None:
        """Start the server (making its data directory first if need be); return once it
        accepts connections."""
        if not self.data.exists():
            self._run(
                str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres",
                "-A", "trust", "-E", "UTF8", "--no-sync",
            )  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.directory} "
            f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=60"
        )
        try:
            self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                "-o", options, "-w", "-t", str(_WAIT_S), "start",
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}\n{tail}") from exc
        self.pid = self._postmaster_pid()

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop the server (fast: open sessions are cut), by its data directory; if that
        fails, kill its postmaster by pid."""
        pid = self._postmaster_pid() or self.pid
        if pid is None:
            return
        try:
            self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                "-w", "-t", str(_WAIT_S), "stop",
            )  # fmt: skip
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + _WAIT_S
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
        self.pid = None

    def cleanup(self) -> None:
        """Stop the server if it runs, and remove its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
