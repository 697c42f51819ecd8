"""Ray actor options of a backend (``BackendConfig.runtime_options``), validated."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from servecore._core.errors import InvalidConfig
from servecore._core.transitions import StartReplica

__all__ = ["RUNTIME_OPTIONS", "actor_options"]

#: Ray actor options a backend may set in ``BackendConfig.runtime_options``.
RUNTIME_OPTIONS: frozenset[str] = frozenset(
    {
        "num_cpus",
        "num_gpus",
        "memory",
        "resources",
        "accelerator_type",
        "runtime_env",
        "scheduling_strategy",
        "label_selector",
    }
)


def _number(backend: str, key: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidConfig(
            f"runtime_options[{key!r}]", value, "must be a number >= 0", backend=backend
        )


def actor_options(effect: StartReplica) -> dict[str, Any]:
    """The Ray actor options of ``effect``'s backend, validated.

    Unknown keys raise :class:`~servecore.InvalidConfig` naming the key and the known
    ones; the values of known keys are checked for their shape here, and fully by Ray.
    """
    given = effect.config.runtime_options
    unknown = sorted(set(given) - RUNTIME_OPTIONS)
    if unknown:
        known = sorted(RUNTIME_OPTIONS)
        raise InvalidConfig(
            "runtime_options",
            given,
            f"the ray runtime does not know the key(s) {unknown}; known: {known}",
            backend=effect.backend,
        )
    options = dict(given)
    for key in ("num_cpus", "num_gpus", "memory"):
        if key in options:
            _number(effect.backend, key, options[key])
    resources = options.get("resources")
    if resources is not None:
        if not isinstance(resources, Mapping):
            raise InvalidConfig(
                "runtime_options['resources']",
                resources,
                "must be a mapping of resource name to amount",
                backend=effect.backend,
            )
        for name, amount in resources.items():
            _number(effect.backend, f"resources[{name!r}]", amount)
    strategy = options.get("scheduling_strategy")
    if strategy is not None and strategy not in ("DEFAULT", "SPREAD"):
        raise InvalidConfig(
            "runtime_options['scheduling_strategy']",
            strategy,
            "must be 'DEFAULT' or 'SPREAD' (checkpoints are JSON, so no strategy objects)",
            backend=effect.backend,
        )
    return options
