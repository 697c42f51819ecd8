"""Runtimes by name: built-ins imported lazily, plugins from the entry-point group."""

from __future__ import annotations

import builtins
from importlib.metadata import EntryPoint
from typing import Any

import pytest

import servecore.runtimes as registry
from servecore import InvalidRuntime, InvalidRuntimeOption, ServecoreError
from servecore.runtimes import (
    ENTRY_POINT_GROUP,
    Runtime,
    check_runtime_methods,
    close_runtime,
    open_runtime,
    resolve_runtime,
)
from servecore.testing import InMemoryRuntime


def test_a_runtime_instance_is_used_as_is() -> None:
    runtime = InMemoryRuntime()
    assert resolve_runtime(runtime) is runtime
    with pytest.raises(TypeError, match="by name"):
        resolve_runtime(runtime, directory="/tmp")


def test_builtins_resolve_by_name() -> None:
    from servecore.runtimes.threads import ThreadRuntime

    assert isinstance(resolve_runtime("threads"), ThreadRuntime)


def test_plugins_come_from_the_entry_point_group(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = EntryPoint(
        name="fake", value="servecore.testing:InMemoryRuntime", group=ENTRY_POINT_GROUP
    )
    asked: list[str] = []

    def entry_points(*, group: str) -> list[EntryPoint]:
        asked.append(group)
        return [plugin]

    monkeypatch.setattr(registry, "entry_points", entry_points)
    resolve_runtime("threads")
    assert asked == [], "entry points must only be read for names that are not built in"
    assert isinstance(resolve_runtime("fake"), InMemoryRuntime)
    assert asked == [ENTRY_POINT_GROUP]


def test_an_unknown_name_lists_what_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "entry_points", lambda *, group: [])
    with pytest.raises(LookupError) as info:
        resolve_runtime("k8s")
    message = str(info.value)
    assert "'k8s'" in message and "threads" in message and ENTRY_POINT_GROUP in message


def test_a_missing_optional_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_ray(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError("No module named 'ray'", name="ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    monkeypatch.delitem(__import__("sys").modules, "servecore.runtimes.ray", raising=False)
    with pytest.raises(ImportError, match=r"servecore\[ray\]"):
        resolve_runtime("ray")


def test_a_bad_constructor_keyword_names_the_key_and_the_accepted_ones() -> None:
    with pytest.raises(InvalidRuntimeOption) as info:
        resolve_runtime("threads", health_check_period=1.0)
    error = info.value
    assert isinstance(error, TypeError) and isinstance(error, ServecoreError)
    assert error.bad == ("health_check_period",) and error.runtime == "threads"
    assert "health_check_period_s" in error.accepted
    message = str(error)
    assert "'health_check_period'" in message and "health_check_period_s" in message
    assert "runtime_options" in message  # the per-backend options live elsewhere
    assert resolve_runtime("threads", health_check_period_s=1.0) is not None


def test_plugin_constructor_keywords_are_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = EntryPoint(
        name="fake", value="servecore.testing:InMemoryRuntime", group=ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(registry, "entry_points", lambda *, group: [plugin])
    with pytest.raises(InvalidRuntimeOption, match=r"'bogus'.*crash_plan"):
        resolve_runtime("fake", bogus=1)


class FourMethods:
    """A runtime with only the required methods: no open, no close."""

    def __init__(self) -> None:
        self.live: set[str] = set()

    async def start_replica(self, effect: Any) -> None:
        self.live.add(effect.tag)

    async def stop_replica(self, tag: str, timeout_s: float) -> None:
        self.live.discard(tag)

    async def list_replicas(self) -> frozenset[str]:
        return frozenset(self.live)

    async def call(self, tag: str, batch: Any) -> list[Any]:
        return [q.args[0] for q in batch]


def test_a_runtime_missing_methods_is_refused_with_all_of_them_named() -> None:
    class Half:
        async def start_replica(self, effect: Any) -> None: ...

    with pytest.raises(InvalidRuntime) as info:
        check_runtime_methods(Half())
    assert info.value.missing == ("stop_replica", "list_replicas", "call")
    assert "open and close are optional" in str(info.value)
    check_runtime_methods(FourMethods())  # open and close are optional
    assert isinstance(FourMethods(), Runtime)


async def test_open_and_close_are_called_only_when_present() -> None:
    bare = FourMethods()
    await open_runtime(bare, namespace="n", report=lambda _e: None)
    await close_runtime(bare)
    runtime = InMemoryRuntime()
    await open_runtime(runtime, namespace="n", report=lambda _e: None)
    assert runtime.namespace == "n" and runtime.opened == 1
