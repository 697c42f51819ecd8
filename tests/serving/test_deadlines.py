"""Deadlines and query outcomes through the controller (docs/design.md §5, "Deadlines").

On the threads and subprocess runtimes: a handle's ``timeout_s`` reaches user code as
``servecore.time_remaining()``; a query whose deadline passed while it waited is dropped
unrun; ``timed_out`` and ``cancelled`` are counted apart from ``ok`` and ``error`` in
the router's statistics, the Prometheus metrics, status and ``/-/status.json``. No
wall-clock thresholds: bounded waits only guard against hanging.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

import servecore
from deadline_targets import ran
from servecore import DeadlineExceeded, Query
from servecore._serving.dashboard import status_feed
from servecore.http import serve_http
from subprocess_helpers import kill_everything_under

BOUND_S = 30.0
T = "deadline_targets:"


@pytest.fixture(params=["threads", "subprocess"])
async def ctl(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    options = {"directory": tmp_path / "rt"} if request.param == "subprocess" else {}
    try:
        async with servecore.open_controller(
            runtime=request.param, runtime_options=options, name="deadlines"
        ) as controller:
            yield controller
            (tmp_path / "gate").touch()  # let any held query finish before the stop
    finally:
        kill_everything_under(tmp_path)


async def serve(ctl: Any, name: str, target: str, *init_args: Any, **config: Any) -> Any:
    await ctl.create_backend(name, T + target, init_args=init_args, **config)
    await ctl.create_endpoint(name, route=f"/{name}", methods=["GET", "POST"])
    await ctl.set_traffic(name, {name: 1.0})
    return ctl.get_handle(name)


async def until(predicate: Any) -> None:
    with trio.fail_after(BOUND_S):
        while not predicate():
            await trio.sleep(0.01)


def counts(ctl: Any, endpoint: str) -> dict[str, int]:
    return {
        outcome: n
        for (e, _b, outcome), n in ctl.router_statistics().queries.items()
        if e == endpoint
    }


@pytest.mark.parametrize("target", ["remaining", "async_remaining"])
async def test_a_handle_timeout_reaches_user_code_as_the_time_left(ctl: Any, target: str) -> None:
    handle = await serve(ctl, "left", target)
    with trio.fail_after(BOUND_S):
        left = await handle.options(timeout_s=20).call()
        assert left is not None and 0 < left <= 20
        assert await handle.call() is None  # no timeout: no deadline
        # From a host thread: the router's direct path (subprocess: blocking.py).
        token = trio.lowlevel.current_trio_token()
        sync = servecore.SyncHandle(handle.options(timeout_s=20), token)
        left = await trio.to_thread.run_sync(sync.call)
        assert left is not None and 0 < left <= 20


async def test_a_nested_call_waits_no_longer_than_its_caller() -> None:
    async with servecore.open_controller(runtime="threads") as ctl:
        await serve(ctl, "remaining", "remaining")
        outer = await serve(ctl, "nested", "nested")
        with trio.fail_after(BOUND_S):
            here, inner = await outer.options(timeout_s=20).call()
            assert await outer.call() == (None, None)
    assert here is not None and inner is not None
    assert 0 < inner <= here <= 20


NESTED_APP = """
[backends.remaining]
target = "deadline_targets:remaining"

[backends.nested]
target = "deadline_targets:nested"

[endpoints.remaining]
traffic = { remaining = 1.0 }

[endpoints.nested]
traffic = { nested = 1.0 }
"""


@pytest.mark.slow
def test_a_nested_call_from_a_subprocess_replica_carries_the_deadline(tmp_path: Path) -> None:
    from cli_server import CliServer

    server = CliServer(tmp_path)
    try:
        server.serve(
            server.write("app.toml", NESTED_APP), "--runtime", "subprocess", "--workers", "0"
        )
        with servecore.connect(server.store) as client:
            here, inner = client.get_handle("nested").options(timeout_s=20).call()
            assert tuple(client.get_handle("nested").call()) == (None, None)
    finally:
        server.stop_everything()
    assert here is not None and inner is not None
    assert 0 < inner <= here <= 20


async def test_a_query_whose_deadline_passes_in_the_router_queue_is_dropped_and_counted(
    ctl: Any, tmp_path: Path
) -> None:
    ran_file, gate = tmp_path / "ran", tmp_path / "gate"
    handle = await serve(ctl, "held", "Held", str(ran_file), str(gate), max_concurrent_queries=1)
    router = handle.router
    dropped: list[BaseException] = []

    async def late_one() -> None:
        # A deadline without a timer of the caller's own: the queue itself must drop it.
        query = Query(args=("late",), deadline=time.time() + 0.2)
        try:
            await router.call("held", query)
        except DeadlineExceeded as exc:
            dropped.append(exc)

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle.call, "hold")
            await until(lambda: ran(ran_file) == ["hold"])
            nursery.start_soon(late_one)
            await until(lambda: router.statistics().backends["held"].queued == 1)
            await trio.sleep(0.4)  # past its deadline (not a threshold)
            gate.touch()
    assert len(dropped) == 1 and "the queue of backend 'held'" in str(dropped[0])
    assert ran(ran_file) == ["hold"]  # "late" never ran
    assert counts(ctl, "held") == {"ok": 1, "timed_out": 1}


async def test_timed_out_and_cancelled_are_counted_apart_from_ok_and_error(
    ctl: Any, tmp_path: Path
) -> None:
    ran_file, gate = tmp_path / "ran", tmp_path / "gate"
    handle = await serve(ctl, "held", "Held", str(ran_file), str(gate), max_concurrent_queries=4)
    with trio.fail_after(BOUND_S):
        assert await handle.call("quick") == "quick"
        with pytest.raises(TimeoutError):
            await handle.options(timeout_s=0.2).call("hold1")
        (tmp_path / "gate.hold1").touch()  # (a threads replica runs one sync call at once)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle.call, "hold2")
            await until(lambda: "hold2" in ran(ran_file))
            nursery.cancel_scope.cancel()  # the caller gives up
    want = {"ok": 1, "timed_out": 1, "cancelled": 1}
    assert counts(ctl, "held") == want
    status = await ctl.status()
    (backend,) = status.backends
    (endpoint,) = status.endpoints
    assert backend.queries == want and endpoint.queries == want
    assert status.as_dict()["backends"][0]["queries"] == want
    assert status_feed(ctl)["queries"]["held"]["outcomes"] == want
    metrics = pytest.importorskip("servecore.metrics")
    text = metrics.exposition(ctl).decode()
    for outcome, n in want.items():
        line = f'servecore_queries_total{{backend="held",endpoint="held",outcome="{outcome}"}}'
        assert f"{line} {float(n)}" in text, text


async def test_an_http_client_that_disconnects_is_counted_cancelled(
    ctl: Any, tmp_path: Path
) -> None:
    ran_file, gate = tmp_path / "ran", tmp_path / "gate"
    await serve(ctl, "held", "Held", str(ran_file), str(gate), max_concurrent_queries=4)
    await serve(ctl, "left", "remaining")
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(serve_http, ctl, "127.0.0.1:0")
        host, port = url.removeprefix("http://").split(":")
        with trio.fail_after(BOUND_S):
            left = await trio.to_thread.run_sync(_get, host, int(port), "/left")
            assert 0 < float(left) <= 30  # the ingress's timeout_s (30 s) is the deadline
            sock = await trio.to_thread.run_sync(_post_and_keep, host, int(port), "/held")
            await until(lambda: ran(ran_file) == ["hold"])
            sock.close()  # the client goes away before the answer
            await until(lambda: counts(ctl, "held").get("cancelled") == 1)
        nursery.cancel_scope.cancel()
    assert counts(ctl, "held") == {"cancelled": 1}


async def test_an_http_client_that_leaves_before_the_first_item_cancels_the_stream(
    ctl: Any, tmp_path: Path
) -> None:
    ran_file, gate = tmp_path / "ran", tmp_path / "gate"
    await serve(ctl, "tokens", "HeldStream", str(ran_file), str(gate), max_concurrent_queries=4)
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(serve_http, ctl, "127.0.0.1:0")
        host, port = url.removeprefix("http://").split(":")
        with trio.fail_after(BOUND_S):
            accept = {"accept": "application/x-ndjson"}
            sock = await trio.to_thread.run_sync(_post_and_keep, host, int(port), "/tokens", accept)
            await until(lambda: ran(ran_file) == ["hold"])
            sock.close()  # gone while the generator works on its first item
            await until(lambda: counts(ctl, "tokens").get("cancelled") == 1)
            await until(lambda: ctl.router_statistics().backends["tokens"].running == 0)
        nursery.cancel_scope.cancel()
    assert counts(ctl, "tokens") == {"cancelled": 1}


def _get(host: str, port: int, path: str) -> str:
    with socket.create_connection((host, port), timeout=BOUND_S) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def _post_and_keep(
    host: str, port: int, path: str, headers: dict[str, str] | None = None
) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=BOUND_S)
    body = b'"hold"'
    more = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{more}"
        f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock
