"""Ray's results, delivered into trio from Ray's callback threads.

A reference's completion callback runs on a Ray thread. A lone call waits on an event
fd that the callback signals, which wakes the waiting task straight from trio's I/O
manager; while other calls wait too, results go through :class:`_Deliveries`, so that
results arriving together wake trio once. No thread per call, no polling.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio

from servecore.runtimes._waker import Waker

__all__ = ["Results", "on_done"]


class _Pending:
    """One object reference's result, on its way from Ray's thread to a trio task."""

    __slots__ = ("abandoned", "fired", "lock", "value", "waker")

    def __init__(self, waker: Waker) -> None:
        self.waker = waker
        self.value: Any = None
        self.lock = threading.Lock()
        self.fired = False  # the value is in and the waker signalled
        self.abandoned = False  # the waiting task gave up; the waker is not reused

    def complete(self, value: Any) -> None:
        """(Ray's thread) Store the value and wake the waiting task."""
        with self.lock:
            if self.abandoned:
                self.waker.close()
                return
            self.value = value
            self.fired = True
            self.waker.signal()

    def abandon(self) -> None:
        """(trio thread) The task was cancelled: drop the result, close the waker."""
        with self.lock:
            self.abandoned = True
            if self.fired:
                self.waker.close()


class _Waiter:
    """A trio task waiting for one result through :class:`_Deliveries`."""

    __slots__ = ("task",)

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task: trio.lowlevel.Task | None = task  # None once woken or given up


class _Deliveries:
    """Results handed to trio in batches: one ``run_sync_soon`` per batch.

    While many calls are in flight, waking each through its own fd costs a trio I/O
    pass per result; results that arrive together here cost one pass between them.
    """

    __slots__ = ("items", "lock", "scheduled", "token")

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.lock = threading.Lock()
        self.items: list[tuple[_Waiter, Any]] = []
        self.scheduled = False

    def post(self, waiter: _Waiter, value: Any) -> None:
        """(Ray's thread) Queue ``value`` for ``waiter``; wake trio unless it is due."""
        with self.lock:
            self.items.append((waiter, value))
            if self.scheduled:
                return
            self.scheduled = True
        with contextlib.suppress(trio.RunFinishedError):  # nobody is waiting any more
            self.token.run_sync_soon(self.deliver)

    def deliver(self) -> None:
        """(trio thread) Wake every waiter whose result is in."""
        with self.lock:
            items, self.items = self.items, []
            self.scheduled = False
        for waiter, value in items:
            task = waiter.task
            if task is not None:
                waiter.task = None
                trio.lowlevel.reschedule(task, outcome.Value(value))


def on_done(ref: Any, callback: Callable[[Any], None]) -> None:
    """Call ``callback(value_or_error)`` on a Ray thread once ``ref`` completes."""
    on_completed = getattr(ref, "_on_completed", None)
    if on_completed is not None:
        on_completed(callback)
        return

    # Ray Client references have no _on_completed; their future() works the same way.
    def done(future: Any) -> None:
        error = future.exception()
        callback(error if error is not None else future.result())

    ref.future().add_done_callback(done)


class Results:
    """Awaits Ray object references on one trio loop (see the module docstring)."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._deliveries = _Deliveries(token)
        self._wakers: list[Waker] = []
        self._waiting = 0  # tasks in wait()

    async def wait(self, ref: Any) -> Any:
        """The value of ``ref``, or the Ray error it failed with (returned, not raised).

        The reference's completion callback runs on a Ray thread. A lone call waits on
        an event fd that the callback signals, which wakes this task straight from
        trio's I/O manager; while other calls wait too, results go through
        :class:`_Deliveries`, so that results arriving together wake trio once. If this
        task is cancelled first, the late result is dropped. No thread per call.
        """
        if self._waiting:
            waiter = _Waiter(trio.lowlevel.current_task())
            post = self._deliveries.post
            on_done(ref, lambda value: post(waiter, value))

            def abort(_: Any) -> trio.lowlevel.Abort:
                waiter.task = None
                return trio.lowlevel.Abort.SUCCEEDED

            self._waiting += 1
            try:
                return await trio.lowlevel.wait_task_rescheduled(abort)
            finally:
                self._waiting -= 1
        waker = self._wakers.pop() if self._wakers else Waker()
        pending = _Pending(waker)
        on_done(ref, pending.complete)
        self._waiting += 1
        try:
            await trio.lowlevel.wait_readable(waker.fileno)
        except BaseException:
            pending.abandon()
            raise
        finally:
            self._waiting -= 1
        waker.drain()
        self._wakers.append(waker)
        return pending.value

    def close(self) -> None:
        """Close the pooled wakers (calls still waiting keep theirs)."""
        for waker in self._wakers:
            waker.close()
        self._wakers.clear()
