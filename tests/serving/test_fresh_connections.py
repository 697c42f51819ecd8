"""A worker's uvicorn, stopping, answers a connection whose request it had not read yet
(on either event loop) instead of resetting it, and still closes one that sends
nothing and one that waits between requests."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from servecore._serving.coalesced_writes import coalescing_h11_protocol
from servecore._serving.worker import LOOPS


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    body = b'{"ok": true}'
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _run(loop: str, main: Any) -> Any:
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    return asyncio.run(main())


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 10)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stopping_worker_answers_the_request_of_a_connection_it_had_not_read(
    loop: str,
) -> None:
    import uvicorn

    async def main() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            _app, http=coalescing_h11_protocol(), lifespan="off", log_level="warning"
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)  # what Server.serve sets up
        await server.startup(sockets=[sock])
        try:
            fresh = await asyncio.open_connection("127.0.0.1", port)
            silent = await asyncio.open_connection("127.0.0.1", port)
            idle = await asyncio.open_connection("127.0.0.1", port)
            idle[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await idle[0].readuntil(b'{"ok": true}')  # answered, kept alive
            while len(server.server_state.connections) < 3:  # all three made
                await asyncio.sleep(0.01)
            # The shutdown begins before the fresh connection's request is read.
            stopping = asyncio.ensure_future(server.shutdown(sockets=[sock]))
            await asyncio.sleep(0)
            fresh[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await _read_all(fresh[0])
            assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b'{"ok": true}')
            # ... and then the connection closes (read() ends).
            assert await _read_all(silent[0]) == b""  # closed, nothing sent
            assert await _read_all(idle[0]) == b""  # closed between requests
            await asyncio.wait_for(stopping, 10)
            for _, writer in (fresh, silent, idle):
                writer.close()
        finally:
            sock.close()

    _run(loop, main)
