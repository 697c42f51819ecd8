"""A runtime opened by a test, collecting the events it reports (shared by runtime tests)."""

from __future__ import annotations

from typing import Any

import trio

from servecore import Event, ReplicaDied


class Opened:
    """A runtime opened on a namespace, with the events it reported."""

    def __init__(self, runtime: Any, wait_s: float = 60.0) -> None:
        self.runtime = runtime
        self.events: list[Event] = []
        self.wait_s = wait_s

    async def died(self, tag: str) -> ReplicaDied:
        """The ``ReplicaDied`` reported for ``tag`` (a bounded wait, not a timing check)."""
        with trio.fail_after(self.wait_s):
            while True:
                for e in self.events:
                    if isinstance(e, ReplicaDied) and e.tag == tag:
                        return e
                await trio.sleep(0.005)
