"""HTTP requests a target asks for, and responses it streams, through the controller's
ingress on the threads and subprocess runtimes (docs/design.md §5, "HTTP requests and
responses")."""

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
T = "web_targets:"


@pytest.fixture(params=["threads", "subprocess"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    options = {"directory": tmp_path / "rt"} if request.param == "subprocess" else {}
    try:
        async with servecore.open_controller(
            runtime=request.param, runtime_options=options, name="web"
        ) as ctl:
            for name, target, flag in (
                ("plain", "describe", False),
                ("whole", "describe", True),
                ("tokens", "tokens", False),
                ("fails", "tokens_then_fail", False),
                ("bad", "bad_head", False),
                ("second", "second_head", False),
            ):
                await ctl.create_backend(name, T + target)
                await ctl.create_endpoint(
                    name, route=f"/{name}", methods=["GET", "POST"], http_request=flag
                )
                await ctl.set_traffic(name, {name: 1.0})
            async with trio.open_nursery() as nursery:
                [bound] = await nursery.start(serve_http, ctl, "127.0.0.1:0")
                yield bound
                nursery.cancel_scope.cancel()
    finally:
        kill_everything_under(tmp_path)


def fetch(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, Any, bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=BOUND_S)
    try:
        headers = {"content-type": "application/json"} if body else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        try:
            data = response.read()
        except http.client.IncompleteRead as exc:
            data = b"INCOMPLETE:" + exc.partial
        return response.status, response.headers, data
    finally:
        conn.close()


async def get(url: str, method: str, path: str, body: bytes | None = None) -> Any:
    with trio.fail_after(BOUND_S):
        return await trio.to_thread.run_sync(fetch, url, method, path, body)


async def test_an_endpoint_can_ask_for_a_request_even_for_json(url: str) -> None:
    status, _, data = await get(url, "POST", "/whole?lang=en", b'{"text": "hi"}')
    assert status == 200
    assert json.loads(data) == {
        "request": True,
        "method": "POST",
        "path": "",
        "query": {"lang": "en"},
        "content_type": "application/json",
        "body": '{"text": "hi"}',
    }
    status, _, data = await get(url, "GET", "/whole?lang=en")
    assert json.loads(data)["request"] is True and json.loads(data)["method"] == "GET"
    # Without the flag, the same request gives the JSON value, as before.
    status, _, data = await get(url, "POST", "/plain?lang=en", b'{"text": "hi"}')
    assert json.loads(data) == {"request": False, "value": {"text": "hi"}}


async def test_a_generator_answers_with_its_own_status_and_headers_then_streams(
    url: str,
) -> None:
    for _ in range(2):  # the first learns that the endpoint streams; the second streams at once
        status, headers, data = await get(url, "GET", "/tokens?n=2")
        assert status == 201
        assert headers["content-type"] == "text/plain"
        assert headers["x-kind"] == "tok"
        assert headers["transfer-encoding"] == "chunked"
        assert data == b'tok0 tok1 raw {"done": 2}\n'


async def test_a_streamed_response_that_fails_midway_is_cut_short_not_completed(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    status, _, data = await get(url, "GET", "/fails")
    assert status == 200
    assert data.startswith(b"INCOMPLETE:")  # no final chunk: the client sees the failure
    assert b"head partial " in data
    assert "ran out of memory" in caplog.text


async def test_a_second_response_mid_stream_cuts_it_short_after_the_chunks_before_it(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    status, _, data = await get(url, "GET", "/second")
    assert status == 200
    assert data == b"INCOMPLETE:a b "  # what came before it, then no final chunk
    assert "yielded a second Response" in caplog.text


async def test_a_streamed_response_with_a_bad_status_answers_500(url: str) -> None:
    status, _, data = await get(url, "GET", "/bad")
    assert status == 500
    assert json.loads(data)["type"] == "BadResponse"
