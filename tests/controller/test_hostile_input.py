"""Nothing a caller or user code sends can kill the controller or leak a raw error:
hostile strings and absurd values through every public method, async and sync, give a
typed ServecoreError and leave the state and its sequence number exactly as they were."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import servecore
from servecore import BackendConfig, BackendStartError, ServecoreError, open_controller

ECHO = "servecore.testing.targets:Echo"
SURROGATE = b"caf\xe9".decode("utf-8", "surrogateescape")


def deep(n: int) -> Any:
    value: Any = 0
    for _ in range(n):
        value = [value]
    return value


# (method name, args, kwargs): each must raise a ServecoreError and change nothing.
HOSTILE: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("create_endpoint", (SURROGATE,), {}),
    ("create_endpoint", ("e2",), {"route": "/" + SURROGATE}),
    ("create_endpoint", (["a"],), {}),
    ("create_endpoint", ("x" * 10_000,), {}),
    ("create_endpoint", ("e2",), {"route": "/a\nb"}),
    ("create_endpoint", ("e2",), {"methods": 5}),
    ("create_endpoint", (None,), {}),
    ("delete_endpoint", (["e"],), {}),
    ("delete_endpoint", ({"e": 1},), {}),
    ("create_backend", (SURROGATE, ECHO), {}),
    ("create_backend", ("b", ECHO), {"init_args": [SURROGATE]}),
    ("create_backend", ("b", ECHO), {"init_kwargs": {SURROGATE: 1}}),
    ("create_backend", ("b", ECHO), {"init_args": 5}),
    ("create_backend", ("b", ECHO), {"init_args": "abc"}),
    ("create_backend", ("b", ECHO), {"init_kwargs": 7}),
    ("create_backend", ("b", ECHO), {"init_args": [deep(600)]}),
    ("create_backend", ("b", ECHO), {"init_args": [deep(50)]}),
    ("create_backend", ("b", ECHO), {"init_args": [2**70]}),
    ("create_backend", ("b", ECHO), {"init_args": [float("nan")]}),
    ("create_backend", ("b", ECHO), {"config": {"num_replicas": 2}}),
    ("create_backend", ("b", ECHO), {"num_replicas": 10**9}),
    ("create_backend", ("b", ECHO), {"num_replicas": 20_000}),
    ("create_backend", ("b", ECHO), {"num_replicas": True}),
    ("create_backend", ("b", ECHO), {"num_replicas": -1}),
    ("create_backend", ("b", ECHO), {"max_batch_size": 10**12}),
    ("create_backend", ("b", ECHO), {"graceful_shutdown_timeout_s": 1e300}),
    ("create_backend", ("b", ECHO), {"batch_wait_timeout_s": float("inf")}),
    ("create_backend", ("b", ECHO), {"user_config": {"k": SURROGATE}}),
    ("create_backend", ("b", ECHO), {"user_config": deep(5_000)}),
    ("create_backend", ("b", ECHO), {"runtime_options": [1, 2]}),
    ("create_backend", ("b", ECHO), {"bogus_field": 1}),
    ("create_backend", ("b", "not a path"), {}),
    ("create_backend", ("b", "x" * 5000 + ":y"), {}),
    ("create_backend", (["b"], ECHO), {}),
    ("delete_backend", (["a"],), {}),
    ("set_backend_config", ("a", {"num_replicas": 1}), {}),
    ("set_backend_config", (["a"], BackendConfig()), {}),
    ("update_backend_config", (["a"],), {"num_replicas": 2}),
    ("update_backend_config", ("a",), {"num_replicas": 10**9}),
    ("update_backend_config", ("a",), {"nope": 1}),
    ("update_backend_config", ("a",), {"user_config": deep(600)}),
    ("retry_backend", (["a"],), {}),
    ("set_traffic", ("e", [("a", 1.0)]), {}),
    ("set_traffic", ("e", {SURROGATE: 1.0}), {}),
    ("set_traffic", ("e", {"a": float("nan")}), {}),
    ("set_traffic", (["e"], {"a": 1.0}), {}),
    ("set_traffic", ("e", {("a",): 1.0}), {}),
    ("set_shadow_traffic", ("e", "a", "half"), {}),
    ("set_shadow_traffic", ("e", ["a"], 0.5), {}),
    ("set_shadow_traffic", ("e", "a", float("inf")), {}),
    ("submit", ("not a command",), {}),
    ("submit", (servecore.ReplicaStarted(tag="a#0"),), {}),
]


def _ids() -> list[str]:
    return [f"{m}-{i}" for i, (m, _, _) in enumerate(HOSTILE)]


async def _prepared(ctl: servecore.Controller) -> None:
    await ctl.create_backend("a", ECHO)
    await ctl.create_endpoint("e", route="/e")
    await ctl.set_traffic("e", {"a": 1.0})


@pytest.mark.parametrize(("method", "args", "kwargs"), HOSTILE, ids=_ids())
async def test_hostile_input_async(
    method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    async with open_controller(resync_interval_s=None) as ctl:
        await _prepared(ctl)
        state, seq = ctl.state, ctl.seq
        with trio.fail_after(10), pytest.raises(ServecoreError) as info:
            await getattr(ctl, method)(*args, **kwargs)
        str(info.value).encode("utf-8")  # the message itself is printable text
        assert ctl.state is state and ctl.seq == seq
        # Still alive and serving.
        assert await ctl.get_handle("e").call("ok") == "ok"


def test_hostile_input_sync() -> None:
    with servecore.start(resync_interval_s=None) as ctl:
        ctl.create_backend("a", ECHO)
        ctl.create_endpoint("e", route="/e")
        ctl.set_traffic("e", {"a": 1.0})
        for method, args, kwargs in HOSTILE:
            state, seq = ctl.state, ctl.seq
            with pytest.raises(ServecoreError):
                getattr(ctl, method)(*args, **kwargs)
            assert ctl.state is state and ctl.seq == seq, method
        assert ctl.get_handle("e").call("ok") == "ok"


def test_limits_are_configurable() -> None:
    limits = servecore.Limits(max_replicas=3, max_nesting_depth=2)
    with servecore.start(limits=limits, resync_interval_s=None) as ctl:
        with pytest.raises(servecore.InvalidConfig, match="limit of 3"):
            ctl.create_backend("a", ECHO, num_replicas=4)
        with pytest.raises(servecore.InvalidConfig, match="limit of 2"):
            ctl.create_backend("a", ECHO, init_args=[[[1]]])
        ctl.create_backend("a", ECHO, num_replicas=3, init_args=[[1]])
    with pytest.raises(servecore.InvalidConfig, match="max_replicas"):
        servecore.Limits(max_replicas=-1)


@pytest.mark.parametrize(
    "open_kwargs",
    [
        {"name": "../x"},
        {"name": ""},
        {"name": SURROGATE},
        {"limits": {"max_replicas": 1}},
        {"resync_interval_s": 0},
        {"resync_interval_s": float("nan")},
    ],
)
async def test_bad_controller_options_are_typed_errors(open_kwargs: dict[str, Any]) -> None:
    with pytest.raises(servecore.InvalidConfig):
        async with open_controller(**open_kwargs):
            pass


async def test_a_constructor_error_with_a_lone_surrogate_does_not_kill_the_controller() -> None:
    async with open_controller(runtime="threads", resync_interval_s=None) as ctl:
        with pytest.raises(BackendStartError) as info:
            await ctl.create_backend("bad", "hardening_targets:SurrogateError")
        message = str(info.value)
        message.encode("utf-8")
        assert "caf\\udce9" in message
        assert ctl.state.backends["bad"].status is servecore.BackendStatus.FAILED
        await ctl.delete_backend("bad")
        await ctl.create_backend("good", ECHO)
        assert ctl.state.backends["good"].status is servecore.BackendStatus.HEALTHY


def test_a_constructor_error_with_a_lone_surrogate_sync() -> None:
    ctl = servecore.start(runtime="threads", resync_interval_s=None)
    with pytest.raises(BackendStartError):
        ctl.create_backend("bad", "hardening_targets:SurrogateError")
    ctl.create_backend("good", ECHO)  # the controller is still open
    ctl.close()  # and closes cleanly
