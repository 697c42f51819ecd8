"""A controller that loses its PostgreSQL lease steps down, and one whose loop is
blocked loses it: the lease is renewed only while the controller's own trio loop runs.

Runs against the private PostgreSQL server of the session (see conftest.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from postgres_setup import postgres_or_skip
from servecore import (
    LeaseLost,
    PostgresStore,
    SteppedDown,
    open_controller,
)
from servecore.http import HTTPIngress
from servecore.testing import InMemoryRuntime
from servecore.testing.postgres import PostgresServer

try:
    import psycopg
except ImportError:  # without the postgres extra there is nothing to test here
    postgres_or_skip(module=True)

ECHO = "servecore.testing.targets:Echo"
#: Short, so that expiry is quick; renewals every third of it.
LEASE_S = 1.0
#: Bounded waits: only so that a broken build fails instead of hanging.
WAIT_S = 30.0


@pytest.fixture
def stores(postgres_server: PostgresServer, checkpoint_name: str) -> Iterator[list[PostgresStore]]:
    made: list[PostgresStore] = []
    yield made
    for store in made:
        store.close()


def new_store(
    stores: list[PostgresStore], server: PostgresServer, checkpoint: str, holder: str
) -> PostgresStore:
    store = PostgresStore(server.dsn, checkpoint=checkpoint, lease_s=LEASE_S, holder=holder)
    stores.append(store)
    return store


async def get(app: HTTPIngress, path: str) -> tuple[int, Any]:
    """One GET through the ASGI app, as a server would send it."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": path, "query_string": b""}, receive, send)
    start, body = sent
    return start["status"], json.loads(body["body"])


async def wait_until_stepped_down(ctl: Any) -> SteppedDown:
    with trio.fail_after(WAIT_S):
        while ctl.stepped_down is None:
            await trio.sleep(0.02)
    return ctl.stepped_down  # type: ignore[no-any-return]


async def test_a_controller_whose_lease_is_taken_steps_down_and_serves_nothing(
    stores: list[PostgresStore], postgres_server: PostgresServer, checkpoint_name: str
) -> None:
    runtime = InMemoryRuntime()
    told: list[SteppedDown] = []
    store = new_store(stores, postgres_server, checkpoint_name, "old")
    async with open_controller(
        runtime=runtime, store=store, resync_interval_s=None, on_step_down=told.append
    ) as ctl:
        await ctl.create_backend("a", ECHO, num_replicas=2)
        await ctl.create_endpoint("api", route="/api")
        await ctl.set_traffic("api", {"a": 1.0})
        handle = ctl.get_handle("api")
        app = HTTPIngress(ctl)
        assert await handle.call("hi") == "hi"
        assert (await get(app, "/-/healthz"))[0] == 200
        assert ctl.stepped_down is None
        # Another controller takes the lease (as a standby that saw it expire would).
        with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE servecore_leases SET holder = 'usurper', epoch = epoch + 1 "
                "WHERE checkpoint = %s",
                (checkpoint_name,),
            )
        stepped = await wait_until_stepped_down(ctl)
        assert told == [stepped]  # the host is told, once
        assert stepped.lease_lost.new_holder == "usurper"
        assert "stepped down" in str(stepped) and store.where in str(stepped)
        # Queries are refused rather than routed by a table that may be stale.
        with pytest.raises(SteppedDown, match="lost its lease"):
            await handle.call("hi")
        with pytest.raises(SteppedDown):
            await ctl.get_handle("api").call("hi")
        status, body = await get(app, "/api")
        assert status == 503 and body["type"] == "SteppedDown"
        status, body = await get(app, "/-/healthz")
        assert status == 503 and body["status"] == "stepped_down"
        # No more effects: a replica that dies is not replaced, a resync does nothing,
        # and commands change nothing.
        state, started = ctl.state, list(runtime.started)
        runtime.kill("a#0")
        await trio.sleep(0.1)
        assert await ctl.resync() is False
        with pytest.raises(LeaseLost, match="stepped down"):
            await ctl.update_backend_config("a", num_replicas=3)
        assert ctl.state is state and runtime.started == started
        assert told == [stepped]


async def test_a_blocked_loop_lets_the_lease_expire_and_a_standby_take_over(
    stores: list[PostgresStore], postgres_server: PostgresServer, checkpoint_name: str
) -> None:
    """The renewer runs on a side thread, yet it renews only while the controller's
    trio loop heartbeats: a loop blocked longer than the lease loses the lease."""
    told: list[SteppedDown] = []
    store = new_store(stores, postgres_server, checkpoint_name, "leader")
    standby = new_store(stores, postgres_server, checkpoint_name, "standby")
    async with open_controller(
        runtime=InMemoryRuntime(), store=store, resync_interval_s=None, on_step_down=told.append
    ) as ctl:
        await ctl.create_backend("a", ECHO, num_replicas=1)
        await trio.sleep(3 * LEASE_S)  # heartbeats coming: the lease is kept meanwhile
        assert ctl.stepped_down is None and store.lease_lost() is None
        waiter = threading.Thread(
            target=standby.open, kwargs={"standby": True, "timeout_s": WAIT_S}
        )
        waiter.start()
        # Block the trio loop (a CPU-bound handler, a blocking call) until the standby
        # holds the lease: without heartbeats the renewer lets it expire.
        waiter.join(WAIT_S)
        assert not waiter.is_alive() and standby.epoch is not None
        assert store.epoch is not None and standby.epoch > store.epoch
        stepped = await wait_until_stepped_down(ctl)
        assert told == [stepped]
        with pytest.raises(LeaseLost):
            await ctl.create_endpoint("late")
    assert "late" not in ctl.state.endpoints
