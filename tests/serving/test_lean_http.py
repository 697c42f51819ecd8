"""The ingress workers' own HTTP/1.1 server (servecore._serving.lean_http), spoken to
over real sockets: what a client sees on the wire, and what reaches the app."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from servecore._serving import lean_http
from servecore._serving.lean_http import LeanServer


class App:
    """A stand-in for HTTPIngress: answers whole requests itself, streams and ``/-/``
    routes through ASGI."""

    max_body_bytes = 1000

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes, list[tuple[bytes, bytes]], bytes]] = []
        self.cancelled = 0
        self.disconnects = 0

    async def respond(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
        self.seen.append((method, path, query, headers, body))
        if path.startswith(("/stream", "/-/", "/broken")):
            return None
        if path.startswith("/slow"):
            try:
                await asyncio.sleep(float(query.decode().partition("=")[2] or 30))
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        answer = {"method": method, "path": path, "query": query.decode(), "body": body.decode()}
        return 200, json.dumps(answer).encode(), [(b"content-type", b"application/json")]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        if scope["path"] == "/broken":
            raise RuntimeError("a bug")
        if scope["path"] == "/-/whole":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"whole"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"item%d\n" % i, "more_body": True})
        if scope["path"] == "/stream/forever":
            assert (await receive())["type"] == "http.disconnect"
            self.disconnects += 1
            return
        await send({"type": "http.response.body", "body": b""})


class Running:
    def __init__(self, app: App, port: int, stop: Any, thread: threading.Thread) -> None:
        self.app = app
        self.port = port
        self._stop = stop
        self.thread = thread

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # stopped already: its loop is closed
            self._stop()

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock


def _run(main: Any, loop: str) -> None:
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


@pytest.fixture(params=["asyncio", "uvloop"])
def server(request: pytest.FixtureRequest) -> Iterator[Running]:
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    app = App()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        holder["stop"] = lambda: loop.call_soon_threadsafe(stop.set)
        loop = asyncio.get_running_loop()
        await LeanServer(app, graceful_s=2.0).serve(listener, stop, ready.set)

    thread = threading.Thread(target=_run, args=(main(), request.param), daemon=True)
    thread.start()
    assert ready.wait(10)
    running = Running(app, port, holder["stop"], thread)
    yield running
    running.stop()
    thread.join(10)
    assert not thread.is_alive()


class Response:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status
        self.headers = headers


_BUFFERS: dict[int, bytearray] = {}


def _read_until(sock: socket.socket, buffer: bytearray, marker: bytes) -> bytes:
    while marker not in buffer:
        data = sock.recv(65536)
        if not data:
            raise EOFError(bytes(buffer))
        buffer += data
    index = buffer.index(marker) + len(marker)
    out = bytes(buffer[:index])
    del buffer[:index]
    return out


def _read_exactly(sock: socket.socket, buffer: bytearray, count: int) -> bytes:
    while len(buffer) < count:
        data = sock.recv(65536)
        if not data:
            raise EOFError(bytes(buffer))
        buffer += data
    out = bytes(buffer[:count])
    del buffer[:count]
    return out


def _responses(sock: socket.socket, count: int = 1) -> list[tuple[Response, bytes]]:
    """The next ``count`` responses on ``sock`` and their bodies (length or chunked)."""
    buffer = _BUFFERS.setdefault(sock.fileno(), bytearray())
    out = []
    for _ in range(count):
        head = _read_until(sock, buffer, b"\r\n\r\n").decode("latin-1")
        line, *fields = head.split("\r\n")[:-2]
        headers = [
            (k.strip().lower().encode(), v.strip().encode())
            for k, _, v in (f.partition(":") for f in fields)
        ]
        response = Response(int(line.split()[1]), headers)
        if _header(response, b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size = int(_read_until(sock, buffer, b"\r\n"), 16)
                body += _read_exactly(sock, buffer, size + 2)[:-2]
                if size == 0:
                    break
        else:
            body = _read_exactly(sock, buffer, int(_header(response, b"content-length") or 0))
        out.append((response, body))
    return out


def _request(path: str, extra: bytes = b"", body: bytes = b"", method: bytes = b"GET") -> bytes:
    length = b"content-length: %d\r\n" % len(body) if body else b""
    return b"%s %s HTTP/1.1\r\nhost: x\r\n%s%s\r\n%s" % (method, path.encode(), length, extra, body)


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (reads end of file), within a bound."""
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _header(response: Response, name: bytes) -> bytes | None:
    return next((v for k, v in response.headers if k == name), None)


def _whole(sock: socket.socket) -> bytes:
    data = b""
    sock.settimeout(10)
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_keep_alive_answers_each_request_with_a_length_and_a_date(server: Running) -> None:
    sock = server.connect()
    for i in range(3):
        sock.sendall(_request(f"/echo/{i}?x=%C3%A9", body=b'{"a": 1}', method=b"POST"))
        [(response, body)] = _responses(sock)
        assert response.status_code == 200
        assert json.loads(body) == {
            "method": "POST",
            "path": f"/echo/{i}",
            "query": "x=%C3%A9",
            "body": '{"a": 1}',
        }
        assert _header(response, b"content-length") == str(len(body)).encode()
        assert _header(response, b"date") is not None
        assert _header(response, b"connection") is None
    _, _, _, headers, _ = server.app.seen[0]
    assert (b"host", b"x") in headers  # lower-case names, as ASGI has them


def test_a_percent_encoded_path_reaches_the_app_decoded(server: Running) -> None:
    sock = server.connect()
    sock.sendall(_request("/caf%C3%A9%20x"))
    [(_, body)] = _responses(sock)
    assert json.loads(body)["path"] == "/café x"


def test_pipelined_requests_are_answered_in_order(server: Running) -> None:
    sock = server.connect()
    sock.sendall(_request("/slow?s=0.2") + _request("/fast") + _request("/slow?s=0.01"))
    got = [json.loads(body)["path"] for _, body in _responses(sock, 3)]
    assert got == ["/slow", "/fast", "/slow"]


def test_http_1_0_closes_unless_asked_to_keep_alive(server: Running) -> None:
    sock = server.connect()
    sock.sendall(b"GET /a HTTP/1.0\r\n\r\n")
    data = _whole(sock)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close" in data

    sock = server.connect()
    sock.sendall(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    head = sock.recv(65536)
    assert b"connection: keep-alive" in head
    sock.sendall(b"GET /b HTTP/1.0\r\n\r\n")  # still open: answered, then closed
    assert b'"/b"' in _whole(sock)


def test_connection_close_is_honoured(server: Running) -> None:
    sock = server.connect()
    sock.sendall(_request("/a", b"connection: close\r\n"))
    [(response, _)] = _responses(sock)
    assert _header(response, b"connection") == b"close"
    assert _closed(sock)


def test_expect_100_continue_is_answered_before_the_body_is_sent(server: Running) -> None:
    sock = server.connect()
    sock.sendall(
        b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
    )
    assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.sendall(b"hello")
    [(response, body)] = _responses(sock)
    assert response.status_code == 200 and json.loads(body)["body"] == "hello"


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_refused_with_413_and_never_reaches_the_app(
    server: Running, chunked: bool
) -> None:
    sock = server.connect()
    if chunked:
        chunk = b"x" * 600
        sock.sendall(
            b"POST /big HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            + (b"258\r\n" + chunk + b"\r\n") * 2
        )
    else:
        sock.sendall(b"POST /big HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n")
    data = _whole(sock)
    assert data.startswith(b"HTTP/1.1 413 ")
    assert json.loads(data.partition(b"\r\n\r\n")[2]) == {
        "error": "body over 1000 bytes",
        "type": "PayloadTooLarge",
    }
    assert server.app.seen == []


def test_a_request_head_too_large_is_refused_with_431(server: Running) -> None:
    sock = server.connect()
    sock.sendall(b"GET /a HTTP/1.1\r\nhost: x\r\n" + b"x-big: " + b"y" * 70_000 + b"\r\n\r\n")
    assert _whole(sock).startswith(b"HTTP/1.1 431 ")
    sock = server.connect()
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(lean_http.MAX_HEADERS + 1))
    sock.sendall(b"GET /a HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n")
    assert _whole(sock).startswith(b"HTTP/1.1 431 ")
    assert server.app.seen == []


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /a HTTP/1.1\r\ncontent-length: nope\r\n\r\n",
    ],
)
def test_what_is_not_a_request_it_serves_gets_400_and_a_close(
    server: Running, garbage: bytes
) -> None:
    sock = server.connect()
    sock.sendall(garbage)
    data = _whole(sock)
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert json.loads(data.partition(b"\r\n\r\n")[2])["type"] == "BadRequest"


def test_a_request_to_upgrade_is_answered_as_http_1_1(server: Running) -> None:
    sock = server.connect()
    upgrade = b"upgrade: h2c\r\nconnection: Upgrade, HTTP2-Settings\r\nhttp2-settings: x\r\n"
    sock.sendall(_request("/a", upgrade) + _request("/b"))
    [(first, body), (_, after)] = _responses(sock, 2)
    assert first.status_code == 200 and json.loads(body)["path"] == "/a"
    assert json.loads(after)["path"] == "/b"
    # With a body, which the parser would hand to the other protocol: refused.
    sock = server.connect()
    sock.sendall(_request("/a", upgrade, b"hi", b"POST"))
    data = _whole(sock)
    assert data.startswith(b"HTTP/1.1 400 ") and b"without an Upgrade header" in data
    assert [seen[1] for seen in server.app.seen] == ["/a", "/b"]


def test_head_has_the_get_headers_and_no_body(server: Running) -> None:
    sock = server.connect()
    sock.sendall(_request("/a", method=b"HEAD") + _request("/b"))
    head = b""
    while b'"/b"' not in head:
        head += sock.recv(65536)
    first, _, rest = head.partition(b"\r\n\r\n")
    assert b"content-length: " in first
    assert rest.startswith(b"HTTP/1.1 200 OK")  # no body between the two answers
    assert server.app.seen[0][0] == "HEAD"


def test_a_client_that_leaves_cancels_its_query_at_once(server: Running) -> None:
    sock = server.connect()
    sock.sendall(_request("/slow?s=30"))
    deadline = time.monotonic() + 10
    while not server.app.seen and time.monotonic() < deadline:
        time.sleep(0.01)
    sock.close()
    while not server.app.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.app.cancelled == 1


def test_a_client_that_shuts_down_its_sending_side_has_left(server: Running) -> None:
    sock = server.connect()
    sock.sendall(_request("/slow?s=30"))
    deadline = time.monotonic() + 10
    while not server.app.seen and time.monotonic() < deadline:
        time.sleep(0.01)
    sock.shutdown(socket.SHUT_WR)
    assert _closed(sock)
    while not server.app.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.app.cancelled == 1


def test_streams_go_through_asgi_in_chunks_and_a_single_body_gets_a_length(
    server: Running,
) -> None:
    sock = server.connect()
    sock.sendall(_request("/stream") + _request("/-/whole"))
    [(stream, items), (whole, body)] = _responses(sock, 2)
    assert _header(stream, b"transfer-encoding") == b"chunked"
    assert items == b"item0\nitem1\nitem2\n"
    assert _header(whole, b"content-length") == b"5" and body == b"whole"


def test_a_stream_learns_that_its_client_left(server: Running) -> None:
    sock = server.connect()
    sock.sendall(_request("/stream/forever"))
    seen = b""
    while b"item2" not in seen:
        seen += sock.recv(65536)
    sock.close()
    deadline = time.monotonic() + 10
    while not server.app.disconnects and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.app.disconnects == 1


def test_an_app_that_fails_before_answering_gets_a_500_and_a_close(server: Running) -> None:
    sock = server.connect()
    sock.sendall(_request("/broken"))
    data = _whole(sock)
    assert data.startswith(b"HTTP/1.1 500 ")
    assert json.loads(data.partition(b"\r\n\r\n")[2])["type"] == "InternalError"


def test_idle_and_unfinished_connections_are_closed(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lean_http, "KEEP_ALIVE_S", 0.5)
    idle = server.connect()
    idle.sendall(_request("/a"))
    _responses(idle)
    unfinished = server.connect()
    unfinished.sendall(b"GET /a HTTP/1.1\r\nhost: x\r\n")  # and never the end of it
    assert _closed(idle)
    assert _closed(unfinished)


def test_shutdown_answers_what_is_in_flight_then_closes(server: Running) -> None:
    busy = server.connect()
    busy.sendall(_request("/slow?s=0.5"))
    idle = server.connect()
    idle.sendall(_request("/a"))
    _responses(idle)
    deadline = time.monotonic() + 10
    while len(server.app.seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.stop()
    assert _closed(idle)
    data = _whole(busy)
    assert data.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in data
    server.thread.join(10)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).sendall(_request("/a"))


def test_a_request_that_comes_as_the_server_stops_is_answered_then_closed(
    server: Running,
) -> None:
    sock = server.connect()
    sock.sendall(_request("/a"))
    _responses(sock)  # accepted, and idle
    server.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until it stopped accepting, which it does first
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        except OSError:
            break
    sock.sendall(_request("/b"))
    [(response, body)] = _responses(sock)
    assert json.loads(body)["path"] == "/b"
    assert _header(response, b"connection") == b"close"
    assert _closed(sock)
