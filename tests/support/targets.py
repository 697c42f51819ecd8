"""Module-level targets for the router, threads-runtime and sync-facade tests.

Replicas of the threads runtime live in this process, so targets report what they saw
through module-level registries, and tests steer them through module-level gates. Each
test uses its own names (keys) so tests never see each other's records.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from typing import Any

from servecore.runtimes.toolkit import batch

_lock = threading.Lock()
_ordinals = itertools.count()

#: name -> every value a Recorder / BatchRecorder of that name received.
RECORDS: defaultdict[str, list[Any]] = defaultdict(list)
#: name -> the size of every batch a BatchRecorder of that name received.
BATCH_SIZES: defaultdict[str, list[int]] = defaultdict(list)


def record(name: str, value: Any) -> None:
    with _lock:
        RECORDS[name].append(value)


def records(name: str) -> list[Any]:
    with _lock:
        return list(RECORDS[name])


class Gate:
    """A named pair of events: ``entered`` (a query arrived) and ``release``."""

    _gates: dict[str, Gate] = {}

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.count = 0

    @classmethod
    def named(cls, name: str) -> Gate:
        with _lock:
            if name not in cls._gates:
                cls._gates[name] = cls()
            return cls._gates[name]


class Named:
    """Returns ``(name, value)``: which backend answered."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, value: Any = None) -> Any:
        return (self.name, value)


class Identity:
    """Returns ``(instance ordinal, value)``: which replica answered."""

    def __init__(self) -> None:
        self.ordinal = next(_ordinals)

    def __call__(self, value: Any = None) -> Any:
        return (self.ordinal, value)


class Recorder:
    """Records every value under ``name``; raises ``ValueError`` if ``fail``."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail

    def __call__(self, value: Any = None) -> Any:
        record(self.name, value)
        if self.fail:
            raise ValueError(f"shadow {self.name} fails on purpose")
        return ("recorder", value)


class CustomError(LookupError):
    """A user exception type the tests expect back unchanged."""


class Raiser:
    """Raises :class:`CustomError` carrying the value."""

    def __call__(self, value: Any = None) -> Any:
        raise CustomError(f"no such thing: {value!r}")


class Gated:
    """Blocks every query on the gate ``name`` until the test releases it.

    Returns ``(instance ordinal, value)``.
    """

    def __init__(self, name: str) -> None:
        self.gate = Gate.named(name)
        self.ordinal = next(_ordinals)

    def __call__(self, value: Any = None) -> Any:
        self.gate.entered.release()
        if not self.gate.release.wait(timeout=30):
            raise TimeoutError("the test never released the gate")
        return (self.ordinal, value)


@batch
class BatchRecorder:
    """A batch target: records batch sizes under ``name``, returns each value doubled."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, values: list[Any]) -> list[Any]:
        with _lock:
            BATCH_SIZES[self.name].append(len(values))
        return [v * 2 for v in values]


@batch
def double_all(values: list[Any]) -> list[Any]:
    """A batch-capable plain function."""
    return [v * 2 for v in values]


class ShortBatch:
    """A batch target (on ``__call__``) that drops the last result: a broken contract."""

    @batch
    def __call__(self, values: list[Any]) -> list[Any]:
        return values[:-1]


def plain(value: Any) -> Any:
    """A plain function target."""
    return value


async def async_target(value: Any) -> Any:
    """An async function target (served on the replica's asyncio loop)."""
    return value


class FailingInit:
    """A constructor that fails with a recognisable message."""

    def __init__(self) -> None:
        raise ValueError("model weights not found at /nowhere")

    def __call__(self, value: Any = None) -> Any:  # pragma: no cover - never built
        return value


class Mortal:
    """A replica that can be made to die.

    ``"sicken"`` makes its next ``check_health()`` fail; ``"exit"`` raises
    ``SystemExit`` (a crash); anything else returns ``(ordinal, value)``.
    """

    def __init__(self) -> None:
        self.ordinal = next(_ordinals)
        self.sick = False

    def check_health(self) -> None:
        if self.sick:
            raise RuntimeError(f"replica {self.ordinal} is sick")

    def __call__(self, value: Any = None) -> Any:
        if value == "sicken":
            self.sick = True
        elif value == "exit":
            raise SystemExit(3)
        return (self.ordinal, value)


class Configurable:
    """Returns the ``user_config`` it was reconfigured with."""

    def __init__(self) -> None:
        self.config: Any = None

    def reconfigure(self, config: Any) -> None:
        self.config = config

    def __call__(self, _value: Any = None) -> Any:
        return self.config


#: What one query of :func:`slow_echo` costs: long enough that a few closed-loop
#: callers keep several replicas busy, short enough for a quick test.
SERVICE_S = 0.02


def slow_echo(value: Any) -> Any:
    """Return ``value`` after a fixed service time (load for autoscaling tests)."""
    time.sleep(SERVICE_S)
    return value
