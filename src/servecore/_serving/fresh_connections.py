"""A worker's uvicorn, stopping: a connection whose request has not been read yet is
given a moment to send it, instead of being closed at once.

When uvicorn shuts down it closes every connection without a request in progress. A
connection accepted in the same turn of the loop as the shutdown has none yet -- its
request is in the socket, unread -- and closing a socket with unread data sends the
client a reset: a request lost on a graceful stop. asyncio makes a connection's
protocol a turn after accepting it and reads it in the next, so the shutdown rarely
finds one that fresh; uvloop makes the protocol in the turn it accepts, and a worker
stopping under load reset a request in most stops (servecore's takeover stops the old
workers under load by design).

:class:`FreshConnectionDrain` puts off the close of a connection that has no request
yet by :data:`FRESH_GRACE_S`, then does as uvicorn would: a request read meanwhile
is answered and the connection closed after it (at once if answered by then), and a
connection that sent nothing is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["FRESH_GRACE_S", "FreshConnectionDrain"]

#: How long a connection without a request yet may take to send one after the
#: shutdown began (uvicorn waits for its connections in steps of 0.1 s; the workers'
#: own server, lean_http, gives an idle connection as long).
FRESH_GRACE_S = 0.1


class FreshConnectionDrain:
    """A mixin for uvicorn's ``H11Protocol``: see the module."""

    cycle: Any
    transport: Any

    def shutdown(self) -> None:
        """uvicorn's shutdown, put off for a connection whose request is not read yet."""
        if self.cycle is None and not self.transport.is_closing():
            asyncio.get_running_loop().call_later(FRESH_GRACE_S, self._shutdown_later)
            return
        super().shutdown()  # type: ignore[misc]

    def _shutdown_later(self) -> None:
        if self.transport.is_closing():  # the client left meanwhile
            return
        super().shutdown()  # type: ignore[misc]
