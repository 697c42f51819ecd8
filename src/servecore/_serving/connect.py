"""Handles in any process: ``servecore.connect`` (docs/design.md §5, "The data plane").

A client in a process other than the controller's subscribes to the routing-table
feed of a running ``servecore run`` (its control socket, see
:mod:`servecore._serving.table_feed`), runs its own :class:`~servecore.router.Router`
over a client-side runtime, and sends queries straight to the replicas: the
controller is not on the query path. For the subprocess runtime that is a
:class:`~servecore._serving.remote_runtime.ReplicaClient` (each replica's Unix socket);
for Ray a :class:`~servecore.runtimes.ray.client.RayReplicaClient` (the replica actors,
called by name from a Ray driver of this process's own).

While the controller is down the client keeps routing to the replicas it knows, and
resubscribes in the background (every :data:`RESUBSCRIBE_S` at most); the restarted
controller's full table replaces the old one only if it is newer. On a PostgreSQL
store the client follows the committed checkpoint in the database instead
(:mod:`servecore._serving.pg_feed`), whichever controller writes it.

Load from everywhere: while its router has queries running or queued, the client
reports them per backend to the controller every
:data:`~servecore._controller.remote_load.LOAD_REPORT_INTERVAL_S` (the control
socket's ``load`` op; one report of zero when they are done, then silence), and the
controller's autoscaler adds them to its own router's load. A query that starts to
wait for a backend with no replica (one scaled to zero) sends a report at once that
asks the controller to wake it. A report that fails (the controller is away) is not
retried: the next one carries the load of its own moment.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import secrets
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import trio

from servecore._control_socket import (
    ControlNoAnswer,
    ControlUnavailable,
    check_socket_owner,
    check_socket_path,
    check_state_dir,
    socket_path,
)
from servecore._controller.remote_load import LOAD_REPORT_INTERVAL_S
from servecore._controller.sync import SyncHandle
from servecore._core.errors import ControllerClosed, ReplicasUnreachable
from servecore._core.transitions import RoutingTable
from servecore._serving.remote_runtime import ReplicaClient
from servecore._serving.table_feed import VersionedTable, decode_table, read_lines
from servecore._store_choice import DEFAULT_STORE, StoreChoice, choose_store
from servecore.router import DEFAULT_MAX_QUEUED_QUERIES, Handle, Router

__all__ = ["Client", "SyncClient", "connect", "open_client"]

log = logging.getLogger("servecore.connect")

T = TypeVar("T")

#: The longest pause between two attempts to resubscribe while the controller is away.
RESUBSCRIBE_S = 1.0
#: How long the first subscription may take to bring its first table.
CONNECT_TIMEOUT_S = 30.0
#: How long a load report may take to be answered before it is given up.
REPORT_TIMEOUT_S = 5.0


class _Feed:
    """One subscription: the socket, what is buffered, and the hello."""

    def __init__(self, stream: trio.SocketStream, hello: dict[str, Any]) -> None:
        self.stream = stream
        self.hello = hello
        self.buffer = bytearray()

    async def next_table(self) -> VersionedTable | None:
        line = await read_lines(self.stream, self.buffer)
        return None if line is None else decode_table(line)


async def _open_control(path: Path) -> trio.SocketStream:
    """A connection to the control socket at ``path``, after the CLI's checks: never
    talk to a socket in a directory another user controls."""
    check_socket_path(path)
    if not path.parent.is_dir():
        raise ControlUnavailable(path, f"no state directory {path.parent}")
    check_state_dir(path.parent)
    check_socket_owner(path)
    try:
        return await trio.open_unix_socket(str(path))
    except OSError as exc:
        raise ControlUnavailable(path, exc.strerror or str(exc)) from exc


async def _request(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """One request on the control socket, and its answer."""
    async with await _open_control(path) as stream:
        await stream.send_all(json.dumps(request).encode() + b"\n")
        line = await read_lines(stream, bytearray())
    if line is None:
        raise ControlNoAnswer(path, "it closed the connection without answering")
    answer = json.loads(line)
    if not isinstance(answer, dict):
        raise ControlNoAnswer(path, f"it answered {answer!r}")
    return answer


async def _subscribe(path: Path) -> _Feed:
    stream = await _open_control(path)
    try:
        await stream.send_all(b'{"op": "subscribe"}\n')
        feed = _Feed(stream, {})
        line = await read_lines(stream, feed.buffer)
        if line is None:
            raise ControlNoAnswer(path, "it closed the connection without answering")
        hello = json.loads(line)
        if not isinstance(hello, dict) or not hello.get("ok"):
            why = hello.get("error") if isinstance(hello, dict) else hello
            raise ControlNoAnswer(path, f"it refused the subscription: {why}")
        feed.hello = hello
    except BaseException:
        await stream.aclose()
        raise
    return feed


#: The Ray namespace of a controller not named otherwise (``servecore run``'s default).
DEFAULT_NAMESPACE = "servecore"


class Client:
    """Handles to the endpoints of a controller in another process (async; from
    :func:`open_client`). Queries go from this process straight to the replicas."""

    def __init__(self, where: Path, router: Router, replicas: Any) -> None:
        self.where = where
        self.router = router
        self.replicas = replicas
        self._table: VersionedTable | None = None
        self._changed = trio.Event()
        #: Whether the feed is connected now (False while the controller is away, or the
        #: database, for a PostgreSQL store).
        self.feed_connected = False
        #: Where tables come from: ``"control socket"`` or ``"postgresql"``.
        self.feed_source = "control socket"
        #: How this client names itself in its load reports (unique per client).
        self.reporter = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        #: Load reports the controller accepted (for tests and diagnostics).
        self.reports_sent = 0
        self._waking: set[str] = set()
        self._report_now = trio.Event()
        self._table_listeners: list[Callable[[RoutingTable], None]] = []
        self._load_sources: list[Callable[[], Mapping[str, int]]] = []
        #: Where load reports go when the store is PostgreSQL (a row per reporter the
        #: leader reads, from any host); ``None``: the controller's control socket.
        self.load_table: Any = None

    @property
    def table(self) -> VersionedTable | None:
        """The routing table in use, with its version (``seq``, ``epoch``)."""
        return self._table

    @property
    def routing_table(self) -> RoutingTable:
        """The routing table in use."""
        return self._table.table if self._table is not None else RoutingTable()

    @property
    def seq(self) -> int:
        """The checkpoint sequence number of the table in use (-1 before the first)."""
        return self._table.seq if self._table is not None else -1

    def get_handle(self, endpoint: str) -> Handle:
        """A handle sending queries to ``endpoint`` (looked up on each call)."""
        return self.router.handle(endpoint)

    def add_table_listener(self, listener: Callable[[RoutingTable], None]) -> None:
        """Call ``listener(table)`` (on the client's trio thread) after the router has
        adopted each new table."""
        self._table_listeners.append(listener)

    def add_load_source(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Add ``source()`` (queries waiting per backend outside the router, such as an
        ingress worker's asyncio path) to the load this client reports."""
        self._load_sources.append(source)

    def ongoing_queries(self) -> dict[str, int]:
        """Queries running on or waiting for each backend from this client now."""
        ongoing = self.router.ongoing_queries()
        for source in self._load_sources:
            for tag, n in source().items():
                ongoing[tag] = ongoing.get(tag, 0) + n
        return ongoing

    async def wait_for_seq(self, seq: int) -> VersionedTable:
        """Wait until a table of checkpoint ``seq`` or later is in use; return it."""
        while self._table is None or self._table.seq < seq:
            await self._changed.wait()
        return self._table

    def _offer(self, versioned: VersionedTable) -> bool:
        """Use ``versioned`` if it is newer than the table in use; never go back."""
        if not versioned.newer_than(self._table):
            log.debug("ignored table %s (have %s)", versioned.version, self._version())
            return False
        self._table = versioned
        self.router.update(versioned.table)
        for listener in self._table_listeners:
            try:
                listener(versioned.table)
            except Exception:
                log.exception("a table listener failed; the table is in use all the same")
        self._changed.set()
        self._changed = trio.Event()
        return True

    def _set_connected(self, connected: bool) -> None:
        self.feed_connected = connected

    def _version(self) -> tuple[int, int] | None:
        return self._table.version if self._table is not None else None

    async def _follow(self, feed: _Feed | None) -> None:
        """Apply every table of the feed; resubscribe whenever it ends."""
        pause = 0.05
        while True:
            if feed is None:
                try:
                    feed = await _subscribe(self.where)
                except Exception as exc:
                    log.debug("resubscribing to %s failed: %r", self.where, exc)
                    await trio.sleep(pause)
                    pause = min(pause * 2, RESUBSCRIBE_S)
                    continue
            self.feed_connected, pause = True, 0.05
            try:
                async with feed.stream:
                    while (versioned := await feed.next_table()) is not None:
                        self._offer(versioned)
            except (OSError, ValueError, trio.BrokenResourceError) as exc:
                log.warning("the table feed at %s failed: %r", self.where, exc)
            self.feed_connected, feed = False, None
            log.info("the controller at %s went away; routing on table %s", *self._where())

    def _where(self) -> tuple[Path, tuple[int, int] | None]:
        return self.where, self._version()

    # -- load reports ----------------------------------------------------------------

    def _on_demand(self, backend: str) -> None:
        """The router's demand listener: a query waits for ``backend``, which has no
        replica. Report at once, asking the controller to wake it."""
        self._waking.add(backend)
        self._report_now.set()

    async def _report_load(self, interval_s: float) -> None:
        """Report the router's ongoing queries every ``interval_s`` while there are
        any (and once more when they are done), and at once when a backend must wake."""
        reported_load = False
        while True:
            with trio.move_on_after(interval_s):
                await self._report_now.wait()
            self._report_now = trio.Event()
            wake, self._waking = sorted(self._waking), set()
            ongoing = {tag: n for tag, n in self.ongoing_queries().items() if n}
            if not (ongoing or wake or reported_load):
                continue
            request = {"op": "load", "reporter": self.reporter, "ongoing": ongoing, "wake": wake}
            try:
                with trio.fail_after(REPORT_TIMEOUT_S):
                    if self.load_table is not None:  # PostgreSQL: a row the leader reads
                        await trio.to_thread.run_sync(
                            self.load_table.write,
                            self.reporter,
                            ongoing,
                            wake,
                            abandon_on_cancel=True,
                        )
                        answer = {"ok": True}
                    else:
                        answer = await _request(self.where, request)
            except Exception as exc:  # includes TooSlowError
                log.debug("load report to %s failed: %r", self.where, exc)
                continue  # the next report carries the load of its own moment
            if answer.get("ok"):
                self.reports_sent += 1
                reported_load = bool(ongoing)
            else:
                why = answer.get("error")
                log.warning("the controller at %s refused a load report: %s", self.where, why)


async def _hello(where: Path) -> dict[str, Any] | None:
    """The feed's hello of the server at ``where`` (how replicas are reached), or
    ``None`` when no server answers there now."""
    try:
        feed = await _subscribe(where)
    except (ControlUnavailable, ControlNoAnswer):
        return None
    await feed.stream.aclose()
    return feed.hello


async def _first_from_postgres(
    choice: StoreChoice, where: Path
) -> tuple[Any, VersionedTable, str | None, dict[str, Any]]:
    """The store, its committed table, the runtime and how replicas are reached."""
    from servecore._serving.pg_feed import read_table

    store = choice.open()
    try:
        # Not abandoned on cancel: the read is bounded by the store's own timeouts, and
        # the store must not be closed under the thread using it.
        first, runtime = await trio.to_thread.run_sync(read_table, store)
        hello = await _hello(where)
    except BaseException:
        store.close()
        raise
    if hello is not None:
        return store, first, str(hello.get("runtime")), hello
    # No server on this host now (a failover under way): the checkpoint names the
    # runtime, and subprocess replicas are where servecore run puts them by default.
    return store, first, runtime, {"directory": str(choice.state_dir.absolute() / "replicas")}


def _replica_client(
    runtime: str | None,
    hello: dict[str, Any],
    ray_address: str | None,
    ray_namespace: str | None,
) -> ReplicaClient | Any | None:
    """The client-side runtime reaching the replicas ``hello`` describes, or ``None``
    when no other process can reach them (threads, or a runtime unknown here)."""
    if runtime == "subprocess" and hello.get("directory") is not None:
        return ReplicaClient(str(hello["directory"]))
    if runtime == "ray":
        # Imported here: a client of a subprocess controller never loads Ray.
        from servecore.runtimes.ray.client import RayReplicaClient

        address = ray_address or hello.get("address")
        namespace = ray_namespace or hello.get("namespace") or DEFAULT_NAMESPACE
        return RayReplicaClient(str(namespace), None if address is None else str(address))
    return None


@contextlib.asynccontextmanager
async def open_client(
    store: str | os.PathLike[str] | StoreChoice = DEFAULT_STORE,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    rng: random.Random | None = None,
    max_queued_queries: int = DEFAULT_MAX_QUEUED_QUERIES,
    load_report_interval_s: float | None = LOAD_REPORT_INTERVAL_S,
    ray_address: str | None = None,
    ray_namespace: str | None = None,
) -> AsyncIterator[Client]:
    """Connect to the ``servecore run`` serving ``store`` (its ``--store``, and its
    ``--state-dir`` if it was given one), from trio::

        async with servecore.open_client(".servecore/state.db") as client:
            print(await client.get_handle("echo").call("hi"))

    Returns once the first routing table has arrived. For a SQLite store the table
    comes from the server's control socket; for a PostgreSQL one
    (``"postgresql://...?checkpoint=NAME"``) from the database itself, so the client
    follows the committed checkpoint whichever controller (a leader, a standby that
    took over) writes it, and starts even while no controller runs. Raises
    :class:`~servecore.ReplicasUnreachable` for a controller on the threads runtime
    (its replicas live inside its process), and the control socket's errors when no
    server answers (SQLite). ``rng`` and ``max_queued_queries`` are the client's
    router's (see :class:`~servecore.Router`). While queries run or wait, the router's
    load is reported to the controller's autoscaler every ``load_report_interval_s``
    (``None``: never; the controller ages out a client silent for three default
    intervals, so a longer one makes its load count only part of the time).

    For a controller on the Ray runtime the client joins the Ray cluster as a driver of
    its own and calls the replica actors by name: the cluster's address and the
    namespace come from the server's hello, or else ``ray_address`` (else Ray's
    default, ``RAY_ADDRESS``) and ``ray_namespace`` (else the controller's default
    name, ``"servecore"``); given, they override the hello's.
    """
    choice = (
        store
        if isinstance(store, StoreChoice)
        else choose_store(os.fspath(store), None if state_dir is None else Path(state_dir))
    )
    where = socket_path(choice.state_dir.absolute())
    pg_store: Any = None
    feed: _Feed | None = None
    with trio.fail_after(CONNECT_TIMEOUT_S):
        if choice.is_postgres:
            pg_store, first, runtime, hello = await _first_from_postgres(choice, where)
        else:
            feed = await _subscribe(where)
            try:
                got = await feed.next_table()
            except BaseException:
                await feed.stream.aclose()
                raise
            if got is None:
                await feed.stream.aclose()
                raise ControlNoAnswer(where, "it closed the feed before sending a table")
            first, runtime, hello = got, str(feed.hello.get("runtime")), feed.hello
    replicas = _replica_client(runtime, hello, ray_address, ray_namespace)
    if replicas is None:
        if feed is not None:
            await feed.stream.aclose()
        if pg_store is not None:
            pg_store.close()
        raise ReplicasUnreachable(str(where.parent), str(runtime))
    router = Router(replicas, rng=rng, max_queued_queries=max_queued_queries)
    pg_feed = None
    async with trio.open_nursery() as nursery:
        client = Client(where, router, replicas)
        try:
            started = replicas.start(nursery)
            if started is not None:
                await started  # the Ray client joins the cluster
            router.start(nursery)
            client._offer(first)
            client.feed_connected = True
            if pg_store is not None:
                from servecore._serving.pg_feed import PostgresFeed

                pg_feed = PostgresFeed(
                    pg_store,
                    offer=client._offer,
                    connected=client._set_connected,
                    token=trio.lowlevel.current_trio_token(),
                )
                client.feed_source = "postgresql"
                pg_feed.start()
                from servecore.stores.postgres_load import PostgresLoadReports

                client.load_table = PostgresLoadReports(pg_store)
            else:
                nursery.start_soon(client._follow, feed)
                feed = None  # _follow owns it now
            if load_report_interval_s is not None:
                router.add_demand_listener(client._on_demand)
                nursery.start_soon(client._report_load, load_report_interval_s)
            yield client
        finally:
            nursery.cancel_scope.cancel()
            replicas.close()
            if client.load_table is not None:
                client.load_table.close()
            if feed is not None:
                await feed.stream.aclose()
            if pg_feed is not None:
                pg_feed.stop()  # the feed's thread closes the store
            elif pg_store is not None:
                pg_store.close()


class SyncClient:
    """:class:`Client` for synchronous code: trio runs in a background thread, and
    every method blocks. Get one from :func:`connect`; close it (or use ``with``)."""

    def __init__(self, store: str | os.PathLike[str], **options: Any) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._client: Client | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closing: trio.Event | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._thread_main, args=(store, options), name="servecore-client", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._client is None:
            self._thread.join()
            assert self._error is not None
            raise self._error

    def _thread_main(self, store: str | os.PathLike[str], options: dict[str, Any]) -> None:
        try:
            trio.run(self._main, store, options)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self, store: str | os.PathLike[str], options: dict[str, Any]) -> None:
        async with open_client(store, **options) as client:
            self._closing = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._client = client
            self._ready.set()
            await self._closing.wait()

    def _run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._closed or self._token is None:
            raise ControllerClosed("the client's call")
        try:
            return trio.from_thread.run(functools.partial(afn, *args), trio_token=self._token)
        except trio.RunFinishedError:
            raise ControllerClosed("the client's call") from None

    @property
    def client(self) -> Client:
        """The :class:`Client` behind this one (use it on its trio thread only)."""
        assert self._client is not None
        return self._client

    @property
    def seq(self) -> int:
        """The checkpoint sequence number of the routing table in use."""
        return self.client.seq

    @property
    def table(self) -> VersionedTable | None:
        """The routing table in use, with its version."""
        return self.client.table

    @property
    def routing_table(self) -> RoutingTable:
        """The routing table in use."""
        return self.client.routing_table

    @property
    def feed_connected(self) -> bool:
        """Whether the table feed is connected now (False while the controller is away)."""
        return self.client.feed_connected

    def get_handle(self, endpoint: str) -> SyncHandle:
        """A blocking, thread-safe handle to ``endpoint``."""
        assert self._token is not None
        return SyncHandle(self.client.get_handle(endpoint), self._token)

    def wait_for_seq(self, seq: int, timeout_s: float | None = None) -> VersionedTable:
        """Block until a table of checkpoint ``seq`` or later is in use (``TimeoutError``
        after ``timeout_s``)."""

        async def wait() -> VersionedTable:
            if timeout_s is None:
                return await self.client.wait_for_seq(seq)
            with trio.fail_after(timeout_s):
                return await self.client.wait_for_seq(seq)

        try:
            return self._run(wait)
        except trio.TooSlowError:
            raise TimeoutError(
                f"no routing table of seq {seq} or later within {timeout_s}s "
                f"(the client has seq {self.seq})"
            ) from None

    def close(self) -> None:
        """Disconnect: stop routing and close every connection (replicas keep running)."""
        if self._closed:
            return
        token, closing = self._token, self._closing
        if token is not None and closing is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(closing.set, trio_token=token)
        self._closed = True
        self._thread.join()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(store: str | os.PathLike[str] = DEFAULT_STORE, **options: Any) -> SyncClient:
    """Connect to the ``servecore run`` serving ``store`` (its ``--store``) from
    another process, and query its endpoints from here::

        with servecore.connect(".servecore/state.db") as client:
            print(client.get_handle("echo").call("hi"))

    Queries go straight to the replicas (the subprocess runtime's processes on this
    host, or the Ray runtime's actors, from any machine that reaches the cluster), not
    through the controller, and keep working while the controller is down. The
    options are :func:`open_client`'s; the async form, for trio, is
    :func:`open_client`.
    """
    return SyncClient(store, **options)
