"""A target's :class:`servecore.Response` as the HTTP ingress sends it: its status,
headers and body checked and encoded, and the raw chunks of a stream under one."""

from __future__ import annotations

from typing import Any

from servecore._serving.http_json import describe, dumps
from servecore.web import Response

__all__ = ["BadResponse", "body_of", "head_of", "raw_chunk", "response_of"]


class BadResponse(ValueError):
    """A target's :class:`Response` that cannot be sent; its message says why."""


#: Headers the ingress sets itself: a target's own would contradict the body it sends.
_OWN_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection"})


def response_of(result: Response) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The status, body and headers of a target's :class:`Response`."""
    status, headers = head_of(result)
    media, data = body_of(result.body)
    if not any(name == b"content-type" for name, _ in headers):
        headers.insert(0, (b"content-type", media))
    return status, data, headers


def head_of(result: Response) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The status and headers of a target's :class:`Response`, checked (without the
    ones the ingress sets itself)."""
    status = result.status
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise BadResponse(f"returned a Response with status {status!r}; use 100 to 599")
    headers: list[tuple[bytes, bytes]] = []
    for name, value in result.headers:
        if any(c in text for text in (name, value) for c in "\r\n\0") or not name:
            raise BadResponse(
                f"returned a Response with header {name!r}: {value!r}, which holds a line "
                f"break or is empty; send one line per header"
            )
        try:
            raw = (name.encode("latin-1"), value.encode("latin-1"))
        except UnicodeEncodeError:
            raise BadResponse(
                f"returned a Response with header {name!r} that is not Latin-1 text; "
                f"percent-encode it"
            ) from None
        if raw[0] not in _OWN_HEADERS:
            headers.append(raw)
    return status, headers


def body_of(body: Any) -> tuple[bytes, bytes]:
    """The default media type and the bytes of a :class:`Response` body."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        media = b"application/octet-stream"
        data = bytes(body)
    elif isinstance(body, str):
        media = b"text/plain; charset=utf-8"
        try:
            data = body.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadResponse(f"returned a Response body that {describe(exc)}") from None
    else:
        media = b"application/json"
        try:
            data = dumps(body)
        except (TypeError, ValueError, RecursionError) as exc:
            raise BadResponse(
                f"returned a Response body that is not JSON: {describe(exc)}"
            ) from None
    return media, data


def raw_chunk(item: Any) -> bytes:
    """One item of a stream that answers with its own :class:`Response`: ``bytes`` as
    they are, ``str`` as UTF-8, anything else as one JSON line."""
    if isinstance(item, Response):
        raise BadResponse("yielded a second Response; only the first item may be one")
    if isinstance(item, (bytes, bytearray, memoryview, str)):
        return body_of(item)[1]
    return body_of(item)[1] + b"\n"
