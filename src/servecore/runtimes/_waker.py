"""A file descriptor that wakes one trio task from another thread.

Shared by the runtimes whose answers arrive on threads of their own (threads, Ray).
"""

from __future__ import annotations

import os
import socket

__all__ = ["Waker"]


class Waker:
    """A file descriptor that wakes the one trio task waiting to read it.

    Why not ``token.run_sync_soon(reschedule, ...)``: that wakes trio's run-sync-soon
    task, which then reschedules the caller -- two scheduler passes. A readable fd
    reschedules the waiting task straight from the I/O manager, which nearly halves the
    round trip. Wakers are pooled and only reused once no thread can still signal them.
    """

    __slots__ = ("_read", "_write", "fileno")

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):  # Linux
            self.fileno = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._read: socket.socket | None = None
            self._write: socket.socket | None = None
        else:
            self._read, self._write = socket.socketpair()
            self._read.setblocking(False)
            self._write.setblocking(False)
            self.fileno = self._read.fileno()

    def signal(self) -> None:
        """Make it readable (any thread)."""
        if self._write is None:
            os.eventfd_write(self.fileno, 1)
        else:
            self._write.send(b"\0")

    def drain(self) -> None:
        """Make it unreadable again (the trio thread, once woken)."""
        try:
            if self._read is None:
                os.eventfd_read(self.fileno)
            else:
                self._read.recv(4096)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Release the file descriptor(s); only once no thread can signal it."""
        if self._read is None:
            os.close(self.fileno)
        else:
            self._read.close()
            if self._write is not None:
                self._write.close()
