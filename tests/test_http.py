"""HTTP ingress: endpoints served at their routes, through ASGI and a real hypercorn."""

from __future__ import annotations

import http.client
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import servecore
from servecore.http import HTTPIngress, serve_http

ECHO = "servecore.testing.targets:echo"


@pytest.fixture
async def ctl() -> AsyncIterator[servecore.Controller]:
    async with servecore.open_controller(runtime="threads") as ctl:
        await ctl.create_backend("echo", ECHO)
        await ctl.create_backend("raiser", "servecore.testing.targets:Raiser")
        await ctl.create_endpoint("echo", route="/echo", methods=["GET", "POST"])
        await ctl.set_traffic("echo", {"echo": 1.0})
        await ctl.create_endpoint("boom", route="/boom", methods=["POST"])
        await ctl.set_traffic("boom", {"raiser": 1.0})
        await ctl.create_endpoint("idle", route="/idle")
        yield ctl


async def asgi(
    app: HTTPIngress, method: str, path: str, body: bytes = b"", query: bytes = b""
) -> tuple[int, dict[str, str], Any]:
    """Drive one request through the ASGI app, as a server would."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": query}
    await app(scope, receive, send)
    start, payload = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(payload["body"])


async def test_json_body_and_query_string_reach_the_target(ctl: servecore.Controller) -> None:
    app = HTTPIngress(ctl)
    assert await asgi(app, "POST", "/echo", b'{"text": "hi"}') == (
        200,
        {"content-type": "application/json", "content-length": "14"},
        {"text": "hi"},
    )
    status, _, result = await asgi(app, "GET", "/echo", query=b"text=hi&n=2")
    assert (status, result) == (200, {"text": "hi", "n": "2"})


async def test_errors_map_to_status_codes(ctl: servecore.Controller) -> None:
    app = HTTPIngress(ctl)
    status, _, body = await asgi(app, "GET", "/nowhere")
    assert status == 404 and "/nowhere" in body["error"]
    status, headers, body = await asgi(app, "GET", "/boom")
    assert status == 405 and headers["allow"] == "POST"
    status, _, body = await asgi(app, "POST", "/echo", b"{not json")
    assert status == 400 and body["type"] == "BadRequest"
    status, _, body = await asgi(app, "POST", "/boom", b'"k"')
    assert (status, body["type"]) == (500, "KeyError")
    status, _, body = await asgi(app, "GET", "/idle")
    assert (status, body["type"]) == (503, "NoReplicaError")


async def test_routes_follow_the_routing_table(ctl: servecore.Controller) -> None:
    app = HTTPIngress(ctl)
    await ctl.create_endpoint("late", route="/late")
    await ctl.set_traffic("late", {"echo": 1.0})
    assert (await asgi(app, "GET", "/late", query=b"a=1"))[0] == 200
    await ctl.delete_endpoint("late")
    assert (await asgi(app, "GET", "/late"))[0] == 404


def _request(url: str, method: str, path: str, body: bytes | None) -> tuple[int, Any]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        headers = {"content-type": "application/json"} if body else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


async def test_a_real_server_on_loopback(ctl: servecore.Controller) -> None:
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve_http, ctl, "127.0.0.1:0")
        url = next(b for b in binds if b.startswith("http://"))
        answer = await trio.to_thread.run_sync(_request, url, "POST", "/echo", b'{"x": [1, 2]}')
        assert answer == (200, {"x": [1, 2]})
        assert (await trio.to_thread.run_sync(_request, url, "GET", "/boom", None))[0] == 405
        nursery.cancel_scope.cancel()


def test_a_synchronous_host_serves_http_in_the_background() -> None:
    with servecore.start(runtime="threads") as ctl:
        ctl.create_backend("echo", ECHO)
        ctl.create_endpoint("echo", route="/echo", methods=["POST"])
        ctl.set_traffic("echo", {"echo": 1.0})
        url = ctl.serve_http("127.0.0.1:0")
        assert _request(url, "POST", "/echo", b"[1, 2, 3]") == (200, [1, 2, 3])
