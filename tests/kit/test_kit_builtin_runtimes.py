"""The built-in runtimes pass the kit exactly as a third-party plugin would.

Each is resolved by name through the registry (as ``open_controller(runtime=...)``
does for a plugin), checked with ``check_runtime``, and driven by the
``CrashConsistencyMachine`` with the settings docs/plugins.md recommends for slow
runtimes: a few short examples in CI, more under ``HYPOTHESIS_PROFILE=long``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from servecore.runtimes import Runtime, resolve_runtime
from servecore.testing import CrashConsistencyMachine, check_runtime
from subprocess_helpers import kill_everything_under

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
#: A soak of a process runtime takes far longer than the suite's per-test timeout.
SOAK_TIMEOUT = pytest.mark.timeout(3 * 3600 if LONG else 300)
#: Process runtimes pay real starts: a handful of short examples in CI.
SLOW_RUNTIME = settings(
    max_examples=40 if LONG else 3,
    stateful_step_count=20 if LONG else 6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    print_blob=True,
)


def kill(runtime: Runtime, tag: str) -> Any:
    return runtime.kill(tag)  # type: ignore[attr-defined]


def test_threads_conforms() -> None:
    check_runtime(lambda: resolve_runtime("threads"), kill=kill)


@pytest.mark.slow
def test_subprocess_conforms(tmp_path: Any) -> None:
    try:
        check_runtime(lambda: resolve_runtime("subprocess", directory=tmp_path), kill=kill)
    finally:
        kill_everything_under(tmp_path)


class ThreadsAsPlugin(CrashConsistencyMachine):
    def make_runtime(self) -> Runtime:
        return resolve_runtime("threads")


class SubprocessAsPlugin(CrashConsistencyMachine):
    def make_runtime(self) -> Runtime:
        return resolve_runtime("subprocess", directory=self.tmp / "rt")

    def teardown(self) -> None:
        try:
            self.stop_live_replicas()
        finally:
            kill_everything_under(self.tmp)
            super().teardown()


ThreadsAsPlugin.TestCase.settings = settings(SLOW_RUNTIME, max_examples=40 if LONG else 8)
SubprocessAsPlugin.TestCase.settings = SLOW_RUNTIME
TestThreadsAsPlugin = SOAK_TIMEOUT(ThreadsAsPlugin.TestCase)
TestSubprocessAsPlugin = SOAK_TIMEOUT(pytest.mark.slow(SubprocessAsPlugin.TestCase))
