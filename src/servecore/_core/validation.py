"""Shared checks for everything that enters the state: names, text, numbers, JSON data.

The rules of :mod:`servecore._core.transitions` hold here too: no I/O, no clock, no randomness, no
imports from the shell. Each check raises the typed :class:`~servecore.InvalidConfig`
naming the field and the value, so ``True`` and infinity are refused alike everywhere.

The ceilings here are *sanity* bounds that keep a value small enough to checkpoint and
to step in bounded time (a 600-deep list would otherwise reach ``RecursionError`` and
``num_replicas=10**9`` would mint a billion effects); a host sets tighter policy with
:class:`servecore.Limits`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from servecore._core.errors import InvalidConfig
from servecore._text import encodable

__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_CONCURRENT_QUERIES",
    "MAX_JSON_DEPTH",
    "MAX_NAME_LENGTH",
    "MAX_REASON_LENGTH",
    "MAX_REPLICAS",
    "MAX_ROUTE_LENGTH",
    "MAX_SECONDS",
    "OPERATOR_PREFIX",
    "check_name",
    "check_namespace",
    "int_between",
    "json_depth",
    "json_object",
    "json_value",
    "name_validator",
    "positive_number",
    "reason_text",
    "seconds",
]

#: Absolute ceilings (see the module docstring); :class:`servecore.Limits` sets policy.
MAX_REPLICAS = 1_000_000
MAX_BATCH_SIZE = 100_000
MAX_CONCURRENT_QUERIES = 1_000_000
MAX_JSON_DEPTH = 100
MAX_NAME_LENGTH = 200
MAX_ROUTE_LENGTH = 2_000
MAX_REASON_LENGTH = 4_000
#: A day: longer batch waits or drain timeouts are mistakes, not policies.
MAX_SECONDS = 86_400.0
#: Paths under this prefix are the HTTP ingress's operator routes (``/-/healthz``,
#: ``/-/routes``, ``/-/metrics``), never an endpoint's.
OPERATOR_PREFIX = "/-/"
_INT64 = (-(2**63), 2**63 - 1)


def reason_text(value: Any) -> str:
    """An error reason from user code or a runtime, made safe to keep in the state:
    a string, encodable, and bounded (the head and the tail are kept; the tail of a
    traceback or a log says why)."""
    text = encodable(value if isinstance(value, str) else repr(value))
    if len(text) > MAX_REASON_LENGTH:
        half = MAX_REASON_LENGTH // 2
        text = f"{text[:half]} [... {len(text) - 2 * half} characters cut ...] {text[-half:]}"
    return text


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_NAME = re.compile(r"^[^\s#/][^\s#]*$")


def check_name(kind: str, value: Any) -> str:
    """A backend tag or endpoint name: a printable string without whitespace or ``#``
    that does not start with ``/``, at most :data:`MAX_NAME_LENGTH` characters."""
    why = (
        f"must be a printable string of 1 to {MAX_NAME_LENGTH} characters, without "
        f"whitespace or '#', not starting with '/'"
    )
    if not isinstance(value, str):
        raise InvalidConfig(f"{kind} name", value, f"{why}, not a {type(value).__name__}")
    if (
        not value
        or len(value) > MAX_NAME_LENGTH
        or not _NAME.match(value)
        or not value.isprintable()
        or not _is_encodable(value)
    ):
        shown: Any = value if len(value) <= MAX_NAME_LENGTH else f"{value[:40]}... ({len(value)})"
        raise InvalidConfig(f"{kind} name", shown, why)
    return value


def check_namespace(value: Any) -> str:
    """A controller name, which runtimes use as a directory or namespace name: a name
    (see :func:`check_name`) that is also safe as one path component."""
    name = check_name("controller", value)
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise InvalidConfig(
            "controller name",
            name,
            "is used as a directory name: no '/' or '\\', and it may not start with '.'",
        )
    return name


def name_validator(kind: str) -> Callable[[Any, Any, Any], None]:
    """An attrs validator running :func:`check_name`."""

    def check(_inst: Any, _attr: Any, value: Any) -> None:
        check_name(kind, value)

    return check


def int_between(
    field: str, low: int, high: int, *, optional: bool = False
) -> Callable[[Any, Any, Any], None]:
    """An attrs validator: an ``int`` (not ``bool``) in ``[low, high]``."""

    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidConfig(field, value, f"must be an integer between {low} and {high}")
        if not low <= value <= high:
            raise InvalidConfig(field, value, f"must be between {low} and {high}")

    return check


def seconds(field: str, value: Any) -> float:
    """A finite number of seconds in ``[0, MAX_SECONDS]``, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfig(field, value, "must be a number of seconds >= 0")
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise InvalidConfig(
            field, value, f"must be a finite number of seconds between 0 and {MAX_SECONDS:g}"
        )
    return float(value)


def positive_number(field: str, value: Any, high: float) -> float:
    """A finite number in ``(0, high]`` (not ``bool``), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfig(field, value, f"must be a number above 0 and at most {high:g}")
    if not math.isfinite(value) or not 0 < value <= high:
        raise InvalidConfig(field, value, f"must be a finite number above 0 and at most {high:g}")
    return float(value)


def json_depth(value: Any, limit: int) -> int:
    """The nesting depth of plain data ``value`` (a scalar is 0), counted without
    recursion and without looking deeper than ``limit + 1``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple)):
            children: Any = item
        elif isinstance(item, Mapping):
            children = item.values()
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        stack.extend((child, depth) for child in children)
    return deepest


def json_value(value: Any, field: str) -> Any:
    """Return ``value`` in the exact shape a JSON round trip gives back, or raise.

    A checkpoint is JSON, and recovery must rebuild a state *equal* to the one saved,
    so tuples become lists and mappings become dicts with string keys here, once.
    Strings must be encodable UTF-8, integers fit 64 bits, floats are finite, and
    nesting stops at :data:`MAX_JSON_DEPTH`.
    """
    depth = json_depth(value, MAX_JSON_DEPTH)
    if depth > MAX_JSON_DEPTH:
        raise InvalidConfig(
            field,
            f"<{type(value).__name__} nested deeper than {MAX_JSON_DEPTH}>",
            f"nesting deeper than {MAX_JSON_DEPTH} levels is refused; flatten the data",
        )
    return _plain(value, field)


def _plain(value: Any, field: str) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if not _is_encodable(value):
            raise InvalidConfig(
                field, value, "holds text UTF-8 cannot encode (a lone surrogate); pass valid text"
            )
        return value
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise InvalidConfig(field, value, "integers must fit in 64 bits (checkpoints are JSON)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidConfig(field, value, "must be a finite number (checkpoints are JSON)")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{field}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidConfig(field, value, f"key {k!r} is not a string (JSON)")
            if not _is_encodable(k):
                raise InvalidConfig(field, k, "a key holds text UTF-8 cannot encode")
            out[k] = _plain(v, f"{field}[{k!r}]")
        return out
    raise InvalidConfig(
        field, value, f"{type(value).__name__} is not JSON-serializable; pass plain data"
    )


def json_object(field: str, value: Any) -> dict[str, Any]:
    """A mapping with string keys, made plain by :func:`json_value`."""
    if not isinstance(value, Mapping):
        raise InvalidConfig(
            field, value, f"must be a mapping with string keys, not a {type(value).__name__}"
        )
    result: dict[str, Any] = json_value(value, field)
    return result
