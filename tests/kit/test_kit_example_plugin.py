"""The example plugin (examples/mp_runtime) passes the kit, as its author would run it.

``make venv`` installs it (``pip install -e examples/mp_runtime``), so it is found by
its entry point; without that, the checkout's copy is imported directly and only the
entry-point test is skipped.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import trio
from hypothesis import settings
from test_kit_builtin_runtimes import SLOW_RUNTIME, SOAK_TIMEOUT

import servecore
from servecore.runtimes import ENTRY_POINT_GROUP, Runtime, resolve_runtime
from servecore.testing import CrashConsistencyMachine, check_runtime

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mp_runtime"
try:
    import servecore_mp
except ImportError:  # not installed: use the checkout's copy (spawned replicas inherit it)
    sys.path.insert(0, str(EXAMPLE / "src"))
    import servecore_mp

pytestmark = pytest.mark.slow

INSTALLED = any(ep.name == "mp" for ep in entry_points(group=ENTRY_POINT_GROUP))


@pytest.mark.skipif(not INSTALLED, reason="pip install -e examples/mp_runtime (make venv does)")
def test_the_plugin_is_found_by_its_entry_point() -> None:
    runtime = resolve_runtime("mp", start_timeout_s=30.0)
    assert isinstance(runtime, servecore_mp.MultiprocessingRuntime)
    with pytest.raises(servecore.InvalidRuntimeOption, match="start_timeout_s"):
        resolve_runtime("mp", startup_timeout=1)


def test_the_plugin_conforms() -> None:
    made: list[servecore_mp.MultiprocessingRuntime] = []

    def make() -> Runtime:
        made.append(servecore_mp.MultiprocessingRuntime())
        return made[-1]

    try:
        check_runtime(make, kill=lambda rt, tag: rt.kill(tag))  # type: ignore[attr-defined]
    finally:
        for runtime in made:
            runtime.shutdown()


def test_the_plugin_serves_through_a_controller() -> None:
    runtime = servecore_mp.MultiprocessingRuntime()

    async def main() -> None:
        async with servecore.open_controller(runtime=runtime) as ctl:
            await ctl.create_backend("echo", "servecore.testing.targets:Echo", num_replicas=2)
            await ctl.create_endpoint("echo")
            await ctl.set_traffic("echo", {"echo": 1.0})
            assert await ctl.get_handle("echo").call("hi") == "hi"
            (victim,) = sorted(ctl.state.replicas)[:1]
            runtime.kill(victim)
            await ctl.settle()
            assert victim not in ctl.state.replicas and len(ctl.state.replicas) == 2
            assert await ctl.get_handle("echo").call("again") == "again"

    try:
        trio.run(main)
    finally:
        runtime.shutdown()


class PluginCrashes(CrashConsistencyMachine):
    def make_runtime(self) -> Runtime:
        self.mp = servecore_mp.MultiprocessingRuntime()
        return self.mp

    def teardown(self) -> None:
        self.mp.shutdown()
        super().teardown()


PluginCrashes.TestCase.settings = settings(SLOW_RUNTIME)
TestPluginCrashes = SOAK_TIMEOUT(PluginCrashes.TestCase)


def test_the_plugin_reports_results_it_cannot_carry_as_typed_errors() -> None:
    runtime = servecore_mp.MultiprocessingRuntime()

    async def main() -> None:
        async with servecore.open_controller(runtime=runtime) as ctl:
            await ctl.create_backend("h", "subprocess_targets:hostile_result")
            await ctl.create_backend("lock", "subprocess_targets:unpicklable_result")
            await ctl.create_endpoint("h")
            await ctl.set_traffic("h", {"h": 1.0})
            await ctl.create_endpoint("lock")
            await ctl.set_traffic("lock", {"lock": 1.0})
            handle = ctl.get_handle("h")
            # A result whose unpickling raises SystemExit must not end the host.
            for kind in ("exit", "fails", "replica_only"):
                with pytest.raises(servecore.ResultDecodeError, match=r"'h#0'.*mp runtime"):
                    await handle.call(kind)
            with pytest.raises(servecore.UnpicklableResult, match=r"_thread\.lock"):
                await ctl.get_handle("lock").call()
            assert await handle.call("plain") == "plain"

    try:
        trio.run(main)
    finally:
        runtime.shutdown()
