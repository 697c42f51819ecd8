"""Whether the PostgreSQL tests can run here: skip them on a laptop, fail them in CI."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from servecore.testing.postgres import PostgresServer, find_postgres_bin


def postgres_or_skip(*, module: bool = False) -> None:
    """Skip unless the server binaries and psycopg are here (in CI, fail instead);
    ``module``: called while a test module is imported."""
    missing = []
    if find_postgres_bin() is None:
        missing.append("PostgreSQL server binaries (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing.append("psycopg (pip install 'servecore[postgres]')")
    if missing:
        why = "needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"{why}; .ci/run installs them")
        pytest.skip(why, allow_module_level=module)


def server_pids(server: PostgresServer) -> list[int]:
    """The postmaster ``server`` started, and its children (the backends): what to
    SIGSTOP to freeze that server, and only it."""
    assert server.pid is not None
    pids = [server.pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == server.pid:
                    pids.append(int(entry.name))
    return pids
