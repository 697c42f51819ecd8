"""Targets that report the deadline they run under (docs/design.md §5, "Deadlines").

They work in every runtime: what they saw is returned, or written to files a test
names, never kept in module state (a subprocess replica has its own).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import servecore
from servecore.runtimes.toolkit import batch


def remaining(value: Any = None) -> float | None:
    """The time left for this query, as user code sees it."""
    return servecore.time_remaining()


async def async_remaining(value: Any = None) -> float | None:
    """:func:`remaining`, on the replica's asyncio loop."""
    return servecore.time_remaining()


@batch
def batch_remaining(values: list[Any]) -> list[float | None]:
    """The batch's time left, once per query."""
    left = servecore.time_remaining()
    return [left for _ in values]


def nested(value: Any = None) -> tuple[float | None, float | None]:
    """The time left here, and what endpoint ``remaining`` sees when called from here."""
    here = servecore.time_remaining()
    return here, servecore.get_handle("remaining").call()


class Held:
    """Appends every value it begins to the file ``ran`` (one per line); a value
    starting with ``"hold"`` waits until the file ``gate`` or ``gate.VALUE`` exists (at
    most a minute) before answering."""

    def __init__(self, ran: str, gate: str) -> None:
        self.ran = Path(ran)
        self.gate = gate

    def __call__(self, value: str = "") -> str:
        with self.ran.open("a") as out:
            out.write(f"{value}\n")
        if value.startswith("hold"):
            until = time.monotonic() + 60
            while time.monotonic() < until:
                if os.path.exists(self.gate) or os.path.exists(f"{self.gate}.{value}"):
                    break
                time.sleep(0.005)
        return value


def ran(path: Path) -> list[str]:
    """The values a :class:`Held` began, in order."""
    return path.read_text().split() if path.exists() else []


class HeldStream(Held):
    """A generator: records ``value`` as :class:`Held` does (holding a ``"hold..."``),
    then yields it."""

    def __call__(self, value: str = "") -> Any:  # type: ignore[override]
        yield super().__call__(value)
