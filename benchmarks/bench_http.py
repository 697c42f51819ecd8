"""Requests per second and latency of a trivial endpoint over HTTP, loaded by ``wrk``
(a C load generator), beside bare ASGI apps on each server stack servecore could use.

Rows (each server in a process of its own, started by this script with ``--serve``):

* ``bare ASGI, hypercorn/trio`` -- an ASGI app that parses the query string and answers
  ``{"x": "1"}`` as JSON: what servecore's ingress pays for HTTP alone, on the same stack.
* ``bare ASGI, hypercorn/asyncio`` and ``bare ASGI, uvicorn`` (if installed; uvicorn is
  Ray Serve's proxy server) -- the same app on the other stacks, for the choice of stack.
* ``bare ASGI, uvicorn/httptools (asyncio)``, ``uvicorn[standard] (httptools, uvloop)``
  and ``granian`` (one worker, its uvloop loop if uvloop is installed) -- the faster
  stacks, each only if its packages import; the fastest bare row on one process that ran
  is the "best" one (the column "best/this").
* ``servecore ingress (threads)`` / ``(subprocess)`` -- ``GET /echo?x=1`` through
  servecore's ingress, router and a replica of a function returning its argument (the
  same JSON), metrics counters on: what ``servecore run --workers 0`` serves.
* ``bare ASGI, uvicorn x2`` / ``hypercorn/asyncio x2`` -- the bare app in 2 processes
  accepting on one inherited listening socket, as ``servecore run --workers 2`` does.
* ``servecore run --workers 1`` / ``2`` -- a real ``servecore run --runtime subprocess``
  whose HTTP is served by ingress worker processes (the default stack: servecore's own
  HTTP/1.1 server on httptools, on uvloop; queries go from asyncio straight to the
  replica, the client's table feed on trio as its guest), one replica, held to the best
  bare row (``--workers 2``: to uvicorn[standard] in 2 processes); the rows marked
  ``(uvicorn)``, ``(hypercorn/asyncio)`` and ``(hypercorn/trio)`` run the workers on
  those stacks instead, for the choice of stack, each held to the bare app on its own.

``wrk -t1 -cCONNECTIONS`` loads each row for ``--seconds`` per round; ``ROUNDS`` rounds
alternate the rows in ABBA order, so noise from other work on the machine spreads over
all rows alike. The Python load generator this replaced saturated before the servers
did (it reported 1.00x); wrk does not. Results print as a table and go to
``benchmarks/results/bench_http.json``. Goal: the ingress within 1.3x of the bare app
on the same stack (hypercorn/trio for the controller's ingress): the column "same
stack/this"; and per worker within 1.3x of the bare app on the best stack measured:
the column "best/this".

Run: ``.venv/bin/python benchmarks/bench_http.py [--quick]`` (needs ``wrk``: ``apt-get
install wrk``; ``make bench`` installs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
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
WRK = "wrk"


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


def _serve_bare_asyncio(port: int) -> None:
    import asyncio

    from hypercorn.asyncio import serve

    asyncio.run(serve(_bare_app, _config(port), mode="asgi"))  # type: ignore[arg-type]


def _serve_bare_processes(port: int, count: int, server: str) -> None:
    """The bare app on hypercorn/asyncio or uvicorn in ``count`` forked processes
    sharing one listening socket (what ``servecore run --workers`` does with its
    workers)."""
    import asyncio

    from hypercorn.asyncio import serve

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # As servecore run's socket: accepted connections inherit it (uvicorn does not set
    # it per connection, and answers 10x slower without it).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    children = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            if server.startswith("uvicorn"):
                import uvicorn

                config = uvicorn.Config(
                    _bare_app,
                    http=_uvicorn_http(server),
                    loop=_uvicorn_loop(server),
                    lifespan="off",
                    ws="none",
                    log_level="warning",
                    access_log=False,
                )
                uvicorn.Server(config).run(sockets=[sock])
            else:
                config = _config(port)
                config.bind = [f"fd://{sock.fileno()}"]
                asyncio.run(serve(_bare_app, config, mode="asgi"))  # type: ignore[arg-type]
            os._exit(0)
        children.append(pid)

    def stop(signum: int, frame: Any) -> None:
        for child in children:
            os.kill(child, signal.SIGKILL)
        for child in children:
            os.waitpid(child, 0)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    for child in children:
        os.waitpid(child, 0)


APP_FILE = """
[backends.echo]
target = "bench_targets:echo"

[endpoints.echo]
traffic = { echo = 1.0 }
"""


def _exec_run(port: int, workers: int, stack: str | None) -> None:
    """Become ``servecore run --workers N`` (the same pid, so SIGTERM reaches it)."""
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="bench-http-run-"))
    (directory / "app.toml").write_text(APP_FILE)
    command = [
        *(sys.executable, "-m", "servecore", "run", str(directory / "app.toml")),
        *("--runtime", "subprocess", "--workers", str(workers), "--port", str(port)),
        *("--store", str(directory / "state.db"), "--app-dir", str(HERE)),
        *("--stop-replicas", "--log-level", "WARNING", "--no-replica-logs"),
    ]
    if stack is not None:
        command += ["--worker-stack", stack]
    os.execv(sys.executable, command)


def _uvicorn_http(server: str) -> Any:
    """uvicorn's h11 protocol as it comes, or writing one segment per response as the
    ingress workers run it (``servecore._serving.coalesced_writes``), or its httptools
    protocol (``uvicorn-httptools``, ``uvicorn-standard``)."""
    if server == "uvicorn-coalesced":
        from servecore._serving.coalesced_writes import coalescing_h11_protocol

        return coalescing_h11_protocol()
    if server in {"uvicorn-httptools", "uvicorn-standard"}:
        return "httptools"
    return "h11"


def _uvicorn_loop(server: str) -> str:
    """What ``pip install uvicorn[standard]`` runs on: uvloop; the others asyncio."""
    return "uvloop" if server == "uvicorn-standard" else "asyncio"


def _serve_bare_uvicorn(port: int, server: str = "uvicorn") -> None:
    import uvicorn

    uvicorn.run(
        _bare_app,
        host="127.0.0.1",
        port=port,
        http=_uvicorn_http(server),
        loop=_uvicorn_loop(server),
        log_level="warning",
        access_log=False,
    )


def _granian_loop() -> str:
    """granian's uvloop loop if uvloop is installed, else plain asyncio."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _serve_bare_granian(port: int) -> None:
    """The bare app on granian (a Rust HTTP server): one worker process, forked by
    granian's main process, which stops it on SIGTERM and then exits."""
    from granian import Granian
    from granian.constants import Interfaces, Loops

    Granian(
        "bench_http:_bare_app",  # imported by the worker; benchmarks/ is on its path
        address="127.0.0.1",
        port=port,
        interface=Interfaces.ASGI,
        workers=1,
        loop=Loops(_granian_loop()),
        log_enabled=False,
        log_access=False,
    ).serve()


async def _serve_ingress(port: int, runtime: str) -> None:
    import tempfile

    import servecore
    from servecore.http import serve_http

    options = {}
    if runtime == "subprocess":
        options = {"directory": tempfile.mkdtemp(prefix="bench-http-")}
    # servecore's names load lazily from a table (``__all__`` is computed), which mypy
    # cannot read.
    open_controller = servecore.open_controller  # type: ignore[attr-defined]
    async with open_controller(runtime, runtime_kwargs=options) as ctl:
        await ctl.create_backend("echo", "bench_targets:echo")
        await ctl.create_endpoint("echo", route="/echo")
        await ctl.set_traffic("echo", {"echo": 1.0})
        try:
            await serve_http(ctl, f"127.0.0.1:{port}")
        finally:
            with trio.CancelScope(shield=True):
                await ctl.delete_endpoint("echo")  # then the backend is no longer in use
                await ctl.delete_backend("echo")


def serve(kind: str, port: int) -> None:
    """The ``--serve`` entry point of the server processes."""
    sys.path.insert(0, str(HERE))
    if kind == "bare":
        trio.run(_serve_bare, port)
    elif kind == "bare-asyncio":
        _serve_bare_asyncio(port)
    elif kind == "bare-uvicorn":
        _serve_bare_uvicorn(port)
    elif kind in {"bare-uvicorn-coalesced", "bare-uvicorn-httptools", "bare-uvicorn-standard"}:
        _serve_bare_uvicorn(port, kind.removeprefix("bare-"))
    elif kind == "bare-granian":
        _serve_bare_granian(port)
    elif kind == "bare-uvicorn-coalesced-x2":
        _serve_bare_processes(port, 2, "uvicorn-coalesced")
    elif kind == "bare-asyncio-x2":
        _serve_bare_processes(port, 2, "hypercorn")
    elif kind == "bare-uvicorn-x2":
        _serve_bare_processes(port, 2, "uvicorn")
    elif kind == "bare-uvicorn-standard-x2":
        _serve_bare_processes(port, 2, "uvicorn-standard")
    elif kind.startswith("run-workers-"):
        workers, _, stack = kind.removeprefix("run-workers-").partition("-")
        _exec_run(port, int(workers), stack or None)
    else:
        trio.run(_serve_ingress, port, kind.removeprefix("ingress-"))


# -- the load generator: wrk -------------------------------------------------------------

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s)", text.strip())
    if match is None:
        raise ValueError(f"wrk printed a latency {text!r} this script cannot read")
    return float(match.group(1)) * _UNITS[match.group(2)]


def load(port: int, seconds: float, connections: int) -> dict[str, float]:
    """Run ``wrk`` against the server for ``seconds``; return requests/s, p50 and p99."""
    out = subprocess.run(
        [
            WRK, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
            f"http://127.0.0.1:{port}/echo?x=1",
        ],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    if "Non-2xx" in out or "Socket errors" in out:
        raise AssertionError(f"wrk saw failed requests:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _seconds(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _seconds(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "p50": p50, "p99": p99, "requests": done}


def _cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of the server process ``pid`` and every process under it, by
    role: ``worker`` (servecore's ingress workers), ``replica``, ``server`` (the rest:
    a bare app's processes, servecore run itself)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    seconds: dict[str, float] = {}
    for process in processes:
        try:
            command = " ".join(process.cmdline())
            times = process.cpu_times()
        except psutil.Error:
            continue  # gone meanwhile
        role = (
            "worker"
            if "servecore._serving.worker" in command
            else "replica"
            if "replica_main" in command
            else "server"
        )
        seconds[role] = seconds.get(role, 0.0) + times.user + times.system
    return seconds


def measure(pid: int, port: int, seconds: float, connections: int) -> dict[str, float]:
    """:func:`load`, and the microseconds of CPU per request each role of the server
    spent meanwhile (``cpu_worker``, ``cpu_replica``, ``cpu_server``; ``cpu_http``: what
    the processes serving HTTP spent, the workers' for a servecore row)."""
    before = _cpu_seconds(pid)
    result = load(port, seconds, connections)
    after = _cpu_seconds(pid)
    requests = max(1.0, result["requests"])
    for role in ("worker", "replica", "server"):
        spent = after.get(role, 0.0) - before.get(role, 0.0)
        result[f"cpu_{role}"] = spent / requests * 1e6
    result["cpu_http"] = result["cpu_worker"] if "worker" in after else result["cpu_server"]
    return result


# -- the run -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: ``--main PATH``: the ``src/`` of an older servecore checkout, for the "before" row.
MAIN: dict[str, Path] = {}


def _start(kind: str) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    env = dict(os.environ)
    src = MAIN["src"] if kind.endswith("-main") else ROOT / "src"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(src), str(HERE), env.get("PYTHONPATH", "")) if p
    )
    serve_as = kind.removesuffix("-main")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", serve_as, "--port", str(port)],
        env=env,
        # A group of its own, so a server that will not stop is killed with whatever it
        # forked (granian's worker, servecore run's workers and replica).
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
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
    _kill(proc)
    raise RuntimeError(f"the {kind} server did not answer within 120 s")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a server and its process group (its own: see :func:`_start`)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


ROWS = {
    "bare": "bare ASGI, hypercorn/trio",
    "bare-asyncio": "bare ASGI, hypercorn/asyncio",
    "bare-uvicorn": "bare ASGI, uvicorn",
    "bare-uvicorn-coalesced": "bare ASGI, uvicorn, a write per response",
    "bare-uvicorn-httptools": "bare ASGI, uvicorn/httptools (asyncio)",
    "bare-uvicorn-standard": "bare ASGI, uvicorn[standard] (httptools, uvloop)",
    "bare-granian": "bare ASGI, granian (uvloop)",
    "ingress-threads": "servecore ingress (threads)",
    "ingress-subprocess": "servecore ingress (subprocess)",
    "bare-asyncio-x2": "bare ASGI, hypercorn/asyncio x2",
    "bare-uvicorn-x2": "bare ASGI, uvicorn x2",
    "bare-uvicorn-coalesced-x2": "bare ASGI, uvicorn x2, a write per response",
    "bare-uvicorn-standard-x2": "bare ASGI, uvicorn[standard] x2",
    "run-workers-1": "servecore run --workers 1",
    "run-workers-2": "servecore run --workers 2",
    "run-workers-1-asyncio": "servecore run --workers 1 (hypercorn/asyncio)",
    "run-workers-1-trio": "servecore run --workers 1 (hypercorn/trio)",
    "run-workers-1-uvicorn": "servecore run --workers 1 (uvicorn, one write)",
}

#: The baseline of a row held to the fastest bare app on one process that ran.
BEST = "best bare"


#: The bare app each servecore row is compared with: the same server stack, as many
#: processes (the column "same stack / this").
SAME_STACK = {
    "ingress-threads": "bare",
    "ingress-subprocess": "bare",
    "run-workers-1": BEST,
    "run-workers-2": "bare-uvicorn-standard-x2",
    "run-workers-1-uvicorn": "bare-uvicorn-coalesced",
    "run-workers-1-asyncio": "bare-asyncio",
    "run-workers-1-trio": "bare",
    "run-workers-1-main": "bare-uvicorn",
}

#: The packages each bare row needs beyond hypercorn (rows whose packages do not import
#: are left out).
NEEDS = {
    "bare-uvicorn": ("uvicorn",),
    "bare-uvicorn-coalesced": ("uvicorn",),
    "bare-uvicorn-x2": ("uvicorn",),
    "bare-uvicorn-coalesced-x2": ("uvicorn",),
    "bare-uvicorn-httptools": ("uvicorn", "httptools"),
    "bare-uvicorn-standard": ("uvicorn", "httptools", "uvloop"),
    "bare-uvicorn-standard-x2": ("uvicorn", "httptools", "uvloop"),
    "bare-granian": ("granian",),
}


def _imports(*modules: str) -> bool:
    try:
        for module in modules:
            __import__(module)
    except ImportError:
        return False
    return True


def _single_bare(kind: str) -> bool:
    """A bare app on one process: the rows "best bare" is chosen among (per worker)."""
    return kind.startswith("bare") and not kind.endswith("-x2")


def _available() -> dict[str, str]:
    rows = {kind: name for kind, name in ROWS.items() if _imports(*NEEDS.get(kind, ()))}
    if "bare-granian" in rows:
        rows["bare-granian"] = f"bare ASGI, granian ({_granian_loop()})"
    from servecore._serving.worker import STACKS

    for kind in [kind for kind in rows if kind.startswith("run-workers-")]:
        stack = kind.removeprefix("run-workers-").partition("-")[2]
        if stack and stack not in STACKS:
            del rows[kind]  # a stack this servecore does not have
    return rows


def main(argv: list[str] | None = None) -> None:
    """Start the servers, load them with wrk in alternating rounds, print and write."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter rounds (a smoke run)")
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated rows to run (bare, each row's same-stack bare app and the stock "
        "uvicorn row always run; a row held to the best bare app brings every bare row on one "
        "process)",
    )
    parser.add_argument(
        "--main",
        default=None,
        help="the src/ of an older servecore checkout: adds a row 'servecore run --workers 1 "
        "(before)' served by it",
    )
    parser.add_argument("--out", default=str(HERE / "results" / "bench_http.json"))
    parser.add_argument("--serve", choices=sorted(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return
    if shutil.which(WRK) is None:
        sys.exit("bench_http needs wrk, a C load generator: apt-get install wrk")
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    rounds = 2 if args.quick else ROUNDS
    kinds = _available()
    if args.main:
        MAIN["src"] = Path(args.main).resolve()
        kinds["run-workers-1-main"] = f"servecore run --workers 1 (before: {args.main})"
    if args.only:
        wanted = {"bare", *args.only.split(","), *(["run-workers-1-main"] if args.main else [])}
        if any(SAME_STACK.get(kind) == BEST for kind in wanted):
            wanted |= {kind for kind in kinds if _single_bare(kind)}  # so "best" is real
        wanted |= {SAME_STACK[kind] for kind in wanted if SAME_STACK.get(kind, BEST) != BEST}
        if any(kind.startswith("run-workers") for kind in wanted):
            wanted.add("bare-uvicorn")  # the stock stack, for the column uvicorn/this
        missing = sorted(set(args.only.split(",")) - set(kinds))
        if missing:
            print(f"not available here, left out: {', '.join(missing)}", file=sys.stderr)
        kinds = {kind: name for kind, name in kinds.items() if kind in wanted}
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    per_round: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    try:
        for kind in kinds:
            servers[kind] = _start(kind)
        for _, port in servers.values():  # warm-up, not recorded
            load(port, 1.0, args.connections)
        for i in range(rounds):
            # ABBA order: each row goes first in half the rounds.
            order = list(servers.items()) if i % 2 == 0 else list(servers.items())[::-1]
            for kind, (proc, port) in order:
                per_round[kind].append(measure(proc.pid, port, seconds, args.connections))
    finally:
        for kind, (proc, _) in servers.items():
            # SIGINT reaches trio as KeyboardInterrupt, so the ingress rows delete their
            # backend (and stop their replica) on the way out; SIGTERM would not.
            proc.send_signal(signal.SIGINT if kind.startswith("ingress-") else signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill(proc)
    rows: list[dict[str, Any]] = []
    for kind, name in kinds.items():
        runs = per_round[kind]
        rows.append(
            {
                "kind": kind,
                "name": name,
                "requests_per_s": statistics.median(r["rps"] for r in runs),
                "p50_ms": statistics.median(r["p50"] for r in runs) * 1e3,
                "p99_ms": statistics.median(r["p99"] for r in runs) * 1e3,
                "requests_per_s_by_round": [r["rps"] for r in runs],
                "cpu_us_per_request": {
                    role: statistics.median(r[f"cpu_{role}"] for r in runs)
                    for role in ("http", "worker", "replica", "server")
                },
            }
        )
    bare = rows[0]["requests_per_s"]
    for r in rows:
        r["bare_rps_over_this"] = bare / r["requests_per_s"]
    # Rounds run back to back, so a round's ratio compares the rows under the same
    # background load; their median is the figure least moved by a noisy machine.
    ratios = {
        kind: statistics.median(
            b["rps"] / x["rps"] for b, x in zip(per_round["bare"], per_round[kind], strict=True)
        )
        for kind in kinds
    }
    # The fastest bare app on one process in this run (by its median), for the column
    # "best / this" and the rows held to it.
    single = [r for r in rows if _single_bare(r["kind"])]
    best = max(single, key=lambda r: r["requests_per_s"])["kind"]
    baselines = {
        kind: best if SAME_STACK[kind] == BEST else SAME_STACK[kind]
        for kind in kinds
        if kind in SAME_STACK
    }
    same_stack = {
        kind: statistics.median(
            b["rps"] / x["rps"]
            for b, x in zip(per_round[baselines[kind]], per_round[kind], strict=True)
        )
        for kind in kinds
        if baselines.get(kind) in per_round
    }
    best_ratio = {
        kind: statistics.median(
            b["rps"] / x["rps"] for b, x in zip(per_round[best], per_round[kind], strict=True)
        )
        for kind in kinds
        if not kind.startswith("bare")
    }
    stock = {
        kind: statistics.median(
            b["rps"] / x["rps"]
            for b, x in zip(per_round["bare-uvicorn"], per_round[kind], strict=True)
        )
        for kind in kinds
        if "bare-uvicorn" in per_round
    }
    # CPU per request of the processes serving HTTP (a servecore row's workers: the
    # replica's CPU is on its own, reported beside), over the best bare app's: what a
    # worker costs per request, whatever else shares the machine's cores.
    cpu_ratio = {
        kind: statistics.median(
            x["cpu_http"] / b["cpu_http"]
            for b, x in zip(per_round[best], per_round[kind], strict=True)
            if b["cpu_http"] > 0
        )
        for kind in kinds
        if kind.startswith("run-workers")
    }
    for r in rows:
        if r["kind"] in cpu_ratio:
            r["cpu_http_this_over_best"] = cpu_ratio[r["kind"]]
        if r["kind"] in same_stack:
            r["same_stack"] = baselines[r["kind"]]
            r["same_stack_rps_over_this"] = same_stack[r["kind"]]
        if r["kind"] in best_ratio:
            r["best_bare"] = best
            r["best_bare_rps_over_this"] = best_ratio[r["kind"]]
        if r["kind"] in stock:
            r["stock_uvicorn_rps_over_this"] = stock[r["kind"]]
    width = max(48, *(len(name) + 2 for name in kinds.values()))
    head = (
        f"{'':<{width}}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'bare/this':>11}"
        f"{'uvicorn/this':>14}{'same stack/this':>17}{'best/this':>11}"
        f"{'CPU µs/req':>12}{'replica µs':>12}{'CPU this/best':>15}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        mine = same_stack.get(r["kind"])
        plain = stock.get(r["kind"])
        top = best_ratio.get(r["kind"])
        print(
            f"{r['name']:<{width}}{r['requests_per_s']:>12,.0f}{r['p50_ms']:>10.2f}"
            f"{r['p99_ms']:>10.2f}{ratios[r['kind']]:>11.2f}"
            f"{(f'{plain:.2f}' if plain is not None else ''):>14}"
            f"{(f'{mine:.2f}' if mine is not None else ''):>17}"
            f"{(f'{top:.2f}' if top is not None else ''):>11}"
            f"{r['cpu_us_per_request']['http']:>12.1f}"
            f"{(f'{replica:.1f}' if (replica := r['cpu_us_per_request']['replica']) else ''):>12}"
            f"{(f'{c:.2f}' if (c := cpu_ratio.get(r['kind'])) is not None else ''):>15}"
        )
    print(
        f"(wrk -t1 -c{args.connections}; {rounds} alternating rounds of {seconds:g} s per row, "
        f"medians; bare/this: the median of per-round ratios to hypercorn/trio; "
        f"uvicorn/this: to the bare app on uvicorn as it comes; same stack/this: to the "
        f"bare app on the row's own stack and process count; best/this: to the fastest "
        f"bare app on one process, {kinds[best]}; CPU µs/req: CPU time per request of "
        f"the processes serving HTTP (the bare app's; servecore's workers), medians; "
        f"replica µs: the replica's; CPU this/best: the first over the best bare app's, "
        f"median of per-round ratios; "
        f"{os.cpu_count()} CPUs; goal: servecore within 1.3 of the best stack)"
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
                "load_generator": "wrk",
                "settings": {
                    "quick": args.quick,
                    "rounds": rounds,
                    "seconds_per_round": seconds,
                    "connections": args.connections,
                },
                "rows": rows,
                "bare_over_this_median": ratios,
                "same_stack_over_this_median": same_stack,
                "best_bare": best,
                "best_bare_over_this_median": best_ratio,
                "cpu_http_this_over_best_median": cpu_ratio,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
