"""Conformance checks any runtime can run against itself (DESIGN §6).

::

    from servecore.testing import check_runtime

    def test_my_runtime_conforms():
        check_runtime(lambda: MyRuntime(...), kill=lambda rt, tag: rt.kill_for_test(tag))
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import trio

from servecore._core import BackendConfig, Event, ReplicaDied, StartReplica
from servecore.runtimes import Query, Runtime

__all__ = ["check_runtime"]

_TARGETS = "servecore.testing.targets"


def _effect(tag: str, target: str, **options: Any) -> StartReplica:
    return StartReplica(
        tag=tag,
        backend=tag.rsplit("#", 1)[0],
        target=f"{_TARGETS}:{target}",
        init_args=(),
        init_kwargs={},
        config=BackendConfig(graceful_shutdown_timeout_s=2.0, runtime_options=options),
    )


def check_runtime(
    factory: Callable[[], Runtime],
    *,
    kill: Callable[[Runtime, str], Any] | None = None,
    timeout_s: float = 60.0,
) -> None:
    """Check that ``factory()`` gives a runtime that keeps the Runtime protocol.

    Checked: start returns once the replica answers, and is idempotent by tag (the same
    instance keeps serving); ``list_replicas`` lists exactly what is alive; a user
    exception keeps its type; a failing constructor raises with the replica's own
    message and leaves nothing alive; an unknown ``runtime_options`` key is rejected
    naming the key; stop is idempotent, also for tags never started; and, if ``kill``
    (``kill(runtime, tag)``) is given, a killed replica is reported as ``ReplicaDied``.
    Raises ``AssertionError`` naming the broken promise.
    """
    trio.run(_check, factory, kill, timeout_s)


async def _check(
    factory: Callable[[], Runtime], kill: Callable[[Runtime, str], Any] | None, timeout_s: float
) -> None:
    runtime = factory()
    events: list[Event] = []
    namespace = f"conformance-{uuid.uuid4().hex[:8]}"
    echo, raiser, failing, picky = "echo#0", "raiser#1", "failing#2", "picky#3"
    await runtime.open(namespace=namespace, report=events.append)
    try:
        with trio.fail_after(timeout_s):
            assert not {echo, raiser} & await runtime.list_replicas(), "fresh namespace not empty"

            await runtime.start_replica(_effect(echo, "Echo"))
            assert echo in await runtime.list_replicas(), "started replica not listed"
            result = await runtime.call(echo, [Query(args=("hi",))])
            assert result == ["hi"], f"call returned {result!r}, expected ['hi']"
            (first,) = await runtime.call(echo, [Query(args=("__identity__",))])

            await runtime.start_replica(_effect(echo, "Echo"))
            (again,) = await runtime.call(echo, [Query(args=("__identity__",))])
            assert again == first, "a second start of a live tag started another instance"

            await runtime.start_replica(_effect(raiser, "Raiser"))
            try:
                await runtime.call(raiser, [Query(args=("k",))])
            except KeyError:
                pass
            except Exception as exc:
                assert isinstance(exc.__cause__, KeyError), f"user KeyError came back as {exc!r}"
            else:
                raise AssertionError("a raising replica returned a result")

            try:
                await runtime.start_replica(_effect(failing, "FailingInit"))
            except Exception as exc:
                assert "constructor failed on purpose" in str(exc), (
                    f"start failure lost the replica's own error: {exc!r}"
                )
            else:
                raise AssertionError("a failing constructor did not make start_replica raise")
            assert failing not in await runtime.list_replicas(), "failed replica listed alive"

            try:
                await runtime.start_replica(_effect(picky, "Echo", no_such_option_xyz=1))
            except Exception as exc:
                assert "no_such_option_xyz" in str(exc), f"unknown option not named: {exc!r}"
            else:
                raise AssertionError("an unknown runtime_options key was accepted")
            assert picky not in await runtime.list_replicas()

            await runtime.stop_replica(echo, 2.0)
            assert echo not in await runtime.list_replicas(), "stopped replica still listed"
            await runtime.stop_replica(echo, 2.0)
            await runtime.stop_replica("never#99", 2.0)

            if kill is not None:
                kill(runtime, raiser)
                while not any(isinstance(e, ReplicaDied) and e.tag == raiser for e in events):
                    await trio.sleep(0.01)
                assert raiser not in await runtime.list_replicas(), "dead replica listed"
    finally:
        with trio.CancelScope(shield=True):
            for tag in (echo, raiser, failing, picky):
                with contextlib.suppress(Exception):  # cleanup; the checks already spoke
                    await runtime.stop_replica(tag, 1.0)
            await runtime.close()
