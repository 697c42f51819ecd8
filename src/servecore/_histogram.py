"""A cumulative-bucket histogram in the Prometheus shape, with no dependency.

Shared by the controller's lifecycle counters and the router's query statistics, and
exported by :mod:`servecore.metrics` at scrape time.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

__all__ = ["Histogram"]


class Histogram:
    """Cumulative-bucket histogram in the Prometheus shape, with no dependency."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(upper bound as text, observations <= it), ..., ("+Inf", count)]``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out
