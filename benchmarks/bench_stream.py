"""Streams: time to first item and items per second, through the handle and over HTTP.

Rows (N items of a tiny generator that yields at once, ``--items``; each row run
``--rounds`` times, the median kept):

* ``bare async generator, in-process`` -- the generator iterated on asyncio: the floor.
* ``handle.stream, threads`` / ``handle.stream, subprocess`` -- ``async for`` over
  ``ctl.get_handle(...).stream(n)`` (the router, the runtime's credit window, and for
  subprocess the socket and pickling per item).
* ``bare ASGI streaming, hypercorn/trio`` -- an ASGI app that sends N chunks, on the
  same stack as servecore's own ingress, read by a raw-socket client in this process:
  what HTTP alone costs.
* ``servecore ingress, subprocess`` -- ``POST /stream`` (JSON lines) through servecore's
  ingress to a subprocess replica, read by the same raw-socket client.
* ``bare ASGI streaming, uvicorn`` / ``uvicorn[standard]`` (httptools on uvloop) and
  ``servecore run --workers 1`` -- the bare app on uvicorn in a process of its own,
  and a real ``servecore run --runtime subprocess --workers 1`` whose worker (its own
  HTTP server, streams through the ingress's ASGI side) streams from its replica;
  the worker's row is compared with uvicorn[standard].
* ``bare ASGI streaming, uvicorn, a write per turn`` -- the bare app on uvicorn as the
  ingress workers run it (what one turn of the loop writes goes out in one write). The
  bare app sends its items without waiting in between, all in one turn, so here the
  whole body leaves at its end: a high rate and a late first item, not a stream.

Each HTTP row is read in the same interleaved rounds as the bare app on its stack
(ABBA), and the table gives the bare app's rate over the row's. Time to first item
(TTFT) is from sending the request (opening the stream) to the first
item; items/s counts the whole stream. wrk cannot read a stream item by item, hence the
raw socket reader (it reads the chunked body and stamps the first chunk).

Run: ``.venv/bin/python benchmarks/bench_stream.py [--items 2000] [--rounds 5]``; the
table (with each HTTP row's rate beside the bare app's on its stack) is also written to
``benchmarks/results/bench_stream.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servecore
from servecore.http import serve_http


async def tokens(n: int) -> AsyncIterator[int]:
    """The streamed target: ``n`` small items, as fast as they can go."""
    for i in range(n):
        yield i


def bare_generator(n: int) -> tuple[float, float]:
    async def run() -> tuple[float, float]:
        start = time.perf_counter()
        first = 0.0
        count = 0
        async for _ in tokens(n):
            if not count:
                first = time.perf_counter() - start
            count += 1
        return first, count / (time.perf_counter() - start)

    return asyncio.run(run())


async def through_handle(handle: Any, n: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = 0.0
    count = 0
    async for _ in handle.stream(n):
        if not count:
            first = time.perf_counter() - start
        count += 1
    assert count == n
    return first, count / (time.perf_counter() - start)


def read_http_stream(port: int, path: str, n: int) -> tuple[float, float]:
    """POST ``n`` and read the chunked answer on a raw socket: (TTFT, items/s)."""
    body = str(n).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        start = time.perf_counter()
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"Accept: application/x-ndjson\r\n\r\n".encode()
            + body
        )
        data = b""
        first = 0.0
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
            if not first and b"\r\n\r\n" in data and data.partition(b"\r\n\r\n")[2].strip():
                first = time.perf_counter() - start
            if data.endswith(b"\r\n0\r\n\r\n"):
                break
        elapsed = time.perf_counter() - start
    lines = _dechunk(data.partition(b"\r\n\r\n")[2]).count(b"\n")
    assert lines >= n, (lines, data[-200:])
    return first, n / elapsed


def _dechunk(body: bytes) -> bytes:
    """The data of a chunked body (a chunk may hold many JSON lines)."""
    out = bytearray()
    while body:
        size, _, body = body.partition(b"\r\n")
        length = int(size, 16)
        if not length:
            break
        out += body[:length]
        body = body[length + 2 :]
    return bytes(out)


async def bare_asgi(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that streams ``n`` JSON lines (n from the body)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/x-ndjson")],
        }
    )
    for i in range(int(body)):
        await send({"type": "http.response.body", "body": b"%d\n" % i, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def median_of(rounds: int, one: Callable[[], Awaitable[tuple[float, float]]]) -> Any:
    runs = [await one() for _ in range(rounds)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


async def interleaved(rounds: int, items: int, ports: list[int]) -> list[tuple[float, float]]:
    """(TTFT, items/s) medians of HTTP streams from each port, read in interleaved
    rounds (ABBA: each goes first in half of them), so that a busy spell of the shared
    machine weighs on both sides of a ratio alike."""
    runs: list[list[tuple[float, float]]] = [[] for _ in ports]
    for i in range(rounds):
        order = list(enumerate(ports)) if i % 2 == 0 else list(enumerate(ports))[::-1]
        for k, port in order:
            runs[k].append(await trio.to_thread.run_sync(read_http_stream, port, "/stream", items))
    return [
        (statistics.median(r[0] for r in run), statistics.median(r[1] for r in run)) for run in runs
    ]


async def bench(items: int, rounds: int) -> list[tuple[str, float, float]]:
    rows: list[tuple[str, float, float]] = []
    runs = [bare_generator(items) for _ in range(rounds)]
    rows.append(
        (
            "bare async generator, in-process",
            statistics.median(r[0] for r in runs),
            statistics.median(r[1] for r in runs),
        )
    )
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from servecore.http import hypercorn_config

    async with trio.open_nursery() as bare:
        # The bare app on hypercorn/trio runs beside servecore's ingress (same stack, same
        # process), and the two are read in interleaved rounds.
        config = hypercorn_config(Config(), "127.0.0.1:0")
        binds = await bare.start(
            lambda task_status: serve(bare_asgi, config, mode="asgi", task_status=task_status)
        )
        bare_port = int(binds[0].rsplit(":", 1)[1])
        await trio.to_thread.run_sync(read_http_stream, bare_port, "/", 10)  # warm up
        for runtime in ("threads", "subprocess"):
            with tempfile.TemporaryDirectory() as tmp:
                kwargs = {"runtime_kwargs": {"directory": tmp}} if runtime == "subprocess" else {}
                async with servecore.open_controller(
                    runtime=runtime, name=f"bench-stream-{os.getpid()}", **kwargs
                ) as ctl:
                    await ctl.create_backend("tokens", "bench_stream:tokens")
                    await ctl.create_endpoint("stream", route="/stream", methods=["POST"])
                    await ctl.set_traffic("stream", {"tokens": 1.0})
                    handle = ctl.get_handle("stream")
                    await through_handle(handle, 10)  # warm up
                    ttft, rate = await median_of(
                        rounds, functools.partial(through_handle, handle, items)
                    )
                    rows.append((f"handle.stream, {runtime}", ttft, rate))
                    if runtime == "subprocess":
                        async with trio.open_nursery() as nursery:
                            binds = await nursery.start(serve_http, ctl, "127.0.0.1:0")
                            port = int(binds[0].rsplit(":", 1)[1])
                            await trio.to_thread.run_sync(read_http_stream, port, "/stream", 10)
                            bare_row, ingress_row = await interleaved(
                                rounds, items, [bare_port, port]
                            )
                            rows.append(("bare ASGI streaming, hypercorn/trio", *bare_row))
                            rows.append(("servecore ingress, subprocess", *ingress_row))
                            nursery.cancel_scope.cancel()
                    await ctl.delete_endpoint("stream")
                    await ctl.delete_backend("tokens")
        bare.cancel_scope.cancel()
    rows.extend(await _process_rows(items, rounds))
    return rows


HERE = os.path.dirname(os.path.abspath(__file__))

STREAM_APP = """
[backends.tokens]
target = "bench_stream:tokens"

[endpoints.stream]
route = "/stream"
methods = ["POST"]
traffic = { tokens = 1.0 }
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(command: list[str], port: int, cwd: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(HERE), "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, HERE, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited with {proc.returncode}")
        try:
            read_http_stream(port, "/stream", 1)
            return proc
        except (OSError, AssertionError):
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{command[:4]} did not serve within 120 s")


async def _process_rows(items: int, rounds: int) -> list[tuple[str, float, float]]:
    """The bare app on uvicorn, and a real ``servecore run --workers 1``, each a process."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "app.toml"), "w") as f:
            f.write(STREAM_APP)
        bare_port, run_port, same_port = _free_port(), _free_port(), _free_port()
        standard_port = _free_port()
        servers = [
            (
                "bare ASGI streaming, uvicorn",
                [
                    *(sys.executable, "-m", "uvicorn", "bench_stream:bare_asgi"),
                    *("--port", str(bare_port), "--log-level", "warning", "--lifespan", "off"),
                ],
                bare_port,
            ),
            (
                "bare ASGI streaming, uvicorn[standard]",
                [
                    *(sys.executable, "-m", "uvicorn", "bench_stream:bare_asgi"),
                    *("--port", str(standard_port), "--log-level", "warning"),
                    *("--lifespan", "off", "--http", "httptools", "--loop", "uvloop"),
                ],
                standard_port,
            ),
            (
                "bare ASGI streaming, uvicorn, a write per turn",
                [
                    *(sys.executable, "-c", "import bench_stream as b; b.serve_coalesced()"),
                    str(same_port),
                ],
                same_port,
            ),
            (
                "servecore run --workers 1, subprocess",
                [
                    *(sys.executable, "-m", "servecore", "run", os.path.join(tmp, "app.toml")),
                    *("--runtime", "subprocess", "--workers", "1", "--port", str(run_port)),
                    *("--store", os.path.join(tmp, "state.db"), "--app-dir", HERE),
                    *("--stop-replicas", "--log-level", "WARNING"),
                ],
                run_port,
            ),
        ]
        procs = []
        try:
            for _, command, port in servers:
                procs.append(await trio.to_thread.run_sync(_start, command, port, tmp))
            results = await interleaved(rounds, items, [port for _, _, port in servers])
            rows.extend(
                (name, *result) for (name, _, _), result in zip(servers, results, strict=True)
            )
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                await trio.to_thread.run_sync(proc.wait)
    return rows


def serve_coalesced() -> None:
    """The bare app on uvicorn as the ingress workers run it (a turn's writes in one
    write, ``servecore._serving.coalesced_writes``), on the port in ``sys.argv[1]``."""
    import uvicorn

    from servecore._serving.coalesced_writes import coalescing_h11_protocol

    uvicorn.run(
        bare_asgi,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        http=coalescing_h11_protocol(),
        lifespan="off",
        log_level="warning",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "bench_stream.json"))
    args = parser.parse_args()
    rows = trio.run(bench, args.items, args.rounds)
    rates = {name: rate for name, _, rate in rows}
    print(f"{args.items} items per stream, median of {args.rounds}; {platform.python_version()}")
    print(f"{'row':<48} {'TTFT (ms)':>10} {'items/s':>10} {'bare/row':>9}")
    out = []
    for name, ttft, rate in rows:
        bare = next((rates[b] for key, b in SAME_STACK.items() if name.startswith(key)), None)
        ratio = None if bare is None else bare / rate
        shown = "" if ratio is None else f"{ratio:.2f}x"
        print(f"{name:<48} {ttft * 1000:>10.2f} {rate:>10,.0f} {shown:>9}")
        out.append({"row": name, "ttft_s": ttft, "items_per_s": rate, "bare_over_row": ratio})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"items": args.items, "rounds": args.rounds, "rows": out}, f, indent=1)


#: Each servecore HTTP row and the bare app on its server stack.
SAME_STACK = {
    "servecore ingress": "bare ASGI streaming, hypercorn/trio",
    # The workers' own server is not an ASGI server a bare app runs on: the closest
    # stack a user would run one on, uvicorn with httptools on uvloop.
    "servecore run --workers 1": "bare ASGI streaming, uvicorn[standard]",
}


if __name__ == "__main__":
    main()
