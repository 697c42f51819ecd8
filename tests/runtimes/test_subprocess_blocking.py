"""The direct path of host threads (``runtimes/subprocess/blocking.py``) against a
scripted replica socket: answers that arrive in pieces, or with other frames around
them, are read whole and matched to their query."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from servecore import ReplicaDiedError
from servecore.runtimes import Query
from servecore.runtimes.subprocess.blocking import BlockingCalls
from servecore.runtimes.subprocess.wire import (
    CALL,
    DRAINED,
    HEADER,
    OK,
    PING,
    decode_call,
    dumps,
    frame,
)

TAG = "echo#1"


def _read_frame(conn: socket.socket) -> tuple[int, int, bytes]:
    header = conn.recv(HEADER.size, socket.MSG_WAITALL)
    length, kind, request_id = HEADER.unpack(header)
    return kind, request_id, conn.recv(length, socket.MSG_WAITALL) if length else b""


Script = Callable[[int, int, bytes], list[bytes]]


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[tuple[str, list[Script]]]:
    """A socket that answers the handshake, then each CALL as the next script says:
    the script returns the pieces to send, each sent apart (a short pause between)."""
    path = str(tmp_path / "r.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(10)
    scripts: list[Script] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            kind, _, _ = _read_frame(conn)
            assert kind == PING
            conn.sendall(frame(OK, 0, dumps({"tag": TAG, "pid": 1, "key": "k"})))
            while scripts:
                kind, request_id, body = _read_frame(conn)
                assert kind == CALL
                for piece in scripts.pop(0)(kind, request_id, body):
                    conn.sendall(piece)
                    time.sleep(0.02)  # so that the pieces arrive apart

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield path, scripts
    finally:
        server.join(10)
        listener.close()


def _answer(request_id: int, body: bytes) -> bytes:
    ((args, _, _),) = decode_call(body)
    return frame(OK, request_id, dumps([("answer", *args)]))


def test_answers_in_pieces_or_among_other_frames_reach_their_callers(
    replica: tuple[str, list[Script]],
) -> None:
    path, scripts = replica

    def in_pieces(kind: int, request_id: int, body: bytes) -> list[bytes]:
        whole = _answer(request_id, body)
        return [whole[:5], whole[5:15], whole[15:]]  # a header split, then the body

    def after_a_stale_answer(kind: int, request_id: int, body: bytes) -> list[bytes]:
        stale = frame(OK, request_id + 100, dumps(["not yours"]))
        return [stale + _answer(request_id, body)]

    def then_drained(kind: int, request_id: int, body: bytes) -> list[bytes]:
        return [_answer(request_id, body) + frame(DRAINED, 0, dumps("draining"))]

    def nothing(kind: int, request_id: int, body: bytes) -> list[bytes]:
        return []

    scripts += [in_pieces, after_a_stale_answer, then_drained, nothing]
    calls = BlockingCalls(lambda tag: (path, 1) if tag == TAG else None)
    results = []
    for value in ("a", "b", "c"):
        results.append(calls.call(TAG, [Query(args=(value,))], 10.0))
    assert results == [[("answer", "a")], [("answer", "b")], [("answer", "c")]]
    # What came after the third answer is read by the next call: the replica drained.
    with pytest.raises(ReplicaDiedError, match="drained"):
        calls.call(TAG, [Query(args=("d",))], 10.0)
    assert calls.call("unknown", [Query(args=("e",))], 10.0) is None
