"""Ingress workers in-process: the asyncio-to-trio bridge they query through, and the
``/-/`` routes they answer from their own table. ``servecore run --workers`` end to end
(real processes, a SIGKILLed controller) is in tests/ops/test_cli.py."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from servecore._core.maps import Map
from servecore._core.transitions import BackendRoute, Endpoint, RoutingTable
from servecore._serving.asyncio_client import TrioGuest
from servecore._serving.worker import (
    answer_worker_ops,
    default_loop,
    serve_worker,
    worker_readyz,
)


def _with_guest(body: Any) -> Any:
    """Run ``body(guest)`` on asyncio with trio as its guest; return its result."""

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        started: asyncio.Future[TrioGuest] = loop.create_future()
        finished: asyncio.Future[None] = loop.create_future()
        release = trio.Event()

        async def trio_main() -> None:
            async with trio.open_nursery() as nursery:
                started.set_result(TrioGuest(loop, trio.lowlevel.current_trio_token(), nursery))
                await release.wait()
                nursery.cancel_scope.cancel()

        trio.lowlevel.start_guest_run(
            trio_main,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=loop.call_soon,
            done_callback=lambda outcome: finished.set_result(outcome.unwrap()),
        )
        guest = await started
        try:
            return await body(guest)
        finally:
            guest._token.run_sync_soon(release.set)
            await finished

    return asyncio.run(main())


def test_a_query_from_asyncio_runs_on_trio_and_returns_its_result_or_error() -> None:
    async def on_trio(x: int) -> tuple[int, bool]:
        await trio.sleep(0)
        return x * 2, trio.lowlevel.current_task() is not None

    async def fails() -> None:
        await trio.sleep(0)
        raise KeyError("from trio")

    async def body(guest: TrioGuest) -> Any:
        answers = await asyncio.gather(*(guest.run(on_trio, i) for i in range(5)))
        with pytest.raises(KeyError, match="from trio"):
            await guest.run(fails)
        return answers

    assert _with_guest(body) == [(i * 2, True) for i in range(5)]


def test_a_caller_that_goes_away_cancels_the_trio_task() -> None:
    cancelled = []

    async def forever() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise

    async def body(guest: TrioGuest) -> None:
        task = asyncio.ensure_future(guest.run(forever))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if cancelled:
                break
            await asyncio.sleep(0.01)

    _with_guest(body)
    assert cancelled == [True]


class _Client:
    def __init__(self, table: RoutingTable) -> None:
        self.routing_table = table


def _table(replicas: tuple[str, ...]) -> RoutingTable:
    return RoutingTable(
        endpoints=Map(
            {
                "echo": Endpoint(name="echo", route="/echo", traffic={"echo": 1.0}),
                "inner": Endpoint(name="inner", traffic={"echo": 1.0}),
            }
        ),
        backends=Map({"echo": BackendRoute(tag="echo", replicas=replicas)}),
    )


def test_a_worker_is_ready_when_every_route_has_a_replica_in_its_table() -> None:
    assert worker_readyz(_Client(_table(("echo#0",)))) == (200, {"status": "ready"})  # type: ignore[arg-type]
    status, body = worker_readyz(_Client(_table(())))  # type: ignore[arg-type]
    assert status == 503
    assert body["reasons"] == ["endpoint 'echo' at /echo has no RUNNING replica"]


def _ops(client: Any, path: str, method: str = "GET") -> tuple[int, Any]:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def run() -> bool:
        return await answer_worker_ops(client, {"path": path, "method": method}, receive, send)

    assert trio.run(run)
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_a_worker_answers_the_operator_routes_from_its_table() -> None:
    client = _Client(_table(("echo#0",)))
    assert _ops(client, "/-/healthz") == (200, {"status": "ok"})
    assert _ops(client, "/-/routes") == (200, {"/echo": "echo"})
    status, body = _ops(client, "/-/metrics")  # a worker given no metric files
    assert status == 501 and "no /-/metrics here" in body["error"]
    for page in ("/-/dashboard", "/-/status.json", "/-/events"):
        status, body = _ops(client, page)
        assert status == 501 and page in body["error"] and "--workers 0" in body["error"]
    assert _ops(client, "/-/readyz", "POST")[0] == 405
    assert _ops(client, "/-/nope")[0] == 404


def test_a_worker_handle_keeps_its_model_id_across_options_and_refuses_a_bad_one() -> None:
    from servecore._serving.asyncio_queries import AsyncioHandle

    handle = AsyncioHandle(None, "models")  # type: ignore[arg-type]
    named = handle.options(multiplexed_model_id="m").options(timeout_s=5)
    assert (named.multiplexed_model_id, named.timeout_s) == ("m", 5)
    assert named.options(multiplexed_model_id="").multiplexed_model_id == ""
    with pytest.raises(ValueError, match="multiplexed_model_id=3 must be a string"):
        handle.options(multiplexed_model_id=3)  # type: ignore[arg-type]
    assert handle.multiplexed_model_id == ""  # unchanged


def test_a_worker_refuses_an_event_loop_it_does_not_know_and_names_those_it_does() -> None:
    with pytest.raises(ValueError, match=r"loop='tokio' is not one of asyncio, uvloop"):
        serve_worker(Path("nowhere.db"), -1, loop="tokio")


def test_without_uvloop_a_worker_runs_on_asyncio_and_refuses_uvloop_saying_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop: ImportError
    assert default_loop() == "asyncio"
    with pytest.raises(ValueError, match=r"loop='uvloop' needs the uvloop package.*'asyncio'"):
        serve_worker(Path("nowhere.db"), -1, loop="uvloop")
