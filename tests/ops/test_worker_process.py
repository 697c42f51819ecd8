"""A real ``servecore run --runtime subprocess --workers 1`` as a user runs it: what its
ingress worker serves beyond plain queries -- model multiplexing (the
``serve_multiplexed_model_id`` header, calls and streams) and ``/-/metrics``
(docs/design.md §5, "Ingress workers"). One server for the module; every process it
started is stopped by pid at the end."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

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
