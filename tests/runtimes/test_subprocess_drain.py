"""A replica that is stopping refuses new queries before they begin, and the router
sends them to another replica (docs/design.md §5, "Stopping replicas").

A client whose routing table is a step behind (here: a router in this process, given
the table by hand and never told the replica left) still holds a connection to a
replica the controller is stopping. While that replica drains a query that began
before its SIGTERM, the client's next queries reach it: each is refused unbegun,
answered by the other replica, and the stopping replica's log shows it ran none of
them, while the query it was draining runs there once, to the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from servecore import Event
from servecore._core.maps import Map
from servecore._core.transitions import BackendRoute, Endpoint, RoutingTable
from servecore._serving.remote_runtime import ReplicaClient
from servecore.router import Router
from servecore.runtimes import Query
from servecore.runtimes.subprocess import SubprocessRuntime
from subprocess_helpers import kill_everything_under, replica_effect

pytestmark = pytest.mark.slow

#: Bounded waits, so that a broken build fails instead of hanging; never asserted on.
BOUND_S = 30.0


@pytest.fixture
def rt_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "rt"
    kill_everything_under(tmp_path)


async def _log_shows(path: Path, text: str) -> None:
    with trio.fail_after(BOUND_S):
        while text not in path.read_text():
            await trio.sleep(0.01)


async def test_a_query_sent_to_a_draining_replica_is_refused_and_answered_by_another(
    rt_dir: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    runtime = SubprocessRuntime(rt_dir)
    events: list[Event] = []
    await runtime.open(namespace="drain", report=events.append)
    try:
        for tag in ("b#1", "b#2"):
            await runtime.start_replica(replica_effect(tag, "Gated", str(gate)))
        pids = {tag: runtime.pid(tag) for tag in ("b#1", "b#2")}
        log_2 = Path(str(runtime.replica_info("b#2").log_path))
        stale = RoutingTable(
            endpoints=Map({"e": Endpoint(name="e", traffic={"b": 1.0})}),
            backends=Map({"b": BackendRoute(tag="b", replicas=("b#1", "b#2"))}),
        )
        async with trio.open_nursery() as nursery:
            client, other = ReplicaClient(rt_dir), ReplicaClient(rt_dir)
            client.start(nursery)
            other.start(nursery)
            router = Router(client)
            router.start(nursery)
            router.update(stale)
            handle = router.handle("e")
            # The client has a connection to both replicas (round robin over two).
            assert {(await handle.call(f"warm{i}"))[0] for i in range(2)} == set(pids.values())
            assert client.connected == {"b#1", "b#2"}

            held: list[tuple[int, str]] = []

            async def hold() -> None:
                held.extend(await other.call("b#2", [Query(args=("hold",))]))

            nursery.start_soon(hold)
            await _log_shows(log_2, "holding")
            nursery.start_soon(runtime.stop_replica, "b#2", BOUND_S)
            await _log_shows(log_2, "draining: 1 call(s) in flight")

            # The stale table still names b#2; round robin sends one of these there.
            answers = [await handle.call(f"q{i}") for i in range(4)]
            assert answers == [(pids["b#1"], f"q{i}") for i in range(4)]
            log_text = log_2.read_text()
            assert "refused a call: draining (1 so far)" in log_text
            assert not any(f"ran q{i}" in log_text for i in range(4))

            gate.touch()  # the query that began before the stop runs to its end, once
            with trio.fail_after(BOUND_S):
                while runtime.pid("b#2") is not None:
                    await trio.sleep(0.01)
            assert held == [(pids["b#2"], "hold")]
            assert await handle.call("after") == (pids["b#1"], "after")
            nursery.cancel_scope.cancel()
        client.close()
        other.close()
    finally:
        await runtime.close()
    assert not events  # a stop is not a death
