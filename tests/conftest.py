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
