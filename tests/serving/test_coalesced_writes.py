"""Ingress workers' uvicorn writes a response in one write, and loses nothing by it:
a response before a close, a streamed body, an aborted connection."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest

from servecore._serving.coalesced_writes import CoalescedTransport, coalescing_h11_protocol


class _Transport:
    """What the socket saw: each write, and whether it was closed or aborted."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


def test_the_writes_of_one_turn_leave_in_one_write() -> None:
    async def main() -> None:
        real = _Transport()
        transport = CoalescedTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"{}")
        assert real.writes == []
        assert transport.get_write_buffer_size() == 40
        await asyncio.sleep(0)
        assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        transport.write(b"next")
        await asyncio.sleep(0)
        assert real.writes[1:] == [b"next"]

    asyncio.run(main())


def test_close_writes_what_is_held_first_and_abort_drops_it() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        real = _Transport()
        transport = CoalescedTransport(real, loop)  # type: ignore[arg-type]
        transport.write(b"last answer")
        transport.close()
        assert real.writes == [b"last answer"] and real.closed
        await asyncio.sleep(0)  # the turn's flush finds nothing more to write
        assert real.writes == [b"last answer"]

        real = _Transport()
        transport = CoalescedTransport(real, loop)  # type: ignore[arg-type]
        transport.write(b"never sent")
        transport.abort()
        await asyncio.sleep(0)
        assert real.writes == [] and real.aborted

    asyncio.run(main())


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"%d\n" % i, "more_body": True})
            await asyncio.sleep(0.01)  # items in turns of their own
        await send({"type": "http.response.body", "body": b""})
        return
    body = b'{"ok": true}'
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def server() -> Any:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = uvicorn.Config(
        _app, http=coalescing_h11_protocol(), lifespan="off", log_level="warning"
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: uv.run(sockets=[sock]), daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    uv.should_exit = True
    thread.join(10)
    sock.close()


def _exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        return data


def test_a_response_before_the_server_closes_arrives_whole(server: int) -> None:
    # Connection: close makes uvicorn close right after the body: held bytes go first.
    data = _exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b'{"ok": true}')
    data = _exchange(server, b"GET / HTTP/1.0\r\n\r\n")
    assert data.endswith(b'{"ok": true}')


def test_keep_alive_requests_and_a_stream_arrive_in_full(server: int) -> None:
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    stream = b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = _exchange(server, request + request + stream)
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.count(b'{"ok": true}') == 2
    assert data.endswith(b"2\r\n0\n\r\n2\r\n1\n\r\n2\r\n2\n\r\n0\r\n\r\n")
