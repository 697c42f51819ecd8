"""One write per HTTP response from an ingress worker's uvicorn, not one per message.

uvicorn writes each ASGI message to the socket as it comes: a response's head, then its
body, each a ``send`` system call and (``TCP_NODELAY``) a segment of its own, which the
client wakes up for twice. :class:`CoalescedTransport` stands between uvicorn's HTTP
protocol and the socket's transport and holds what is written until the end of the
event loop's turn, then writes it at once: a small response leaves in one segment.
On 2 shared cores this took a bare ASGI app on uvicorn from about 6,000 to about 10,000
requests per second (``benchmarks/bench_http.py``, which measures both).

Nothing waits longer than the turn that wrote it; closing writes what is held first;
a transport that is closing or aborted drops it (its connection is gone). Flow control
is the real transport's: it pauses the protocol once the held bytes are written.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["CoalescedTransport", "coalescing_h11_protocol"]


class CoalescedTransport:
    """``transport``, with writes held until the end of the loop's turn (see the module)."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        """Hold ``data``; the turn's writes go out together when it ends."""
        held = self._held
        if held is None:
            self._held = [data]
            self._loop.call_soon(self.flush)
        else:
            held.append(data)

    def flush(self) -> None:
        """Write what is held, now."""
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        """Write what is held, then close (as a transport writes its buffer first)."""
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        """Drop what is held and close at once."""
        self._held = None
        self._transport.abort()

    def is_closing(self) -> bool:
        """Whether the transport is closing or closed."""
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The transport's ``get_extra_info``."""
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        """The transport's ``pause_reading``."""
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        """The transport's ``resume_reading``."""
        self._transport.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """The transport's ``set_protocol`` (uvicorn's upgrade to another protocol)."""
        self.flush()
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The transport's protocol."""
        return self._transport.get_protocol()

    def get_write_buffer_size(self) -> int:
        """Bytes the transport has not written yet, the held ones included."""
        held = sum(map(len, self._held)) if self._held else 0
        return held + self._transport.get_write_buffer_size()

    def __getattr__(self, name: str) -> Any:
        # Anything else a protocol asks of a transport (write_eof, can_write_eof, ...).
        if name in ("write_eof", "writelines"):
            self.flush()
        return getattr(self._transport, name)


def coalescing_h11_protocol() -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, writing through a :class:`CoalescedTransport` (pass it
    as ``uvicorn.Config(http=...)``), and stopping without resetting a connection whose
    request is not read yet
    (:class:`~servecore._serving.fresh_connections.FreshConnectionDrain`)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from servecore._serving.fresh_connections import FreshConnectionDrain

    class CoalescingH11Protocol(FreshConnectionDrain, H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            coalesced: Any = CoalescedTransport(transport, asyncio.get_running_loop())
            super().connection_made(coalesced)

    return CoalescingH11Protocol
