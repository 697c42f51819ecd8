"""The data plane on Ray: ``servecore.connect`` clients, composition and streams.

The controller is a real ``servecore run --runtime ray`` (a process of its own) on the
private cluster of ``conftest.py``, in a Ray namespace of its own (``--name``). Clients
are this test process (already a driver on that cluster) or a small script in a
process of its own, which joins the cluster itself. Everything started here is stopped
by pid; the replica actors the namespace fixture kills.

Waits are bounded only so that a bug fails a test instead of hanging it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip(
    "ray", reason="the Ray runtime tests need the 'ray' extra: pip install 'servecore[ray]'"
)

import servecore  # noqa: E402
from cli_server import CliServer, servecore_env  # noqa: E402
from ray_helpers import WORKER_PATH  # noqa: E402
from servecore.runtimes.toolkit import DEFAULT_STREAM_WINDOW  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

WAIT_S = 120  # only ever a guard against hanging

SERVER = """
[server]
runtime = "ray"

[server.runtime_options]
address = "{address}"
init_options = {{ runtime_env = {{ env_vars = {{ PYTHONPATH = "{path}" }} }} }}
"""

ECHO_APP = """
[backends.echo]
target = "ray_driver:Echo"
init_kwargs = { prefix = "v1:" }
num_replicas = 2
runtime_options = { num_cpus = 0 }

[endpoints.echo]
traffic = { echo = 1.0 }
"""

COMPOSED_APP = "".join(
    f"""
[backends.{name}]
target = "composed_targets:{name}"
runtime_options = {{ num_cpus = 0 }}

[endpoints.{name}]
traffic = {{ {name} = 1.0 }}
"""
    for name in ("inner", "outer", "outer_async", "ping", "pong")
)

STREAM_APP = """
[backends.counter]
target = "stream_targets:Counter"
max_concurrent_queries = 4
runtime_options = { num_cpus = 0 }

[endpoints.counter]
traffic = { counter = 1.0 }
"""

#: A client in a process of its own: connects, answers one query per line of stdin.
CLIENT = """
import json, sys
import servecore

with servecore.connect(sys.argv[1]) as client:
    echo = client.get_handle("echo").options(timeout_s=60)
    print(json.dumps(["ready", client.table.seq]), flush=True)
    for line in sys.stdin:
        try:
            print(json.dumps(["ok", echo.call(line.strip())]), flush=True)
        except Exception as exc:
            print(json.dumps(["error", repr(exc)]), flush=True)
"""


@pytest.fixture
def server(tmp_path: Path, cluster: Any, namespace: str) -> Iterator[CliServer]:
    s = CliServer(tmp_path)
    try:
        yield s
    finally:
        s.stop_everything()


def bounded(handle: servecore.SyncHandle) -> servecore.SyncHandle:
    return handle.options(timeout_s=WAIT_S)


def serve(server: CliServer, cluster: Any, namespace: str, app: str) -> subprocess.Popen[str]:
    text = SERVER.format(address=cluster.address, path=WORKER_PATH) + app
    return server.serve(server.write("app.toml", text), "--name", namespace)


def test_a_client_in_another_process_calls_ray_replicas_and_outlives_the_controller(
    server: CliServer, cluster: Any, namespace: str, tmp_path: Path
) -> None:
    controller = serve(server, cluster, namespace, ECHO_APP)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    env = servecore_env()
    env.pop("RAY_ADDRESS", None)  # the address comes from the server's hello
    client = subprocess.Popen(
        [sys.executable, str(script), str(server.store)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None

    def ask(value: str) -> list[Any]:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(value + "\n")
        client.stdin.flush()
        answer: list[Any] = json.loads(client.stdout.readline())
        return answer

    try:
        kind, _seq = json.loads(client.stdout.readline())
        assert kind == "ready"
        assert [ask(f"q{i}") for i in range(10)] == [["ok", f"v1:q{i}"] for i in range(10)]

        # The controller dies: the client's queries still go straight to the actors.
        controller.send_signal(signal.SIGKILL)
        controller.wait(timeout=WAIT_S)
        assert [ask(f"after{i}") for i in range(10)] == [["ok", f"v1:after{i}"] for i in range(10)]
    finally:
        client.kill()
        client.wait(timeout=WAIT_S)


def test_ray_replicas_call_other_endpoints_and_a_cycle_fails_typed(
    server: CliServer, cluster: Any, namespace: str
) -> None:
    serve(server, cluster, namespace, COMPOSED_APP)
    with servecore.connect(server.store) as client:
        handle = client.get_handle
        assert handle("outer").call(7) == "outer(inner(7))"
        assert client.get_handle("outer_async").call(8) == ("outer_async(inner(8))")
        with pytest.raises(servecore.CallCycle) as caught:
            client.get_handle("ping").call(1)
        assert caught.value.chain == ("ping", "pong")
        assert "ping -> pong" in str(caught.value)


def test_a_connected_client_streams_from_ray_with_backpressure(
    server: CliServer, cluster: Any, namespace: str
) -> None:
    serve(server, cluster, namespace, STREAM_APP)
    with servecore.connect(server.store) as client:
        counter = bounded(client.get_handle("counter"))
        with counter.stream(5) as items:
            assert [i for i, _ in items] == [0, 1, 2, 3, 4]

        # A consumer that takes 3 items of 1000 and leaves holds the generator to its
        # window, and stops it.
        with counter.stream(1000) as items:
            got = [next(items)[0] for _ in range(3)]
        assert got == [0, 1, 2]
        for _ in range(200):  # until the generator has recorded its stop
            with counter.stream("stats") as items:
                [record] = list(items)
            if record["stopped"]:
                break
            time.sleep(0.05)
        assert record["stopped"], record
        # The counter's total: the 5 of the first stream, and of the second at least the
        # 3 taken and at most a window (no credit comes back before half a window).
        assert 5 + 3 <= record["produced"] <= 5 + DEFAULT_STREAM_WINDOW


async def test_a_client_says_a_query_never_reached_a_replica_it_cannot_find(
    cluster: Any, namespace: str
) -> None:
    """No live actor of that name: retry-safe, so the router sends the query elsewhere."""
    import trio

    from servecore.runtimes import Query
    from servecore.runtimes.ray.client import RayReplicaClient

    client = RayReplicaClient(namespace, cluster.address, call_timeout_s=WAIT_S)
    async with trio.open_nursery() as nursery:
        await client.start(nursery)
        try:
            with pytest.raises(servecore.ReplicaDiedError) as caught:
                await client.call("gone#1", [Query(args=(1,))])
        finally:
            client.close()
    assert getattr(caught.value, "retry_safe", False)
    assert caught.value.tag == "gone#1" and namespace in str(caught.value)


HTTP_APP = """
[backends.echo]
target = "ray_driver:Echo"
init_kwargs = { prefix = "v1:" }
num_replicas = 2
runtime_options = { num_cpus = 0 }

[backends.counter]
target = "stream_targets:Counter"
runtime_options = { num_cpus = 0 }

[endpoints.echo]
route = "/echo"
methods = ["POST"]
traffic = { echo = 1.0 }

[endpoints.counter]
route = "/count"
methods = ["POST"]
traffic = { counter = 1.0 }
"""


def _post(port: int, path: str, body: Any, accept: str = "application/json") -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        headers = {"Content-Type": "application/json", "Accept": accept}
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _get_text(port: int, path: str) -> str:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_ingress_workers_serve_ray_replicas_and_outlive_the_controller(
    server: CliServer, cluster: Any, namespace: str
) -> None:
    """``servecore run --runtime ray --workers 2``: each worker a Ray driver of its own,
    querying the actors through its client's router (calls, streams, /-/metrics)."""
    from cli_server import free_port

    port = free_port()
    text = SERVER.format(address=cluster.address, path=WORKER_PATH) + HTTP_APP
    controller, _ = server.run(
        server.write("app.toml", text), port, "--name", namespace, "--workers", "2"
    )
    workers = server.worker_pids()
    assert len(workers) == 2 and controller.pid not in workers
    for i in range(10):  # a connection each: the kernel spreads them over the workers
        assert _post(port, "/echo", f"q{i}") == (200, json.dumps(f"v1:q{i}").encode())
    status, body = _post(port, "/count", 3, "application/x-ndjson")
    assert status == 200 and [json.loads(line)[0] for line in body.splitlines()] == [0, 1, 2]
    ok = 'servecore_queries_total{backend="echo",endpoint="echo",outcome="ok"} 10.0'
    deadline = time.monotonic() + WAIT_S  # each worker copies its counts every second
    while ok not in _get_text(port, "/-/metrics") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ok in _get_text(port, "/-/metrics")

    # The controller dies: the workers still answer, straight from the actors.
    controller.send_signal(signal.SIGKILL)
    controller.wait(timeout=WAIT_S)
    for i in range(10):
        assert _post(port, "/echo", f"after{i}") == (200, json.dumps(f"v1:after{i}").encode())
    assert server.worker_pids() == workers
