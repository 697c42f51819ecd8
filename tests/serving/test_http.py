"""HTTP ingress: endpoints served at their routes, through ASGI and a real hypercorn."""

from __future__ import annotations

import http.client
import json
import logging
import pickle
import select
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import trio

import servecore
from servecore.http import HTTPIngress, serve_http

ECHO = "servecore.testing.targets:echo"
NOT_JSON = "test_http:not_json"


def not_json(request: dict[str, str]) -> Any:
    """A target whose results cannot be encoded as JSON, picked by ``?kind=``."""
    kind = request["kind"]
    if kind == "set":
        return {1, 2}
    if kind == "nan":
        return [float("nan")]
    if kind == "surrogate":
        return {"path": "caf\udce9"}
    if kind == "deep":
        deep: list[Any] = []
        for _ in range(5000):
            deep = [deep]
        return deep
    cycle: list[Any] = []
    cycle.append(cycle)
    return cycle


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
        await ctl.create_backend("not_json", NOT_JSON)
        await ctl.create_endpoint("not_json", route="/not_json")
        await ctl.set_traffic("not_json", {"not_json": 1.0})
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
        assert response.getheader("content-type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


BAD_BODIES = {
    "NaN": (b'{"x": NaN}', "NaN is not a JSON value"),
    "Infinity": (b"[1, Infinity]", "Infinity is not a JSON value"),
    "-Infinity": (b"-Infinity", "-Infinity is not a JSON value"),
    "1e999": (b'{"x": 1e999}', "the number 1e999 is too large for a float"),
    "-1e999 nested": (b"[[-1e999]]", "the number -1e999 is too large for a float"),
    "5,000 deep": (_deep(5000), "nests deeper than 100 levels"),
    "101 deep": (_deep(101), "nests deeper than 100 levels"),
    "101 deep objects": (b'{"a":' * 101 + b"1" + b"}" * 101, "nests deeper than 100 levels"),
    "invalid UTF-8": (b'"caf\xe9"', "not UTF-8: byte 0xe9 at offset 4"),
    "not JSON": (b"{not json", "the body is not JSON"),
    "trailing data": (b"[1] [2]", "the body is not JSON"),
    "lone surrogate": (b'"\\ud800"', "lone surrogate (\\ud800)"),
    "lone surrogate key": (b'{"\\udfff": 1}', "lone surrogate (\\udfff)"),
}


async def test_bodies_that_are_not_strict_json_are_400s_naming_the_problem(
    ctl: servecore.Controller, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve_http, ctl, "127.0.0.1:0")
        url = next(b for b in binds if b.startswith("http://"))
        for name, (body, why) in BAD_BODIES.items():
            status, answer = await trio.to_thread.run_sync(_request, url, "POST", "/echo", body)
            assert (status, answer["type"]) == (400, "BadRequest"), name
            assert why in answer["error"], (name, answer)
        # As deep as allowed is fine, and the server still answers.
        status, answer = await trio.to_thread.run_sync(_request, url, "POST", "/echo", _deep(100))
        assert status == 200
        nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


NOT_JSON_RESULTS = {
    "set": "is not JSON serializable",
    "nan": "NaN and infinities are not JSON numbers",
    "surrogate": "lone surrogate (\\udce9)",
    "deep": "it nests too deeply",
    "cycle": "Circular reference",
}


async def test_a_result_that_is_not_json_is_a_clear_500_logged_once(
    ctl: servecore.Controller, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve_http, ctl, "127.0.0.1:0")
        url = next(b for b in binds if b.startswith("http://"))
        for kind, why in NOT_JSON_RESULTS.items():
            caplog.clear()
            with caplog.at_level(logging.ERROR):
                status, answer = await trio.to_thread.run_sync(
                    _request, url, "GET", f"/not_json?kind={kind}", None
                )
            assert (status, answer["type"]) == (500, "ResultNotJSON"), kind
            assert "'not_json' returned a result that is not JSON" in answer["error"]
            assert why in answer["error"], (kind, answer)
            assert "Traceback" not in answer["error"]
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and why in errors[0].getMessage(), kind
        nursery.cancel_scope.cancel()


async def test_a_failure_of_the_ingress_itself_is_a_json_500(
    ctl: servecore.Controller, caplog: pytest.LogCaptureFixture
) -> None:
    app = HTTPIngress(ctl)

    def broken(path: str) -> Any:
        raise RuntimeError("routing table unreadable")

    app._endpoint_at = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        status, _, body = await asgi(app, "GET", "/echo")
    assert (status, body["type"]) == (500, "InternalError")
    assert "routing table unreadable" not in body["error"]
    assert [r.exc_info is not None for r in caplog.records] == [True]


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


def _burst_connects(port: int, count: int) -> tuple[int, int]:
    """Open ``count`` TCP connections at once without the server accepting any (the
    caller blocks its loop); return how many the kernel completed and how many it reset."""
    clients = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            clients.append(s)
        pending = set(clients)
        # A full accept queue drops the handshake; with room, every one completes at once.
        while pending:
            _, writable, _ = select.select([], list(pending), [], 5.0)
            if not writable:
                break
            pending -= set(writable)
        errors = [s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) for s in clients]
        done = sum(1 for s, e in zip(clients, errors, strict=True) if s not in pending and not e)
        return done, sum(1 for e in errors if e)
    finally:
        for s in clients:
            s.close()


@pytest.mark.skipif(
    int(Path("/proc/sys/net/core/somaxconn").read_text()) < 1024
    if Path("/proc/sys/net/core/somaxconn").exists()
    else True,
    reason="the kernel caps listen backlogs below the burst",
)
async def test_a_burst_of_connections_waits_while_the_server_is_busy(
    ctl: servecore.Controller,
) -> None:
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve_http, ctl, "127.0.0.1:0")
        url = next(b for b in binds if b.startswith("http://"))
        port = int(url.rsplit(":", 1)[1])
        # Called without awaiting: the server's loop is busy for the whole burst, so
        # only the kernel's listen queue holds the 500 clients.
        assert _burst_connects(port, 500) == (500, 0)
        status, _ = await trio.to_thread.run_sync(_request, url, "POST", "/echo", b"1")
        assert status == 200
        nursery.cancel_scope.cancel()


async def test_a_timeout_that_is_not_a_finite_positive_number_is_refused(
    ctl: servecore.Controller,
) -> None:
    for bad in (float("nan"), -1.0, 0.0, float("inf")):
        with pytest.raises(servecore.InvalidConfig, match="timeout_s"):
            HTTPIngress(ctl, timeout_s=bad)
    assert HTTPIngress(ctl, timeout_s=None).timeout_s is None


def describe(request: Any) -> Any:
    """A target that answers with what it was given: a Request as a custom Response."""
    if not isinstance(request, servecore.Request):
        return {"plain": request}
    text = f"{request.method} {request.route} {request.path!r} {request.body!r}"
    return servecore.Response(
        status=201 if request.body else 200,
        headers={"content-type": "text/plain", "x-seen-type": request.content_type},
        body=text + (f" {request.query_params}" if request.query else ""),
    )


def where(request: servecore.Request) -> dict[str, str]:
    """A target that says where a request went."""
    return {"method": request.method, "route": request.route, "path": request.path}


def respond(request: dict[str, str]) -> servecore.Response:
    """A target returning the Response its query asks for."""
    kind = request.get("kind")
    if kind == "status":
        return servecore.Response(status=int(request["status"]))
    if kind == "json":
        return servecore.Response({"made": True}, status=202, headers=[("x-a", "1")])
    if kind == "bytes":
        return servecore.Response(b"\x00\xff")
    return servecore.Response("x", headers={"x-evil": "a\r\nset-cookie: s=1"})


async def asgi_raw(
    app: HTTPIngress,
    method: str,
    path: str,
    body: bytes = b"",
    query: bytes = b"",
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> tuple[int, dict[str, str], bytes]:
    """Drive one request through the ASGI app; the answer's body as bytes."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": list(headers),
    }
    await app(scope, receive, send)
    start, payload = sent
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, payload["body"]


@pytest.fixture
async def web(ctl: servecore.Controller) -> servecore.Controller:
    await ctl.create_backend("describe", "test_http:describe")
    await ctl.create_backend("respond", "test_http:respond")
    await ctl.create_endpoint("classify", route="/classify", methods=["GET", "POST"])
    await ctl.set_traffic("classify", {"describe": 1.0})
    await ctl.create_endpoint("classify_v2", route="/classify/v2/", methods=["GET", "POST"])
    await ctl.create_backend("where", "test_http:where")
    await ctl.set_traffic("classify_v2", {"where": 1.0})
    await ctl.create_endpoint("respond", route="/respond")
    await ctl.set_traffic("respond", {"respond": 1.0})
    return ctl


TEXT = ((b"content-type", b"text/plain; charset=utf-8"),)


async def test_a_text_body_reaches_the_target_as_bytes_with_its_request(
    web: servecore.Controller,
) -> None:
    app = HTTPIngress(web)
    status, headers, body = await asgi_raw(app, "POST", "/classify", b"caf\xc3\xa9", headers=TEXT)
    assert status == 201
    assert headers["content-type"] == "text/plain" and headers["x-seen-type"] == "text/plain"
    assert body == b"POST /classify '' b'caf\\xc3\\xa9'"
    # Bytes that are not text at all reach it too, as they came.
    status, _, body = await asgi_raw(
        app, "POST", "/classify", b"\xff\x00", headers=((b"content-type", b"image/png"),)
    )
    assert (status, body) == (201, b"POST /classify '' b'\\xff\\x00'")
    # A JSON body at the route itself is the JSON value, as before.
    status, _, body = await asgi_raw(app, "POST", "/classify", b"[1]")
    assert (status, json.loads(body)) == (200, {"plain": [1]})
    # curl -d and urllib label every body as a form: one that is JSON stays JSON...
    form = ((b"content-type", b"application/x-www-form-urlencoded"),)
    status, _, body = await asgi_raw(app, "POST", "/classify", b"[1]", headers=form)
    assert (status, json.loads(body)) == (200, {"plain": [1]})
    # ...and a real form reaches the target whole.
    status, _, body = await asgi_raw(app, "POST", "/classify", b"a=1&b=2", headers=form)
    assert (status, body) == (201, b"POST /classify '' b'a=1&b=2'")


async def test_a_path_below_a_route_reaches_it_and_the_longest_route_wins(
    web: servecore.Controller,
) -> None:
    app = HTTPIngress(web)
    status, _, body = await asgi_raw(app, "GET", "/classify/sub/x", query=b"k=v")
    assert (status, body) == (200, b"GET /classify '/sub/x' b'' {'k': 'v'}")
    # /classify/v2/ is the longer route: what lies below it goes there, not to /classify.
    status, _, body = await asgi_raw(app, "GET", "/classify/v2/deep")
    answer = json.loads(body)
    assert status == 200 and answer["path"] == "/deep" and answer["route"] == "/classify/v2/"
    assert answer["method"] == "GET"
    # A route matches whole segments only.
    status, _, body = await asgi_raw(app, "GET", "/classifyx")
    assert status == 404 and b"/classifyx" in body
    status, headers, _ = await asgi_raw(app, "DELETE", "/classify/sub")
    assert (status, headers["allow"]) == (405, "GET, POST")


async def test_a_returned_response_sets_status_headers_and_body(
    web: servecore.Controller, caplog: pytest.LogCaptureFixture
) -> None:
    app = HTTPIngress(web)
    status, headers, body = await asgi_raw(app, "GET", "/respond", query=b"kind=json")
    assert (status, headers["x-a"], headers["content-type"]) == (202, "1", "application/json")
    assert json.loads(body) == {"made": True}
    status, headers, body = await asgi_raw(app, "GET", "/respond", query=b"kind=bytes")
    assert (status, headers["content-type"], body) == (200, "application/octet-stream", b"\0\xff")
    status, _, body = await asgi_raw(app, "GET", "/respond", query=b"kind=status&status=418")
    assert (status, body) == (418, b"")
    # What cannot be sent is the target's fault, said as such: never a split header.
    for query, why in ((b"kind=status&status=99", "status 99"), (b"kind=evil", "line break")):
        status, headers, body = await asgi_raw(app, "GET", "/respond", query=query)
        assert status == 500 and "set-cookie" not in headers
        assert json.loads(body)["type"] == "BadResponse" and why in json.loads(body)["error"]
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 2


async def test_the_body_size_limit_holds_for_every_kind_of_body(web: servecore.Controller) -> None:
    app = HTTPIngress(web, max_body_bytes=8)
    for headers in (TEXT, ()):
        status, _, body = await asgi_raw(app, "POST", "/classify/sub", b"x" * 9, headers=headers)
        assert (status, json.loads(body)["type"]) == (413, "PayloadTooLarge")


def test_requests_and_responses_cross_processes_by_pickle() -> None:
    request = servecore.Request("POST", "/a", "/r", (("q", "1"),), {"X-Y": "z"}, b"\0")
    assert pickle.loads(pickle.dumps(request)) == request and request.header("x-y") == "z"
    response = servecore.Response(b"1", status=204, headers={"A": "b"})
    assert pickle.loads(pickle.dumps(response)) == response


async def test_a_real_client_sends_text_and_reads_a_custom_answer(
    web: servecore.Controller,
) -> None:
    def post() -> tuple[int, str | None, bytes]:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            csv = {"content-type": "text/csv"}
            conn.request("POST", "/classify/a?b=c", body=b"hi", headers=csv)
            response = conn.getresponse()
            return response.status, response.getheader("x-seen-type"), response.read()
        finally:
            conn.close()

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve_http, web, "127.0.0.1:0")
        url = next(b for b in binds if b.startswith("http://"))
        host, port = url.removeprefix("http://").rsplit(":", 1)
        answer = await trio.to_thread.run_sync(post)
        nursery.cancel_scope.cancel()
    assert answer == (201, "text/csv", b"POST /classify '/a' b'hi' {'b': 'c'}")


@hypothesis.given(hypothesis.strategies.text(alphabet="ab=&;%+ x2\u00e9", max_size=20))
def test_a_query_string_becomes_the_dict_parse_qsl_makes_of_it(query: str) -> None:
    from urllib.parse import parse_qsl

    from servecore._serving.http_json import query_dict as _query_dict

    assert _query_dict(query) == dict(parse_qsl(query))


_JSONISH = hypothesis.strategies.recursive(
    hypothesis.strategies.none()
    | hypothesis.strategies.booleans()
    | hypothesis.strategies.integers()
    | hypothesis.strategies.floats()
    | hypothesis.strategies.text(),
    lambda inner: (
        hypothesis.strategies.lists(inner, max_size=4)
        | hypothesis.strategies.dictionaries(hypothesis.strategies.text(), inner, max_size=4)
    ),
    max_leaves=12,
)


@hypothesis.given(_JSONISH)
def test_an_answer_is_encoded_as_strict_json_or_refused_as_before(value: Any) -> None:
    from servecore._serving.http_json import dumps as _dumps

    try:
        expected = json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except ValueError:
        with pytest.raises(ValueError):
            _dumps(value)
        return
    assert _dumps(value) == expected


def test_an_answer_that_holds_itself_is_refused_as_circular() -> None:
    from servecore._serving.http_json import dumps as _dumps

    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="Circular reference"):
        _dumps(cycle)
