"""Metrics scraped from a real server at /-/metrics and parsed as Prometheus does;
/-/healthz and /-/routes; the same collector on a host's own registry."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import servecore
import servecore.metrics
from servecore.http import serve_http


def _get(url: str, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        conn.close()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_from_a_real_server() -> None:
    async with servecore.open_controller(runtime="threads") as ctl:
        await servecore.apply(
            ctl,
            servecore.app.parse_app(
                """
                [backends.echo]
                target = "servecore.testing.targets:echo"
                num_replicas = 2
                [backends.raiser]
                target = "servecore.testing.targets:Raiser"
                [backends.broken]
                target = "servecore.testing.targets:FailingInit"
                [endpoints.echo]
                traffic = { echo = 1.0 }
                [endpoints.boom]
                traffic = { raiser = 1.0 }
                """
            ),
        )
        async with trio.open_nursery() as nursery:
            [url, *_] = await nursery.start(serve_http, ctl, "127.0.0.1:0")
            for i in range(5):
                status, _, body = await trio.to_thread.run_sync(_get, url, f"/echo?i={i}")
                assert (status, json.loads(body)) == (200, {"i": str(i)})
            for _ in range(2):
                status, _, _ = await trio.to_thread.run_sync(_get, url, "/boom")
                assert status == 500
            status, content_type, body = await trio.to_thread.run_sync(_get, url, "/-/metrics")
            nursery.cancel_scope.cancel()
    assert status == 200 and content_type.startswith("text/plain")
    samples = _samples(body.decode())
    q = "servecore_queries_total"
    assert _value(samples, q, endpoint="echo", backend="echo", outcome="ok") == 5
    assert _value(samples, q, endpoint="boom", backend="raiser", outcome="error") == 2
    latency = "servecore_query_latency_seconds"
    assert _value(samples, f"{latency}_count", endpoint="echo", backend="echo") == 5
    assert _value(samples, f"{latency}_bucket", endpoint="echo", backend="echo", le="+Inf") == 5
    assert _value(samples, "servecore_replicas", backend="echo", status="RUNNING") == 2
    assert _value(samples, "servecore_replicas", backend="broken", status="RUNNING") == 0
    assert _value(samples, "servecore_backend_status", backend="broken", status="FAILED") == 1
    assert _value(samples, "servecore_backend_target_replicas", backend="echo") == 2
    assert _value(samples, "servecore_replica_starts_total", backend="echo") == 2
    assert _value(samples, "servecore_replica_start_failures_total", backend="broken") >= 1
    assert _value(samples, "servecore_replica_deaths_total", backend="echo") == 0
    assert _value(samples, "servecore_queued_queries", backend="echo") == 0
    assert _value(samples, "servecore_running_queries", backend="echo") == 0
    commits = _value(samples, "servecore_checkpoint_commit_seconds_count")
    assert commits >= 5 and _value(samples, "servecore_checkpoint_seq") >= commits
    assert _value(samples, "servecore_checkpoint_bytes") > 100


async def test_healthz_is_liveness_and_readyz_is_readiness() -> None:
    async with servecore.open_controller(runtime="threads") as ctl:
        await ctl.create_backend("echo", "servecore.testing.targets:echo")
        await ctl.create_endpoint("echo", route="/echo")
        await ctl.create_endpoint("hidden")
        async with trio.open_nursery() as nursery:
            [url, *_] = await nursery.start(serve_http, ctl, "127.0.0.1:0")

            async def get(path: str, method: str = "GET") -> tuple[int, Any]:
                code, _, body = await trio.to_thread.run_sync(_get, url, path, method)
                return code, json.loads(body)

            # A routed endpoint with no traffic yet: alive, not ready.
            assert await get("/-/healthz") == (200, {"status": "ok"})
            code, body = await get("/-/readyz")
            assert code == 503 and body["status"] == "not ready"
            assert body["reasons"] == ["endpoint 'echo' at /echo has no traffic set"]
            await ctl.set_traffic("echo", {"echo": 1.0})
            assert await get("/-/readyz") == (200, {"status": "ready"})
            assert await get("/-/routes") == (200, {"/echo": "echo"})
            post = await get("/-/healthz", "POST")
            unknown = await get("/-/nothing")
            # A FAILED backend no endpoint uses: still alive, still ready.
            with pytest.raises(servecore.BackendStartError):
                await ctl.create_backend("broken", "servecore.testing.targets:FailingInit")
            assert await get("/-/healthz") == (200, {"status": "ok"})
            assert await get("/-/readyz") == (200, {"status": "ready"})
            # The routed endpoint's only backend FAILED: alive, and not ready, saying why.
            with pytest.warns(RuntimeWarning, match="FAILED"):
                await ctl.set_traffic("echo", {"broken": 1.0})
            assert await get("/-/healthz") == (200, {"status": "ok"})
            code, body = await get("/-/readyz")
            nursery.cancel_scope.cancel()
    assert post[0] == 405 and unknown[0] == 404
    assert code == 503
    assert body["reasons"] == [
        "endpoint 'echo' at /echo has no RUNNING replica (backends 'broken' FAILED)"
    ]


def test_readyz_is_503_for_a_controller_that_lost_its_lease() -> None:
    from servecore._serving.ops_http import readyz

    class Fenced:
        holds_lease = False
        where = "postgresql://db/servecore"

    class Ctl:
        store = Fenced()
        state = servecore.State()
        routing_table = state.routing_table()

    code, body = readyz(Ctl())
    assert code == 503
    assert "does not hold the lease" in body["reasons"][0]
    assert "postgresql://db/servecore" in body["reasons"][0]
    Ctl.store.holds_lease = True
    assert readyz(Ctl()) == (200, {"status": "ready"})


async def test_http_metrics_count_refusals_too() -> None:
    async with servecore.open_controller(runtime="threads") as ctl:
        await ctl.create_backend("echo", "servecore.testing.targets:echo")
        await ctl.create_endpoint("echo", route="/echo", methods=("GET", "POST"))
        await ctl.set_traffic("echo", {"echo": 1.0})
        async with trio.open_nursery() as nursery:
            [url, *_] = await nursery.start(serve_http, ctl, "127.0.0.1:0")
            for path, method in [
                ("/echo", "GET"),
                ("/nowhere", "GET"),
                ("/nowhere", "GET"),
                ("/echo", "DELETE"),
            ]:
                await trio.to_thread.run_sync(_get, url, path, method)
            nursery.cancel_scope.cancel()
        samples = _samples(servecore.metrics.exposition(ctl).decode())
    name = "servecore_http_responses_total"
    assert _value(samples, name, code="200") == 1
    assert _value(samples, name, code="404") == 2
    assert _value(samples, name, code="405") == 1


def test_a_host_registers_the_collector_on_its_own_registry() -> None:
    registry = CollectorRegistry()
    with servecore.start(runtime="threads") as ctl:
        ctl.create_backend("echo", "servecore.testing.targets:echo")
        ctl.create_endpoint("echo")
        ctl.set_traffic("echo", {"echo": 1.0})
        handle = ctl.get_handle("echo")
        collector = servecore.metrics.register(ctl, registry)
        for i in range(3):
            assert handle.options(timeout_s=30).call(i) == i
        samples = _samples(generate_latest(registry).decode())
        registry.unregister(collector)
    assert _value(samples, "servecore_replicas", backend="echo", status="RUNNING") == 1
    # Sync handles reach thread replicas without trio; they are counted all the same.
    q = "servecore_queries_total"
    assert _value(samples, q, endpoint="echo", backend="echo", outcome="ok") == 3
    assert _value(samples, "servecore_checkpoint_commit_seconds_count") >= 3
