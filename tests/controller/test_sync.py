"""The synchronous facade: ``servecore.start`` from plain threads."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import targets
from servecore._controller.sync import SyncController, start
from servecore._core.errors import (
    ControllerClosed,
    EndpointExists,
    NoReplicaError,
    ReplicaDiedError,
    ServecoreError,
    StoreLocked,
)
from servecore.router import Router
from servecore.runtimes.threads import ThreadRuntime
from servecore.stores import SQLiteStore


@pytest.fixture
def ctl() -> Any:
    with start(runtime=ThreadRuntime(), name="sync-tests") as controller:
        yield controller


def test_commands_block_and_handles_answer(ctl: SyncController) -> None:
    ctl.create_backend("n", targets.Named, init_args=["n"], num_replicas=2)
    ctl.create_endpoint("e")
    ctl.set_traffic("e", {"n": 1.0})
    assert len(ctl.routing_table.backends["n"].replicas) == 2  # RUNNING on return
    assert ctl.get_handle("e").call(1) == ("n", 1)
    assert ctl.get_handle("e").call(value=2) == ("n", 2)
    assert ctl.seq >= 3
    ctl.update_backend_config("n", num_replicas=1)
    assert len(ctl.state.replicas) == 1


def test_handles_from_many_threads_at_once(ctl: SyncController) -> None:
    ctl.create_backend("i", targets.Identity, num_replicas=3)
    ctl.create_endpoint("many")
    ctl.set_traffic("many", {"i": 1.0})
    handle = ctl.get_handle("many")
    start_line = threading.Barrier(8)

    def client(k: int) -> list[Any]:
        start_line.wait(timeout=10)
        own = ctl.get_handle("many")  # handles may also be made from any thread
        return [(handle if j % 2 else own).call((k, j)) for j in range(100)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(client, range(8)))
    for k, results in enumerate(answers):
        assert [value for _, value in results] == [(k, j) for j in range(100)]
    replicas_used = {ordinal for results in answers for ordinal, _ in results}
    assert len(replicas_used) == 3


def test_errors_keep_their_types(ctl: SyncController) -> None:
    ctl.create_backend("r", targets.Raiser)
    ctl.create_endpoint("err")
    with pytest.raises(EndpointExists):
        ctl.create_endpoint("err", route="/other")
    with pytest.raises(NoReplicaError, match="no traffic"):
        ctl.get_handle("err").call(1)
    ctl.set_traffic("err", {"r": 1.0})
    with pytest.raises(targets.CustomError, match="no such thing"):
        ctl.get_handle("err").call("x")


def test_a_timeout_from_a_thread(ctl: SyncController) -> None:
    gate = targets.Gate.named("sync-timeout")
    ctl.create_backend("g", targets.Gated, init_args=["sync-timeout"])
    ctl.create_endpoint("slow")
    ctl.set_traffic("slow", {"g": 1.0})
    try:
        with pytest.raises(TimeoutError):
            ctl.get_handle("slow").options(timeout_s=0.05).call(1)
    finally:
        gate.release.set()
    assert ctl.get_handle("slow").call(2)[1] == 2


def test_a_seeded_router() -> None:
    def run() -> list[str]:
        runtime = ThreadRuntime()
        with start(runtime=runtime, name="sync-seeded") as c:
            c.use_router(Router(runtime, rng=random.Random(3)))
            c.create_backend("a", targets.Named, init_args=["a"])
            c.create_backend("b", targets.Named, init_args=["b"])
            c.create_endpoint("e")
            c.set_traffic("e", {"a": 0.5, "b": 0.5})
            h = c.get_handle("e")
            return [h.call(i)[0] for i in range(100)]

    assert run() == run()


def test_close_is_idempotent_and_final() -> None:
    c = start(runtime=ThreadRuntime(), name="sync-close")
    c.create_backend("n", targets.Named, init_args=["n"])
    c.create_endpoint("e")
    c.set_traffic("e", {"n": 1.0})
    handle = c.get_handle("e")
    c.close()
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.create_endpoint("x")
    with pytest.raises(RuntimeError, match="closed"):
        handle.call(1)


def test_restart_from_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with start(store=SQLiteStore(path), name="sync-restart") as c:
        c.create_backend("n", targets.Named, init_args=["n"], num_replicas=2)
        c.create_endpoint("e")
        c.set_traffic("e", {"n": 1.0})
        seq = c.seq
        with pytest.raises(StoreLocked):
            start(store=SQLiteStore(path), name="sync-restart-2")
    with start(store=SQLiteStore(path), name="sync-restart") as c:
        assert c.seq > seq  # recovery saved a new checkpoint
        assert set(c.state.backends) == {"n"}
        assert len(c.routing_table.backends["n"].replicas) == 2
        assert c.get_handle("e").call(5) == ("n", 5)


def test_sync_handles_take_every_path(ctl: SyncController) -> None:
    """Direct to a free replica, or through trio: queued, batched, shadowed, dead."""
    ctl.create_backend("one", targets.Identity, max_concurrent_queries=1)
    ctl.create_backend("copy", targets.Recorder, init_args=["sync-shadow"])
    ctl.create_backend(
        "b",
        targets.BatchRecorder,
        init_args=["sync-batches"],
        max_batch_size=4,
        batch_wait_timeout_s=0.02,
    )
    ctl.create_backend("m", targets.Mortal)
    for name, backend in (("one", "one"), ("b", "b"), ("m", "m")):
        ctl.create_endpoint(name)
        ctl.set_traffic(name, {backend: 1.0})
    ctl.set_shadow_traffic("one", "copy", 1.0)

    one, batched = ctl.get_handle("one"), ctl.get_handle("b")
    with ThreadPoolExecutor(max_workers=8) as pool:
        # One slot, eight threads: most queries queue in trio behind the direct ones.
        assert [v for _, v in pool.map(one.call, range(80))] == list(range(80))
        assert list(pool.map(batched.call, range(40))) == [2 * i for i in range(40)]
    sizes = targets.BATCH_SIZES["sync-batches"]
    assert sum(sizes) == 40 and max(sizes) <= 4

    deadline = threading.Event()
    for _ in range(1000):  # shadow copies are sent without delaying the caller
        if len(targets.records("sync-shadow")) == 80:
            break
        deadline.wait(0.01)
    assert sorted(targets.records("sync-shadow")) == list(range(80))

    with pytest.raises(ReplicaDiedError, match="SystemExit"):
        ctl.get_handle("m").call("exit")
    ctl.update_backend_config("one", num_replicas=0)
    with pytest.raises(NoReplicaError, match="no running replica"):
        one.call(1)


def test_close_fails_queries_in_flight_with_typed_errors() -> None:
    gate = targets.Gate.named("sync-close-in-flight")
    c = start(runtime=ThreadRuntime(), name="sync-close-in-flight")
    c.create_backend(
        "g", targets.Gated, init_args=["sync-close-in-flight"], max_concurrent_queries=1
    )
    c.create_endpoint("e")
    c.set_traffic("e", {"g": 1.0})
    handle = c.get_handle("e")
    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(handle.call, i) for i in range(4)]
        assert gate.entered.acquire(timeout=30)  # one query runs, the others wait
        closing = pool.submit(c.close)
        gate.release.set()
        closing.result(timeout=30)
        outcomes = [call.exception(timeout=30) or call.result() for call in calls]
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    # Each query either finished or failed with a servecore error saying why: never a
    # bare RuntimeError that reads as a bug in the caller's code.
    assert all(isinstance(f, ServecoreError) for f in failures), failures
    with pytest.raises(ControllerClosed, match=r"closed.*open a new controller"):
        handle.call(9)
    with pytest.raises(ControllerClosed):
        c.create_endpoint("x")


def test_a_slot_freed_just_before_a_query_queues_is_not_lost(
    ctl: SyncController, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host thread's direct query may end (and free its replica slot, seeing no
    queue) after a query in trio found no free slot and before it joined the queue:
    the queued query still gets the slot, instead of waiting for a release that has
    already happened."""
    ctl.create_backend(
        "g", targets.Gated, init_args=["sync-freed-before-queueing"], max_concurrent_queries=1
    )
    ctl.create_endpoint("g")
    ctl.set_traffic("g", {"g": 1.0})
    handle = ctl.get_handle("g")
    gate = targets.Gate.named("sync-freed-before-queueing")
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="caller")
    try:
        first = pool.submit(handle.call, "first")  # direct: it holds the only slot
        assert gate.entered.acquire(timeout=10)
        b = ctl.router.backend_state("g")
        assert b is not None
        acquire = b.acquire

        def slot_freed_right_after_looking(limit: int, model: str | None = None) -> str | None:
            if threading.current_thread().name.startswith("caller") or b.n_waiting:
                return acquire(limit, model)
            # The trio thread looks before the query has queued: the slot is taken,
            # and the first query ends right after the look.
            if not gate.release.is_set():
                gate.release.set()
                first.result(timeout=10)
            return None

        monkeypatch.setattr(b, "acquire", slot_freed_right_after_looking)
        second = pool.submit(handle.call, "second")
        assert first.result(timeout=10)[1] == "first"
        assert second.result(timeout=10)[1] == "second"
    finally:
        # Not waiting for a query that may hang: closing the controller fails it.
        pool.shutdown(wait=False)
