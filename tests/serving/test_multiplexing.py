"""Model multiplexing through the controller, on the threads and subprocess runtimes
(docs/design.md §5, "Model multiplexing"). No wall-clock thresholds."""

from __future__ import annotations

import http.client
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

import servecore
from servecore.http import serve_http
from subprocess_helpers import kill_everything_under

BOUND_S = 30.0
T = "multiplex_targets:"


@pytest.fixture(params=["threads", "subprocess"])
async def ctl(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    options = {"directory": tmp_path / "rt"} if request.param == "subprocess" else {}
    try:
        async with servecore.open_controller(
            runtime=request.param, runtime_options=options, name="multiplex"
        ) as controller:
            yield controller
    finally:
        kill_everything_under(tmp_path)


async def serve(ctl: Any, name: str, target: str, **config: Any) -> Any:
    await ctl.create_backend(name, T + target, **config)
    await ctl.create_endpoint(name, route=f"/{name}")
    await ctl.set_traffic(name, {name: 1.0})
    return ctl.get_handle(name)


@pytest.mark.parametrize("target", ["Models", "AsyncModels"])
async def test_a_target_reads_the_model_id_its_query_was_sent_for(ctl: Any, target: str) -> None:
    handle = await serve(ctl, "models", target)
    with trio.fail_after(BOUND_S):
        got = await handle.options(multiplexed_model_id="a").call()
        assert (got["id"], got["model"]) == ("a", "model-a")
        assert (await handle.call())["id"] == ""  # none named
        # options() keeps the model id unless given another.
        kept = handle.options(multiplexed_model_id="b").options(timeout_s=5)
        assert (await kept.call())["id"] == "b"


async def test_queries_for_a_model_stick_to_a_replica_that_loaded_it(ctl: Any) -> None:
    handle = await serve(ctl, "models", "Models", num_replicas=3, max_concurrent_queries=8)
    with trio.fail_after(BOUND_S):
        by_model: dict[str, set[str]] = {}
        for _ in range(4):
            for model in ("a", "b", "c"):
                got = await handle.options(multiplexed_model_id=model).call()
                by_model.setdefault(model, set()).add(got["replica"])
                assert got["loads"][model] == 1  # loaded once, where it went first
        plain = {(await handle.call())["replica"] for _ in range(12)}
    assert all(len(replicas) == 1 for replicas in by_model.values()), by_model
    assert len(plain) == 3  # without a model id, queries spread as before


async def test_a_replica_keeps_its_last_models_and_loads_an_evicted_one_again(ctl: Any) -> None:
    handle = await serve(ctl, "models", "Models")  # one replica, two models kept
    with trio.fail_after(BOUND_S):
        for model in ("a", "b", "a", "c"):  # c evicts b (a was used more recently)
            got = await handle.options(multiplexed_model_id=model).call()
        assert got["loads"] == {"a": 1, "b": 1, "c": 1}
        got = await handle.options(multiplexed_model_id="b").call()
    assert got["loads"] == {"a": 1, "b": 2, "c": 1}


async def test_concurrent_queries_for_a_model_share_one_async_load(ctl: Any) -> None:
    handle = (await serve(ctl, "models", "AsyncModels", max_concurrent_queries=8)).options(
        multiplexed_model_id="x"
    )
    results: list[dict[str, Any]] = []

    async def one() -> None:
        results.append(await handle.call())

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
    assert [r["model"] for r in results] == ["model-x"] * 5
    assert max(r["loads"]["x"] for r in results) == 1


async def test_a_stream_reads_its_model_id(ctl: Any) -> None:
    handle = await serve(ctl, "ids", "model_ids")
    with trio.fail_after(BOUND_S):
        async with handle.options(multiplexed_model_id="m").stream(2) as items:
            assert [item async for item in items] == ["m", "m"]


async def test_the_http_header_names_the_model(ctl: Any) -> None:
    await serve(ctl, "models", "Models")
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(serve_http, ctl, "127.0.0.1:0")
        with trio.fail_after(BOUND_S):
            got = await trio.to_thread.run_sync(_get, url, {"serve_multiplexed_model_id": "Zz"})
            assert (got["id"], got["model"]) == ("Zz", "model-Zz")  # case kept
            assert (await trio.to_thread.run_sync(_get, url, {}))["id"] == ""
        nursery.cancel_scope.cancel()


def _get(url: str, headers: dict[str, str]) -> Any:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=BOUND_S)
    try:
        conn.request("GET", "/models", headers=headers)
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        conn.close()


def test_a_loader_refuses_a_bad_limit_or_model_id() -> None:
    with pytest.raises(ValueError, match="max_num_models_per_replica=0"):
        servecore.multiplexed(max_num_models_per_replica=0)

    @servecore.multiplexed
    def load(model_id: str) -> str:
        return model_id.upper()

    assert load("a") == "A" and load("a") == "A"
    with pytest.raises(ValueError, match="non-empty string"):
        load("")
