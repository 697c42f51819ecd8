"""Targets for HTTP requests and streamed responses (docs/design.md §5), picklable so
they serve from subprocess replicas too."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import servecore


def describe(value: Any) -> dict[str, Any]:
    """What the target was given: a Request's parts, or the plain value."""
    if isinstance(value, servecore.Request):
        return {
            "request": True,
            "method": value.method,
            "path": value.path,
            "query": value.query_params,
            "content_type": value.content_type,
            "body": value.text(),
        }
    return {"request": False, "value": value}


def tokens(value: Any) -> Iterator[Any]:
    """A streamed response: status 201 and its own headers, then text chunks, bytes
    and a JSON value (``?n=`` chunks of text)."""
    params = value.query_params if isinstance(value, servecore.Request) else value
    n = int(params.get("n", "3"))
    yield servecore.Response(status=201, headers={"content-type": "text/plain", "x-kind": "tok"})
    for i in range(n):
        yield f"tok{i} "
    yield b"raw "
    yield {"done": n}


def tokens_then_fail(value: Any) -> Iterator[Any]:
    """A streamed response whose generator fails after its first chunk."""
    yield servecore.Response(headers={"content-type": "text/plain"}, body="head ")
    yield "partial "
    raise RuntimeError("the model ran out of memory")


def second_head(value: Any) -> Iterator[Any]:
    """A streamed response that yields a second :class:`Response` after some chunks
    (all at once, so they reach the ingress together)."""
    yield servecore.Response(headers={"content-type": "text/plain"})
    yield "a "
    yield "b "
    yield servecore.Response(status=500)
    yield "never sent"


def bad_head(value: Any) -> Iterator[Any]:
    """A streamed response with a status no client can read."""
    yield servecore.Response(status=99)
    yield "never sent"
