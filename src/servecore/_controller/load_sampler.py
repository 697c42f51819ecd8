"""Load samples per backend, aggregated over a look-back window (the shell's half of
autoscaling: the policy itself is pure, in :mod:`servecore._core.autoscaling`).

The controller samples the router's ongoing queries (running + queued) per backend at a
fixed interval and, at a lower fixed rate, reports each autoscaling backend's mean over
its ``look_back_period_s`` to the core as a :class:`~servecore.LoadReport`. Samples are
equally spaced, so the plain mean of the samples in the window is the time average.
Samples live in memory only: a restarted controller refills its window from scratch,
while the decision it was counting down towards is in the checkpoint.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

__all__ = ["LoadSampler"]

#: Samples older than this many look-back windows are never needed again.
_KEEP_WINDOWS = 1.0


class LoadSampler:
    """Equally spaced samples of each backend's ongoing queries, with their sums, so a
    window's mean costs O(samples that left the window)."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[tuple[float, int]]] = {}
        self._sums: dict[str, int] = {}

    def add(self, now: float, counts: Mapping[str, int]) -> None:
        """Record ``counts[backend]`` at time ``now`` for every backend given."""
        for tag, n in counts.items():
            self._samples.setdefault(tag, deque()).append((now, n))
            self._sums[tag] = self._sums.get(tag, 0) + n

    def mean(self, tag: str, now: float, window_s: float) -> float:
        """The mean of ``tag``'s samples taken in ``(now - window_s, now]`` (0 if none);
        older samples are dropped."""
        samples = self._samples.get(tag)
        if not samples:
            return 0.0
        horizon = now - window_s * _KEEP_WINDOWS
        while samples and samples[0][0] <= horizon:
            _, n = samples.popleft()
            self._sums[tag] -= n
        if not samples:
            return 0.0
        return self._sums[tag] / len(samples)

    def samples(self, tag: str) -> int:
        """How many samples of ``tag`` the window holds."""
        return len(self._samples.get(tag, ()))

    def keep_only(self, tags: Iterable[str]) -> None:
        """Forget backends not in ``tags`` (deleted, or no longer autoscaling)."""
        keep = set(tags)
        for tag in [t for t in self._samples if t not in keep]:
            del self._samples[tag]
            del self._sums[tag]
