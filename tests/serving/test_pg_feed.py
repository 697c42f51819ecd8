"""``servecore.open_client`` on a PostgreSQL store: the routing table from the database.

A controller on the subprocess runtime commits to a private PostgreSQL server; a client
in this process follows the checkpoint there (LISTEN/NOTIFY, reads, a slow poll), with
no control socket at all, and queries the replica processes. It sees a scale-up; it
catches up by the poll when notifications are lost; and it follows a second
controller that took the lease (the next epoch), routing on to the replicas that
controller adopted, without a failed query.

Every replica process is stopped by pid at the end (their command line names this
test's runtime directory).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from postgres_setup import postgres_or_skip
from servecore import PostgresStore, open_client, open_controller
from servecore._serving import pg_feed
from servecore.testing.postgres import PostgresServer
from subprocess_helpers import kill_everything_under, replica_processes

try:
    import psycopg  # noqa: F401
except ImportError:
    postgres_or_skip(module=True)

pytestmark = pytest.mark.slow

ECHO = "servecore.testing.targets:Echo"


class Deployment:
    """A state directory (0700) with the runtime directory where ``servecore run`` puts
    it, a checkpoint in the test server's database, and its DSN as ``--store`` takes it."""

    def __init__(self, server: PostgresServer, checkpoint: str, tmp_path: Path) -> None:
        self.server = server
        self.checkpoint = checkpoint
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir(mode=0o700)
        self.replicas = self.state_dir / "replicas"
        self.store_arg = f"{server.dsn}{'&' if '?' in server.dsn else '?'}checkpoint={checkpoint}"

    def store(self, **kwargs: Any) -> PostgresStore:
        return PostgresStore(self.server.dsn, checkpoint=self.checkpoint, lease_s=2.0, **kwargs)

    def controller(self, store: PostgresStore, **kwargs: Any) -> Any:
        return open_controller(
            runtime="subprocess",
            store=store,
            runtime_options={"directory": str(self.replicas)},
            resync_interval_s=None,
            autoscale_interval_s=None,
            **kwargs,
        )

    def client(self) -> Any:
        return open_client(self.store_arg, state_dir=self.state_dir, load_report_interval_s=None)


@pytest.fixture
def deployment(
    postgres_server: PostgresServer, checkpoint_name: str, tmp_path: Path
) -> Iterator[Deployment]:
    found = Deployment(postgres_server, checkpoint_name, tmp_path)
    try:
        yield found
    finally:
        kill_everything_under(found.replicas)


def _replicas_of(client: Any, backend: str) -> tuple[str, ...]:
    route = client.routing_table.backends.get(backend)
    return () if route is None else tuple(route.replicas)


async def _start_echo(ctl: Any, replicas: int) -> None:
    await ctl.create_backend("echo", ECHO, init_kwargs={"prefix": "v1:"}, num_replicas=replicas)
    await ctl.create_endpoint("echo")
    await ctl.set_traffic("echo", {"echo": 1.0})


async def test_a_client_follows_the_checkpoint_in_postgresql(deployment: Deployment) -> None:
    store = deployment.store()
    async with deployment.controller(store) as ctl:
        await _start_echo(ctl, 1)
        async with deployment.client() as client:
            assert client.feed_source == "postgresql"
            assert client.seq == ctl.seq and client.table.epoch == store.epoch
            assert await client.get_handle("echo").call("hi") == "v1:hi"
            await ctl.update_backend_config("echo", num_replicas=2)
            with trio.fail_after(30):
                await client.wait_for_seq(ctl.seq)
            assert len(_replicas_of(client, "echo")) == 2
            answers = {await client.get_handle("echo").call(str(i)) for i in range(6)}
            assert answers == {f"v1:{i}" for i in range(6)}


async def test_a_client_that_hears_no_notification_catches_up_by_polling(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Notifications are lost (the listening connection dropped, say): the slow poll
    still brings every commit, so a client is never stuck on an old table."""
    heard: list[bool] = []

    def deaf(self: Any, timeout_s: float) -> bool:
        # The first wait connects and says so (that read is the one on subscribe);
        # after it, nothing is ever heard.
        first = not heard
        heard.append(first)
        if not first:
            trio.run(trio.sleep, timeout_s)
        return first

    monkeypatch.setattr(pg_feed, "POLL_S", 0.5)
    monkeypatch.setattr("servecore.stores.postgres.CommitListener.wait", deaf)
    async with deployment.controller(deployment.store()) as ctl:
        await _start_echo(ctl, 1)
        async with deployment.client() as client:
            before = client.seq
            await ctl.update_backend_config("echo", num_replicas=2)
            with trio.fail_after(30):
                await client.wait_for_seq(ctl.seq)
            assert client.seq > before and len(_replicas_of(client, "echo")) == 2
    assert heard[0] and not any(heard[1:])


async def test_a_client_follows_the_controller_that_took_the_lease(
    deployment: Deployment,
) -> None:
    """The leader goes (its replicas keep running); a standby takes the lease with the
    next epoch, adopts the same replica processes and commits: the client takes that
    table, and every query meanwhile is answered."""
    leader_store = deployment.store(holder="leader")
    async with deployment.controller(leader_store) as ctl:
        await _start_echo(ctl, 2)
        leader_epoch = leader_store.epoch
        assert leader_epoch is not None
    pids = {key: p.pid for key, p in replica_processes(deployment.replicas).items()}
    assert len(pids) == 2
    answered: list[str] = []
    async with deployment.client() as client, trio.open_nursery() as nursery:
        tags_before = set(_replicas_of(client, "echo"))
        stop = trio.Event()

        async def query() -> None:
            i = 0
            while not stop.is_set():
                answered.append(await client.get_handle("echo").call(str(i)))
                i += 1
                await trio.sleep(0.01)

        nursery.start_soon(query)
        async with deployment.controller(deployment.store(holder="standby"), standby=True) as ctl:
            with trio.fail_after(30):
                await client.wait_for_seq(ctl.seq)
            assert client.table is not None and client.table.epoch == leader_epoch + 1
            assert set(_replicas_of(client, "echo")) == tags_before
            more = len(answered)
            with trio.fail_after(30):
                while len(answered) < more + 10:
                    await trio.sleep(0.05)
            stop.set()
    assert {key: p.pid for key, p in replica_processes(deployment.replicas).items()} == pids
    assert answered == [f"v1:{i}" for i in range(len(answered))]


async def test_a_clients_load_reaches_the_leader_through_the_database(
    deployment: Deployment,
) -> None:
    """A client on a PostgreSQL store reports its load as a row in the database (it
    may be on another host, where the leader's control socket is out of reach); the
    leader's reader (what ``servecore run`` starts) counts it, and ages it out once
    the client stops renewing it."""
    import sys

    from servecore.cli._run import _read_load_reports

    support = str(Path(__file__).resolve().parents[1] / "support")
    sys.path.insert(0, support)  # replicas import their target with the host's path
    store = deployment.store()
    try:
        async with deployment.controller(store) as ctl:
            await ctl.create_backend("slow", "subprocess_targets:Slow", max_concurrent_queries=4)
            await ctl.create_endpoint("slow")
            await ctl.set_traffic("slow", {"slow": 1.0})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_load_reports, ctl, store)
                async with open_client(
                    deployment.store_arg,
                    state_dir=deployment.state_dir,
                    load_report_interval_s=0.1,
                ) as client:
                    assert client.load_table is not None  # not the control socket
                    handle = client.get_handle("slow")
                    async with trio.open_nursery() as queries:
                        for _ in range(3):
                            queries.start_soon(handle.call, 3.0)
                        with trio.fail_after(20):
                            while ctl.remote_load().get(client.reporter) != {"slow": 3}:
                                await trio.sleep(0.05)
                with trio.fail_after(20):  # the client is gone: its row goes stale
                    while client.reporter in ctl.remote_load():
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    finally:
        sys.path.remove(support)


def test_a_load_row_of_the_wrong_shape_is_skipped(deployment: Deployment) -> None:
    from servecore.stores.postgres_load import PostgresLoadReports

    store = deployment.store()
    reports = PostgresLoadReports(store)
    try:
        reports.write("good", {"a": 2}, ["a"])
        conn = store.open_connection()
        try:  # a hostile writer: valid JSON, wrong shape
            conn.execute(
                "INSERT INTO servecore_load (checkpoint, reporter, ongoing, wake) "
                "VALUES (%s, 'bad', '[1, 2]'::jsonb, '{}'::jsonb)",
                (deployment.checkpoint,),
            )
        finally:
            conn.close()
        rows = reports.read(60.0)
        assert [(r.reporter, r.ongoing, r.wake) for r in rows] == [("good", {"a": 2}, ("a",))]
    finally:
        reports.close()
