"""HTTP requests and responses as values a target takes and returns (docs/design.md §5,
"HTTP requests and responses").

The HTTP ingress passes a target a :class:`Request` when the JSON value alone would lose
what the client sent: a body whose ``Content-Type`` is not JSON, or a path below the
endpoint's route. A target may return a :class:`Response` (from any request) to choose
the status, headers and body::

    def classify(request: servecore.Request | dict) -> servecore.Response | dict:
        if isinstance(request, servecore.Request):
            return servecore.Response(status=201, body=request.body.upper(),
                                      headers={"content-type": "text/plain"})
        return {"label": "cat"}

Both are frozen and picklable, so they cross to subprocess and Ray replicas.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

__all__ = ["Request", "Response"]

Headers = tuple[tuple[str, str], ...]


def _headers(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> Headers:
    """Header pairs with lower-case names, in order (a name may repeat)."""
    pairs = value.items() if isinstance(value, Mapping) else value
    return tuple((str(name).lower(), str(text)) for name, text in pairs)


@attrs.frozen
class Request:
    """One HTTP request as the ingress received it.

    ``path`` is what remains of the URL path below the endpoint's ``route`` (``""`` for
    the route itself, ``"/sub"`` for ``/classify/sub`` at route ``/classify``);
    ``query`` the decoded query string as ordered pairs; ``headers`` the header pairs
    with lower-case names; ``body`` the raw bytes.
    """

    method: str
    path: str = ""
    route: str = ""
    query: tuple[tuple[str, str], ...] = ()
    headers: Headers = attrs.field(default=(), converter=_headers)
    body: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (any case), or ``default``."""
        name = name.lower()
        return next((text for key, text in self.headers if key == name), default)

    @property
    def content_type(self) -> str:
        """The media type of the body, without parameters (``"text/plain"``), or ``""``."""
        return (self.header("content-type") or "").split(";")[0].strip().lower()

    @property
    def query_params(self) -> dict[str, str]:
        """The query string as a dict (the last value of a repeated name wins)."""
        return dict(self.query)

    def text(self) -> str:
        """The body decoded as UTF-8 (``UnicodeDecodeError`` if it is not)."""
        return self.body.decode("utf-8")

    def json(self) -> Any:
        """The body parsed as JSON (``ValueError`` if it is not)."""
        return json.loads(self.body)


@attrs.frozen
class Response:
    """What a target returns to choose the HTTP answer.

    ``body`` is sent as is when it is ``bytes`` (``application/octet-stream`` unless
    ``headers`` name a ``content-type``), UTF-8 encoded when it is ``str``
    (``text/plain; charset=utf-8``), and as JSON otherwise (``application/json``).
    ``status`` is any code from 100 to 599; ``content-length`` is the ingress's to set.
    """

    body: Any = b""
    status: int = 200
    headers: Headers = attrs.field(default=(), converter=_headers)
