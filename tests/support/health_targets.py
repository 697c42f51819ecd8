"""Targets whose ``check_health()`` misbehaves, for every runtime (what they do is
decided by the queries they get, never by module state shared across processes)."""

from __future__ import annotations

import threading
import time
from typing import Any


class HangsInCheck:
    """Healthy until it is asked ``"hang"``; from then on ``check_health()`` never
    returns (it sleeps for an hour, in a process that is killed long before). A query
    ``("sleep", seconds)`` takes that long, holding the replica's turn."""

    def __init__(self) -> None:
        self.hang = threading.Event()

    def check_health(self) -> None:
        if self.hang.is_set():
            time.sleep(3600)

    def __call__(self, value: Any = None, seconds: float = 0.0) -> Any:
        if value == "hang":
            self.hang.set()
        if value == "sleep":
            time.sleep(seconds)
        return value
