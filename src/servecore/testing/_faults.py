"""Fault injection shared by the fake runtime and the faulty store.

A :class:`CrashPlan` numbers every *crash point* the controller passes (before,
midway through and after each commit, before and after each replica start and stop).
Armed with ``at=k``, it raises :class:`SimulatedCrash` at point ``k``; unarmed, it
only counts, which is how the crash-consistency checks learn how many points a command
has, to visit every one.
"""

from __future__ import annotations

__all__ = ["CrashPlan", "InjectedFailure", "SimulatedCrash"]


class SimulatedCrash(BaseException):
    """The controller "crashed" here. A ``BaseException``, so nothing swallows it."""

    def __init__(self, point: int, label: str) -> None:
        self.point = point
        self.label = label
        super().__init__(f"simulated controller crash at point {point} ({label})")


class InjectedFailure(RuntimeError):
    """A start failure the kit injected on purpose (:meth:`InMemoryRuntime.fail_starts`).

    The crash checks tell these apart from a runtime's own failures: an injected one is
    an allowed outcome, any other start failure fails the check.
    """


class CrashPlan:
    """Counts crash points; raises :class:`SimulatedCrash` at point ``at`` if armed."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.count = 0
        self.labels: list[str] = []
        self.fired = False

    def arm(self, at: int | None) -> None:
        """Crash at point ``at`` from now on (``None`` disarms); restarts the count."""
        self.at = at
        self.count = 0
        self.labels = []
        self.fired = False

    def point(self, label: str) -> None:
        """Pass one crash point; crash if it is the armed one."""
        index = self.count
        self.count += 1
        self.labels.append(label)
        if self.at is not None and index == self.at and not self.fired:
            self.fired = True
            raise SimulatedCrash(index, label)
