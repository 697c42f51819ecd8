"""Load reported by routers in other processes (docs/design.md §5, "Load from everywhere").

A client of ``servecore.connect`` runs its own router; every
:data:`LOAD_REPORT_INTERVAL_S` it reports that router's ongoing queries per backend to
the controller (the control socket's ``load`` op). :class:`RemoteLoad` keeps each
reporter's latest report with the time it arrived, by the controller's clock (never
the reporter's: clocks of two processes need not agree), and sums the live ones. A
reporter not heard from for :data:`STALE_AFTER_S` (three report intervals) is aged
out: a client that exited, hung or lost the socket stops counting, rather than
holding its last load up forever. A client with nothing ongoing stops reporting after
one report of zero, and is aged out like one that went away: the same thing to the
autoscaler.

Reports live in memory only, like the controller's own samples: a restarted controller
counts a client again from its next report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from servecore._core.errors import InvalidConfig

__all__ = [
    "LOAD_REPORT_INTERVAL_S",
    "MAX_REPORTERS",
    "STALE_AFTER_S",
    "RemoteLoad",
    "check_load_report",
]

#: How often a connected client reports its router's load (while it has any).
LOAD_REPORT_INTERVAL_S = 0.5
#: A reporter whose last report is older than this stops counting.
STALE_AFTER_S = 3 * LOAD_REPORT_INTERVAL_S
#: The most reporters counted at once (each report names its reporter).
MAX_REPORTERS = 4096
#: The longest reporter id, and the most backends one report may name.
MAX_REPORTER_CHARS = 200
MAX_REPORT_BACKENDS = 4096


def check_load_report(
    reporter: Any, ongoing: Any, wake: Any
) -> tuple[str, dict[str, int], tuple[str, ...]]:
    """``(reporter, ongoing, wake)`` checked; ``InvalidConfig`` naming what is wrong."""
    if not isinstance(reporter, str) or not 0 < len(reporter) <= MAX_REPORTER_CHARS:
        raise InvalidConfig(
            "reporter",
            reporter,
            f"a load reporter is named by a non-empty string of at most "
            f"{MAX_REPORTER_CHARS} characters, the same in each of its reports",
        )
    if not isinstance(ongoing, Mapping) or len(ongoing) > MAX_REPORT_BACKENDS:
        raise InvalidConfig(
            "ongoing",
            type(ongoing).__name__,
            f"a load report's ongoing is a mapping of backend to queries "
            f"(at most {MAX_REPORT_BACKENDS} backends)",
        )
    counts: dict[str, int] = {}
    for tag, n in ongoing.items():
        if not isinstance(tag, str) or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidConfig(
                f"ongoing[{tag!r}]",
                n,
                "each backend's ongoing queries are a whole number >= 0",
            )
        counts[tag] = n
    if isinstance(wake, str) or not isinstance(wake, Iterable):
        raise InvalidConfig("wake", wake, "wake is a list of backend names")
    woken = tuple(wake)
    if len(woken) > MAX_REPORT_BACKENDS or not all(isinstance(t, str) for t in woken):
        raise InvalidConfig("wake", woken, "wake is a list of backend names")
    return reporter, counts, woken


class RemoteLoad:
    """The latest load report of each live reporter, summed per backend.

    ``clock()`` is the controller's clock; reports older than ``stale_after_s`` by it
    are aged out whenever the load is read.
    """

    def __init__(self, *, clock: Callable[[], float], stale_after_s: float = STALE_AFTER_S):
        self._clock = clock
        self.stale_after_s = stale_after_s
        #: reporter -> (when its last report arrived, its ongoing queries per backend)
        self._reports: dict[str, tuple[float, dict[str, int]]] = {}

    def report(self, reporter: str, ongoing: Mapping[str, int]) -> None:
        """Keep ``ongoing`` as ``reporter``'s load from now on (replacing its last)."""
        if reporter not in self._reports and len(self._reports) >= MAX_REPORTERS:
            self._age_out()
            if len(self._reports) >= MAX_REPORTERS:
                raise InvalidConfig(
                    "reporter",
                    reporter,
                    f"the controller already counts {MAX_REPORTERS} live load reporters; "
                    f"try again once some have gone quiet (after {self.stale_after_s:g}s)",
                )
        self._reports[reporter] = (self._clock(), {t: n for t, n in ongoing.items() if n})

    def ongoing(self) -> dict[str, int]:
        """Queries ongoing per backend, summed over every live reporter."""
        self._age_out()
        total: dict[str, int] = {}
        for _, counts in self._reports.values():
            for tag, n in counts.items():
                total[tag] = total.get(tag, 0) + n
        return total

    def reporters(self) -> dict[str, dict[str, int]]:
        """Each live reporter's last report (for status and tests)."""
        self._age_out()
        return {r: dict(counts) for r, (_, counts) in sorted(self._reports.items())}

    def _age_out(self) -> None:
        horizon = self._clock() - self.stale_after_s
        for reporter in [r for r, (at, _) in self._reports.items() if at < horizon]:
            del self._reports[reporter]
