"""An ingress worker process: ``servecore run --workers N`` (docs/design.md §5, "Ingress
workers").

Each worker is a process of its own that opens a client of the controller
(:func:`servecore._serving.connect.open_client`: the routing-table feed over the
control socket, its own :class:`~servecore.router.Router`, calls straight to the
subprocess replicas, or to the Ray actors as a Ray driver of its own) and serves
:class:`~servecore.http.HTTPIngress` -- the same routes, JSON in and out, and error
mapping as the controller's own ingress -- on the listening socket it inherited from
``servecore run`` (descriptor ``--fd``). All the workers accept on that one socket,
and the kernel hands each connection to one of them. The controller is not on the
query path: while it is down, a worker keeps routing on the last table it received,
and resubscribes in the background.

Four server stacks (``--stack``):

* ``lean`` (the default when httptools is installed), ``uvicorn`` (the default when
  only uvicorn is) and ``asyncio`` (hypercorn on asyncio, the default otherwise).
  ``lean`` is servecore's own HTTP/1.1 server (:mod:`servecore._serving.lean_http`):
  a whole request is answered without ASGI messages, anything else through the app's
  ASGI side. On all three, trio runs as a *guest* of the asyncio loop on the
  same thread (``trio.lowlevel.start_guest_run``), keeping the client's table feed
  and load reports. Requests are handled on asyncio, and so are their queries and
  streams in the common case: the worker's own asyncio connections to the replicas,
  replica slots from the client's router (:mod:`servecore._serving.asyncio_queries`).
  Only the unusual cases (no replica, waking from zero, batching) hop to a trio task
  running the client's router (:class:`~servecore._serving.asyncio_client.TrioGuest`),
  whose result comes back through an asyncio future, without a second thread; on the
  Ray runtime every query does
  (the asyncio connections speak the subprocess wire only).
* ``trio``: hypercorn on trio, as the controller's own ingress.

The asyncio stacks run on uvloop's event loop when uvloop is installed (``--loop``:
asyncio's own otherwise, or when told). Why asyncio is the default, and uvloop its loop,
is measured in docs/benchmarks.md ("HTTP").

The ``/-/`` routes of a worker answer from what the worker knows: ``/-/healthz``
(alive), ``/-/readyz`` (every endpoint with a route has a replica or wakes on demand in
the worker's table), ``/-/routes``, ``/-/metrics`` (the queries, latencies and HTTP
responses of every worker of the server, summed: :mod:`servecore._serving.worker_metrics`);
the status page (``/-/dashboard``, ``/-/status.json``, ``/-/events``) is the
controller's business and is not served by workers (501, saying where to look instead).

Start-up: the worker writes one line, ``ready``, to descriptor ``--ready-fd`` once its
client holds the first table, then closes it. SIGTERM or SIGINT: stop taking
connections, let requests in flight finish, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, TypeVar

import trio

from servecore._serving.asyncio_client import client_in_guest
from servecore._serving.asyncio_queries import AsyncioHandle, AsyncioQueries
from servecore._serving.connect import Client, open_client
from servecore._serving.ops_http import PREFIX, _send, http_responses
from servecore._serving.remote_runtime import ReplicaClient
from servecore._serving.replica_links import ReplicaLinks
from servecore._serving.socket_handoff import serve_handoff
from servecore._serving.worker_metrics import METRICS_DIR, WorkerMetrics
from servecore._store_choice import StoreChoice, store_from_environment

__all__ = [
    "LOOPS",
    "STACKS",
    "answer_worker_ops",
    "default_loop",
    "default_stack",
    "main",
    "serve_worker",
    "worker_readyz",
]

log = logging.getLogger("servecore.worker")

T = TypeVar("T")
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: The server stacks a worker can run: servecore's own on asyncio, uvicorn on asyncio,
#: hypercorn on asyncio, hypercorn on trio.
STACKS = ("lean", "uvicorn", "asyncio", "trio")


def default_stack() -> str:
    """The fastest stack installed: servecore's own server if httptools is installed,
    else uvicorn if it is, else hypercorn on asyncio."""
    for module, stack in (("httptools", "lean"), ("uvicorn", "uvicorn")):
        try:
            __import__(module)
        except ImportError:
            continue
        return stack
    return "asyncio"


#: The event loops an asyncio stack can run on: asyncio's own, or uvloop's.
LOOPS = ("asyncio", "uvloop")


def default_loop() -> str:
    """The event loop an asyncio stack runs on unless told: uvloop if it is installed
    (about a tenth less CPU per request, docs/benchmarks.md), else asyncio's own."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes an event loop of kind ``loop`` (None: asyncio's own)."""
    if loop not in LOOPS:
        raise ValueError(f"loop={loop!r} is not one of {', '.join(LOOPS)}")
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        raise ValueError(
            f"loop={loop!r} needs the uvloop package, which is not installed ({exc}); "
            f"install it (pip install uvloop) or run the worker with loop='asyncio'"
        ) from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


#: How long requests in flight may take to finish after SIGTERM.
GRACEFUL_TIMEOUT_S = 5.0


# -- the /-/ routes, from the worker's table ----------------------------------------------


def worker_readyz(client: Client) -> tuple[int, dict[str, Any]]:
    """``/-/readyz`` of a worker: ready when every endpoint with a route can be sent a
    query from here (a backend with traffic and a replica, or one that wakes on demand)."""
    table = client.routing_table
    reasons = []
    for name, ep in sorted(table.endpoints.items()):
        if ep.route is None:
            continue
        routes = [table.backends.get(t) for t, w in ep.traffic.items() if w > 0]
        if not any(r is not None and (r.replicas or r.wakes_on_demand) for r in routes):
            reasons.append(f"endpoint {name!r} at {ep.route} has no RUNNING replica")
    if reasons:
        return 503, {"status": "not ready", "reasons": reasons}
    return 200, {"status": "ready"}


#: The controller's own routes, which a worker answers with 501 and a way out.
_CONTROLLER_ONLY = {"status.json", "events", "dashboard"}


async def answer_worker_ops(
    client: Client,
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Send,
    *,
    metrics: WorkerMetrics | str | None = None,
) -> bool:
    """Answer ``scope`` if its path is one of the ``/-/`` routes; return whether it was.

    ``metrics`` serves ``/-/metrics``; a string instead says why there are none (501)."""
    path = scope["path"]
    if not path.startswith(PREFIX):
        return False
    name = path[len(PREFIX) :]
    json_type = b"application/json"
    if name not in {"healthz", "readyz", "routes", "metrics"} | _CONTROLLER_ONLY:
        body = {"error": f"no operator route {path}; try /-/healthz, /-/readyz, /-/routes"}
        await _send(send, 404, json.dumps({**body, "type": "NotFound"}).encode(), json_type)
    elif scope["method"] not in {"GET", "HEAD"}:
        body = {"error": f"{path} takes GET", "type": "MethodNotAllowed"}
        await _send(send, 405, json.dumps(body).encode(), json_type)
    elif name == "healthz":
        await _send(send, 200, json.dumps({"status": "ok"}).encode(), json_type)
    elif name == "readyz":
        status, data = worker_readyz(client)
        await _send(send, status, json.dumps(data).encode(), json_type)
    elif name == "routes":
        table = client.routing_table
        found = {ep.route: n for n, ep in sorted(table.endpoints.items()) if ep.route}
        await _send(send, 200, json.dumps(found).encode(), json_type)
    elif name == "metrics":
        if isinstance(metrics, WorkerMetrics):
            from prometheus_client.exposition import CONTENT_TYPE_LATEST

            await _send(send, 200, metrics.exposition(), CONTENT_TYPE_LATEST.encode())
        else:
            why = metrics or "this worker keeps no metrics"
            body = {"error": f"no /-/metrics here: {why}", "type": "NotImplemented"}
            await _send(send, 501, json.dumps(body).encode(), json_type)
    else:
        # The status page reads the controller's state, events and router: a worker
        # holds none of them, and the controller serves no HTTP beside its workers.
        body = {
            "error": f"ingress workers (servecore run --workers) do not serve {path}; "
            f"run with --workers 0 to serve the status page from the controller, or "
            f"read servecore status",
            "type": "NotImplemented",
        }
        await _send(send, 501, json.dumps(body).encode(), json_type)
    return True


# -- the asyncio side ----------------------------------------------------------------------


class _AsyncioSource:
    """A :class:`~servecore.http.HandleSource` for asyncio: the client's table, and
    handles on the asyncio query path (:mod:`servecore._serving.asyncio_queries`)."""

    def __init__(self, client: Client, queries: AsyncioQueries) -> None:
        self._client = client
        self._queries = queries

    @property
    def routing_table(self) -> Any:
        return self._client.routing_table

    def get_handle(self, endpoint: str) -> AsyncioHandle:
        return AsyncioHandle(self._queries, endpoint)


# -- serving -------------------------------------------------------------------------------


def _config(fd: int) -> Any:
    from hypercorn.config import Config

    from servecore.http import hypercorn_config

    config = hypercorn_config(Config(), f"fd://{fd}")
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    return config


def _say_ready(ready_fd: int | None) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, b"ready\n")
    finally:
        os.close(ready_fd)  # nothing more is ever written: the server may be gone


def _open_metrics(
    directory: Path | None, client: Client, source: object
) -> WorkerMetrics | str | None:
    """The worker's metrics (counting ``source``'s HTTP responses), or why there are none."""
    if directory is None:
        return None
    try:
        metrics = WorkerMetrics(
            directory, client.router.stats, functools.partial(http_responses, source)
        )
    except (ImportError, OSError) as exc:
        log.warning("no /-/metrics: %s", exc)
        return str(exc)
    metrics.start()
    return metrics


def _close_metrics(metrics: WorkerMetrics | str | None) -> None:
    if isinstance(metrics, WorkerMetrics):
        metrics.close()


async def _serve_trio(
    store: Path | StoreChoice,
    fd: int,
    timeout_s: float | None,
    ready_fd: int | None,
    metrics_dir: Path | None,
) -> None:
    from hypercorn.trio import serve

    from servecore.http import HTTPIngress

    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_client(store) as client, trio.open_nursery() as nursery:

            async def watch() -> None:
                async for _ in signals:
                    stop.set()
                    return

            nursery.start_soon(watch)
            metrics = _open_metrics(metrics_dir, client, client)
            app = HTTPIngress(
                client,
                timeout_s=timeout_s,
                ops=functools.partial(answer_worker_ops, client, metrics=metrics),
            )
            await nursery.start(
                functools.partial(
                    serve,
                    app,  # type: ignore[arg-type]
                    _config(fd),
                    shutdown_trigger=stop.wait,
                    mode="asgi",
                )
            )
            _say_ready(ready_fd)
            try:
                await stop.wait()
                # serve returns once connections drained; then the client closes.
                nursery.cancel_scope.deadline = trio.current_time() + GRACEFUL_TIMEOUT_S + 1
            finally:
                _close_metrics(metrics)


async def _serve_asyncio(
    store: Path | StoreChoice,
    fd: int,
    timeout_s: float | None,
    ready_fd: int | None,
    server: str,
    metrics_dir: Path | None,
) -> None:
    from servecore.http import HTTPIngress

    loop = asyncio.get_running_loop()
    async with client_in_guest(store, {}) as (client, guest):
        # Subprocess replicas are reached over this loop's own connections; others (Ray
        # actors, through the client's Ray driver) only through trio's router.
        direct = isinstance(client.replicas, ReplicaClient)
        links = ReplicaLinks(client.replicas.address_of if direct else _unreachable)
        queries = AsyncioQueries(client.router, links, guest, loop, direct=direct)
        client.add_table_listener(queries.on_table)
        client.add_load_source(queries.waiting)
        source = _AsyncioSource(client, queries)
        metrics = _open_metrics(metrics_dir, client, source)
        app = HTTPIngress(
            source,
            timeout_s=timeout_s,
            ops=functools.partial(answer_worker_ops, client, metrics=metrics),
            loop="asyncio",
        )
        try:
            if server == "lean":
                await _run_lean(app, fd, ready_fd)
            elif server == "uvicorn":
                await _run_uvicorn(app, fd, ready_fd)
            else:
                await _run_hypercorn_asyncio(app, fd, ready_fd)
        finally:
            _close_metrics(metrics)
            links.close()


def _unreachable(tag: str) -> None:
    return None


def _on_stop_signals(callback: Callable[[], object]) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, callback)


async def _run_hypercorn_asyncio(app: Any, fd: int, ready_fd: int | None) -> None:
    from hypercorn.asyncio import serve

    stop = asyncio.Event()
    _on_stop_signals(stop.set)
    server = asyncio.ensure_future(serve(app, _config(fd), shutdown_trigger=stop.wait, mode="asgi"))
    _say_ready(ready_fd)
    await server


async def _run_lean(app: Any, fd: int, ready_fd: int | None) -> None:
    from servecore._serving.lean_http import LeanServer
    from servecore.http import LISTEN_BACKLOG

    stop = asyncio.Event()
    _on_stop_signals(stop.set)
    server = LeanServer(app, graceful_s=GRACEFUL_TIMEOUT_S, backlog=LISTEN_BACKLOG)
    await server.serve(socket.socket(fileno=fd), stop, functools.partial(_say_ready, ready_fd))


async def _run_uvicorn(app: Any, fd: int, ready_fd: int | None) -> None:
    import uvicorn

    from servecore.http import LISTEN_BACKLOG

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            # The worker's own handlers (below) ask for a graceful exit; uvicorn's would
            # re-raise the signal after it, and kill the worker before its client closes.
            yield

    from servecore._serving.coalesced_writes import coalescing_h11_protocol

    config = uvicorn.Config(
        app,
        http=coalescing_h11_protocol(),  # a response's head and body in one write
        # No X-Forwarded-* rewriting: the ingress reads neither the client's address
        # nor the scheme, and the middleware is a layer every request goes through.
        proxy_headers=False,
        lifespan="off",
        ws="none",
        log_level="warning",
        access_log=False,
        backlog=LISTEN_BACKLOG,
        timeout_graceful_shutdown=int(GRACEFUL_TIMEOUT_S),
    )
    server = Server(config)

    def stop() -> None:
        server.should_exit = True

    _on_stop_signals(stop)
    sock = socket.socket(fileno=fd)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    _say_ready(ready_fd)
    await serving


def serve_worker(
    store: Path | StoreChoice,
    fd: int,
    *,
    timeout_s: float | None = 30.0,
    stack: str | None = None,
    ready_fd: int | None = None,
    metrics_dir: Path | None = None,
    loop: str | None = None,
) -> None:
    """Serve the ingress of the controller on ``store`` at the listening socket ``fd``
    until SIGTERM or SIGINT (see the module). ``stack`` is one of :data:`STACKS`
    (None: :func:`default_stack`); ``metrics_dir`` holds the metric files of the
    server's workers (None: no ``/-/metrics``); ``loop`` is the event loop of the
    asyncio stacks, one of :data:`LOOPS` (None: :func:`default_loop`)."""
    stack = stack or default_stack()
    loop_factory = _loop_factory(loop or default_loop())
    if stack == "trio":
        trio.run(_serve_trio, store, fd, timeout_s, ready_fd, metrics_dir)
    elif stack in {"lean", "uvicorn", "asyncio"}:
        server = "hypercorn" if stack == "asyncio" else stack
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve_asyncio(store, fd, timeout_s, ready_fd, server, metrics_dir))
    else:
        raise ValueError(f"stack={stack!r} is not one of {', '.join(STACKS)}")


def main(argv: list[str] | None = None) -> None:
    """``python -m servecore._serving.worker``: what ``servecore run --workers`` starts."""
    parser = argparse.ArgumentParser(description="A servecore ingress worker.")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--stack", choices=STACKS, default=None)
    parser.add_argument("--loop", choices=LOOPS, default=None)
    parser.add_argument("--handoff", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="servecore worker %(process)d: %(message)s")
    try:
        # A PostgreSQL store comes in the environment, not in argv (its DSN may hold a
        # password, and any user may read another's command line).
        store = store_from_environment() or args.store
        if args.handoff:
            serve_handoff(args.store.parent, args.fd)
        serve_worker(
            store,
            args.fd,
            timeout_s=args.timeout,
            stack=args.stack,
            ready_fd=args.ready_fd,
            metrics_dir=args.store.parent / METRICS_DIR,
            loop=args.loop,
        )
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # one paragraph, not a traceback: the server restarts us
        print(f"servecore worker {os.getpid()}: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
