"""Conformance checks any runtime can run against itself (docs/design.md §6).

::

    from servecore.testing import check_runtime

    def test_my_runtime_conforms():
        check_runtime(lambda: MyRuntime(...), kill=lambda rt, tag: rt.kill_for_test(tag))

Every promise of the Runtime protocol that the runtime breaks comes back as an
``AssertionError`` that names the promise and carries the runtime's own error as its
cause, never as the runtime's bare exception.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from servecore._core.transitions import BackendConfig, Event, ReplicaDied, StartReplica
from servecore._core.values import backend_of
from servecore.runtimes import Query, Runtime, close_runtime, open_runtime

__all__ = ["check_runtime"]

_TARGETS = "servecore.testing.targets"


def _effect(tag: str, target: str, **options: Any) -> StartReplica:
    return StartReplica(
        tag=tag,
        backend=backend_of(tag),
        target=f"{_TARGETS}:{target}",
        init_args=(),
        init_kwargs={},
        config=BackendConfig(graceful_shutdown_timeout_s=2.0, runtime_options=options),
    )


@contextlib.contextmanager
def _promise(what: str) -> Iterator[None]:
    """Turn any exception the runtime raises while keeping ``what`` into an assertion."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as exc:
        text = str(exc)
        own = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        raise AssertionError(f"{what}: the runtime raised {own}") from exc


def check_runtime(
    factory: Callable[[], Runtime],
    *,
    kill: Callable[[Runtime, str], Awaitable[object] | object] | None = None,
    timeout_s: float = 60.0,
) -> None:
    """Check that ``factory()`` gives a runtime that keeps the Runtime protocol.

    Checked, each as a named promise:

    * a fresh namespace lists no replica;
    * start returns once the replica answers, and is idempotent by tag (the same
      instance keeps serving); ``list_replicas`` lists exactly what is alive;
    * a ``@servecore.batch`` target gets its batch as a list;
    * a user exception keeps its type (or is the ``__cause__``);
    * a failing constructor raises with the replica's own message and leaves nothing
      alive; an unknown ``runtime_options`` key is refused, naming the key;
    * stop is idempotent, also for tags never started (no ``KeyError``), and a stopped
      replica is not reported dead;
    * if ``kill`` (``kill(runtime, tag)``, which may return an awaitable) is given, a
      killed replica is reported as ``ReplicaDied`` *before* ``kill`` returns, and is
      no longer listed;
    * every event is reported on the trio thread the runtime was opened on, and only
      ``ReplicaDied`` events for replicas that died.

    ``open`` and ``close`` are optional, as in the protocol. Raises ``AssertionError``
    naming the broken promise.
    """
    trio.run(_check, factory, kill, timeout_s)


async def _check(
    factory: Callable[[], Runtime],
    kill: Callable[[Runtime, str], Any] | None,
    timeout_s: float,
) -> None:
    with _promise("factory() must build a runtime"):
        runtime = factory()
    events: list[Event] = []
    off_thread: list[Event] = []
    trio_thread = threading.get_ident()

    def report(event: Event) -> None:
        if threading.get_ident() != trio_thread:
            off_thread.append(event)
        events.append(event)

    namespace = f"conformance-{uuid.uuid4().hex[:8]}"
    echo, raiser, failing, picky, batcher = "echo#0", "raiser#1", "failing#2", "picky#3", "b#4"
    tags = (echo, raiser, failing, picky, batcher)
    with _promise("open(namespace=..., report=...) must attach to a fresh namespace"):
        await open_runtime(runtime, namespace=namespace, report=report)
    try:
        with trio.fail_after(timeout_s):
            await _check_protocol(runtime, kill, events, tags)
        assert not off_thread, (
            f"events must be reported on the trio thread the runtime was opened on; "
            f"these came from another thread: {off_thread}; use "
            f"trio.from_thread.run_sync(report, event, trio_token=token)"
        )
        unexpected = [e for e in events if not (isinstance(e, ReplicaDied) and e.tag == raiser)]
        assert not unexpected, (
            f"only deaths of replicas that died are reported (start failures are raised, "
            f"stops are not news); got {unexpected}"
        )
    finally:
        with trio.CancelScope(shield=True):
            for tag in tags:
                with contextlib.suppress(Exception):  # cleanup; the checks already spoke
                    await runtime.stop_replica(tag, 1.0)
            with _promise("close() must detach cleanly"):
                await close_runtime(runtime)


async def _check_protocol(
    runtime: Runtime, kill: Callable[[Runtime, str], Any] | None, events: list[Event], tags: Any
) -> None:
    echo, raiser, failing, picky, batcher = tags
    with _promise("list_replicas() must list the tags alive"):
        assert not set(tags) & await runtime.list_replicas(), "a fresh namespace is not empty"

    with _promise(f"start_replica({echo}) must start a replica of Echo"):
        await runtime.start_replica(_effect(echo, "Echo"))
    with _promise("list_replicas() must list the tags alive"):
        assert echo in await runtime.list_replicas(), "a started replica is not listed"
    with _promise(f"call({echo}, batch) must return one result per query"):
        result = await runtime.call(echo, [Query(args=("hi",))])
        assert result == ["hi"], f"call returned {result!r}, expected ['hi']"
        (first,) = await runtime.call(echo, [Query(args=("__identity__",))])

    with _promise(f"start_replica({echo}) again must be a no-op (idempotent by tag)"):
        await runtime.start_replica(_effect(echo, "Echo"))
        (again,) = await runtime.call(echo, [Query(args=("__identity__",))])
    assert again == first, "a second start of a live tag started another instance"

    batched = _effect(batcher, "echo_all")
    batched = StartReplica(
        tag=batched.tag,
        backend=batched.backend,
        target=batched.target,
        init_args=(),
        init_kwargs={},
        config=batched.config.evolve(max_batch_size=4),
    )
    with _promise("a @servecore.batch target must take max_batch_size and get lists"):
        await runtime.start_replica(batched)
        got = await runtime.call(batcher, [Query(args=(1,)), Query(args=(2,))])
    assert got == [1, 2], f"a batch of [1, 2] to a batch target gave {got!r}"

    with _promise(f"start_replica({raiser}) must start a replica of Raiser"):
        await runtime.start_replica(_effect(raiser, "Raiser"))
    try:
        await runtime.call(raiser, [Query(args=("k",))])
    except KeyError:
        pass
    except Exception as exc:
        assert isinstance(exc.__cause__, KeyError), f"a user KeyError came back as {exc!r}"
    else:
        raise AssertionError("a raising replica returned a result")

    try:
        await runtime.start_replica(_effect(failing, "FailingInit"))
    except Exception as exc:
        assert "constructor failed on purpose" in str(exc), (
            f"a start failure must carry the replica's own error; got {exc!r}"
        )
    else:
        raise AssertionError("a failing constructor did not make start_replica raise")
    with _promise("list_replicas() must list the tags alive"):
        assert failing not in await runtime.list_replicas(), "a failed replica is listed"

    try:
        await runtime.start_replica(_effect(picky, "Echo", no_such_option_xyz=1))
    except Exception as exc:
        assert "no_such_option_xyz" in str(exc), (
            f"an unknown runtime_options key must be refused by name; got {exc!r}"
        )
    else:
        raise AssertionError("an unknown runtime_options key was accepted")
    with _promise("list_replicas() must list the tags alive"):
        assert picky not in await runtime.list_replicas(), "a refused replica is listed"

    with _promise(f"stop_replica({echo}) must stop it"):
        await runtime.stop_replica(echo, 2.0)
        assert echo not in await runtime.list_replicas(), "a stopped replica is still listed"
    with _promise(f"stop_replica({echo}) again must be a quiet no-op (idempotent)"):
        await runtime.stop_replica(echo, 2.0)
    with _promise("stop_replica of a tag never started must be a quiet no-op"):
        await runtime.stop_replica("never#99", 2.0)
    with _promise(f"stop_replica({batcher}) must stop it"):
        await runtime.stop_replica(batcher, 2.0)
    await trio.sleep(0.05)  # let a (wrong) death report of a stopped replica arrive
    stopped = [e for e in events if isinstance(e, ReplicaDied) and e.tag in (echo, batcher)]
    assert not stopped, f"a stopped replica must not be reported dead: {stopped}"

    if kill is not None:
        with _promise(f"kill(runtime, {raiser!r}) must kill the replica"):
            result = kill(runtime, raiser)
            if inspect.isawaitable(result):
                await result
        died = [e for e in events if isinstance(e, ReplicaDied) and e.tag == raiser]
        assert died, (
            f"kill(runtime, {raiser!r}) returned before ReplicaDied({raiser!r}) was "
            f"reported; a kill hook must report the death before it returns"
        )
        with _promise("list_replicas() must list the tags alive"):
            assert raiser not in await runtime.list_replicas(), "a dead replica is listed"
