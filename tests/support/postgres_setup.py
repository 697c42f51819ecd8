"""Whether the PostgreSQL tests can run here: skip them on a laptop, fail them in CI."""

from __future__ import annotations

import os

import pytest

from servecore.testing.postgres import find_postgres_bin


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
