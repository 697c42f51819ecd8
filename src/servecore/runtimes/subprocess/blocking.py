"""The direct path from a host thread to a replica process, without entering trio.

A host thread's ``SyncHandle.call`` used to hop into the controller's trio thread, which
sent the query on the runtime's one connection to the replica and hopped back with
the answer: two thread switches and a trio round per query (about 10x a bare pipe
echo). When the router finds a free replica (no queue, no batching), it now calls
:meth:`BlockingCalls.call` on the calling thread instead, which speaks the same wire
protocol over a connection of that thread's own (made on first use, kept in
thread-local storage, and checked with the same handshake as the host's). The replica
serves each connection with its own threads, so these connections never wait on each
other. Anything unusual (a replica that is unknown here, stopping or dead) answers
``None``, and the router takes the ordinary path through trio.
"""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from servecore._core.errors import ReplicaDiedError
from servecore.runtimes._protocol import Query
from servecore.runtimes._remote_errors import decode_reply
from servecore.runtimes.subprocess.replica import answer_of
from servecore.runtimes.subprocess.wire import (
    CALL,
    CANCEL,
    DRAINED,
    HEADER,
    OK,
    PING,
    call_body,
    frame,
)

__all__ = ["BlockingCalls"]

#: How long the handshake on a new connection may take.
HANDSHAKE_S = 5.0


class _Connection:
    """One thread's connection to one replica (used by that thread only)."""

    __slots__ = ("ids", "inbox", "pid", "sock", "timeout")

    def __init__(self, sock: socket.socket, pid: object) -> None:
        self.sock = sock
        self.pid = pid
        self.ids = itertools.count(1)
        #: What was read past the last frame (normally nothing: one answer at a time).
        self.inbox = bytearray()
        #: The socket's timeout now: set only when it changes (each set is a syscall).
        self.timeout: float | str | None = "unset"

    def read_frame(self) -> tuple[int, int, bytes]:
        """The next frame: usually one ``recv`` for its header and body together."""
        inbox = self.inbox
        if not inbox:  # the usual case: one answer, whole in one recv, nothing after it
            chunk = self.sock.recv(1 << 16)
            if len(chunk) >= HEADER.size:
                length, kind, request_id = HEADER.unpack_from(chunk)
                if len(chunk) == HEADER.size + length:
                    return kind, request_id, chunk[HEADER.size :]
            elif not chunk:
                raise EOFError("the replica closed the connection")
            inbox += chunk
        while True:
            if len(inbox) >= HEADER.size:
                length, kind, request_id = HEADER.unpack_from(inbox)
                end = HEADER.size + length
                if len(inbox) >= end:
                    body = bytes(inbox[HEADER.size : end])
                    del inbox[:end]
                    return kind, request_id, body
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("the replica closed the connection")
            inbox += chunk


class _ThreadState(threading.local):
    """What each thread keeps: its connections by replica tag."""

    def __init__(self) -> None:
        self.connections: dict[str, _Connection] = {}


class BlockingCalls:
    """Per-thread connections to replicas; see the module docstring.

    ``address_of(tag)`` gives the socket address of a live replica the runtime knows,
    or ``None`` (not here, stopping, or dead: the caller then routes through trio).
    """

    def __init__(self, address_of: Callable[[str], tuple[str, object] | None]) -> None:
        self._address_of = address_of
        self._local = _ThreadState()

    def call(self, tag: str, batch: Sequence[Query], timeout_s: float | None) -> list[Any] | None:
        """Run ``batch`` on replica ``tag`` from this thread; ``None`` if it cannot be
        sent here (the router then takes its ordinary path). Raises what the replica
        raised, ``TimeoutError`` past ``timeout_s``, or ``ReplicaDiedError``."""
        where = self._address_of(tag)
        if where is None:
            return None
        address, pid = where
        connections = self._local.connections
        conn = connections.get(tag)
        if conn is not None and conn.pid != pid:  # a new process under the same tag
            self._forget(tag)
            conn = None
        if conn is None:
            try:
                conn = connections[tag] = _connect(address, tag, pid)
            except (OSError, ValueError):
                return None  # not reachable from here now: trio's path decides
        body = call_body(batch, tag)
        request_id = next(conn.ids)
        try:
            if conn.timeout != timeout_s:
                conn.sock.settimeout(timeout_s)
                conn.timeout = timeout_s
            conn.sock.sendall(HEADER.pack(len(body), CALL, request_id) + body)
            while True:
                kind, answered, payload = conn.read_frame()
                if answered == request_id:
                    break
                if kind == DRAINED:  # request id 0: never one of ours
                    self._forget(tag)
                    raise ReplicaDiedError(tag, "the replica drained before beginning the query")
        except TimeoutError:
            # The answer may still come: this connection is out of step now, so it
            # goes, and the replica is asked to cancel the query (an async target).
            _send_quietly(conn.sock, frame(CANCEL, request_id, b""))
            self._forget(tag)
            raise
        except (OSError, EOFError) as exc:
            self._forget(tag)
            raise ReplicaDiedError(tag, f"connection lost: {exc}") from exc
        if kind == OK:  # the usual answer, read without answer_of's Outcome around it
            results: list[Any] = decode_reply(payload, tag, "subprocess")
            return results
        failed: list[Any] = answer_of(kind, payload, tag).unwrap()  # raises
        return failed

    def _forget(self, tag: str) -> None:
        conn = self._local.connections.pop(tag, None)
        if conn is not None:
            conn.sock.close()


def _connect(address: str, tag: str, pid: object) -> _Connection:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE_S)
        sock.connect(address)
        sock.sendall(frame(PING, 0, b""))
        kind, _, body = _read_frame(sock)
        hello = decode_reply(body, tag, "subprocess") if kind == OK else None
        if not isinstance(hello, dict) or hello.get("tag") != tag:
            raise ValueError(f"socket {address} is not served by replica {tag!r}")
    except BaseException:
        sock.close()
        raise
    return _Connection(sock, pid)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("the replica closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    length, kind, request_id = HEADER.unpack(_read_exactly(sock, HEADER.size))
    return kind, request_id, _read_exactly(sock, length)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.settimeout(0.1)
        sock.sendall(data)
    except OSError:
        pass
