"""Raising again, on the caller's side, an exception a replica raised elsewhere.

Shared by the out-of-process runtimes (subprocess, Ray). The replica side describes
the exception as a dict (``pickled``, ``state``, ``module``, ``qualname``, ``message``,
``traceback``; see ``error_info`` in ``subprocess/wire.py``); :func:`rebuild_exception`
turns it back into an exception of its own type whenever that type can be imported,
with its text made encodable: what a replica says must never break the checkpoint.

:func:`decode_reply` is how a host reads anything a replica sent back: whatever
unpickling raises (an exception class the host cannot import, a ``__reduce__`` that
raises ``SystemExit``) comes out as :class:`~servecore.ResultDecodeError`, never as a
``BaseException`` unwinding the controller, nor as a bare error that reads as if the
user's code raised it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pickle
from collections.abc import Mapping
from typing import Any

from servecore._core.errors import RemoteError, ResultDecodeError
from servecore._text import encodable

__all__ = ["decode_reply", "rebuild_exception"]


class _NamingUnpickler(pickle.Unpickler):
    """An unpickler that remembers the last class it looked up, so that a failure can
    name the type being rebuilt."""

    last_class = ""

    def find_class(self, module: str, name: str) -> Any:
        self.last_class = f"{module}.{name}"
        return super().find_class(module, name)


def decode_reply(data: bytes, tag: str, runtime: str) -> Any:
    """Unpickle what replica ``tag`` sent back.

    Raises :class:`~servecore.ResultDecodeError` naming the replica, the type being
    rebuilt and what went wrong, whatever the unpickling raised: a ``SystemExit`` or
    ``KeyboardInterrupt`` raised by a hostile ``__reduce__`` included (the replica's data
    must never stop the host). Unpickling runs no trio code, so nothing caught here is
    trio's own cancellation.

    The plain ``pickle.loads`` reads it first (several times faster than an unpickler
    of our own, for every answer); only when that fails is it read again by one that
    names the class it was rebuilding, for the error. (So a ``__reduce__`` of a
    failing answer may run twice; nothing of a failing answer reaches the caller.)
    """
    try:
        return pickle.loads(data)
    except BaseException:  # see the docstring; read again below, to name the type
        pass
    unpickler = _NamingUnpickler(io.BytesIO(data))
    try:
        return unpickler.load()
    except BaseException as exc:  # see the docstring
        type_name = unpickler.last_class or "<unknown>"
        reason = _encodable(_describe(exc))
        raise ResultDecodeError(tag, type_name, reason, runtime=runtime) from (
            exc if isinstance(exc, Exception) else None
        )


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = "<its str() failed>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def rebuild_exception(info: Mapping[str, Any]) -> Exception:
    """The exception ``info`` describes, as its own type when it can be imported.

    Pickle calls the constructor with the exception's args, which fails for types that
    take other arguments: those are built without their constructor, with the message
    and attributes they had. Unknown types, and BaseExceptions such as SystemExit (which
    must not unwind the caller as if the caller were exiting), become
    :class:`~servecore.RemoteError` naming the type.
    """
    exc: BaseException | None = None
    # BaseException is suppressed: a hostile __reduce__ or __init__ may raise SystemExit.
    if info.get("pickled") is not None:
        with contextlib.suppress(BaseException):
            exc = pickle.loads(info["pickled"])
    if exc is None:
        with contextlib.suppress(BaseException):
            cls: Any = importlib.import_module(info["module"])
            for part in info["qualname"].split("."):
                cls = getattr(cls, part)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                rebuilt = cls.__new__(cls)
                rebuilt.args = (info["message"],)
                if info.get("state") is not None:
                    vars(rebuilt).update(pickle.loads(info["state"]))
                exc = rebuilt
    if not isinstance(exc, Exception):
        return RemoteError(f"{info['module']}.{info['qualname']}", _encodable(info["message"]))
    return _made_encodable(exc, info)


def _encodable(text: object) -> str:
    return encodable(str(text))


def _made_encodable(exc: Exception, info: Mapping[str, Any]) -> Exception:
    """``exc`` with lone surrogates escaped in its string arguments and attributes, so
    that ``str(exc)`` encodes; a type whose ``str()`` still does not becomes
    :class:`~servecore.RemoteError` with the (escaped) message."""

    def clean(value: Any) -> Any:
        return _encodable(value) if isinstance(value, str) else value

    try:
        str(exc).encode("utf-8")
        return exc
    except Exception:
        pass
    with contextlib.suppress(Exception):
        exc.args = tuple(clean(arg) for arg in exc.args)
        for name, value in list(vars(exc).items()):
            setattr(exc, name, clean(value))
    try:
        str(exc).encode("utf-8")
    except Exception:
        name = f"{info['module']}.{info['qualname']}"
        return RemoteError(name, _encodable(info.get("message", "")))
    return exc
