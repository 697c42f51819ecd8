"""Streams through the controller: handles, synchronous handles, the router's slots, and
the HTTP ingress (JSON lines, Server-Sent Events, a client that goes away)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import servecore
import stream_targets
from servecore import InvalidTarget, StreamMismatch
from servecore.http import serve_http
from servecore.runtimes.toolkit import DEFAULT_STREAM_WINDOW

BOUND_S = 30.0  # only ever a guard against hanging


@pytest.fixture
async def ctl() -> AsyncIterator[servecore.Controller]:
    async with servecore.open_controller(runtime="threads") as ctl:
        await ctl.create_backend("counter", stream_targets.AsyncCounter, max_concurrent_queries=1)
        await ctl.create_endpoint("count", route="/count", methods=["GET", "POST"])
        await ctl.set_traffic("count", {"counter": 1.0})
        await ctl.create_backend("plain", stream_targets.plain)
        await ctl.create_endpoint("plain", route="/plain", methods=["POST"])
        await ctl.set_traffic("plain", {"plain": 1.0})
        yield ctl


def running(ctl: servecore.Controller) -> int:
    return ctl.router_statistics().backends["counter"].running


async def stopped(ctl: servecore.Controller) -> list[int]:
    """What the counter recorded of streams stopped early (a bounded wait for one)."""
    handle = ctl.get_handle("count")
    with trio.fail_after(BOUND_S):
        while True:
            async with handle.stream("stats") as items:
                [record] = [r async for r in items]
            if record["stopped"]:
                return list(record["stopped"])
            await trio.sleep(0.01)


async def test_a_handle_streams_and_a_stream_holds_its_replica_slot(
    ctl: servecore.Controller,
) -> None:
    handle = ctl.get_handle("count")
    with trio.fail_after(BOUND_S):
        async with handle.stream(3) as items:
            first = await items.__anext__()
            assert running(ctl) == 1  # the stream holds the replica's one slot
            rest = [item async for item in items]
        assert [i for i, _ in [first, *rest]] == [0, 1, 2]
        assert running(ctl) == 0
        # Leaving the block early cancels the generator in the replica.
        async with handle.stream(1000, 0.01) as items:
            assert (await items.__anext__())[0] == 0
        assert running(ctl) == 0
        assert len(await stopped(ctl)) == 1
        with pytest.raises(StreamMismatch, match=r"handle\.stream"):
            await handle.call(3)
        with pytest.raises(StreamMismatch, match=r"handle\.call"):
            [x async for x in ctl.get_handle("plain").stream(3)]


async def test_a_consumer_that_breaks_out_of_its_loop_stops_the_generator(
    ctl: servecore.Controller,
) -> None:
    async def read_two() -> None:
        async for item in ctl.get_handle("count").stream(1000, 0.01):
            if item[0] == 1:
                break  # the stream object is dropped here

    with trio.fail_after(BOUND_S):
        await read_two()
        assert len(await stopped(ctl)) == 1
        while running(ctl):
            await trio.sleep(0.01)


async def test_a_handle_stream_hands_over_the_items_already_arrived_without_waiting(
    ctl: servecore.Controller,
) -> None:
    """What the HTTP ingress writes as one chunk: after an item, ``take_buffered`` gives
    the items that came meanwhile, in order, and the stream goes on after them (with a
    per-item timeout too, which items already here cannot miss)."""
    for handle in (ctl.get_handle("count"), ctl.get_handle("count").options(timeout_s=BOUND_S)):
        with trio.fail_after(BOUND_S):
            async with handle.stream(5) as items:
                assert items.take_buffered() == []  # not opened yet: nothing to take
                got = [await items.__anext__()]
                taken: list[Any] = []
                while not taken:  # the replica produces ahead, within its window
                    await trio.sleep(0.01)
                    taken = items.take_buffered()
                got += taken
                got += [item async for item in items]
                assert items.take_buffered() == []  # ended: nothing more
        assert [i for i, _ in got] == [0, 1, 2, 3, 4]
    assert running(ctl) == 0


async def test_create_backend_refuses_a_batching_generator(ctl: servecore.Controller) -> None:
    seq = ctl.seq

    @servecore.batch
    def stream_batches(values: list[Any]) -> Any:
        yield values

    stream_targets.stream_batches = stream_batches  # type: ignore[attr-defined]
    with pytest.raises(InvalidTarget, match=r"both @servecore\.batch and a generator"):
        await ctl.create_backend("sb", "stream_targets:stream_batches")
    assert ctl.seq == seq


def test_a_synchronous_handle_iterates_a_stream() -> None:
    with servecore.start(runtime="threads") as ctl:
        ctl.create_backend("counter", stream_targets.Counter)
        ctl.create_endpoint("count")
        ctl.set_traffic("count", {"counter": 1.0})
        handle = ctl.get_handle("count")
        assert [i for i, _ in handle.stream(4)] == [0, 1, 2, 3]
        with handle.stream(1000) as items:
            assert next(items)[0] == 0
        with handle.stream("stats") as items:
            record = next(items)
        assert record["stopped"] or record["produced"] <= 4 + 1 + DEFAULT_STREAM_WINDOW


def _http(port: int, path: str, body: bytes, accept: str | None) -> tuple[str, bytes]:
    """POST on a raw socket; answer the head and the de-chunked body."""
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND_S) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        if accept:
            head += f"Accept: {accept}\r\n"
        sock.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    raw_head, _, rest = data.partition(b"\r\n\r\n")
    if b"chunked" not in raw_head.lower():
        return raw_head.decode(), rest
    out = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return raw_head.decode(), out


async def test_http_streams_json_lines_or_server_sent_events(ctl: servecore.Controller) -> None:
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve_http, ctl, "127.0.0.1:0")
        port = int(next(b for b in binds if b.startswith("http://")).rsplit(":", 1)[1])
        head, body = await trio.to_thread.run_sync(_http, port, "/count", b"3", None)
        assert "200" in head.splitlines()[0]
        assert "application/x-ndjson" in head and "chunked" in head.lower()
        assert [json.loads(line)[0] for line in body.splitlines()] == [0, 1, 2]
        head, body = await trio.to_thread.run_sync(_http, port, "/count", b"2", "text/event-stream")
        assert "text/event-stream" in head
        events = body.decode().split("\n\n")
        assert [json.loads(e.removeprefix("data: "))[0] for e in events[:2]] == [0, 1]
        assert events[2] == "event: end\ndata: {}"
        # A plain endpoint still answers one JSON value, even when a stream is asked for.
        head, body = await trio.to_thread.run_sync(
            _http, port, "/plain", b"[1]", "text/event-stream"
        )
        assert "application/json" in head and json.loads(body) == [1]
        nursery.cancel_scope.cancel()


async def test_a_client_that_goes_away_stops_the_generator(ctl: servecore.Controller) -> None:
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve_http, ctl, "127.0.0.1:0")
        port = int(next(b for b in binds if b.startswith("http://")).rsplit(":", 1)[1])

        def read_some_then_leave() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=BOUND_S) as sock:
                body = b"[1000, 0.01]"
                sock.sendall(
                    b"POST /count HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                data = b""
                while data.count(b"data: ") < 3:
                    data += sock.recv(65536)
                return data

        data = await trio.to_thread.run_sync(read_some_then_leave)
        assert b"text/event-stream" in data
        assert len(await stopped(ctl)) == 1
        nursery.cancel_scope.cancel()
