"""The HTTP ingress's JSON: query strings and strict request bodies in, answers out
(see :mod:`servecore.http` for what is refused and why)."""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import parse_qsl

__all__ = [
    "NOT_FINITE",
    "BadBody",
    "describe",
    "dumps",
    "error_answer",
    "is_json",
    "parse_body",
    "query_dict",
]


def query_dict(query: str) -> dict[str, str]:
    """``dict(parse_qsl(query))``, without its per-pair unquoting when nothing in
    ``query`` is quoted (most query strings)."""
    if "%" in query or "+" in query:
        return dict(parse_qsl(query))
    pairs: dict[str, str] = {}
    for pair in query.split("&"):
        name, equals, value = pair.partition("=")
        if equals and value:  # as parse_qsl: no blank values, no pair without "="
            pairs[name] = value
    return pairs


def is_json(media: bytes, body: bytes | bytearray) -> bool:
    """Whether a body of this media type is parsed as JSON: no type (as before request
    objects), ``application/json``, or a ``+json`` type; and a form type whose body is
    JSON all the same, since ``curl -d`` and ``urllib`` label every body so and JSON
    endpoints served such clients before request objects existed."""
    if media in (b"", b"application/json") or media.endswith(b"+json"):
        return True
    if media != b"application/x-www-form-urlencoded":
        return False
    try:
        json.loads(body)
    except ValueError:
        return False  # a real form: the target gets the Request
    return True


class BadBody(ValueError):
    """A request body that is not strict JSON; its message says why."""


def _reject_constant(name: str) -> Any:
    raise BadBody(f"the body is not strict JSON: {name} is not a JSON value; send a number or null")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e999 is valid JSON syntax but no float holds it: user code would get inf.
        raise BadBody(
            f"the body is not strict JSON: the number {text[:40]} is too large for a "
            f"float; send a finite number"
        )
    return value


def parse_body(body: bytes, max_depth: int) -> Any:
    """``body`` parsed as strict JSON, or :class:`BadBody` naming what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadBody(
            f"the body is not UTF-8: byte 0x{body[exc.start]:02x} at offset {exc.start}"
        ) from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadBody(f"the body nests deeper than {max_depth} levels") from None
    except BadBody:
        raise
    except ValueError as exc:
        raise BadBody(f"the body is not JSON: {exc}") from None
    _check(value, max_depth)
    return value


def _check(value: Any, max_depth: int) -> None:
    """Refuse nesting past ``max_depth`` and strings that are not valid Unicode (JSON's
    ``\\ud800`` escapes parse into lone surrogates, which cannot be encoded again)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, (list, dict)):
            if depth >= max_depth:
                raise BadBody(f"the body nests deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadBody(
            f"the body holds a lone surrogate (\\u{ord(text[exc.start]):04x}), which is not "
            f"Unicode text"
        ) from None


NOT_FINITE = "NaN and infinities are not JSON numbers"


def describe(exc: BaseException) -> str:
    """Why ``exc`` (from encoding or decoding JSON) happened, in words for a client."""
    if isinstance(exc, RecursionError):
        return "it nests too deeply"
    if isinstance(exc, UnicodeEncodeError):
        return f"a string holds a lone surrogate (\\u{ord(exc.object[exc.start]):04x})"
    if str(exc).startswith("Out of range float"):  # json's wording for a nested NaN
        return NOT_FINITE
    return str(exc)


#: ``json.dumps(value, allow_nan=False, ensure_ascii=False)`` without making an
#: encoder per call (non-default options do): a few microseconds of every answer.
_ENCODE = json.JSONEncoder(allow_nan=False, ensure_ascii=False).encode


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


#: The same encoding, by json's C encoder made once (``encode`` makes one per call, most
#: of the cost of a small answer), without the check for cycles: a value it cannot
#: encode (a cycle ends in RecursionError) is encoded again by ``_ENCODE``, whose error
#: says what is wrong.
_FAST_ENCODE: Any = (
    None
    if json.encoder.c_make_encoder is None  # type: ignore[attr-defined]
    else json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, _not_json, json.encoder.encode_basestring, None, ": ", ", ", False, False, False
    )
)


def dumps(value: Any) -> bytes:
    """``value`` as strict JSON in UTF-8 (no NaN or infinities, non-ASCII as is);
    ``ValueError``/``TypeError``/``RecursionError`` saying why it cannot be."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(NOT_FINITE)
    if _FAST_ENCODE is not None:
        try:
            return "".join(_FAST_ENCODE(value, 0)).encode("utf-8")
        except (RecursionError, ValueError, TypeError, UnicodeEncodeError):
            pass  # said again, and better, below
    return _ENCODE(value).encode("utf-8")


def error_answer(
    status: int, kind: str, message: str
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """An error answer: ``status``, the body ``{"error": message, "type": kind}``, no
    headers."""
    # ASCII escapes keep any message (even one with a lone surrogate) encodable.
    return status, json.dumps({"error": message, "type": kind}).encode(), []
