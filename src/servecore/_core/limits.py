"""A controller's limits: the host's policy on how big a command may be.

The core refuses only values that could not be checkpointed or stepped at all (see
:mod:`servecore._core.validation`); a host that runs on one machine wants a far lower ceiling, so
that a typo such as ``num_replicas=10**6`` is refused with a clear error instead of
starting a million replicas.
"""

from __future__ import annotations

from typing import Any

import attrs

from servecore._core.errors import InvalidConfig
from servecore._core.messages import CreateBackend, Message, SetBackendConfig, UpdateBackend
from servecore._core.validation import MAX_JSON_DEPTH, MAX_REPLICAS, int_between, json_depth

__all__ = ["Limits"]


@attrs.frozen(kw_only=True)
class Limits:
    """Ceilings a controller enforces on every command before stepping it::

        servecore.open_controller(limits=servecore.Limits(max_replicas=50_000))

    ``max_replicas``: the most replicas one backend may ask for (``num_replicas``, or
    its autoscaling ``max_replicas``).
    ``max_nesting_depth``: how deeply ``init_args``, ``init_kwargs``, ``user_config`` and
    ``runtime_options`` may nest.
    """

    max_replicas: int = attrs.field(
        default=10_000, validator=int_between("max_replicas", 0, MAX_REPLICAS)
    )
    max_nesting_depth: int = attrs.field(
        default=32, validator=int_between("max_nesting_depth", 1, MAX_JSON_DEPTH)
    )

    def check(self, message: Message) -> None:
        """Raise :class:`~servecore.InvalidConfig` if ``message`` exceeds a limit."""
        if isinstance(message, (CreateBackend, UpdateBackend)):
            tag, config = message.tag, message.config
            nested: list[tuple[str, Any]] = [
                ("init_args", message.init_args),
                ("init_kwargs", message.init_kwargs),
            ]
        elif isinstance(message, SetBackendConfig):
            tag, config, nested = message.tag, message.config, []
        else:
            return
        field, asked = "num_replicas", config.num_replicas
        if config.autoscaling is not None:
            field, asked = "autoscaling.max_replicas", config.autoscaling.max_replicas
        if asked is not None and asked > self.max_replicas:
            raise InvalidConfig(
                field,
                asked,
                f"is above this controller's limit of {self.max_replicas}; ask for fewer, "
                f"or raise it with open_controller(limits=servecore.Limits(max_replicas=...))",
                backend=tag,
            )
        nested += [("user_config", config.user_config), ("runtime_options", config.runtime_options)]
        for field, value in nested:
            depth = json_depth(value, self.max_nesting_depth)
            if depth > self.max_nesting_depth:
                raise InvalidConfig(
                    field,
                    f"<nested {depth} levels deep>",
                    f"nests deeper than this controller's limit of {self.max_nesting_depth}; "
                    f"flatten it, or raise open_controller(limits=servecore.Limits("
                    f"max_nesting_depth=...))",
                    backend=tag,
                )
