"""Targets for the hardening tests: hostile text, hangs, crash loops."""

from __future__ import annotations

import time
from typing import Any


class SurrogateError:
    """A constructor whose error holds a lone surrogate, as a non-UTF-8 path decoded
    with ``surrogateescape`` does."""

    def __init__(self) -> None:
        raise FileNotFoundError(b"/models/caf\xe9.bin".decode("utf-8", "surrogateescape"))

    def __call__(self, value: Any) -> Any:
        return value


class Hangs:
    """A constructor that never returns (a model load stuck on a dead mount)."""

    def __init__(self) -> None:
        while True:
            time.sleep(0.05)

    def __call__(self, value: Any) -> Any:
        return value


class Unhealthy:
    """Starts, then fails its health check at once: a crash loop."""

    def __call__(self, value: Any) -> Any:
        return value

    def check_health(self) -> None:
        raise RuntimeError("the model's GPU is gone")
