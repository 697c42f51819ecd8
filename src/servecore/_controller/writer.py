"""The writer thread: store calls, one at a time, off the trio thread.

A store call is blocking I/O (an fsync, a round trip to a database), so the controller
hands it to one long-lived thread (:class:`Writer`) and waits for its :class:`Answer`.
One thread means the store sees its calls in the order they were made. The wait can be
given up on (the controller's ``store_call_timeout_s``) while the call itself goes on:
a blocking call cannot be interrupted, so its answer is still delivered, later, to the
same :class:`Answer`, and whoever gave up learns from it what became of the call.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

__all__ = ["Answer", "Writer"]

T = TypeVar("T")


class Answer(Generic[T]):
    """The answer to one call handed to a :class:`Writer`, set on the trio thread."""

    __slots__ = ("_done", "_listeners", "_result", "what")

    def __init__(self, what: str) -> None:
        #: What the call was, in words (``"load"``, ``"commit of checkpoint 7"``).
        self.what = what
        self._result: outcome.Outcome[T] | None = None
        self._done = trio.Event()
        self._listeners: list[Callable[[], None]] = []

    @property
    def answered(self) -> bool:
        """Whether the call has returned or raised."""
        return self._result is not None

    async def wait(self) -> None:
        """Wait until the call has returned or raised."""
        if self._result is None:
            await self._done.wait()

    def unwrap(self) -> T:
        """What the call returned; raises what it raised. Only once answered."""
        assert self._result is not None, "unwrap() before the call was answered"
        return self._result.unwrap()

    def on_answer(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (on the trio thread) once the answer is in."""
        if self._result is not None:
            listener()
        else:
            self._listeners.append(listener)

    def settle(self, result: outcome.Outcome[T]) -> None:
        """Record the call's result and tell whoever waits (the writer does this)."""
        self._result = result
        self._done.set()
        for listener in self._listeners:
            listener()
        self._listeners.clear()


class Writer:
    """One long-lived thread that runs store calls, handed over through a queue.

    Cheaper than ``trio.to_thread.run_sync`` per call (no thread-cache lookup, no
    limiter), and one thread means the store sees its calls in order.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], T], what: str = "a call") -> Answer[T]:
        """Hand ``fn()`` to the writer thread (after the calls handed over before it);
        its answer arrives in the returned :class:`Answer`. Call on the trio thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, name=f"servecore-writer-{self._name}", daemon=True
            )
            self._thread.start()
        answer: Answer[T] = Answer(what)
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[T]) -> None:
            token.run_sync_soon(answer.settle, result)

        self._jobs.put((fn, deliver))
        return answer

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, deliver = job
            result = outcome.capture(fn)
            # If the run is over, the controller is gone: nobody waits for this write.
            with contextlib.suppress(trio.RunFinishedError):
                deliver(result)

    def stop(self) -> None:
        """Let the thread finish after the calls already handed over."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None
