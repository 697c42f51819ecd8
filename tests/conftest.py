"""Shared test set-up: Hypothesis profiles.

``HYPOTHESIS_PROFILE=ci`` (the default, what ``make test`` uses) keeps CI bounded on
2 cores; ``HYPOTHESIS_PROFILE=long`` explores far more for a local soak.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=False,
)
settings.register_profile(
    "long",
    max_examples=2000,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---------------------------------------------------------------------------------------
# A private PostgreSQL server for the PostgresStore tests, one per session, started only
# if a test asks for it; stopped by its data directory and pid.

import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from postgres_setup import postgres_or_skip  # noqa: E402
from servecore.testing.postgres import PostgresServer  # noqa: E402


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    postgres_or_skip()
    with PostgresServer() as server:
        yield server


@pytest.fixture
def checkpoint_name() -> str:
    """A checkpoint of its own for each test, in the shared server's database."""
    return f"test-{uuid.uuid4().hex[:12]}"
