"""Kept for the modules that still import it: the helpers live in
:mod:`servecore.runtimes.toolkit`, the public plugin toolkit."""

from servecore.runtimes.toolkit import (
    BATCH_MARKER,
    BatchSizeError,
    batch,
    batch_argument,
    import_target,
    instantiate,
    is_batch,
    make_runner,
    prepare_replica,
)

__all__ = [
    "BATCH_MARKER",
    "BatchSizeError",
    "batch",
    "batch_argument",
    "import_target",
    "instantiate",
    "is_batch",
    "make_runner",
    "prepare_replica",
]
