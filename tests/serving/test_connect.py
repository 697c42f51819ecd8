"""Handles in another process: ``servecore.connect`` to a real ``servecore run``.

The controller is a real ``servecore run --runtime subprocess`` (a process of its own,
with a private directory and port); this test process is the other process. It
connects, queries, sees a scale-up arrive as a newer table, SIGKILLs the controller and
keeps querying the replicas it knows. A fake feed (a socket in this test) checks that an
older table is never applied, whatever order the lines come in.

Every process started here is stopped by its pid at the end: the servers, and the
replica processes whose command line names this test's runtime directory.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import servecore
from cli_server import CliServer
from servecore._core.maps import Map
from servecore._core.transitions import BackendRoute, Endpoint, RoutingTable
from servecore._serving.table_feed import VersionedTable, encode_table
from servecore.runtimes.toolkit import DEFAULT_STREAM_WINDOW

pytestmark = pytest.mark.slow

APP = """
[backends.echo]
target = "servecore.testing.targets:Echo"
init_kwargs = {{ prefix = "v1:" }}
num_replicas = {n}

[endpoints.echo]
traffic = {{ echo = 1.0 }}
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CliServer]:
    s = CliServer(tmp_path)
    try:
        yield s
    finally:
        s.stop_everything()


def _replicas(client: servecore.SyncClient) -> tuple[str, ...]:
    return client.routing_table.backends["echo"].replicas


def test_a_connected_handle_queries_sees_a_scale_up_and_outlives_the_controller(
    server: CliServer,
) -> None:
    proc = server.serve(server.write("app.toml", APP.format(n=1)), "--runtime", "subprocess")
    with servecore.connect(server.store) as client:
        echo = client.get_handle("echo")
        assert echo.call("hi") == "v1:hi"
        first = client.seq
        assert len(_replicas(client)) == 1

        # Scale up through the controller: the new table reaches this process.
        applied = server.cli("apply", str(server.write("app2.toml", APP.format(n=2))))
        assert applied.returncode == 0, applied.stderr
        while len(_replicas(client)) < 2:
            client.wait_for_seq(client.seq + 1, timeout_s=60)
        assert client.seq > first
        instances = {echo.call("__identity__") for _ in range(40)}
        assert len(instances) == 2  # least-outstanding spreads over both replicas

        # The controller dies; queries keep going straight to the replicas.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert [echo.call(i) for i in range(20)] == [f"v1:{i}" for i in range(20)]
        seq_before_restart = client.seq

        # A controller on the same store comes back: the feed resumes, never older.
        server.serve(server.write("app3.toml", APP.format(n=2)), "--runtime", "subprocess")
        while not client.feed_connected or client.seq < seq_before_restart:
            with contextlib.suppress(TimeoutError):
                client.wait_for_seq(seq_before_restart, timeout_s=1)
        assert client.seq >= seq_before_restart
        assert echo.call("again") == "v1:again"


AUTOSCALING_APP = """
[backends.slow]
target = "subprocess_targets:Slow"
autoscaling = { min_replicas = 0, max_replicas = 3, target_ongoing_requests = 1.0, \
look_back_period_s = 1.0, upscale_delay_s = 0.5, downscale_delay_s = 600.0 }

[endpoints.slow]
traffic = { slow = 1.0 }
"""


def test_load_from_a_connected_client_wakes_a_backend_at_zero_and_scales_it_up(
    server: CliServer,
) -> None:
    """Only this process sends queries, so only its load reports can move the
    controller's autoscaler: a query at zero replicas wakes the backend, and steady
    load from six callers here scales it up to its maximum."""
    server.serve(server.write("app.toml", AUTOSCALING_APP), "--runtime", "subprocess")
    with servecore.connect(server.store) as client:
        assert client.routing_table.backends["slow"].replicas == ()
        slow = client.get_handle("slow")
        assert slow.call(0.0) == "slept 0.0"  # waited for the replica it woke
        assert client.client.reports_sent >= 1

        stop = threading.Event()
        errors: list[BaseException] = []

        def caller() -> None:
            while not stop.is_set():
                try:
                    slow.call(0.2)
                except BaseException as exc:
                    errors.append(exc)
                    return

        callers = [threading.Thread(target=caller, daemon=True) for _ in range(6)]
        for t in callers:
            t.start()
        try:
            while len(client.routing_table.backends["slow"].replicas) < 3:
                client.wait_for_seq(client.seq + 1, timeout_s=60)
        finally:
            stop.set()
            for t in callers:
                t.join(timeout=60)
        assert not errors


def test_connect_refuses_a_controller_whose_replicas_live_in_its_process(
    server: CliServer,
) -> None:
    server.serve(server.write("app.toml", APP.format(n=1)), "--runtime", "threads")
    with pytest.raises(servecore.ReplicasUnreachable, match=r"'threads' runtime.*another process"):
        servecore.connect(server.store)


def test_connect_without_a_server_says_so(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    with pytest.raises(servecore.ServecoreError, match="no running servecore server"):
        servecore.connect(tmp_path / "state" / "state.db")


# -- an older table is never applied ----------------------------------------------------


def _table(marker: str) -> RoutingTable:
    return RoutingTable(
        endpoints=Map({marker: Endpoint(name=marker, traffic={"b": 1.0})}),
        backends=Map({"b": BackendRoute(tag="b", replicas=("b#1",))}),
    )


class FakeFeed:
    """A control socket that answers each subscription with the next script of lines."""

    def __init__(self, directory: Path, scripts: list[list[VersionedTable]]) -> None:
        self.directory = directory
        self.scripts = scripts
        self.subscriptions = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(directory / "control.sock"))
        self.listener.listen(8)
        self.release = threading.Event()  # the last script's connection stays open until set
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        hello = (
            b'{"ok": true, "feed": 1, "runtime": "subprocess", "directory": "%s"}\n'
            % str(self.directory).encode()
        )
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.subscriptions += 1
            with conn:
                conn.recv(4096)
                if not self.scripts:
                    continue  # close at once: nothing more to say
                conn.sendall(hello + b"".join(encode_table(t) for t in self.scripts.pop(0)))
                if not self.scripts:
                    self.release.wait()

    def close(self) -> None:
        self.release.set()
        self.listener.close()


def test_an_older_table_is_never_applied_whatever_order_lines_arrive_in(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    feed = FakeFeed(
        state,
        [
            # The first subscription: seq 5, then an older seq 3; then the feed ends.
            [
                VersionedTable(seq=5, table=_table("five")),
                VersionedTable(seq=3, table=_table("stale")),
            ],
            # After resubscribing: an older seq 4, then seq 6.
            [
                VersionedTable(seq=4, table=_table("four")),
                VersionedTable(seq=6, table=_table("six")),
            ],
        ],
    )
    try:
        with (
            caplog.at_level(logging.DEBUG, logger="servecore.connect"),
            servecore.connect(state / "state.db") as client,
        ):
            client.wait_for_seq(6, timeout_s=60)
            assert client.seq == 6
            assert set(client.routing_table.endpoints) == {"six"}
            assert feed.subscriptions == 2
        ignored = [r.args[0] for r in caplog.records if r.getMessage().startswith("ignored")]
        assert ignored == [(3, -1), (4, -1)]  # both older lines were read, and refused
    finally:
        feed.close()


def test_a_table_is_taken_only_when_newer_by_seq_then_epoch() -> None:
    old = VersionedTable(seq=7, epoch=2)
    assert VersionedTable(seq=8, epoch=1).newer_than(old)  # a later commit wins
    assert VersionedTable(seq=7, epoch=3).newer_than(old)  # a new leader at the same seq
    assert not VersionedTable(seq=7, epoch=2).newer_than(old)  # the same table again
    assert not VersionedTable(seq=6, epoch=9).newer_than(old)
    assert VersionedTable(seq=0).newer_than(None)


STREAM_APP = """
[backends.counter]
target = "stream_targets:Counter"

[endpoints.count]
traffic = { counter = 1.0 }
"""


def test_a_connected_handle_streams_from_a_subprocess_replica(server: CliServer) -> None:
    app = server.write("app.toml", STREAM_APP)
    server.serve(app, "--runtime", "subprocess", "--workers", "0", "--stop-replicas")
    with servecore.connect(server.store) as client:
        count = client.get_handle("count")
        assert [i for i, _ in count.stream(5)] == [0, 1, 2, 3, 4]
        with count.stream(1000) as items:
            assert next(items)[0] == 0
        with count.stream("stats") as items:
            record = next(items)
        assert 1 <= record["produced"] <= 5 + 1 + DEFAULT_STREAM_WINDOW


STREAM_APP = """
[backends.counter]
target = "stream_targets:Counter"

[endpoints.count]
traffic = { counter = 1.0 }
"""


def test_an_asyncio_program_queries_and_streams_through_open_asyncio_client(
    server: CliServer,
) -> None:
    import asyncio

    app = server.write("app.toml", APP.format(n=1) + STREAM_APP)
    server.serve(app, "--runtime", "subprocess", "--workers", "0")

    async def main() -> None:
        async with servecore.open_asyncio_client(server.store) as client:
            echo = client.get_handle("echo")
            assert await echo.call("hi") == "v1:hi"
            answers = await asyncio.gather(*(echo.call(i) for i in range(50)))
            assert answers == [f"v1:{i}" for i in range(50)]
            assert client.client.seq >= 0
            items = [item[0] async for item in client.get_handle("count").stream(4, 0)]
            assert items == [0, 1, 2, 3]
            with pytest.raises(TimeoutError):
                await client.get_handle("echo").options(timeout_s=1e-9).call("late")
            with pytest.raises(servecore.EndpointNotFound):
                await client.get_handle("nowhere").call(1)

    asyncio.run(main())
