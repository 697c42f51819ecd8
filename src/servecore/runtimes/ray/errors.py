"""Exceptions on their way home from a Ray replica, and Ray's errors in words.

Everything here that turns an error into text makes that text encodable UTF-8: an
exception message may hold lone surrogates (a non-UTF-8 path decoded with
``surrogateescape``), and such text must not reach the controller's checkpoint encoder.
"""

from __future__ import annotations

import contextlib
import pickle
import traceback
from collections.abc import Mapping
from typing import Any

import ray.exceptions

from servecore._core.errors import RemoteError, ReplicaDiedError
from servecore._text import encodable
from servecore.runtimes._remote_errors import rebuild_exception

__all__ = ["ActorDiedError", "Carried", "carry", "rebuild", "short", "user_error"]

#: "The actor is dead" (as opposed to "unreachable for now"); older Rays only have the base.
ActorDiedError: type[BaseException] = getattr(
    ray.exceptions, "ActorDiedError", ray.exceptions.RayActorError
)


class Carried(Exception):
    """An exception raised in a replica, packed so that it survives the trip home.

    Ray pickles a task's exception, and unpickling calls its constructor with its
    ``args`` -- which fails for types that take other arguments
    (``InvalidConfig(field, value, why)``). So the replica sends the exception's
    pickle, its ``__dict__``, its type's import path, message and traceback text, and
    the caller rebuilds it (:func:`rebuild`).
    """

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(info)
        self.info = info


def _dumps(obj: Any) -> bytes | None:
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)
    except Exception:
        return None
    return data


def carry(exc: BaseException) -> Carried:
    """(replica) Pack ``exc`` for the caller."""
    cls = type(exc)
    return Carried(
        {
            "pickled": _dumps(exc),
            "state": _dumps(vars(exc)) if hasattr(exc, "__dict__") else None,
            "module": cls.__module__,
            "qualname": cls.__qualname__,
            "message": _text(str, exc),
            "traceback": _text(lambda e: "".join(traceback.format_exception(e)), exc),
        }
    )


def _text(render: Any, exc: BaseException) -> str:
    """(replica) ``render(exc)``, encodable; a render that fails says so."""
    try:
        return encodable(render(exc))
    except Exception as failure:
        return f"<cannot render {type(exc).__qualname__}: {type(failure).__name__}>"


def rebuild(info: Mapping[str, Any], tag: str) -> Exception:
    """(caller) The exception a replica raised, as its own type when it can be imported."""
    exc = _with_encodable_text(rebuild_exception(info))
    exc.add_note(f"(raised in Ray replica {tag!r})\n{encodable(info['traceback']).rstrip()}")
    return exc


def _with_encodable_text(exc: Exception) -> Exception:
    """``exc``, or an equivalent whose message is encodable: string arguments are
    cleaned, and an exception whose ``str()`` still is not becomes a
    :class:`~servecore.RemoteError` naming its type."""
    try:
        str(exc).encode("utf-8")
        return exc
    except UnicodeEncodeError:
        pass
    except Exception:  # a broken __str__: say what the exception was
        return RemoteError(f"{type(exc).__module__}.{type(exc).__qualname__}", "")
    with contextlib.suppress(Exception):
        exc.args = tuple(encodable(a) if isinstance(a, str) else a for a in exc.args)
        for key, value in list(vars(exc).items()):
            if isinstance(value, str):
                setattr(exc, key, encodable(value))
        str(exc).encode("utf-8")
        return exc
    cls = type(exc)
    try:
        message = encodable(str(exc))
    except Exception:
        message = ""
    return RemoteError(f"{cls.__module__}.{cls.__qualname__}", message)


def user_error(tag: str, error: Any) -> Exception:
    """The user's own exception out of a ``RayTaskError``, with the remote traceback."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, Carried):
        return rebuild(cause.info, tag)
    if isinstance(cause, ray.exceptions.RayActorError):
        return ReplicaDiedError(tag, short(cause))
    if isinstance(cause, Exception):
        text = getattr(error, "traceback_str", None) or str(error)
        cause = _with_encodable_text(cause)
        with contextlib.suppress(Exception):
            cause.add_note(f"(raised in Ray replica {tag!r})\n{encodable(text.rstrip())}")
        return cause
    return RuntimeError(short(error))


def short(error: BaseException) -> str:
    """``error`` in one line of at most about 400 characters, encodable."""
    try:
        text = " ".join(str(error).split())
    except Exception:
        text = ""
    text = encodable(text)
    return f"{type(error).__name__}: {text[:400]}" if text else type(error).__name__
