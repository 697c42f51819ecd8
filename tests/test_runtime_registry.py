"""Runtimes by name: built-ins imported lazily, plugins from the entry-point group."""

from __future__ import annotations

import builtins
from importlib.metadata import EntryPoint
from typing import Any

import pytest

import servecore.runtimes as registry
from servecore.runtimes import ENTRY_POINT_GROUP, resolve_runtime
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
