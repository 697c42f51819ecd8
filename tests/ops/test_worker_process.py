"""A real ``servecore run --runtime subprocess --workers N`` as a user runs it: what its
ingress workers serve beyond plain queries -- model multiplexing (the
``serve_multiplexed_model_id`` header, calls and streams) and ``/-/metrics`` summed
over the workers (docs/design.md §5, "Ingress workers"). Every process a test started
is stopped by pid at the end."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli_server import CliServer, free_port

pytestmark = pytest.mark.slow

APP = """
[backends.models]
target = "multiplex_targets:Models"
num_replicas = 3
max_concurrent_queries = 8

[backends.ids]
target = "multiplex_targets:model_ids"

[endpoints.models]
route = "/models"
methods = ["GET", "POST"]
traffic = { models = 1.0 }

[endpoints.ids]
route = "/ids"
methods = ["POST"]
traffic = { ids = 1.0 }
"""

MODEL_HEADER = "serve_multiplexed_model_id"


class Server:
    def __init__(self, deployment: CliServer, port: int) -> None:
        self.deployment = deployment
        self.port = port

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, str, bytes]:
        """One request on a new connection: status, content type, body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.getheader("content-type") or "", response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None, **headers: str) -> Any:
        status, _, data = self.request(method, path, body, headers)
        assert status == 200, data
        return json.loads(data)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    deployment = CliServer(tmp_path_factory.mktemp("worker"))
    try:
        app = deployment.write("app.toml", APP)
        port = free_port()
        deployment.run(app, port, "--runtime", "subprocess", "--workers", "1")
        yield Server(deployment, port)
    finally:
        deployment.stop_everything()


def test_the_model_header_reaches_the_target_through_a_worker(server: Server) -> None:
    got = server.json("GET", "/models", **{MODEL_HEADER: "Zz"})
    assert (got["id"], got["model"]) == ("Zz", "model-Zz")  # case kept
    assert server.json("GET", "/models")["id"] == ""  # none named


def test_queries_for_a_model_stick_to_the_replica_that_loaded_it(server: Server) -> None:
    by_model: dict[str, set[str]] = {}
    for _ in range(4):
        for model in ("a", "b", "c"):
            got = server.json("POST", "/models", 1, **{MODEL_HEADER: model})
            by_model.setdefault(model, set()).add(got["replica"])
            assert got["loads"][model] == 1  # loaded once, where it went first
    assert all(len(replicas) == 1 for replicas in by_model.values()), by_model
    plain = {server.json("POST", "/models", 1)["replica"] for _ in range(12)}
    assert len(plain) == 3  # without a model id, queries spread over the replicas


def test_a_stream_through_a_worker_reads_its_model_id(server: Server) -> None:
    headers = {MODEL_HEADER: "m", "Accept": "application/x-ndjson"}
    status, media, data = server.request("POST", "/ids", 3, headers)
    assert (status, media) == (200, "application/x-ndjson")
    assert [json.loads(line) for line in data.splitlines()] == ["m", "m", "m"]
    status, _, data = server.request("POST", "/ids", 2, {"Accept": "text/event-stream"})
    assert status == 200 and data.count(b'data: ""') == 2


METRICS_APP = """
[backends.echo]
target = "subprocess_targets:Echo"
num_replicas = 2

[backends.slow]
target = "subprocess_targets:Slow"

[endpoints.echo]
route = "/echo"
methods = ["POST"]
traffic = { echo = 1.0 }

[endpoints.slow]
route = "/slow"
methods = ["POST"]
traffic = { slow = 1.0 }
"""


def _scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, media, data = server.request("GET", "/-/metrics")
    assert status == 200 and media.startswith("text/plain"), data
    out = {}
    for family in text_string_to_metric_families(data.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _ok(samples: dict[Any, float]) -> float:
    key = (
        "servecore_queries_total",
        (("backend", "echo"), ("endpoint", "echo"), ("outcome", "ok")),
    )
    return samples.get(key, 0.0)


def _until(predicate: Any) -> Any:
    """Poll ``predicate()`` until it is true (a bound against hanging, not a timing)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("never happened")


@pytest.mark.parametrize("stack", ["default", "trio"])
def test_every_worker_answers_metrics_summed_over_all_workers_of_the_server(
    tmp_path: Path, stack: str
) -> None:
    deployment = CliServer(tmp_path)
    try:
        app = deployment.write("app.toml", METRICS_APP)
        port = free_port()
        options = ("--runtime", "subprocess", "--workers", "2", "--timeout", "2")
        if stack != "default":
            options += ("--worker-stack", stack)
        deployment.run(app, port, *options)
        server = Server(deployment, port)
        workers = deployment.worker_pids()
        assert len(workers) == 2

        for i in range(30):  # a connection each: the kernel spreads them over the workers
            assert server.json("POST", "/echo", i) == str(i)
        status, _, body = server.request("POST", "/slow", 30)
        assert status == 504, body
        assert server.request("GET", "/nowhere")[0] == 404

        # Whichever worker answers, it counts every worker's queries (each copies its
        # own within a second): one series per label set, for the whole server.
        timed_out = (("backend", "slow"), ("endpoint", "slow"), ("outcome", "timed_out"))
        echo = (("backend", "echo"), ("endpoint", "echo"))
        expected = {
            ("servecore_queries_total", timed_out): 1,  # not "cancelled"
            ("servecore_http_responses_total", (("code", "404"),)): 1,
            ("servecore_query_latency_seconds_count", echo): 30,
        }

        def complete(samples: dict[Any, float]) -> bool:
            return _ok(samples) == 30 and all(samples.get(k) == v for k, v in expected.items())

        _until(lambda: complete(_scrape(server)))
        for _ in range(10):
            samples = _scrape(server)
            assert complete(samples), samples
            assert not any("pid" in dict(labels) for _, labels in samples)
        directory = tmp_path / ".servecore" / "worker-metrics"
        files = {p.name for p in directory.glob("*.db")}
        assert {f"counter_{pid}.db" for pid in workers} <= files
        # A file a worker created but was killed before sizing holds nothing: skipped.
        (directory / "counter_1.db").touch()
        assert _ok(_scrape(server)) == 30

        # A worker that dies leaves its counts: the sums never go down.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        _until(lambda: len(deployment.worker_pids() - {victim}) == 2)
        for _ in range(5):
            assert _ok(_scrape(server)) == 30
        assert server.json("POST", "/echo", "after") == "after"
        _until(lambda: _ok(_scrape(server)) == 31)
    finally:
        deployment.stop_everything()
