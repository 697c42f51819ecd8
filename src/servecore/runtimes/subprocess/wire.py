"""The wire format host and replica share: frames, message kinds, exceptions as data.

Standard library only: the replica process imports this before anything else.

A frame is ``HEADER`` (body length, kind, request id; network order) and a pickled
body. Pickle carries the user's query arguments, results and exceptions over a socket
that only this user can reach (the runtime directory is mode 0700); it never carries
controller state, which is checkpointed as JSON. A malformed frame closes the
connection.

A CALL body may end with a *deadline trailer* after the pickle: one big-endian double
per query (its deadline in wall-clock seconds, NaN for none), their count
(:data:`COUNT`) and :data:`DEADLINES_MAGIC`. ``pickle.loads`` ignores bytes past the
pickled value, so a replica of an older servecore reads such a body as before (and
runs queries without their deadlines), and a body without the trailer (from an older
host) reads as queries without deadlines; a pickle ends with its STOP opcode
(``b"."``), never with the magic, so the two cannot be confused.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import traceback
from typing import Any

from servecore._text import encodable, exception_message

__all__ = [
    "CALL",
    "CANCEL",
    "COUNT",
    "CREDIT",
    "DEADLINES_MAGIC",
    "DRAINED",
    "END",
    "ERROR",
    "GONE",
    "HEADER",
    "ITEM",
    "OK",
    "PING",
    "REFUSED",
    "STREAM",
    "call_body",
    "decode_call",
    "dumps",
    "encodable",
    "encode_call",
    "encode_results",
    "error_info",
    "frame",
    "parse_frame",
    "socket_address",
    "stream_body",
]

#: body length (bytes), message kind, request id
HEADER = struct.Struct("!IBQ")
#: host -> replica: run a batch; the body is a list of ``(args, kwargs)``.
CALL = 1
#: host -> replica: who are you? The reply body is ``{"tag", "pid", "key"}``.
PING = 2
#: replica -> host: the body is the list of results (or the ping answer).
OK = 3
#: replica -> host: the body is an :func:`error_info` dict.
ERROR = 4
#: replica -> host: the replica ends and did not run the batch (or the kind is
#: unknown); body: a reason. The batch may have begun: it is never sent elsewhere.
GONE = 5
#: replica -> host: the replica is draining (SIGTERM) and refused the batch before
#: beginning it; body: a reason. Safe to send to another replica.
REFUSED = 6
#: replica -> host, request id 0: the replica has drained and exits now. Every call
#: still unanswered on this connection was never begun (all that ran were answered
#: first), so each is safe to send to another replica.
DRAINED = 7
#: host -> replica: the caller of request ``request_id`` gave up; cancel its task if
#: it runs on the replica's asyncio loop (an async target). No reply; a sync target's
#: call runs to its end. An older replica answers GONE, which the host drops.
CANCEL = 8
#: host -> replica: open a stream of a generator target; the body is
#: ``(args, kwargs, window)``: the replica may send ``window`` items before more
#: credit. Answered by ITEMs then END, or ERROR/GONE/REFUSED; a CANCEL stops it
#: (no answer follows). An older replica answers GONE (unknown kind).
STREAM = 9
#: replica -> host: one item of stream ``request_id`` (pickled).
ITEM = 10
#: replica -> host: stream ``request_id`` ended normally (empty body).
END = 11
#: host -> replica: the consumer took items; the body is :data:`COUNT` (how many more
#: items the replica may send).
CREDIT = 12
#: The body of a CREDIT frame.
COUNT = struct.Struct("!I")

#: The last bytes of a CALL body that ends with a deadline trailer.
DEADLINES_MAGIC = b"SCDL"
_TRAILER_TAIL = COUNT.size + len(DEADLINES_MAGIC)
#: The trailer of a one-query CALL body with a deadline, but for the magic.
_ONE_DEADLINE = struct.Struct("!dI")

#: Longest socket path that ``bind``/``connect`` take (``sun_path`` is 108 bytes on Linux).
_MAX_SOCKET_PATH = 100


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` with the highest protocol (both ends run the same Python)."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def encode_results(tag: str, results: Any, runtime: str) -> bytes:
    """(replica) Pickle a batch's ``results`` for the host, which reads them with
    ``servecore.runtimes._remote_errors.decode_reply``.

    A value pickle refuses raises :class:`~servecore.UnpicklableResult` naming replica
    ``tag``, the first such value's type and why (the Ray replica actor sends its results
    this way too, so both runtimes refuse the same values with the same error).
    """
    try:
        return dumps(results)
    except Exception as exc:
        raise _unpicklable(tag, results, exc, runtime) from None


def _unpicklable(tag: str, results: Any, exc: Exception, runtime: str) -> Exception:
    """The typed error for a result pickle refuses, naming the first such value's type."""
    # Imported here: the replica imports this module before anything else of servecore.
    from servecore._core.errors import UnpicklableResult

    culprit: Any = results
    for value in results if isinstance(results, list) else ():
        try:
            dumps(value)
        except Exception:
            culprit = value
            break
    cls = type(culprit)
    reason = encodable(f"{type(exc).__name__}: {exception_message(exc)}")
    return UnpicklableResult(tag, f"{cls.__module__}.{cls.__qualname__}", reason, runtime=runtime)


def encode_call(batch: Any) -> bytes:
    """(host) The body of a CALL frame for ``batch`` (queries with ``args``, ``kwargs``
    and ``deadline``): the pickled ``(args, kwargs)`` pairs, and the deadline trailer
    when any query has a deadline (see the module doc). Raises what pickle raises."""
    if len(batch) == 1:  # a host thread's query, the usual case: no lists to build
        (q,) = batch
        body = dumps([(q.args, q.kwargs)])
        deadline = getattr(q, "deadline", None)
        if deadline is None:
            return body
        return body + _ONE_DEADLINE.pack(float(deadline), 1) + DEADLINES_MAGIC
    body = dumps([(q.args, q.kwargs) for q in batch])
    deadlines = [getattr(q, "deadline", None) for q in batch]
    if all(d is None for d in deadlines):
        return body
    values = [math.nan if d is None else float(d) for d in deadlines]
    n = len(values)
    return body + struct.pack(f"!{n}d", *values) + COUNT.pack(n) + DEADLINES_MAGIC


def call_body(batch: Any, tag: str) -> bytes:
    """(host) :func:`encode_call` for replica ``tag``; arguments pickle cannot take
    raise ``TypeError`` naming the replica (nothing was sent)."""
    try:
        return encode_call(batch)
    except Exception as exc:
        raise TypeError(
            f"the arguments of a query to replica {tag!r} cannot be pickled: {exc}"
        ) from exc


def stream_body(query: Any, window: int, tag: str) -> bytes:
    """(host) The body of a STREAM frame: the query's arguments and the credit
    ``window``; ``TypeError`` naming the replica if they cannot be pickled."""
    try:
        return dumps((query.args, query.kwargs, window))
    except Exception as exc:
        raise TypeError(
            f"the arguments of a stream to replica {tag!r} cannot be pickled: {exc}"
        ) from exc


def decode_call(body: bytes) -> list[tuple[Any, Any, float | None]]:
    """(replica) The ``(args, kwargs, deadline)`` of each query of a CALL body
    (``deadline`` is ``None`` when the host sent none). Raises what unpickling raises."""
    pairs = pickle.loads(body)  # stops at the pickle's end: a trailer is not read
    deadlines: list[float | None] = [None] * len(pairs)
    if body.endswith(DEADLINES_MAGIC) and len(body) >= _TRAILER_TAIL:
        (n,) = COUNT.unpack_from(body, len(body) - _TRAILER_TAIL)
        start = len(body) - _TRAILER_TAIL - 8 * n
        if n == len(pairs) and start >= 0:
            values = struct.unpack_from(f"!{n}d", body, start)
            deadlines = [None if math.isnan(v) else v for v in values]
    return [(args, kwargs, d) for (args, kwargs), d in zip(pairs, deadlines, strict=True)]


def frame(kind: int, request_id: int, body: bytes) -> bytes:
    """One message on the wire."""
    return HEADER.pack(len(body), kind, request_id) + body


def parse_frame(buffer: bytearray) -> tuple[int, int, bytes] | None:
    """Take one whole frame ``(kind, request_id, body)`` off the front of ``buffer``,
    if there is one."""
    if len(buffer) < HEADER.size:
        return None
    length, kind, request_id = HEADER.unpack_from(buffer)
    end = HEADER.size + length
    if len(buffer) < end:
        return None
    body = bytes(buffer[HEADER.size : end])
    del buffer[:end]
    return kind, request_id, body


# Everything a replica says (error messages, tracebacks, log lines) passes through
# encodable() before it reaches the controller, whose checkpoint must encode it.
_describe = exception_message


def error_info(exc: BaseException) -> dict[str, Any]:
    """Describe ``exc`` so the other side can raise it again.

    ``pickled`` is the exception itself when it pickles (``None`` otherwise) and
    ``state`` its ``__dict__``, for types whose constructor pickle cannot call again
    (those with extra required arguments). The type's module and qualified name, the
    message and the formatted traceback always travel (as encodable text), so an
    exception whose class cannot be imported on the other side still says what it was.
    """
    try:
        pickled: bytes | None = dumps(exc)
    except Exception:
        pickled = None
    try:
        state: bytes | None = dumps(vars(exc))
    except Exception:
        state = None
    cls = type(exc)
    try:
        formatted = encodable("".join(traceback.format_exception(exc)))
    except Exception:
        formatted = f"{cls.__qualname__} (its traceback could not be formatted)"
    return {
        "pickled": pickled,
        "state": state,
        "module": cls.__module__,
        "qualname": cls.__qualname__,
        "message": _describe(exc),
        "traceback": formatted,
    }


def socket_address(path: str, dir_fd: int | None) -> str:
    """A path that ``bind``/``connect`` accept for the socket at ``path``.

    ``sun_path`` holds about 100 bytes, and temporary directories (pytest's above all)
    can be longer. On Linux a long path is reached through the already open directory,
    ``/proc/self/fd/DIR_FD/NAME``, which is short whatever the directory's length.
    """
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH or dir_fd is None:
        return path
    return f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}"
