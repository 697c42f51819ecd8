"""Targets for the subprocess runtime tests, imported by path (``subprocess_targets:...``)
in replica processes; ``tests/support/`` is on the host's ``sys.path``, which replicas inherit."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import types
from typing import Any

import servecore


class Echo:
    """Returns its argument; ``"pid"`` answers the replica's process id."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def __call__(self, value: Any = None) -> Any:
        if value == "pid":
            return os.getpid()
        return f"{self.prefix}{value}"


class Slow:
    """Sleeps ``seconds`` per call."""

    def __call__(self, seconds: float) -> str:
        time.sleep(seconds)
        return f"slept {seconds}"


class SlowInit:
    """A constructor that takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        time.sleep(seconds)

    def __call__(self) -> str:
        return "ready"


class FailingInit:
    """A constructor that always fails, with a recognisable message."""

    def __init__(self) -> None:
        raise ValueError("constructor failed on purpose")

    def __call__(self) -> None:  # pragma: no cover - never constructed
        return None


class SlowEcho(Echo):
    """An :class:`Echo` whose constructor takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        time.sleep(seconds)
        super().__init__()


class Sickly:
    """Answers calls, but its health check fails once it has served one."""

    def __init__(self) -> None:
        self.served = 0

    def check_health(self) -> None:
        if self.served:
            raise RuntimeError("sick after serving")

    def __call__(self) -> str:
        self.served += 1
        return "served"


class Configurable:
    """Keeps the ``user_config`` given to ``reconfigure``."""

    def __init__(self) -> None:
        self.config: Any = None

    def reconfigure(self, config: Any) -> None:
        self.config = config

    def __call__(self) -> Any:
        return self.config


def read_env(name: str) -> str | None:
    """The replica's environment variable ``name``."""
    return os.environ.get(name)


class CustomError(Exception):
    """An importable exception type with extra state."""

    def __init__(self, code: int) -> None:
        super().__init__(f"custom failure {code}")
        self.code = code


def raise_custom(code: int) -> None:
    """Raise :class:`CustomError`."""
    raise CustomError(code)


def raise_local() -> None:
    """Raise an exception whose class cannot be imported (or pickled) by the host."""

    class LocalError(Exception):
        pass

    raise LocalError("from a class defined in a function")


def unpicklable_result() -> Any:
    """Return something pickle refuses."""
    return threading.Lock()


class _ExitsWhenRebuilt:
    """Pickles fine; unpickling it calls ``sys.exit(3)`` (in the host, which rebuilds it)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (sys.exit, (3,))


def refuse_to_rebuild() -> None:
    """Called by unpickling :class:`_FailsWhenRebuilt`: its rebuilding fails."""
    raise ValueError("this object refuses to be rebuilt")


class _FailsWhenRebuilt:
    def __reduce__(self) -> tuple[Any, ...]:
        return (refuse_to_rebuild, ())


def hostile_result(kind: str) -> Any:
    """A result that pickles in the replica but cannot be rebuilt in the host: ``exit``
    raises SystemExit there, ``fails`` a ValueError, ``replica_only`` is an instance of
    a class whose module only the replica has; ``plain`` is a plain string."""
    if kind == "plain":
        return "plain"
    if kind == "exit":
        return _ExitsWhenRebuilt()
    if kind == "fails":
        return _FailsWhenRebuilt()
    module = sys.modules.setdefault("replica_only_module", types.ModuleType("replica_only_module"))

    class Secret:
        pass

    Secret.__module__ = module.__name__
    Secret.__qualname__ = "Secret"
    module.Secret = Secret  # type: ignore[attr-defined]
    return Secret()


def exit_process() -> None:
    """Let ``SystemExit`` escape the user code: the replica ends, as a thread would."""
    sys.exit(3)


@servecore.batch
def lengths(items: list[str]) -> list[int]:
    """A batch target: one length per item."""
    return [len(item) for item in items]


@servecore.batch
def slow_batch(seconds: list[float]) -> list[str]:
    """A batch target that sleeps the longest of its items' seconds."""
    time.sleep(max(seconds))
    return [f"slept {s}" for s in seconds]


class Meeting:
    """Each call waits at a barrier of ``parties`` and returns its arrival index."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=20)

    def __call__(self) -> int:
        return self.barrier.wait()


class HangingInit:
    """A constructor that never returns."""

    def __init__(self) -> None:
        print("constructing for ever", flush=True)
        while True:
            time.sleep(3600)

    def __call__(self) -> None:  # pragma: no cover - never constructed
        return None


class HangingInitIgnoringTerm:
    """A constructor that ignores SIGTERM, says so in its log, and never returns."""

    def __init__(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        while True:
            time.sleep(3600)

    def __call__(self) -> None:  # pragma: no cover - never constructed
        return None


class CrashSoon:
    """Serves, but a moment after it is ready says why on stderr and exits (code 3)."""

    def __init__(self, why: str, after_s: float = 0.1) -> None:
        def crash() -> None:
            time.sleep(after_s)
            print(f"crash-loop: {why}", file=sys.stderr, flush=True)
            os._exit(3)

        threading.Thread(target=crash, daemon=True).start()

    def __call__(self) -> str:
        return "alive"


class PrintsThenFails:
    """Prints what it is doing, then its constructor fails."""

    def __init__(self) -> None:
        print("loading weights from /nowhere/model.bin", flush=True)
        raise FileNotFoundError("no weights")

    def __call__(self) -> None:  # pragma: no cover - never constructed
        return None


#: A path as a non-UTF-8 file name reads once decoded with surrogateescape.
SURROGATE_PATH = os.fsdecode(b"/data/caf\xe9")


class SurrogateInit:
    """A constructor whose error message holds a lone surrogate."""

    def __init__(self) -> None:
        raise ValueError(f"cannot open {SURROGATE_PATH}")

    def __call__(self) -> None:  # pragma: no cover - never constructed
        return None


def raise_surrogate() -> None:
    """A call whose error message holds a lone surrogate."""
    raise RuntimeError(f"cannot read {SURROGATE_PATH}")


class Gated:
    """Answers ``(pid, value)``, printing ``ran VALUE`` to its log first; a ``"hold"``
    call prints ``holding`` and waits until the file ``gate`` exists."""

    def __init__(self, gate: str) -> None:
        self.gate = gate

    def __call__(self, value: str) -> tuple[int, str]:
        if value == "hold":
            print("holding", flush=True)
            deadline = time.monotonic() + 60
            while not os.path.exists(self.gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        print(f"ran {value}", flush=True)
        return os.getpid(), value
