"""Targets for the operating tests (importable by path from replica processes)."""

from __future__ import annotations

from typing import Any


class Chatty:
    """Prints when it starts and on every call, as model code does."""

    def __init__(self) -> None:
        print("loading weights", flush=True)

    def __call__(self, value: Any = None) -> Any:
        print(f"serving {value}", flush=True)
        return value


class FailsWith:
    """A constructor that fails with the message it is given (markup, for the
    dashboard's escaping test)."""

    def __init__(self, message: str) -> None:
        raise ValueError(message)

    def __call__(self, value: Any = None) -> Any:  # pragma: no cover - never constructed
        return value
