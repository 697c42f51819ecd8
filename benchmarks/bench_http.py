"""Requests per second and latency of a trivial endpoint over HTTP: servecore's ingress
beside a bare hypercorn ASGI app returning the same JSON, in the same run.

Rows:

* ``bare hypercorn ASGI app`` -- an ASGI app that parses the query string and answers
  ``{"x": "1"}`` as JSON, served by hypercorn on trio: what any Python ASGI service
  pays for HTTP alone.
* ``servecore ingress (threads)`` -- ``GET /echo?x=1`` through servecore's ingress,
  router and a threads-runtime replica of a function returning its argument (the same
  JSON), with the metrics counters on.

Each server runs in a process of its own (started by this script with ``--serve``), so
it does not share a GIL with the load generator. The load generator is a bounded async
HTTP/1.1 client on trio: ``CONNECTIONS`` keep-alive connections to 127.0.0.1, each
sending its next request when the last is answered. ``ROUNDS`` rounds alternate the
rows in ABBA order, so noise from other work on the machine, and any advantage of going
second, spread over both alike. Latency is per
request, under that load. Results print as a table and go to
``benchmarks/results/bench_http.json``. Goal: the ingress within 1.3x of the bare
app's throughput.

Run: ``.venv/bin/python benchmarks/bench_http.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import trio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Keep-alive connections of the load generator (requests in flight).
CONNECTIONS = 32
ROUNDS = 6
REQUEST = b"GET /echo?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
EXPECTED = b'{"x": "1"}'


# -- the servers (each in its own process) -------------------------------------------------


async def _bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    while (await receive()).get("more_body", False):
        pass  # read the (empty) request, as any app that takes a body does
    payload = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _config(port: int) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    return config


async def _serve_bare(port: int) -> None:
    from hypercorn.trio import serve

    await serve(_bare_app, _config(port), mode="asgi")  # type: ignore[arg-type]


async def _serve_ingress(port: int) -> None:
    import servecore
    from servecore.http import serve_http

    async with servecore.open_controller("threads") as ctl:
        await ctl.create_backend("echo", "bench_targets:echo")
        await ctl.create_endpoint("echo", route="/echo")
        await ctl.set_traffic("echo", {"echo": 1.0})
        await serve_http(ctl, f"127.0.0.1:{port}")


def serve(kind: str, port: int) -> None:
    """The ``--serve`` entry point of the server processes."""
    sys.path.insert(0, str(HERE))
    trio.run(_serve_bare if kind == "bare" else _serve_ingress, port)


# -- the load generator --------------------------------------------------------------------


async def _read_response(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end]).lower()
            start = head.find(b"content-length:")
            if start < 0:
                raise AssertionError(f"no content-length in {head!r}")
            stop = head.find(b"\r\n", start)
            length = int(head[start + 15 : stop if stop >= 0 else len(head)].strip())
            total = end + 4 + length
            while len(buffer) < total:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                buffer += chunk
            body = bytes(buffer[end + 4 : total])
            del buffer[:total]
            if not head.startswith(b"http/1.1 200"):
                raise AssertionError(f"unexpected answer {head[:40]!r} {body!r}")
            return body
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buffer += chunk


async def load(port: int, seconds: float, connections: int) -> tuple[int, list[float]]:
    """Keep ``connections`` requests in flight for ``seconds``; return (answered, latencies)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def one_connection() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()
        async with stream:
            while True:
                began = time.perf_counter()
                if began >= deadline:
                    return
                await stream.send_all(REQUEST)
                body = await _read_response(stream, buffer)
                latencies.append(time.perf_counter() - began)
                if body != EXPECTED:
                    raise AssertionError(f"unexpected body {body!r}")

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(one_connection)
    return len(latencies), latencies


# -- the run -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(kind: str) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), str(HERE), env.get("PYTHONPATH", "")) if p
    )
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--port", str(port)],
        env=env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {kind} server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(REQUEST)
                if s.recv(65536).startswith(b"HTTP/1.1 200"):
                    return proc, port
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the {kind} server did not answer within 60 s")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


ROWS = {"bare": "bare hypercorn ASGI app", "ingress": "servecore ingress (threads)"}


def main(argv: list[str] | None = None) -> None:
    """Start both servers, load them in alternating rounds, print and write results."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter rounds (a smoke run)")
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--out", default=str(HERE / "results" / "bench_http.json"))
    parser.add_argument("--serve", choices=sorted(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return
    seconds = 1.0 if args.quick else 3.0
    servers = {kind: _start(kind) for kind in ROWS}
    answered: dict[str, int] = dict.fromkeys(ROWS, 0)
    elapsed: dict[str, float] = dict.fromkeys(ROWS, 0.0)
    latencies: dict[str, list[float]] = {kind: [] for kind in ROWS}
    per_round: dict[str, list[float]] = {kind: [] for kind in ROWS}
    try:
        for _, port in servers.values():  # warm-up, not recorded
            trio.run(load, port, 1.0, args.connections)
        for i in range(ROUNDS):
            # ABBA order: whichever row runs first in a round measured slower on a busy
            # machine, so each row goes first in half the rounds.
            order = list(servers.items()) if i % 2 == 0 else list(servers.items())[::-1]
            for kind, (_, port) in order:
                began = time.perf_counter()
                n, samples = trio.run(load, port, seconds, args.connections)
                took = time.perf_counter() - began
                elapsed[kind] += took
                answered[kind] += n
                per_round[kind].append(n / took)
                latencies[kind].extend(samples)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    rows = []
    for kind, name in ROWS.items():
        rows.append(
            {
                "name": name,
                "requests": answered[kind],
                "requests_per_s": answered[kind] / elapsed[kind],
                "p50_ms": _percentile(latencies[kind], 0.50) * 1e3,
                "p99_ms": _percentile(latencies[kind], 0.99) * 1e3,
                "mean_ms": statistics.fmean(latencies[kind]) * 1e3,
                "requests_per_s_by_round": per_round[kind],
            }
        )
    bare = rows[0]["requests_per_s"]
    for r in rows:
        r["bare_rps_over_this"] = bare / r["requests_per_s"]
    # Rounds run back to back, so a round's ratio compares the rows under the same
    # background load; their median is the figure least moved by a noisy machine.
    ratios = [b / i for b, i in zip(per_round["bare"], per_round["ingress"], strict=True)]
    median_ratio = statistics.median(ratios)
    head = f"{'':<32}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'bare/this':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['name']:<32}{r['requests_per_s']:>12,.0f}{r['p50_ms']:>10.2f}"
            f"{r['p99_ms']:>10.2f}{r['bare_rps_over_this']:>11.2f}"
        )
    print(
        f"median over rounds of bare/ingress requests/s: {median_ratio:.2f} "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    print(
        f"({ROUNDS} alternating rounds of {seconds:g} s per row; {args.connections} keep-alive "
        f"connections; {os.cpu_count()} CPUs; goal: bare/this <= 1.3)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bench_http",
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "settings": {
                    "quick": args.quick,
                    "rounds": ROUNDS,
                    "seconds_per_round": seconds,
                    "connections": args.connections,
                },
                "rows": rows,
                "bare_over_ingress_by_round": ratios,
                "bare_over_ingress_median": median_ratio,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
