"""Placement after a node loss: replacements are steered away from the nodes whose
replicas were just found dead or unreachable.

Ray itself never places an actor on a node it has declared dead; but between the loss
(a partition, a frozen machine) and Ray's verdict there is a window -- tens of seconds
by default -- in which the node still counts as alive, and a replacement placed there
is lost again, or hangs in its start. So a node whose replica the runtime killed for
not answering (or whose replica Ray says died with its node) is *avoided* for a while
(:data:`AVOID_NODE_S`): the replacement's actor options get a label selector that
excludes it (``ray.io/node-id: !in(...)``), with a fallback to the backend's own
selector, so that avoiding is a preference, never a reason not to start (a cluster of
one node still gets its replica). A backend that places its replicas by node id itself
is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["AVOID_NODE_S", "NODE_ID_LABEL", "AvoidedNodes", "steer_away"]

#: How long a node is avoided after one of its replicas was lost with it.
AVOID_NODE_S = 300.0

#: The label every Ray node carries with its own id.
NODE_ID_LABEL = "ray.io/node-id"


class AvoidedNodes:
    """Node ids to avoid, each until a deadline (on whatever clock the caller uses)."""

    def __init__(self, avoid_for_s: float = AVOID_NODE_S) -> None:
        self.avoid_for_s = avoid_for_s
        self._until: dict[str, float] = {}

    def add(self, node_id: str, now: float) -> None:
        """Avoid ``node_id`` from ``now`` on, for ``avoid_for_s``."""
        self._until[node_id] = now + self.avoid_for_s

    def at(self, now: float) -> frozenset[str]:
        """The nodes avoided at ``now`` (forgetting those whose time is up)."""
        for node_id in [n for n, until in self._until.items() if until <= now]:
            del self._until[node_id]
        return frozenset(self._until)


def steer_away(options: Mapping[str, Any], avoid: frozenset[str]) -> dict[str, Any]:
    """``options`` (a backend's validated Ray actor options) with a preference for nodes
    not in ``avoid``: a label selector that excludes them, and a fallback to the
    backend's own selector (or any node) when no other node fits.

    Unchanged when nothing is avoided, or when the backend selects by node id itself.
    """
    placed = dict(options)
    own = options.get("label_selector")
    own_selector: dict[str, Any] = dict(own) if isinstance(own, Mapping) else {}
    if not avoid or NODE_ID_LABEL in own_selector or "fallback_strategy" in options:
        return placed
    placed["label_selector"] = {
        **own_selector,
        NODE_ID_LABEL: f"!in({','.join(sorted(avoid))})",
    }
    placed["fallback_strategy"] = [{"label_selector": own_selector}]
    return placed
