"""An ingress worker's asyncio query path (``_serving/asyncio_queries.py``) against real
subprocess replicas: queries and streams that never enter trio, the queue for a slot,
a draining replica's refusal resent to another, a replica that dies mid-query, and the
HTTP answers of the worker's ingress (``HTTPIngress(loop="asyncio")``) for each.

The harness is a worker without its processes: asyncio with trio as its guest, a
router fed the controller's table, this loop's own connections to the replicas. The
controller is a ``servecore.start`` with the subprocess runtime in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import servecore
from servecore._core.errors import BackpressureError
from servecore._serving.asyncio_client import TrioGuest
from servecore._serving.asyncio_queries import AsyncioHandle, AsyncioQueries
from servecore._serving.remote_runtime import ReplicaClient
from servecore._serving.replica_links import ReplicaLinks
from servecore._serving.worker import LOOPS
from servecore.http import HTTPIngress
from servecore.router import Router
from servecore.runtimes._protocol import Query
from servecore.runtimes.subprocess import SubprocessRuntime
from servecore.runtimes.subprocess.files import ReplicaFiles, replica_key

pytestmark = pytest.mark.slow

SUPPORT = str(Path(__file__).resolve().parents[1] / "support")


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[servecore.SyncController]:
    sys.path.insert(0, SUPPORT)  # replicas import targets with the host's sys.path
    controller = servecore.start(SubprocessRuntime(tmp_path / "replicas"), None)
    try:
        yield controller
    finally:
        for endpoint in list(controller.state.endpoints):
            controller.delete_endpoint(endpoint)
        for backend in list(controller.state.backends):
            controller.delete_backend(backend)
        controller.close()
        sys.path.remove(SUPPORT)


class Worker:
    """What an ingress worker holds: the router, its trio client, the asyncio path."""

    def __init__(self, router: Router, replicas: ReplicaClient, queries: AsyncioQueries) -> None:
        self.router = router
        self.replicas = replicas
        self.queries = queries

    def app(self, timeout_s: float | None = 30.0) -> HTTPIngress:
        queries = self.queries

        class Source:
            routing_table = self.router_table

            def get_handle(self, endpoint: str) -> AsyncioHandle:
                return AsyncioHandle(queries, endpoint)

        return HTTPIngress(Source(), timeout_s=timeout_s, loop="asyncio")

    router_table: Any = None


def run_worker(
    ctl: servecore.SyncController,
    body: Callable[[Worker], Awaitable[Any]],
    *,
    max_queued_queries: int = 256,
    loop: str = "asyncio",
) -> Any:
    """Run ``body(worker)`` on an asyncio loop of kind ``loop`` (asyncio's own, or
    uvloop's), with trio as its guest (as a worker does)."""

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        started: asyncio.Future[tuple[Router, ReplicaClient, TrioGuest]] = loop.create_future()
        finished: asyncio.Future[None] = loop.create_future()
        release = trio.Event()

        async def trio_main() -> None:
            replicas = ReplicaClient(ctl.runtime.directory)  # type: ignore[attr-defined]
            router = Router(replicas, max_queued_queries=max_queued_queries)
            async with trio.open_nursery() as nursery:
                replicas.start(nursery)
                router.start(nursery)
                router.update(ctl.routing_table)
                guest = TrioGuest(loop, trio.lowlevel.current_trio_token(), nursery)
                started.set_result((router, replicas, guest))
                await release.wait()
                nursery.cancel_scope.cancel()
            replicas.close()

        trio.lowlevel.start_guest_run(
            trio_main,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=loop.call_soon,
            done_callback=lambda outcome: finished.set_result(outcome.unwrap()),
            host_uses_signal_set_wakeup_fd=True,  # as the worker's (uvloop sets one)
        )
        router, replicas, guest = await started
        links = ReplicaLinks(replicas.address_of)
        worker = Worker(router, replicas, AsyncioQueries(router, links, guest, loop))
        worker.router_table = ctl.routing_table
        try:
            return await body(worker)
        finally:
            links.close()
            guest.run_soon(release.set)
            await finished

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    return asyncio.run(main())


def _pid_of(ctl: servecore.SyncController, tag: str) -> int:
    directory = str(ctl.runtime.directory)  # type: ignore[attr-defined]
    record = ReplicaFiles(directory, replica_key(tag)).read_record()
    assert record is not None
    return int(record["pid"])


def _log_of(ctl: servecore.SyncController, tag: str) -> str:
    """The replica's log, live or kept after its death (under ``logs/``)."""
    directory = Path(ctl.runtime.directory)  # type: ignore[attr-defined]
    key = replica_key(tag)
    paths = [directory / f"{key}.log", *(directory / "logs").glob(f"*{key}.log")]
    return "".join(p.read_text() for p in paths if p.exists())


async def _http(
    app: HTTPIngress,
    method: str,
    path: str,
    body: Any = None,
    accept: bytes = b"application/json",
    disconnect_after: int | None = None,
) -> tuple[int, bytes]:
    """One request to ``app``; the status and the whole body. ``disconnect_after``:
    the client goes away once that many body chunks have arrived."""
    raw = b"" if body is None else json.dumps(body).encode()
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        chunks = [m for m in sent if m["type"] == "http.response.body"]
        if disconnect_after is not None and len(chunks) >= disconnect_after:
            gone.set()

    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query.encode(),
        "headers": [(b"content-type", b"application/json"), (b"accept", accept)],
    }
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_queries_go_straight_to_the_replica_and_wait_their_turn_for_a_slot(
    ctl: servecore.SyncController,
) -> None:
    ctl.create_backend("slow", "subprocess_targets:Slow", max_concurrent_queries=2)
    ctl.create_endpoint("slow", route="/slow", methods=("POST",))
    ctl.set_traffic("slow", {"slow": 1.0})

    async def body(worker: Worker) -> None:
        queries = worker.queries
        calls = [
            asyncio.ensure_future(queries.call("slow", Query(args=(0.2,)), 30.0)) for _ in range(6)
        ]
        await asyncio.sleep(0.1)
        # Two run (the replica's max_concurrent_queries), four wait here, and the load
        # the client reports counts them all.
        assert queries.waiting() == {"slow": 4}
        assert worker.router.ongoing_queries() == {"slow": 2}
        assert await asyncio.gather(*calls) == ["slept 0.2"] * 6
        assert queries.waiting() == {}
        # Not one of them entered trio: the client's own connections were never made.
        assert worker.replicas.connected == frozenset()
        status, answer = await _http(worker.app(), "POST", "/slow", 0)
        assert (status, json.loads(answer)) == (200, "slept 0")

    run_worker(ctl, body)


def test_past_the_queue_bound_a_query_is_refused_with_backpressure_and_503(
    ctl: servecore.SyncController,
) -> None:
    ctl.create_backend("slow", "subprocess_targets:Slow", max_concurrent_queries=1)
    ctl.create_endpoint("slow", route="/slow", methods=("POST",))
    ctl.set_traffic("slow", {"slow": 1.0})

    async def body(worker: Worker) -> None:
        queries = worker.queries
        calls = [
            asyncio.ensure_future(queries.call("slow", Query(args=(0.3,)), 30.0)) for _ in range(3)
        ]
        await asyncio.sleep(0.1)  # one runs, two wait: the queue is full
        with pytest.raises(BackpressureError, match="'slow'"):
            await queries.call("slow", Query(args=(0,)), 30.0)
        status, answer = await _http(worker.app(), "POST", "/slow", 0)
        assert status == 503 and json.loads(answer)["type"] == "BackpressureError"
        assert await asyncio.gather(*calls) == ["slept 0.3"] * 3

    run_worker(ctl, body, max_queued_queries=2)


def test_a_query_past_its_timeout_answers_504_and_frees_its_slot(
    ctl: servecore.SyncController,
) -> None:
    ctl.create_backend("slow", "subprocess_targets:Slow", max_concurrent_queries=1)
    ctl.create_endpoint("slow", route="/slow", methods=("POST",))
    ctl.set_traffic("slow", {"slow": 1.0})

    async def body(worker: Worker) -> None:
        status, answer = await _http(worker.app(timeout_s=0.2), "POST", "/slow", 1.0)
        assert status == 504
        assert json.loads(answer) == {
            "error": "query to endpoint 'slow' got no answer within 0.2s",
            "type": "TimeoutError",
        }
        assert worker.router.ongoing_queries() == {"slow": 0}
        # One waiting in the queue past its timeout leaves the queue, holding nothing.
        running = asyncio.ensure_future(worker.queries.call("slow", Query(args=(0.5,)), 5.0))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError, match=r"within 0\.1s"):
            await worker.queries.call("slow", Query(args=(0,)), 0.1)
        assert worker.queries.waiting() == {}
        assert await running == "slept 0.5"
        assert worker.router.ongoing_queries() == {"slow": 0}
        await asyncio.sleep(1.0)  # the sync call runs to its end in the replica
        assert await worker.queries.call("slow", Query(args=(0,)), 5.0) == "slept 0"

    run_worker(ctl, body)


def test_a_draining_replica_refuses_a_query_unbegun_and_it_is_sent_to_another(
    ctl: servecore.SyncController,
) -> None:
    ctl.create_backend("slow", "subprocess_targets:Slow", num_replicas=2)
    ctl.create_endpoint("slow", route="/slow", methods=("POST",))
    ctl.set_traffic("slow", {"slow": 1.0})
    first, second = ctl.routing_table.backends["slow"].replicas

    async def body(worker: Worker) -> None:
        queries = worker.queries
        for _ in range(4):  # both links open (ties between the replicas alternate)
            assert await queries.call("slow", Query(args=(0,)), 5.0) == "slept 0"
        # A call the router does not count keeps the first replica busy while it drains.
        other = ReplicaLinks(worker.replicas.address_of)
        busy = asyncio.get_running_loop().create_future()
        (await other.open(first)).send_call(Query(args=(1.5,)), busy, lambda: None)
        await asyncio.sleep(0.2)
        os.kill(_pid_of(ctl, first), signal.SIGTERM)
        await asyncio.sleep(0.3)
        # Both replicas are idle to this router: the first gets every other query, and
        # refuses it unbegun; each is resent to the second and answered.
        for _ in range(4):
            status, answer = await _http(worker.app(), "POST", "/slow", 0)
            assert (status, json.loads(answer)) == (200, "slept 0")
        assert await busy == "slept 1.5"  # what the draining replica had begun, it finished
        other.close()
        state = worker.router.backend_state("slow")
        assert state is not None and state.live == [second]

    run_worker(ctl, body)
    assert "refused a call: draining" in _log_of(ctl, first)


def test_a_replica_that_dies_mid_query_answers_502_and_the_query_is_not_resent(
    ctl: servecore.SyncController,
) -> None:
    ctl.create_backend("slow", "subprocess_targets:Slow", num_replicas=2)
    ctl.create_endpoint("slow", route="/slow", methods=("POST",))
    ctl.set_traffic("slow", {"slow": 1.0})

    async def body(worker: Worker) -> None:
        app = worker.app()
        request = asyncio.ensure_future(_http(app, "POST", "/slow", 5))
        await asyncio.sleep(0.5)
        state = worker.router.backend_state("slow")
        assert state is not None
        [victim] = [tag for tag, n in state.outstanding.items() if n]
        os.kill(_pid_of(ctl, victim), signal.SIGKILL)
        status, answer = await asyncio.wait_for(request, 10)
        assert status == 502
        error = json.loads(answer)
        assert error["type"] == "ReplicaDiedError" and victim in error["error"]
        assert victim not in state.live  # skipped from now on, before any new table
        status, answer = await _http(app, "POST", "/slow", 0)
        assert (status, json.loads(answer)) == (200, "slept 0")

    run_worker(ctl, body)


def test_a_worker_streams_json_lines_and_sse_and_a_client_that_leaves_stops_the_generator(
    ctl: servecore.SyncController,
) -> None:
    ctl.create_backend("counter", "stream_targets:Counter")
    ctl.create_endpoint("count", route="/count", methods=("POST",))
    ctl.set_traffic("count", {"counter": 1.0})

    async def body(worker: Worker) -> None:
        app = worker.app()
        status, lines = await _http(app, "POST", "/count", [3, 0], b"application/x-ndjson")
        assert status == 200
        assert [json.loads(line)[0] for line in lines.splitlines()] == [0, 1, 2]
        status, events = await _http(app, "POST", "/count", [2, 0], b"text/event-stream")
        assert status == 200
        parts = events.decode().split("\n\n")
        assert parts[0].startswith("data: [0, ") and parts[1].startswith("data: [1, ")
        assert parts[2:] == ["event: end\ndata: {}", ""]
        # A client that goes away after 3 items stops the generator in the replica.
        status, _ = await _http(
            app, "POST", "/count", [1000, 0.01], b"application/x-ndjson", disconnect_after=3
        )
        assert status == 200
        deadline = time.monotonic() + 10
        while True:
            _, stats = await _http(app, "POST", "/count", "stats", b"application/x-ndjson")
            record = json.loads(stats.splitlines()[0])
            if record["stopped"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert len(record["stopped"]) == 1 and record["stopped"][0] < 100
        assert worker.router.ongoing_queries() == {"counter": 0}
        assert worker.replicas.connected == frozenset()  # streamed without trio

    run_worker(ctl, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_on_either_event_loop_a_worker_answers_streams_and_cancels_for_a_client_that_left(
    ctl: servecore.SyncController, loop: str
) -> None:
    # uvloop's transports are not asyncio.Transport's subclasses: the replica links
    # once refused them, and every query on uvloop failed without reaching a replica.
    ctl.create_backend("counter", "stream_targets:Counter")
    ctl.create_endpoint("count", route="/count", methods=("POST",))
    ctl.set_traffic("count", {"counter": 1.0})
    ctl.create_backend("rec", "async_targets:Recorder", max_concurrent_queries=4, init_args=(0,))
    ctl.create_endpoint("rec", route="/rec", methods=("POST",))
    ctl.set_traffic("rec", {"rec": 1.0})

    async def body(worker: Worker) -> None:
        assert type(asyncio.get_running_loop()).__module__.partition(".")[0] == loop
        app = worker.app()
        status, answer = await _http(app, "POST", "/rec", 7)
        assert status == 200 and json.loads(answer)[0] == 7
        status, lines = await _http(app, "POST", "/count", [3, 0], b"application/x-ndjson")
        assert status == 200
        assert [json.loads(line)[0] for line in lines.splitlines()] == [0, 1, 2]
        # A client that leaves while its query runs: the replica's task is cancelled.
        await _leave_mid_query(worker, app)
        assert worker.router.ongoing_queries() == {"counter": 0, "rec": 0}
        assert worker.replicas.connected == frozenset()  # all on this loop's links

    run_worker(ctl, body, loop=loop)


def test_a_worker_stream_ends_with_its_error_after_every_item_before_it(
    ctl: servecore.SyncController,
) -> None:
    ctl.create_backend("failing", "stream_targets:failing")
    ctl.create_endpoint("failing", route="/failing", methods=("POST",))
    ctl.set_traffic("failing", {"failing": 1.0})
    ctl.create_backend("odd", "stream_targets:not_json_after")
    ctl.create_endpoint("odd", route="/odd", methods=("POST",))
    ctl.set_traffic("odd", {"odd": 1.0})

    async def body(worker: Worker) -> None:
        app = worker.app()
        status, text = await _http(app, "POST", "/failing", 50, b"application/x-ndjson")
        records = [json.loads(line) for line in text.splitlines()]
        assert status == 200 and records[:50] == list(range(50))
        assert records[50:] == [{"error": "no more after 50", "type": "LookupError"}]
        # Items arrive faster than they are sent, and go out several to a chunk: those
        # before one that is not JSON are all sent, then the error ends the stream.
        status, text = await _http(app, "POST", "/odd", 40, b"application/x-ndjson")
        records = [json.loads(line) for line in text.splitlines()]
        assert status == 200 and records[:40] == list(range(40))
        [error] = records[40:]
        assert error["type"] == "_ItemNotJSON" and "'odd'" in error["error"]
        assert worker.router.ongoing_queries() == {"failing": 0, "odd": 0}

    run_worker(ctl, body)


STREAM_APP = """
[backends.counter]
target = "stream_targets:Counter"

[endpoints.count]
route = "/count"
methods = ["POST"]
traffic = { counter = 1.0 }
"""


def test_a_real_worker_process_streams_json_lines_and_sse(tmp_path: Path) -> None:
    """``servecore run --workers 1`` end to end: the worker process streams."""
    import http.client
    import socket
    import subprocess

    (tmp_path / "app.toml").write_text(STREAM_APP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), SUPPORT]))
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "servecore", "run", str(tmp_path / "app.toml")),
            *("--runtime", "subprocess", "--workers", "1", "--port", str(port)),
            *("--store", str(tmp_path / "state.db"), "--stop-replicas"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:
            if line.startswith("servecore: serving"):
                assert "1 ingress worker" in line
                break
        else:
            raise AssertionError("servecore run exited before serving")

        def post(accept: str, body: Any) -> tuple[int, str, str]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                headers = {"Accept": accept, "Content-Type": "application/json"}
                conn.request("POST", "/count", body=json.dumps(body), headers=headers)
                response = conn.getresponse()
                return response.status, response.getheader("content-type"), response.read().decode()
            finally:
                conn.close()

        status, media, text = post("application/x-ndjson", [4, 0])
        assert (status, media) == (200, "application/x-ndjson")
        assert [json.loads(line)[0] for line in text.splitlines()] == [0, 1, 2, 3]
        status, media, text = post("text/event-stream", [2, 0])
        assert (status, media) == (200, "text/event-stream")
        assert text.endswith("event: end\ndata: {}\n\n") and text.count("data: [") == 2
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_a_client_that_leaves_cancels_its_query_in_the_replica(
    ctl: servecore.SyncController,
) -> None:
    ctl.create_backend("rec", "async_targets:Recorder", max_concurrent_queries=4)
    ctl.create_endpoint("rec", route="/rec", methods=("POST",))
    ctl.set_traffic("rec", {"rec": 1.0})

    async def body(worker: Worker) -> None:
        await _leave_mid_query(worker, worker.app())
        assert worker.router.ongoing_queries() == {"rec": 0}

    run_worker(ctl, body)


def test_a_query_on_trios_path_that_times_out_counts_timed_out(
    ctl: servecore.SyncController,
) -> None:
    # Batching goes through trio's router: its own timer must fire first.
    ctl.create_backend("sb", "subprocess_targets:slow_batch", max_batch_size=2)
    ctl.create_endpoint("sb", route="/sb", methods=("POST",))
    ctl.set_traffic("sb", {"sb": 1.0})

    async def body(worker: Worker) -> None:
        assert await worker.queries.call("sb", Query(args=(0,)), 30.0) == "slept 0"
        status, _ = await _http(worker.app(timeout_s=0.2), "POST", "/sb", 1.0)
        assert status == 504
        counts = worker.router.statistics().queries
        assert counts.get(("sb", "sb", "timed_out")) == 1, counts
        assert ("sb", "sb", "cancelled") not in counts

    run_worker(ctl, body)


def test_a_stream_item_later_than_the_timeout_raises_timeout_and_stops_the_generator(
    ctl: servecore.SyncController,
) -> None:
    ctl.create_backend("counter", "stream_targets:Counter")
    ctl.create_endpoint("count", methods=("POST",))
    ctl.set_traffic("count", {"counter": 1.0})

    async def body(worker: Worker) -> None:
        handle = AsyncioHandle(worker.queries, "count").options(timeout_s=0.3)
        items = handle.stream(3, 0.05)
        assert [item[0] async for item in items] == [0, 1, 2]  # each within the timeout
        slow = handle.stream(3, 2.0)
        with pytest.raises(TimeoutError, match=r"gave no item within 0\.3s"):
            await slow.__anext__()
        assert worker.router.ongoing_queries() == {"counter": 0}

    run_worker(ctl, body)


async def _leave_mid_query(worker: Worker, app: Any) -> None:
    """POST ``"hang"`` to ``/rec`` (an ``async_targets:Recorder``), leave once its
    replica runs it, and check the app answers nothing and the replica's task is
    cancelled."""
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b'"hang"', "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/rec",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    request = asyncio.ensure_future(app(scope, receive, send))
    deadline = time.monotonic() + 20
    while not await worker.queries.call("rec", Query(args=("hanging",)), 5.0):
        assert time.monotonic() < deadline and not request.done()
        await asyncio.sleep(0.02)
    gone.set()  # the client goes away while its query runs
    await asyncio.wait_for(request, 20)
    assert sent == []  # nobody to answer
    while "hang" not in await worker.queries.call("rec", Query(args=("cancelled",)), 5.0):
        assert time.monotonic() < deadline, "the replica's task was never cancelled"
        await asyncio.sleep(0.02)
