"""Checks for commands committed together (group commit)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import permutations

from servecore._core.errors import BackendStartError, CheckpointError
from servecore._core.transitions import Command, State
from servecore.testing._model import ReferenceModel, desired

__all__ = ["check_some_order"]


def check_some_order(
    model: ReferenceModel,
    commands: Sequence[Command],
    state: State,
    errors: Sequence[BaseException | None] | None = None,
) -> ReferenceModel:
    """Return ``model`` after ``commands``, sent concurrently, as ``state`` shows them.

    With ``errors`` (each command's, the controller having settled): there must be an
    arrival order in which every rejected command raised the error the model expects
    at its turn, every other one was applied, except that a command failing with
    :class:`~servecore.CheckpointError` (its commit failed) is applied by none, and
    ``state`` is the model after the applied ones. Without ``errors`` (the controller
    crashed): ``state`` must be the model after some arrival order's first few
    commands, since batches commit whole and in order. Raises ``AssertionError``.
    """
    got = desired(state)
    n = len(commands)
    for order in permutations(range(n)):
        if errors is None:
            for cut in range(n + 1):
                durable = model.copy()
                for i in order[:cut]:
                    if durable.expected_error(commands[i]) is None:
                        durable.apply(commands[i])
                if durable.desired() == got:
                    return durable
            continue
        folded, durable, fits = model.copy(), model.copy(), True
        for i in order:
            expected = folded.expected_error(commands[i])
            error = errors[i]
            if expected is not None:
                fits = isinstance(error, expected)
            elif isinstance(error, CheckpointError):
                folded.apply(commands[i])
            else:
                fits = error is None or isinstance(error, BackendStartError)
                folded.apply(commands[i])
                durable.apply(commands[i])
            if not fits:
                break
        if fits and durable.desired() == got:
            return durable
    raise AssertionError(f"no arrival order of {list(commands)} with errors {errors} gives {got}")
