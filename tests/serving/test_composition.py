"""Composition: replica code calling other endpoints (docs/design.md §5)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import servecore

T = "composed_targets:"


def _serve(ctl: servecore.SyncController, endpoint: str, target: str) -> None:
    ctl.create_backend(endpoint, T + target)
    ctl.create_endpoint(endpoint)
    ctl.set_traffic(endpoint, {endpoint: 1.0})


@pytest.fixture
def ctl() -> Iterator[servecore.SyncController]:
    with servecore.start(runtime="threads") as ctl:
        yield ctl


def test_a_target_calls_another_endpoint_and_combines_its_answer(ctl) -> None:
    _serve(ctl, "inner", "inner")
    _serve(ctl, "outer", "outer")
    _serve(ctl, "outer_async", "outer_async")
    assert ctl.get_handle("outer").call(7) == "outer(inner(7))"
    assert ctl.get_handle("outer_async").call(8) == "outer_async(inner(8))"


def test_a_cycle_fails_with_a_typed_error_naming_the_chain_rather_than_hanging(ctl) -> None:
    _serve(ctl, "ping", "ping")
    _serve(ctl, "pong", "pong")
    with pytest.raises(servecore.CallCycle) as caught:
        ctl.get_handle("ping").call(1)
    assert caught.value.chain == ("ping", "pong")
    assert "ping -> pong" in str(caught.value)


def test_nesting_past_the_depth_limit_fails_with_a_typed_error(ctl) -> None:
    limit = servecore._calls.MAX_CALL_DEPTH
    for n in range(limit + 2):
        _serve(ctl, f"chain{n}", "chain")
    assert ctl.get_handle(f"chain{limit - 1}").call(limit - 1) == limit - 1
    with pytest.raises(servecore.CallDepthExceeded) as caught:
        ctl.get_handle(f"chain{limit + 1}").call(limit + 1)
    assert len(caught.value.chain) == limit


def test_get_handle_outside_replica_code_says_where_it_works() -> None:
    with pytest.raises(servecore.NotInReplica, match="inside replica code only"):
        servecore.get_handle("inner")


COMPOSED_APP = """
[backends.inner]
target = "composed_targets:inner"

[backends.outer]
target = "composed_targets:outer"

[backends.outer_async]
target = "composed_targets:outer_async"

[backends.ping]
target = "composed_targets:ping"

[backends.pong]
target = "composed_targets:pong"

[endpoints.inner]
traffic = { inner = 1.0 }

[endpoints.outer]
traffic = { outer = 1.0 }

[endpoints.outer_async]
traffic = { outer_async = 1.0 }

[endpoints.ping]
traffic = { ping = 1.0 }

[endpoints.pong]
traffic = { pong = 1.0 }
"""


@pytest.mark.slow
def test_subprocess_replicas_call_other_endpoints_and_a_cycle_fails_typed(
    tmp_path: Path,
) -> None:
    from cli_server import CliServer

    server = CliServer(tmp_path)
    try:
        server.serve(
            server.write("app.toml", COMPOSED_APP), "--runtime", "subprocess", "--workers", "0"
        )
        with servecore.connect(server.store) as client:
            assert client.get_handle("outer").call(7) == "outer(inner(7))"
            assert client.get_handle("outer_async").call(8) == "outer_async(inner(8))"
            with pytest.raises(servecore.CallCycle) as caught:
                client.get_handle("ping").call(1)
            assert caught.value.chain == ("ping", "pong")
            assert "ping -> pong" in str(caught.value)
    finally:
        server.stop_everything()
