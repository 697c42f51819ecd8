"""What a replica's recorded status and its liveness mean: one table.

At start-up (``Recover(live)``) and on every resync (``Resync(live, busy)``) the core
compares what the state records about each replica with whether the runtime lists it
as alive. Both read :data:`LIVENESS_FIXES`; ``docs/design.md`` shows the same table
(rendered by :func:`fixes_table_markdown`, and a test holds the two equal), so code,
documentation and tests cannot drift apart.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from servecore._core.values import ReplicaStatus

__all__ = ["LIVENESS_FIXES", "Fix", "fix_for", "fixes_table_markdown"]


class Fix(enum.Enum):
    """What the core does about one replica after comparing its status with liveness."""

    #: They agree: nothing to do.
    KEEP = "keep"
    #: Its start succeeded but the event was lost: it is RUNNING.
    MARK_RUNNING = "mark RUNNING"
    #: Its start was lost with the process that ordered it: start it again (a replica
    #: of an outdated version is forgotten instead, and reconcile starts a current one).
    START_AGAIN = "start it again"
    #: Gone: forget it; reconcile then starts any replica its backend lacks.
    FORGET = "forget it (then reconcile replaces it)"
    #: Alive but meant to stop (or unknown: an orphan): stop it (again).
    STOP = "stop it (again)"


#: ``(recorded status, or None if the state does not name the replica; alive)`` -> fix.
LIVENESS_FIXES: Mapping[tuple[ReplicaStatus | None, bool], Fix] = MappingProxyType(
    {
        (ReplicaStatus.STARTING, True): Fix.MARK_RUNNING,
        (ReplicaStatus.STARTING, False): Fix.START_AGAIN,
        (ReplicaStatus.RUNNING, True): Fix.KEEP,
        (ReplicaStatus.RUNNING, False): Fix.FORGET,
        (ReplicaStatus.STOPPING, True): Fix.STOP,
        (ReplicaStatus.STOPPING, False): Fix.FORGET,
        (None, True): Fix.STOP,
    }
)


def fix_for(status: ReplicaStatus | None, alive: bool) -> Fix:
    """The fix for a replica recorded as ``status`` (``None``: not recorded)."""
    return LIVENESS_FIXES.get((status, alive), Fix.KEEP)


def fixes_table_markdown() -> str:
    """The table as Markdown, as ``docs/design.md`` shows it."""
    rows = ["| recorded status | alive | what the core does |", "|---|---|---|"]
    for (status, alive), fix in LIVENESS_FIXES.items():
        name = status.value if status is not None else "(unknown: an orphan)"
        rows.append(f"| {name} | {'yes' if alive else 'no'} | {fix.value} |")
    return "\n".join(rows)
