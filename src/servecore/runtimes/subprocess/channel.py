"""The host's end of the wire: a replica's socket, and its status pipe."""

from __future__ import annotations

import socket

import trio

from servecore.runtimes.subprocess.wire import parse_frame

__all__ = ["Channel", "read_frame"]


async def read_frame(stream: trio.abc.ReceiveStream) -> tuple[int, int, bytes] | None:
    """Read one frame from ``stream`` (the status pipe); ``None`` if it ends first."""
    buffer = bytearray()
    while (message := parse_frame(buffer)) is None:
        data = await stream.receive_some(1 << 16)
        if not data:
            return None
        buffer += data
    return message


class Channel:
    """A non-blocking Unix socket driven with trio's low-level waits.

    The hot path has as few trio schedule points as possible (each costs several
    microseconds, the order of the whole round trip): :meth:`send` is synchronous --
    the kernel takes a small frame at once, and only what it does not take waits in
    ``backlog`` for :meth:`flush` (run by the replica's watcher) -- and :meth:`receive`
    waits for readability only when no whole frame is buffered. Frames are never
    interleaved, so senders need no lock, and a cancelled caller never leaves half a
    frame behind.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.inbox = bytearray()
        self.backlog = bytearray()
        self.backlog_ready = trio.Event()
        self.closed = False

    def send(self, data: bytes) -> None:
        """Send one whole frame now, or queue what the kernel did not take."""
        if self.closed:
            raise trio.ClosedResourceError("the connection to the replica is closed")
        if self.backlog:
            self.backlog += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"sending to the replica failed: {exc}") from exc
        if sent < len(data):
            self.backlog += data[sent:]
            self.backlog_ready.set()

    async def flush(self) -> None:
        """Forever: send what :meth:`send` could not (the watcher runs this)."""
        while True:
            await self.backlog_ready.wait()
            while self.backlog and not self.closed:
                await trio.lowlevel.wait_writable(self.sock)
                try:
                    sent = self.sock.send(self.backlog)
                except BlockingIOError:
                    continue
                except OSError:
                    return  # the reader notices the broken connection
                del self.backlog[:sent]
            self.backlog_ready = trio.Event()

    async def receive(self) -> tuple[int, int, bytes] | None:
        """The next frame ``(kind, request_id, body)``, or ``None`` once the peer closed."""
        while (message := parse_frame(self.inbox)) is None:
            if self.closed:
                raise trio.ClosedResourceError("the connection to the replica is closed")
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                return None
            if not data:
                return None
            self.inbox += data
        return message

    def close(self) -> None:
        """Close the socket; a task waiting on it wakes with ClosedResourceError."""
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
